"""bridge.sources.debezium: the Debezium change-event parser.

The fixtures live outside the repository, in ../shared/debezium (docs examples, derived shapes,
real captures; see SOURCES.md there). Every fixture file must have an expectation below: a new
file without one fails `test_every_fixture_has_an_expectation`.
"""

from __future__ import annotations

import base64
import calendar
import datetime as dt
import decimal
import math
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.config import ColumnSpec
from bridge.events import UNCHANGED, Op
from bridge.sources.debezium import (
    PLACEHOLDER,
    ParsedMessage,
    PoisonMessage,
    conflicts,
    decode_decimal,
    decode_value,
    decode_with_spec,
    encode_decimal,
    field_schemas,
    parse_record,
)

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "debezium"
UTC = dt.UTC


def _require_fixtures() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(f"Debezium fixtures not found at {FIXTURES} (../shared/debezium beside the repo)")
    return FIXTURES


# ---------------------------------------------------------------------------------------------
# Matchers for decoded values
# ---------------------------------------------------------------------------------------------


class At:
    """An aware datetime at this many unix seconds (exact to the microsecond)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, dt.datetime) and other.tzinfo is not None
                and round(other.timestamp() * 1e6) == round(self.seconds * 1e6))

    def __repr__(self) -> str:
        return f"At({self.seconds})"


class Dec:
    """Exactly this Decimal, scale included (39.98 is not 39.980)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __eq__(self, other: object) -> bool:
        return isinstance(other, decimal.Decimal) and str(other) == self.text

    def __repr__(self) -> str:
        return f"Dec({self.text!r})"


def utc(y: int, mo: int, d: int, h: int = 0, mi: int = 0, s: int = 0) -> float:
    """Unix seconds of a UTC calendar time, computed independently of the parser."""
    return float(calendar.timegm((y, mo, d, h, mi, s, 0, 0, 0)))


def spec(column: str, decode: str, scale: int | None = None) -> ColumnSpec:
    return ColumnSpec(column=column, decode=decode, scale=scale)


# ---------------------------------------------------------------------------------------------
# Expectations, one per fixture value file (path relative to the fixture root)
#
#   topic / fmt / key_file / decoders: how the record is fed in (defaults: a data topic,
#       debezium-json, X.key.json beside X.json or in derived/, no decoders)
#   kind, table, op, key, source_order, commit_time, reason (substring): compared exactly
#   new / old: None, or a dict of columns that must have these values (other columns may exist)
#   new_exact / old_exact: the whole row
# ---------------------------------------------------------------------------------------------

DATA_TOPIC = "dbserver1.inventory.customers"

