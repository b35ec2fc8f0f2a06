"""Mapping: a `ChangeEvent` becomes zero or more `UserChange`s (pure; compiled once from config).

Values are formatted the way OneSignal wants them: tag values are strings (booleans
`true`/`false`, numbers as written, timestamps as unix seconds), NULL deletes a tag or alias,
an unchanged TOAST column changes nothing. A value OneSignal would reject becomes a `Rejection`
(dead letter) naming table, row key and field; the row's other fields still sync. Rejected:
identities and alias values that are not usable in a URL path (`client.alias_problem`: empty,
`.`/`..`, `/?#&=`, whitespace, control characters, over 128 characters), timestamps and dates
with no unix-seconds value (`infinity`, BC, after 9999), and tag values over
`MAX_TAG_VALUE_BYTES` (see docs/configuration.md, "Values and limits"). How each value is
formatted and checked is `bridge/values.py`; the per-row field plan generated from a table's
mapping is `bridge/fieldplan.py`.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bridge import addresses
from bridge.config import ColumnSpec, Config, MappingConfig, SubscriptionSpec
from bridge.deadletter import RowKey
from bridge.errors import ConfigError
from bridge.events import (
    UNCHANGED,
    ChangeEvent,
    Op,
    Origin,
    Rejection,
    SubscriptionChange,
    UserChange,
    UserRef,
    origin,
    user_change,
)
from bridge.fieldplan import compile_fields
from bridge.onesignal.client import alias_problem
from bridge.values import FLOAT_WORDS, PROPERTY_FORMATS, InvalidValue, Memo, Tags, alias_id, shown, tag_value


@dataclass(frozen=True, slots=True)
class MappingResult:
    changes: tuple[UserChange, ...] = ()
    rejections: tuple[Rejection, ...] = ()


EMPTY = MappingResult()
_set_changes = MappingResult.__dict__["changes"].__set__
_set_rejections = MappingResult.__dict__["rejections"].__set__


def _result(changes: tuple[UserChange, ...], rejections: tuple[Rejection, ...] = ()) -> MappingResult:
    """`MappingResult(changes, rejections)` built through its slots (the hot path: one per row)."""
    r = object.__new__(MappingResult)
    _set_changes(r, changes)
    _set_rejections(r, rejections)
    return r


def _column(ref: str | ColumnSpec) -> str:
    return ref if isinstance(ref, str) else ref.column


def render_key(key: Mapping[str, Any]) -> str:
    # A RowKey reads as this text and keeps the values for dead letters (`dlq replay`).
    if len(key) == 1:
        for k, v in key.items():
            kind = type(v)
            if kind is int or kind is str:  # equal values render alike: memoised
                rendered = _ONE_KEY.get((k, v))
                if rendered is None or type(rendered.columns[k]) is not kind:
                    if len(_ONE_KEY) >= 8192:
                        _ONE_KEY.clear()
                    rendered = _ONE_KEY[(k, v)] = RowKey({k: v}, f"{k}={v}")
                return rendered
    return RowKey(key, ",".join(f"{k}={v}" for k, v in key.items()) or "(no key)")


_ONE_KEY: dict[tuple[str, Any], RowKey] = {}


@dataclass(frozen=True)
class TableMapping:
    """One table's mapping, compiled: column lookups resolved once."""

    table: str
    label: str
    identity_column: str
    aliases: tuple[tuple[str, str], ...]
    tags: tuple[tuple[str, str], ...]
    properties: tuple[tuple[str, str], ...]
    subscriptions: tuple[tuple[str, str, str | None], ...]  # channel, column, consent column
    on_delete: str
    default_region: str
    on_address_change: str = "delete"
    on_identity_change: str = "auto"  # auto | rename | move (see MappingConfig)
    columns: frozenset[str] = field(default=frozenset())  # every column the mapping reads
    old_columns: frozenset[str] = field(default=frozenset())  # what it reads of an update's old row

    @classmethod
    def compile(cls, m: MappingConfig, default_region: str = "US") -> TableMapping:
        subs = []
        for channel, spec in m.subscriptions.items():
            if isinstance(spec, SubscriptionSpec):
                subs.append((channel, spec.column, spec.enabled))
            else:
                subs.append((channel, spec, None))
        tm = cls(
            table=m.table,
            label=m.identity_label,
            identity_column=m.identity_column,
            aliases=tuple(m.aliases.items()),
            tags=tuple((k, _column(v)) for k, v in m.tags.items()),
            properties=tuple((k, _column(v)) for k, v in m.properties.items()),
            subscriptions=tuple(subs),
            on_delete=m.on_delete,
            default_region=default_region,
            on_address_change=m.on_address_change,
            on_identity_change=m.on_identity_change,
        )
        for where, label in (("identity", tm.label), *(("aliases", a) for a, _ in tm.aliases)):
            problem = alias_problem(label)
            if problem is not None:  # never routable: every request for this table would be refused
                raise ConfigError(f"mappings ({m.table}).{where}: alias label {label[:40]!r} {problem}")
        cols = {tm.identity_column, *(c for _, c in tm.aliases), *(c for _, c in tm.tags)}
        cols |= {c for _, c in tm.properties}
        cols |= {c for _, c, _ in tm.subscriptions} | {e for _, _, e in tm.subscriptions if e}
        object.__setattr__(tm, "columns", frozenset(cols))
        object.__setattr__(tm, "old_columns", frozenset({tm.identity_column, *(c for _, c, _ in tm.subscriptions)}))
        return tm

    def __post_init__(self) -> None:
        # Memos of the pure per-value steps (see Memo), kept per table mapping.
        label = self.label
        object.__setattr__(self, "_users", Memo(lambda v: UserRef(label, alias_id(v))))
        object.__setattr__(self, "_alias_ids", Memo(alias_id))
        object.__setattr__(self, "_formats", {p: Memo(PROPERTY_FORMATS[p]) for p, _ in self.properties})
        # The per-row plan (see fieldplan.compile_fields) and what decides a rename, resolved once.
        object.__setattr__(self, "_fields", compile_fields(self))
        object.__setattr__(self, "_renames_always", self.on_identity_change == "rename")
        object.__setattr__(self, "_renames_auto", self.on_identity_change == "auto")

    # -- the mapping itself -------------------------------------------------------------

    def map(self, event: ChangeEvent, seq: int = 0) -> MappingResult:
        """What `event` means for OneSignal users; `seq` is the event's checkpoint token."""
        out = self.map_one(event, seq)
        return _result((out,)) if type(out) is UserChange else out  # type: ignore[return-value]  # the other type

    def map_one(self, event: ChangeEvent, seq: int = 0) -> UserChange | MappingResult:
        """`map` for the hot path (one call per row): the change itself when the row means exactly
        one change and nothing of it was rejected (most rows), else the `MappingResult`.

        The row's tags, properties and aliases go through the table's compiled plan (`_fields`):
        str and int values through the memos (a user's id, a plan, a language repeat from row to
        row), everything else formatted as `tag_value`, `alias_id` and `PROPERTY_FORMATS` say. A
        row with a value the plan cannot take is mapped again field by field (`_fields_checked`),
        which names each rejected value. A rejected value is never memoised."""
        op = event.op
        if op is Op.TRUNCATE:
            return EMPTY
        if op is Op.DELETE:
            org = origin(event.table, render_key(event.key), event.position, seq, event.commit_time)
            return self._map_delete(event, org, seq)

        row = event.new or {}
        old_row = event.old
        idcol = self.identity_column
        ident = row.get(idcol, UNCHANGED)
        if ident is UNCHANGED and old_row is not None:
            ident = old_row.get(idcol, UNCHANGED)
        if ident is UNCHANGED or ident is None:
            why = "is NULL" if ident is None else "is missing from the change"
            return _result((), (self._reject(event, seq, idcol,
                f"identity column {idcol} {why}: the row cannot be matched to a OneSignal "
                f"user; fill it in (or filter such rows out of the publication)",
                _jsonable(row)),))
        kind = type(ident)
        try:
            user = self._users[ident] if kind is str or kind is int else UserRef(self.label, alias_id(ident))  # type: ignore[attr-defined]
        except InvalidValue as exc:
            return _result((), (self._reject(event, seq, idcol, f"identity: {exc}", _jsonable(row)),))

        rejections: list[Rejection] | None = None
        fields = self._fields(row, op is Op.UPDATE)  # type: ignore[attr-defined]
        if fields is not None:
            tags, props, aliases = fields
        else:
            tags, props, aliases, rejections = self._fields_checked(event, row, seq)
        subs: tuple[SubscriptionChange, ...] = ()
        if self.subscriptions:
            subs, rejected = self._subscriptions(event, row, seq)
            if rejected:
                rejections = (rejections or []) + rejected
        renamed_from: UserRef | None = None
        # The identity itself changed: the same person under a new identity. OneSignal's user is
        # renamed in place (same onesignal_id, subscriptions kept), never deleted and re-created.
        if op is Op.UPDATE and old_row is not None and (
                self._renames_always or (self._renames_auto and idcol in event.key)):  # type: ignore[attr-defined]
            old_ident = old_row.get(idcol, UNCHANGED)
            if old_ident is not ident and old_ident is not UNCHANGED and old_ident is not None and not (
                    type(old_ident) is type(ident) and type(ident) in (str, int) and old_ident == ident):
                try:
                    old_id = alias_id(old_ident)
                except InvalidValue:  # the old identity was never usable: no OneSignal user has it
                    old_id = user.id
                if old_id != user.id:
                    renamed_from = UserRef(self.label, old_id)
        org = origin(event.table, render_key(event.key), event.position, seq, event.commit_time)
        change = user_change(user, org, tags, props, aliases, subs, False, renamed_from)
        if rejections:
            return _result((change,), tuple(rejections))
        return change

    def _fields_checked(self, event: ChangeEvent, row: Mapping[str, Any], seq: int
                        ) -> tuple[Tags, dict[str, Any], Tags, list[Rejection]]:
        """The row's tags, properties and aliases field by field, with a `Rejection` for each value
        OneSignal would refuse (the row's other fields still sync)."""
        rejections: list[Rejection] = []
        tags: Tags = {}
        for tag, col in self.tags:
            v = row.get(col, UNCHANGED)
            if v is not UNCHANGED:
                try:
                    tags[tag] = None if v is None else tag_value(v)
                except InvalidValue as exc:
                    rejections.append(self._reject(event, seq, col, f"tag {tag}: {shown(v)} {exc}",
                                                   {col: _jsonable_value(v)}))
        props: dict[str, Any] = {}
        for prop, col in self.properties:
            v = row.get(col, UNCHANGED)
            if v is not UNCHANGED and v is not None:
                try:
                    props[prop] = PROPERTY_FORMATS[prop](v)
                except InvalidValue as exc:
                    rejections.append(self._reject(event, seq, col, f"property {prop}: {exc}",
                                                   {col: _jsonable_value(v)}))
        aliases: Tags = {}
        for label, col in self.aliases:
            v = row.get(col, UNCHANGED)
            if v is None and event.op is Op.UPDATE:
                aliases[label] = None  # (a new row never had the alias: deleting it would cost a call)
            elif v is not UNCHANGED and v is not None:
                try:
                    aliases[label] = alias_id(v)
                except InvalidValue as exc:
                    rejections.append(self._reject(event, seq, col, f"alias {label}: {exc}",
                                                   {col: _jsonable_value(v)}))
        return tags, props, aliases, rejections

    def _reject(self, event: ChangeEvent, seq: int, fld: str | None, reason: str,
                payload: Mapping[str, Any] | None = None) -> Rejection:
        return Rejection(event.table, render_key(event.key), fld, reason, event.position, seq, payload)

    def _subscriptions(self, event: ChangeEvent, row: Mapping[str, Any], seq: int
                       ) -> tuple[tuple[SubscriptionChange, ...], list[Rejection]]:
        subs: list[SubscriptionChange] = []
        rejections: list[Rejection] = []
        old = event.old or {}
        for channel, col, consent_col in self.subscriptions:
            v = row.get(col, UNCHANGED)
            consent = row.get(consent_col, UNCHANGED) if consent_col else UNCHANGED
            if v is UNCHANGED and consent is UNCHANGED:
                continue
            enabled = None if consent_col is None or consent is UNCHANGED else bool(consent)
            token: str | None | Any = v
            if v is not None and v is not UNCHANGED:
                try:
                    token = addresses.normalize(channel, v, self.default_region)
                except addresses.InvalidAddress as exc:
                    rejections.append(self._reject(event, seq, col, f"{channel} subscription: {exc}",
                                                   {col: _jsonable_value(v)}))
                    continue
            prev = old.get(col, UNCHANGED)
            previous = None
            if prev not in (UNCHANGED, None):
                try:
                    previous = addresses.normalize(channel, prev, self.default_region)
                except addresses.InvalidAddress:
                    previous = None
            subs.append(SubscriptionChange(channel, token, enabled, previous, self.on_address_change))
        return tuple(subs), rejections

    def _on_delete(self, user: UserRef, origin: Origin) -> UserChange | None:
        if self.on_delete == "delete_user":
            return user_change(user, origin, {}, {}, {}, (), True)
        if self.on_delete == "remove_tags" and self.tags:
            return user_change(user, origin, {t: None for t, _ in self.tags}, {}, {})
        return None

    def _map_delete(self, event: ChangeEvent, origin: Origin, seq: int) -> MappingResult:
        if self.on_delete == "ignore":
            return EMPTY
        old = event.old or {}
        ident = old.get(self.identity_column, UNCHANGED)
        if ident is UNCHANGED or ident is None:
            return _result((), (self._reject(
                event, seq, self.identity_column,
                f"the deleted row's identity column {self.identity_column} was not sent by the source, so "
                f"on_delete={self.on_delete} cannot find the user; run "
                f"`ALTER TABLE {event.table} REPLICA IDENTITY FULL` (onesignal-bridge setup does it)",
                _jsonable(old),
            ),))
        kind = type(ident)
        try:
            user = self._users[ident] if kind is str or kind is int else UserRef(self.label, alias_id(ident))  # type: ignore[attr-defined]
        except InvalidValue as exc:
            return _result((), (self._reject(event, seq, self.identity_column, f"identity: {exc}"),))
        change = self._on_delete(user, origin)
        return _result((change,) if change else ())


