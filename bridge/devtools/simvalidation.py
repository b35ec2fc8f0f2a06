"""What a request to the simulator may carry: each body checked before the state changes.

The parsers return the cleaned value and record every problem (`Problems`), so one 400 names all
of them; `SimError` is a request the API refuses, raised by the model (`simstate.py`) and the HTTP
layer (`simulator.py`) alike. The rules are the API contract's (`onesignal-api.md`).
"""

from __future__ import annotations

import math
import re
from typing import Any

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
ONESIGNAL_ID = "onesignal_id"

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


def show(value: Any) -> str:
    """A short rendering of a client value for an error title (never the whole payload)."""
    text = repr(value)
    return text if len(text) <= 64 else text[:61] + "..."


class Problems:
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


def _check_alias(p: Problems, where: str, label: Any, value: Any, *, allow_onesignal_id: bool) -> None:
    if not isinstance(label, str) or not _ALIAS_RE.fullmatch(label):
        p.add("invalid-alias", f"{where}: alias label {show(label)} must be 1-128 characters "
                               "without /?#&=, whitespace or control characters")
    if not isinstance(value, str) or not _ALIAS_RE.fullmatch(value):
        p.add("invalid-alias", f"{where}.{label}: alias id {show(value)} must be a string of 1-128 "
                               "characters without /?#&=, whitespace or control characters")
    if label == ONESIGNAL_ID and not allow_onesignal_id:
        p.add("alias-not-settable", f"{where}: onesignal_id is assigned by OneSignal and cannot be set")


def parse_identity(p: Problems, raw: Any, where: str, *, required: bool,
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


def _parse_tags(p: Problems, raw: Any, where: str) -> dict[str, str | None]:
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
                                       f"booleans as strings; \"\" or null deletes), got {show(value)}")
    return dict(raw)


def _parse_property(p: Problems, key: str, value: Any, where: str) -> Any:
    """Validate one non-tag property; None means "unset" and is always allowed."""
    path = f"{where}.{key}"
    if value is None:
        return None
    if key == "language":
        if not isinstance(value, str) or not _LANGUAGE_RE.fullmatch(value):
            p.add("invalid-language", f"{path}: language must be an ISO 639-1 code of 2 lowercase "
                                      f"letters, got {show(value)}")
    elif key == "country":
        if not isinstance(value, str) or not _COUNTRY_RE.fullmatch(value):
            p.add("invalid-country", f"{path}: country must be an ISO 3166-1 alpha-2 code of 2 "
                                     f"uppercase letters, got {show(value)}")
    elif key in ("timezone_id", "ip"):
        if not isinstance(value, str) or not value:
            p.add("invalid-type", f"{path} must be a non-empty string, got {show(value)}")
    elif key in ("lat", "long"):
        bound = 90 if key == "lat" else 180
        if not _is_number(value) or abs(value) > bound:
            p.add("invalid-type", f"{path} must be a number between -{bound} and {bound}, "
                                  f"got {show(value)}")
            return value
        return float(value)
    elif key in ("first_active", "last_active"):
        if not _is_number(value) or value < 0:
            p.add("invalid-type", f"{path} must be unix seconds (a number), got {show(value)}")
            return value
        return int(value)
    else:
        hint = " (use deltas.purchases)" if key in ("purchases", "amount_spent") else ""
        p.add("unknown-property", f"{path}: {key!r} is not a settable property{hint}")
    return value


def parse_properties(p: Problems, raw: Any, where: str = "properties") -> dict[str, Any]:
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


def parse_deltas(p: Problems, raw: Any) -> dict[str, Any]:
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


def check_token(p: Problems, kind: str, token: Any, where: str) -> None:
    if kind == "Email":
        if not isinstance(token, str) or len(token) > 254 or not _EMAIL_RE.fullmatch(token):
            p.add("invalid-email", f"{where}.token: {show(token)} is not an email address")
    elif kind == "SMS":
        if not isinstance(token, str) or not _SMS_RE.fullmatch(token):
            p.add("invalid-phone-number", f"{where}.token: {show(token)} is not an E.164 phone "
                                          "number such as +15555550123")
    elif token is not None and (not isinstance(token, str) or not token):
        p.add("invalid-type", f"{where}.token must be a non-empty string")


def parse_subscription(p: Problems, raw: Any, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        p.add("invalid-type", f"{where} must be an object with type and token")
        return {}
    kind = raw.get("type")
    if kind not in SUBSCRIPTION_TYPES:
        p.add("invalid-subscription-type", f"{where}.type: {show(kind)} is not a subscription type "
                                           f"(one of {', '.join(sorted(SUBSCRIPTION_TYPES))})")
    else:
        check_token(p, kind, raw.get("token"), where)
    enabled = raw.get("enabled")
    if enabled is not None and not isinstance(enabled, bool):
        p.add("invalid-type", f"{where}.enabled must be a boolean")
    types = parse_notification_types(p, raw, where)
    return {"type": kind, "token": raw.get("token"), "enabled": enabled, "notification_types": types}


def parse_notification_types(p: Problems, raw: dict[str, Any], where: str) -> int | None:
    value = raw.get("notification_types")
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        p.add("invalid-type", f"{where}.notification_types must be an integer (1 subscribed, -2 unsubscribed)")
        return None
    return value


def require_object(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise SimError.one(400, "invalid-body", "the request body must be a JSON object")
    return raw