EXPECT: dict[str, dict[str, Any]] = {
    # -- documentation examples --------------------------------------------------------------
    "pg_create_schema.json": dict(
        kind="change", table="public.customers", op=Op.INSERT,
        new_exact={"id": 1, "first_name": "Anne", "last_name": "Kretchmar", "email": "annek@noanswer.org"},
        old=None,
        # The docs' key is not JsonConverter output (fields named "name", type "INT32"): its
        # payload is taken as written.
        key={"id": "1"},
        source_order=(24023119, 24023128),  # source.sequence [last commit LSN, LSN]
        commit_time=1559033904.863123,  # source.ts_us
    ),
    "pg_update_default_docs.json": dict(
        kind="change", table="public.customers", op=Op.UPDATE,
        new={"id": 1, "first_name": "Anne Marie"}, old_exact={"id": 1}, key={},
        source_order=(24023128,), commit_time=1559033904.863769,
    ),
    "pg_delete_default_docs.json": dict(
        key_file="derived/pg_delete_default_docs.key.json",
        kind="change", table="public.customers", op=Op.DELETE,
        new=None, old_exact={"id": 1}, key={"id": "1"},
        source_order=(46523128,), commit_time=1559033904.863852,
    ),
    "pg_truncate.json": dict(
        key_file="derived/pg_truncate.key.json",
        kind="truncate", table="public.customers", op=Op.TRUNCATE, new=None, old=None, key={},
        source_order=(46523128,), commit_time=1559033904.863112,
    ),
    "pg_message_transactional.json": dict(
        kind="ignore", table=None, op=None, reason="logical decoding message"),
    "pg_message_nontransactional.json": dict(
        kind="ignore", table=None, op=None, reason="logical decoding message"),
    "pg_tx_begin.json": dict(
        topic="dbserver1.transaction", key_file="derived/pg_tx_begin_noschema.key.json",
        kind="ignore", table=None, op=None, reason="transaction",
    ),
    "pg_tx_end.json": dict(
        topic="dbserver1.transaction", kind="ignore", table=None, op=None, reason="transaction"),
    "pg_create_with_tx_block.json": dict(
        # `source` is elided in the docs: the table comes from the topic.
        topic="dbserver1.s1.a",
        kind="change", table="s1.a", op=Op.INSERT, new_exact={"pk": "2", "aa": "1"}, old=None, key={},
        source_order=(1580390884335,),  # no LSN: the envelope's ts_ms (a digit string here)
        commit_time=None,
    ),
    "pg_create_zonedtimestamp_docs.json": dict(
        decoders={"public.customers": {"created_at": spec("created_at", "zoned_timestamp")}},
        kind="change", table="public.customers", op=Op.INSERT,
        # nine fraction digits in the docs; Debezium writes at most six
        new={"id": 1, "created_at": At(utc(2011, 1, 11, 16, 40, 30) + 0.123456)},
        old=None, key={}, source_order=(24023119, 24023128), commit_time=1559033904.863,
    ),
    "pg_create_outbox_legacy_docs.json": dict(
        decoders={"inventory.outboxevent": {"timestamp": spec("timestamp", "milli_timestamp")}},
        kind="change", table="inventory.outboxevent", op=Op.INSERT,
        new={
            "id": "406c07f3-26f0-4eea-a50c-109940064b8f",  # uuid: a string
            "aggregateid": "1",
            "timestamp": At(1556890294.344),
        },
        old=None, key={},
        source_order=(24064704,),
        commit_time=1556890294.448870,  # the 0.x field ts_usec
    ),
    "pg_unwrap_delete_rewrite_docs.json": dict(
        fmt="debezium-flat", topic="dbserver1.public.my_table",
        kind="change", table="public.my_table", op=Op.DELETE,
        new=None, old_exact={"pk": 2, "cola": None}, key={}, source_order=(), commit_time=None,
    ),
    "pg_unwrap_add_fields_docs.json": dict(
        fmt="debezium-flat", topic="dbserver1.public.my_table",
        kind="change", table="public.MY_TABLE", op=Op.INSERT,
        new_exact={}, old=None, key={}, source_order=(123456789,), commit_time=123456.789,
    ),
    # -- derived shapes ----------------------------------------------------------------------
    "derived/pg_delete_tombstone.json": dict(kind="ignore", table=None, op=None, reason="tombstone"),
    "derived/pg_heartbeat.json": dict(
        topic="__debezium-heartbeat.dbserver1", kind="ignore", table=None, op=None, reason="heartbeat"),
    "derived/pg_heartbeat_noschema.json": dict(
        topic="__debezium-heartbeat.dbserver1", kind="ignore", table=None, op=None, reason="heartbeat"),
    # -- real captures -----------------------------------------------------------------------
    "real/pg_create_decimal_noschema.json": dict(
        decoders={"inventory.orderline": {"totalprice": spec("totalprice", "decimal", 2)}},
        kind="change", table="inventory.orderline", op=Op.INSERT,
        new={"id": 1, "item": "Debezium in Action", "quantity": 2, "totalprice": Dec("39.98")},
        old=None, key={"id": 1}, source_order=(34251136,), commit_time=1610716846.989,
    ),
    "real/pg_create_microtimestamp_noschema.json": dict(
        decoders={"inventory.purchaseorder": {"orderdate": spec("orderdate", "micro_timestamp")}},
        kind="change", table="inventory.purchaseorder", op=Op.INSERT,
        new={"id": 1, "customerid": 123, "orderdate": At(utc(2019, 1, 31, 12, 13, 1))},
        old=None, key={"id": 1}, source_order=(34250896,), commit_time=1610716846.989,
    ),
    "real/pg_create_streaming.json": dict(
        kind="change", table="inventory.customers", op=Op.INSERT,
        new_exact={"id": 1005, "first_name": "Bob", "last_name": "Marley", "email": "bob@marley.com"},
        old=None, key={}, source_order=(34442256, 34466480), commit_time=1733906311.010,
    ),
    "real/pg_message_logical_decoding.json": dict(
        kind="ignore", table=None, op=None, reason="logical decoding message"),
    "real/pg_snapshot_read.json": dict(
        kind="change", table="inventory.customers", op=Op.SNAPSHOT,
        new={"id": 1001, "email": "sally.thomas@acme.com"}, old=None, key={},
        source_order=(33816576,), commit_time=1582540780.807,
    ),
    "real/pg_update_full.json": dict(
        kind="change", table="inventory.products", op=Op.UPDATE,
        new_exact={"id": 107, "name": "1111111111", "description": "box of assorted rocks", "weight": 5.3},
        old_exact={"id": 107, "name": "rocks", "description": "box of assorted rocks", "weight": 5.3},
        key={"id": 107}, source_order=(23862872,), commit_time=1559208957.661080,
    ),
    "real/pg_update_nofull_noschema.json": dict(
        decoders={"inventory.orderline": {"totalprice": spec("totalprice", "decimal", 2)}},
        kind="change", table="inventory.orderline", op=Op.UPDATE,
        new={"id": 2, "status": "CANCELLED", "totalprice": Dec("29.99")},
        old=None,  # REPLICA IDENTITY DEFAULT: no old image
        key={"id": 2}, source_order=(34251752,), commit_time=1610716988.917,
    ),
    "real/pg_update_toast_3x.json": dict(
        decoders={"inventory.authors": {"dob": spec("dob", "micro_timestamp")}},
        kind="change", table="inventory.authors", op=Op.UPDATE,
        new={"id": 1001, "biography": UNCHANGED, "dob": At(utc(1930, 3, 1, 0, 0, 0))},
        old=None, key={"id": 1001},
        source_order=(34415840, 34415840),  # sequence [null, LSN]: the LSN stands in
        commit_time=1746440315.942179,
    ),
    "real/pg_update_toast_noschema.json": dict(
        kind="change", table="inventory.customers", op=Op.UPDATE,
        new={"id": 1004, "first_name": "Dana", "biography": UNCHANGED}, old=None, key={},
        source_order=(34650016,), commit_time=1570448151.151,
    ),
}


def _bytes_of(path: Path) -> bytes | None:
    data = path.read_bytes()
    return None if data.strip() == b"null" else data  # a file holding null means "no bytes"


def _key_file(rel: str, exp: dict[str, Any]) -> str | None:
    if "key_file" in exp:
        return exp["key_file"]
    stem = rel[: -len(".json")]
    for candidate in (f"{stem}.key.json", f"derived/{Path(stem).name}.key.json"):
        if (FIXTURES / candidate).exists():
            return candidate
    return None


