"""Mappings that can give a user more tags than the app allows (`onesignal.max_tags_per_user`).

OneSignal limits tags per user by plan and refuses, with a 400, a write that would leave a user
above the limit; nothing in that request is applied (docs/onesignal-semantics.md). The bridge
copes (only the refused tags are dead-lettered, reason `tag_limit`), but a mapping that can exceed
the limit is a configuration problem worth knowing before it happens: `check` reports it and `run`
logs it at start-up. Mappings that share an identity label write to the same users, so their tag
keys add up. Tags set outside the bridge (SDKs, the dashboard) count too and cannot be seen here.
"""

from __future__ import annotations

import logging

from bridge.config import Config

log = logging.getLogger("bridge.taglimit")


def tag_limit_problems(config: Config) -> list[str]:
    """One sentence per identity label whose mappings together map more tag keys than the limit."""
    limit = config.onesignal.max_tags_per_user
    if limit is None:
        return []
    tags: dict[str, dict[str, None]] = {}
    tables: dict[str, list[str]] = {}
    for m in config.mappings:
        (label,) = m.identity
        tags.setdefault(label, {}).update(dict.fromkeys(m.tags))
        if m.tags:
            tables.setdefault(label, []).append(m.table)
    out = []
    for label, keys in tags.items():
        if len(keys) > limit:
            out.append(
                f"the mappings of {', '.join(tables[label])} (identity {label}) can give a user {len(keys)} tags, "
                f"more than onesignal.max_tags_per_user ({limit}): OneSignal refuses a write that adds tags past "
                f"its limit, and the bridge dead-letters those tags (reason tag_limit)")
    return out


FIX = "map fewer tags for that identity, or set onesignal.max_tags_per_user to your plan's limit"


def warn_tag_limit(config: Config) -> None:
    """Start-up: log each problem as a warning."""
    for problem in tag_limit_problems(config):
        log.warning("%s; %s", problem, FIX)
