"""Values that cross the pipeline's stage boundaries.

```
source --ChangeEvent--> mapping --UserChange--> coalescer --UserBatch--> dispatcher
```

Everything here is a frozen dataclass: stages never share mutable state.
"""

from __future__ import annotations

import dataclasses
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
    send the column). `position` is the human-readable source position, for logs and dead
    letters. The checkpoint token is not part of the event: the pipeline assigns it when the
    source hands the event over (`Sink.put`), and mapping copies it into each change's origin.
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

    def with_seq(self, seq: int) -> UserChange:
        """The same change under another checkpoint token (one event, several changes)."""
        return dataclasses.replace(self, origin=dataclasses.replace(self.origin, seq=seq))


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