def _feed(rel: str, exp: dict[str, Any], **over: Any) -> ParsedMessage:
    key_rel = _key_file(rel, exp)
    return parse_record(
        over.get("topic", exp.get("topic", DATA_TOPIC)),
        _bytes_of(FIXTURES / key_rel) if key_rel else None,
        _bytes_of(FIXTURES / rel),
        None,
        fmt=over.get("fmt", exp.get("fmt", "debezium-json")),
        decoders=exp.get("decoders"),
    )


def _check_row(got: dict | None, exact: Any, subset: Any, what: str) -> None:
    if exact is not None:
        assert got == exact, what
    elif subset is None:
        assert got is None, what
    else:
        assert got is not None, what
        for col, want in subset.items():
            assert col in got, f"{what}: column {col} missing"
            if want is UNCHANGED:
                assert got[col] is UNCHANGED, f"{what}.{col}"
            else:
                assert want == got[col], f"{what}.{col}: {got[col]!r}"


@pytest.mark.parametrize("rel", sorted(EXPECT))
def test_fixture(rel: str) -> None:
    _require_fixtures()
    exp = EXPECT[rel]
    assert (FIXTURES / rel).exists(), f"expectation for a fixture that no longer exists: {rel}"
    got = _feed(rel, exp)
    assert got.kind == exp["kind"]
    assert got.table == exp["table"]
    assert got.op == exp["op"]
    if "reason" in exp:
        assert exp["reason"] in got.reason
    if got.kind == "ignore":
        assert got.new is None and got.old is None
        return
    _check_row(got.new, exp.get("new_exact"), exp.get("new"), "new")
    _check_row(got.old, exp.get("old_exact"), exp.get("old"), "old")
    assert got.key == exp["key"]
    assert got.source_order == exp["source_order"]
    if exp["commit_time"] is None:
        assert got.commit_time is None
    else:
        assert got.commit_time == pytest.approx(exp["commit_time"], abs=1e-6)
    assert got.pk_change is None


def test_every_fixture_has_an_expectation() -> None:
    root = _require_fixtures()
    claimed = set(EXPECT)
    for rel, exp in EXPECT.items():
        k = _key_file(rel, exp)
        if k:
            claimed.add(k)
    present = {p.relative_to(root).as_posix() for p in root.rglob("*.json")}
    unexpected = sorted(present - claimed)
    assert not unexpected, f"fixture files without an expectation in tests/test_debezium.py: {unexpected}"


# ---------------------------------------------------------------------------------------------
# Fixtures under other readings
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rel", ["derived/pg_heartbeat.json", "derived/pg_heartbeat_noschema.json"])
def test_heartbeat_recognised_by_shape_on_a_renamed_topic(rel: str) -> None:
    _require_fixtures()
    got = parse_record("my-heartbeats", None, _bytes_of(FIXTURES / rel), None)
    assert (got.kind, got.reason) == ("ignore", "heartbeat")


@pytest.mark.parametrize("rel", ["pg_tx_begin.json", "pg_tx_end.json"])
def test_transaction_metadata_recognised_by_shape(rel: str) -> None:
    _require_fixtures()
    got = parse_record(DATA_TOPIC, None, _bytes_of(FIXTURES / rel), None)
    assert (got.kind, got.reason) == ("ignore", "transaction metadata")


def test_a_table_named_transaction_is_not_transaction_metadata() -> None:
    value = orjson.dumps({"op": "c", "before": None, "after": {"id": 1, "status": "BEGIN"},
                          "source": {"schema": "public", "table": "transaction", "lsn": 7}})
    got = parse_record("dbserver1.public.transaction", None, value, None)
    assert (got.kind, got.table, got.op) == ("change", "public.transaction", Op.INSERT)
    row = parse_record("dbserver1.public.transaction", None, b'{"id": "1:2", "status": "END"}', None,
                       fmt="debezium-flat")
    assert (row.kind, row.table) == ("change", "public.transaction")
    tx = parse_record("dbserver1.transaction", None,
                      b'{"id": "1:2", "status": "END", "event_count": 1, "data_collections": []}', None,
                      fmt="debezium-flat")
    assert (tx.kind, tx.reason) == ("ignore", "transaction metadata")


def test_tombstone_in_flat_format_is_a_delete_by_key() -> None:
    _require_fixtures()
    key = _bytes_of(FIXTURES / "derived/pg_delete_tombstone.key.json")
    got = parse_record("dbserver1.public.customers", key, None, None, fmt="debezium-flat")
    assert (got.kind, got.table, got.op) == ("change", "public.customers", Op.DELETE)
    assert got.new is None and got.old == {"id": "1"} and got.key == {"id": "1"}


def test_schema_decides_over_declared_decoders() -> None:
    _require_fixtures()
    decoders = {"inventory.products": {"name": spec("name", "micro_timestamp")}}
    got = parse_record(DATA_TOPIC, None, _bytes_of(FIXTURES / "real/pg_update_full.json"), None,
                       decoders=decoders)
    assert got.new["name"] == "1111111111"
    schemas = field_schemas(_bytes_of(FIXTURES / "real/pg_update_full.json"))
    assert set(schemas) == {"id", "name", "description", "weight"}
    msg = conflicts(schemas["name"], decoders["inventory.products"]["name"])
    assert msg and "micro_timestamp" in msg and "string" in msg
    assert conflicts(schemas["weight"], spec("weight", None)) is None  # type: ignore[arg-type]


