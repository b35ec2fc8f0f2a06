"""`check`: verify configuration, database and OneSignal before running; a fix for each problem.

The source kind checks its own side (`SourceKind.checks`: connectivity, privileges, publication
and slot, or outbox and triggers); this module adds what every kind shares: the bridge's schema
version in the database (for kinds that keep their tables there) and the OneSignal key.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import psycopg

from bridge import schema
from bridge.config import Config
from bridge.onesignal import errors
from bridge.onesignal.client import OneSignalClient, build_http_client
from bridge.ports import Finding
from bridge.sources import registry

__all__ = ["Finding", "run_checks"]


def _schema_check(dsn: str) -> Finding | None:
    """The bridge's tables are there at this bridge's version (None: the database is unreachable,
    which the kind's own checks already reported)."""
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
            version = schema.current_version(conn)
    except psycopg.Error:
        return None
    problem = schema.problem(version)
    if problem is None:
        return Finding(True, f"onesignal_bridge schema is at version {version} (current)")
    what, _, fix = problem.partition(": run ")
    return Finding(False, what, f"run {fix}" if fix else "")


async def _waiting_out_429(call: Callable[[], Awaitable[object]], attempts: int = 4) -> None:
    """`call()`, again after each 429 (its Retry-After, else 1, 2, 4 s; at most 10 s), up to
    `attempts` times: `check` may run right after another reader used the app's budget."""
    for attempt in range(attempts):
        try:
            await call()
            return
        except errors.RateLimited as exc:
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(min(exc.retry_after if exc.retry_after_given else 2.0 ** attempt, 10.0))


async def _legacy_check(config: Config) -> Finding:
    """Legacy mode: the key is the app's legacy REST API key, sent as `Basic`. A harmless legacy
    call, Edit tags with external user id with no tags for an id no player has: 404 (or 200)
    means the key is accepted, 401/403 that it is not."""
    from bridge.onesignal.client import requests
    from bridge.onesignal.legacy import make_client

    os_cfg = config.onesignal
    http, client = make_client(os_cfg, min(os_cfg.request_timeout_s, 10.0), 2)
    where = f"OneSignal's legacy API at {os_cfg.legacy_base_url}"
    try:
        await _waiting_out_429(lambda: client.send(
            requests.legacy_edit_tags("onesignal-bridge-check", {}, missing_ok=True)))
        return Finding(True, f"{where} accepts the legacy REST API key")
    except errors.AuthError as exc:
        return Finding(False, f"{where} rejects the key for app {os_cfg.app_id} ({exc.status})",
                       "set onesignal.api_key to the app's legacy REST API key (sent as Basic) and "
                       "onesignal.app_id to its app id")
    except errors.OneSignalError as exc:
        return Finding(False, f"{where} is not usable: {exc}",
                       "check onesignal.legacy_base_url and the network path to it")
    finally:
        await http.aclose()


async def _onesignal_check(config: Config) -> Finding:
    os_cfg = config.onesignal
    if os_cfg.api == "legacy":
        return await _legacy_check(config)
    http = build_http_client(os_cfg.base_url, min(os_cfg.request_timeout_s, 10.0), 2)
    client = OneSignalClient(http, os_cfg.app_id, os_cfg.api_key.get_secret_value())
    try:
        # View user: about 1 request/s per app; a 429 is waited out
        await _waiting_out_429(lambda: client.view_user("external_id", "onesignal-bridge-check"))
        return Finding(True, f"OneSignal at {os_cfg.base_url} accepts the API key")
    except errors.NotFound:
        return Finding(True, f"OneSignal at {os_cfg.base_url} accepts the API key")
    except errors.AuthError as exc:
        return Finding(False, f"OneSignal rejects the API key for app {os_cfg.app_id} ({exc.status})",
                       "set onesignal.api_key to the app's REST API key (Settings > Keys & IDs) and "
                       "onesignal.app_id to its app id")
    except errors.OneSignalError as exc:
        return Finding(False, f"OneSignal at {os_cfg.base_url} is not usable: {exc}",
                       "check onesignal.base_url and the network path to it")
    finally:
        await http.aclose()


def run_checks(config: Config, live_probe: bool = False) -> list[Finding]:
    from bridge.taglimit import FIX, tag_limit_problems

    out: list[Finding] = [Finding(True, "configuration is valid")]
    out += [Finding(False, problem, FIX, warning=True) for problem in tag_limit_problems(config)]
    kind = registry.for_config(config)
    out += kind.checks(config)
    dsn = kind.database_dsn(config)
    if dsn is not None:
        found = _schema_check(dsn)
        if found is not None:
            out.append(found)
    out.append(asyncio.run(_onesignal_check(config)))
    if live_probe and config.onesignal.api == "legacy":
        out.append(Finding(False, "--live-probe creates and deletes a User Model user: not for a legacy app",
                           "run check without --live-probe (the legacy key was checked above)"))
    elif live_probe:
        from bridge.onesignal.probe import run_live_probe

        out += run_live_probe(config)
    return out
