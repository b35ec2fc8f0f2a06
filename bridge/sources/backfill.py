"""On-demand backfill while streaming continues (`onesignal-bridge backfill`), with watermarks.

The technique is DBLog's watermark-based chunk selection (Netflix, 2019), also used by Debezium's
incremental snapshots. `backfill` only records a request in `onesignal_bridge.backfill_requests`;
that table is in the publication, so the *streaming* bridge sees the request in its own stream
and runs it. For each chunk (primary-key order, optional `--where`):

1. emit a low watermark into the WAL (`pg_logical_emit_message`),
2. select the chunk,
3. emit a high watermark.

While reading the stream, every row of the table changed between the low and the high watermark
is removed from the chunk (the stream carries a newer value); at the high watermark the rest of
the chunk enters the pipeline, in stream order. So a row updated during the backfill is never
overwritten by the older value read for the backfill. Progress (last key, rows) is saved per
chunk; `--resume` continues an interrupted request.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import orjson
import psycopg
from psycopg import sql

from bridge.events import ChangeEvent, Op

log = logging.getLogger("bridge.backfill")

PREFIX = "onesignal_bridge_backfill"
REQUESTS_TABLE = "onesignal_bridge.backfill_requests"

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS onesignal_bridge.backfill_requests (
    id          bigserial PRIMARY KEY,
    table_name  text NOT NULL,
    where_sql   text,
    chunk_size  int NOT NULL DEFAULT 1000,
    status      text NOT NULL DEFAULT 'requested',   -- requested | running | done | failed
    last_key    jsonb,
    rows_sent   bigint NOT NULL DEFAULT 0,
    message     text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
""".strip()


@dataclass
class _Chunk:
    table: str
    key_columns: list[str]
    rows: dict[tuple[Any, ...], dict[str, Any]]
    changed: set[tuple[Any, ...]] = field(default_factory=set)
    open: bool = False
    emitted: asyncio.Event = field(default_factory=asyncio.Event)


