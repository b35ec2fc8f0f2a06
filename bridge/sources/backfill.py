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

Request states and who may move them (the bridge reads every write to the table back through its
own stream, its own writes included, so a state machine keyed on "a row arrived" would feed itself):

    requested --(bridge claims)--> running --> done | failed
    running | failed --(`backfill --resume`)--> requested

- Only the CLI writes `requested`. A streamed row starts a run only when its status is `requested`;
  the bridge's own writes (`running`, `last_key`/`rows_sent` progress, `done`, `failed`) arrive as
  echoes and are ignored, however late they come back.
- A run starts by *claiming* the request: a session advisory lock on the request id
  (`pg_try_advisory_lock(LOCK_CLASS, id)`, held by the run's connection, so it goes when the run or
  the process dies) and then `UPDATE ... SET status = 'running' WHERE id = ... AND status = <the
  status that triggered the run> AND table_name = <a table this bridge maps>`. A stale `requested`
  row (replayed from the slot after a restart, when the request is long `done`) claims nothing; two
  bridges on one database never run one request twice.
- When streaming starts, requests still `running` whose lock is free were interrupted (stop,
  crash, reconnect): each is resumed once from its saved key.

So a request runs at most once per transition the bridge did not cause itself, whatever the timing
of the stream.

`--where` is the operator's own SQL, pasted inside `WHERE (...) AND (key) > (last key)`. It must
stay one boolean expression inside those parentheses, else `plan = 'pro') OR (true` would escape
them and break keyset paging (every chunk re-sends the table). It is checked twice, by the CLI
before the request is recorded and by the bridge before it runs it:

1. A scan with Postgres's lexical rules (string literals with `''`, `E'...'` with backslash
   escapes, `"quoted identifiers"`, `$tag$dollar quotes$tag$`, a literal continued on the next
   line read as one; every connection that runs the expression sets `standard_conforming_strings
   = on`, so plain literals mean what the scan assumes): outside literals and quoted identifiers,
   parentheses must balance and never close more than they opened, and there may be no `;`, no
   comment (`--`, `/*`), no positional parameter (`$1`), no control character, and no quote or
   `$` right after a number (Postgres versions lex those differently). With that, the
   expression's last token cannot be inside a literal or comment and every `)` in it closes a `(`
   of its own, so the closing parenthesis that wraps it is always the one that ends it.
2. Postgres itself: `EXPLAIN SELECT 1 FROM table WHERE (<expr>) LIMIT 0` in a read-only
   transaction that is rolled back: unknown columns, syntax errors and non-boolean expressions are
   refused with Postgres's own message. Each chunk's SELECT then runs in a read-only transaction.

