"""The parts of a Debezium record around its row values (pure, no I/O): the outcome of parsing one
record (:class:`ParsedMessage`), JSON and JsonConverter's ``{"schema", "payload"}`` wrapper, rows,
record keys and the primary-key-change headers, and the source metadata (order, commit time,
table). :mod:`bridge.sources.debezium` parses records with them; column values are
:mod:`bridge.sources.debezium_values`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from bridge.config import ColumnSpec
from bridge.events import UNCHANGED, Op
from bridge.sources.debezium_values import (
    _PLACEHOLDER_B64,
    PLACEHOLDER,
    PoisonMessage,
    _bad,
    _fields_of,
    _jtype,
    decode_value,
    decode_with_spec,
    is_placeholder,
)

NEWKEY_HEADER = "__debezium.newkey"
OLDKEY_HEADER = "__debezium.oldkey"


@dataclass(frozen=True, slots=True)
class ParsedMessage:
    """The outcome for one Kafka record.

    ``kind``: ``"change"`` (a row change: ``op`` is INSERT, UPDATE, DELETE or SNAPSHOT),
    ``"truncate"`` (``op`` TRUNCATE) or ``"ignore"`` (tombstone, heartbeat, transaction metadata,
    logical decoding message; ``reason`` says which).

    ``pk_change`` marks the two halves of a primary-key update: ``"old"`` on the delete that
    retires the old key (it carries the ``__debezium.newkey`` header), ``"new"`` on the create
    under the new key (it carries ``__debezium.oldkey``); ``other_key`` is the key named by that
    header (the new key on the delete, the old key on the create) when it could be read.
    """

    kind: str
    table: str | None
    op: Op | None
    new: dict[str, Any] | None
    old: dict[str, Any] | None
    key: dict[str, Any]
    source_order: tuple[Any, ...]
    commit_time: float | None
    reason: str = ""
    pk_change: str | None = None
    other_key: dict[str, Any] | None = None


(_p_kind, _p_table, _p_op, _p_new, _p_old, _p_key, _p_order, _p_commit, _p_reason, _p_pk_change,
 _p_other_key) = (ParsedMessage.__dict__[f].__set__ for f in (
    "kind", "table", "op", "new", "old", "key", "source_order", "commit_time", "reason", "pk_change", "other_key"))


def _parsed(kind: str, table: str | None, op: Op | None, new: dict[str, Any] | None, old: dict[str, Any] | None,
            key: dict[str, Any], source_order: tuple[Any, ...], commit_time: float | None, reason: str = "",
            pk_change: str | None = None, other_key: dict[str, Any] | None = None) -> ParsedMessage:
    """`ParsedMessage(...)` built through its slots (one per record: a frozen dataclass's
    `__init__` costs more than the rest of building it)."""
    m = object.__new__(ParsedMessage)
    _p_kind(m, kind)
    _p_table(m, table)
    _p_op(m, op)
    _p_new(m, new)
    _p_old(m, old)
    _p_key(m, key)
    _p_order(m, source_order)
    _p_commit(m, commit_time)
    _p_reason(m, reason)
    _p_pk_change(m, pk_change)
    _p_other_key(m, other_key)
    return m


def _ignore(reason: str) -> ParsedMessage:
    return ParsedMessage("ignore", None, None, None, None, {}, (), None, reason)


# ---------------------------------------------------------------------------------------------
# Envelopes, keys, metadata
# ---------------------------------------------------------------------------------------------


def _load(data: bytes | str, what: str) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise PoisonMessage(f"{what} is not valid JSON: {exc}") from None


def _unwrap(obj: dict[str, Any], what: str) -> tuple[Mapping[str, Any] | None, Any, bool]:
    """(schema, payload, enveloped) of a JsonConverter value or key."""
    if len(obj) == 2 and "schema" in obj and "payload" in obj and (
        obj["schema"] is None or type(obj["schema"]) is dict
    ):
        payload = obj["payload"]
        if payload is not None and type(payload) is not dict:
            raise PoisonMessage(
                f"{what}: the envelope's payload is a JSON {_jtype(payload)}, expected an object")
        return obj["schema"], payload, True
    return None, obj, False


def _decode_row(row: Any, schema_fields: Mapping[str, Mapping[str, Any]] | None,
                specs: Mapping[str, ColumnSpec] | None, where: str) -> dict[str, Any]:
    """A row's values decoded. With field schemas, a new dict; without, `row` itself (a dict fresh
    from orjson that nothing else holds) with its placeholders and declared decodes replaced: most
    of its values stay as they came, and copying them would cost more than reading them."""
    if type(row) is not dict:
        raise _bad(where, "an object (a row)", row)
    if schema_fields:
        out: dict[str, Any] = {}
        for col, v in row.items():
            fs = schema_fields.get(col)
            if fs is not None:
                out[col] = decode_value(v, fs, f"{where}.{col}")
            else:
                out[col] = UNCHANGED if is_placeholder(v) else v
        return out
    for col, v in row.items():  # replacing values in place (no key added or removed)
        kind = type(v)
        if kind is str:
            if v == PLACEHOLDER or v == _PLACEHOLDER_B64:
                row[col] = UNCHANGED
        elif kind is list and is_placeholder(v):
            row[col] = UNCHANGED
    if specs:
        for col, spec in specs.items():
            v = row.get(col)
            if v is not None and v is not UNCHANGED and spec.decode is not None:
                row[col] = decode_with_spec(v, spec, f"{where}.{col}")
    return row


def _parse_key(key: bytes | str | None, table: str | None,
               decoders: Mapping[str, Mapping[str, ColumnSpec]] | None,
               cache: dict[Any, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The record key's columns. With `cache`, keys are memoised by (table, raw key): the same
    dict comes back for the same key (callers only read it)."""
    if key is None or len(key) == 0:
        return {}
    if cache is not None:
        hit = cache.get((table, key))
        if hit is not None:
            return hit
    where = f"{table} key" if table else "key"
    obj = _load(key, f"{where} (the record key)")
    if obj is None:
        return {}
    if type(obj) is not dict:
        raise PoisonMessage(f"{where}: the record key is a JSON {_jtype(obj)}, expected an object of "
                            f"primary-key columns (key.converter should be JsonConverter)")
    schema, payload, _ = _unwrap(obj, where)
    if payload is None:
        return {}
    fields = _fields_of(schema)
    if fields and all(k in fields for k in payload):
        out = _decode_row(payload, fields, None, where)
    else:  # No schema, or one that is not a Connect struct (the docs' key example): raw values.
        out = _decode_row(payload, None, decoders.get(table) if decoders and table else None, where)
    if cache is not None:
        if len(cache) >= 8192:
            cache.clear()
        cache[(table, key)] = out
    return out


