"""In-memory model of one OneSignal app (users, aliases, subscriptions) for the simulator.

Pure on purpose (no I/O; the clock is injected) so every rule of the API contract
(`onesignal-api.md`) can be unit-tested without a server. The HTTP layer (`simulator.py`) adds
auth, rate limits and faults, and turns `SimError` into responses. What a request body may
carry is checked in `simvalidation.py`.

Every operation validates and checks limits *before* it mutates anything, so a request that
fails leaves the state exactly as it was (the bridge relies on failed requests being no-ops).

`Rules` says how the model reads what OneSignal does not document or documents against a kind
server (docs/onesignal-semantics.md has the source of each): `STRICT` (the default) is the less
convenient reading of each point, `LENIENT` the simulator's behaviour before issue 14.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from bridge.devtools.simvalidation import (
    ONESIGNAL_ID,
    Problems,
    SimError,
    check_token,
    parse_deltas,
    parse_identity,
    parse_notification_types,
    parse_properties,
    parse_subscription,
    require_object,
    show,
)

MAX_SUBSCRIPTIONS = 20
MAX_CUSTOM_ALIASES = 20  # not counting onesignal_id and external_id
# An evicted subscription never leaves a user with fewer than this many of each (the subscriptions
# guide: "OneSignal ensures at least 3 Email and 3 SMS Subscriptions").
KEEP_PER_CHANNEL = {"Email": 3, "SMS": 3}
SUBSCRIBED, UNSUBSCRIBED = 1, -2  # notification_types as OneSignal's SDKs send them


def tag_limit_message(limit: int) -> str:
    """OneSignal's words for a write that would leave a user over the app's tag limit."""
    return f"App is limited to a maximum of {limit} tags on a given player"


@dataclass(frozen=True, slots=True)
class Rules:
    """The readings the model takes where OneSignal's behaviour is undocumented or unkind."""

    # Create user on an existing user: merge `properties` (lenient) or ignore them (strict: the
    # reference only says it modifies the user's subscriptions; Update user changes properties).
    create_applies_properties: bool = False
    # For this long after a user is created, lookups by alias (GET, PATCH, DELETE and the
    # /identity and /subscriptions routes below them) answer 404 and apply nothing.
    replication_lag_s: float = 2.0
    # A write that adds tags and would leave the user above this many answers 400 (None: no limit).
    max_tags: int | None = 10
    # A 21st subscription: "evict" the oldest to a new anonymous user, or "refuse" it with 409.
    subscription_overflow: Literal["evict", "refuse"] = "evict"
    # notification_types is its own field ("separate") or always follows `enabled` ("derived").
    notification_types: Literal["separate", "derived"] = "separate"
    # A subscription sent again (same type and token, even when it moves to another user) keeps
    # its state ("keep") or takes the `enabled` sent ("update").
    resent_subscription: Literal["keep", "update"] = "keep"


STRICT = Rules()
LENIENT = Rules(create_applies_properties=True, replication_lag_s=0.0, max_tags=None,
                subscription_overflow="refuse", notification_types="derived", resent_subscription="update")


# ---------------------------------------------------------------------------------------------
# The model.


@dataclass(slots=True)
class Subscription:
    id: str
    type: str
    token: str | None
    enabled: bool
    owner: str  # onesignal_id of the user that holds it
    notification_types: int = SUBSCRIBED

    def key(self) -> tuple[str, str] | None:
        """Identity of a subscription across users: the same type+token is the same channel."""
        return (self.type, self.token) if self.token is not None else None

    def view(self) -> dict[str, Any]:
        view: dict[str, Any] = {"id": self.id, "type": self.type, "enabled": self.enabled,
                                "notification_types": self.notification_types}
        if self.token is not None:
            view["token"] = self.token
        return view


@dataclass(slots=True)
class User:
    onesignal_id: str
    identity: dict[str, str]
    properties: dict[str, Any] = field(default_factory=lambda: {"tags": {}})
    subscription_ids: list[str] = field(default_factory=list)  # oldest first
    session_time: int = 0
    session_count: int = 0
    created_at: float = 0.0  # the state's clock when the user was created