def test_elided_schema_is_read_as_schemaless() -> None:
    _require_fixtures()
    value = _bytes_of(FIXTURES / "real/pg_create_streaming.json")
    assert field_schemas(value) == {}
    decoders = {"inventory.customers": {"id": spec("id", "micro_timestamp")}}
    got = parse_record(DATA_TOPIC, None, value, None, decoders=decoders)
    assert got.new["id"] == At(0.001005)


# ---------------------------------------------------------------------------------------------
# Messages built from the format rules
# ---------------------------------------------------------------------------------------------


def _field(name: str, typ: str, semantic: str | None = None, **extra: Any) -> dict[str, Any]:
    f: dict[str, Any] = {"type": typ, "optional": True, "field": name}
    if semantic:
        f["name"] = semantic
    f.update(extra)
    return f


ROW_FIELDS = [
    _field("id", "int32", optional=False),
    _field("ts_micro", "int64", "io.debezium.time.MicroTimestamp"),
    _field("ts_milli", "int64", "io.debezium.time.Timestamp"),
    _field("ts_nano", "int64", "io.debezium.time.NanoTimestamp"),
    _field("ts_zoned", "string", "io.debezium.time.ZonedTimestamp"),
    _field("day", "int32", "io.debezium.time.Date"),
    _field("t_micro", "int64", "io.debezium.time.MicroTime"),
    _field("t_milli", "int32", "io.debezium.time.Time"),
    _field("price", "bytes", "org.apache.kafka.connect.data.Decimal",
           parameters={"scale": "2", "connect.decimal.precision": "10"}),
    _field("amount", "struct", "io.debezium.data.VariableScaleDecimal",
           fields=[_field("scale", "int32"), _field("value", "bytes")]),
    _field("doc", "string", "io.debezium.data.Json"),
    _field("uid", "string", "io.debezium.data.Uuid"),
    _field("flag", "boolean"),
    _field("small", "int16"),
    _field("ratio", "double"),
    _field("blob", "bytes"),
    _field("nums", "array", items={"type": "int32", "optional": True}),
    _field("words", "array", items={"type": "string", "optional": True}),
    _field("bio", "string"),
]


def envelope(after: dict | None, before: dict | None = None, op: str = "c", *,
             fields: list[dict] | None = None, source: dict | None = None, **extra: Any) -> bytes:
    src = {"version": "2.7.0.Final", "connector": "postgresql", "name": "dbserver1", "ts_ms": 1700000000123,
           "snapshot": "false", "db": "app", "sequence": '["100","200"]',
           "schema": "public", "table": "users",
           "txId": 9, "lsn": 200, "xmin": None}
    if source is not None:
        src = source
    payload = {"before": before, "after": after, "source": src, "op": op, "ts_ms": 1700000000456, **extra}
    row = {"type": "struct", "optional": True, "name": "dbserver1.public.users.Value",
           "fields": fields if fields is not None else ROW_FIELDS}
    schema = {"type": "struct", "name": "dbserver1.public.users.Envelope", "optional": False, "fields": [
        {**row, "field": "before"}, {**row, "field": "after"},
        {"type": "struct", "name": "io.debezium.connector.postgresql.Source", "field": "source",
         "fields": []},
        {"type": "string", "optional": False, "field": "op"},
        {"type": "int64", "optional": True, "field": "ts_ms"},
    ]}
    return orjson.dumps({"schema": schema, "payload": payload})


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_schema_semantic_types() -> None:
    after = {
        "id": 7,
        "ts_micro": 1_700_000_000_123_456,
        "ts_milli": 1_700_000_000_123,
        "ts_nano": 1_700_000_000_123_456_789,
        "ts_zoned": "2023-11-14T22:13:20.123456Z",
        "day": 19675,
        "t_micro": 45_296_000_007,  # 12:34:56.000007
        "t_milli": 3_723_004,  # 01:02:03.004
        "price": b64((3998).to_bytes(2, "big", signed=True)),
        "amount": {"scale": 3, "value": b64((-12345).to_bytes(2, "big", signed=True))},
        "doc": '{"a": [1, 2]}',
        "uid": "406c07f3-26f0-4eea-a50c-109940064b8f",
        "flag": True,
        "small": -5,
        "ratio": "NaN",
        "blob": b64(b"\x00\xff"),
        "nums": [1, 2, 3],
        "words": ["a", None],
        "bio": None,
    }
    got = parse_record("dbserver1.public.users", None, envelope(after), None)
    assert (got.kind, got.table, got.op) == ("change", "public.users", Op.INSERT)
    n = got.new
    assert n["id"] == 7
    assert n["ts_micro"] == At(1_700_000_000.123456)
    assert n["ts_milli"] == At(1_700_000_000.123)
    assert n["ts_nano"] == At(1_700_000_000.123456)
    assert n["ts_zoned"] == At(1_700_000_000.123456)
    assert n["day"] == dt.date(2023, 11, 14)
    assert n["t_micro"] == "12:34:56.000007"
    assert n["t_milli"] == "01:02:03.004000"
    assert n["price"] == Dec("39.98")
    assert n["amount"] == Dec("-12.345")
    assert n["doc"] == '{"a": [1, 2]}'
    assert n["uid"] == "406c07f3-26f0-4eea-a50c-109940064b8f"
    assert n["flag"] is True and n["small"] == -5
    assert math.isnan(n["ratio"])
    assert n["blob"] == b"\x00\xff"
    assert n["nums"] == [1, 2, 3] and n["words"] == ["a", None]
    assert n["bio"] is None
    assert got.source_order == (100, 200)
    assert got.commit_time == pytest.approx(1_700_000_000.123)


