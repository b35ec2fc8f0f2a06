"""`postgres` source: logical replication with the pgoutput plugin over psycopg 3.

The replication connection runs `START_REPLICATION` and reads CopyData with
`pgconn.get_copy_data`, woken by the socket becoming readable. Standby status updates confirm
`flush_lsn` only up to the pipeline's low watermark (a commit whose changes were all applied or
dead-lettered); a separate timer keeps sending them while the source is held back by
backpressure, so the server never times the connection out. When the connection drops, the
source reconnects and the slot resends everything after the last confirmed position.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Awaitable, Callable, Generator, Iterable
from typing import Any

import psycopg
from psycopg import pq

from bridge.config import PostgresSourceConfig
from bridge.errors import SourceError, SourceSetupError
from bridge.events import UNCHANGED, ChangeEvent, Op, change_event
from bridge.observability import metrics as m
from bridge.ports import Sink
from bridge.sources import pgoutput as po
from bridge.sources.backfill import PREFIX as BACKFILL_PREFIX
from bridge.sources.backfill import REQUESTS_TABLE as BACKFILL_REQUESTS
from bridge.sources.backfill import Backfills
from bridge.sources.database import Leadership, clean, lease_for, reconnecting
from bridge.sources.pg_rows import _Slow, _Table

log = logging.getLogger("bridge.source.postgres")

MONITOR_S = 5.0
# Messages handled in one synchronous pass before the reader lets the event loop run (the
# dispatcher, the status timer): about 10 ms of work.
DRAIN_BUDGET = 1000
# A caught-up stream is confirmed this soon after its last change is done (at most this often).
PROMPT_CONFIRM_S = 0.05
_OID = struct.Struct("!I")


class _LetOthersRun:
    """Awaiting it yields to the event loop once (what `asyncio.sleep(0)` does), reusable."""

    def __await__(self) -> Generator[None, None, None]:
        yield


_BUDGET_SPENT = _LetOthersRun()
STANDBY_POLL_S = 1.0
LOCK_PREFIX = "onesignal_bridge:"
HEARTBEAT_PREFIX = "onesignal_bridge_heartbeat"


def _now_us_since_2000() -> int:
    return po.unix_to_pg_us(time.time())


class PostgresSource:
    def __init__(self, cfg: PostgresSourceConfig, tables: set[str], dsn: str | None = None,
                 requests_per_s: float = 900.0, columns: dict[str, frozenset[str]] | None = None,
                 old_columns: dict[str, frozenset[str]] | None = None, request_timeout_s: float = 10.0) -> None:
        self.cfg = cfg
        self._columns = columns or {}
        self._old_columns = old_columns or {}
        self._requests_per_s = requests_per_s
        self.tables = tables
        self.dsn = dsn or cfg.dsn.get_secret_value()
        self.connected = False
        self._tx_pos = "0/0"
        self._leadership = Leadership("SELECT pg_try_advisory_lock(hashtext(%s))", (LOCK_PREFIX + cfg.slot,),
                                      f"slot {cfg.slot}", STANDBY_POLL_S, log, lease_for(cfg, request_timeout_s),
                                      key=f"slot:{cfg.slot}")
        # fences what this replica sends (bridge/lease.py); without `standby` there is no lock to fence with
        self.lease = self._leadership.lease if cfg.standby else None
        self.received_lsn = 0
        self.flushed_lsn = 0
        self._pg: pq.abc.PGconn | None = None
        self._relations: dict[int, _Table | None] = {}
        self._last_status = 0.0
        self._newest_commit_time: float | None = None
        self._commit_times: dict[int, float] = {}

    @classmethod
    def from_config(cls, config: Any) -> PostgresSource:
        """The source for a whole configuration: mapped tables, their columns, the request budget."""
        from bridge.mapping import TableMapping

        compiled = [TableMapping.compile(mp) for mp in config.mappings]
        columns = {tm.table: tm.columns for tm in compiled}
        old_columns = {tm.table: tm.old_columns for tm in compiled}
        for t in getattr(config, "triggers", ()):  # trigger tables (bridge/triggers): their columns too
            columns[t.table] = columns.get(t.table, frozenset()) | t.columns()
            old_columns[t.table] = old_columns.get(t.table, frozenset()) | t.old_columns()
        return cls(config.source, set(columns),
                   requests_per_s=config.delivery.app_requests_per_second,
                   columns=columns, old_columns=old_columns, request_timeout_s=config.onesignal.request_timeout_s)

    # -- lifecycle -----------------------------------------------------------------------

    async def run(self, sink: Sink, stop: asyncio.Event | None = None,
                  drain: Callable[[], Awaitable[None]] | None = None) -> None:
        """Stream until `stop` is set; then stop reading, await `drain()`, confirm, and return."""
        self._stop = stop or asyncio.Event()
        self._drain = drain
        self._sink = sink
        sink.on_confirm(self._on_confirmable)

        def lost(exc: BaseException) -> bool:
            self.connected = False
            return False

        await reconnecting(lambda: self._stream(sink), self._stop, "replication connection", log, on_lost=lost)

    async def _primary_keys(self) -> dict[str, list[str]]:
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            cur = await conn.execute(
                "SELECT n.nspname || '.' || c.relname, a.attname FROM pg_index i"
                " JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace"
                " JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) ON true"
                " JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum"
                " WHERE i.indisprimary ORDER BY 1, k.ord"
            )
            out: dict[str, list[str]] = {}
            for table, col in await cur.fetchall():
                if table in self.tables:
                    out.setdefault(table, []).append(col)
            return out

    async def _acquire_leadership(self) -> psycopg.AsyncConnection[Any] | None:
        """Hold the slot's advisory lock on a session of our own; wait as a hot standby while
        another replica holds it. Returns None when asked to stop while waiting."""
        conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
        try:
            if await self._leadership.elect(conn, self._stop):
                return conn
        except BaseException:
            await conn.close()
            raise
        await conn.close()
        return None

    @property
    def standby(self) -> bool:
        return self._leadership.standby

    async def _monitor(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Keep the leader lock's session alive (it fails loudly if the session dies), export the
        slot's lag, and emit heartbeats so an idle captured table never pins WAL."""
        last_beat = 0.0
        while True:
            cur = await conn.execute(
                "SELECT pg_current_wal_lsn() - confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = %s",
                (self.cfg.slot,),
            )
            row = await cur.fetchone()
            if row and row[0] is not None:
                m.SLOT_LAG_BYTES.set(float(row[0]))
            hb = self.cfg.heartbeat_interval_s
            if hb and time.monotonic() - last_beat >= hb:
                await conn.execute("SELECT pg_logical_emit_message(false, %s, '')", (HEARTBEAT_PREFIX,))
                last_beat = time.monotonic()
            await asyncio.sleep(min(MONITOR_S, hb or MONITOR_S))

    async def _stream(self, sink: Sink) -> None:
        self._pkeys = await self._primary_keys()
        leader = await self._acquire_leadership() if self.cfg.standby else None
        if self.cfg.standby and leader is None:
            return  # stopped while waiting as a standby
        if leader is None:
            await self._stream_as_leader(sink, None)
            return
        # The lease is renewed beside the stream from the moment the lock is held (a long initial
        # snapshot included); when the lock's session fails, the stream stops with it.
        await self._leadership.lead(leader, self._stream_as_leader(sink, leader), self._stop.is_set,
                                    lambda: sink.idle)

    async def _stream_as_leader(self, sink: Sink, leader: psycopg.AsyncConnection[Any] | None) -> None:
        conn = await psycopg.AsyncConnection.connect(
            self.dsn, autocommit=True, replication="database", options="-c TimeZone=UTC -c DateStyle=ISO"
        )
        try:
            pg = conn.pgconn
            res = await _simple_query(pg, (
                "SELECT confirmed_flush_lsn::text, plugin FROM pg_replication_slots "
                f"WHERE slot_name = '{self.cfg.slot}'"
            ))
            row: tuple[str | None, str | None] | None = None
            if res.ntuples:
                lsn_raw, plugin_raw = res.get_value(0, 0), res.get_value(0, 1)
                row = (lsn_raw.decode() if lsn_raw is not None else None,
                       plugin_raw.decode() if plugin_raw is not None else None)
            snapshot_name, fresh = None, False
            if row is None:
                row, snapshot_name = await self._create_slot(pg)
                fresh = snapshot_name is not None
            if row[1] != "pgoutput":
                raise SourceSetupError(f"replication slot {self.cfg.slot!r} uses plugin {row[1]}, not pgoutput")
            if self.cfg.snapshot != "never":
                await self._snapshot(sink, snapshot_name, fresh)
                if self._stop.is_set():
                    if self._drain is not None:
                        await self._drain()
                    await self._save_snapshot_progress()
                    return
            start = po.str_to_lsn(row[0]) if row[0] else 0
            self.flushed_lsn = max(self.flushed_lsn, start)
            self.received_lsn = max(self.received_lsn, start)
            self._relations.clear()
            self._pg = pg
            await self._start_replication(pg)
            self.connected = True
            log.info("streaming from slot %s at %s", self.cfg.slot, po.lsn_to_str(start))
            status_task = asyncio.create_task(self._status_timer(sink))
            self.backfills = Backfills(self.dsn, self.tables, sink)
            read_task = asyncio.create_task(self._read(pg, sink))
            stop_task = asyncio.create_task(self._stop.wait())
            monitor_task = asyncio.create_task(self._monitor(leader) if leader is not None else self._stop.wait())
            try:
                done, _ = await asyncio.wait({read_task, stop_task, monitor_task},
                                             return_when=asyncio.FIRST_COMPLETED)
                if monitor_task in done and not self._stop.is_set():
                    monitor_task.result()
                if read_task in done:
                    read_task.result()
                    return
                read_task.cancel()
                await asyncio.gather(read_task, return_exceptions=True)
                if self._drain is not None:
                    await self._drain()
                self._send_status(sink, force=True)
                log.info("stopped; confirmed up to %s", po.lsn_to_str(self.flushed_lsn))
            finally:
                for t in (status_task, read_task, stop_task, monitor_task):
                    t.cancel()
                self.backfills.cancel()
                self._pg = None
        finally:
            self.connected = False
            await conn.close()

    async def _create_slot(self, pg: Any) -> tuple[tuple[str, str], str | None]:
        """Create the slot; with a snapshot mode, export its snapshot for the initial read."""
        mode = "export" if self.cfg.snapshot != "never" else "nothing"
        res = await _simple_query(pg, f"CREATE_REPLICATION_SLOT {self.cfg.slot} LOGICAL pgoutput (SNAPSHOT '{mode}')")
        consistent = res.get_value(0, 1).decode()
        name = res.get_value(0, 2)
        log.info("created replication slot %s at %s%s", self.cfg.slot, consistent,
                 " with an exported snapshot" if name else "")
        return (consistent, "pgoutput"), (name.decode() if name else None)

    async def _snapshot(self, sink: Sink, snapshot_name: str | None, fresh: bool) -> None:
        from bridge.sources.snapshot import Snapshot

        snap = Snapshot(self.dsn, self.cfg.slot, sorted(self.tables), self.cfg.snapshot_chunk_size,
                        self._requests_per_s)
        if await snap.start(sink, fresh):
            self.snapshot = snap
            await snap.read(sink, snapshot_name, self._stop)

    async def _save_snapshot_progress(self) -> None:
        snap = getattr(self, "snapshot", None)
        if snap is not None:
            await snap.save_now()

    async def _start_replication(self, pg: Any) -> None:
        pub = self.cfg.publication.replace("'", "''")
        res = await _send_and_wait(
            pg,
            (
                f"START_REPLICATION SLOT {self.cfg.slot} LOGICAL 0/0 "
                f"(proto_version '1', publication_names '{pub}', messages 'true')"
            ),
        )
        if res is None or res.status != pq.ExecStatus.COPY_BOTH:
            msg = res.error_message.decode(errors="replace") if res is not None else "no result"
            if "does not exist" in msg and "publication" in msg:
                raise SourceSetupError(f"{msg.strip()}: run `onesignal-bridge setup --config FILE`")
            raise SourceError(f"START_REPLICATION failed: {msg.strip()}")

    # -- reading -------------------------------------------------------------------------

    async def _read(self, pg: Any, sink: Sink) -> None:
        """Read until the stream ends (raising) or the task is cancelled.

        Everything libpq holds is handled in one synchronous pass (`_handle_buffered`), with no await
        per message: the pass stops at what must be awaited (the pipeline's backpressure or dead
        letters through `Sink.offer`, a backfill message), after `DRAIN_BUDGET` messages (to let
        the rest of the process run), or when libpq has nothing complete left. Then the socket's
        bytes are taken in (`consume_input`) and, only when there were none, the socket is
        waited on."""
        loop = asyncio.get_running_loop()
        readable = asyncio.Event()
        loop.add_reader(pg.socket, readable.set)
        self._in_tx = False
        self._budget = DRAIN_BUDGET
        try:
            while True:
                pending = self._handle_buffered(pg, sink)
                if pending is _BUDGET_SPENT:  # let the rest of the process run, then a new budget
                    self._budget = DRAIN_BUDGET
                    await pending
                elif pending is not None:
                    # The hand-over to finish or a backfill message: it may complete without the
                    # event loop turning (a watermark of another bridge's backfill), so the pass
                    # goes on with what is left of the budget.
                    await pending
                elif not self._drained:  # nothing was buffered: wait for the socket
                    readable.clear()
                    pg.consume_input()
                    if self._drain_nothing_more(pg):
                        self._budget = DRAIN_BUDGET
                        try:
                            await asyncio.wait_for(readable.wait(), timeout=self.cfg.status_interval_s)
                        except TimeoutError:
                            pass
                        pg.consume_input()
                else:
                    # libpq ran out of complete messages mid-budget: take in what the socket has
                    # and go on. The budget spans these passes, so a stream that arrives faster
                    # than it is handled still lets the dispatcher, /metrics and /healthz run.
                    pg.consume_input()
        finally:
            loop.remove_reader(pg.socket)

    _drained = 0  # messages the last _handle_buffered handled
    _budget = DRAIN_BUDGET  # messages left before the reader must let the event loop run
    _peek: tuple[int, Any] | None = None  # a CopyData taken by _drain_nothing_more, handled next

    def _drain_nothing_more(self, pg: Any) -> bool:
        """After `consume_input`: True when libpq still has no complete message (else the one it
        has is kept for the next `_handle_buffered`)."""
        got = pg.get_copy_data(1)
        if got[0] == 0:
            return True
        self._peek = got  # handled first by the next _handle_buffered
        return False

    def _handle_buffered(self, pg: Any, sink: Sink) -> Awaitable[None] | None:
        """Handle the messages libpq holds, synchronously. Returns None when it has none left,
        `_BUDGET_SPENT` after `DRAIN_BUDGET` messages, or an awaitable to await before the next
        call (the hand-over of the last event, or a backfill message)."""
        get = pg.get_copy_data
        relations = self._relations
        offer = sink.offer
        row_message = po.row_message
        oid_at = _OID.unpack_from
        event_of = self._event
        backfills = self.backfills
        on_change = backfills.on_change
        chunks = backfills.open_chunks
        position, commit_time = self._tx_pos, self._tx_commit_time
        peek, self._peek = self._peek, None
        handled = 0
        budget = self._budget
        try:
            while handled < budget:
                if peek is None:
                    n, data = get(1)
                else:
                    (n, data), peek = peek, None
                if n == 0:
                    return None
                handled += 1
                if n < 0:
                    res = pg.get_result()
                    msg = res.error_message.decode(errors="replace").strip() if res is not None else ""
                    raise SourceError(f"replication stream ended: {msg or 'server closed the stream'}")
                kind = data[0]
                if kind == 0x77:  # 'w' XLogData: 24-byte header, then one pgoutput message
                    mk = data[25]
                    if mk == 0x55 or mk == 0x49 or mk == 0x44:  # Update, Insert, Delete
                        table = relations.get(oid_at(data, 26)[0])
                        if table is None:
                            continue
                        if table.name == BACKFILL_REQUESTS:
                            mk, _, old_kind, old, new = row_message(data, 25)
                            if new is not None and mk != 0x44:
                                backfills.on_request(table.row(new))
                            continue
                        try:  # the compiled decoder of the relation (pg_rows), for inserts and updates
                            event = (table.update_event if mk == 0x55 else table.insert_event if mk == 0x49
                                     else _slow)(bytes(data), position, commit_time)
                        except Exception:  # noqa: BLE001 - anything: the general path decodes it again and says what is wrong
                            mk, _, old_kind, old, new = row_message(data, 25)
                            event = event_of(table, mk, old_kind, old, new, data)
                        if chunks:
                            on_change(table.name, event.key)
                        pending = offer(event)
                        if pending is not None:
                            return pending
                    elif mk == 0x42:  # Begin
                        begin = po.decode(data[25:])
                        assert isinstance(begin, po.Begin)
                        self._in_tx = True
                        self._tx_pos = position = po.lsn_to_str(begin.final_lsn)
                        self._tx_commit_time = commit_time = begin.commit_time
                    elif mk == 0x43:  # Commit
                        commit = po.decode(data[25:])
                        assert isinstance(commit, po.Commit)
                        self._in_tx = False
                        if commit.end_lsn > self.received_lsn:
                            self.received_lsn = commit.end_lsn
                        self._commit_times[commit.end_lsn] = commit.commit_time
                        self._newest_commit_time = commit.commit_time
                        sink.mark(commit.end_lsn)
                        self._send_status(sink)
                    else:
                        pending = self._other(po.parse_xlogdata(data), sink)
                        if pending is not None:
                            return pending
                elif kind == 0x6B:  # 'k' keepalive
                    wal_end, _, reply = po.parse_keepalive(data)
                    if not self._in_tx and sink.idle and wal_end > self.flushed_lsn:
                        # Nothing of ours is pending: everything before wal_end is done.
                        self.received_lsn = max(self.received_lsn, wal_end)
                        self._idle_flush = wal_end
                    if reply:
                        self._send_status(sink, force=True)
            return _BUDGET_SPENT
        finally:
            self._drained = handled
            self._budget = budget - handled

    def _other(self, xlog: tuple[int, int, int, memoryview], sink: Sink) -> Awaitable[None] | None:
        """The pgoutput messages that come once per relation or rarely: Relation, Truncate,
        logical messages (backfill watermarks, heartbeats); Origin and Type need nothing."""
        _, wal_end, _, payload = xlog
        msg = po.decode(payload)
        if isinstance(msg, po.Relation):
            name = f"{msg.namespace}.{msg.name}"
            self._relations[msg.oid] = (
                _Table(msg, self._pkeys.get(name), self._columns.get(name), self._old_columns.get(name))
                if name in self.tables or name == BACKFILL_REQUESTS
                else None
            )
        elif isinstance(msg, po.Truncate):
            events = []
            for oid in msg.relation_oids:
                table = self._relations.get(oid)
                if table is not None:
                    log.warning("TRUNCATE of %s: OneSignal users are left as they are (on_truncate: ignore)",
                                table.name)
                    events.append(ChangeEvent(table.name, Op.TRUNCATE, None, None, {}, self._tx_pos,
                                              self._tx_commit_time))
            if events:
                return _put_all(sink, events)
        elif isinstance(msg, po.LogicalMessage):
            if msg.prefix == BACKFILL_PREFIX:
                return self.backfills.on_message(bytes(msg.content))
            if not self._in_tx and sink.idle and wal_end > self.flushed_lsn:
                self._idle_flush = wal_end  # a heartbeat: nothing of ours before it is pending
        return None

    _tx_commit_time: float | None = None

    def _event(self, table: _Table, mk: int, old_kind: int, old_values: tuple[Any, ...] | None,
               new_values: tuple[Any, ...] | None, data: Any = None) -> ChangeEvent:
        """The event of an Insert, Update or Delete (`mk`: its message type byte; `data`: the
        CopyData it came in, read again when the old row's skipped columns are needed)."""
        if mk == 0x55:  # Update
            assert new_values is not None
            new = table.row(new_values)
            if old_values is None:
                return change_event(table.name, Op.UPDATE, new, None, table.key(new), self._tx_pos,
                                    self._tx_commit_time)
            if old_kind == 0x4B:  # 'K': only the key columns are real
                old = {k: v for k, v in table.row(old_values).items() if v is not None}
                if UNCHANGED in new_values:  # an unchanged TOASTed key: the old row has its value
                    new = {k: (old[k] if v is UNCHANGED and k in old else v) for k, v in new.items()}
            elif UNCHANGED in new_values:  # unchanged TOAST in new: the whole old row has the value
                old = table.row(old_values)
                new = {k: (old.get(k, v) if v is UNCHANGED and old.get(k) is not None else v)
                       for k, v in new.items()}
            else:  # the key and what mapping reads of an old row (see pg_rows._Table)
                old = table.old_row(old_values)
            return change_event(table.name, Op.UPDATE, new, old, table.key(new), self._tx_pos,
                                self._tx_commit_time)
        if mk == 0x49:  # Insert
            assert new_values is not None
            new = table.row(new_values)
            return change_event(table.name, Op.INSERT, new, None, table.key(new), self._tx_pos,
                                self._tx_commit_time)
        assert old_values is not None  # Delete
        old = table.row(old_values)
        if old_kind == 0x4B:
            old = {k: v for k, v in old.items() if v is not None}
        return change_event(table.name, Op.DELETE, None, old, table.key(old), self._tx_pos, self._tx_commit_time)

    # -- confirming ----------------------------------------------------------------------

    _idle_flush = 0
    _sink: Sink | None = None
    _confirm_soon: asyncio.TimerHandle | None = None

    def _on_confirmable(self, position: Any) -> None:
        """The low watermark passed a commit. When that leaves nothing of ours pending (the stream
        caught up), confirm it soon (within PROMPT_CONFIRM_S) instead of at the next status
        interval; otherwise the interval's status update carries it."""
        sink = self._sink
        if self._confirm_soon is not None or self._pg is None or sink is None or not sink.idle:
            return
        delay = max(0.0, self._last_status + PROMPT_CONFIRM_S - time.monotonic())
        self._confirm_soon = asyncio.get_running_loop().call_later(delay, self._prompt_status)

    def _prompt_status(self) -> None:
        self._confirm_soon = None
        if self._sink is not None:
            try:
                self._send_status(self._sink, force=True)
            except psycopg.Error as exc:
                log.debug("status update failed: %s", clean(exc))

    def _send_status(self, sink: Sink, force: bool = False) -> None:
        pg = self._pg
        if pg is None:
            return
        now = time.monotonic()
        if not force and now - self._last_status < self.cfg.status_interval_s:
            return
        confirmable = sink.confirmable
        flush = self.flushed_lsn
        if isinstance(confirmable, int) and confirmable > flush:
            flush = confirmable
        if sink.idle and self._idle_flush > flush:
            flush = self._idle_flush
        self.flushed_lsn = flush
        written = max(self.received_lsn, flush)
        pg.put_copy_data(po.standby_status_update(written, flush, flush, _now_us_since_2000()))
        pg.flush()
        self._last_status = now
        m.CONFIRMED_POSITION.set(flush)
        self._update_lag(flush)

    def _update_lag(self, flush: int) -> None:
        confirmed_time = None
        for lsn in [k for k in self._commit_times if k <= flush]:
            confirmed_time = self._commit_times.pop(lsn)
        if self._newest_commit_time is None:
            return
        if not self._commit_times:
            m.SOURCE_LAG_SECONDS.set(0)
        elif confirmed_time is not None:
            m.SOURCE_LAG_SECONDS.set(max(0.0, self._newest_commit_time - confirmed_time))

    async def _status_timer(self, sink: Sink) -> None:
        while True:
            await asyncio.sleep(self.cfg.status_interval_s)
            try:
                self._send_status(sink, force=True)
            except psycopg.Error as exc:
                log.debug("status update failed: %s", clean(exc))
                return


