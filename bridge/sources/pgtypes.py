"""Postgres text output -> Python values (pure, no I/O).

pgoutput sends column values in the text form that the type's output function prints in the
walsender session. This module assumes that session uses ``DateStyle=ISO`` (the default) and
accepts any ``TimeZone`` (offsets like ``+00``, ``+05:30``, ``-03``, ``+05:53:28``), although the
bridge sets ``TimeZone=UTC``.

:func:`converter_for` returns a callable ``str -> value`` for a type OID:

=====================================  =====================================================
int2 int4 int8 oid xid cid xid8        ``int``
numeric                                ``decimal.Decimal`` (``NaN``/``Infinity`` kept as Decimal)
float4 float8                          ``float`` (``NaN``/``Infinity`` too)
bool                                   ``bool``
date                                   ``datetime.date``
timestamp                              naive ``datetime.datetime`` (UTC by convention)
timestamptz                            aware ``datetime.datetime`` in UTC
json jsonb                             parsed JSON (orjson; exact big integers)
arrays of any known type               ``list`` (nested lists for multi-dimensional arrays)
everything else (text, uuid, time...)  ``str`` unchanged (uuid lowercased)
=====================================  =====================================================

Values a Python type cannot hold are kept as the Postgres string, typed :class:`Unrepresentable`
(a ``str`` subclass, so it prints and serialises as that text): dates and timestamps
``infinity``/``-infinity``, BC dates and years after 9999. Mapping refuses them where a number is
needed (a tag of unix seconds), with a dead letter naming the value.

Converters raise ``ValueError`` on text that is not what Postgres prints for the type (for
example a non-ISO ``DateStyle``); SQL NULL and unchanged TOAST values never reach them.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Callable
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, TypeAlias

import orjson

__all__ = ["Converter", "PgType", "Unrepresentable", "converter_for", "parse_array"]

Converter: TypeAlias = Callable[[str], Any]


class PgType(enum.IntEnum):
    """OIDs of the built-in types (``SELECT oid, typname, typarray FROM pg_type``)."""

    BOOL = 16
    BYTEA = 17
    CHAR = 18
    NAME = 19
    INT8 = 20
    INT2 = 21
    INT4 = 23
    TEXT = 25
    OID = 26
    XID = 28
    CID = 29
    JSON = 114
    FLOAT4 = 700
    FLOAT8 = 701
    BPCHAR = 1042
    VARCHAR = 1043
    DATE = 1082
    TIME = 1083
    TIMESTAMP = 1114
    TIMESTAMPTZ = 1184
    INTERVAL = 1186
    TIMETZ = 1266
    NUMERIC = 1700
    UUID = 2950
    JSONB = 3802
    XID8 = 5069

    BOOL_ARRAY = 1000
    BYTEA_ARRAY = 1001
    CHAR_ARRAY = 1002
    NAME_ARRAY = 1003
    INT2_ARRAY = 1005
    INT4_ARRAY = 1007
    TEXT_ARRAY = 1009
    BPCHAR_ARRAY = 1014
    VARCHAR_ARRAY = 1015
    INT8_ARRAY = 1016
    FLOAT4_ARRAY = 1021
    FLOAT8_ARRAY = 1022
    OID_ARRAY = 1028
    XID_ARRAY = 1011
    CID_ARRAY = 1012
    JSON_ARRAY = 199
    DATE_ARRAY = 1182
    TIME_ARRAY = 1183
    TIMESTAMP_ARRAY = 1115
    TIMESTAMPTZ_ARRAY = 1185
    INTERVAL_ARRAY = 1187
    TIMETZ_ARRAY = 1270
    NUMERIC_ARRAY = 1231
    UUID_ARRAY = 2951
    JSONB_ARRAY = 3807
    XID8_ARRAY = 271


# --------------------------------------------------------------------------------------------
# Scalars
# --------------------------------------------------------------------------------------------

_UTC = UTC
_fromisoformat = datetime.fromisoformat
_date_fromisoformat = date.fromisoformat
_INFINITIES = frozenset(("infinity", "-infinity"))


def _bool(text: str) -> bool:
    if text == "t" or text == "true":  # boolout prints t/f; a bool::text cast gives true/false
        return True
    if text == "f" or text == "false":
        return False
    raise ValueError(f"not a Postgres boolean: {text!r}")


def _numeric(text: str) -> Decimal:
    try:
        return Decimal(text)
    except InvalidOperation:
        raise ValueError(f"not a Postgres numeric: {text!r}") from None


class Unrepresentable(str):
    """A valid Postgres date or timestamp that ``datetime`` cannot hold (``infinity``,
    ``-infinity``, BC, after year 9999), as Postgres prints it. It has no unix-seconds value."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"Unrepresentable({str.__repr__(self)})"


def _unrepresentable(text: str, kind: str) -> Unrepresentable:
    """Return ``text`` if it is a valid Postgres value Python cannot hold, else raise."""
    if text in _INFINITIES or text.endswith(" BC"):
        return Unrepresentable(text)
    year, dash, _ = text.partition("-")
    if dash and len(year) > 4 and year.isdigit():  # year 10000 and later
        return Unrepresentable(text)
    raise ValueError(f"not an ISO {kind}: {text!r} (is the session's DateStyle ISO?)")