Postgres alone cannot tell an escape: `WHERE (plan = 'pro') OR (true)` is valid SQL. So the scan
decides about the parentheses, and Postgres about everything else.
"""

from __future__ import annotations

import asyncio
import logging
import re
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
import psycopg
from psycopg import sql

from bridge.events import ChangeEvent, Op

log = logging.getLogger("bridge.backfill")

PREFIX = "onesignal_bridge_backfill"
REQUESTS_TABLE = "onesignal_bridge.backfill_requests"
# First key of the two-key advisory locks that mark a request as being run ('obbf'); the slot's
# leader lock uses the one-key (bigint) form, a different lock space.
LOCK_CLASS = 0x6F626266
EMIT = "SELECT pg_logical_emit_message(true, %s, %s)"
# -- `--where`: one boolean expression, checked lexically and by Postgres --------------------------

class BackfillError(Exception):
    """A backfill that cannot be requested; the message is one line for the operator."""


class WhereError(BackfillError, ValueError):
    """A `--where` that is not one boolean expression over the table."""

    def __init__(self, where: str, problem: str) -> None:
        shown = where if len(where) <= 120 else where[:117] + "..."
        super().__init__(f"--where {shown!r}: {problem}")
        self.problem = problem


_SPACE = " \t\n\r\f"  # Postgres's whitespace
_CONTINUATION = re.compile(r"[ \t\f]*[\n\r][ \t\n\r\f]*'")  # 'one' <newline> 'literal': Postgres joins them
_DOLLAR_TAG = re.compile(r"\$(?:[A-Za-z_\x80-\U0010ffff][A-Za-z0-9_\x80-\U0010ffff]*)?\$")
_PARAMETER = re.compile(r"\$[0-9]+")


def _word_char(c: str) -> bool:
    """Characters of identifiers, keywords and numbers (Postgres: letters, digits, `_`, any
    non-ASCII character; `$` only inside a word)."""
    return c == "_" or "a" <= c <= "z" or "A" <= c <= "Z" or "0" <= c <= "9" or ord(c) >= 0x80


def _end_of_string(text: str, start: int, escapes: bool, where: str, pos: int) -> int:
    """Index after the string literal opening at `start` (`''` is a quote; with `escapes`, as in
    E'...', a backslash escapes the next character; a literal continued on the next line is one)."""
    j, n = start + 1, len(text)
    while j < n:
        ch = text[j]
        if escapes and ch == "\\":
            j += 2
        elif ch != "'":
            j += 1
        elif text.startswith("''", j):
            j += 2
        else:
            more = _CONTINUATION.match(text, j + 1)
            if more is None:
                return j + 1
            j = more.end()
    raise WhereError(where, f"unterminated string literal starting at position {start + pos}")


def check_where(where: str | None) -> str | None:
    """The lexical half of the `--where` check (see the module docstring); returns the expression
    to paste inside parentheses, or None for no `--where`. Raises WhereError naming the problem."""
    if where is None:
        return None
    text = where.strip(_SPACE)
    if not text:
        raise WhereError(where, "is empty; leave --where out to backfill the whole table")
    pos = len(where) - len(where.lstrip(_SPACE)) + 1  # positions in messages count from 1, in `where`
    opened: list[int] = []
    word = ""  # the identifier, keyword or number being read
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if _word_char(c) or (c == "$" and word):
            if c == "$" and word[0].isdigit():
                raise WhereError(where, f"'$' right after the number {word!r} at position {i + pos} is "
                                        "ambiguous")
            word += c
            i += 1
            continue
        if c == "'":
            if word[:1].isdigit():
                raise WhereError(where, f"a quote right after the number {word!r} at position {i + pos} is "
                                        "ambiguous")
            i = _end_of_string(text, i, word in ("e", "E"), where, pos)
        elif c == '"':
            j = i + 1
            while True:
                j = text.find('"', j)
                if j < 0:
                    raise WhereError(where, f"unterminated quoted identifier starting at position {i + pos}")
                if not text.startswith('""', j):
                    break
                j += 2
            i = j + 1
        elif c == "$":
            tag = _DOLLAR_TAG.match(text, i)
            if tag is None:
                param = _PARAMETER.match(text, i)
                if param is not None:
                    raise WhereError(where, f"positional parameter {param.group()} at position {i + pos} "
                                            "is not allowed; write the value itself")
                raise WhereError(where, f"unexpected '$' at position {i + pos}")
            end = text.find(tag.group(), tag.end())
            if end < 0:
                raise WhereError(where, f"unterminated dollar-quoted string starting at position {i + pos}")
            i = end + len(tag.group())
        elif text.startswith("--", i) or text.startswith("/*", i):
            raise WhereError(where, f"a comment ({text[i:i + 2]!r} at position {i + pos}) is not allowed")
        elif c == ";":
            raise WhereError(where, f"';' at position {i + pos}: one expression only, not several statements")
        elif c == "(":
            opened.append(i)
            i += 1
        elif c == ")":
            if not opened:
                raise WhereError(where, f"unbalanced parentheses: ')' at position {i + pos} closes a '(' it "
                                        "never opened")
            opened.pop()
            i += 1
        elif (c < " " and c not in _SPACE) or c == "\x7f":
            raise WhereError(where, f"control character {c!r} at position {i + pos}")
        else:
            i += 1
        word = ""
    if opened:
        raise WhereError(where, f"unbalanced parentheses: '(' at position {opened[-1] + pos} is never closed")
    return text


def _where_sql(where: str) -> sql.Composable:
    """A checked expression inside its parentheses; `%` doubled for the query's placeholders."""
    return sql.SQL("({})").format(sql.SQL(where.replace("%", "%%")))


def _table_sql(table: str) -> sql.Composable:
    schema, name = table.split(".", 1)
    return sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(name))


_NOT_ABOUT_THE_WHERE = ("08", "53", "57", "58")  # connection, resources, operator intervention, system


