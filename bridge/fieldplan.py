"""The field plan: one table's per-row tags, properties and aliases as generated code (pure).

`compile_fields` writes, once per table mapping, a function doing the same steps as
`TableMapping._fields_checked` (bridge/mapping.py) unrolled for that table's columns, so that the
hot path costs one `get` per mapped column and one store per value.
"""

from __future__ import annotations

import datetime as dt
import decimal
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from bridge.events import UNCHANGED
from bridge.values import (
    MAX_TAG_VALUE_BYTES,
    PROPERTY_FORMATS,
    InvalidValue,
    Memo,
    Tags,
    alias_id,
    tag_value,
    unix_seconds,
)

if TYPE_CHECKING:
    from bridge.mapping import TableMapping

_SHORT_TAG = MAX_TAG_VALUE_BYTES // 4  # a str this long or shorter is within the limit in any encoding
_datetime = dt.datetime
_Decimal = decimal.Decimal
# Equal datetimes (the same instant) have the same unix seconds: memoised (a user's signup time
# comes with every change of the user).
_DATETIME_TAGS = Memo(lambda v: str(unix_seconds(v)))


_Fields = tuple[Tags, dict[str, Any], Tags]  # tags, properties, aliases


def compile_fields(tm: TableMapping) -> Callable[[Mapping[str, Any], bool], _Fields | None]:
    """The table's per-row plan: `fields(row, is_update)` -> (tags, properties, aliases), or None
    when a value is one OneSignal would reject (the caller then maps the row field by field, which
    says why). Generated once per table mapping, with the column and field names as constants: the
    same steps as `TableMapping._fields_checked`, unrolled, so a row costs one `get` per mapped
    column and one store per value. Names are repr()'d literals; values never reach the source."""
    env: dict[str, Any] = {
        "U": UNCHANGED, "str": str, "int": int, "len": len, "type": type, "InvalidValue": InvalidValue,
        "datetime": _datetime, "Decimal": _Decimal, "DT": _DATETIME_TAGS, "SHORT": _SHORT_TAG,
        "tag_value": tag_value, "alias_id": alias_id, "ALIAS": tm._alias_ids,  # type: ignore[attr-defined]
    }
    lines = ["def fields(row, update, {}):", " get = row.get", " try:", "  tags = {}"]
    for tag, col in tm.tags:
        t = repr(tag)
        lines += [
            f"  v = get({col!r}, U)",
            "  if v is not U:",
            "   k = type(v)",
            f"   if k is str and len(v) <= SHORT: tags[{t}] = v",
            f"   elif v is None: tags[{t}] = None",
            f"   elif k is datetime: tags[{t}] = DT[v]",
            f"   elif (k is Decimal or k is int) and len(x := str(v)) <= SHORT: tags[{t}] = x",
            f"   else: tags[{t}] = tag_value(v)",
        ]
    lines.append("  props = {}")
    for i, (prop, col) in enumerate(tm.properties):
        env[f"MEMO{i}"] = tm._formats[prop]  # type: ignore[attr-defined]
        env[f"FORMAT{i}"] = PROPERTY_FORMATS[prop]
        lines += [
            f"  v = get({col!r}, U)",
            "  if v is not U and v is not None:",
            f"   props[{prop!r}] = MEMO{i}[v] if type(v) is str else FORMAT{i}(v)",
        ]
    lines.append("  aliases = {}")
    for label, col in tm.aliases:
        a = repr(label)
        lines += [
            f"  v = get({col!r}, U)",
            "  if v is not U:",
            "   if v is None:",
            f"    if update: aliases[{a}] = None",  # a new row never had the alias: nothing to delete
            f"   elif type(v) is str or type(v) is int: aliases[{a}] = ALIAS[v]",
            f"   else: aliases[{a}] = alias_id(v)",
        ]
    lines += ["  return tags, props, aliases", " except InvalidValue:", "  return None"]
    # The constants as default arguments: local variables in the function, the cheapest loads.
    lines[0] = lines[0].format(", ".join(f"{name}={name}" for name in env))
    exec(compile("\n".join(lines), f"<mapping {tm.table}>", "exec"), env)  # noqa: S102 - names are repr()'d literals
    return env["fields"]  # type: ignore[no-any-return]  # the function defined just above
