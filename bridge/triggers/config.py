"""The `triggers:` section (top level of the configuration): models and checks.

Imported by `bridge.config`; it must not import it back.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_TABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*\.[A-Za-z_][A-Za-z0-9_$]*$")
_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")

Op = Literal["insert", "update", "delete"]
Scalar = str | int | float | bool | None
Condition = dict[str, Scalar | list[Scalar]]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MessageSpec(_Strict):
    """Create message (POST /notifications)."""

    template_id: str | None = None
    contents: dict[str, str] | None = None
    headings: dict[str, str] | None = None
    target_channel: Literal["push", "email", "sms"] = "push"
    custom_data: dict[str, str] = Field(default_factory=dict)  # key -> column
    send_after: str | None = None  # a timestamp column

    @model_validator(mode="after")
    def _one_content(self) -> MessageSpec:
        if self.template_id is not None and (self.contents is not None or self.headings is not None):
            raise ValueError("message: give either `template_id` or `contents`/`headings`, not both")
        if self.template_id is None and not self.contents:
            raise ValueError("message: give `template_id` or `contents` (e.g. contents: {en: \"...\"})")
        return self


class CustomEventSpec(_Strict):
    """Create custom events (POST /apps/{app_id}/custom_events)."""

    name: str = Field(min_length=1, max_length=128)
    payload: dict[str, str] = Field(default_factory=dict)  # key -> column (OneSignal's `properties`)


class TriggerConfig(_Strict):
    name: str
    table: str
    on: list[Op] = Field(default_factory=lambda: list[Op](["insert", "update"]))
    changed: list[str] | None = None
    new: Condition | None = None
    old: Condition | None = None
    user: dict[str, str]
    message: MessageSpec | None = None
    custom_event: CustomEventSpec | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"name {v!r}: use letters, digits and _ . : - (at most 128)")
        return v

    @field_validator("table")
    @classmethod
    def _table(cls, v: str) -> str:
        if "." not in v:
            v = f"public.{v}"
        if not _TABLE.match(v):
            raise ValueError(f"table {v!r}: expected schema.table")
        return v

    @field_validator("on")
    @classmethod
    def _on(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("on: name at least one of insert, update, delete")
        return v

    @field_validator("user")
    @classmethod
    def _user(cls, v: dict[str, str]) -> dict[str, str]:
        if len(v) != 1:
            raise ValueError("user: exactly one alias label -> column, e.g. {external_id: user_id}")
        return v

    @model_validator(mode="after")
    def _combinations(self) -> TriggerConfig:
        where = f"trigger {self.name}"
        if (self.message is None) == (self.custom_event is None):
            raise ValueError(f"{where}: give exactly one of `message` or `custom_event`")
        if self.changed is not None:
            if not self.changed:
                raise ValueError(f"{where}: `changed` lists no column")
            if "insert" in self.on or "delete" in self.on:
                raise ValueError(f"{where}: `changed` applies to updates only; set `on: [update]`"
                                 f" (it has {self.on})")
        if self.old is not None and "insert" in self.on:
            raise ValueError(f"{where}: `old` needs the old row, which inserts do not have; set `on:` without insert")
        if self.new is not None and "delete" in self.on:
            raise ValueError(f"{where}: `new` tests the new row, which deletes do not have; set `on:` without delete")
        label = next(iter(self.user))
        if self.custom_event is not None and label not in ("external_id", "onesignal_id"):
            raise ValueError(f"{where}: `user` of a custom event must be external_id or onesignal_id"
                                 f" (Create custom events addresses users by those only), not {label}")
        return self

    @property
    def needs_old_row(self) -> bool:
        return self.changed is not None or self.old is not None

    def columns(self) -> frozenset[str]:
        """Every column of the new row the trigger reads."""
        cols: set[str] = set(self.user.values()) | set(self.new or ()) | set(self.changed or ())
        if self.message is not None:
            cols |= set(self.message.custom_data.values())
            if self.message.send_after:
                cols.add(self.message.send_after)
        if self.custom_event is not None:
            cols |= set(self.custom_event.payload.values())
        return frozenset(cols)

    def old_columns(self) -> frozenset[str]:
        """What it reads of an update's (or a delete's) old row."""
        cols: set[str] = set(self.old or ()) | set(self.changed or ())
        if "delete" in self.on:
            cols |= self.columns()
        return frozenset(cols)


def check_unique(triggers: list[TriggerConfig]) -> None:
    seen: set[str] = set()
    for t in triggers:
        if t.name in seen:
            raise ValueError(f"triggers: the name {t.name!r} is used twice (it is part of the idempotency key)")
        seen.add(t.name)


def as_json_value(v: Any) -> Any:
    """A column value in a JSON body: strings, numbers, booleans and null as they are, the rest as text."""
    if v is None or isinstance(v, (str, bool, int)):
        return v
    if isinstance(v, float):
        return v if v == v and v not in (float("inf"), float("-inf")) else str(v)
    if isinstance(v, (dict, list)):
        return v
    return str(v)