def test_infinite_timestamps_and_dates_are_kept_as_words() -> None:
    after = {"id": 1, "ts_micro": 9_223_372_036_825_200_000, "day": -(10**9), "ts_zoned": "infinity"}
    n = parse_record("t.public.users", None, envelope(after), None).new
    assert (n["ts_micro"], n["day"], n["ts_zoned"]) == ("infinity", "-infinity", "infinity")


@pytest.mark.parametrize("column, value", [
    ("bio", PLACEHOLDER),  # text
    ("blob", b64(PLACEHOLDER.encode())),  # bytea
    ("price", b64(PLACEHOLDER.encode())),  # numeric as bytes
    ("words", [PLACEHOLDER]),  # text[] / json[]
    ("nums", list(PLACEHOLDER.encode())),  # int[]: the placeholder's byte values
    ("doc", PLACEHOLDER),  # jsonb
])
def test_unavailable_value_in_every_form_is_unchanged(column: str, value: Any) -> None:
    got = parse_record("t.public.users", None, envelope({"id": 1, column: value}, op="u"), None)
    assert got.new[column] is UNCHANGED
    assert got.new["id"] == 1


def test_unavailable_value_without_schema() -> None:
    value = orjson.dumps({"before": None, "op": "u",
                          "source": {"schema": "public", "table": "users", "lsn": 5},
                          "after": {"id": 1, "price": b64(PLACEHOLDER.encode()), "tags": [PLACEHOLDER],
                                    "bio": PLACEHOLDER}})
    decoders = {"public.users": {"price": spec("price", "decimal", 2)}}
    n = parse_record("t.public.users", None, value, None, decoders=decoders).new
    assert n["price"] is UNCHANGED and n["tags"] is UNCHANGED and n["bio"] is UNCHANGED


def test_decoders_without_schema() -> None:
    after = {"a": 1_700_000_000_000_000, "b": 1_700_000_000_000, "c": 1_700_000_000_000_000_000,
             "d": 19675, "e": "2023-11-14T22:13:20Z", "f": b64(b"\xf0\x62"), "g": 1_000_000, "h": 12.5,
             "i": {"scale": 1, "value": b64(b"\x05")}, "j": "raw"}
    value = orjson.dumps({"before": None, "after": after, "op": "r",
                          "source": {"schema": "public", "table": "users", "lsn": 9, "ts_ms": 1}})
    decoders = {"public.users": {
        "a": spec("a", "micro_timestamp"), "b": spec("b", "milli_timestamp"),
        "c": spec("c", "nano_timestamp"),
        "d": spec("d", "date_days"), "e": spec("e", "zoned_timestamp"), "f": spec("f", "decimal", 3),
        "g": spec("g", "micro_time"), "h": spec("h", "decimal", 2), "i": spec("i", "decimal"),
    }}
    got = parse_record("t.public.users", b'{"id": 3}', value, None, decoders=decoders)
    assert got.op is Op.SNAPSHOT and got.key == {"id": 3}
    n = got.new
    for col in "abce":
        assert n[col] == At(1_700_000_000), col
    assert n["d"] == dt.date(2023, 11, 14)
    assert n["f"] == Dec("-3.998")
    assert n["g"] == "00:00:01.000000"
    assert n["h"] == Dec("12.5")  # decimal.handling.mode=double
    assert n["i"] == Dec("0.5")  # VariableScaleDecimal needs no scale
    assert n["j"] == "raw"


def test_key_decoded_by_its_schema_and_delete_falls_back_to_it() -> None:
    key = orjson.dumps({"schema": {"type": "struct", "name": "k", "optional": False,
                                   "fields": [_field("id", "int32", optional=False)]},
                        "payload": {"id": 42}})
    got = parse_record("t.public.users", key, envelope(None, None, op="d"), None)
    assert (got.op, got.new, got.old, got.key) == (Op.DELETE, None, {"id": 42}, {"id": 42})
    with pytest.raises(PoisonMessage, match="key.id"):
        parse_record("t.public.users", key.replace(b"42", b'"x"'), envelope(None, None, op="d"), None)


def test_delete_before_with_only_the_key() -> None:
    got = parse_record("t.public.users", b'{"id": 1}', envelope(None, {"id": 1}, op="d"), None)
    assert got.old == {"id": 1} and got.new is None


def test_primary_key_change_headers() -> None:
    old_key, new_key = b'{"id": 1}', b'{"id": 2}'
    gone = parse_record("t.public.users", old_key, envelope(None, {"id": 1}, op="d"),
                        [("__debezium.newkey", new_key)])
    born = parse_record("t.public.users", new_key, envelope({"id": 2}, op="c"),
                        [("other", b"x"), ("__debezium.oldkey", old_key)])
    assert (gone.op, gone.pk_change, gone.other_key) == (Op.DELETE, "old", {"id": 2})
    assert (born.op, born.pk_change, born.other_key) == (Op.INSERT, "new", {"id": 1})
    # a header that cannot be read never poisons the record
    odd = parse_record("t.public.users", new_key, envelope({"id": 2}), [("__debezium.oldkey", b"{nope")])
    assert (odd.pk_change, odd.other_key) == ("new", None)


def test_truncate_and_logical_message_with_schema_envelope() -> None:
    t = parse_record("t.public.users", None, envelope(None, op="t"), None)
    assert (t.kind, t.op, t.table, t.source_order) == ("truncate", Op.TRUNCATE, "public.users", (100, 200))
    m = orjson.dumps({"op": "m", "source": {"schema": "", "table": "", "lsn": 1},
                      "message": {"prefix": "p", "content": "eA=="}})
    assert parse_record("t.public.users", b'{"prefix": "p"}', m, None).kind == "ignore"


