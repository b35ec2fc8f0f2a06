"""`outbox` source: changes captured by ordinary triggers into `onesignal_bridge.outbox`.

For databases where logical replication is not available (`wal_level = replica`, no REPLICATION
privilege). `sql/outbox.sql` (applied by `setup`) installs one generic trigger function; each
mapped table gets a row trigger (INSERT, UPDATE, DELETE) and a statement trigger (TRUNCATE) that
append the row images (jsonb, the captured columns only), the transaction id and the table name to
the outbox in the writing transaction, and `pg_notify` the channel `onesignal_bridge_outbox`
when the bridge waits for them (at most one per transaction: a bulk write wakes the bridge once).
This module drains the outbox.

Ordering rule (what "commit order" means here)
----------------------------------------------
The trigger cannot know when its transaction will commit, so the outbox id is drawn from a
sequence (CACHE 1) *inside the trigger*, while the writing transaction holds the lock on the row
it changed. The bridge applies committed rows in id order:

1. Only committed rows are ever claimed: the claim is an ordinary MVCC read, rows of transactions
   still in progress (or rolled back) are invisible to it.
2. Every change that Postgres orders is in id order. If transaction B changes a row after A
   committed a change to it (same row: B waited for A's row lock; a foreign key; anything B read
   of A's committed data), B's trigger ran after A committed, and A drew its ids before it
   committed, so B's ids are higher. Within one transaction, ids follow the statements.
3. Rows appear in the bridge's claims in commit order: a row is claimable only once its
   transaction committed, and each claim takes the lowest ids not yet claimed. A transaction that
   drew low ids and committed late ("a straggler") is applied after the rows that committed
   before it, i.e. in commit order; rule 2 guarantees that no row it must follow is still to come.
   Only rows of concurrent transactions that became visible in the same claim are applied in id
   order rather than commit order; such transactions changed different rows (else one would have
   waited for the other), so either order is a serial order of the database's history.

We do not use the snapshot xmin (`pg_snapshot_xmin(pg_current_snapshot())`) as a frontier: holding
back committed rows until every older transaction has finished would stall delivery behind any
long transaction in the cluster and still would not yield commit order; xid order is not commit
order either (it is the order of first writes, and it breaks rule 2). `txid` (xid8) is recorded for
diagnosis. Deleting by id range would be wrong (a straggler below the range may commit later):
rows are deleted by the exact ids claimed.

Claiming, confirming, deleting
------------------------------
Each claim reads up to `batch_size` committed rows in id order, skipping the ids this process
already holds (claimed, not yet deleted). Each row becomes one `ChangeEvent` (position
`outbox#<id>`); after the batch, `sink.mark(batch number)`. Rows are deleted, by id, only for
batches at or below `sink.confirmable` (every change in them applied or dead-lettered), after each
claim, while waiting, and at shutdown after `drain()`. A crash at any point leaves the rows that
were not confirmed in the outbox; the next leader applies them again (idempotent requests). While
`max_unconfirmed_rows` rows are claimed and not yet deleted, claiming pauses (backpressure).
The held ids are sent as an `int8multirange` of their runs, so the claim stays one small query.
Claims take no row locks: `FOR UPDATE SKIP LOCKED` would hold them only for the claiming statement
(rows stay in the outbox until applied, far longer than any transaction should), would write
every claimed heap tuple, and would need UPDATE on the outbox; the leader lock below is what keeps
a second drainer out.

Wake-ups: a separate connection LISTENs on `onesignal_bridge_outbox`. NOTIFY is not free for the
writers (a notifying transaction takes a cluster-wide lock at commit), so the trigger notifies
only while the flag `onesignal_bridge.wakeup.waiting` is up, once per transaction. After catching
up, the source polls every `LINGER_STEP_S` for `LINGER_S` (a steady stream of writes never
notifies), then raises the flag, claims once more, and waits for a notification or
`poll_interval_ms`, whichever comes first: a lost notification costs at most one poll interval.
It lowers the flag when a claim returns rows again and at shutdown.

Replicas: leader election with a session advisory lock
------------------------------------------------------
Per-user order needs one ordered stream per user. The source takes
`pg_try_advisory_lock(hashtextextended('onesignal_bridge.outbox', 0))` on the connection it claims
and deletes with; other replicas wait as hot standbys and retry every `poll_interval_ms`. If the
leader dies, Postgres drops its session and the lock with it; a standby takes over and re-reads
every row the leader had not deleted. We chose this over partitioning by a hash of the user
because (a) the trigger would have to know each table's identity column and the bridge how to
rebalance partitions as replicas come and go, (b) a row whose identity changes belongs to two
users and two partitions at once, and (c) one process already saturates OneSignal's per-app rate
limit, which is the throughput ceiling, so parallel draining would buy nothing.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import psycopg
from psycopg import errors as pgerr

from bridge.config import Config, OutboxSourceConfig
from bridge.errors import SourceError, SourceSetupError
from bridge.events import ChangeEvent, Op
from bridge.observability import metrics as m
from bridge.ports import Sink
from bridge.sources.database import Leadership, clean, lease_for, reconnecting
from bridge.sources.outbox_values import TableDecoder, parse_row

log = logging.getLogger("bridge.source.outbox")

LINGER_S = 0.25  # after catching up, poll this long before asking writers to notify
LINGER_STEP_S = 0.025  # poll interval while lingering (the latency of a busy outbox)
HELD_WAIT_S = 0.1  # while rows wait for confirmation: how often to try to delete them
CHANNEL = "onesignal_bridge_outbox"
OUTBOX = "onesignal_bridge.outbox"
LOCK_SQL = "SELECT pg_try_advisory_lock(hashtextextended('onesignal_bridge.outbox', 0))"
TRIGGER = "onesignal_bridge_capture"
TRUNCATE_TRIGGER = "onesignal_bridge_truncate"
CAPTURE_FUNCTION = "onesignal_bridge.capture"

# The catalogs, not to_regclass: a name lookup needs USAGE on the schema, which the bridge's role
# does not need (and may not have) on the application's schemas. Parameters: schema, table.
REL_OID = ("(SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
           " WHERE n.nspname = %s AND c.relname = %s)")
# A table's columns: name, type (a domain's base type) and, for arrays, the element type.
COLUMNS_SQL = (
    "SELECT a.attname, b.oid::int, CASE WHEN b.typcategory = 'A' THEN b.typelem::int ELSE 0 END"
    " FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid"
    " JOIN pg_type b ON b.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END"
    f" WHERE a.attrelid = {REL_OID} AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum"
)
PRIMARY_KEY_SQL = (
    "SELECT a.attname FROM pg_index i"
    " JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) ON true"
    " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum"
    f" WHERE i.indrelid = {REL_OID} AND i.indisprimary ORDER BY k.ord"
)

_OPS = {"I": Op.INSERT, "U": Op.UPDATE, "D": Op.DELETE, "T": Op.TRUNCATE}


class OutboxSource:
    def __init__(self, cfg: OutboxSourceConfig, config: Config, dsn: str | None = None) -> None:
        self.cfg = cfg
        self.config = config
        self.tables_wanted: dict[str, Any] = {mp.table: mp for mp in config.mappings}
        for t in config.triggers:  # trigger tables (bridge/triggers) need no mapping
            self.tables_wanted.setdefault(t.table, None)
        self.dsn = dsn or cfg.dsn.get_secret_value()
        self.connected = False
        self.leader = False
        self._leadership = Leadership(LOCK_SQL, (), "the outbox", cfg.poll_interval_ms / 1000.0, log,
                                      lease_for(cfg, config.onesignal.request_timeout_s), key="outbox")
        self.lease = self._leadership.lease  # fences what this replica sends (bridge/lease.py)
        self._tables: dict[str, TableDecoder] = {}
        self._unmapped: set[str] = set()  # tables whose rows were skipped (warned once each)
        self._batch_no = 0
        self._claimed: deque[tuple[int, list[int]]] = deque()  # (batch number, ids) not yet deleted
        self._held: set[int] = set()  # ids claimed and not yet deleted
        self._wake = asyncio.Event()
        self._waiting = False  # the wake-up flag as this leader last set it
        self._established = False  # the current session reached draining
        self._last_metrics = 0.0
        self.deleted = 0

    # -- lifecycle -----------------------------------------------------------------------

    async def run(self, sink: Sink, stop: asyncio.Event | None = None,
                  drain: Callable[[], Awaitable[None]] | None = None) -> None:
        """Drain until `stop` is set; then stop claiming, await `drain()`, delete what was applied."""
        self._stop = stop or asyncio.Event()
        self._drain = drain

        async def session() -> None:
            self._established = False
            await self._session(sink)

        def lost(exc: BaseException) -> bool:
            self.connected = False
            self.leader = False
            return self._established  # it worked until now: retry quickly

        def fatal(exc: BaseException) -> SourceSetupError | None:
            return setup_error(exc) if isinstance(exc, psycopg.Error) else None

        await reconnecting(session, self._stop, "outbox connection", log, on_lost=lost, fatal=fatal)

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        return await psycopg.AsyncConnection.connect(self.dsn, autocommit=True, connect_timeout=10)

    async def _session(self, sink: Sink) -> None:
        conn = await self._connect()
        listener: psycopg.AsyncConnection[Any] | None = None
        # The leader lock lives on a session of its own, which serves nothing else: a long claim,
        # DELETE or count on `conn` never delays the lease's renewals (bridge/lease.py).
        lock: psycopg.AsyncConnection[Any] | None = None
        tasks: list[asyncio.Task[Any]] = []
        try:
            await self._check_outbox(conn)
            self.connected = True
            lock = await self._connect()
            if not await self._elect(lock):
                return  # stopped while waiting as a standby
            self.leader = True
            await self._load_tables(conn)
            listener = await self._connect()
            await listener.execute(f"LISTEN {CHANNEL}")
            self._established = True
            listen_task = asyncio.create_task(self._listen(listener))
            keep_task = asyncio.create_task(self._leadership.keep(lock))
            drain_task = asyncio.create_task(self._drain_loop(conn, sink, listen_task))
            stop_task = asyncio.create_task(self._stop.wait())
            tasks = [listen_task, keep_task, drain_task, stop_task]
            log.info("draining %s as the leader (batch %d, poll every %d ms)", OUTBOX, self.cfg.batch_size,
                     self.cfg.poll_interval_ms)
            done, _ = await asyncio.wait({drain_task, stop_task, keep_task}, return_when=asyncio.FIRST_COMPLETED)
            for ended in (keep_task, drain_task):
                if ended in done:
                    ended.result()  # raises what ended it (the lock's session failed: reconnect)
                    return
            drain_task.cancel()
            await asyncio.gather(drain_task, return_exceptions=True)
            if self._drain is not None:
                await self._drain()  # the lease keeps being renewed meanwhile: what is left may go
            await self._leadership.stop_keeping(keep_task)
            await self._final_confirm(conn, sink)
            await self._leadership.hand_over(lock, sink.idle)  # idle: every request answered
            log.info("stopped; %d outbox row(s) deleted, %d claimed and left for the next leader",
                     self.deleted, len(self._held))
        finally:
            for t in tasks:
                t.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            self.connected = False
            self.leader = False
            self._leadership.standby = False
            self._leadership.released()
            for c in (listener, lock, conn):
                if c is not None:
                    await c.close()

    async def _check_outbox(self, conn: psycopg.AsyncConnection[Any]) -> None:
        cur = await conn.execute("SELECT to_regclass(%s) IS NOT NULL", (OUTBOX,))
        row = await cur.fetchone()
        if not row or not row[0]:
            raise SourceSetupError(
                f"the outbox table {OUTBOX} does not exist (or the role cannot see its schema): run "
                "`onesignal-bridge setup --config FILE` as the tables' owner, then `onesignal-bridge check`"
            )

    async def _elect(self, conn: psycopg.AsyncConnection[Any]) -> bool:
        """Take the leader lock on `conn` (the lock's own session); wait as a hot standby meanwhile."""
        return await self._leadership.elect(conn, self._stop)

    @property
    def standby(self) -> bool:
        """Waiting behind another replica's lock (ready, not draining)."""
        return self._leadership.standby

    async def _load_tables(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Column types and primary keys of the mapped tables, read once per session."""
        tables: dict[str, TableDecoder] = {}
        for name, mp in self.tables_wanted.items():
            cur = await conn.execute(COLUMNS_SQL, tuple(name.split(".", 1)))
            cols = [(r[0], r[1], r[2]) for r in await cur.fetchall()]
            if not cols:
                log.warning("mapped table %s does not exist (or is not visible to this role)", name)
            cur = await conn.execute(PRIMARY_KEY_SQL, tuple(name.split(".", 1)))
            pk = [r[0] for r in await cur.fetchall()] or ([mp.identity_column] if mp is not None else [])
            tables[name] = TableDecoder(name, cols, pk)
        self._tables = tables

    async def _listen(self, listener: psycopg.AsyncConnection[Any]) -> None:
        async for _ in listener.notifies():
            self._wake.set()

    # -- draining ------------------------------------------------------------------------

    async def _drain_loop(self, conn: psycopg.AsyncConnection[Any], sink: Sink,
                          listen_task: asyncio.Task[Any]) -> None:
        batch = self.cfg.batch_size
        poll_s = self.cfg.poll_interval_ms / 1000.0
        idle_since: float | None = None
        await self._set_waiting(conn, False)
        while True:
            if listen_task.done():
                listen_task.result()  # the listening connection failed: reconnect
                raise SourceError("the LISTEN connection ended")
            self._wake.clear()
            await self._confirm(conn, sink)
            await self._metrics(conn)
            room = self.cfg.max_unconfirmed_rows - len(self._held)
            if room <= 0:  # at the unconfirmed limit: wait for deletions, not for rows
                idle_since = None
                await asyncio.sleep(HELD_WAIT_S)
                continue
            limit = min(batch, room)
            got = await self._claim(conn, sink, limit)
            if got:
                idle_since = None
                if self._waiting:
                    await self._set_waiting(conn, False)  # busy again: writers need not notify
                if got == limit:
                    continue  # more may be waiting
            now = time.monotonic()
            if idle_since is None:
                idle_since = now
            if now - idle_since < LINGER_S:
                # Caught up just now: poll briefly before asking to be notified, so that a steady
                # stream of writes never pays for NOTIFY.
                await self._wait(LINGER_STEP_S)
                continue
            if not self._waiting:
                await self._set_waiting(conn, True)
                continue  # claim once more: a row may have committed before the flag was visible
            await self._wait(min(poll_s, HELD_WAIT_S) if self._held else poll_s)

    async def _wait(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
        except TimeoutError:
            pass

    async def _set_waiting(self, conn: psycopg.AsyncConnection[Any], waiting: bool) -> None:
        """Raise or lower the wake-up flag the capture trigger reads (it notifies only when raised)."""
        await conn.execute("UPDATE onesignal_bridge.wakeup SET waiting = %s WHERE waiting IS DISTINCT FROM %s",
                           (waiting, waiting))
        self._waiting = waiting

    async def _claim(self, conn: psycopg.AsyncConnection[Any], sink: Sink, limit: int) -> int:
        cur = await conn.execute(
            "SELECT id, table_name, op, new_row::text, old_row::text, created_at FROM onesignal_bridge.outbox"
            " WHERE NOT (id <@ %s::int8multirange) ORDER BY id LIMIT %s",
            (id_ranges(self._held), limit),
        )
        rows = await cur.fetchall()
        if not rows:
            return 0
        ids: list[int] = []
        for oid, table_name, op, new_text, old_text, created_at in rows:
            ids.append(oid)
            event = self._event(oid, table_name, op, new_text, old_text, created_at, sink)
            if event is not None:
                await sink.put(event)
        self._batch_no += 1
        self._claimed.append((self._batch_no, ids))
        self._held.update(ids)
        sink.mark(self._batch_no)
        return len(rows)

    def _event(self, oid: int, table_name: str, op: str, new_text: str | None, old_text: str | None,
               created_at: dt.datetime | None, sink: Sink) -> ChangeEvent | None:
        table = self._tables.get(table_name)
        if table is None:  # nothing to apply: the row is deleted with its batch, but never silently
            m.OUTBOX_UNMAPPED_ROWS.labels(table_name).inc()
            if table_name not in self._unmapped:
                self._unmapped.add(table_name)
                log.warning(
                    "outbox rows of table %s, which no mapping names, are deleted without being applied "
                    "(counted in onesignal_bridge_outbox_unmapped_rows_total): if a mapped table was renamed, "
                    "set its new name in mappings[].table; then run onesignal-bridge setup, which also removes "
                    "the capture triggers of tables no mapping names, so that their writes stop filling the outbox",
                    table_name)
            return None
        kind = _OPS.get(op)
        position = f"outbox#{oid}"
        commit_time = created_at.timestamp() if created_at is not None else None
        if kind is None:
            log.warning("outbox row %d has an unknown op %r; skipped", oid, op)
            return None
        if kind is Op.TRUNCATE:
            log.warning("TRUNCATE of %s: OneSignal users are left as they are (on_truncate: ignore)", table_name)
            return ChangeEvent(table_name, Op.TRUNCATE, None, None, {}, position, commit_time)
        new = table.row(parse_row(new_text))
        old = table.row(parse_row(old_text))
        key = table.key(new if new is not None else old)
        return ChangeEvent(table_name, kind, new, old, key, position, commit_time)

    async def _confirm(self, conn: psycopg.AsyncConnection[Any], sink: Sink) -> None:
        """Delete the rows of every batch at or below the low watermark."""
        confirmable = sink.confirmable
        if confirmable is None or not self._claimed:
            return
        ids: list[int] = []
        batches = 0
        for number, batch_ids in self._claimed:
            if number > confirmable:
                break
            ids.extend(batch_ids)
            batches += 1
        if not ids:
            return
        # The batches stay claimed until their rows are deleted: a DELETE that fails (the connection
        # dropped, shutdown cancelled it) is tried again at the next confirmation, never forgotten
        # while its ids stay held (which would strand the rows and the claim room for good).
        for i in range(0, len(ids), 10_000):
            chunk = ids[i:i + 10_000]
            await conn.execute("DELETE FROM onesignal_bridge.outbox WHERE id = ANY(%s::bigint[])", (chunk,))
            self._held.difference_update(chunk)
            self.deleted += len(chunk)
        for _ in range(batches):
            self._claimed.popleft()
        m.CONFIRMED_POSITION.set(max(ids))

    async def _final_confirm(self, conn: psycopg.AsyncConnection[Any], sink: Sink) -> None:
        """At shutdown: delete what was applied, on a fresh connection if the drain loop was
        cancelled in the middle of a query."""
        try:
            if conn.pgconn.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                raise psycopg.OperationalError("connection busy")
            await self._confirm(conn, sink)
            await self._set_waiting(conn, False)  # nobody listens until the next leader starts
        except psycopg.Error:
            async with await self._connect() as fresh:
                await self._confirm(fresh, sink)
                await self._set_waiting(fresh, False)

    async def _metrics(self, conn: psycopg.AsyncConnection[Any], force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_metrics < self.cfg.metrics_interval_s:
            return
        self._last_metrics = now
        cur = await conn.execute(
            "SELECT count(*), coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8"
            " FROM onesignal_bridge.outbox"
        )
        row = await cur.fetchone()
        if row is not None:
            depth, age = row
            m.OUTBOX_DEPTH.set(depth)
            m.OUTBOX_OLDEST_AGE_SECONDS.set(max(0.0, age))
            m.SOURCE_LAG_SECONDS.set(max(0.0, age))


def id_ranges(ids: Iterable[int]) -> str:
    """Ids as an int8multirange literal of their runs: `{[1,4),[7,8)}` (compact for batches)."""
    out: list[str] = []
    start = prev = None
    for i in sorted(ids):
        if prev is not None and i == prev + 1:
            prev = i
            continue
        if start is not None:
            out.append(f"[{start},{prev + 1})")  # type: ignore[operator]
        start = prev = i
    if start is not None:
        out.append(f"[{start},{prev + 1})")  # type: ignore[operator]
    return "{" + ",".join(out) + "}"


def setup_error(exc: psycopg.Error) -> SourceSetupError | None:
    """A database error that retrying cannot fix, as the message an operator needs."""
    if isinstance(exc, pgerr.InsufficientPrivilege):
        return SourceSetupError(f"{clean(exc)}: the bridge's role lacks a privilege; "
                                "`onesignal-bridge check --config FILE` prints the GRANT to run")
    if isinstance(exc, pgerr.UndefinedTable):
        return SourceSetupError(f"{clean(exc)}: run `onesignal-bridge setup --config FILE`")
    return None