class Backfills:
    """Runs requested backfills; the stream reader calls `on_message` and `on_change`."""

    def __init__(self, dsn: str, tables: set[str], sink: Any) -> None:
        self.dsn, self.tables, self.sink = dsn, tables, sink
        self._chunks: dict[str, _Chunk] = {}
        self._tasks: dict[int, asyncio.Task[None]] = {}

    # -- called from the stream reader (in stream order) --------------------------------

    def on_request(self, row: dict[str, Any]) -> None:
        req_id = int(row["id"])
        if req_id in self._tasks or row.get("status") not in ("requested", "running"):
            return
        self._tasks[req_id] = asyncio.create_task(self._run(req_id))

    def on_change(self, table: str, key: dict[str, Any]) -> None:
        for chunk in self._chunks.values():
            if chunk.open and chunk.table == table:
                chunk.changed.add(tuple(key.get(k) for k in chunk.key_columns))

    async def on_message(self, content: bytes) -> None:
        kind, _, chunk_id = content.decode().partition(":")
        chunk = self._chunks.get(chunk_id)
        if chunk is None:
            return
        if kind == "low":
            chunk.open = True
        elif kind == "high" and chunk.open:
            del self._chunks[chunk_id]
            for pk, row in chunk.rows.items():
                if pk in chunk.changed:
                    continue  # the stream has a newer value
                key = dict(zip(chunk.key_columns, pk))
                await self.sink.put(ChangeEvent(chunk.table, Op.SNAPSHOT, row, None, key, self.sink.issue(),
                                                f"backfill:{chunk_id}", None))
            chunk.emitted.set()

    def cancel(self) -> None:
        for t in self._tasks.values():
            t.cancel()

    # -- the backfill itself (own connection) -------------------------------------------

    async def _run(self, req_id: int) -> None:
        try:
            async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
                await self._backfill(conn, req_id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("backfill #%d failed: %s", req_id, exc)
            try:
                async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
                    await conn.execute(f"UPDATE {REQUESTS_TABLE} SET status = 'failed', message = %s,"
                                       " updated_at = now() WHERE id = %s", (str(exc)[:1000], req_id))
            except psycopg.Error:
                pass
        finally:
            self._tasks.pop(req_id, None)

    async def _backfill(self, conn: psycopg.AsyncConnection[Any], req_id: int) -> None:
        row = await (await conn.execute(
            f"SELECT table_name, where_sql, chunk_size, last_key, rows_sent FROM {REQUESTS_TABLE} WHERE id = %s",
            (req_id,))).fetchone()
        if row is None:
            return
        table, where_sql, chunk_size, last_key, rows_sent = row
        if table not in self.tables:
            raise ValueError(f"table {table} is not mapped in this bridge's configuration")
        from bridge.sources.snapshot import _primary_key

        keys = await _primary_key(conn, table)
        schema, name = table.split(".", 1)
        cols = sql.SQL(", ").join(sql.Identifier(k) for k in keys)
        await conn.execute(f"UPDATE {REQUESTS_TABLE} SET status = 'running', updated_at = now() WHERE id = %s",
                           (req_id,))
        log.info("backfill #%d of %s%s started", req_id, table, f" where {where_sql}" if where_sql else "")
        n = 0
        while True:
            n += 1
            conds: list[sql.Composable] = []
            params: list[Any] = []
            if where_sql:
                conds.append(sql.SQL("({})").format(sql.SQL(where_sql.replace("%", "%%"))))  # the operator's own SQL
            if last_key is not None:
                ph = sql.SQL(", ").join(sql.Placeholder() for _ in keys)
                conds.append(sql.SQL("({}) > ({})").format(cols, ph))
                params.extend(last_key)
            where = sql.SQL(" WHERE ") + sql.SQL(" AND ").join(conds) if conds else sql.SQL("")
            q = sql.SQL("SELECT * FROM {}.{}{} ORDER BY {} LIMIT %s").format(
                sql.Identifier(schema), sql.Identifier(name), where, cols)
            chunk_id = f"{req_id}.{n}"
            chunk = _Chunk(table, keys, {})
            self._chunks[chunk_id] = chunk  # registered before the low watermark can be read back
            await conn.execute("SELECT pg_logical_emit_message(true, %s, %s)", (PREFIX, f"low:{chunk_id}"))
            cur = await conn.execute(q, [*params, chunk_size])
            names = [d.name for d in cur.description or []]
            rows = [dict(zip(names, r)) for r in await cur.fetchall()]
            chunk.rows = {tuple(r[k] for k in keys): r for r in rows}
            await conn.execute("SELECT pg_logical_emit_message(true, %s, %s)", (PREFIX, f"high:{chunk_id}"))
            await chunk.emitted.wait()
            rows_sent += len(rows)
            if rows:
                last_key = [r for r in (rows[-1][k] for k in keys)]
            await conn.execute(
                f"UPDATE {REQUESTS_TABLE} SET last_key = %s, rows_sent = %s, updated_at = now() WHERE id = %s",
                (orjson.dumps(last_key, default=str).decode() if last_key is not None else None, rows_sent, req_id))
            if len(rows) < chunk_size:
                break
        await conn.execute(f"UPDATE {REQUESTS_TABLE} SET status = 'done', updated_at = now() WHERE id = %s",
                           (req_id,))
        log.info("backfill #%d of %s done: %d rows", req_id, table, rows_sent)


def request(dsn: str, table: str, where: str | None, resume: bool, chunk_size: int, wait: bool,
            timeout: float = 3600.0, out: Any = print) -> int:
    """`onesignal-bridge backfill`: record (or resume) a request; wait for the streaming bridge to run it."""
    import time

    with psycopg.connect(dsn, autocommit=True) as conn:
        if resume:
            row = conn.execute(
                f"UPDATE {REQUESTS_TABLE} SET status = 'requested', updated_at = now() WHERE id = ("
                f"SELECT max(id) FROM {REQUESTS_TABLE} WHERE table_name = %s AND status IN ('running', 'failed'))"
                " RETURNING id, rows_sent", (table,)).fetchone()
            if row is None:
                out(f"backfill: no interrupted backfill of {table} to resume")
                return 1
            req_id = row[0]
            out(f"backfill #{req_id} of {table} resumes after {row[1]} rows")
        else:
            (req_id,) = conn.execute(
                f"INSERT INTO {REQUESTS_TABLE} (table_name, where_sql, chunk_size) VALUES (%s, %s, %s) RETURNING id",
                (table, where, chunk_size)).fetchone()  # type: ignore[misc]
            out(f"backfill #{req_id} of {table}{' where ' + where if where else ''} requested; "
                f"the streaming bridge runs it")
        if not wait:
            return 0
        deadline = time.monotonic() + timeout
        last = -1
        while time.monotonic() < deadline:
            status, rows, message = conn.execute(
                f"SELECT status, rows_sent, message FROM {REQUESTS_TABLE} WHERE id = %s", (req_id,)).fetchone()  # type: ignore[misc]
            if rows != last:
                out(f"backfill #{req_id}: {status}, {rows} rows sent")
                last = rows
            if status == "done":
                return 0
            if status == "failed":
                out(f"backfill #{req_id} failed: {message}")
                return 1
            time.sleep(0.5)
        out(f"backfill #{req_id}: still {status} after {timeout:.0f}s (is a bridge streaming this database?)")
        return 1


def outbox_backfill(dsn: str, table: str, where: str | None, chunk_size: int, out: Any = print) -> int:
    """`backfill` for `source.kind: outbox`: write the selected rows into the outbox, chunk by chunk.

    Each chunk locks its rows (`FOR SHARE`) while it copies them: a concurrent update either
    committed before (the copy reads its new value) or waits until the copy committed (its own
    outbox row then comes after the copy's). So a row updated during the backfill keeps its newer
    value. Rows are written as updates carrying the whole row.
    """
    import asyncio as _asyncio

    async def keys() -> list[str]:
        from bridge.sources.snapshot import _primary_key

        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as c:
            return await _primary_key(c, table)

    key_columns = _asyncio.run(keys())
    schema, name = table.split(".", 1)
    cols = sql.SQL(", ").join(sql.Identifier(k) for k in key_columns)
    total = 0
    last: list[Any] | None = None
    with psycopg.connect(dsn, autocommit=True) as conn:
        while True:
            conds: list[sql.Composable] = []
            params: list[Any] = [table]
            if where:
                conds.append(sql.SQL("({})").format(sql.SQL(where.replace("%", "%%"))))
            if last is not None:
                conds.append(sql.SQL("({}) > ({})").format(cols, sql.SQL(", ").join(sql.Placeholder() for _ in last)))
                params.extend(last)
            cond = sql.SQL(" WHERE ") + sql.SQL(" AND ").join(conds) if conds else sql.SQL("")
            q = sql.SQL(
                "WITH chunk AS (SELECT * FROM {}.{}{} ORDER BY {} LIMIT %s FOR SHARE) "
                "INSERT INTO onesignal_bridge.outbox (table_name, op, new_row) "
                "SELECT %s, 'U', to_jsonb(chunk.*) FROM chunk ORDER BY {} "
                "RETURNING {}"
            ).format(sql.Identifier(schema), sql.Identifier(name), cond, cols, cols,
                     sql.SQL(", ").join(sql.SQL("(new_row->>{})").format(sql.Literal(k)) for k in key_columns))
            # parameters: WHERE's key values, the LIMIT, then the table name
            rows = conn.execute(q, [*params[1:], chunk_size, table]).fetchall()
            total += len(rows)
            if rows:
                last = list(rows[-1])
                out(f"backfill of {table}: {total} rows written to the outbox")
            if len(rows) < chunk_size:
                break
    out(f"backfill of {table} done: {total} rows; the bridge drains them like any change")
    return 0
