"""Values of the `outbox` source: the jsonb row images the capture trigger writes, decoded into
exactly the Python values the `postgres` source produces for the same rows.

Rows arrive as jsonb written in the application's session. Numbers are parsed keeping their exact
text (`12.50` stays `Decimal('12.50')`), then every value is converted with
`pgtypes.converter_for` of its column's type (read once per table from `pg_attribute`), so tags
come out as with the `postgres` source (timestamps as unix seconds; jsonb renders timestamptz in
ISO 8601 with an offset, which the converter turns into UTC). A key absent from the jsonb was not
captured (`UNCHANGED`: mapping leaves the field alone); a key present with null is SQL NULL.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from bridge.sources.pgtypes import PgType, converter_for

_JSON_TYPES = (PgType.JSON, PgType.JSONB)


class _Num(str):
    """A JSON number, kept as the text Postgres wrote (exact numerics, big integers)."""

    __slots__ = ()


_decoder = json.JSONDecoder(parse_int=_Num, parse_float=_Num)


def parse_row(text: str | None) -> dict[str, Any] | None:
    """The jsonb text of a row image -> {column: raw JSON value}, numbers as `_Num`."""
    return None if text is None else _decoder.decode(text)


def _plain_json(v: Any) -> Any:
    """A json/jsonb column's value as the pgoutput source gives it (orjson semantics)."""
    if isinstance(v, _Num):
        s = str(v)
        return float(s) if ("." in s or "e" in s or "E" in s) else int(s)
    if isinstance(v, list):
        return [_plain_json(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain_json(x) for k, x in v.items()}
    return v


def _json_text(v: Any) -> str:
    """Compact JSON text of a raw value (for composite types and other objects)."""
    return json.dumps(_plain_json(v), separators=(",", ":"), ensure_ascii=False)


Decode = Callable[[Any], Any]


def decoder_for(type_oid: int, elem_oid: int = 0) -> Decode:
    """The function turning one raw JSON value of a column of this type into its Python value.

    `elem_oid` is the element type of an array type (0 for other types).
    """
    if elem_oid:
        element = decoder_for(elem_oid)

        def array(v: Any) -> Any:
            if isinstance(v, list):
                return [None if x is None else (array(x) if isinstance(x, list) else element(x)) for x in v]
            return element(v)

        return array
    if type_oid in _JSON_TYPES:
        return _plain_json
    conv = converter_for(type_oid)

    def scalar(v: Any) -> Any:
        if v is None:
            return None
        if isinstance(v, bool):
            v = "true" if v else "false"
        elif isinstance(v, (dict, list)):
            return _json_text(v)
        try:
            return conv(str(v))
        except ValueError:
            return str(v)  # a value the converter does not know how to read: its text, unchanged

    return scalar


class TableDecoder:
    """A mapped table: how to decode its captured columns and which columns name a row."""

    __slots__ = ("name", "decode", "key_columns")

    def __init__(self, name: str, columns: Iterable[tuple[str, int, int]], key_columns: list[str]) -> None:
        self.name = name
        self.decode: dict[str, Decode] = {col: decoder_for(oid, elem) for col, oid, elem in columns}
        self.key_columns = key_columns

    def row(self, raw: dict[str, Any] | None) -> dict[str, Any] | None:
        if raw is None:
            return None
        out: dict[str, Any] = {}
        dec = self.decode
        for k, v in raw.items():
            if v is None:
                out[k] = None
                continue
            f = dec.get(k)
            out[k] = f(v) if f is not None else _unknown(v)
        return out

    def key(self, row: dict[str, Any] | None) -> dict[str, Any]:
        if not row:
            return {}
        return {k: row.get(k) for k in self.key_columns}


def _unknown(v: Any) -> Any:
    """A column the bridge has no type for (added after start): text as text, numbers exact."""
    if isinstance(v, _Num):
        return _plain_json(v)
    if isinstance(v, (dict, list)):
        return _plain_json(v)
    return v
