"""Legacy player-model apps (issue 19): tags by external user id, for apps on OneSignal's older SDKs.

In OneSignal's older data model every device is a *player*; an app links its own user id to all of
a person's players (push devices, email and SMS records made by the SDK) with `external_user_id`,
and a server edits their tags with one call, "Edit tags with external user id"
(https://documentation.onesignal.com/reference/edit-tags-with-external-user-id):

    PUT {legacy_base_url}/apps/{app_id}/users/{external_user_id}   {"tags": {...}}
    Authorization: Basic <legacy REST API key>   ->  200 {"success": true}; 404: no player has the id

With `onesignal.api: legacy` the runner uses `LegacyDispatcher`: the same coalescer, rate limits
(1 request/s per user, the app's token bucket), retries, dead letters, checkpoints and metrics as
the User Model path (endpoint label `PUT /apps/users`), but every coalesced change for a user is
exactly one such PUT (`legacy_plan`), a removed tag sent as `""`. A 404 means no device has that
external user id yet: dead-lettered with reason `no_player` (`onesignal.legacy_missing_user:
dead_letter`, the default; `dlq replay` sends it again once the person has a device), or taken as
done (`ignore`). Aliases, properties, subscriptions and user deletion have no legacy equivalent:
the configuration refuses them (bridge/config.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import httpx

from bridge.coalesce import UserBatch
from bridge.config import OneSignalConfig
from bridge.dispatch import Dispatcher
from bridge.onesignal import errors
from bridge.onesignal.client import OneSignalClient, Request, Response, build_http_client, requests
from bridge.steps import Step

log = logging.getLogger("bridge.legacy")

ENDPOINT = "PUT /apps/users"


class NoPlayer(errors.NotFound):
    """A 404 to the legacy Edit tags call: no player (device) has this external user id yet."""

    @property
    def reason(self) -> str:
        return "no_player"


def legacy_plan(batch: UserBatch, *, missing_ok: bool = False) -> list[Request]:
    """The one request for a user's merged change: Edit tags with external user id (none when the
    batch changes no tag). A removed tag (None) is sent as `""`, OneSignal's deletion."""
    if not batch.tags:
        return []
    tags = {k: "" if v is None else v for k, v in batch.tags.items()}
    return [requests.legacy_edit_tags(batch.user.id, tags, missing_ok=missing_ok)]


def make_client(cfg: OneSignalConfig, timeout_s: float | None = None,
                max_connections: int = 100) -> tuple[httpx.AsyncClient, OneSignalClient]:
    """The HTTP client and OneSignal client for `cfg`'s API: the User Model (`base_url`, `Key`)
    or the legacy player model (`legacy_base_url`, `Basic`)."""
    timeout = cfg.request_timeout_s if timeout_s is None else timeout_s
    legacy = cfg.api == "legacy"
    http = build_http_client(cfg.legacy_base_url if legacy else cfg.base_url, timeout, max_connections)
    client = OneSignalClient(http, cfg.app_id, cfg.api_key.get_secret_value(),
                             scheme="Basic" if legacy else "Key")
    return http, client


def plan_for(cfg: OneSignalConfig) -> Callable[[UserBatch], list[Request]] | None:
    """The planner `dlq replay` uses for `cfg`'s API (None: the User Model's `plan`)."""
    if cfg.api != "legacy":
        return None
    missing_ok = cfg.legacy_missing_user == "ignore"
    return lambda batch: legacy_plan(batch, missing_ok=missing_ok)


class LegacyDispatcher(Dispatcher):
    """The Dispatcher with the legacy planner: one PUT per coalesced change, 404 mapped."""

    def __init__(self, *args: Any, missing_user: str = "dead_letter", **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.missing_user = missing_user  # onesignal.legacy_missing_user: dead_letter | ignore

    async def _steps(self, batch: UserBatch) -> list[Step]:
        return [Step(req) for req in legacy_plan(batch, missing_ok=self.missing_user == "ignore")]

    async def _send(self, req: Request) -> Response:
        try:
            resp = await super()._send(req)
        except errors.TagLimitExceeded as exc:  # the User Model's partial retry does not apply here
            raise errors.Rejected(str(exc), status=exc.status, endpoint=exc.endpoint, detail=exc.detail,
                                  body=exc.body) from None
        except errors.NotFound as exc:
            raise NoPlayer(f"no OneSignal player (device) has external user id {req.segments[-1]!r} yet "
                           f"({exc}); `dlq replay` sends it again once the person has a device",
                           status=404, endpoint=req.endpoint, detail=exc.detail, body=exc.body) from None
        if resp.status == 404:
            log.debug("no player has external user id %r: ignored (onesignal.legacy_missing_user)",
                      req.segments[-1])
        return resp
