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
from collections.abc import Mapping
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
# Same objects as the constructors make (no __post_init__ runs in either). Each is allocated as an
# instance of a plain (not frozen) twin class with the same slots, its fields stored as ordinary
# attribute stores, and then given its real class: CPython allows `__class__` assignment between
# classes of the same slot layout, and from then on the object is exactly the frozen dataclass
# (type, equality, hashing, pickling, immutability). About half the cost of setting the slots
# through their descriptors, a quarter of a frozen dataclass's `__init__`.

_new = object.__new__


def _twin(cls: type) -> Any:
    """A mutable class with `cls`'s slots, in the same order (so the layouts match)."""
    twin = type(f"_{cls.__name__}Builder", (), {"__slots__": cls.__dict__["__slots__"]})
    probe: Any = _new(twin)
    probe.__class__ = cls  # fails at import, not on the hot path, should the layouts ever differ
    return twin


_EventBuilder = _twin(ChangeEvent)
_OriginBuilder = _twin(Origin)
_ChangeBuilder = _twin(UserChange)


def change_event(table: str, op: Op, new: Mapping[str, Any] | None, old: Mapping[str, Any] | None,
                 key: Mapping[str, Any], position: str, commit_time: float | None = None) -> ChangeEvent:
    """`ChangeEvent(table, op, new, old, key, position, commit_time)`, faster."""
    e = _new(_EventBuilder)
    e.table = table
    e.op = op
    e.new = new
    e.old = old
    e.key = key
    e.position = position
    e.commit_time = commit_time
    e.__class__ = ChangeEvent
    return e  # type: ignore[no-any-return]  # a ChangeEvent since the line above


def origin(table: str, key: str, position: str, seq: int, commit_time: float | None) -> Origin:
    """`Origin(table, key, position, seq, commit_time)`, faster."""
    o = _new(_OriginBuilder)
    o.table = table
    o.key = key
    o.position = position
    o.seq = seq
    o.commit_time = commit_time
    o.__class__ = Origin
    return o  # type: ignore[no-any-return]  # an Origin since the line above


def user_change(user: UserRef, origin: Origin, tags: Mapping[str, str | None], properties: Mapping[str, Any],
                aliases: Mapping[str, str | None], subscriptions: tuple[SubscriptionChange, ...] = (),
                delete_user: bool = False, renamed_from: UserRef | None = None) -> UserChange:
    """`UserChange(user, origin, delete_user, tags, properties, aliases, subscriptions, renamed_from)`,
    faster."""
    c = _new(_ChangeBuilder)
    c.user = user
    c.origin = origin
    c.delete_user = delete_user
    c.tags = tags
    c.properties = properties
    c.aliases = aliases
    c.subscriptions = subscriptions
    c.renamed_from = renamed_from
    c.__class__ = UserChange
    return c  # type: ignore[no-any-return]  # a UserChange since the line above