def _refusal(where: str, exc: psycopg.Error) -> WhereError | None:
    state = exc.sqlstate or ""
    if not state or state[:2] in _NOT_ABOUT_THE_WHERE:
        return None
    lines = (exc.diag.message_primary or str(exc)).strip().splitlines()
    return WhereError(where, f"Postgres refuses it: {lines[0] if lines else state}")


def validate_where(conn: psycopg.Connection[Any], table: str, where: str | None) -> str | None:
    """Both halves of the check, on an autocommit connection: the lexical scan, then `EXPLAIN` of
    `SELECT 1 FROM table WHERE (<where>)` in a read-only transaction that is rolled back."""
    text = check_where(where)
    if text is None:
        return None
    assert where is not None
    probe = sql.SQL("EXPLAIN SELECT 1 FROM {} LIMIT %s").format(_table_sql(table))
    try:
        with conn.transaction(force_rollback=True):
            conn.execute("SET TRANSACTION READ ONLY")
            conn.execute(probe, [0])
    except psycopg.Error as exc:
        if not exc.sqlstate or exc.sqlstate[:2] in _NOT_ABOUT_THE_WHERE:
            raise
        raise BackfillError(f"table {table}: {(exc.diag.message_primary or str(exc)).strip()}") from None
    q = sql.SQL("EXPLAIN SELECT 1 FROM {} WHERE {} LIMIT %s").format(_table_sql(table), _where_sql(text))
    try:
        with conn.transaction(force_rollback=True):
            conn.execute("SET TRANSACTION READ ONLY")
            conn.execute("SET LOCAL standard_conforming_strings = on")
            conn.execute(q, [0])
    except psycopg.Error as exc:
        refusal = _refusal(where, exc)
        if refusal is None:
            raise
        raise refusal from None
    return text


async def _validate_where_async(conn: psycopg.AsyncConnection[Any], table: str,
                                 where: str | None) -> str | None:
    """`validate_where` for the bridge, on its own autocommit connection."""
    text = check_where(where)
    if text is None:
        return None
    assert where is not None
    q = sql.SQL("EXPLAIN SELECT 1 FROM {} WHERE {} LIMIT %s").format(_table_sql(table), _where_sql(text))
    try:
        async with conn.transaction(force_rollback=True):
            await conn.execute("SET TRANSACTION READ ONLY")
            await conn.execute("SET LOCAL standard_conforming_strings = on")
            await conn.execute(q, [0])
    except psycopg.Error as exc:
        refusal = _refusal(where, exc)
        if refusal is None:
            raise
        raise refusal from None
    return text


# -- the bridge side ---------------------------------------------------------------------------

@dataclass
class _Chunk:
    table: str
    key_columns: list[str]
    rows: dict[tuple[Any, ...], dict[str, Any]]
    changed: set[tuple[Any, ...]] = field(default_factory=set)
    open: bool = False
    emitted: asyncio.Event = field(default_factory=asyncio.Event)


def _lock_key(req_id: int) -> int:
    """The request id as the second (int4) key of its advisory lock."""
    return (req_id + 2**31) % 2**32 - 2**31


# Runs of every Backfills of this process: a new one (after a reconnect) lets the cancelled runs of
# the old one end, and so release their locks, before it looks for interrupted requests.
_RUNS: weakref.WeakSet[asyncio.Task[None]] = weakref.WeakSet()


