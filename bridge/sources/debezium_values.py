"""Debezium column values: JSON values (with or without their Connect field schema) -> Python
values (pure, no I/O). The record and envelope side is `bridge.sources.debezium`, which re-exports
the public names here.

With a schema, each column is decoded by its field schema (semantic ``name`` first, then
``type``): ``MicroTimestamp``/``Timestamp``/``NanoTimestamp`` and Connect ``Timestamp`` -> aware
UTC ``datetime``; ``ZonedTimestamp`` -> aware UTC ``datetime``; ``Date`` -> ``date``;
``MicroTime``/``Time``/``NanoTime`` -> ``"HH:MM:SS.ffffff"``; Connect ``Decimal`` and
``VariableScaleDecimal`` -> exact ``decimal.Decimal``; ``bytes`` -> ``bytes``; ``Json``, ``Uuid``
and other strings stay strings. Timestamps and dates Python cannot hold (Postgres ``infinity``)
become the strings ``"infinity"``/``"-infinity"``. Without a schema, values stay raw JSON unless
the mapping's ``{column, decode, scale}`` names a decode (:func:`decode_with_spec`). The
unchanged-TOAST placeholder ``__debezium_unavailable_value`` (as a string, as ``[placeholder]``,
as a list of its byte values, or base64 of its bytes) becomes :data:`bridge.events.UNCHANGED`.
A value that can never be read raises :class:`PoisonMessage`.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import decimal
import re
from collections.abc import Callable, Mapping
from typing import Any

from bridge.config import ColumnSpec
from bridge.events import UNCHANGED
from bridge.sources.pgtypes import Unrepresentable

__all__ = [
    "PLACEHOLDER",
    "PoisonMessage",
    "conflicts",
    "decode_decimal",
    "decode_value",
    "decode_with_spec",
    "encode_decimal",
    "is_placeholder",
]

PLACEHOLDER = "__debezium_unavailable_value"
_PLACEHOLDER_BYTES = PLACEHOLDER.encode()
_PLACEHOLDER_B64 = base64.b64encode(_PLACEHOLDER_BYTES).decode()
_PLACEHOLDER_BYTE_LIST = list(_PLACEHOLDER_BYTES)
_PLACEHOLDER_STR_LIST = [PLACEHOLDER]
_DECIMAL = "org.apache.kafka.connect.data.Decimal"

_UTC = dt.UTC
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=_UTC)
_EPOCH_ORDINAL = dt.date(1970, 1, 1).toordinal()


class PoisonMessage(ValueError):
    """A record that can never be parsed; the message names what is wrong and where."""


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
    if type(value) is int:  # epoch numbers: the same value decodes to the same immutable result
        memo = _INT_DECODED[semantic]
        out = memo.get(value)
        if out is None:
            out = _SEMANTIC[semantic](value, _SCHEMA_NAMED[semantic], where)
            if len(memo) >= 8192:
                memo.clear()
            memo[value] = out
        return out
    return _SEMANTIC[semantic](value, _SCHEMA_NAMED[semantic], where)


_SCHEMA_NAMED = {name: {"name": name} for name in _DECODE_SEMANTIC.values()}
# Per decode, int value -> decoded value (a datetime, a date, a time of day: immutable). A user's
# signup time comes with every event of the user.
_INT_DECODED: dict[str, dict[int, Any]] = {name: {} for name in _DECODE_SEMANTIC.values()}


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
