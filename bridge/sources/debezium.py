"""Debezium (PostgreSQL connector) change events -> parsed row changes (pure, no I/O).

One Kafka record goes in (topic, key bytes, value bytes, headers); one :class:`ParsedMessage`
comes out, or :class:`PoisonMessage` is raised naming what is wrong, so the caller can
dead-letter the record and go on.

Formats (``source.format`` of the kafka source):

``debezium-json``
    The connector's envelope (``before``/``after``/``source``/``op``), serialized by
    JsonConverter with or without the ``{"schema": ..., "payload": ...}`` wrapper, detected per
    message. Ops: ``c`` insert, ``u`` update, ``d`` delete, ``r`` snapshot read, ``t`` truncate,
    ``m`` logical decoding message (ignored). Tombstones, heartbeats and transaction metadata are
    ignored.
``debezium-flat``
    ``ExtractNewRecordState`` output: the row itself, plus metadata fields added with the ``__``
    prefix (``__op``, ``__table``, ``__lsn``, ``__source_ts_ms``, ``__deleted``...). A null value
    with a key is a delete (``delete.handling.mode=none``). Records the SMT passed through
    unchanged (a full envelope) are parsed as ``debezium-json``.

Values
    With a schema, each column is decoded by its field schema (semantic ``name`` first, then
    ``type``): ``MicroTimestamp``/``Timestamp``/``NanoTimestamp`` and Connect ``Timestamp`` ->
    aware UTC ``datetime``; ``ZonedTimestamp`` -> aware UTC ``datetime``; ``Date`` -> ``date``;
    ``MicroTime``/``Time``/``NanoTime`` -> ``"HH:MM:SS.ffffff"``; Connect ``Decimal`` and
    ``VariableScaleDecimal`` -> exact ``decimal.Decimal``; ``bytes`` -> ``bytes``; ``Json``,
    ``Uuid`` and other strings stay strings. Timestamps and dates Python cannot hold
    (Postgres ``infinity``) become the strings ``"infinity"``/``"-infinity"``.
    Without a schema, values stay raw JSON unless ``decoders[table][column]`` names a decode
    (``micro_timestamp``, ``milli_timestamp``, ``nano_timestamp``, ``date_days``,
    ``zoned_timestamp``, ``decimal`` + ``scale``, ``micro_time``). With a schema the schema
    decides; :func:`conflicts` reports a declared decode the schema contradicts (for ``check``).
    The unchanged-TOAST placeholder ``__debezium_unavailable_value`` (as a string, as
    ``[placeholder]``, as a list of its byte values, or base64 of its bytes) becomes
    :data:`bridge.events.UNCHANGED`.

Order
    ``source_order`` is ``(last_commit_lsn, lsn)`` when ``source.sequence`` is present (it
    orders events of interleaved transactions the way they were committed, which the bare LSN
    does not; a null first element is replaced by the event's LSN), ``(lsn,)`` when only
    ``source.lsn`` is present, else ``(ts_ms,)``, else ``()``.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import decimal
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from bridge.config import ColumnSpec
from bridge.events import UNCHANGED, Op
from bridge.sources.pgtypes import Unrepresentable

__all__ = [
    "FORMATS",
    "PLACEHOLDER",
    "ParsedMessage",
    "PoisonMessage",
    "conflicts",
    "decode_decimal",
    "encode_decimal",
    "field_schemas",
    "parse_record",
]

FORMATS = ("debezium-json", "debezium-flat")
PLACEHOLDER = "__debezium_unavailable_value"
_PLACEHOLDER_BYTES = PLACEHOLDER.encode()
_PLACEHOLDER_B64 = base64.b64encode(_PLACEHOLDER_BYTES).decode()
_PLACEHOLDER_BYTE_LIST = list(_PLACEHOLDER_BYTES)
_PLACEHOLDER_STR_LIST = [PLACEHOLDER]

NEWKEY_HEADER = "__debezium.newkey"
OLDKEY_HEADER = "__debezium.oldkey"

_OPS = {"c": Op.INSERT, "u": Op.UPDATE, "d": Op.DELETE, "r": Op.SNAPSHOT}
_ALL_OPS = frozenset(("c", "u", "d", "r", "t", "m"))
_TX_FIELDS = frozenset(("status", "id", "ts_ms", "event_count", "data_collections"))
_HEARTBEAT_SCHEMA = "io.debezium.connector.common.Heartbeat"
_DECIMAL = "org.apache.kafka.connect.data.Decimal"

_UTC = dt.UTC
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=_UTC)
_EPOCH_ORDINAL = dt.date(1970, 1, 1).toordinal()


class PoisonMessage(ValueError):
    """A record that can never be parsed; the message names what is wrong and where."""


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


def _ignore(reason: str) -> ParsedMessage:
    return ParsedMessage("ignore", None, None, None, None, {}, (), None, reason)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _jtype(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _bad(where: str, expected: str, value: Any, why: str = "") -> PoisonMessage:
    tail = f" ({why})" if why else ""
    return PoisonMessage(f"{where}: expected {expected}, got {_jtype(value)} {_short(value)}{tail}")


def is_placeholder(value: Any) -> bool:
    """True for every form Debezium uses for an unchanged TOAST value."""
    if isinstance(value, str):
        return value == PLACEHOLDER or value == _PLACEHOLDER_B64
    if isinstance(value, list) and value:
        return value == _PLACEHOLDER_STR_LIST or value == _PLACEHOLDER_BYTE_LIST
    return False


# ---------------------------------------------------------------------------------------------
# Value decoders: (value, field schema, where) -> Python value; value is never None here.
# ---------------------------------------------------------------------------------------------


def _int(value: Any, where: str, what: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise _bad(where, f"an integer ({what})", value)


def _from_micros(us: int) -> dt.datetime | str:
    try:
        return _EPOCH + dt.timedelta(microseconds=us)
    except OverflowError:
        return Unrepresentable("infinity" if us > 0 else "-infinity")


def _micro_timestamp(value: Any, schema: Mapping[str, Any], where: str) -> Any:
    return _from_micros(_int(value, where, "microseconds since the epoch, io.debezium.time.MicroTimestamp"))


def _milli_timestamp(value: Any, schema: Mapping[str, Any], where: str) -> Any:
    ms = _int(value, where, f"milliseconds since the epoch, {schema.get('name') or 'Timestamp'}")
    return _from_micros(ms * 1000)


def _nano_timestamp(value: Any, schema: Mapping[str, Any], where: str) -> Any:
    ns = _int(value, where, "nanoseconds since the epoch, io.debezium.time.NanoTimestamp")
    return _from_micros(ns // 1000)


_FRACTION = re.compile(r"(\.\d{6})\d+")


def _zoned_timestamp(value: Any, schema: Mapping[str, Any], where: str) -> Any:
    if not isinstance(value, str):
        raise _bad(where, "an ISO-8601 string (io.debezium.time.ZonedTimestamp)", value)
    if value in ("infinity", "-infinity"):
        return Unrepresentable(value)
    text = _FRACTION.sub(r"\1", value.strip(), count=1)
    try:
        parsed = dt.datetime.fromisoformat(text)
    except ValueError:
        raise _bad(where, "an ISO-8601 timestamp (io.debezium.time.ZonedTimestamp)", value) from None
    if parsed.tzinfo is None:  # Debezium always writes an offset (Z); read a bare one as UTC
        return parsed.replace(tzinfo=_UTC)
    return parsed.astimezone(_UTC)


def _date_days(value: Any, schema: Mapping[str, Any], where: str) -> Any:
    days = _int(value, where, f"days since the epoch, {schema.get('name') or 'Date'}")
    try:
        return dt.date.fromordinal(_EPOCH_ORDINAL + days)
    except (ValueError, OverflowError):
        return Unrepresentable("infinity" if days > 0 else "-infinity")


def _time_of_day(micros: int, value: Any, where: str) -> str:
    if not 0 <= micros <= 86_400_000_000:  # Postgres allows 24:00:00
        raise _bad(where, "a time of day (0 to 24 hours)", value)
    secs, us = divmod(micros, 1_000_000)
    mins, s = divmod(secs, 60)
    h, m = divmod(mins, 60)
    return f"{h:02d}:{m:02d}:{s:02d}.{us:06d}"


def _micro_time(value: Any, schema: Mapping[str, Any], where: str) -> str:
    return _time_of_day(_int(value, where, "microseconds since midnight, io.debezium.time.MicroTime"),
                        value, where)


def _milli_time(value: Any, schema: Mapping[str, Any], where: str) -> str:
    ms = _int(value, where, f"milliseconds since midnight, {schema.get('name') or 'Time'}")
    return _time_of_day(ms * 1000, value, where)


def _nano_time(value: Any, schema: Mapping[str, Any], where: str) -> str:
    ns = _int(value, where, "nanoseconds since midnight, io.debezium.time.NanoTime")
    return _time_of_day(ns // 1000, value, where)


def _b64(value: Any, where: str, what: str) -> bytes:
    if not isinstance(value, str):
        raise _bad(where, f"a base64 string ({what})", value)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _bad(where, f"a base64 string ({what})", value, f"not valid base64: {exc}") from None


def encode_decimal(value: decimal.Decimal | int, scale: int) -> str:
    """The base64 form Debezium uses for ``value`` at ``scale`` (the inverse of decode_decimal).

    An ``int`` is taken as the unscaled integer; a Decimal must be exact at ``scale``.
    """
    if isinstance(value, int):
        unscaled = value
    else:
        prec = max(28, len(value.as_tuple().digits) + abs(scale) + 2)
        shifted = value.scaleb(scale, decimal.Context(prec=prec))
        if shifted != shifted.to_integral_value():
            raise ValueError(f"{value} has more than {scale} decimal places")
        unscaled = int(shifted)
    size = max(1, (unscaled.bit_length() + 8) // 8)
    return base64.b64encode(unscaled.to_bytes(size, "big", signed=True)).decode()


def decode_decimal(b64: str, scale: int, where: str = "decimal") -> decimal.Decimal:
    """Base64 of a big-endian two's-complement unscaled integer -> exact Decimal at ``scale``."""
    raw = _b64(b64, where, "decimal bytes")
    return _scaled(int.from_bytes(raw, "big", signed=True), scale)


