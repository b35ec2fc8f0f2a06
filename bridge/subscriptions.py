"""Subscription state: which email/SMS subscription (OneSignal id) the bridge created for whom.

OneSignal addresses a subscription by its id, and reading a user back is limited to about one
request per second per app, so the bridge remembers the ids it learns from responses instead of
looking them up before each change. The state is keyed by (channel, token), because an address
belongs to one user at a time: when OneSignal moves it to another user (202), the new owner is
recorded, and the old owner's clean-up leaves it alone. It survives restarts (Postgres table
`onesignal_bridge.subscriptions`, created by `setup`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import psycopg


@dataclass(frozen=True, slots=True)
class KnownSubscription:
    channel: str
    token: str
    owner: str  # "label=id" of the user holding it
    subscription_id: str
    enabled: bool | None


class SubscriptionState(Protocol):
    async def owned(self, owner: str) -> list[KnownSubscription]: ...
    async def lookup(self, channel: str, token: str) -> KnownSubscription | None: ...
    async def record(self, sub: KnownSubscription) -> None: ...
    async def forget(self, channel: str, token: str) -> None: ...
    async def forget_owner(self, owner: str) -> None: ...
    async def rename_owner(self, old: str, new: str) -> None: ...
class MemorySubscriptionState:
    def __init__(self) -> None:
        self._by_token: dict[tuple[str, str], KnownSubscription] = {}

    async def owned(self, owner: str) -> list[KnownSubscription]:
        return [s for s in self._by_token.values() if s.owner == owner]

    async def lookup(self, channel: str, token: str) -> KnownSubscription | None:
        return self._by_token.get((channel, token))

    async def record(self, sub: KnownSubscription) -> None:
        self._by_token[(sub.channel, sub.token)] = sub

    async def forget(self, channel: str, token: str) -> None:
        self._by_token.pop((channel, token), None)

    async def forget_owner(self, owner: str) -> None:
        for key in [k for k, s in self._by_token.items() if s.owner == owner]:
            del self._by_token[key]

    async def rename_owner(self, old: str, new: str) -> None:
        """The user was renamed (the same OneSignal user): its subscriptions go with it."""
        for key, s in list(self._by_token.items()):
            if s.owner == old:
                self._by_token[key] = KnownSubscription(s.channel, s.token, new, s.subscription_id, s.enabled)


class PostgresSubscriptionState:
    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._conn: psycopg.AsyncConnection[Any] | None = None

    async def _c(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = await psycopg.AsyncConnection.connect(self._dsn, autocommit=True)
        return self._conn

    async def _run(self, q: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        try:
            conn = await self._c()
            cur = await conn.execute(q, params)
            return await cur.fetchall() if cur.description else []
        except psycopg.Error:
            if self._conn is not None:
                await self._conn.close()
            self._conn = None
            raise

    async def owned(self, owner: str) -> list[KnownSubscription]:
        rows = await self._run("SELECT channel, token, owner, subscription_id, enabled FROM "
                               "onesignal_bridge.subscriptions WHERE owner = %s", (owner,))
        return [KnownSubscription(*r) for r in rows]

    async def lookup(self, channel: str, token: str) -> KnownSubscription | None:
        rows = await self._run("SELECT channel, token, owner, subscription_id, enabled FROM "
                               "onesignal_bridge.subscriptions WHERE channel = %s AND token = %s", (channel, token))
        return KnownSubscription(*rows[0]) if rows else None

    async def record(self, sub: KnownSubscription) -> None:
        await self._run(
            "INSERT INTO onesignal_bridge.subscriptions (channel, token, owner, subscription_id, enabled)"
            " VALUES (%s,%s,%s,%s,%s) ON CONFLICT (channel, token) DO UPDATE SET owner = excluded.owner,"
            " subscription_id = excluded.subscription_id, enabled = excluded.enabled, updated_at = now()",
            (sub.channel, sub.token, sub.owner, sub.subscription_id, sub.enabled),
        )

    async def forget(self, channel: str, token: str) -> None:
        await self._run("DELETE FROM onesignal_bridge.subscriptions WHERE channel = %s AND token = %s",
                        (channel, token))

    async def forget_owner(self, owner: str) -> None:
        await self._run("DELETE FROM onesignal_bridge.subscriptions WHERE owner = %s", (owner,))

    async def rename_owner(self, old: str, new: str) -> None:
        """The user was renamed (the same OneSignal user): its subscriptions go with it."""
        await self._run("UPDATE onesignal_bridge.subscriptions SET owner = %s, updated_at = now() WHERE owner = %s",
                        (new, old))

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
