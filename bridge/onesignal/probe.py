"""`onesignal-bridge check --live-probe`: how the operator's own OneSignal app really behaves.

One throwaway user (`external_id` `onesignal-bridge-probe-<random>`, one tag) is created, sent
again through Create user, updated, and deleted, each request a second apart (OneSignal's 1
request/s per user). It verifies, in that app, with that key:

- the key and the app id (a refused key or a key for another app answers 403, or 401);
- what Create user does with `properties` of an existing user (the bridge never relies on it:
  it sends them by Update user when the answer shows them not applied);
- how long OneSignal's replication lag is (requests by alias answering 404 after a create);
- that the user is deleted at the end. Deletion is retried through the lag; if it cannot be done,
  the finding names the user to delete by hand.

Findings are `bridge.ports.Finding`s; nothing else in `check` depends on this module.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from bridge.config import Config
from bridge.onesignal import errors
from bridge.onesignal.client import OneSignalClient, Response, build_http_client
from bridge.ports import Finding

PROBE_PREFIX = "onesignal-bridge-probe-"
PROBE_TAG = "onesignal_bridge_probe"
SPACING_S = 1.1  # OneSignal: 1 request/s per user


def probe_id() -> str:
    return PROBE_PREFIX + uuid.uuid4().hex[:12]


async def live_probe(config: Config, *, client: OneSignalClient | None = None,
                     sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                     clock: Callable[[], float] = time.monotonic) -> list[Finding]:
    """Run the probe; every request is real. Always tries to delete the user it created."""
    os_cfg = config.onesignal
    http = None
    if client is None:
        http = build_http_client(os_cfg.base_url, min(os_cfg.request_timeout_s, 10.0), 2)
        client = OneSignalClient(http, os_cfg.app_id, os_cfg.api_key.get_secret_value())
    external_id = probe_id()
    window = os_cfg.consistency_window_s
    out: list[Finding] = []
    created_at: float | None = None
    try:
        try:
            first = await client.create_user({"external_id": external_id}, {"tags": {PROBE_TAG: "1"}})
        except errors.AuthError as exc:
            return [Finding(False, f"live probe: OneSignal refuses to create a user in app {os_cfg.app_id} "
                                   f"({exc.status}): the key or the app id is wrong",
                            "set onesignal.api_key to this app's REST API key (Settings > Keys & IDs) and "
                            "onesignal.app_id to its app id")]
        except errors.OneSignalError as exc:
            return [Finding(False, f"live probe: cannot create a user: {exc}",
                            "check onesignal.base_url and the network path to it")]
        created_at = clock()
        out.append(Finding(True, f"live probe: created throwaway user external_id={external_id} "
                                 f"(answered {first.status}): the key and app id allow writes"))
        await sleep(SPACING_S)
        again = await client.create_user({"external_id": external_id}, {"tags": {PROBE_TAG: "2"}})
        out.append(_upsert_finding(again))
        await sleep(SPACING_S)
        lag, misses = await _first_success(lambda: client.update_user("external_id", external_id,
                                                                      {"tags": {PROBE_TAG: "3"}}),
                                           created_at, window, sleep, clock)
        if lag is None:
            out.append(Finding(False, f"live probe: Update user still answered 404 {window:.0f} s after the create",
                               "OneSignal's replication lag is longer than onesignal.consistency_window_s: raise it"))
        elif misses:
            out.append(Finding(True, f"live probe: Update user answered 404 {misses} time(s) (replication lag), "
                                     f"then was accepted {lag:.1f} s after the create",
                               "" if lag <= os_cfg.post_create_delay_s else
                               f"onesignal.post_create_delay_s ({os_cfg.post_create_delay_s:g}) is shorter than "
                               "this lag: the bridge retries those 404s; a longer delay saves the retries",
                               warning=lag > os_cfg.post_create_delay_s))
        else:
            out.append(Finding(True, f"live probe: Update user accepted {lag:.1f} s after the create "
                                     "(no replication lag seen)"))
    except errors.OneSignalError as exc:
        out.append(Finding(False, f"live probe: {exc}", "check the key, the app id and the network path"))
    finally:
        if created_at is not None:
            out.append(await _delete(client, external_id, created_at, window, sleep, clock))
        if http is not None:
            await http.aclose()
    return out


def _upsert_finding(resp: Response) -> Finding:
    body = resp.body if isinstance(resp.body, dict) else {}
    props = body.get("properties")
    tags = props.get("tags") if isinstance(props, dict) else None
    value = tags.get(PROBE_TAG) if isinstance(tags, dict) else None
    if value == "2":
        what = ("Create user applied properties to the existing user (an upsert that merges); the bridge "
                "does not rely on it")
    elif value is not None:
        what = ("Create user did not apply properties to the existing user; the bridge sends them by "
                "Update user, as it does for every user it knows")
    else:
        what = ("Create user's answer for an existing user shows no tags; the bridge sends the properties "
                "of existing users by Update user")
    return Finding(True, f"live probe: Create user on an existing user answered {resp.status}: {what}")


async def _first_success(call: Callable[[], Awaitable[Any]], created_at: float, window: float,
                         sleep: Callable[[float], Awaitable[None]],
                         clock: Callable[[], float]) -> tuple[float | None, int]:
    """Seconds after the create at which `call` stopped answering 404 (None: not within the
    window), and how many 404s it answered before."""
    misses = 0
    while True:
        try:
            await call()
            return clock() - created_at, misses
        except errors.RateLimited as exc:
            await sleep(exc.retry_after)
        except errors.NotFound:
            misses += 1
            if clock() - created_at > window:
                return None, misses
            await sleep(SPACING_S)


async def _delete(client: OneSignalClient, external_id: str, created_at: float, window: float,
                  sleep: Callable[[float], Awaitable[None]], clock: Callable[[], float]) -> Finding:
    """Delete the probe user; a 404 within the window is replication lag, not a deletion."""
    manual = f"delete it by hand: DELETE /apps/{{app_id}}/users/by/external_id/{external_id}"
    for _ in range(100):
        await sleep(SPACING_S)
        try:
            resp = await client.delete_user("external_id", external_id)
        except errors.RateLimited as exc:
            await sleep(exc.retry_after)
            continue
        except errors.OneSignalError as exc:
            return Finding(False, f"live probe: could not delete throwaway user external_id={external_id}: {exc}",
                           manual)
        if resp.status != 404:
            return Finding(True, f"live probe: deleted throwaway user external_id={external_id}")
        if clock() - created_at > window:
            return Finding(False, f"live probe: OneSignal answered 404 to deleting external_id={external_id} "
                                  f"for {window:.0f} s", manual)
    return Finding(False, f"live probe: could not delete throwaway user external_id={external_id}", manual)


def run_live_probe(config: Config) -> list[Finding]:
    """For `check --live-probe` (synchronous)."""
    return asyncio.run(live_probe(config))