def _scaled(unscaled: int, scale: int) -> decimal.Decimal:
    sign = 1 if unscaled < 0 else 0
    return decimal.Decimal((sign, tuple(int(d) for d in str(abs(unscaled))), -scale))


def _scale_of(schema: Mapping[str, Any], where: str) -> int:
    params = schema.get("parameters")
    raw = params.get("scale") if isinstance(params, Mapping) else None
    try:
        if raw is None:
            raise TypeError("no scale")
        return int(raw)  # Connect writes parameters as strings: {"scale": "2"}
    except (TypeError, ValueError):
        raise PoisonMessage(
            f"{where}: the schema's org.apache.kafka.connect.data.Decimal has no usable parameters.scale "
            f"({_short(raw)})"
        ) from None


def _decimal(value: Any, schema: Mapping[str, Any], where: str) -> Any:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return decimal.Decimal(str(value))  # JsonConverter decimal.format=NUMERIC
    if not isinstance(value, str):
        raise _bad(where, "a base64 string (org.apache.kafka.connect.data.Decimal)", value)
    return decode_decimal(value, _scale_of(schema, where), where)


def _variable_decimal(value: Any, schema: Mapping[str, Any], where: str) -> Any:
    if not isinstance(value, dict) or "value" not in value:
        raise _bad(where, "an object {scale, value} (io.debezium.data.VariableScaleDecimal)", value)
    scale = value.get("scale")
    if not isinstance(scale, int) or isinstance(scale, bool):
        raise _bad(f"{where}.scale", "an integer (io.debezium.data.VariableScaleDecimal)", scale)
    if value["value"] is None:
        return None
    return decode_decimal(value["value"], scale, f"{where}.value")