def _date(text: str) -> date | Unrepresentable:
    try:
        return _date_fromisoformat(text)
    except ValueError:
        return _unrepresentable(text, "date")


def _timestamp(text: str) -> datetime | Unrepresentable:
    try:
        value = _fromisoformat(text)
    except ValueError:
        return _unrepresentable(text, "timestamp")
    if value.tzinfo is not None:
        raise ValueError(f"timestamp without time zone has an offset: {text!r}")
    return value


def _timestamptz(text: str) -> datetime | Unrepresentable:
    try:
        value = _fromisoformat(text)
    except ValueError:
        return _unrepresentable(text, "timestamptz")
    tz = value.tzinfo
    if tz is _UTC:
        return value
    if tz is None:
        raise ValueError(f"timestamptz without an offset: {text!r}")
    try:
        return value.astimezone(_UTC)
    except OverflowError:  # e.g. 0001-01-01 00:00:00+05: before year 1 in UTC
        return Unrepresentable(text)


# orjson turns integers outside the 64-bit range into floats (silently losing digits) and
# rejects numbers beyond a double; the standard library keeps such integers exact.
_LONG_DIGITS = re.compile(r"\d{19}")


def _json(text: str) -> Any:
    if _LONG_DIGITS.search(text) is None:
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            pass  # e.g. lone surrogate escapes, which Postgres' json type accepts
    return json.loads(text)


# --------------------------------------------------------------------------------------------
# Arrays
# --------------------------------------------------------------------------------------------

# A double-quoted element; group 1 is its content with backslash escapes still in it.
_QUOTED = re.compile(r'"([^"\\]*(?:\\.[^"\\]*)*)"', re.DOTALL)
_ESCAPE = re.compile(r"\\(.)", re.DOTALL)
_UNQUOTED: dict[str, re.Pattern[str]] = {}


def _unquoted_pattern(delimiter: str) -> re.Pattern[str]:
    pattern = _UNQUOTED.get(delimiter)
    if pattern is None:
        pattern = re.compile(r'[^{}"\\' + re.escape(delimiter) + r"]+")
        _UNQUOTED[delimiter] = pattern
    return pattern


def _is_null(token: str) -> bool:
    return len(token) == 4 and token.upper() == "NULL"


def parse_array(text: str, element: Converter = str, delimiter: str = ",") -> list[Any]:
    """Parse a Postgres array literal as ``array_out`` prints it into a (nested) list.

    ``{a,"b c",NULL,"NULL"}`` -> ``['a', 'b c', None, 'NULL']``; each non-NULL element is
    passed through ``element``. Multi-dimensional arrays give nested lists; explicit bounds
    (``[0:1]={1,2}``) are dropped. Raises ``ValueError`` if ``text`` is not an array literal.
    """
    start = 0
    if text.startswith("["):
        start = text.find("=") + 1
        if start == 0:
            raise ValueError(f"array bounds without '=': {text!r}")
    if not text.endswith("}") or text[start : start + 1] != "{":
        raise ValueError(f"not a Postgres array: {text!r}")
    inner = text[start + 1 : -1]
    if not inner:
        return []
    if '"' not in inner and "{" not in inner and "\\" not in inner and "}" not in inner:
        # Flat and nothing quoted (the common case): no escapes to undo.
        items = inner.split(delimiter)
        if "" in items:
            raise ValueError(f"empty unquoted element in array: {text!r}")
        return [
            None if item == "NULL" or (len(item) == 4 and item.upper() == "NULL") else element(item)
            for item in items
        ]
    try:
        values, pos = _parse_level(text, start, element, delimiter, _unquoted_pattern(delimiter))
    except IndexError:
        raise ValueError(f"unterminated array: {text!r}") from None
    if pos != len(text):
        raise ValueError(f"unexpected text after the array at offset {pos}: {text!r}")
    return values


def _parse_level(
    text: str, pos: int, element: Converter, delimiter: str, unquoted: re.Pattern[str]
) -> tuple[list[Any], int]:
    """Parse ``{...}`` at ``pos``; returns the list and the offset after the closing brace."""
    pos += 1  # the caller checked text[pos] == "{"
    values: list[Any] = []
    if text[pos] == "}":
        return values, pos + 1
    while True:
        char = text[pos]
        if char == "{":
            value, pos = _parse_level(text, pos, element, delimiter, unquoted)
            values.append(value)
        elif char == '"':
            match = _QUOTED.match(text, pos)
            if match is None:
                raise ValueError(f"unterminated quoted array element at offset {pos}: {text!r}")
            raw = match.group(1)
            values.append(element(_ESCAPE.sub(r"\1", raw) if "\\" in raw else raw))
            pos = match.end()
        else:
            match = unquoted.match(text, pos)
            if match is None:
                raise ValueError(f"unexpected {char!r} in array at offset {pos}: {text!r}")
            token = match.group()
            values.append(None if _is_null(token) else element(token))
            pos = match.end()
        char = text[pos]
        if char == "}":
            return values, pos + 1
        if char != delimiter:
            raise ValueError(f"expected {delimiter!r} or '}}' at offset {pos}: {text!r}")
        pos += 1


