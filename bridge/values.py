"""Values: how a column value becomes what OneSignal accepts (pure), for the mapping stage.

Tag values are strings (booleans `true`/`false`, numbers as written, timestamps as unix seconds);
alias ids are the client's rule (`client.alias_problem`: not empty, `.`/`..`, `/?#&=`, whitespace,
control characters, over 128 characters); properties are formatted as `PROPERTY_FORMATS` says. A
value OneSignal would reject raises `InvalidValue`, whose message says what is expected: timestamps
and dates with no unix-seconds value (`infinity`, BC, after 9999), and tag values over
`MAX_TAG_VALUE_BYTES` (see docs/configuration.md, "Values and limits").
"""

from __future__ import annotations

import datetime as dt
import decimal
import functools
import json
import math
import re
import zoneinfo
from collections.abc import Callable
from typing import Any

import orjson

from bridge.onesignal.client import alias_problem
from bridge.sources.pgtypes import Unrepresentable

_EPOCH_DATE = dt.date(1970, 1, 1)
# OneSignal documents no per-value limit for tags; its API reference recommends "only tag devices
# with 1 kilobyte of data" in all (docs/configuration.md, "Values and limits"). One value over
# that can only be a mistake (a blob in a tag column): dead-lettered rather than sent.
MAX_TAG_VALUE_BYTES = 1024
FLOAT_WORDS = {math.inf: "Infinity", -math.inf: "-Infinity"}  # as Postgres prints float8


Tags = dict[str, str | None]  # tags or aliases: None deletes


class InvalidValue(ValueError):
    """A column value OneSignal would reject; the message says what is expected."""


class Memo(dict[Any, Any]):
    """A bounded memo of a pure function of one value, for the few exact types whose equal values
    always format alike (str, int): per-row values repeat (a plan, a country, a user's id), so most
    rows format nothing. Emptied when full (no LRU bookkeeping on the hot path)."""

    __slots__ = ("fn", "limit")

    def __init__(self, fn: Callable[[Any], Any], limit: int = 8192) -> None:
        super().__init__()
        self.fn, self.limit = fn, limit

    def __missing__(self, value: Any) -> Any:
        out = self.fn(value)  # raises InvalidValue for a bad value: nothing is stored
        if len(self) >= self.limit:
            self.clear()
        self[value] = out
        return out


def unix_seconds(value: dt.datetime | dt.date) -> int:
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:  # timestamp without time zone: read as UTC
            value = value.replace(tzinfo=dt.UTC)
        return int(value.timestamp())
    return (value - _EPOCH_DATE).days * 86400


def tag_value(value: Any) -> str:
    """Format a column value as a OneSignal tag value (always a string).

    Raises `InvalidValue` for what has no such string: a date or timestamp with no unix-seconds
    value, JSON holding NaN or Infinity, or a result over `MAX_TAG_VALUE_BYTES`.
    """
    text = _tag_text(value)
    if len(text) > MAX_TAG_VALUE_BYTES // 4:
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > MAX_TAG_VALUE_BYTES:
            raise InvalidValue(
                f"is {size} bytes long; OneSignal tags hold short values (at most {MAX_TAG_VALUE_BYTES} "
                f"bytes, see 'Values and limits' in docs/configuration.md): map a shorter column or drop it"
            )
    return text


def _tag_text(value: Any) -> str:
    kind = type(value)
    if kind is str:
        return str(value)
    if kind is bool:
        return "true" if value else "false"
    if isinstance(value, Unrepresentable):
        raise InvalidValue(
            "has no unix-seconds value (Postgres infinity, a BC date or a year after 9999), so it cannot "
            "be a OneSignal time value"
        )
    if isinstance(value, str):
        return str(value)
    if isinstance(value, (int, decimal.Decimal)):
        return str(value)  # Decimal keeps Postgres's own text, NaN and Infinity included
    if isinstance(value, float):
        if not math.isfinite(value):
            return FLOAT_WORDS.get(value, "NaN")
        return repr(value) if not value.is_integer() else str(int(value))
    if isinstance(value, (dt.datetime, dt.date)):
        return str(unix_seconds(value))
    if isinstance(value, (dict, list)):
        if _has_nonfinite(value):
            raise InvalidValue("holds NaN or Infinity, which JSON (the form of array and json tags) "
                               "cannot carry")
        return _compact_json(value)
    return str(value)


