"""Request planning: a user's merged batch becomes the fewest OneSignal calls (pure).

- One Create-user upsert carries identity, extra aliases, tags, properties and new subscriptions.
- Past 100 property updates, the rest follows as Update-user calls of at most 100 each.
- Deleting the user, an alias or a subscription is the separate call it must be.
- A batch whose changes cancel out (nothing left to set) costs no call.
"""

from __future__ import annotations

from typing import Any

from bridge.coalesce import UserBatch
from bridge.events import UNCHANGED
from bridge.onesignal.client import Request, requests

MAX_PROPERTY_UPDATES = 100
SUBSCRIPTION_TYPES = {"email": "Email", "sms": "SMS"}


def _chunks(updates: list[tuple[str, str, Any]], size: int) -> list[list[tuple[str, str, Any]]]:
    return [updates[i : i + size] for i in range(0, len(updates), size)] or [[]]


def _properties(chunk: list[tuple[str, str, Any]]) -> dict[str, Any]:
    props: dict[str, Any] = {}
    tags: dict[str, str] = {}
    for kind, key, value in chunk:
        if kind == "tag":
            tags[key] = value
        else:
            props[key] = value
    if tags:
        props["tags"] = tags
    return props


def subscription_item(channel: str, token: str, enabled: bool | None) -> dict[str, Any]:
    item: dict[str, Any] = {"type": SUBSCRIPTION_TYPES[channel], "token": token}
    if enabled is not None:
        item["enabled"] = enabled
    return item


def plan(batch: UserBatch, subscriptions: list[dict[str, Any]] | None = None) -> list[Request]:
    """The calls for `batch`. `subscriptions`: the new subscriptions to fold into the upsert, as
    decided against the known subscription state (default: every address in the batch)."""
    label, uid = batch.user.label, batch.user.id
    out: list[Request] = []
    if batch.delete_user:
        out.append(requests.delete_user(label, uid))
    else:
        for alias_label, value in batch.aliases.items():
            if value is None:
                out.append(requests.delete_alias(label, uid, alias_label))

    identity = {label: uid}
    identity.update({k: v for k, v in batch.aliases.items() if v is not None and k != label})
    updates: list[tuple[str, str, Any]] = []
    for key, value in batch.tags.items():
        if value is None:
            if batch.delete_user:
                continue  # the user starts afresh: nothing to delete
            value = ""
        updates.append(("tag", key, value))
    updates.extend(("prop", k, v) for k, v in batch.properties.items())
    if subscriptions is None:
        subscriptions = [
            subscription_item(channel, sub.token, sub.enabled)
            for channel, sub in batch.subscriptions.items()
            if sub.token not in (None, UNCHANGED)  # removals and consent-only changes need ids
        ]

    if not updates and not subscriptions and len(identity) == 1 and not (batch.delete_user and batch.recreate):
        return out
    chunks = _chunks(updates, MAX_PROPERTY_UPDATES)
    out.append(requests.create_user(identity, _properties(chunks[0]), subscriptions or None))
    for chunk in chunks[1:]:
        out.append(requests.update_user(label, uid, _properties(chunk)))
    return out
