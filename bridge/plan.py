"""Request planning: a user's merged batch becomes the fewest OneSignal calls (pure).

What OneSignal documents, and nothing more (docs/onesignal-semantics.md): Create user makes a new
user with everything, or, for an existing user, "modifies the subscriptions associated" with it;
Update user is the call that changes an existing user's properties.

- A user the bridge does not know to exist: one Create user carries identity, extra aliases, tags,
  properties and new subscriptions. When the answer shows the user already existed and the
  properties were not applied (`unapplied`), they follow by Update user (the dispatcher does it).
- A user the bridge knows to exist: tags and properties go by Update user; new aliases and new
  subscriptions by a Create user without properties (only when there are any).
- Past 100 property updates, the rest follows as Update-user calls of at most 100 each.
- Deleting the user, an alias or a subscription is the separate call it must be.
- A batch whose changes cancel out (nothing left to set) costs no call.
- `notification_types` (1 subscribed, -2 unsubscribed) travels with every `enabled`, as
  OneSignal's SDKs send it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bridge.coalesce import UserBatch
from bridge.events import UNCHANGED
from bridge.onesignal.client import Request, requests

MAX_PROPERTY_UPDATES = 100
SUBSCRIPTION_TYPES = {"email": "Email", "sms": "SMS"}
SUBSCRIBED, UNSUBSCRIBED = 1, -2  # notification_types


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


def consent(enabled: bool) -> dict[str, Any]:
    """A subscription's opt-in as OneSignal's SDKs send it: `enabled` and `notification_types`."""
    return {"enabled": enabled, "notification_types": SUBSCRIBED if enabled else UNSUBSCRIBED}


def subscription_item(channel: str, token: str, enabled: bool | None) -> dict[str, Any]:
    item: dict[str, Any] = {"type": SUBSCRIPTION_TYPES[channel], "token": token}
    if enabled is not None:
        item.update(consent(enabled))
    return item


def answered_enabled(sub: Mapping[str, Any]) -> bool:
    """Whether a subscription in an answer is opted in: `enabled`, unless notification_types says
    unsubscribed (zero or negative)."""
    types = sub.get("notification_types")
    unsubscribed = isinstance(types, int) and not isinstance(types, bool) and types <= 0
    return sub.get("enabled", True) is not False and not unsubscribed


def plan(batch: UserBatch, subscriptions: list[dict[str, Any]] | None = None, *, exists: bool = False,
         aliases: Mapping[str, str] | None = None) -> list[Request]:
    """The calls for `batch`. `subscriptions`: the new subscriptions to send, as decided against
    the known subscription state (default: every address in the batch). `exists`: an answer has
    shown the user exists (its properties then go by Update user); `aliases`: the aliases such an
    answer confirmed (not sent again)."""
    label, uid = batch.user.label, batch.user.id
    out: list[Request] = []
    if batch.delete_user:
        out.append(requests.delete_user(label, uid))
        exists = False  # whatever follows re-creates the user
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

    if exists:
        confirmed = aliases or {}
        new_aliases = {k: v for k, v in identity.items() if k != label and confirmed.get(k) != v}
        if new_aliases or subscriptions:
            out.append(requests.create_user({label: uid, **new_aliases}, None, subscriptions or None))
        if updates:
            out += [requests.update_user(label, uid, _properties(chunk))
                    for chunk in _chunks(updates, MAX_PROPERTY_UPDATES)]
        return out
    if not updates and not subscriptions and len(identity) == 1 and not (batch.delete_user and batch.recreate):
        return out
    chunks = _chunks(updates, MAX_PROPERTY_UPDATES)
    out.append(requests.create_user(identity, _properties(chunks[0]), subscriptions or None))
    for chunk in chunks[1:]:
        out.append(requests.update_user(label, uid, _properties(chunk)))
    return out


def _same(sent: Any, held: Any) -> bool:
    if sent in ("", None):  # a deletion is applied when the answer no longer has it
        return held in ("", None)
    if isinstance(sent, (int, float)) and isinstance(held, (int, float)):
        return float(sent) == float(held)
    return bool(sent == held)


def unapplied(sent: Mapping[str, Any], answer: Any) -> dict[str, Any]:
    """The properties (tags included) a Create user sent that its answer does not show applied:
    they must follow by Update user. An answer without properties shows nothing: all of them."""
    held = answer.get("properties") if isinstance(answer, dict) else None
    if not isinstance(held, dict):
        return dict(sent)
    out: dict[str, Any] = {}
    for key, value in sent.items():
        if key == "tags" and isinstance(value, dict):
            have = held.get("tags")
            have = have if isinstance(have, dict) else {}
            tags = {k: v for k, v in value.items() if not _same(v, have.get(k))}
            if tags:
                out["tags"] = tags
        elif not _same(value, held.get(key)):
            out[key] = value
    return out


def without_tags(req: Request, *, deletions: bool) -> tuple[dict[str, Any], Request | None]:
    """For a request OneSignal refused for its tag limit: the tags left out, and the same request
    without them (None when nothing would be left to send). `deletions`: also leave out the tags it
    deletes (they never add to the count; dropped only when OneSignal refuses them too)."""
    body = req.body or {}
    props = dict(body.get("properties") or {})
    tags = props.pop("tags", None) or {}
    dropped = {k: v for k, v in tags.items() if deletions or v not in ("", None)}
    kept = {k: v for k, v in tags.items() if k not in dropped}
    if kept:
        props["tags"] = kept
    if req.endpoint == "POST /users":
        return dropped, requests.create_user(body.get("identity") or {}, props or None,
                                             body.get("subscriptions") or None)
    if req.endpoint == "PATCH /users/by" and props:
        label, uid = req.segments[2], req.segments[3]
        return dropped, requests.update_user(label, uid, props)
    return dropped, None
