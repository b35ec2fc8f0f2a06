"""The shared stages' fast paths (issue 16) give exactly what the plain paths give.

- a table's compiled per-row plan (`TableMapping._fields`) against the field-by-field mapping
  (`_fields_checked`, which names rejected values), on rows of every kind of value, bad ones too;
- the builders in `bridge.events` against the dataclass constructors;
- the coalescer's in-place merge against the byte estimate it documents.
"""

from __future__ import annotations

import datetime as dt
import decimal
import pickle
import random
from dataclasses import FrozenInstanceError
from typing import Any

import pytest

from bridge.coalesce import Coalescer
from bridge.config import parse_config
from bridge.events import (
    UNCHANGED,
    ChangeEvent,
    Op,
    Origin,
    SubscriptionChange,
    UserChange,
    UserRef,
    change_event,
    origin,
    user_change,
)
from bridge.mapping import Mapper, MappingResult, TableMapping
from bridge.sources.pgtypes import Unrepresentable

MAPPING = {
    "table": "public.users",
    "identity": {"external_id": "id"},
    "aliases": {"crm_id": "crm_id"},
    "tags": {"plan": "plan", "score": "score", "signup_at": "created_at", "meta": "meta", "vip": "vip"},
    "properties": {"language": "locale", "timezone_id": "tz", "lat": "lat", "first_active": "seen"},
    "subscriptions": {"email": "email"},
    "on_delete": "delete_user",
}

# column: (values OneSignal takes, values it would reject)
VALUES: dict[str, tuple[list[Any], list[Any]]] = {
    "plan": (["free", "pro", "", None, 7, "é" * 200, UNCHANGED], ["é" * 600]),
    "score": ([decimal.Decimal("1.50"), decimal.Decimal("NaN"), 3, 2.5, float("inf"), True, None, UNCHANGED], []),
    "created_at": ([dt.datetime(2024, 5, 1, 10, 11, 12, tzinfo=dt.UTC), dt.datetime(2024, 5, 1),
                    dt.date(2020, 1, 2), None, UNCHANGED], [Unrepresentable("infinity")]),
    "meta": ([{"a": [1, 2]}, "m", None, UNCHANGED], [[1.5, float("nan")]]),
    "vip": ([True, False, None, UNCHANGED], []),
    "locale": (["fr-FR", "en", None, UNCHANGED], ["xyz", "", 5]),
    "tz": (["Europe/Paris", None, UNCHANGED], ["Mars/Base"]),
    "lat": ([45.5, "12.5", None, UNCHANGED], [91, "north"]),
    "seen": ([dt.datetime(2024, 1, 1, tzinfo=dt.UTC), 1714558272, None, UNCHANGED], ["soon"]),
    "crm_id": (["crm-1", 1001, None, dt.date(2020, 1, 1), UNCHANGED], ["a/b", ""]),
    "email": (["a@example.com", None, UNCHANGED], ["not an address"]),
}


def _table() -> TableMapping:
    config = parse_config({"onesignal": {"app_id": "a", "api_key": "k"},
                           "source": {"kind": "postgres", "dsn": "postgresql://x@h/x", "snapshot": "never"},
                           "mappings": [MAPPING]})
    return Mapper(config).tables["public.users"]


def _row(rng: random.Random) -> dict[str, Any]:
    row: dict[str, Any] = {"id": rng.choice([1, 2, "u-3"])}
    for col, (good, bad) in VALUES.items():
        v = rng.choice(bad if bad and rng.random() < 0.03 else good)
        if v is not UNCHANGED or rng.random() < 0.5:  # UNCHANGED sent, or the column left out
            row[col] = v
    return row


def _plain(tm: TableMapping) -> TableMapping:
    """The same table mapping with its compiled plan switched off: every row field by field."""
    plain = _table()
    object.__setattr__(plain, "_fields", lambda row, update: None)
    return plain


@pytest.mark.parametrize("seed", range(4))
def test_the_compiled_plan_maps_every_row_as_the_field_by_field_mapping_does(seed: int) -> None:
    rng = random.Random(seed)
    fast, plain = _table(), _plain(_table())
    planned = 0
    for i in range(500):
        op = rng.choice([Op.INSERT, Op.UPDATE, Op.SNAPSHOT])
        new = _row(rng)
        old = {"id": new["id"], "email": rng.choice(["old@example.com", None])} if op is Op.UPDATE else None
        ev = ChangeEvent("public.users", op, new, old, {"id": new["id"]}, f"0/{i}", 1.0)
        got, want = fast.map(ev, i), plain.map(ev, i)
        assert got == want, new
        one = fast.map_one(ev, i)
        assert (MappingResult((one,)) if isinstance(one, UserChange) else one) == want
        planned += fast._fields(new, op is Op.UPDATE) is not None  # type: ignore[attr-defined]
    assert 100 < planned < 450  # both paths taken, each many times


