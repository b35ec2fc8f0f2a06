"""`dlq list|show|replay|purge`: read dead letters back, and re-send them once the cause is fixed.

Replay re-reads each dead letter's row from its table (by the structured key in `row_keys`) and
sends it through the normal mapping and request planning. A row that is still invalid stays in the
store; a row that no longer exists is reported as gone and marked replayed (there is nothing left
to send). A row that cannot be looked up (a type mismatch, a missing column or privilege) is never
taken for gone: the letter stays. Letters written before `row_keys` existed carry only the text
key (`k=v,k2=v2`, unescaped): it is read only when it can mean one thing, else the letter stays.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import sys
from dataclasses import dataclass
from typing import Any

import orjson
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from bridge import schema
from bridge.coalesce import Coalescer
from bridge.config import Config
from bridge.deadletter import ROW_KEY_TEXT_MAX, age_filter, render_row_keys
from bridge.events import ChangeEvent, Op
from bridge.mapping import Mapper
from bridge.onesignal import errors
from bridge.onesignal.client import OneSignalClient, requests
from bridge.plan import plan, unapplied
from bridge.sources import registry


def _where(args: argparse.Namespace) -> tuple[sql.Composable, list[Any]]:
    parts: list[sql.Composable] = [sql.SQL("TRUE")]
    params: list[Any] = []
    if args.id is not None:
        parts.append(sql.SQL("id = %s"))
        params.append(args.id)
    if args.table:
        parts.append(sql.SQL("source_table = %s"))
        params.append(args.table if "." in args.table else f"public.{args.table}")
    if args.reason:
        parts.append(sql.SQL("reason = %s"))
        params.append(args.reason)
    older, newer = age_filter(args.older_than), age_filter(args.newer_than)
    if older:
        parts.append(sql.SQL("created_at < now() - %s"))
        params.append(older)
    if newer:
        parts.append(sql.SQL("created_at >= now() - %s"))
        params.append(newer)
    return sql.SQL(" AND ").join(parts), params


@dataclass(frozen=True)
class Outcome:
    """What replaying one letter did: `replayed` (marked), `gone` (marked) or `failed` (left as it is)."""

    state: str
    detail: str = ""


Key = tuple[str, dict[str, Any]]  # (table, {column: value})


def _stored_keys(row_keys: Any) -> list[Key] | None:
    """The `row_keys` JSON as (table, key) pairs; None if it does not have the expected shape."""
    if not isinstance(row_keys, list) or not row_keys:
        return None
    out = []
    for entry in row_keys:
        if not isinstance(entry, dict):
            return None
        if not (isinstance(entry.get("table"), str) and isinstance(entry.get("key"), dict)):
            return None
        out.append((entry["table"], entry["key"]))
    return out


def _key_columns(conn: psycopg.Connection[Any], table: str) -> list[tuple[list[str], bool]]:
    """The column lists a key of `table` may have been rendered from, each in the table's order:
    the primary key, the replica identity index (NOT NULL columns, both), and every column
    (REPLICA IDENTITY FULL without a primary key; these may hold NULLs, rendered `None`)."""
    schema, _, name = table.partition(".")
    rows = conn.execute(
        "WITH t AS (SELECT c.oid, c.relreplident FROM pg_class c"
        "           JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s)"
        " SELECT array_agg(a.attname::text ORDER BY k.ord), false"
        "   FROM t JOIN pg_index i ON i.indrelid = t.oid"
        "   CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)"
        "   JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = k.attnum"
        "  WHERE i.indisprimary OR i.indisreplident GROUP BY i.indexrelid"
        " UNION ALL"
        " SELECT array_agg(a.attname::text ORDER BY a.attnum), true FROM t"
        "   JOIN pg_attribute a ON a.attrelid = t.oid"
        "  WHERE t.relreplident = 'f' AND a.attnum > 0 AND NOT a.attisdropped"
        "    AND NOT EXISTS (SELECT 1 FROM pg_index p WHERE p.indrelid = t.oid AND p.indisprimary)",
        (schema, name),
    ).fetchall()
    return [(r[0], r[1]) for r in rows if r[0]]


def _legacy_keys(conn: psycopg.Connection[Any], table: str, text: str) -> tuple[list[Key] | None, str]:
    """Read a key an older version stored only as text (`k=v,k2=v2`, several rows joined by `;`,
    nothing escaped), when that text can mean one thing only; else (None, why)."""
    def refuse(why: str) -> str:
        return (f"its row key {text!r} was stored as text by an older version and cannot be read back "
                f"unambiguously ({why}); nothing was sent. Fix the row and touch it (e.g. UPDATE ... SET "
                "col = col) so that the stream sends it again, then remove this letter with `dlq purge --id`")

    if not text or text == "(no key)":
        return None, refuse("the row had no key")
    if len(text) >= ROW_KEY_TEXT_MAX:
        return None, refuse("it may have been cut short")
    if ";" in text:
        return None, refuse("';' separates rows but may also be part of a value")
    for cols, nullable in _key_columns(conn, table):
        if any(c in name for name in cols for c in ",;=") or text.count(",") != len(cols) - 1:
            continue
        parts = text.split(",")
        if all(part.startswith(col + "=") for col, part in zip(cols, parts, strict=False)):
            key = {col: part[len(col) + 1:] for col, part in zip(cols, parts, strict=False)}
            if nullable and "None" in key.values():
                return None, refuse("'None' may be the text None or a NULL")
            return [(table, key)], ""
    return None, refuse("it does not match the table's key columns, or a value contains ','")


def run(config: Config, args: argparse.Namespace) -> int:
    kind = registry.for_config(config)
    dsn = kind.database_dsn(config)
    if dsn is None:
        print(f"dlq: with source.kind {kind.name} dead letters are not kept in a database"
              " (kafka: the dead-letter topic; read it with your Kafka tools)")
        return 2
    with psycopg.connect(dsn, autocommit=True) as conn:
        problem = schema.problem(schema.current_version(conn))
        if problem is not None:
            print(f"dlq: {problem}", file=sys.stderr)
            return 2
        where, params = _where(args)
        if args.action == "list":
            q = sql.SQL("SELECT id, created_at, source_table, row_key, field, reason, message, replayed_at "
                        "FROM onesignal_bridge.dead_letters WHERE {} ORDER BY id LIMIT %s").format(where)
            rows = conn.execute(q, [*params, args.limit]).fetchall()
            for r in rows:
                state = f" replayed {r[7]:%Y-%m-%d %H:%M}" if r[7] else ""
                # a trigger's send (bridge/triggers) is stored with field "trigger:<name>"
                what = f"trigger={r[4][8:]}" if (r[4] or "").startswith("trigger:") else f"field={r[4] or '-'}"
                print(f"#{r[0]} {r[1]:%Y-%m-%d %H:%M:%S} {r[2]} {r[3]} {what} [{r[5]}]{state}"
                      f"\n    {r[6]}")
            print(f"{len(rows)} dead letter(s)")
            return 0
        if args.action == "show":
            if args.id is None:
                print("dlq show: give a dead letter's id (see `dlq list`)")
                return 2
            row = conn.execute("SELECT row_to_json(d) FROM onesignal_bridge.dead_letters d WHERE id = %s",
                               (args.id,)).fetchone()
            if row is None:
                print(f"dlq show: no dead letter #{args.id}")
                return 1
            print(orjson.dumps(row[0], option=orjson.OPT_INDENT_2).decode())
            return 0
        if args.action == "purge":
            q = sql.SQL("DELETE FROM onesignal_bridge.dead_letters WHERE {}").format(where)
            n = conn.execute(q, params).rowcount
            print(f"purged {n} dead letter(s)")
            return 0
        # A trigger's letters (field "trigger:<name>") send their stored request again (bridge/triggers).
        q = sql.SQL("SELECT id, field, request FROM onesignal_bridge.dead_letters WHERE replayed_at IS NULL"
                    " AND field LIKE 'trigger:%%' AND {} ORDER BY id LIMIT %s").format(where)
        sends = conn.execute(q, [*params, args.limit]).fetchall()
        failed_sends = _replay_triggers(config, conn, sends) if sends else 0
        q = sql.SQL("SELECT id, source_table, row_key, row_keys FROM onesignal_bridge.dead_letters "
                    "WHERE replayed_at IS NULL AND (field IS NULL OR field NOT LIKE 'trigger:%%') AND {}"
                    " ORDER BY id LIMIT %s").format(where)
        letters = conn.execute(q, [*params, args.limit]).fetchall()
        if sends and not letters:
            return 1 if failed_sends else 0
        return max(asyncio.run(_replay(config, conn, letters)), 1 if failed_sends else 0)


def _replay_triggers(config: Config, conn: psycopg.Connection[Any], sends: list[tuple[int, str, Any]]) -> int:
    from bridge.triggers.replay import replay

    failed = 0
    for letter_id, ok, detail, kept in asyncio.run(replay(config, sends)):
        if not ok:
            failed += 1
            if kept is not None:  # the next replay sends under the next key (bridge/triggers/replay.py)
                conn.execute("UPDATE onesignal_bridge.dead_letters SET request = %s WHERE id = %s",
                             (Jsonb(kept), letter_id))
            print(f"#{letter_id} trigger: not replayed: {detail}")
            continue
        conn.execute("UPDATE onesignal_bridge.dead_letters SET replayed_at = now() WHERE id = %s", (letter_id,))
        print(f"#{letter_id} trigger {detail}")
    return failed


async def _replay(config: Config, conn: psycopg.Connection[Any],
                  letters: list[tuple[int, str, str, Any]]) -> int:
    mapper = Mapper(config)
    from bridge.onesignal.legacy import make_client, plan_for

    http, client = make_client(config.onesignal, max_connections=4)  # onesignal.api: User Model or legacy
    planner = plan_for(config.onesignal) or plan
    failed = gone = 0
    try:
        for letter_id, table, row_key, row_keys in letters:
            outcome = await _replay_one(conn, mapper, client, table, row_key, row_keys, planner)
            if outcome.state == "failed":
                failed += 1
                print(f"#{letter_id} {table} {row_key}: not replayed: {outcome.detail}")
                continue
            gone += outcome.state == "gone"
            conn.execute("UPDATE onesignal_bridge.dead_letters SET replayed_at = now() WHERE id = %s",
                         (letter_id,))
            print(f"#{letter_id} {table} {row_key}: {outcome.detail}")
    finally:
        await http.aclose()
    gone_note = f" ({gone} of them with their row gone)" if gone else ""
    print(f"{len(letters) - failed} replayed{gone_note}, {failed} left")
    return 1 if failed else 0


SEND_ATTEMPTS = 5


async def _send(client: OneSignalClient, req: Any) -> Any:
    """One request, retried like the dispatcher does for 429 (after `Retry-After`), 5xx and timeouts:
    a user the bridge wrote a moment ago is still within OneSignal's 1 request/s per user."""
    for attempt in range(1, SEND_ATTEMPTS + 1):
        try:
            return await client.send(req)
        except errors.OneSignalError as exc:
            if not exc.retriable or attempt == SEND_ATTEMPTS:
                raise
            wait = exc.retry_after if isinstance(exc, errors.RateLimited) else 0.5 * 2 ** attempt
            await asyncio.sleep(min(max(wait, 0.1), 30.0))


