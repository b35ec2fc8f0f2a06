"""Stale-value filter for sources without a total order (Kafka partitions).

Events for one user can arrive through different partitions (e.g. `orders` keyed by order id,
mapped to a user by `user_id`). A value for a (user, field) is dropped when an event with a
higher source position already set that field (or deleted the user). Positions are Debezium's
`source.lsn` (with `sequence`), else `ts_ms`: comparable within one connector. Memory is bounded:
the least recently touched (user, field) pairs are forgotten first, and a forgotten pair accepts
the next value (no worse than not filtering).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Any

from bridge.events import UserChange

DELETED = ("*", "deleted")


class StaleFilter:
    def __init__(self, capacity: int = 500_000) -> None:
        self.capacity = capacity
        self._last: OrderedDict[tuple[Any, str, str], tuple[Any, ...]] = OrderedDict()
        self.dropped = 0

    def _seen(self, key: tuple[Any, str, str]) -> tuple[Any, ...] | None:
        order = self._last.get(key)
        if order is not None:
            self._last.move_to_end(key)
        return order

    def _record(self, key: tuple[Any, str, str], order: tuple[Any, ...]) -> None:
        self._last[key] = order
        self._last.move_to_end(key)
        if len(self._last) > self.capacity:
            self._last.popitem(last=False)

    def filter(self, change: UserChange, order: tuple[Any, ...]) -> UserChange | None:
        """The change without its stale fields (None when nothing of it is current)."""
        if not order:
            return change
        user = change.user
        deleted_at = self._seen((user, *DELETED))
        if deleted_at is not None and deleted_at > order:
            self.dropped += 1
            return None
        if change.delete_user:
            self._record((user, *DELETED), order)
            return change

        def keep(kind: str, items: Any) -> dict[str, Any]:
            out = {}
            for k, v in items.items():
                last = self._seen((user, kind, k))
                if last is not None and last > order:
                    self.dropped += 1
                    continue
                self._record((user, kind, k), order)
                out[k] = v
            return out

        tags = keep("tag", change.tags)
        props = keep("prop", change.properties)
        aliases = keep("alias", change.aliases)
        subs = tuple(s for s in change.subscriptions if not (
            (last := self._seen((user, "sub", s.channel))) is not None and last > order))
        for s in subs:
            self._record((user, "sub", s.channel), order)
        if not (tags or props or aliases or subs) and (change.tags or change.properties or change.aliases
                                                       or change.subscriptions):
            return None
        return dataclasses.replace(change, tags=tags, properties=props, aliases=aliases, subscriptions=subs)
