"""In-memory model of one OneSignal app (users, aliases, subscriptions) for the simulator.

Pure on purpose (no I/O; the clock is injected) so every rule of the API contract
(`onesignal-api.md`) can be unit-tested without a server. The HTTP layer (`simulator.py`) adds
auth, rate limits and faults, and turns `SimError` into responses.

Every operation validates and checks limits *before* it mutates anything, so a request that
fails leaves the state exactly as it was (the bridge relies on failed requests being no-ops).

`Rules` says how the model reads what OneSignal does not document or documents against a kind
server (docs/onesignal-semantics.md has the source of each): `STRICT` (the default) is the less
convenient reading of each point, `LENIENT` the simulator's behaviour before issue 14.
"""

from __future__ import annotations

import math
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

RESERVED_TAG_KEYS = frozenset(
    {"message", "notification", "subscription", "user", "template", "app", "org",
     "dynamic_content", "data_feed", "journey", "custom_data"}
)
# The union of the contract's list and the SDK's `Subscription.type` enum: the SDK refuses to
# deserialize a user whose subscription type is outside its enum, so nothing else is accepted.
SUBSCRIPTION_TYPES = frozenset(
    {"iOSPush", "AndroidPush", "FireOSPush", "ChromeExtensionPush", "ChromePush", "WindowsPush",
     "SafariLegacyPush", "FirefoxPush", "macOSPush", "HuaweiPush", "SafariPush", "Email", "SMS"}
)
MAX_PROPERTY_UPDATES = 100
MAX_SUBSCRIPTIONS = 20
MAX_CUSTOM_ALIASES = 20  # not counting onesignal_id and external_id
ONESIGNAL_ID = "onesignal_id"
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

_ALIAS_RE = re.compile(r"[^/?#&=\s\x00-\x1f\x7f-\x9f]{1,128}")
_SMS_RE = re.compile(r"\+[1-9]\d{6,14}")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_EMAIL_RE = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@" + _LABEL + r"(?:\." + _LABEL + r")+")
_LANGUAGE_RE = re.compile(r"[a-z]{2}")
_COUNTRY_RE = re.compile(r"[A-Z]{2}")


class SimError(Exception):
    """A request the API refuses: `status` and a `{"errors": [...]}` body, structured (objects
    with code and title) or basic (strings, with `extra` fields such as `"success": false`)."""

    def __init__(self, status: int, errors: list[dict[str, Any]] | list[str],
                 extra: dict[str, Any] | None = None) -> None:
        first = errors[0] if errors else ""
        super().__init__(f"{status}: {first['title'] if isinstance(first, dict) else first}")
        self.status = status
        self.errors = errors
        self.extra = extra or {}

    @classmethod
    def one(cls, status: int, code: str, title: str, meta: dict[str, Any] | None = None) -> SimError:
        error: dict[str, Any] = {"code": code, "title": title}
        if meta is not None:
            error["meta"] = meta
        return cls(status, [error])

    @classmethod
    def basic(cls, status: int, message: str) -> SimError:
        return cls(status, [message], {"success": False})

    def body(self) -> dict[str, Any]:
        return {"errors": self.errors, **self.extra}


def _show(value: Any) -> str:
    """A short rendering of a client value for an error title (never the whole payload)."""
    text = repr(value)
    return text if len(text) <= 64 else text[:61] + "..."


class _Problems:
    """Collects every validation problem of a request so that one 400 names all of them."""

    def __init__(self) -> None:
        self.errors: list[dict[str, Any]] = []

    def add(self, code: str, title: str) -> None:
        self.errors.append({"code": code, "title": title})

    def raise_if_any(self) -> None:
        if self.errors:
            raise SimError(400, self.errors)


# ---------------------------------------------------------------------------------------------
# Validation: each parser returns the cleaned value and records problems instead of raising.


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_alias(p: _Problems, where: str, label: Any, value: Any, *, allow_onesignal_id: bool) -> None:
    if not isinstance(label, str) or not _ALIAS_RE.fullmatch(label):
        p.add("invalid-alias", f"{where}: alias label {_show(label)} must be 1-128 characters "
                               "without /?#&=, whitespace or control characters")
    if not isinstance(value, str) or not _ALIAS_RE.fullmatch(value):
        p.add("invalid-alias", f"{where}.{label}: alias id {_show(value)} must be a string of 1-128 "
                               "characters without /?#&=, whitespace or control characters")
    if label == ONESIGNAL_ID and not allow_onesignal_id:
        p.add("alias-not-settable", f"{where}: onesignal_id is assigned by OneSignal and cannot be set")