def _lookup_error(exc: psycopg.Error) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__) + (f" [SQLSTATE {exc.sqlstate}]" if exc.sqlstate else "")


async def _replay_one(conn: psycopg.Connection[Any], mapper: Mapper, client: OneSignalClient,
                      table: str, row_key: str, row_keys: Any, planner: Any = plan) -> Outcome:
    if row_keys is not None:
        keys = _stored_keys(row_keys)
        if keys is None:
            return Outcome("failed", f"its row_keys are not a list of {{table, key}} objects: {row_keys!r}")
    else:
        try:
            keys, why = _legacy_keys(conn, table, row_key)
        except psycopg.Error as exc:
            return Outcome("failed", f"cannot read the key columns of {table}: {_lookup_error(exc)}")
        if keys is None:
            return Outcome("failed", why)
    gone = 0
    for key_table, key in keys:
        shown = render_row_keys([{"table": key_table, "key": key}], table)
        if key_table not in mapper.tables:
            return Outcome("failed", f"table {key_table} is not mapped in this configuration; "
                                     "nothing was sent")
        if not key:
            return Outcome("failed", f"a row of {key_table} has no key to find it by; nothing was sent")
        schema, _, name = key_table.partition(".")
        cond = sql.SQL(" AND ").join(  # typed comparison: the value is read as the column's type
            sql.SQL("{} IS NULL" if v is None else "{} = %s").format(sql.Identifier(k))
            for k, v in key.items()
        )
        q = sql.SQL("SELECT * FROM {}.{} WHERE {}").format(sql.Identifier(schema), sql.Identifier(name), cond)
        params = [v if isinstance(v, str) else orjson.dumps(v).decode()
                  for v in key.values() if v is not None]
        try:
            cur = conn.execute(q, params)
            row = cur.fetchone()
        except psycopg.Error as exc:  # never "gone": the row may well be there
            return Outcome("failed", f"cannot look up row {shown}: {_lookup_error(exc)}; "
                                     "nothing was sent for it")
        if row is None:
            gone += 1
            continue
        cols = [d.name for d in cur.description or []]
        event = ChangeEvent(key_table, Op.SNAPSHOT, dict(zip(cols, row, strict=True)), None, key, "dlq-replay",
                            dt.datetime.now(dt.UTC).timestamp())
        result = mapper.map(event)
        if result.rejections:
            return Outcome("failed", "still invalid: " + "; ".join(r.message() for r in result.rejections))
        coalescer = Coalescer(0, 0)
        for ch in result.changes:
            coalescer.add(ch, 0)
        for batch in coalescer.take_due(float("inf"), 1_000_000):
            for req in planner(batch):
                try:
                    resp = await _send(client, req)
                    missing = unapplied(req.body["properties"], resp.body) if (
                        req.endpoint == "POST /users" and resp.status not in (200, 201)
                        and req.body and req.body.get("properties")) else None
                    if missing:  # an existing user: Create user did not apply its properties
                        await asyncio.sleep(1.0)  # OneSignal's 1 request/s per user
                        await _send(client, requests.update_user(batch.user.label, batch.user.id, missing))
                except errors.OneSignalError as exc:
                    return Outcome("failed", str(exc))
    if gone == len(keys):
        return Outcome("gone", "row is gone (deleted since), nothing left to send: marked replayed")
    if gone:
        return Outcome("replayed", f"replayed ({gone} of its {len(keys)} rows are gone)")
    return Outcome("replayed", "replayed")