def _array_converter(element: Converter, delimiter: str = ",") -> Converter:
    def convert(text: str) -> list[Any]:
        return parse_array(text, element, delimiter)

    return convert


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------

_SCALARS: dict[int, Converter] = {
    PgType.BOOL: _bool,
    PgType.INT2: int,
    PgType.INT4: int,
    PgType.INT8: int,
    PgType.OID: int,
    PgType.XID: int,
    PgType.CID: int,
    PgType.XID8: int,
    PgType.NUMERIC: _numeric,
    PgType.FLOAT4: float,
    PgType.FLOAT8: float,
    PgType.TEXT: str,
    PgType.VARCHAR: str,
    PgType.BPCHAR: str,
    PgType.NAME: str,
    PgType.CHAR: str,
    PgType.UUID: str.lower,
    PgType.DATE: _date,
    PgType.TIME: str,
    PgType.TIMETZ: str,
    PgType.TIMESTAMP: _timestamp,
    PgType.TIMESTAMPTZ: _timestamptz,
    PgType.INTERVAL: str,
    PgType.JSON: _json,
    PgType.JSONB: _json,
}

# Array type OID -> element type OID, for the arrays of the types above.
_ARRAYS: dict[int, int] = {
    PgType.BOOL_ARRAY: PgType.BOOL,
    PgType.INT2_ARRAY: PgType.INT2,
    PgType.INT4_ARRAY: PgType.INT4,
    PgType.INT8_ARRAY: PgType.INT8,
    PgType.OID_ARRAY: PgType.OID,
    PgType.XID_ARRAY: PgType.XID,
    PgType.CID_ARRAY: PgType.CID,
    PgType.XID8_ARRAY: PgType.XID8,
    PgType.NUMERIC_ARRAY: PgType.NUMERIC,
    PgType.FLOAT4_ARRAY: PgType.FLOAT4,
    PgType.FLOAT8_ARRAY: PgType.FLOAT8,
    PgType.TEXT_ARRAY: PgType.TEXT,
    PgType.VARCHAR_ARRAY: PgType.VARCHAR,
    PgType.BPCHAR_ARRAY: PgType.BPCHAR,
    PgType.NAME_ARRAY: PgType.NAME,
    PgType.CHAR_ARRAY: PgType.CHAR,
    PgType.UUID_ARRAY: PgType.UUID,
    PgType.DATE_ARRAY: PgType.DATE,
    PgType.TIME_ARRAY: PgType.TIME,
    PgType.TIMETZ_ARRAY: PgType.TIMETZ,
    PgType.TIMESTAMP_ARRAY: PgType.TIMESTAMP,
    PgType.TIMESTAMPTZ_ARRAY: PgType.TIMESTAMPTZ,
    PgType.INTERVAL_ARRAY: PgType.INTERVAL,
    PgType.JSON_ARRAY: PgType.JSON,
    PgType.JSONB_ARRAY: PgType.JSONB,
}

# Arrays of other built-in types: elements stay strings. box[] is the one built-in array
# whose delimiter is ';' (a box prints as "(x1,y1),(x2,y2)").
_STRING_ARRAYS: dict[int, str] = {
    1001: ",",  # bytea[]
    143: ",",  # xml[]
    1017: ",",  # point[]
    1018: ",",  # lseg[]
    1019: ",",  # path[]
    1020: ";",  # box[]
    1027: ",",  # polygon[]
    629: ",",  # line[]
    719: ",",  # circle[]
    651: ",",  # cidr[]
    1041: ",",  # inet[]
    1040: ",",  # macaddr[]
    775: ",",  # macaddr8[]
    791: ",",  # money[]
    1561: ",",  # bit[]
    1563: ",",  # varbit[]
    3643: ",",  # tsvector[]
    3645: ",",  # tsquery[]
    4073: ",",  # jsonpath[]
    3905: ",",  # int4range[]
    3907: ",",  # numrange[]
    3909: ",",  # tsrange[]
    3911: ",",  # tstzrange[]
    3913: ",",  # daterange[]
    3927: ",",  # int8range[]
}

_CONVERTERS: dict[int, Converter] = dict(_SCALARS)
_CONVERTERS.update((oid, _array_converter(_SCALARS[elem])) for oid, elem in _ARRAYS.items())
_CONVERTERS.update((oid, _array_converter(str, delim)) for oid, delim in _STRING_ARRAYS.items())
_STRING_ARRAY = _array_converter(str)


def converter_for(type_oid: int, type_name: str | None = None) -> Converter:
    """The function that turns a column's text value into a Python value.

    ``type_name`` (from a pgoutput Type message, for types created in the database such as
    enums, domains or extension types like citext) is optional: a name starting with ``_``
    is Postgres' name for an array type, whose elements are then kept as strings. Any type
    this module does not know gives ``str`` (the text unchanged).
    """
    converter = _CONVERTERS.get(type_oid)
    if converter is not None:
        return converter
    if type_name is not None and type_name.startswith("_"):
        return _STRING_ARRAY
    return str