def test_ordering_without_lsn_uses_source_ts() -> None:
    value = orjson.dumps({"op": "c", "before": None, "after": {"id": 1},
                          "source": {"schema": "public", "table": "users", "ts_ms": 1234}, "ts_ms": 9999})
    got = parse_record("t.public.users", None, value, None)
    assert got.source_order == (1234,) and got.commit_time == pytest.approx(1.234)


def test_empty_value_is_a_tombstone_and_unknown_format_is_an_error() -> None:
    assert parse_record("t.public.users", b'{"id":1}', b"", None).reason == "tombstone"
    assert parse_record("t.public.users", None, b'{"schema": null, "payload": null}', None).kind == "ignore"
    with pytest.raises(ValueError, match="unknown format"):
        parse_record("t.public.users", None, b"{}", None, fmt="avro")


# -- poison --------------------------------------------------------------------------------------


def _src() -> dict[str, Any]:
    return {"schema": "public", "table": "users", "lsn": 1}


POISON = [
    ("invalid JSON", None, b'{"op": "c", ', "not valid JSON"),
    ("not an object", None, b'[1, 2]', "JSON array, expected an object"),
    ("missing op", None, orjson.dumps({"before": None, "after": {"id": 1}, "source": _src()}), "no `op`"),
    ("unknown op", None, orjson.dumps({"op": "x", "after": {"id": 1}, "source": _src()}), "unknown op 'x'"),
    ("op not a string", None, orjson.dumps({"op": 1, "after": {"id": 1}, "source": _src()}), "op"),
    ("after not an object", None, orjson.dumps({"op": "c", "after": [1], "source": _src()}), "after"),
    ("create without after", None, orjson.dumps({"op": "c", "after": None, "source": _src()}),
     "without an `after`"),
    ("source not an object", None, orjson.dumps({"op": "c", "after": {}, "source": "x"}), "source"),
    ("payload not an object", None, b'{"schema": {}, "payload": 3}', "payload"),
    ("int field holds a string", None, envelope({"id": "abc"}), "public.users after.id: expected an integer"),
    ("int out of range", None, envelope({"id": 1, "small": 40000}), "int16 range"),
    ("bool field holds a number", None, envelope({"id": 1, "flag": 1}), "after.flag: expected a boolean"),
    ("timestamp holds a string", None, envelope({"id": 1, "ts_micro": "2020-01-01"}), "after.ts_micro"),
    ("zoned timestamp not ISO", None, envelope({"id": 1, "ts_zoned": "yesterday"}), "after.ts_zoned"),
    ("time out of range", None, envelope({"id": 1, "t_micro": -1}), "after.t_micro"),
    ("bad base64 decimal", None, envelope({"id": 1, "price": "D54"}),
     "after.price: expected a base64 string"),
    ("bad base64 bytes", None, envelope({"id": 1, "blob": "!!!!"}), "not valid base64"),
    ("decimal struct malformed", None, envelope({"id": 1, "amount": {"value": "AA=="}}),
     "after.amount.scale"),
    ("array holds an object", None, envelope({"id": 1, "nums": {"a": 1}}), "after.nums: expected an array"),
    ("key not JSON", b"Struct{id=1}", envelope({"id": 1}), "record key"),
    ("key a scalar", b"1", envelope({"id": 1}), "expected an object of primary-key columns"),
    ("no table anywhere", None, orjson.dumps({"op": "c", "after": {"id": 1}, "source": {}}),
     "cannot tell the table"),
]


@pytest.mark.parametrize("key, value, message", [p[1:] for p in POISON], ids=[p[0] for p in POISON])
def test_poison(key: bytes | None, value: bytes, message: str) -> None:
    topic = "t.public.users" if "cannot tell" not in message else "oops."
    with pytest.raises(PoisonMessage) as info:
        parse_record(topic, key, value, None)
    assert message in str(info.value)


def test_poison_in_schemaless_decoders() -> None:
    value = orjson.dumps({"op": "c", "before": None, "after": {"id": 1, "p": "D54", "q": "D54=", "ts": "x"},
                          "source": _src()})
    for decoders, message in [
        ({"public.users": {"p": spec("p", "decimal", 2)}}, "after.p: expected a base64 string"),
        ({"public.users": {"q": spec("q", "decimal")}}, "needs `scale`"),
        ({"public.users": {"ts": spec("ts", "micro_timestamp")}}, "after.ts: expected an integer"),
    ]:
        with pytest.raises(PoisonMessage, match=message.replace("`", ".")):
            parse_record("t.public.users", None, value, None, decoders=decoders)


def test_conflicts() -> None:
    ts = _field("created_at", "int64", "io.debezium.time.MicroTimestamp")
    assert conflicts(ts, spec("created_at", "micro_timestamp")) is None
    assert "milli_timestamp" in conflicts(ts, spec("created_at", "milli_timestamp"))
    price = _field("price", "bytes", "org.apache.kafka.connect.data.Decimal", parameters={"scale": "2"})
    assert conflicts(price, spec("price", "decimal", 2)) is None
    assert "scale 3" in conflicts(price, spec("price", "decimal", 3))
    assert "double" in conflicts(_field("price", "double"), spec("price", "decimal", 2))
    assert conflicts(_field("x", "string"), "x") is None


# ---------------------------------------------------------------------------------------------
# debezium-flat (ExtractNewRecordState)
# ---------------------------------------------------------------------------------------------


def flat(row: dict, topic: str = "dbserver1.public.users", key: bytes | None = None,
         **kw: Any) -> ParsedMessage:
    return parse_record(topic, key, orjson.dumps(row), None, fmt="debezium-flat", **kw)


