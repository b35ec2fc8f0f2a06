"""The `postgres` source's hot path without a server: pgoutput bytes (a test-only encoder) ->
decoded row -> `ChangeEvent`, as `PostgresSource` builds it for each Insert, Update and Delete."""

from __future__ import annotations

import datetime as dt
import decimal
import struct
from typing import Any

from test_pgoutput import encode

from bridge.config import parse_config
from bridge.events import UNCHANGED, Op
from bridge.sources import pgoutput as po
from bridge.sources.pgtypes import PgType
from bridge.sources.postgres import PostgresSource, _Table

COLUMNS = [("id", PgType.INT8), ("email", PgType.TEXT), ("plan", PgType.TEXT), ("bio", PgType.TEXT),
           ("created_at", PgType.TIMESTAMPTZ), ("score", PgType.NUMERIC), ("vip", PgType.BOOL),
           ("notes", PgType.TEXT)]
MAPPING = {"table": "public.users", "identity": {"external_id": "id"},
           "tags": {"plan": "plan", "bio": "bio", "signup_at": "created_at", "score": "score", "vip": "vip"},
           "subscriptions": {"email": "email"}, "on_delete": "delete_user"}


def source() -> PostgresSource:
    config = parse_config({
        "onesignal": {"app_id": "app", "api_key": "os_v2_app_test"},
        "source": {"kind": "postgres", "dsn": "postgresql://bridge@db/app"},
        "mappings": [MAPPING],
    }, env={})
    src = PostgresSource.from_config(config)
    src._tx_pos, src._tx_commit_time = "0/1A2B", 1700000000.0
    return src


RELATION = po.Relation(16385, "public", "users", "f",
                       tuple(po.Column(True, name, int(oid), -1) for name, oid in COLUMNS))


def table(src: PostgresSource) -> _Table:
    return _Table(RELATION, ["id"], src._columns["public.users"], src._old_columns["public.users"])


def frame(msg: po.Message) -> memoryview:
    return memoryview(b"w" + struct.pack("!QQq", 1, 2, 3) + encode(msg))


def event_of(src: PostgresSource, t: _Table, msg: po.Message) -> Any:
    data = frame(msg)
    mk, _, old_kind, old, new = po.row_message(data, 25)
    return src._event(t, mk, old_kind, old, new, data)


ROW = ("7", "a@example.com", "pro", "hello", "2024-03-01 12:00:00+00", "12.50", "t", "unmapped")


def test_insert_converts_the_mapped_and_key_columns_only() -> None:
    src = source()
    e = event_of(src, table(src), po.Insert(16385, ROW))
    assert e.op is Op.INSERT and e.table == "public.users" and e.key == {"id": 7}
    assert e.new == {"id": 7, "email": "a@example.com", "plan": "pro", "bio": "hello",
                     "created_at": dt.datetime(2024, 3, 1, 12, tzinfo=dt.UTC), "score": decimal.Decimal("12.50"),
                     "vip": True}
    assert (e.position, e.commit_time) == ("0/1A2B", 1700000000.0)


def test_an_update_reads_only_what_it_needs_of_the_whole_old_row() -> None:
    src = source()
    old = ("7", "old@example.com", "free", "hello", "2024-03-01 12:00:00+00", "11.50", "f", "x")
    e = event_of(src, table(src), po.Update(16385, "O", old, ROW))
    assert e.op is Op.UPDATE and e.new["plan"] == "pro"
    # the key, the identity and the subscription address: what mapping reads of an old row
    assert e.old == {"id": 7, "email": "old@example.com"}


def test_unchanged_toast_in_an_update_comes_from_the_whole_old_row() -> None:
    src = source()
    old = ("7", "a@example.com", "free", "a long biography", "2024-03-01 12:00:00+00", "11.50", "f", "x")
    new = ("7", "a@example.com", "pro", UNCHANGED, "2024-03-01 12:00:00+00", "12.50", "t", "x")
    e = event_of(src, table(src), po.Update(16385, "O", old, new))
    assert e.new["bio"] == "a long biography" and e.new["plan"] == "pro"


def test_unchanged_toast_without_the_old_value_stays_unchanged() -> None:
    src = source()
    new = ("7", "a@example.com", "pro", UNCHANGED, None, None, None, None)
    e = event_of(src, table(src), po.Update(16385, None, None, new))
    assert e.new["bio"] is UNCHANGED and e.new["created_at"] is None and e.old is None


def test_a_key_only_old_row_keeps_only_its_key() -> None:
    src = source()
    e = event_of(src, table(src), po.Update(16385, "K", ("6", None, None, None, None, None, None, None), ROW))
    assert e.old == {"id": 6} and e.key == {"id": 7}


def test_an_unchanged_toasted_key_is_taken_from_the_key_only_old_row() -> None:
    """A text key long enough to be stored out of line, not changed by the update: Postgres sends
    it in the key-only old row and marks it unchanged in the new one. The event's key (what dead
    letters, `dlq replay` and backfill chunks find the row by) is the real value."""
    config = parse_config({
        "onesignal": {"app_id": "app", "api_key": "os_v2_app_test"},
        "source": {"kind": "postgres", "dsn": "postgresql://bridge@db/app"},
        "mappings": [{"table": "public.accounts", "identity": {"external_id": "ext"}, "tags": {"nick": "nick"}}],
    }, env={})
    src = PostgresSource.from_config(config)
    src._tx_pos, src._tx_commit_time = "0/1A2B", 1700000000.0
    columns = (po.Column(True, "ext", int(PgType.TEXT), -1), po.Column(False, "nick", int(PgType.TEXT), -1))
    relation = po.Relation(16390, "public", "accounts", "d", columns)
    t = _Table(relation, ["ext"], src._columns["public.accounts"], src._old_columns["public.accounts"])
    long_key = "k" * 2100
    e = event_of(src, t, po.Update(16390, "K", (long_key, None), (UNCHANGED, "morpheus")))
    assert e.key == {"ext": long_key} and e.new == {"ext": long_key, "nick": "morpheus"}
    assert e.old == {"ext": long_key}


def test_delete_keeps_the_mapped_columns_of_the_old_row() -> None:
    src = source()
    e = event_of(src, table(src), po.Delete(16385, "O", ROW))
    assert e.op is Op.DELETE and e.new is None and e.key == {"id": 7}
    assert e.old is not None and e.old["plan"] == "pro" and "notes" not in e.old


def test_converted_values_are_memoised_per_column_but_equal() -> None:
    src = source()
    t = table(src)
    first = event_of(src, t, po.Insert(16385, ROW)).new
    second = event_of(src, t, po.Insert(16385, ROW)).new
    assert first == second and first is not second
    assert second["created_at"] is first["created_at"]  # the same immutable datetime, parsed once
