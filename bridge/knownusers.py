"""What the bridge has learnt about OneSignal users from OneSignal's own answers (in memory).

OneSignal is eventually consistent: right after a user is created, requests by alias can answer
404 for a while (OneSignal's Android SDK waits `opRepoPostCreateDelay` after a create and treats a
404 within `opRepoPostCreateRetryUpTo` as replication lag). So the dispatcher remembers, per user:

- that the user exists (an answer showed it), so that its tags and properties go through Update
  user, the call documented to change an existing user's properties;
- since when: a 404 within `consistency_window_s` of the creation (or of the first time the bridge
  saw the user) is replication lag, retried, never final;
- which aliases OneSignal confirmed, so that an unchanged alias costs no request.

Bounded (least recently used first out): a forgotten user is simply unknown again, and the next
change goes through Create user and a comparison of its answer, which is always correct, only
sometimes one request more. The memory starts empty at each start: `started_at` lets the
dispatcher treat every user as possibly new during the first window (an earlier process may have
created it a moment before it stopped).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

from bridge.events import UserRef

MAX_KNOWN_USERS = 100_000


@dataclass(slots=True)
class KnownUser:
    since: float  # when the bridge created it, or first saw it exist
    created: bool  # the bridge's own Create user made it (answered 200/201)
    aliases: dict[str, str] = field(default_factory=dict)  # confirmed by an answer


class KnownUsers:
    def __init__(self, window_s: float, started_at: float, capacity: int = MAX_KNOWN_USERS) -> None:
        self.window_s = window_s
        self.started_at = started_at
        self.capacity = capacity
        self._users: OrderedDict[UserRef, KnownUser] = OrderedDict()

    def __len__(self) -> int:
        return len(self._users)

    def get(self, user: UserRef) -> KnownUser | None:
        known = self._users.get(user)
        if known is not None:
            self._users.move_to_end(user)
        return known

    def created(self, user: UserRef, now: float, aliases: Mapping[str, str]) -> None:
        """The bridge's Create user made this user (a new window starts)."""
        self._put(user, KnownUser(now, True, dict(aliases)))

    def seen(self, user: UserRef, now: float, aliases: Mapping[str, str]) -> None:
        """An answer showed the user exists. The window starts the first time only: a user the
        bridge has known for an hour is not made young again by being seen."""
        known = self._users.get(user)
        if known is None:
            self._put(user, KnownUser(now, False, dict(aliases)))
        else:
            known.aliases.update(aliases)
            self._users.move_to_end(user)

    def forget_alias(self, user: UserRef, label: str) -> None:
        known = self._users.get(user)
        if known is not None:
            known.aliases.pop(label, None)

    def renamed(self, old: UserRef, new: UserRef, now: float) -> None:
        """OneSignal's user `old` is now `new` (same user): what was learnt of it moves along."""
        known = self._users.pop(old, None)
        if known is None:
            self.seen(new, now, {})
            return
        known.aliases.pop(old.label, None)
        self._put(new, known)

    def forget(self, user: UserRef) -> None:
        self._users.pop(user, None)

    def young(self, user: UserRef, now: float) -> bool:
        """Whether a 404 about `user` may be replication lag rather than an answer."""
        known = self._users.get(user)
        return known is not None and now - known.since <= self.window_s

    def early(self, now: float) -> bool:
        """The first window after start-up, when any user may have been created a moment ago."""
        return now - self.started_at <= self.window_s

    def _put(self, user: UserRef, known: KnownUser) -> None:
        self._users[user] = known
        self._users.move_to_end(user)
        while len(self._users) > self.capacity:
            self._users.popitem(last=False)
