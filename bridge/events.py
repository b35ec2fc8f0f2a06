"""Values that cross the pipeline's stage boundaries.

```
source --ChangeEvent--> mapping --UserChange--> coalescer --UserBatch--> dispatcher
```

Everything here is a frozen dataclass: stages never share mutable state. The hot path (one
event and one change per row) builds them with `change_event`, `origin` and `user_change` below:
the same immutable objects, made by setting their slots directly, because a frozen dataclass's
`__init__` assigns every field through `object.__setattr__`, which costs more than the rest of
building a change.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


class _Unchanged:
    """Marker for a column whose value the source did not send (unchanged TOAST).

    It is never a value: mapping skips such columns, so the user keeps what it has.
    """

    _instance: _Unchanged | None = None

    def __new__(cls) -> _Unchanged:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNCHANGED"

    def __reduce__(self) -> str:
        return "UNCHANGED"


UNCHANGED: Any = _Unchanged()


class Op(enum.StrEnum):
    INSERT = "insert"
    UPDATE = "update"
    DELETE = "delete"
    TRUNCATE = "truncate"
    SNAPSHOT = "snapshot"  # a row read by the initial snapshot or a backfill


@dataclass(frozen=True, slots=True)
class ChangeEvent:
    """One row change, as the source saw it.

    `new` and `old` map column names to Python values (`UNCHANGED` where the source did not
    send the column). A source may leave out columns no mapping reads: the `postgres` source
    sends the mapped and key columns, and of an update's old row only the key and what mapping
    compares or retires (the identity, subscription addresses). `position` is the human-readable
    source position, for logs and dead letters. The checkpoint token is not part of the event: the
    pipeline assigns it when the source hands the event over (`Sink.put`), and mapping copies it
    into each change's origin.
    """

    table: str  # "schema.table"
    op: Op
    new: Mapping[str, Any] | None
    old: Mapping[str, Any] | None
    key: Mapping[str, Any]
    position: str
    commit_time: float | None = None  # unix seconds of the source commit


@dataclass(frozen=True, slots=True)
class UserRef:
    """A OneSignal user, addressed by one alias (normally `external_id`)."""

    label: str
    id: str

    def __str__(self) -> str:
        return f"{self.label}={self.id}"


@dataclass(frozen=True, slots=True)
class SubscriptionChange:
    """Desired state of one email or SMS subscription of a user.

    `token` is the address (None: the address was removed). `previous` is the address the row
    held before, when the source knows it (used to retire the old subscription). `enabled` is
    the consent (None: not mapped, keep OneSignal's default).
    """

    channel: str  # "email" | "sms"
    token: str | None
    enabled: bool | None = None
    previous: str | None = None
    on_address_change: str = "delete"  # what happens to the old address: "delete" | "disable"


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a user change came from: enough to name it in an error and to confirm it."""

    table: str
    key: str  # primary key rendered for humans, e.g. "id=42"
    position: str
    seq: int
    commit_time: float | None = None


@dataclass(frozen=True, slots=True)
class UserChange:
    """What one row change means for one OneSignal user.

    `tags` and `aliases` map to None to delete. `delete_user` supersedes everything before it.
    """

    user: UserRef
    origin: Origin
    delete_user: bool = False
    tags: Mapping[str, str | None] = field(default_factory=dict)
    properties: Mapping[str, Any] = field(default_factory=dict)
    aliases: Mapping[str, str | None] = field(default_factory=dict)
    subscriptions: tuple[SubscriptionChange, ...] = ()
    # The row's identity changed: OneSignal's user `renamed_from` becomes `user` (same onesignal_id,
    # subscriptions kept) before the rest of the change applies to it. A point in the user's history.
    renamed_from: UserRef | None = None

    def with_seq(self, seq: int) -> UserChange:
        """The same change under another checkpoint token (one event, several changes)."""
        o = self.origin
        return user_change(self.user, origin(o.table, o.key, o.position, seq, o.commit_time), self.tags,
                           self.properties, self.aliases, self.subscriptions, self.delete_user, self.renamed_from)


@dataclass(frozen=True, slots=True)
class Rejection:
    """A value that can never be applied: it goes to the dead-letter store, the stream goes on."""

    table: str
    key: str
    field: str | None
    reason: str
    position: str
    seq: int
    payload: Mapping[str, Any] | None = None

    def message(self) -> str:
        where = f"table {self.table}, row {self.key}"
        if self.field:
            where += f", field {self.field}"
        return f"{where} (at {self.position}): {self.reason}"


# -- fast builders (the hot path) ------------------------------------------------------------------
# Same objects as the constructors make (no __post_init__ runs in either), built by setting the
# slots through their descriptors: about half the cost of a frozen dataclass's __init__.

_new = object.__new__


def _setters(cls: type, *names: str) -> tuple[Callable[[Any, Any], None], ...]:
    return tuple(cls.__dict__[n].__set__ for n in names)


_e_table, _e_op, _e_new, _e_old, _e_key, _e_position, _e_commit_time = _setters(
    ChangeEvent, "table", "op", "new", "old", "key", "position", "commit_time")
_o_table, _o_key, _o_position, _o_seq, _o_commit_time = _setters(
    Origin, "table", "key", "position", "seq", "commit_time")
_c_user, _c_origin, _c_delete_user, _c_tags, _c_properties, _c_aliases, _c_subscriptions, _c_renamed_from = _setters(
    UserChange, "user", "origin", "delete_user", "tags", "properties", "aliases", "subscriptions", "renamed_from")


def change_event(table: str, op: Op, new: Mapping[str, Any] | None, old: Mapping[str, Any] | None,
                 key: Mapping[str, Any], position: str, commit_time: float | None = None) -> ChangeEvent:
    """`ChangeEvent(table, op, new, old, key, position, commit_time)`, faster."""
    e = _new(ChangeEvent)
    _e_table(e, table)
    _e_op(e, op)
    _e_new(e, new)
    _e_old(e, old)
    _e_key(e, key)
    _e_position(e, position)
    _e_commit_time(e, commit_time)
    return e


def origin(table: str, key: str, position: str, seq: int, commit_time: float | None) -> Origin:
    """`Origin(table, key, position, seq, commit_time)`, faster."""
    o = _new(Origin)
    _o_table(o, table)
    _o_key(o, key)
    _o_position(o, position)
    _o_seq(o, seq)
    _o_commit_time(o, commit_time)
    return o


def user_change(user: UserRef, origin: Origin, tags: Mapping[str, str | None], properties: Mapping[str, Any],
                aliases: Mapping[str, str | None], subscriptions: tuple[SubscriptionChange, ...] = (),
                delete_user: bool = False, renamed_from: UserRef | None = None) -> UserChange:
    """`UserChange(user, origin, delete_user, tags, properties, aliases, subscriptions, renamed_from)`,
    faster."""
    c = _new(UserChange)
    _c_user(c, user)
    _c_origin(c, origin)
    _c_delete_user(c, delete_user)
    _c_tags(c, tags)
    _c_properties(c, properties)
    _c_aliases(c, aliases)
    _c_subscriptions(c, subscriptions)
    _c_renamed_from(c, renamed_from)
    return c
