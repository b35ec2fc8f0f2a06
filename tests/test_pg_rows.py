"""The compiled row decoders of the `postgres` source (`bridge.sources.pg_rows`): for every insert
and update they accept, the event is the one the general path builds; anything else raises, and
the source then takes the general path."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from test_pg_source_events import RELATION, ROW, frame, source, table

from bridge.events import UNCHANGED
from bridge.sources import pgoutput as po
from bridge.sources.pg_rows import _Table


def general(t: _Table, data: memoryview) -> Any:
    src = source()
    mk, _, old_kind, old, new = po.row_message(data, 25)
    return src._event(t, mk, old_kind, old, new, data)


def fast(t: _Table, data: memoryview) -> Any:
    decode = t.update_event if data[25] == 0x55 else t.insert_event
    return decode(bytes(data), "0/1A2B", 1700000000.0)


OLD = ("7", "old@example.com", "free", "hello", "2024-03-01 12:00:00+00", "11.50", "f", "x")
VARIANTS = [
    ROW,
    OLD,
    ("7", None, None, None, None, None, None, None),
    ("8", "a@example.com", "", "é ü 😀", "2024-03-01 12:00:00.5+00", "-0.01", "t", None),
    ("7", "a@example.com", "pro", "hello", "infinity", "Infinity", "f", "unmapped"),
]


@pytest.mark.parametrize("new", VARIANTS)
def test_inserts_give_the_general_paths_event(new: tuple[Any, ...]) -> None:
    t = table(source())
    data = frame(po.Insert(16385, new))
    assert fast(t, data) == general(t, data)


@pytest.mark.parametrize(("old", "new"), list(itertools.product([None, *VARIANTS], VARIANTS)))
def test_updates_give_the_general_paths_event(old: tuple[Any, ...] | None, new: tuple[Any, ...]) -> None:
    t = table(source())
    data = frame(po.Update(16385, None if old is None else "O", old, new))
    got = fast(t, data)
    assert got == general(t, data)
    if old is not None and old[0] == new[0]:
        assert got.old["id"] is got.new["id"]  # equal bytes: the new row's value, not decoded again


def test_a_table_without_a_column_list_compares_its_whole_old_row() -> None:
    t = _Table(RELATION, ["id"])
    data = frame(po.Update(16385, "O", OLD, ROW))
    assert fast(t, data) == general(t, data) and set(fast(t, data).old) == {c.name for c in RELATION.columns}


@pytest.mark.parametrize("msg", [
    po.Update(16385, "K", ("6", None, None, None, None, None, None, None), ROW),  # a key-only old row
    po.Update(16385, None, None, ("7", "a@example.com", "pro", UNCHANGED, None, None, None, None)),
    po.Update(16385, "O", OLD, ("7", "a@example.com", "pro", "hello", None, None, None, UNCHANGED)),
    po.Insert(16385, ("7", b"\x00binary", "pro", "hello", None, None, None, None)),
    po.Insert(16385, ROW[:7]),  # not the relation's column count
    po.Insert(16385, (*ROW, "extra")),
    po.Insert(16385, ("7", "a@example.com", "pro", "hello", "not a time", "12.50", "t", "x")),
    po.Insert(16385, ("x7", "a@example.com", "pro", "hello", None, "12.50", "t", "x")),
])
def test_what_the_fast_path_does_not_take_raises(msg: po.Message) -> None:
    with pytest.raises(Exception):  # noqa: B017,PT011 - whatever it is, the source takes the general path
        fast(table(source()), frame(msg))


@pytest.mark.parametrize("cut", [1, 3, 9, 30])
def test_a_truncated_message_raises(cut: int) -> None:
    data = frame(po.Update(16385, "O", OLD, ROW))
    with pytest.raises(Exception):  # noqa: B017,PT011
        fast(table(source()), data[:-cut])
    with pytest.raises(po.DecodeError):
        general(table(source()), data[:-cut])


def test_trailing_bytes_raise() -> None:
    data = memoryview(bytes(frame(po.Insert(16385, ROW))) + b"\x00")
    with pytest.raises(Exception):  # noqa: B017,PT011
        fast(table(source()), data)


def test_column_names_are_literals_not_code() -> None:
    rel = po.Relation(1, "public", "t", "d", (po.Column(True, "id", 20, -1),
                                               po.Column(False, "a'; import os #", 25, -1)))
    t = _Table(rel, None, frozenset({"a'; import os #"}))
    data = frame(po.Insert(1, ("1", "v")))
    assert fast(t, data).new == {"id": 1, "a'; import os #": "v"}