def _parse_identity(p: _Problems, raw: Any, where: str, *, required: bool,
                    allow_onesignal_id: bool = False) -> dict[str, str]:
    if raw is None and not required:
        return {}
    if not isinstance(raw, dict):
        p.add("invalid-type", f"{where} must be an object of alias label to alias id")
        return {}
    if required and not raw:
        p.add("invalid-alias", f"{where} must name at least one alias")
    for label, value in raw.items():
        _check_alias(p, where, label, value, allow_onesignal_id=allow_onesignal_id)
    return {k: v for k, v in raw.items() if isinstance(v, str)}


def _parse_tags(p: _Problems, raw: Any, where: str) -> dict[str, str | None]:
    if not isinstance(raw, dict):
        p.add("invalid-type", f"{where} must be an object of tag key to string value")
        return {}
    for key, value in raw.items():
        if not key:
            p.add("invalid-tag-key", f"{where}: tag keys must not be empty")
        elif key.lower() in RESERVED_TAG_KEYS:
            p.add("reserved-tag-key", f"{where}.{key}: {key!r} is a reserved tag key")
        if value is not None and not isinstance(value, str):
            p.add("invalid-tag-value", f"{where}.{key}: tag values are strings (send numbers and "
                                       f"booleans as strings; \"\" or null deletes), got {_show(value)}")
    return dict(raw)


def _parse_property(p: _Problems, key: str, value: Any, where: str) -> Any:
    """Validate one non-tag property; None means "unset" and is always allowed."""
    path = f"{where}.{key}"
    if value is None:
        return None
    if key == "language":
        if not isinstance(value, str) or not _LANGUAGE_RE.fullmatch(value):
            p.add("invalid-language", f"{path}: language must be an ISO 639-1 code of 2 lowercase "
                                      f"letters, got {_show(value)}")
    elif key == "country":
        if not isinstance(value, str) or not _COUNTRY_RE.fullmatch(value):
            p.add("invalid-country", f"{path}: country must be an ISO 3166-1 alpha-2 code of 2 "
                                     f"uppercase letters, got {_show(value)}")
    elif key in ("timezone_id", "ip"):
        if not isinstance(value, str) or not value:
            p.add("invalid-type", f"{path} must be a non-empty string, got {_show(value)}")
    elif key in ("lat", "long"):
        bound = 90 if key == "lat" else 180
        if not _is_number(value) or abs(value) > bound:
            p.add("invalid-type", f"{path} must be a number between -{bound} and {bound}, "
                                  f"got {_show(value)}")
            return value
        return float(value)
    elif key in ("first_active", "last_active"):
        if not _is_number(value) or value < 0:
            p.add("invalid-type", f"{path} must be unix seconds (a number), got {_show(value)}")
            return value
        return int(value)
    else:
        hint = " (use deltas.purchases)" if key in ("purchases", "amount_spent") else ""
        p.add("unknown-property", f"{path}: {key!r} is not a settable property{hint}")
    return value


def _parse_properties(p: _Problems, raw: Any, where: str = "properties") -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        p.add("invalid-type", f"{where} must be an object")
        return {}
    tags = raw.get("tags")
    updates = len(raw) - ("tags" in raw) + (len(tags) if isinstance(tags, dict) else 0)
    if updates > MAX_PROPERTY_UPDATES:
        p.add("too-many-properties", f"{where}: {updates} property updates in one request; at most "
                                     f"{MAX_PROPERTY_UPDATES} (each tag counts as one): split the change")
    clean: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "tags":
            clean["tags"] = _parse_tags(p, {} if value is None else value, f"{where}.tags")
        else:
            clean[key] = _parse_property(p, key, value, where)
    return clean