def _merge_properties(user: User, properties: dict[str, Any]) -> None:
    """PATCH semantics: keys left out stay; a tag set to "" or null, or a property set to null, goes."""
    props = user.properties
    for key, value in properties.items():
        if key == "tags":
            for tag, tag_value in value.items():
                if tag_value in (None, ""):
                    props["tags"].pop(tag, None)
                else:
                    props["tags"][tag] = tag_value
        elif value is None:
            props.pop(key, None)
        else:
            props[key] = value


def _apply_deltas(user: User, deltas: dict[str, Any]) -> None:
    user.session_time += deltas.get("session_time", 0)
    user.session_count += deltas.get("session_count", 0)
    for purchase in deltas.get("purchases", []):
        count = purchase.get("count", 1)
        user.properties.setdefault("purchases", []).append(dict(purchase))
        spent = user.properties.get("amount_spent", 0.0) + float(purchase.get("amount", "0")) * count
        user.properties["amount_spent"] = round(spent, 2)


def _conflict(aliases: dict[str, str], title: str) -> SimError:
    return SimError.one(409, "user-2", title, {"conflicting_aliases": aliases})


def _primary_alias(body: Any) -> tuple[str, str] | None:
    """external_id of a create body, else its first alias: how a new user is named in limits and logs."""
    identity = body.get("identity") if isinstance(body, dict) else None
    if not isinstance(identity, dict) or not identity:
        return None
    if isinstance(identity.get("external_id"), str):
        return "external_id", identity["external_id"]
    label, value = next(iter(identity.items()))
    return (label, value) if isinstance(value, str) else None


