"""How strictly the simulator reads OneSignal: `Settings`, one field per strict-or-lenient point.

`STRICT` (the default) and `LENIENT` are the presets (simulator.py's docstring lists the points;
docs/onesignal-semantics.md names the source of each). The same names serve the command-line flags
(`simflags.py`, read by `settings_from_args`) and `POST /_simulator/config` (`parse_settings`).
`Settings.rules()` is the part the model (`simstate.Rules`) takes; the rest is the HTTP layer's.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from bridge.devtools.simstate import Rules
from bridge.devtools.simvalidation import SimError


@dataclass(frozen=True)
class Settings:
    """Every strict-or-lenient point, by the name its flag and `/_simulator/config` key use."""

    create_applies_properties: bool = False
    replication_lag_ms: float = 2000.0
    max_tags: int = 10  # 0: no limit
    subscription_overflow: str = "evict"  # evict | refuse
    notification_types: str = "separate"  # separate | derived
    resent_subscription: str = "keep"  # keep | update
    wrong_key_status: int = 403  # 403 | 401
    basic_auth: str = "refuse"  # refuse | accept
    rate_limit_body: str = "real"  # real | structured
    omit_retry_after_every: int = 2  # every Nth 429 has no Retry-After (0: never)
    view_rate_per_s: float = 1.0

    def rules(self) -> Rules:
        return Rules(create_applies_properties=self.create_applies_properties,
                     replication_lag_s=self.replication_lag_ms / 1000.0,
                     max_tags=self.max_tags or None,
                     subscription_overflow="refuse" if self.subscription_overflow == "refuse" else "evict",
                     notification_types="derived" if self.notification_types == "derived" else "separate",
                     resent_subscription="update" if self.resent_subscription == "update" else "keep")

    def public(self) -> dict[str, Any]:
        return asdict(self)


STRICT = Settings()
LENIENT = Settings(create_applies_properties=True, replication_lag_ms=0.0, max_tags=0,
                   subscription_overflow="refuse", notification_types="derived", resent_subscription="update",
                   wrong_key_status=401, basic_auth="accept", rate_limit_body="structured",
                   omit_retry_after_every=0, view_rate_per_s=10.0)
PRESETS = {"strict": STRICT, "lenient": LENIENT}
_CHOICES: dict[str, tuple[Any, ...]] = {
    "subscription_overflow": ("evict", "refuse"), "notification_types": ("separate", "derived"),
    "resent_subscription": ("keep", "update"), "wrong_key_status": (403, 401),
    "basic_auth": ("refuse", "accept"), "rate_limit_body": ("real", "structured"),
}


def parse_settings(body: Any, base: Settings) -> Settings:
    """Validate a POST /_simulator/config body: `preset` (strict|lenient) first, then any field of
    `Settings` on top. SimError 400 names every bad key."""
    if not isinstance(body, dict):
        raise SimError.one(400, "invalid-body", "the config body must be a JSON object")
    problems: list[str] = []
    preset = body.get("preset")
    if preset is not None:
        if preset not in PRESETS:
            problems.append("preset must be strict or lenient")
        else:
            base = PRESETS[preset]
    known = {f.name: f for f in fields(Settings)}
    changes: dict[str, Any] = {}
    for key, value in body.items():
        if key == "preset":
            continue
        if key not in known:
            problems.append(f"{key} is not a setting (one of {', '.join(known)})")
        elif key in _CHOICES:
            if value not in _CHOICES[key] or isinstance(value, bool):
                problems.append(f"{key} must be one of {', '.join(map(str, _CHOICES[key]))}")
            else:
                changes[key] = value
        elif known[key].type == "bool":
            if not isinstance(value, bool):
                problems.append(f"{key} must be true or false")
            else:
                changes[key] = value
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            problems.append(f"{key} must be a non-negative number")
        elif known[key].type == "int" and value != int(value):
            problems.append(f"{key} must be a whole number")
        else:
            changes[key] = int(value) if known[key].type == "int" else float(value)
    if problems:
        raise SimError(400, [{"code": "invalid-config", "title": p} for p in problems])
    return replace(base, **changes)


def settings_from_args(args: argparse.Namespace) -> Settings:
    settings = PRESETS[args.preset]
    changes: dict[str, Any] = {}
    if args.create_properties is not None:
        changes["create_applies_properties"] = args.create_properties == "merge"
    for name in ("replication_lag_ms", "max_tags", "wrong_key_status", "basic_auth", "rate_limit_body",
                 "omit_retry_after_every", "view_rate_per_s", "subscription_overflow", "notification_types",
                 "resent_subscription"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    problems = [f"--{k.replace('_', '-')} must not be negative" for k, v in changes.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0]
    if problems:
        raise SystemExit("simulator: " + "; ".join(problems))
    return replace(settings, **changes)