def _slow(buf: bytes, position: str, commit_time: float | None) -> ChangeEvent:
    """Deletes take the general path (see pg_rows)."""
    raise _Slow


async def _put_all(sink: Sink, events: Iterable[ChangeEvent]) -> None:
    for event in events:
        await sink.put(event)


async def _send_and_wait(pg: Any, query: str) -> Any:
    """Send one query with the simple protocol (replication connections accept no other)."""
    pg.send_query(query.encode())
    loop = asyncio.get_running_loop()
    while True:
        if pg.flush() == 0:
            pg.consume_input()
            if not pg.is_busy():
                break
        fut: asyncio.Future[None] = loop.create_future()

        def wake(fut: asyncio.Future[None] = fut) -> None:
            if not fut.done():
                fut.set_result(None)

        loop.add_reader(pg.socket, wake)
        try:
            await asyncio.wait_for(fut, 30)
        finally:
            loop.remove_reader(pg.socket)
    return pg.get_result()


async def _simple_query(pg: Any, query: str) -> Any:
    res = await _send_and_wait(pg, query)
    while pg.get_result() is not None:  # drain to the end of this query
        pass
    if res is None or res.status != pq.ExecStatus.TUPLES_OK:
        msg = res.error_message.decode(errors="replace").strip() if res is not None else "no result"
        raise SourceError(f"query on the replication connection failed: {msg}")
    return res
