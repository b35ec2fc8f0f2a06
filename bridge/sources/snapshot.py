"""Initial snapshot: the rows that exist before streaming starts, consistent with the stream.

When the bridge creates its replication slot it asks Postgres to export the slot's snapshot and
reads every mapped table inside a REPEATABLE READ transaction that imports it: exactly the rows as
of the slot's start, so no change falls between snapshot and stream and none is applied twice out
of order (the stream starts after the last snapshot row in the pipeline).

Tables are read in primary-key order in chunks (`source.snapshot_chunk_size`). Each chunk ends
with a checkpoint marker; when the pipeline's low watermark passes it (every row of the chunk
applied or dead-lettered), the chunk's last key is saved in `onesignal_bridge.snapshot_progress`.
An interrupted snapshot resumes after the last saved key, not from zero. (The resumed part reads
current data, which is newer than the slot's start; the stream then replays the changes since the
slot's start, so every user still converges to the latest values.)
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
import psycopg
from psycopg import sql

from bridge.errors import SourceSetupError
from bridge.events import ChangeEvent, Op
from bridge.observability import metrics as m

log = logging.getLogger("bridge.snapshot")
@dataclass
class TableProgress:
    table: str
    key_columns: list[str]
    last_key: list[Any] | None = None
    rows_done: int = 0
    done: bool = False
    total_estimate: int = 0
    read_rows: int = 0  # rows read by this process (resumes re-read less than the table holds)
    confirmed: list[tuple[list[Any] | None, int, bool]] = field(default_factory=list)


class Snapshot:
    def __init__(self, dsn: str, slot: str, tables: list[str], chunk_size: int, requests_per_s: float) -> None:
        self.dsn, self.slot, self.tables = dsn, slot, tables
        self.chunk_size = chunk_size
        self.requests_per_s = requests_per_s
        self.progress: dict[str, TableProgress] = {}
        self._dirty = False
        self._saver: asyncio.Task[None] | None = None  # saves progress while rows remain (start)

    # -- progress ----------------------------------------------------------------------

    async def load(self, conn: psycopg.AsyncConnection[Any], fresh: bool) -> bool:
        """Read (or, when `fresh`, reset) progress; return True if some table still needs rows."""
        if fresh:
            await conn.execute("DELETE FROM onesignal_bridge.snapshot_progress WHERE slot = %s", (self.slot,))
        saved = {r[0]: r[1:] for r in await (await conn.execute(
            "SELECT table_name, last_key, rows_done, done FROM onesignal_bridge.snapshot_progress WHERE slot = %s",
            (self.slot,))).fetchall()}
        if not fresh and not saved:
            return False  # slot made without a snapshot (or setup's): nothing to do
        for table in self.tables:
            keys = await _primary_key(conn, table)
            tp = TableProgress(table, keys)
            if table in saved:
                tp.last_key, tp.rows_done, tp.done = saved[table]
            else:
                await conn.execute(
                    "INSERT INTO onesignal_bridge.snapshot_progress (slot, table_name) VALUES (%s, %s)"
                    " ON CONFLICT DO NOTHING", (self.slot, table))
            row = await (await conn.execute(
                "SELECT greatest(reltuples, 0)::bigint FROM pg_class WHERE oid = to_regclass(%s)", (table,))).fetchone()
            tp.total_estimate = int(row[0]) if row else 0
            if tp.total_estimate < 1000:  # never analyzed (or small): count
                schema, name = table.split(".", 1)
                row = await (await conn.execute(sql.SQL("SELECT count(*) FROM {}.{}").format(
                    sql.Identifier(schema), sql.Identifier(name)))).fetchone()
                tp.total_estimate = int(row[0]) if row else 0
            self.progress[table] = tp
        return any(not tp.done for tp in self.progress.values())

    def on_confirm(self, marker: Any) -> None:
        if not (isinstance(marker, tuple) and marker and marker[0] == "snapshot"):
            return  # a stream position: not ours
        _, table, last_key, n, done = marker
        tp = self.progress[table]
        tp.last_key, tp.rows_done, tp.done = last_key, tp.rows_done + n, done
        m.SNAPSHOT_ROWS_DONE.labels(table).set(tp.rows_done)
        self._dirty = True

    async def save(self, conn: psycopg.AsyncConnection[Any]) -> None:
        if not self._dirty:
            return
        self._dirty = False
        for tp in self.progress.values():
            await conn.execute(
                "UPDATE onesignal_bridge.snapshot_progress SET last_key = %s, rows_done = %s, done = %s,"
                " updated_at = now() WHERE slot = %s AND table_name = %s",
                (orjson.dumps(tp.last_key, default=str).decode() if tp.last_key is not None else None,
                 tp.rows_done, tp.done, self.slot, tp.table))

    @property
    def complete(self) -> bool:
        return all(tp.done for tp in self.progress.values())

    # -- wiring (what the `postgres` source calls) ---------------------------------------

    async def start(self, sink: Any, fresh: bool) -> bool:
        """Load progress; when rows remain, follow the pipeline's confirmations and save them as they
        come (every 0.5 s until complete). False when there is nothing to read."""
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            if not await self.load(conn, fresh):
                return False
        sink.on_confirm(self.on_confirm)
        self._saver = asyncio.create_task(self._keep_saving())
        return True

    async def save_now(self) -> None:
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            await self.save(conn)

    async def _keep_saving(self) -> None:
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            while True:
                await self.save(conn)
                if self.complete:
                    log.info("snapshot complete: %s",
                             ", ".join(f"{t} {p.rows_done} rows" for t, p in self.progress.items()))
                    return
                await asyncio.sleep(0.5)

    # -- reading -----------------------------------------------------------------------

    async def read(self, sink: Any, snapshot_name: str | None, stop: asyncio.Event) -> None:
        """Hand every remaining row to the pipeline (in primary-key order, chunk by chunk)."""
        todo = [tp for tp in self.progress.values() if not tp.done]
        remaining = sum(max(0, tp.total_estimate - tp.rows_done) for tp in todo)
        eta = remaining / max(1.0, self.requests_per_s)
        log.info("snapshot of %s: about %d rows to send; at %.0f requests/s (one per user) that takes about %s",
                 ", ".join(tp.table for tp in todo), remaining, self.requests_per_s, _duration(eta))
        async with await psycopg.AsyncConnection.connect(self.dsn) as conn:
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            if snapshot_name:
                await conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot_name)))
            started = time.monotonic()
            for tp in todo:
                m.SNAPSHOT_ROWS_TOTAL.labels(tp.table).set(tp.total_estimate)
                if tp.last_key is not None:
                    log.info("snapshot of %s resumes after key %s (%d rows done)", tp.table, tp.last_key, tp.rows_done)
                await self._read_table(conn, tp, sink, stop, started)
                if stop.is_set():
                    return
            await conn.rollback()
        if sys.stderr.isatty():
            sys.stderr.write("\n")

    async def _read_table(self, conn: psycopg.AsyncConnection[Any], tp: TableProgress, sink: Any,
                          stop: asyncio.Event, started: float) -> None:
        schema, name = tp.table.split(".", 1)
        cols = sql.SQL(", ").join(sql.Identifier(k) for k in tp.key_columns)
        base = sql.SQL("SELECT * FROM {}.{}").format(sql.Identifier(schema), sql.Identifier(name))
        last = tp.last_key
        while not stop.is_set():
            if last is None:
                q = sql.SQL("{} ORDER BY {} LIMIT %s").format(base, cols)
                params: list[Any] = [self.chunk_size]
            else:
                ph = sql.SQL(", ").join(sql.Placeholder() for _ in tp.key_columns)
                q = sql.SQL("{} WHERE ({}) > ({}) ORDER BY {} LIMIT %s").format(base, cols, ph, cols)
                params = [*last, self.chunk_size]
            cur = await conn.execute(q, params)
            names = [d.name for d in cur.description or []]
            rows = await cur.fetchall()
            for row in rows:
                new = dict(zip(names, row, strict=True))
                key = {k: new[k] for k in tp.key_columns}
                await sink.put(ChangeEvent(tp.table, Op.SNAPSHOT, new, None, key,
                                           f"snapshot:{tp.table}", None))
            tp.read_rows += len(rows)
            m.SNAPSHOT_ROWS_READ.labels(tp.table).inc(len(rows))
            done = len(rows) < self.chunk_size
            if rows:
                last = [dict(zip(names, rows[-1], strict=True))[k] for k in tp.key_columns]
            sink.mark(("snapshot", tp.table, _jsonable(last), len(rows), done))
            self._show(tp, started)
            if done:
                return

    def _show(self, tp: TableProgress, started: float) -> None:
        if not sys.stderr.isatty():
            return
        done = tp.rows_done + tp.read_rows
        rate = tp.read_rows / max(1e-6, time.monotonic() - started)
        total = max(tp.total_estimate, done)
        left = (total - done) / rate if rate else 0
        width = 30
        filled = int(width * done / total) if total else width
        sys.stderr.write(f"\rsnapshot {tp.table} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} rows "
                         f"{rate:,.0f} rows/s ETA {_duration(left)}   ")
        sys.stderr.flush()


def _jsonable(key: list[Any] | None) -> list[Any] | None:
    if key is None:
        return None
    return [v if isinstance(v, (int, str, float, bool)) or v is None else str(v) for v in key]


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


async def _primary_key(conn: psycopg.AsyncConnection[Any], table: str) -> list[str]:
    cur = await conn.execute(
        "SELECT a.attname FROM pg_index i JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) ON true"
        " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum"
        " WHERE i.indrelid = to_regclass(%s) AND i.indisprimary ORDER BY k.ord", (table,))
    keys = [r[0] for r in await cur.fetchall()]
    if not keys:
        raise SourceSetupError(f"table {table} has no primary key: the snapshot reads tables in primary-key order;"
                           f" add a primary key or set source.snapshot: never")
    return keys