def _parse_deltas(p: _Problems, raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        p.add("invalid-type", "deltas must be an object")
        return {}
    for key, value in raw.items():
        if key in ("session_time", "session_count"):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                p.add("invalid-type", f"deltas.{key} must be a non-negative integer")
        elif key == "purchases":
            if not isinstance(value, list) or not all(_valid_purchase(x) for x in value):
                p.add("invalid-type", "deltas.purchases must be a list of {sku, iso, amount, count} "
                                      "with string sku, iso, amount and integer count")
        else:
            p.add("unknown-property", f"deltas.{key} is not a known delta")
    return raw


def _valid_purchase(item: Any) -> bool:
    if not isinstance(item, dict) or not all(isinstance(item.get(k), str) for k in ("sku", "iso")):
        return False
    try:
        float(item.get("amount", "0"))
    except (TypeError, ValueError):
        return False
    count = item.get("count", 1)
    return isinstance(count, int) and not isinstance(count, bool)


def _check_token(p: _Problems, kind: str, token: Any, where: str) -> None:
    if kind == "Email":
        if not isinstance(token, str) or len(token) > 254 or not _EMAIL_RE.fullmatch(token):
            p.add("invalid-email", f"{where}.token: {_show(token)} is not an email address")
    elif kind == "SMS":
        if not isinstance(token, str) or not _SMS_RE.fullmatch(token):
            p.add("invalid-phone-number", f"{where}.token: {_show(token)} is not an E.164 phone "
                                          "number such as +15555550123")
    elif token is not None and (not isinstance(token, str) or not token):
        p.add("invalid-type", f"{where}.token must be a non-empty string")


def _parse_subscription(p: _Problems, raw: Any, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        p.add("invalid-type", f"{where} must be an object with type and token")
        return {}
    kind = raw.get("type")
    if kind not in SUBSCRIPTION_TYPES:
        p.add("invalid-subscription-type", f"{where}.type: {_show(kind)} is not a subscription type "
                                           f"(one of {', '.join(sorted(SUBSCRIPTION_TYPES))})")
    else:
        _check_token(p, kind, raw.get("token"), where)
    enabled = raw.get("enabled")
    if enabled is not None and not isinstance(enabled, bool):
        p.add("invalid-type", f"{where}.enabled must be a boolean")
    types = _parse_notification_types(p, raw, where)
    return {"type": kind, "token": raw.get("token"), "enabled": enabled, "notification_types": types}


def _parse_notification_types(p: _Problems, raw: dict[str, Any], where: str) -> int | None:
    value = raw.get("notification_types")
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        p.add("invalid-type", f"{where}.notification_types must be an integer (1 subscribed, -2 unsubscribed)")
        return None
    return value


def _require_object(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise SimError.one(400, "invalid-body", "the request body must be a JSON object")
    return raw


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
            raise SimError.one(404, "user-not-found", f"no user has the alias {label}={_show(alias_id)}")
        return user

    def lagging(self, user: User) -> bool:
        lag = self.rules.replication_lag_s
        return lag > 0 and self._clock() - user.created_at < lag

    def require_subscription(self, sub_id: str) -> Subscription:
        sub = self.subscriptions.get(sub_id)
        if sub is None:
            raise SimError.one(404, "subscription-not-found", f"no subscription has the id {_show(sub_id)}")
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
        body = _require_object(body)
        p = _Problems()
        identity = _parse_identity(p, body.get("identity"), "identity", required=False)
        properties = _parse_properties(p, body.get("properties"))
        subs_raw = body.get("subscriptions", [])
        if not isinstance(subs_raw, list):
            p.add("invalid-type", "subscriptions must be a list")
            subs_raw = []
        subs = [_parse_subscription(p, s, f"subscriptions[{i}]") for i, s in enumerate(subs_raw)]
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
        body = _require_object(body)
        p = _Problems()
        properties = _parse_properties(p, body.get("properties"))
        deltas = _parse_deltas(p, body.get("deltas"))
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
        body = _require_object(body)
        p = _Problems()
        identity = _parse_identity(p, body.get("identity"), "identity", required=True)
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
        body = _require_object(body)
        p = _Problems()
        sub = _parse_subscription(p, body.get("subscription"), "subscription")
        p.raise_if_any()
        user = self.require(label, alias_id)
        self._check_subscription_room(user, [sub])
        status, created = self._attach(user, sub)
        self._evict_overflow(user)
        return status, {"subscription": created.view()}

    def update_subscription(self, sub_id: str, body: Any) -> dict[str, Any]:
        body = _require_object(body)
        p = _Problems()
        raw = body.get("subscription")
        if not isinstance(raw, dict):
            p.add("invalid-type", "subscription must be an object")
            raw = {}
        enabled = raw.get("enabled")
        if enabled is not None and not isinstance(enabled, bool):
            p.add("invalid-type", "subscription.enabled must be a boolean")
        types = _parse_notification_types(p, raw, "subscription")
        p.raise_if_any()
        sub = self.require_subscription(sub_id)
        if raw.get("type") not in (None, sub.type):
            p.add("invalid-subscription-type", "a subscription's type never changes: delete and create")
        if "token" in raw:
            _check_token(p, sub.type, raw["token"], "subscription")
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
        body = _require_object(body)
        p = _Problems()
        identity = _parse_identity(p, body.get("identity"), "identity", required=True,
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