def test_map_one_gives_the_change_itself_only_when_nothing_was_rejected() -> None:
    tm = _table()
    ok = ChangeEvent("public.users", Op.INSERT, {"id": 1, "plan": "pro"}, None, {"id": 1}, "0/1")
    bad = ChangeEvent("public.users", Op.INSERT, {"id": 1, "plan": "pro", "locale": "xyz"}, None, {"id": 1}, "0/2")
    assert isinstance(tm.map_one(ok, 1), UserChange)
    result = tm.map_one(bad, 2)
    assert isinstance(result, MappingResult)
    assert [r.field for r in result.rejections] == ["locale"] and result.changes[0].tags == {"plan": "pro"}


def test_the_builders_make_the_frozen_dataclasses_themselves() -> None:
    user = UserRef("external_id", "1")
    o = origin("public.users", "id=1", "0/1", 5, 2.0)
    assert type(o) is Origin and o == Origin("public.users", "id=1", "0/1", 5, 2.0)
    sub = (SubscriptionChange("email", "a@example.com"),)
    c = user_change(user, o, {"plan": "pro"}, {"language": "fr"}, {}, sub, False, UserRef("external_id", "0"))
    assert type(c) is UserChange
    assert c == UserChange(user, o, False, {"plan": "pro"}, {"language": "fr"}, {}, sub, UserRef("external_id", "0"))
    e = change_event("public.users", Op.UPDATE, {"id": 1}, None, {"id": 1}, "0/1")
    assert type(e) is ChangeEvent and e == ChangeEvent("public.users", Op.UPDATE, {"id": 1}, None, {"id": 1}, "0/1")
    assert pickle.loads(pickle.dumps(c)) == c and hash(o) == hash(Origin("public.users", "id=1", "0/1", 5, 2.0))
    with pytest.raises(FrozenInstanceError):
        c.tags = {}  # type: ignore[misc]
    with pytest.raises(FrozenInstanceError):
        o.seq = 1  # type: ignore[misc]
    assert c.with_seq(9).origin.seq == 9 and type(c.with_seq(9)) is UserChange


def _expected_growth(tags: dict[str, Any], seen: set[str], ch: UserChange) -> int:
    """The estimate `_Pending.merge` documents, computed the long way."""
    grown = 8
    for k, v in ch.tags.items():
        if k not in seen:
            grown += 64 + len(k)
        grown += len(v) if v else 0
    grown += 64 * len(ch.properties) + sum(64 + len(k) for k in ch.aliases) + 128 * len(ch.subscriptions)
    return grown


def test_the_in_place_merge_keeps_the_documented_byte_estimate() -> None:
    rng = random.Random(7)
    c = Coalescer()
    user = UserRef("external_id", "1")
    seen: set[str] = set()
    tags: dict[str, Any] = {}
    for i in range(300):
        delete = rng.random() < 0.05
        names = rng.sample(["a", "bb", "ccc", "d"], rng.randint(0, 4))
        ch_tags = {k: rng.choice(["v", "", None, "long" * 5]) for k in names}
        aliases = {"crm": "c"} if rng.random() < 0.3 else {}
        props = {"language": "fr"} if rng.random() < 0.3 else {}
        ch = user_change(user, origin("t", "k", "p", i, None), {} if delete else ch_tags, props, aliases, (), delete)
        before = c.pending_bytes
        c.add(ch, 0.0)
        p = c._pending[user]
        if delete:
            seen.clear()
            tags.clear()
            assert p.size == 1536 + 8 * (len(p.seqs) - 1) + 64 * len(props) + sum(64 + len(k) for k in aliases) + 8
        elif i == 0:
            assert c.pending_bytes - before == 1536 + _expected_growth(tags, seen, ch)
        else:
            assert c.pending_bytes - before == _expected_growth(tags, seen, ch)
        seen |= set(ch.tags)
        tags.update(ch.tags)
        assert p.tags == tags
