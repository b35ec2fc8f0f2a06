"""Dead-letter store: changes that can never be applied, kept durably with their reason.

Postgres modes keep them in `onesignal_bridge.dead_letters` (created by `setup`); `dlq list|show|
replay|purge` read them back. A store that cannot write raises, and the change is *not* confirmed:
bad input never vanishes.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
import psycopg

from bridge.events import Origin, Rejection


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
    origins: tuple[Origin, ...] = field(default=())

    @classmethod
    def from_rejection(cls, r: Rejection) -> "DeadLetter":
        return cls(r.table, r.key, r.field, "invalid_value", r.message(), r.position,
                   payload=dict(r.payload) if r.payload else None)


class DeadLetterStore(Protocol):
    async def put(self, letters: list[DeadLetter]) -> None: ...


SCHEMA_SQL = """
CREATE SCHEMA IF NOT EXISTS onesignal_bridge;
CREATE TABLE IF NOT EXISTS onesignal_bridge.dead_letters (
    id          bigserial PRIMARY KEY,
    created_at  timestamptz NOT NULL DEFAULT now(),
    source_table text NOT NULL,
    row_key     text NOT NULL,
    field       text,
    reason      text NOT NULL,
    message     text NOT NULL,
    position    text NOT NULL,
    onesignal_user text,
    payload     jsonb,
    request     jsonb,
    replayed_at timestamptz
);
CREATE INDEX IF NOT EXISTS dead_letters_table_idx ON onesignal_bridge.dead_letters (source_table, created_at);
""".strip()


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
                    "INSERT INTO onesignal_bridge.dead_letters (source_table, row_key, field, reason, message,"
                    " position, onesignal_user, payload, request) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s)",
                    [(d.table, d.row_key, d.field, d.reason, d.message, d.position, d.user,
                      _json(d.payload), _json(d.request)) for d in letters],
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