_SEMANTIC: dict[str, Callable[[Any, Mapping[str, Any], str], Any]] = {
    "io.debezium.time.MicroTimestamp": _micro_timestamp,
    "io.debezium.time.Timestamp": _milli_timestamp,
    "org.apache.kafka.connect.data.Timestamp": _milli_timestamp,
    "io.debezium.time.NanoTimestamp": _nano_timestamp,
    "io.debezium.time.ZonedTimestamp": _zoned_timestamp,
    "io.debezium.time.Date": _date_days,
    "org.apache.kafka.connect.data.Date": _date_days,
    "io.debezium.time.MicroTime": _micro_time,
    "io.debezium.time.Time": _milli_time,
    "org.apache.kafka.connect.data.Time": _milli_time,
    "io.debezium.time.NanoTime": _nano_time,
    "org.apache.kafka.connect.data.Decimal": _decimal,
    "io.debezium.data.VariableScaleDecimal": _variable_decimal,
}

_INT_BITS = {"int8": 8, "int16": 16, "int32": 32, "int64": 64}
_FLOAT_WORDS = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}


def decode_value(value: Any, schema: Mapping[str, Any], where: str) -> Any:
    """Decode one JSON value by its Connect field schema."""
    if value is None:
        return None
    if is_placeholder(value):
        return UNCHANGED
    name = schema.get("name")
    if isinstance(name, str):
        semantic = _SEMANTIC.get(name)
        if semantic is not None:
            return semantic(value, schema, where)
    typ = str(schema.get("type") or "").lower()
    bits = _INT_BITS.get(typ)
    if bits is not None:
        n = _int(value, where, typ)
        if not -(1 << (bits - 1)) <= n < (1 << (bits - 1)):
            raise _bad(where, f"an integer in the {typ} range", value)
        return n
    if typ in ("float", "double", "float32", "float64"):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and value in _FLOAT_WORDS:  # Jackson quotes NaN and infinities
            return _FLOAT_WORDS[value]
        raise _bad(where, f"a number ({typ})", value)
    if typ == "boolean":
        if isinstance(value, bool):
            return value
        raise _bad(where, "a boolean", value)
    if typ == "string":
        if isinstance(value, str):
            return value
        raise _bad(where, f"a string{f' ({name})' if name else ''}", value)
    if typ == "bytes":
        return _b64(value, where, name or "bytes")
    if typ == "array":
        if not isinstance(value, list):
            raise _bad(where, "an array", value)
        items = schema.get("items")
        if not isinstance(items, Mapping):
            return value
        return [decode_value(v, items, f"{where}[{i}]") for i, v in enumerate(value)]
    if typ == "struct":
        if not isinstance(value, dict):
            raise _bad(where, f"an object{f' ({name})' if name else ''}", value)
        fields = _fields_of(schema)
        return {k: decode_value(v, fields[k], f"{where}.{k}") if k in fields else v for k, v in value.items()}
    if typ == "map":
        vschema = schema.get("values")
        if isinstance(value, dict):
            if not isinstance(vschema, Mapping):
                return value
            return {k: decode_value(v, vschema, f"{where}[{k!r}]") for k, v in value.items()}
        if isinstance(value, list):  # JsonConverter writes maps with non-string keys as [k, v] pairs
            return value
        raise _bad(where, "an object (map)", value)
    return value  # a type we do not know: keep the JSON value


