"""Stale-value filter for sources without a total order (Kafka partitions).

Events for one user can arrive through different partitions (e.g. `orders` keyed by order id,
mapped to a user by `user_id`). A value for a (user, field) is dropped when an event with a
higher source position already set that field (or deleted the user). Positions are Debezium's
`source.lsn` (with `sequence`), else `ts_ms`: comparable within one connector.

One lookup per change: each user remembered has one small record (when it was deleted, and the
position that last set each of its fields). Memory is bounded: the least recently changed users
are forgotten first, and a forgotten user accepts the next value (no worse than not filtering).
A change none of whose fields is stale passes as it is (no copy).

The Kafka source does not filter at all where the record key is the user's identity: one
partition then holds all of a user's events, in order.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from bridge.events import SubscriptionChange, UserChange, UserRef, user_change


class _Seen:
    """What one user's fields were last set by: {field: position} per kind, and its deletion."""

    __slots__ = ("deleted", "tags", "props", "aliases", "subs")

    def __init__(self) -> None:
        self.deleted: tuple[Any, ...] | None = None
        self.tags: dict[str, tuple[Any, ...]] = {}
        self.props: dict[str, tuple[Any, ...]] = {}
        self.aliases: dict[str, tuple[Any, ...]] = {}
        self.subs: dict[str, tuple[Any, ...]] = {}


def _fresh(items: Any, seen: dict[str, tuple[Any, ...]], order: tuple[Any, ...]) -> list[str]:
    """Record `order` for every field of `items` not set by a later position; return the others."""
    stale: list[str] = []
    for k in items:
        last = seen.get(k)
        if last is not None and last > order:
            stale.append(k)
        else:
            seen[k] = order
    return stale


class StaleFilter:
    def __init__(self, capacity: int = 50_000) -> None:
        self.capacity = capacity  # users remembered
        self._users: OrderedDict[UserRef, _Seen] = OrderedDict()
        self.dropped = 0

    def filter(self, change: UserChange, order: tuple[Any, ...]) -> UserChange | None:
        """The change without its stale fields (None when nothing of it is current)."""
        if not order:
            return change
        users = self._users
        user = change.user
        if change.renamed_from is not None and change.renamed_from in users:
            # The same OneSignal user under its new identity: what set its fields goes along.
            users[user] = users.pop(change.renamed_from)
        seen = users.get(user)
        if seen is None:
            seen = users[user] = _Seen()
            if len(users) > self.capacity:
                users.popitem(last=False)
        else:
            users.move_to_end(user)
        if seen.deleted is not None and seen.deleted > order:
            self.dropped += 1
            return None
        if change.delete_user:
            seen.deleted = order
            return change
        stale_tags = _fresh(change.tags, seen.tags, order) if change.tags else ()
        stale_props = _fresh(change.properties, seen.props, order) if change.properties else ()
        stale_aliases = _fresh(change.aliases, seen.aliases, order) if change.aliases else ()
        stale_subs = (_fresh([s.channel for s in change.subscriptions], seen.subs, order)
                      if change.subscriptions else ())
        if not (stale_tags or stale_props or stale_aliases or stale_subs):
            return change
        self.dropped += len(stale_tags) + len(stale_props) + len(stale_aliases) + len(stale_subs)
        tags = {k: v for k, v in change.tags.items() if k not in stale_tags}
        props = {k: v for k, v in change.properties.items() if k not in stale_props}
        aliases = {k: v for k, v in change.aliases.items() if k not in stale_aliases}
        subs: tuple[SubscriptionChange, ...] = tuple(s for s in change.subscriptions if s.channel not in stale_subs)
        if not (tags or props or aliases or subs or change.renamed_from):
            return None
        return user_change(change.user, change.origin, tags, props, aliases, subs, change.delete_user,
                           change.renamed_from)