class SimState:
    """Users, their aliases and subscriptions, with the indexes the API looks them up by."""

    def __init__(self, new_id: Callable[[], str] = lambda: str(uuid.uuid4()), *, rules: Rules = STRICT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._new_id = new_id
        self.rules = rules
        self._clock = clock
        self.users: dict[str, User] = {}
        self.subscriptions: dict[str, Subscription] = {}
        self._aliases: dict[tuple[str, str], str] = {}
        self._tokens: dict[tuple[str, str], str] = {}

    # -- lookups --------------------------------------------------------------------------------

    def find(self, label: str, alias_id: str) -> User | None:
        if label == ONESIGNAL_ID:
            return self.users.get(alias_id)
        owner = self._aliases.get((label, alias_id))
        return self.users.get(owner) if owner else None

    def require(self, label: str, alias_id: str) -> User:
        """The user an alias names, for every route *by alias*: 404 when there is none, and also
        while the user is younger than the replication lag (its creation has not reached the
        replicas that serve reads and updates)."""
        user = self.find(label, alias_id)
        if user is None or self.lagging(user):
            raise SimError.one(404, "user-not-found", f"no user has the alias {label}={show(alias_id)}")
        return user

    def lagging(self, user: User) -> bool:
        lag = self.rules.replication_lag_s
        return lag > 0 and self._clock() - user.created_at < lag

    def require_subscription(self, sub_id: str) -> Subscription:
        sub = self.subscriptions.get(sub_id)
        if sub is None:
            raise SimError.one(404, "subscription-not-found", f"no subscription has the id {show(sub_id)}")
        return sub

    def view(self, user: User) -> dict[str, Any]:
        """The View user shape: what GET /users/by/... and Create user answer."""
        props = {k: (dict(v) if isinstance(v, dict) else v) for k, v in user.properties.items()}
        subs = [self.subscriptions[sid].view() for sid in user.subscription_ids]
        return {"properties": props, "identity": dict(user.identity), "subscriptions": subs}

    def view_all(self) -> list[dict[str, Any]]:
        return [self.view(user) for user in self.users.values()]

    # -- rate-limit keys and log subjects ----------------------------------------------------------

    def alias_keys(self, label: str, alias_id: str) -> list[str]:
        """Keys that name one user for the per-user limit: the alias used and the user behind it."""
        keys = [f"alias:{label}/{alias_id}" if label != ONESIGNAL_ID else f"user:{alias_id}"]
        user = self.find(label, alias_id)
        if user is not None:
            keys.append(f"user:{user.onesignal_id}")
        return keys

    def create_keys(self, body: Any) -> list[str]:
        """Create user: every existing user the body's aliases name, plus its primary alias."""
        keys: list[str] = []
        primary = _primary_alias(body)
        if primary is not None:
            keys.append(f"alias:{primary[0]}/{primary[1]}")
        identity = body.get("identity") if isinstance(body, dict) else None
        if isinstance(identity, dict):
            for label, value in identity.items():
                user = self.find(label, value) if isinstance(value, str) else None
                if user is not None:
                    keys.append(f"user:{user.onesignal_id}")
        return keys

    @staticmethod
    def create_subject(body: Any) -> str | None:
        primary = _primary_alias(body)
        return primary[1] if primary else None

    # -- users --------------------------------------------------------------------------------

    def create_user(self, body: Any) -> tuple[int, dict[str, Any]]:
        """Create or upsert: 200 with a new user, 202 when the body's aliases found one."""
        body = require_object(body)
        p = Problems()
        identity = parse_identity(p, body.get("identity"), "identity", required=False)
        properties = parse_properties(p, body.get("properties"))
        subs_raw = body.get("subscriptions", [])
        if not isinstance(subs_raw, list):
            p.add("invalid-type", "subscriptions must be a list")
            subs_raw = []
        subs = [parse_subscription(p, s, f"subscriptions[{i}]") for i, s in enumerate(subs_raw)]
        if not identity and not subs and not p.errors:
            p.add("invalid-body", "a user needs at least one alias in identity or one subscription")
        p.raise_if_any()
        user = self._owner_of(identity)
        self._check_alias_room(user, identity)
        applies = user is None or self.rules.create_applies_properties
        if applies:
            self._check_tag_room(user, properties)
        self._check_subscription_room(user, subs)
        status = 200 if user is None else 202
        if user is None:
            user = self._new_user()
        self._set_aliases(user, identity)
        if applies:  # strict: an existing user's properties change only through Update user
            _merge_properties(user, properties)
        for sub in subs:
            self._attach(user, sub)
        self._evict_overflow(user)
        return status, self.view(user)

    def update_user(self, label: str, alias_id: str, body: Any) -> dict[str, Any]:
        """PATCH: merge properties, add deltas; answers the properties as sent."""
        body = require_object(body)
        p = Problems()
        properties = parse_properties(p, body.get("properties"))
        deltas = parse_deltas(p, body.get("deltas"))
        p.raise_if_any()
        user = self.require(label, alias_id)
        self._check_tag_room(user, properties)
        _merge_properties(user, properties)
        _apply_deltas(user, deltas)
        echo = {k: v for k, v in properties.items() if v is not None}
        return {"properties": echo}

    def delete_user(self, label: str, alias_id: str) -> dict[str, Any]:
        user = self.require(label, alias_id)
        for sid in list(user.subscription_ids):
            self._drop_subscription(self.subscriptions[sid])
        for alias in user.identity.items():
            self._aliases.pop(alias, None)
        del self.users[user.onesignal_id]
        return {"identity": {ONESIGNAL_ID: user.onesignal_id}}

    # -- aliases ------------------------------------------------------------------------------

    def get_identity(self, label: str, alias_id: str) -> dict[str, Any]:
        return {"identity": dict(self.require(label, alias_id).identity)}

    def upsert_identity(self, label: str, alias_id: str, body: Any) -> dict[str, Any]:
        body = require_object(body)
        p = Problems()
        identity = parse_identity(p, body.get("identity"), "identity", required=True)
        p.raise_if_any()
        user = self.require(label, alias_id)
        taken = {k: v for k, v in identity.items()
                 if (owner := self.find(k, v)) is not None and owner is not user}
        if taken:
            raise _conflict(taken, "an alias in the request already belongs to another user")
        self._check_alias_room(user, identity)
        self._set_aliases(user, identity)
        return {"identity": dict(user.identity)}

    def delete_alias(self, label: str, alias_id: str, label_to_delete: str) -> dict[str, Any]:
        if label_to_delete == ONESIGNAL_ID:
            raise SimError.one(400, "alias-not-settable", "onesignal_id cannot be deleted")
        user = self.require(label, alias_id)
        old = user.identity.pop(label_to_delete, None)
        if old is not None:
            self._aliases.pop((label_to_delete, old), None)
        return {"identity": dict(user.identity)}

    # -- subscriptions ------------------------------------------------------------------------

    def create_subscription(self, label: str, alias_id: str, body: Any) -> tuple[int, dict[str, Any]]:
        """201 new, 200 already this user's (unchanged), 202 moved here from another user."""
        body = require_object(body)
        p = Problems()
        sub = parse_subscription(p, body.get("subscription"), "subscription")
        p.raise_if_any()
        user = self.require(label, alias_id)
        self._check_subscription_room(user, [sub])
        status, created = self._attach(user, sub)
        self._evict_overflow(user)
        return status, {"subscription": created.view()}

    def update_subscription(self, sub_id: str, body: Any) -> dict[str, Any]:
        body = require_object(body)
        p = Problems()
        raw = body.get("subscription")
        if not isinstance(raw, dict):
            p.add("invalid-type", "subscription must be an object")
            raw = {}
        enabled = raw.get("enabled")
        if enabled is not None and not isinstance(enabled, bool):
            p.add("invalid-type", "subscription.enabled must be a boolean")
        types = parse_notification_types(p, raw, "subscription")
        p.raise_if_any()
        sub = self.require_subscription(sub_id)
        if raw.get("type") not in (None, sub.type):
            p.add("invalid-subscription-type", "a subscription's type never changes: delete and create")
        if "token" in raw:
            check_token(p, sub.type, raw["token"], "subscription")
        p.raise_if_any()
        token = raw.get("token", sub.token)
        holder = self._tokens.get((sub.type, token)) if token is not None else None
        if holder is not None and holder != sub.id:
            raise SimError.one(409, "subscription-conflict",
                               f"another subscription already has this {sub.type} token")
        if token != sub.token:
            if (old_key := sub.key()) is not None:
                del self._tokens[old_key]
            sub.token = token
            if (new_key := sub.key()) is not None:
                self._tokens[new_key] = sub.id
        self._set_consent(sub, enabled, types)
        return {}

    def subscription_owner_identity(self, sub_id: str) -> dict[str, Any]:
        """View user identity by subscription: the aliases of the user that holds it."""
        sub = self.require_subscription(sub_id)
        return {"identity": dict(self.users[sub.owner].identity)}

    def delete_subscription(self, sub_id: str) -> dict[str, Any]:
        self._drop_subscription(self.require_subscription(sub_id))
        return {}

    def transfer_subscription(self, sub_id: str, body: Any) -> dict[str, Any]:
        body = require_object(body)
        p = Problems()
        identity = parse_identity(p, body.get("identity"), "identity", required=True,
                                   allow_onesignal_id=True)
        if len(identity) > 1:
            p.add("invalid-alias", "identity must name exactly one alias of the new owner")
        p.raise_if_any()
        sub = self.require_subscription(sub_id)
        (label, alias_id), = identity.items()
        target = self.require(label, alias_id)
        if sub.owner != target.onesignal_id:
            self._check_subscription_room(target, [{"type": sub.type, "token": sub.token, "id": sub.id}])
            self._move(sub, target)
            self._evict_overflow(target)
        return {"identity": dict(target.identity)}

    # -- internals ----------------------------------------------------------------------------

    def _new_user(self) -> User:
        osid = self._new_id()
        user = User(onesignal_id=osid, identity={ONESIGNAL_ID: osid}, created_at=self._clock())
        self.users[osid] = user
        self._aliases[(ONESIGNAL_ID, osid)] = osid
        return user

    def _owner_of(self, identity: dict[str, str]) -> User | None:
        """The one existing user the aliases name, None for none, 409 when they name several."""
        owners = {label: user for label, value in identity.items()
                  if (user := self.find(label, value)) is not None}
        distinct = {user.onesignal_id: user for user in owners.values()}
        if len(distinct) > 1:
            primary = owners.get("external_id") or next(iter(owners.values()))
            conflicting = {label: identity[label] for label, user in owners.items() if user is not primary}
            raise _conflict(conflicting, "the aliases in the request belong to different users")
        return next(iter(distinct.values()), None)

    def _check_alias_room(self, user: User | None, identity: dict[str, str]) -> None:
        labels = set(user.identity if user else ()) | set(identity)
        custom = labels - {ONESIGNAL_ID, "external_id"}
        if len(custom) > MAX_CUSTOM_ALIASES:
            raise SimError.one(409, "alias-limit", f"a user has at most {MAX_CUSTOM_ALIASES} custom aliases")

    def _check_tag_room(self, user: User | None, properties: dict[str, Any]) -> None:
        """400 (OneSignal's basic body) when the write adds tags and would leave the user with more
        than the app's limit. Writes that only change or delete tags always pass."""
        limit = self.rules.max_tags
        tags = properties.get("tags") or {}
        if limit is None or not tags:
            return
        result = dict(user.properties.get("tags", {})) if user is not None else {}
        added = False
        for key, value in tags.items():
            if value in (None, ""):
                result.pop(key, None)
            else:
                added = added or key not in result
                result[key] = value
        if added and len(result) > limit:
            raise SimError.basic(400, tag_limit_message(limit))

    def _check_subscription_room(self, user: User | None, subs: list[dict[str, Any]]) -> None:
        """409 when attaching `subs` would leave the user with more than 20 subscriptions (only
        when overflow is refused; otherwise the oldest are evicted after the write)."""
        if self.rules.subscription_overflow == "evict":
            return
        held = {self.subscriptions[sid].key() for sid in user.subscription_ids} if user else set()
        incoming: set[Any] = set()
        extra = 0
        for i, sub in enumerate(subs):
            key = (sub["type"], sub["token"]) if sub.get("token") is not None else ("no-token", i)
            if key not in held and key not in incoming:
                incoming.add(key)
                extra += 1
        count = len(user.subscription_ids) if user else 0
        if count + extra > MAX_SUBSCRIPTIONS:
            raise SimError.one(409, "subscription-limit",
                               f"a user has at most {MAX_SUBSCRIPTIONS} subscriptions "
                               f"(this one has {count}, the request adds {extra})")

    def _set_aliases(self, user: User, identity: dict[str, str]) -> None:
        for label, value in identity.items():
            old = user.identity.get(label)
            if old is not None:
                self._aliases.pop((label, old), None)
            user.identity[label] = value
            self._aliases[(label, value)] = user.onesignal_id

    def _attach(self, user: User, sub: dict[str, Any]) -> tuple[int, Subscription]:
        token = sub.get("token")
        existing_id = self._tokens.get((sub["type"], token)) if token is not None else None
        if existing_id is not None:
            existing = self.subscriptions[existing_id]
            if existing.owner == user.onesignal_id:
                return 200, existing
            self._move(existing, user)
            if self.rules.resent_subscription == "update":
                self._set_consent(existing, sub.get("enabled"), sub.get("notification_types"))
            return 202, existing
        enabled = True if sub.get("enabled") is None else sub["enabled"]
        created = Subscription(self._new_id(), sub["type"], token, enabled, user.onesignal_id,
                               SUBSCRIBED if enabled else UNSUBSCRIBED)
        self._set_consent(created, None, sub.get("notification_types"))
        self.subscriptions[created.id] = created
        if (key := created.key()) is not None:
            self._tokens[key] = created.id
        user.subscription_ids.append(created.id)
        return 201, created

    def _set_consent(self, sub: Subscription, enabled: bool | None, types: int | None) -> None:
        """Apply `enabled` and `notification_types` as sent. Derived: notification_types follows
        `enabled` and is never set on its own. Separate: each field changes only when sent."""
        if enabled is not None:
            sub.enabled = enabled
        if self.rules.notification_types == "derived":
            sub.notification_types = SUBSCRIBED if sub.enabled else UNSUBSCRIBED
        elif types is not None:
            sub.notification_types = types

    def _evict_overflow(self, user: User) -> None:
        """Past 20 subscriptions, the oldest go to new anonymous users (the subscriptions guide),
        never taking a user below 3 Email or 3 SMS subscriptions."""
        while len(user.subscription_ids) > MAX_SUBSCRIPTIONS:
            held = [self.subscriptions[sid] for sid in user.subscription_ids]
            count = {kind: sum(s.type == kind for s in held) for kind in KEEP_PER_CHANNEL}
            oldest = next((s for s in held if count.get(s.type, 99) > KEEP_PER_CHANNEL.get(s.type, 0)),
                          held[0])
            self._move(oldest, self._new_user())

    def _move(self, sub: Subscription, target: User) -> None:
        self.users[sub.owner].subscription_ids.remove(sub.id)
        sub.owner = target.onesignal_id
        target.subscription_ids.append(sub.id)

    def _drop_subscription(self, sub: Subscription) -> None:
        self.users[sub.owner].subscription_ids.remove(sub.id)
        if (key := sub.key()) is not None:
            self._tokens.pop(key, None)
        del self.subscriptions[sub.id]