_DECODE_SEMANTIC = {
    "micro_timestamp": "io.debezium.time.MicroTimestamp",
    "milli_timestamp": "io.debezium.time.Timestamp",
    "nano_timestamp": "io.debezium.time.NanoTimestamp",
    "date_days": "io.debezium.time.Date",
    "zoned_timestamp": "io.debezium.time.ZonedTimestamp",
    "micro_time": "io.debezium.time.MicroTime",
    "decimal": "org.apache.kafka.connect.data.Decimal",
}
# Schema names each declared decode agrees with.
_COMPATIBLE = {
    "micro_timestamp": {"io.debezium.time.MicroTimestamp"},
    "milli_timestamp": {"io.debezium.time.Timestamp", "org.apache.kafka.connect.data.Timestamp"},
    "nano_timestamp": {"io.debezium.time.NanoTimestamp"},
    "date_days": {"io.debezium.time.Date", "org.apache.kafka.connect.data.Date"},
    "zoned_timestamp": {"io.debezium.time.ZonedTimestamp"},
    "micro_time": {"io.debezium.time.MicroTime"},
    "decimal": {"org.apache.kafka.connect.data.Decimal", "io.debezium.data.VariableScaleDecimal"},
}


def decode_with_spec(value: Any, spec: ColumnSpec | None, where: str) -> Any:
    """Decode a schemaless JSON value as the mapping's ``{column, decode, scale}`` says."""
    if value is None:
        return None
    if is_placeholder(value):
        return UNCHANGED
    if spec is None or spec.decode is None:
        return value
    if spec.decode == "decimal":
        if isinstance(value, dict):
            return _variable_decimal(value, {}, where)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return decimal.Decimal(str(value))  # decimal.handling.mode=double
        if spec.scale is None:
            raise PoisonMessage(
                f"{where}: decode: decimal needs `scale` for base64 values (the message has no schema to "
                f"say it); set scale in the mapping and replay"
            )
        if not isinstance(value, str):
            raise _bad(where, "a base64 string (decode: decimal)", value)
        return decode_decimal(value, spec.scale, where)
    semantic = _DECODE_SEMANTIC.get(spec.decode)
    if semantic is None:
        raise PoisonMessage(f"{where}: unknown decode {spec.decode!r}")
    return _SEMANTIC[semantic](value, {"name": semantic}, where)


