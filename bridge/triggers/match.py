"""Which triggers an event fires, and what each sends. Pure: no I/O, no clock.

`Matcher(triggers, source_identity).match(event, ordinal)` returns one `Send` per trigger the
event fires. Snapshot and backfill rows (`Op.SNAPSHOT`) and truncates never fire.

The idempotency key is `uuid5(NAMESPACE, source identity | position | table | row key | ordinal |
trigger name)`: the source identity (the slot, the topics, the outbox), the change's source
position (for Postgres the transaction's LSN, shared by every row of it), the row's key and its
ordinal among changes to that row in the same position (a transaction that updates one row twice),
and the trigger's name. A re-read after a crash starts at a transaction's beginning, so it derives
the same keys.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from bridge.events import UNCHANGED, ChangeEvent, Op
from bridge.triggers.config import TriggerConfig, as_json_value

NAMESPACE = uuid.UUID("3f0f3c1e-4b57-5a8e-9a51-6f6e65736967")
_OPS = {Op.INSERT: "insert", Op.UPDATE: "update", Op.DELETE: "delete"}


@dataclass(slots=True)
class Send:
    """One request a trigger makes: `kind` "message" (body of Create message, without `app_id`)
    or "custom_event" (one event of Create custom events)."""

    trigger: str
    kind: str
    user: str  # "label=id", for logs and dead letters
    body: dict[str, Any]
    idempotency_key: str
    table: str
    key: Any
    position: str
    seq: int = -1
    attempts: int = field(default=0)


def idempotency_key(source: str, position: str, table: str, key: Mapping[str, Any], ordinal: int,
                    trigger: str) -> str:
    row = ",".join(f"{k}={key[k]!s}" for k in sorted(key))
    return str(uuid.uuid5(NAMESPACE, f"{source}|{position}|{table}|{row}|{ordinal}|{trigger}"))


def _equal(value: Any, wanted: Any) -> bool:
    if value is UNCHANGED:
        return False
    if isinstance(wanted, list):
        return any(_equal(value, w) for w in wanted)
    if value is None or wanted is None:
        return value is None and wanted is None
    if isinstance(wanted, bool) or isinstance(value, bool):
        return str(value).lower() == str(wanted).lower()
    return value == wanted or str(value) == str(wanted)


def _conditions(row: Mapping[str, Any] | None, cond: Mapping[str, Any] | None) -> bool:
    if not cond:
        return True
    if row is None:
        return False
    return all(col in row and _equal(row[col], wanted) for col, wanted in cond.items())


def _changed(event: ChangeEvent, columns: Iterable[str]) -> bool:
    new, old = event.new, event.old
    if new is None or old is None:
        return False  # without the old row nothing can be said to have changed
    for col in columns:
        n = new.get(col, UNCHANGED)
        if n is UNCHANGED or col not in old or old[col] is UNCHANGED:
            continue
        if n != old[col]:
            return True
    return False


def send_after(v: Any) -> str | None:
    """A timestamp column as OneSignal's `send_after` ("2026-01-02 03:04:05 GMT+0000")."""
    if v is None or v is UNCHANGED:
        return None
    if isinstance(v, dt.datetime):
        if v.tzinfo is None:
            v = v.replace(tzinfo=dt.UTC)
        return str(v.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S GMT+0000"))
    if isinstance(v, (int, float)):  # unix seconds
        return dt.datetime.fromtimestamp(v, dt.UTC).strftime("%Y-%m-%d %H:%M:%S GMT+0000")
    return str(v)


class Matcher:
    def __init__(self, triggers: Iterable[TriggerConfig], source: str) -> None:
        self.source = source
        self.by_table: dict[str, list[TriggerConfig]] = {}
        for t in triggers:
            self.by_table.setdefault(t.table, []).append(t)

    @property
    def tables(self) -> frozenset[str]:
        return frozenset(self.by_table)

    def match(self, event: ChangeEvent, ordinal: int = 0) -> list[Send]:
        triggers = self.by_table.get(event.table)
        op = _OPS.get(event.op)
        if not triggers or op is None:  # snapshot, backfill, truncate: never
            return []
        out = []
        for t in triggers:
            send = self._one(t, event, op, ordinal)
            if send is not None:
                out.append(send)
        return out

    def _one(self, t: TriggerConfig, event: ChangeEvent, op: str, ordinal: int) -> Send | None:
        if op not in t.on:
            return None
        if t.changed is not None and not _changed(event, t.changed):
            return None
        if not _conditions(event.new, t.new) or not _conditions(event.old, t.old):
            return None
        row = event.new if event.new is not None else event.old
        if row is None:
            return None
        label, column = next(iter(t.user.items()))
        uid = row.get(column)
        if uid is None or uid is UNCHANGED or uid == "":
            return None  # no recipient
        uid = str(uid)
        key = idempotency_key(self.source, event.position, event.table, event.key, ordinal, t.name)

        def values(spec: Mapping[str, str]) -> dict[str, Any]:
            return {k: as_json_value(row.get(c)) for k, c in spec.items() if row.get(c) is not UNCHANGED}

        body: dict[str, Any]
        if t.message is not None:
            m = t.message
            body = {"include_aliases": {label: [uid]}, "target_channel": m.target_channel}
            if m.template_id is not None:
                body["template_id"] = m.template_id
            else:
                body["contents"] = dict(m.contents or {})
                if m.headings:
                    body["headings"] = dict(m.headings)
            if m.custom_data:
                body["custom_data"] = values(m.custom_data)
            if m.send_after:
                when = send_after(row.get(m.send_after))
                if when is not None:
                    body["send_after"] = when
            body["idempotency_key"] = key
            kind = "message"
        else:
            assert t.custom_event is not None
            body = {"name": t.custom_event.name, label: uid, "properties": values(t.custom_event.payload),
                    "idempotency_key": key}
            if event.commit_time is not None:
                body["timestamp"] = dt.datetime.fromtimestamp(event.commit_time, dt.UTC).isoformat()
            kind = "custom_event"
        return Send(t.name, kind, f"{label}={uid}", body, key, event.table, event.key, event.position)