class Backfills:
    """Runs requested backfills; the stream reader calls `on_request`, `on_message` and `on_change`.

    Made when streaming starts: it then resumes the requests left `running` by a run that ended
    (see the module docstring for the states)."""

    def __init__(self, dsn: str, tables: set[str], sink: Any, *, resume_interrupted: bool = True) -> None:
        self.dsn, self.tables, self.sink = dsn, tables, sink
        self._chunks: dict[str, _Chunk] = {}
        #: The chunks being read (the same dict): empty most of the time, and `on_change` then has
        #: nothing to do, so the stream reader does not call it.
        self.open_chunks = self._chunks
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._resumer: asyncio.Task[None] | None = None
        if resume_interrupted:
            self._resumer = asyncio.get_running_loop().create_task(self._resume_interrupted())

    # -- called from the stream reader (in stream order) --------------------------------

    def on_request(self, row: dict[str, Any]) -> None:
        """A row of the requests table from the stream. Only `requested` (written by the CLI) starts
        anything: `running`, progress, `done` and `failed` are this bridge's own writes coming back."""
        if row.get("status") != "requested":
            return
        if row.get("table_name") not in self.tables:
            log.info("backfill #%s of %s: not mapped here, left to a bridge that maps it", row["id"],
                     row.get("table_name"))
            return
        self._start(int(row["id"]), "requested")

    def on_change(self, table: str, key: Mapping[str, Any]) -> None:
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
                key = dict(zip(chunk.key_columns, pk, strict=True))
                await self.sink.put(ChangeEvent(chunk.table, Op.SNAPSHOT, row, None, key,
                                                f"backfill:{chunk_id}", None))
            chunk.emitted.set()

    def cancel(self) -> None:
        if self._resumer is not None:
            self._resumer.cancel()
        for t in self._tasks.values():
            t.cancel()

    # -- the backfill itself (own connection) -------------------------------------------

    def _start(self, req_id: int, status: str) -> None:
        """Run `req_id` if it still has `status` when claimed; one run per request at a time."""
        if req_id in self._tasks:
            return
        task = asyncio.create_task(self._run(req_id, status))
        self._tasks[req_id] = task
        _RUNS.add(task)
        task.add_done_callback(lambda t: self._tasks.pop(req_id) if self._tasks.get(req_id) is t else None)

    async def _resume_interrupted(self) -> None:
        ending = [t for t in _RUNS if not t.done() and t.cancelling()]
        if ending:
            await asyncio.wait(ending)
        try:
            async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
                rows = await (await conn.execute(
                    f"SELECT id FROM {REQUESTS_TABLE} WHERE status = 'running' AND table_name = ANY(%s)"
                    " ORDER BY id", (sorted(self.tables),))).fetchall()
        except psycopg.errors.UndefinedTable:
            return  # set up before backfills existed: nothing was ever requested
        except psycopg.Error as exc:
            log.warning("could not look for interrupted backfills: %s", exc)
            return
        for (req_id,) in rows:
            self._start(int(req_id), "running")

    async def _run(self, req_id: int, status: str) -> None:
        claimed = False
        try:
            async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
                await conn.execute("SET standard_conforming_strings = on")  # as `check_where` reads literals
                locked = await (await conn.execute("SELECT pg_try_advisory_lock(%s::int4, %s::int4)",
                                                   (LOCK_CLASS, _lock_key(req_id)))).fetchone()
                if not (locked and locked[0]):
                    log.info("backfill #%d is being run by another bridge", req_id)
                    return
                row = await (await conn.execute(
                    f"UPDATE {REQUESTS_TABLE} SET status = 'running', message = NULL, updated_at = now()"
                    " WHERE id = %s AND status = %s AND table_name = ANY(%s)"
                    " RETURNING table_name, where_sql, chunk_size, last_key, rows_sent",
                    (req_id, status, sorted(self.tables)))).fetchone()
                if row is None:
                    return  # no longer `status`: a stale row from the stream (already run, or run elsewhere)
                claimed = True
                await self._backfill(conn, req_id, *row)
        except asyncio.CancelledError:
            raise  # left `running`: resumed when streaming starts again
        except Exception as exc:
            if not claimed:
                log.error("backfill #%d could not start: %s", req_id, exc)
                return
            log.error("backfill #%d failed: %s", req_id, exc)
            try:
                async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
                    await conn.execute(f"UPDATE {REQUESTS_TABLE} SET status = 'failed', message = %s,"
                                       " updated_at = now() WHERE id = %s", (str(exc)[:1000], req_id))
            except psycopg.Error:
                pass

    async def _backfill(self, conn: psycopg.AsyncConnection[Any], req_id: int, table: str,
                        where_sql: str | None, chunk_size: int, last_key: list[Any] | None,
                        rows_sent: int) -> None:
        if table not in self.tables:
            raise ValueError(f"table {table} is not mapped in this bridge's configuration")
        where = await _validate_where_async(conn, table, where_sql)
        from bridge.sources.snapshot import _primary_key

        keys = await _primary_key(conn, table)
        cols = sql.SQL(", ").join(sql.Identifier(k) for k in keys)
        log.info("backfill #%d of %s%s %s", req_id, table, f" where {where}" if where else "",
                 f"resumed after {rows_sent} rows" if last_key is not None else "started")
        n = 0
        while True:
            n += 1
            conds: list[sql.Composable] = []
            params: list[Any] = []
            if where:
                conds.append(_where_sql(where))  # the operator's own SQL, checked to stay in its parentheses
            if last_key is not None:
                ph = sql.SQL(", ").join(sql.Placeholder() for _ in keys)
                conds.append(sql.SQL("({}) > ({})").format(cols, ph))
                params.extend(last_key)
            cond = sql.SQL(" WHERE ") + sql.SQL(" AND ").join(conds) if conds else sql.SQL("")
            q = sql.SQL("SELECT * FROM {}{} ORDER BY {} LIMIT %s").format(_table_sql(table), cond, cols)
            chunk_id = f"{req_id}.{n}"
            chunk = _Chunk(table, keys, {})
            self._chunks[chunk_id] = chunk  # registered before the low watermark can be read back
            try:
                await conn.execute(EMIT, (PREFIX, f"low:{chunk_id}"))
                async with conn.transaction():
                    await conn.execute("SET TRANSACTION READ ONLY")
                    cur = await conn.execute(q, [*params, chunk_size])
                    names = [d.name for d in cur.description or []]
                    rows = [dict(zip(names, r, strict=True)) for r in await cur.fetchall()]
                chunk.rows = {tuple(r[k] for k in keys): r for r in rows}
                await conn.execute(EMIT, (PREFIX, f"high:{chunk_id}"))
            except BaseException:
                self._chunks.pop(chunk_id, None)
                raise
            await chunk.emitted.wait()
            rows_sent += len(rows)
            if rows:
                last_key = [r for r in (rows[-1][k] for k in keys)]
            await conn.execute(
                f"UPDATE {REQUESTS_TABLE} SET last_key = %s, rows_sent = %s, updated_at = now()"
                " WHERE id = %s",
                (orjson.dumps(last_key, default=str).decode() if last_key is not None else None, rows_sent,
                 req_id))
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
                f"SELECT max(id) FROM {REQUESTS_TABLE}"
                " WHERE table_name = %s AND status IN ('running', 'failed'))"
                " RETURNING id, rows_sent", (table,)).fetchone()
            if row is None:
                out(f"backfill: no interrupted backfill of {table} to resume")
                return 1
            req_id = row[0]
            out(f"backfill #{req_id} of {table} resumes after {row[1]} rows")
        else:
            where = validate_where(conn, table, where)  # WhereError: nothing is recorded
            (req_id,) = conn.execute(
                f"INSERT INTO {REQUESTS_TABLE} (table_name, where_sql, chunk_size)"
                " VALUES (%s, %s, %s) RETURNING id",
                (table, where, chunk_size)).fetchone()  # type: ignore[misc]
            out(f"backfill #{req_id} of {table}{' where ' + where if where else ''} requested; "
                f"the streaming bridge runs it")
        if not wait:
            return 0
        deadline = time.monotonic() + timeout
        last = -1
        while time.monotonic() < deadline:
            status, rows, message = conn.execute(
                f"SELECT status, rows_sent, message FROM {REQUESTS_TABLE} WHERE id = %s",
                (req_id,)).fetchone()  # type: ignore[misc]
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
        conn.execute("SET standard_conforming_strings = on")  # as `check_where` reads literals
        where = validate_where(conn, table, where)  # WhereError: nothing is written
        while True:
            conds: list[sql.Composable] = []
            params: list[Any] = [table]
            if where:
                conds.append(_where_sql(where))  # checked to stay inside its parentheses
            if last is not None:
                ph = sql.SQL(", ").join(sql.Placeholder() for _ in last)
                conds.append(sql.SQL("({}) > ({})").format(cols, ph))
                params.extend(last)
            cond = sql.SQL(" WHERE ") + sql.SQL(" AND ").join(conds) if conds else sql.SQL("")
            q = sql.SQL(
                "WITH chunk AS (SELECT * FROM {}.{}{} ORDER BY {} LIMIT %s FOR SHARE) "
                "INSERT INTO onesignal_bridge.outbox (table_name, op, new_row) "
                "SELECT %s, 'U', to_jsonb(chunk.*) FROM chunk ORDER BY {} "
                "RETURNING {}"
            ).format(sql.Identifier(schema), sql.Identifier(name), cond, cols, cols,
                     sql.SQL(", ").join(sql.SQL("(new_row->>{})").format(sql.Literal(k))
                                        for k in key_columns))
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