def test_flat_row_with_metadata() -> None:
    got = flat({"id": 1, "email": "a@b.co", "__op": "u", "__table": "users", "__schema": "crm",
                "__lsn": 500, "__source_ts_ms": 1_700_000_000_500, "__deleted": "false"}, key=b'{"id": 1}')
    assert (got.kind, got.table, got.op) == ("change", "crm.users", Op.UPDATE)
    assert got.new == {"id": 1, "email": "a@b.co"} and got.old is None and got.key == {"id": 1}
    assert got.source_order == (500,) and got.commit_time == pytest.approx(1_700_000_000.5)


def test_flat_row_without_metadata_is_an_upsert_on_the_topic_table() -> None:
    got = flat({"id": 1, "plan": "pro", "bio": PLACEHOLDER})
    assert (got.kind, got.table, got.op) == ("change", "public.users", Op.UPDATE)
    assert got.new["plan"] == "pro" and got.new["bio"] is UNCHANGED
    assert got.source_order == () and got.commit_time is None
    assert flat({"id": 1}, topic="users").table == "public.users"


def test_flat_snapshot_and_insert_ops() -> None:
    assert flat({"id": 1, "__op": "r"}).op is Op.SNAPSHOT
    assert flat({"id": 1, "__op": "c"}).op is Op.INSERT


def test_flat_rewritten_delete() -> None:
    got = flat({"id": 9, "email": None, "__op": "d", "__deleted": "true"}, key=b'{"id": 9}')
    assert (got.op, got.new, got.old) == (Op.DELETE, None, {"id": 9, "email": None})
    got = flat({"id": 9, "__deleted": True})
    assert got.op is Op.DELETE and got.old == {"id": 9}


def test_flat_tombstones() -> None:
    got = parse_record("dbserver1.public.users", b'{"id": 4}', None, None, fmt="debezium-flat")
    assert (got.kind, got.op, got.table, got.old, got.key) == ("change", Op.DELETE, "public.users",
                                                               {"id": 4}, {"id": 4})
    got = parse_record("dbserver1.public.users", None, None, None, fmt="debezium-flat")
    assert (got.kind, got.reason) == ("ignore", "tombstone")


def test_flat_with_schema_envelope_and_decoders() -> None:
    schema = {"type": "struct", "name": "dbserver1.public.users.Value", "fields": [
        _field("id", "int32"), _field("seen", "int64", "io.debezium.time.MicroTimestamp"),
        _field("__op", "string"),
    ]}
    value = orjson.dumps({"schema": schema, "payload": {"id": 1, "seen": 1_700_000_000_000_000, "__op": "c"}})
    got = parse_record("dbserver1.public.users", None, value, None, fmt="debezium-flat")
    assert got.op is Op.INSERT and got.new == {"id": 1, "seen": At(1_700_000_000)}
    assert set(field_schemas(value, "debezium-flat")) == {"id", "seen"}
    decoders = {"public.users": {"seen": spec("seen", "milli_timestamp")}}
    got = flat({"id": 1, "seen": 1_700_000_000_000}, decoders=decoders)
    assert got.new["seen"] == At(1_700_000_000)


def test_flat_passes_through_unflattened_records_and_ignores_noise() -> None:
    t = flat({"op": "t", "source": {"schema": "public", "table": "users", "lsn": 3}, "ts_ms": 1})
    assert (t.kind, t.table) == ("truncate", "public.users")
    m = flat({"op": "m", "source": {"lsn": 3}, "message": {"prefix": "x", "content": ""}})
    assert m.kind == "ignore"
    assert flat({"ts_ms": 1}, topic="__debezium-heartbeat.dbserver1").kind == "ignore"
    assert flat({"status": "END", "id": "1:2", "event_count": 1, "data_collections": []}).reason == \
        "transaction metadata"
    # a row that happens to have status and id columns is a row
    assert flat({"status": "BEGIN", "id": 3}).kind == "change"


@pytest.mark.parametrize("row, message", [
    ({"id": 1, "__op": "z"}, "__op"),
    ({"id": 1, "__deleted": "yes"}, "__deleted"),
    ({"id": 1, "__table": 5}, "__table"),
])
def test_flat_poison(row: dict, message: str) -> None:
    with pytest.raises(PoisonMessage, match=message):
        flat(row)


def test_flat_poison_not_json() -> None:
    with pytest.raises(PoisonMessage, match="not valid JSON"):
        parse_record("a.b.c", None, b"\xff", None, fmt="debezium-flat")


# ---------------------------------------------------------------------------------------------
# Decimal decoding, round trips
# ---------------------------------------------------------------------------------------------


def _twos_complement_b64(unscaled: int, pad: int = 0) -> str:
    """Independent encoder: minimal big-endian two's complement, optionally sign-extended."""
    size = 1
    while not -(1 << (8 * size - 1)) <= unscaled < (1 << (8 * size - 1)):
        size += 1
    return base64.b64encode(unscaled.to_bytes(size + pad, "big", signed=True)).decode()


@settings(max_examples=300, deadline=None)
@given(unscaled=st.integers(min_value=-(10**60), max_value=10**60) | st.integers(-300, 300),
       scale=st.integers(min_value=-5, max_value=40), pad=st.integers(0, 3))
