"""`dlq list|show|replay|purge`: read dead letters back, and re-send them once the cause is fixed.

Replay re-reads each dead letter's row from its table (by the stored row key) and sends it through
the normal mapping and request planning. A row that is still invalid stays in the store with the
new reason; a row that no longer exists is marked replayed (there is nothing left to send).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
from typing import Any

import orjson
import psycopg
from psycopg import sql

from bridge.coalesce import Coalescer
from bridge.config import Config, KafkaSourceConfig
from bridge.deadletter import age_filter
from bridge.events import ChangeEvent, Op
from bridge.mapping import Mapper
from bridge.onesignal import errors
from bridge.onesignal.client import OneSignalClient, build_http_client
from bridge.plan import plan


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


def _parse_key(row_key: str) -> list[dict[str, str]]:
    keys = []
    for one in row_key.split(";"):
        pairs = [p.split("=", 1) for p in one.split(",") if "=" in p]
        if pairs:
            keys.append({k: v for k, v in pairs})
    return keys


def run(config: Config, args: argparse.Namespace) -> int:
    if isinstance(config.source, KafkaSourceConfig):
        print("dlq: in kafka mode dead letters are in the dead-letter topic; read it with your Kafka tools")
        return 2
    dsn = config.source.dsn.get_secret_value()
    with psycopg.connect(dsn, autocommit=True) as conn:
        where, params = _where(args)
        if args.action == "list":
            q = sql.SQL("SELECT id, created_at, source_table, row_key, field, reason, message, replayed_at "
                        "FROM onesignal_bridge.dead_letters WHERE {} ORDER BY id LIMIT %s").format(where)
            rows = conn.execute(q, [*params, args.limit]).fetchall()
            for r in rows:
                state = f" replayed {r[7]:%Y-%m-%d %H:%M}" if r[7] else ""
                print(f"#{r[0]} {r[1]:%Y-%m-%d %H:%M:%S} {r[2]} {r[3]} field={r[4] or '-'} [{r[5]}]{state}\n    {r[6]}")
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
        q = sql.SQL("SELECT id, source_table, row_key FROM onesignal_bridge.dead_letters "
                    "WHERE replayed_at IS NULL AND {} ORDER BY id LIMIT %s").format(where)
        letters = conn.execute(q, [*params, args.limit]).fetchall()
        return asyncio.run(_replay(config, conn, letters))


async def _replay(config: Config, conn: psycopg.Connection[Any], letters: list[tuple[int, str, str]]) -> int:
    mapper = Mapper(config)
    http = build_http_client(config.onesignal.base_url, config.onesignal.request_timeout_s, 4)
    client = OneSignalClient(http, config.onesignal.app_id, config.onesignal.api_key.get_secret_value())
    failed = 0
    try:
        for letter_id, table, row_key in letters:
            outcome = await _replay_one(conn, mapper, client, table, row_key)
            if outcome is None:
                conn.execute("UPDATE onesignal_bridge.dead_letters SET replayed_at = now() WHERE id = %s", (letter_id,))
                print(f"#{letter_id} {table} {row_key}: replayed")
            else:
                failed += 1
                print(f"#{letter_id} {table} {row_key}: not replayed: {outcome}")
    finally:
        await http.aclose()
    print(f"{len(letters) - failed} replayed, {failed} left")
    return 1 if failed else 0


async def _replay_one(conn: psycopg.Connection[Any], mapper: Mapper, client: OneSignalClient,
                      table: str, row_key: str) -> str | None:
    schema, name = table.split(".", 1)
    for key in _parse_key(row_key):
        cond = sql.SQL(" AND ").join(
            sql.SQL("{}::text = %s").format(sql.Identifier(k)) for k in key
        )
        q = sql.SQL("SELECT * FROM {}.{} WHERE {}").format(sql.Identifier(schema), sql.Identifier(name), cond)
        cur = conn.execute(q, list(key.values()))
        row = cur.fetchone()
        if row is None:
            continue  # the row is gone: nothing left to send
        cols = [d.name for d in cur.description or []]
        event = ChangeEvent(table, Op.SNAPSHOT, dict(zip(cols, row)), None, key, 0, "dlq-replay",
                            dt.datetime.now(dt.timezone.utc).timestamp())
        result = mapper.map(event)
        if result.rejections:
            return "; ".join(r.message() for r in result.rejections)
        coalescer = Coalescer(0, 0)
        for ch in result.changes:
            coalescer.add(ch, 0)
        for batch in coalescer.take_due(float("inf"), 1_000_000):
            for req in plan(batch):
                try:
                    await client.send(req)
                except errors.OneSignalError as exc:
                    return str(exc)
    return None