def conflicts(schema_field: Mapping[str, Any], spec: ColumnSpec | str | None) -> str | None:
    """A message when the mapping's declared decode disagrees with the field's Debezium schema.

    With a schema present the schema decides how a value is read, so a declared ``decode`` is
    at best redundant; this says when it is also wrong (``check`` prints it).
    """
    if not isinstance(spec, ColumnSpec) or spec.decode is None:
        return None
    name = schema_field.get("name")
    typ = schema_field.get("type")
    column = schema_field.get("field") or spec.column
    said = f"{name} ({typ})" if name else f"{typ}"
    if name in _COMPATIBLE.get(spec.decode, ()):
        if spec.decode == "decimal" and spec.scale is not None and name == _DECIMAL:
            params = schema_field.get("parameters")
            try:
                raw_scale = params.get("scale") if isinstance(params, Mapping) else None
                scale = int(raw_scale) if raw_scale is not None else None
            except (TypeError, ValueError):
                scale = None
            if scale is not None and scale != spec.scale:
                return (f"column {column}: the mapping declares decode: decimal with scale {spec.scale}, "
                        f"but the Debezium schema says scale {scale}; the schema wins "
                        f"(remove scale or fix it)")
        return None
    return (f"column {column}: the mapping declares decode: {spec.decode}, but the Debezium schema says "
            f"{said}; the schema wins (remove `decode` from the mapping or fix it)")


# ---------------------------------------------------------------------------------------------
# Envelopes, keys, metadata
# ---------------------------------------------------------------------------------------------


def _fields_of(schema: Any) -> dict[str, Mapping[str, Any]]:
    """Struct schema -> {field name: field schema}; {} when it is not a usable Connect struct."""
    if not isinstance(schema, Mapping):
        return {}
    fields = schema.get("fields")
    if not isinstance(fields, list):
        return {}
    out: dict[str, Mapping[str, Any]] = {}
    for f in fields:
        if isinstance(f, Mapping) and isinstance(f.get("field"), str):
            out[f["field"]] = f
    return out


def _load(data: bytes | str, what: str) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise PoisonMessage(f"{what} is not valid JSON: {exc}") from None


def _unwrap(obj: dict[str, Any], what: str) -> tuple[Mapping[str, Any] | None, Any, bool]:
    """(schema, payload, enveloped) of a JsonConverter value or key."""
    if len(obj) == 2 and "schema" in obj and "payload" in obj and (
        obj["schema"] is None or isinstance(obj["schema"], dict)
    ):
        payload = obj["payload"]
        if payload is not None and not isinstance(payload, dict):
            raise PoisonMessage(
                f"{what}: the envelope's payload is a JSON {_jtype(payload)}, expected an object")
        return obj["schema"], payload, True
    return None, obj, False