def test_decimal_round_trip(unscaled: int, scale: int, pad: int) -> None:
    text = _twos_complement_b64(unscaled, pad)
    got = decode_decimal(text, scale)
    assert got.as_tuple().exponent == -scale
    assert int(got.scaleb(scale, decimal.Context(prec=200))) == unscaled
    # the same through a schema and through a mapping decoder
    schema = {"type": "bytes", "name": "org.apache.kafka.connect.data.Decimal",
              "parameters": {"scale": str(scale)}}
    assert decode_value(text, schema, "x") == got
    assert decode_with_spec(text, spec("x", "decimal", scale), "x") == got
    assert decode_value({"scale": scale, "value": text}, {"type": "struct", "name":
                        "io.debezium.data.VariableScaleDecimal"}, "x") == got
    # and the module's own encoder is the inverse
    assert decode_decimal(encode_decimal(unscaled, scale), scale) == got
    assert decode_decimal(encode_decimal(got, scale), scale) == got


def test_decimal_known_values() -> None:
    assert decode_decimal("D54=", 2) == Dec("39.98")
    assert decode_decimal("C7c=", 2) == Dec("29.99")
    assert decode_decimal("/w==", 0) == Dec("-1")
    assert decode_decimal("AA==", 3) == Dec("0.000")
    assert decode_decimal("", 0) == Dec("0")
    with pytest.raises(ValueError):
        encode_decimal(decimal.Decimal("1.234"), 2)


# -- the usual record's fast path (msgspec) agrees with the general parser ---------------------

_USUAL_SOURCE = {"version": "2.5.0.Final", "connector": "postgresql", "name": "dbserver1", "ts_ms": 1714558272601,
                 "snapshot": "false", "db": "app", "sequence": '["40072000","40072120"]', "schema": "public",
                 "table": "users", "txId": 1001, "lsn": 40072120, "xmin": None}
_ROW = {"id": 38, "plan": "pro", "created_at": 1714558272123494, "bio": PLACEHOLDER, "tags": [PLACEHOLDER],
        "score": "1.00"}


@pytest.mark.parametrize(("name", "envelope"), [
    ("update", {"op": "u", "before": _ROW, "after": {**_ROW, "plan": "free"}, "source": _USUAL_SOURCE, "ts_ms": 9}),
    ("insert", {"op": "c", "before": None, "after": _ROW, "source": _USUAL_SOURCE}),
    ("snapshot read", {"op": "r", "after": _ROW, "source": {**_USUAL_SOURCE, "sequence": None}}),
    ("delete with before", {"op": "d", "before": {"plan": "pro"}, "after": None, "source": _USUAL_SOURCE}),
    ("delete without before", {"op": "d", "before": None, "after": None, "source": _USUAL_SOURCE}),
    ("source.ts_ms null", {"op": "c", "after": _ROW, "source": {**_USUAL_SOURCE, "ts_ms": None}, "ts_ms": 5}),
    ("source.ts_ms absent", {"op": "c", "after": _ROW, "source": {"schema": "s", "table": "t"}, "ts_ms": 5}),
    ("ts_us and ts_ns", {"op": "c", "after": _ROW, "source": {**_USUAL_SOURCE, "ts_us": 17, "ts_ns": 17000}}),
])
def test_the_usual_record_parses_as_the_general_parser_reads_it(name: str, envelope: dict[str, Any]) -> None:
    from bridge.sources import debezium

    value, key = orjson.dumps(envelope), orjson.dumps({"id": 38})
    decoders = {"public.users": {"created_at": spec("created_at", "micro_timestamp")}}
    fast = debezium._parse_usual("dbserver1.public.users", key, value, decoders, None, None, {})
    assert fast is not None, name
    general = debezium._parse_envelope("dbserver1.public.users", key, None, orjson.loads(value), decoders,
                                       None, None)
    assert fast == general
    assert parse_record("dbserver1.public.users", key, value, None, decoders=decoders) == general


@pytest.mark.parametrize("value", [
    b'{"op": "t", "source": {"schema": "public", "table": "users"}}',
    b'{"op": "u", "after": null, "source": {"schema": "public", "table": "users"}}',
    b'{"op": "u", "after": {"id": 1}, "source": {"schema": "public", "table": "users", "lsn": "12"}}',
    b'{"op": "u", "after": {"id": 1}, "source": {"schema": 7, "table": "users"}}',
    b'{"op": "u", "after": [1], "source": {"schema": "public", "table": "users"}}',
    b'{"schema": null, "payload": {"op": "c", "after": {"id": 1}, "source": {"schema": "p", "table": "u"}}}',
    b'{"op": "c", "after": {"id": 1}}',
    b"not json",
])
def test_anything_else_is_left_to_the_general_parser(value: bytes) -> None:
    from bridge.sources import debezium

    assert debezium._parse_usual("dbserver1.public.users", None, value, None, None, None, None) is None


@pytest.mark.parametrize("depth", [1_000, 5_000])
def test_a_deeply_nested_value_is_read_or_poison_never_an_error_that_ends_the_source(depth: int) -> None:
    """The Kafka source dead-letters a `PoisonMessage` and goes on; any other exception ends it,
    and the restart reads the same record again. msgspec gives up on deep nesting sooner than
    the general parser (orjson reads 1,000 levels, refuses 5,000)."""
    nested = b"[" * depth + b"]" * depth
    value = (b'{"before": null, "after": {"id": 7, "v": ' + nested +
             b'}, "op": "c", "source": {"schema": "public", "table": "users", "lsn": 1}}')
    if depth <= 1_000:
        parsed = parse_record("dbserver1.public.users", b'{"id": 7}', value, None)
        assert parsed.kind == "change" and parsed.new is not None and parsed.new["id"] == 7
    else:
        with pytest.raises(PoisonMessage, match="depth limit"):
            parse_record("dbserver1.public.users", b'{"id": 7}', value, None)
