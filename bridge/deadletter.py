"""Dead-letter store: changes that can never be applied, kept durably with their reason.

Postgres modes keep them in `onesignal_bridge.dead_letters` (created by `setup`); `dlq list|show|
replay|purge` read them back. A store that cannot write raises, and the change is *not* confirmed:
bad input never vanishes.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
import psycopg

from bridge.events import Origin, Rejection

log = logging.getLogger("bridge.deadletter")

ROW_KEY_TEXT_MAX = 500  # the text column is for people; the JSON column keeps every key in full


class RowKey(str):
    """A row's primary key: reads as the text people see (`id=42`), and keeps the columns and values.

    Mapping renders keys with this type, so every `Origin.key` and `Rejection.key` still is the
    familiar string while a dead letter can store the key structurally (`row_keys`), which `dlq
    replay` reads back without parsing text (a value may contain `,`, `;` or `=`).
    """

    __slots__ = ("columns",)
    columns: Mapping[str, Any]

    def __new__(cls, columns: Mapping[str, Any], text: str) -> RowKey:
        self = super().__new__(cls, text)
        self.columns = columns  # normalised only when a dead letter is written (hot path)
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (RowKey, (dict(self.columns), str(self)))


def key_value(v: Any) -> Any:
    """A key value as JSON: strings, integers, booleans and null as they are, anything else as text
    that Postgres reads back as the column's type (timestamps, numerics, uuids ...)."""
    if v is None or isinstance(v, (str, bool)):
        return v
    if isinstance(v, int):
        return v if -(2**63) <= v < 2**63 else str(v)
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if isinstance(v, (bytes, bytearray, memoryview)):
        return "\\x" + bytes(v).hex()
    if isinstance(v, (dict, list)):
        return orjson.dumps(v, default=str).decode()
    return str(v)


def structured_keys(origins: Iterable[tuple[str, str]]) -> list[dict[str, Any]] | None:
    """`[{"table": "public.users", "key": {"id": "a,b"}}, ...]` for (table, key) pairs, without
    duplicates; None when a key was not rendered as a `RowKey` (nothing structured to store)."""
    out: list[dict[str, Any]] = []
    seen: set[bytes] = set()
    for table, key in origins:
        if not isinstance(key, RowKey):
            return None
        entry = {"table": table, "key": {str(k): key_value(v) for k, v in key.columns.items()}}
        ident = orjson.dumps(entry)
        if ident not in seen:
            seen.add(ident)
            out.append(entry)
    return out


def _human(v: Any) -> str:
    if v is None:
        return "NULL"
    if not isinstance(v, str):
        return orjson.dumps(v).decode()
    plain = bool(v) and v.isprintable() and v != "NULL" and not any(c in v for c in ',;="\\ ')
    return v if plain else orjson.dumps(v).decode()


def render_row_keys(keys: list[dict[str, Any]], table: str | None = None) -> str:
    """Structured keys for people, unambiguous: `id=42`, `id="a,b"`, `code=x; public.orders:id=7`.

    A value with a separator, a quote, a space, nothing, or an unprintable character is written as
    a JSON string; keys of another table than the letter's are prefixed with their table.
    """
    parts = []
    for entry in keys:
        cols = entry.get("key") or {}
        text = ",".join(f"{_human(str(k))}={_human(v)}" for k, v in cols.items()) or "(no key)"
        if table is not None and entry.get("table") != table:
            text = f"{entry.get('table')}:{text}"
        parts.append(text)
    return "; ".join(parts)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    table: str
    row_key: str
    field: str | None
    reason: str  # short code for metrics: invalid_value, http_400, http_409 ...
    message: str  # for the operator: what is wrong and what to do
    position: str
    user: str | None = None
    payload: dict[str, Any] | None = None
    request: dict[str, Any] | None = None
    origins: tuple[Origin, ...] = dataclasses.field(default=())
    # The row keys, structurally (see `structured_keys`): what `dlq replay` looks the rows up by.
    row_keys: list[dict[str, Any]] | None = None

    @classmethod
    def from_rejection(cls, r: Rejection) -> DeadLetter:
        keys = structured_keys([(r.table, r.key)])
        return cls(r.table, render_row_keys(keys, r.table) if keys is not None else r.key, r.field,
                   "invalid_value", r.message(), r.position,
                   payload=dict(r.payload) if r.payload else None, row_keys=keys)

    @classmethod
    def from_origins(cls, origins: tuple[Origin, ...], **kw: Any) -> DeadLetter:
        """A letter for a change merged from these origins (a request OneSignal refused)."""
        table = origins[0].table if origins else ""
        keys = structured_keys((o.table, o.key) for o in origins)
        if keys is not None:
            text = render_row_keys(keys, table)
        else:
            text = ";".join(sorted({o.key for o in origins}))
        return cls(table=table, row_key=text[:ROW_KEY_TEXT_MAX], origins=origins, row_keys=keys, **kw)


class DeadLetterStore(Protocol):
    async def put(self, letters: list[DeadLetter]) -> None: ...


def _json(v: Any) -> str | None:
    return None if v is None else orjson.dumps(v, default=str).decode()


class PostgresDeadLetters:
    """Writes dead letters to `onesignal_bridge.dead_letters` over its own connection."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._conn: psycopg.AsyncConnection[Any] | None = None

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = await psycopg.AsyncConnection.connect(self._dsn, autocommit=True)
        return self._conn

    async def put(self, letters: list[DeadLetter]) -> None:
        if not letters:
            return
        try:
            conn = await self._connection()
            async with conn.cursor() as cur:
                await cur.executemany(
                    "INSERT INTO onesignal_bridge.dead_letters (source_table, row_key, field, reason,"
                    " message, position, onesignal_user, payload, request, row_keys)"
                    " VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
                    [(d.table, d.row_key, d.field, d.reason, d.message, d.position, d.user,
                      _json(d.payload), _json(d.request), _json(d.row_keys)) for d in letters],
                )
        except psycopg.Error:
            if self._conn is not None:
                await self._conn.close()
            self._conn = None
            raise

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()


class MemoryDeadLetters:
    """For `demo` runs without a database table, and for unit tests of the dispatcher."""

    def __init__(self) -> None:
        self.letters: list[DeadLetter] = []

    async def put(self, letters: list[DeadLetter]) -> None:
        self.letters.extend(letters)


def age_filter(older_than: str | None) -> dt.timedelta | None:
    """`30m`, `2h`, `7d` -> timedelta (for `dlq list --older-than`)."""
    if not older_than:
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        return dt.timedelta(seconds=float(older_than[:-1]) * units[older_than[-1]])
    except (KeyError, ValueError):
        raise ValueError(f"cannot read age {older_than!r}: write e.g. 30m, 2h or 7d") from None