def _decode_row(row: Any, schema_fields: Mapping[str, Mapping[str, Any]] | None,
                specs: Mapping[str, ColumnSpec] | None, where: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise _bad(where, "an object (a row)", row)
    out: dict[str, Any] = {}
    if schema_fields:
        for col, v in row.items():
            fs = schema_fields.get(col)
            if fs is not None:
                out[col] = decode_value(v, fs, f"{where}.{col}")
            else:
                out[col] = UNCHANGED if is_placeholder(v) else v
    else:
        for col, v in row.items():
            out[col] = decode_with_spec(v, specs.get(col) if specs else None, f"{where}.{col}")
    return out


def _parse_key(key: bytes | str | None, table: str | None,
               decoders: Mapping[str, Mapping[str, ColumnSpec]] | None) -> dict[str, Any]:
    if key is None or len(key) == 0:
        return {}
    where = f"{table} key" if table else "key"
    obj = _load(key, f"{where} (the record key)")
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise PoisonMessage(f"{where}: the record key is a JSON {_jtype(obj)}, expected an object of "
                            f"primary-key columns (key.converter should be JsonConverter)")
    schema, payload, _ = _unwrap(obj, where)
    if payload is None:
        return {}
    fields = _fields_of(schema)
    if fields and all(k in fields for k in payload):
        return _decode_row(payload, fields, None, where)
    # No schema, or one that is not a Connect struct (the docs' key example): raw values.
    specs = decoders.get(table) if decoders and table else None
    return _decode_row(payload, None, specs, where)


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
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        return int(value)
    return None


def _sequence(value: Any) -> tuple[int | None, int | None] | None:
    """``source.sequence``: a string holding ``["<last commit lsn>"|null, "<lsn>"]``."""
    if isinstance(value, str):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError:
            return None
    if not isinstance(value, list) or len(value) != 2:
        return None
    return _meta_int(value[0]), _meta_int(value[1])


def _order(lsn: Any, sequence: Any, ts_ms: Any) -> tuple[Any, ...]:
    n = _meta_int(lsn)
    seq = _sequence(sequence)
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
    for raw, div in ((ts_us, 1e6), (ts_ns, 1e9), (ts_ms, 1e3), (ts_usec, 1e6)):
        n = _meta_int(raw)
        if n is not None:
            return n / div
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


# ---------------------------------------------------------------------------------------------
# The parser
# ---------------------------------------------------------------------------------------------


def parse_record(
    topic: str,
    key: bytes | None,
    value: bytes | None,
    headers: list[tuple[str, bytes]] | None,
    *,
    fmt: str = "debezium-json",
    decoders: Mapping[str, Mapping[str, ColumnSpec]] | None = None,
    heartbeat_prefix: str = "__debezium-heartbeat",
) -> ParsedMessage:
    """Parse one Kafka record; raise :class:`PoisonMessage` when it can never be parsed."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if heartbeat_prefix and topic.startswith(heartbeat_prefix):
        return _ignore("heartbeat")
    # Transaction metadata (<prefix>.transaction) is recognised by its shape, not by the topic
    # name alone: a table named "transaction" has a topic ending the same way.
    pk_change, other_key = _pk_change(headers)

    obj = None if value is None or len(value) == 0 else _load(value, f"topic {topic}: value")
    schema: Mapping[str, Any] | None = None
    payload: Any = None
    if obj is not None:
        if not isinstance(obj, dict):
            raise PoisonMessage(f"topic {topic}: the value is a JSON {_jtype(obj)}, expected an object")
        schema, payload, _ = _unwrap(obj, f"topic {topic}: value")
    if payload is None:
        if fmt == "debezium-flat" and key is not None:
            table = _topic_table(topic, f"topic {topic}")
            k = _parse_key(key, table, decoders)
            if k:
                return ParsedMessage("change", table, Op.DELETE, None, dict(k), k, (), None,
                                     "tombstone: delete by key", pk_change, other_key)
        return _ignore("tombstone")
    if isinstance(schema, Mapping) and schema.get("name") == _HEARTBEAT_SCHEMA:
        return _ignore("heartbeat")

    if fmt == "debezium-flat" and not _looks_like_envelope(payload):
        return _parse_flat(topic, key, schema, payload, decoders, pk_change, other_key)
    return _parse_envelope(topic, key, schema, payload, decoders, pk_change, other_key)


def _looks_like_envelope(payload: Mapping[str, Any]) -> bool:
    """A record ExtractNewRecordState passed through unchanged (truncate, message...)."""
    op = payload.get("op")
    return (isinstance(op, str) and op in _ALL_OPS and isinstance(payload.get("source"), dict)
            and ("before" in payload or "after" in payload or op in ("t", "m")))


def _parse_envelope(topic: str, key: bytes | None, schema: Mapping[str, Any] | None, payload: dict[str, Any],
                    decoders: Mapping[str, Mapping[str, ColumnSpec]] | None,
                    pk_change: str | None, other_key: dict[str, Any] | None) -> ParsedMessage:
    here = f"topic {topic}"
    op = payload.get("op")
    if op is None:
        if set(payload) == {"ts_ms"}:
            return _ignore("heartbeat")
        if _is_tx_metadata(payload):
            return _ignore("transaction metadata")
        raise PoisonMessage(f"{here}: not a Debezium change event: no `op` field (fields: "
                            f"{', '.join(sorted(payload))[:120]})")
    if not isinstance(op, str):
        raise _bad(f"{here}: op", "one of c, u, d, r, t, m", op)
    if op not in _ALL_OPS:
        raise PoisonMessage(f"{here}: unknown op {op!r}; expected one of c, u, d, r, t, m")
    if op == "m":
        message = payload.get("message")
        prefix = message.get("prefix") if isinstance(message, dict) else None
        return _ignore(f"logical decoding message (prefix {prefix!r}); not configured")

    source = payload.get("source")
    if source is None:
        source = {}
    if not isinstance(source, dict):
        raise _bad(f"{here}: source", "an object", source)
    sch, tbl = source.get("schema"), source.get("table")
    for name, v in (("source.schema", sch), ("source.table", tbl)):
        if v is not None and not isinstance(v, str):
            raise _bad(f"{here}: {name}", "a string", v)
    table = f"{sch}.{tbl}" if sch and tbl else _topic_table(topic, here)
    order = _order(source.get("lsn"), source.get("sequence"),
                   source["ts_ms"] if "ts_ms" in source else payload.get("ts_ms"))
    commit = _commit_time(source.get("ts_us"), source.get("ts_ns"), source.get("ts_ms"),
                          source.get("ts_usec"))  # ts_usec: 0.x connectors

    if op == "t":
        return ParsedMessage("truncate", table, Op.TRUNCATE, None, None, {}, order, commit, "",
                             pk_change, other_key)

    envelope = _fields_of(schema)
    before_fields = _fields_of(envelope.get("before")) or None
    after_fields = _fields_of(envelope.get("after")) or None
    specs = decoders.get(table) if decoders else None
    where = table
    before_raw, after_raw = payload.get("before"), payload.get("after")
    before = None if before_raw is None else _decode_row(before_raw, before_fields, specs, f"{where} before")
    k = _parse_key(key, table, decoders)
    the_op = _OPS[op]
    if the_op is Op.DELETE:
        if before is None:
            old = dict(k) if k else None
        else:
            old = before
            for col, v in k.items():
                old.setdefault(col, v)
        return ParsedMessage("change", table, the_op, None, old, k, order, commit, "", pk_change, other_key)
    if after_raw is None:
        raise PoisonMessage(f"{here}: op {op!r} ({the_op.value}) without an `after` row image")
    after = _decode_row(after_raw, after_fields, specs, f"{where} after")
    return ParsedMessage("change", table, the_op, after, before, k, order, commit, "", pk_change, other_key)


_FLAT_META = frozenset("__" + n for n in (
    "op", "table", "schema", "db", "lsn", "ts_ms", "ts_us", "ts_ns", "txId", "sequence", "snapshot",
    "name", "connector", "version", "xmin", "deleted",
))


def _is_meta(name: str) -> bool:
    return name in _FLAT_META or name.startswith("__source_") or name.startswith("__transaction")


def _parse_flat(topic: str, key: bytes | None, schema: Mapping[str, Any] | None, row: dict[str, Any],
                decoders: Mapping[str, Mapping[str, ColumnSpec]] | None,
                pk_change: str | None, other_key: dict[str, Any] | None) -> ParsedMessage:
    here = f"topic {topic}"
    if (_is_tx_metadata(row) and set(row) <= _TX_FIELDS
            and ("event_count" in row or "data_collections" in row)):
        return _ignore("transaction metadata")
    meta = {k: v for k, v in row.items() if _is_meta(k)}
    cols = {k: v for k, v in row.items() if k not in meta}

    def text(*names: str) -> str | None:
        for n in names:
            v = meta.get(n)
            if v is None or v == "":
                continue
            if not isinstance(v, str):
                raise _bad(f"{here}: {n}", "a string", v)
            return v
        return None

    op_code = meta.get("__op")
    if op_code is not None and (not isinstance(op_code, str) or op_code not in _ALL_OPS):
        raise PoisonMessage(f"{here}: __op is {_short(op_code)}; expected one of c, u, d, r, t, m")
    deleted = meta.get("__deleted")
    if deleted in ("true", True):
        is_deleted = True
    elif deleted in ("false", False, None):
        is_deleted = False
    else:
        raise _bad(f"{here}: __deleted", '"true" or "false"', deleted)
    if op_code == "m":
        return _ignore("logical decoding message; not configured")

    name = text("__table", "__source_table")
    if name:
        sch = text("__schema", "__source_schema")
        if not sch:
            parts = topic.split(".")
            sch = parts[-2] if len(parts) >= 2 and parts[-2] else (text("__db", "__source_db") or "public")
        table = f"{sch}.{name}"
    else:
        table = _topic_table(topic, here)

    order = _order(meta.get("__lsn", meta.get("__source_lsn")),
                   meta.get("__sequence", meta.get("__source_sequence")),
                   meta.get("__source_ts_ms", meta.get("__ts_ms")))
    commit = _commit_time(meta.get("__source_ts_us"), meta.get("__source_ts_ns"), meta.get("__source_ts_ms"))
    if op_code == "t":
        return ParsedMessage("truncate", table, Op.TRUNCATE, None, None, {}, order, commit, "",
                             pk_change, other_key)

    fields = _fields_of(schema) or None
    specs = decoders.get(table) if decoders else None
    values = _decode_row(cols, fields, specs, f"{table} row")
    k = _parse_key(key, table, decoders)
    if is_deleted or op_code == "d":
        for col, v in k.items():
            values.setdefault(col, v)
        return ParsedMessage("change", table, Op.DELETE, None, values, k, order, commit, "",
                             pk_change, other_key)
    # Without __op an insert cannot be told from an update: both are "the row is now this".
    op = _OPS[op_code] if op_code else Op.UPDATE
    return ParsedMessage("change", table, op, values, None, k, order, commit, "", pk_change, other_key)


def field_schemas(value: bytes | str | Mapping[str, Any], fmt: str = "debezium-json") -> dict[str, Mapping[str, Any]]:
    """{column: field schema} of a message's row (``{}`` without a schema); for ``check``."""
    obj = value if isinstance(value, Mapping) else _load(value, "value")
    if not isinstance(obj, dict):
        return {}
    schema, payload, enveloped = _unwrap(obj, "value")
    if not enveloped:
        return {}
    fields = _fields_of(schema)
    if fmt == "debezium-flat" and not (isinstance(payload, dict) and _looks_like_envelope(payload)):
        return {k: v for k, v in fields.items() if not _is_meta(k)}
    return _fields_of(fields.get("after")) or _fields_of(fields.get("before"))