_PAYLOAD_TEXT = 2048  # a dead letter keeps at most this much of a long text value


def _jsonable_value(v: Any) -> Any:
    if v is UNCHANGED:
        return "<unchanged>"
    if isinstance(v, str):
        if len(v) > _PAYLOAD_TEXT:
            return f"{v[:_PAYLOAD_TEXT]}... ({len(v)} characters)"
        return str(v)
    if isinstance(v, float) and not math.isfinite(v):
        return FLOAT_WORDS.get(v, "NaN")  # JSON has no NaN: Postgres's text
    if isinstance(v, (int, float, bool)) or v is None:
        return v
    if isinstance(v, (dt.datetime, dt.date)):
        return v.isoformat()
    if isinstance(v, (dict, list)):
        return v
    return str(v)


def _jsonable(row: Mapping[str, Any] | None) -> dict[str, Any]:
    return {k: _jsonable_value(v) for k, v in (row or {}).items()}


class Mapper:
    """All tables' mappings; `map(event)` is the pipeline's mapping stage."""

    def __init__(self, config: Config) -> None:
        region = config.delivery.default_region
        self.tables = {m.table: TableMapping.compile(m, region) for m in config.mappings}

    def map(self, event: ChangeEvent, seq: int = 0) -> MappingResult:
        tm = self.tables.get(event.table)
        return tm.map(event, seq) if tm is not None else EMPTY