def _lenient_key(raw: Any) -> dict[str, Any] | None:
    """A key named by a header, read without failing: a bad header never poisons the record."""
    if raw is None:
        return None
    try:
        obj = orjson.loads(raw)
        if isinstance(obj, dict):
            _, payload, _ = _unwrap(obj, "header")
            if isinstance(payload, dict):
                return payload
    except (orjson.JSONDecodeError, PoisonMessage, TypeError):
        pass
    return None


def _pk_change(headers: list[tuple[str, bytes]] | None) -> tuple[str | None, dict[str, Any] | None]:
    if not headers:
        return None, None
    for name, raw in headers:
        if name == NEWKEY_HEADER:
            return "old", _lenient_key(raw)
        if name == OLDKEY_HEADER:
            return "new", _lenient_key(raw)
    return None, None


def _meta_int(value: Any) -> int | None:
    """Metadata integers (lsn, ts_ms...): numbers, or digit strings as in some docs examples."""
    kind = type(value)
    if kind is int:
        return value  # type: ignore[no-any-return]
    if kind is bool:
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        if text.isdecimal() or (text[:1] == "-" and text[1:].isdecimal()):
            return int(text)
    return None


def _sequence(value: Any) -> tuple[int | None, int | None] | None:
    """``source.sequence``: a string holding ``["<last commit lsn>"|null, "<lsn>"]``."""
    if type(value) is str and value[:2] == '["' and value[-2:] == '"]':  # the usual form: no JSON parse
        first, sep, second = value[2:-2].partition('","')
        if sep and first.isdecimal() and second.isdecimal():
            return int(first), int(second)
    if isinstance(value, str):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError:
            return None
    if not isinstance(value, list) or len(value) != 2:
        return None
    return _meta_int(value[0]), _meta_int(value[1])


def _order(lsn: Any, sequence: Any, ts_ms: Any) -> tuple[Any, ...]:
    n = lsn if type(lsn) is int else _meta_int(lsn)
    seq = None if sequence is None else _sequence(sequence)
    if seq is not None:
        commit, current = seq
        n = n if n is not None else current
        if n is not None:
            return (commit if commit is not None else n, n)
    if n is not None:
        return (n,)
    ts = _meta_int(ts_ms)
    return (ts,) if ts is not None else ()


def _commit_time(ts_us: Any, ts_ns: Any, ts_ms: Any, ts_usec: Any = None) -> float | None:
    """The first of these that is an integer, in seconds."""
    if ts_us is not None and (n := _meta_int(ts_us)) is not None:
        return n / 1e6
    if ts_ns is not None and (n := _meta_int(ts_ns)) is not None:
        return n / 1e9
    if ts_ms is not None and (n := _meta_int(ts_ms)) is not None:
        return n / 1e3
    if ts_usec is not None and (n := _meta_int(ts_usec)) is not None:
        return n / 1e6
    return None


def _topic_table(topic: str, where: str) -> str:
    parts = topic.split(".")
    if len(parts) >= 2 and parts[-1] and parts[-2]:
        return f"{parts[-2]}.{parts[-1]}"
    if len(parts) == 1 and parts[0]:
        return f"public.{parts[0]}"
    raise PoisonMessage(f"{where}: cannot tell the table: no source.schema/source.table and topic "
                        f"{topic!r} is not <prefix>.<schema>.<table>")


def _is_tx_metadata(obj: Mapping[str, Any]) -> bool:
    """A transaction metadata event (BEGIN/END on the ``<prefix>.transaction`` topic)."""
    return obj.get("status") in ("BEGIN", "END") and "id" in obj and "op" not in obj