def _has_nonfinite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, list):
        return any(_has_nonfinite(v) for v in value)
    if isinstance(value, dict):
        return any(_has_nonfinite(v) for v in value.values())
    return False


def _json_default(value: Any) -> Any:
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    return str(value)  # Decimal (numeric[] columns) and anything else: its text, losslessly


def _compact_json(value: Any) -> str:
    try:
        return orjson.dumps(value, default=_json_default).decode()
    except TypeError:  # integers beyond 64 bits (pgtypes keeps them exact): the standard library
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=_json_default)


def alias_id(value: Any) -> str:
    """The alias id (identity or extra alias) for a column value; `InvalidValue` if it cannot be
    one. The rule is the client's: whatever passes here reaches exactly its endpoint."""
    try:
        text = _tag_text(value)
    except InvalidValue as exc:
        raise InvalidValue(f"{shown(value)} {exc}") from None
    problem = alias_problem(text)
    if problem is not None:
        raise InvalidValue(
            f"{text[:40]!r} is not a usable alias id: it {problem} (OneSignal alias ids are 1-128 "
            f"characters, not '.' or '..', without /?#&=, whitespace or control characters)"
        )
    return text


@functools.lru_cache(maxsize=1)
def _timezones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


def _language(value: Any) -> str:
    text = str(value).strip().replace("_", "-").split("-")[0].lower()
    if not re.fullmatch(r"[a-z]{2}", text):
        raise InvalidValue(f"{str(value)[:20]!r} is not an ISO 639-1 language code (two letters, e.g. en)")
    return text


def _timezone(value: Any) -> str:
    text = str(value).strip()
    if text not in _timezones():
        raise InvalidValue(f"{text[:40]!r} is not an IANA time zone (e.g. Europe/Paris)")
    return text


def _country(value: Any) -> str:
    text = str(value).strip().upper()
    if not re.fullmatch(r"[A-Z]{2}", text):
        raise InvalidValue(f"{str(value)[:20]!r} is not an ISO 3166-1 alpha-2 country code (e.g. FR)")
    return text


def _coordinate(limit: float) -> Callable[[Any], float]:
    def conv(value: Any) -> float:
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise InvalidValue(f"{str(value)[:20]!r} is not a number") from None
        if not math.isfinite(f):
            raise InvalidValue(f"{str(value)[:20]!r} is not a finite number")
        if not -limit <= f <= limit:
            raise InvalidValue(f"{f} is outside -{limit}..{limit}")
        return f

    return conv


def _timestamp(value: Any) -> int:
    if isinstance(value, (dt.datetime, dt.date)):
        return unix_seconds(value)
    if isinstance(value, (int, float, decimal.Decimal)) and not isinstance(value, bool):
        try:
            return int(value)
        except (ValueError, OverflowError):  # NaN, Infinity
            raise InvalidValue(f"{value} is not a finite number of unix seconds") from None
    if isinstance(value, Unrepresentable):
        raise InvalidValue(f"{str(value)[:30]!r} has no unix-seconds value (Postgres infinity, BC or "
                           f"after 9999)")
    raise InvalidValue(f"{str(value)[:30]!r} is not a timestamp")


PROPERTY_FORMATS: dict[str, Callable[[Any], Any]] = {
    "language": _language,
    "timezone_id": _timezone,
    "country": _country,
    "lat": _coordinate(90.0),
    "long": _coordinate(180.0),
    "first_active": _timestamp,
    "last_active": _timestamp,
}


def shown(v: Any) -> str:
    """A value for a reason message: short and printable."""
    text = v if isinstance(v, str) else repr(v)
    return repr(text[:40]) + ("..." if len(text) > 40 else "")
