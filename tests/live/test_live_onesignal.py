"""OneSignal itself, checked against what the strict simulator models (docs/onesignal-semantics.md).

Skipped unless ONESIGNAL_LIVE_APP_ID and ONESIGNAL_LIVE_API_KEY name a real app (use a test app:
the scenario creates and deletes a few users). Every external id starts with
`obl-<run id>-` (ONESIGNAL_LIVE_RUN_ID, default random) and every user made is deleted at the end,
anonymous ones included. Optional: ONESIGNAL_LIVE_BASE_URL (default https://api.onesignal.com; the
simulator's URL runs the same scenario against it), ONESIGNAL_LIVE_MAX_TAGS (the app's plan limit:
checks the tag-limit answer), ONESIGNAL_LIVE_LAG_S (how long requests by alias may answer 404
after a create; default 60, the bridge's `onesignal.consistency_window_s`).

    ONESIGNAL_LIVE_APP_ID=... ONESIGNAL_LIVE_API_KEY=... .venv/bin/python -m pytest -m live tests/live

Each test names the behaviour it checks; a failure means the simulator's reading (and the bridge's
assumptions) differ from OneSignal's: record it in docs/onesignal-semantics.md.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from bridge.config import DeliveryConfig, OneSignalConfig
from bridge.deadletter import MemoryDeadLetters
from bridge.dispatch import Dispatcher
from bridge.events import Origin, SubscriptionChange, UserChange, UserRef
from bridge.onesignal.client import OneSignalClient, build_http_client

APP_ID = os.environ.get("ONESIGNAL_LIVE_APP_ID", "")
API_KEY = os.environ.get("ONESIGNAL_LIVE_API_KEY", "")
BASE_URL = os.environ.get("ONESIGNAL_LIVE_BASE_URL", "https://api.onesignal.com").rstrip("/")
RUN_ID = os.environ.get("ONESIGNAL_LIVE_RUN_ID") or uuid.uuid4().hex[:8]
PREFIX = f"obl-{RUN_ID}-"
LAG_S = float(os.environ.get("ONESIGNAL_LIVE_LAG_S", "60"))
MAX_TAGS = int(os.environ["ONESIGNAL_LIVE_MAX_TAGS"]) if os.environ.get("ONESIGNAL_LIVE_MAX_TAGS") else None
SPACING_S = 1.1  # 1 request/s per user

pytestmark = [
    pytest.mark.live,
    pytest.mark.skipif(not (APP_ID and API_KEY),
                       reason="set ONESIGNAL_LIVE_APP_ID and ONESIGNAL_LIVE_API_KEY to run against a real app"),
    pytest.mark.timeout(600),
]


class Live:
    """A thin client for one real app that remembers every user it made, to delete them."""

    def __init__(self) -> None:
        self.http = httpx.Client(base_url=BASE_URL, timeout=30,
                                 headers={"Authorization": f"Key {API_KEY}", "Accept": "application/json"})
        self.made: dict[str, str] = {}  # onesignal_id -> external_id ("" for anonymous users)
        self.external: set[str] = set()  # external ids of users made by the bridge's dispatcher

    def users(self) -> str:
        return f"/apps/{APP_ID}/users"

    def by(self, external_id: str, label: str = "external_id") -> str:
        return f"{self.users()}/by/{label}/{external_id}"

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """One request; a 429 is waited out (Retry-After, else 2 s) so the scenario is not flaky."""
        for _ in range(10):
            resp = self.http.request(method, path, **kw)
            if resp.status_code != 429:
                return resp
            time.sleep(float(resp.headers.get("Retry-After") or 2))
        return resp

    def create(self, external_id: str, **body: Any) -> httpx.Response:
        resp = self.request("POST", self.users(), json={"identity": {"external_id": external_id}, **body})
        if resp.status_code < 300:
            self.made[resp.json()["identity"]["onesignal_id"]] = external_id
        return resp

    def until(self, call: Callable[[], httpx.Response],
              ok: Callable[[httpx.Response], bool] = lambda r: r.status_code < 300,
              within: float = LAG_S) -> tuple[httpx.Response, float, int]:
        """Repeat `call` (a second apart) until `ok`; the last answer, seconds taken, 404s seen."""
        t0 = time.monotonic()
        misses = 0
        while True:
            resp = call()
            if ok(resp) or time.monotonic() - t0 > within:
                return resp, time.monotonic() - t0, misses
            misses += resp.status_code == 404
            time.sleep(SPACING_S)

    def cleanup(self) -> list[str]:
        """Delete every user made (by onesignal_id), retrying through the replication lag."""
        left = []
        for osid in list(self.made):
            resp, _, _ = self.until(lambda o=osid: self.request("DELETE", self.by(o, "onesignal_id")),
                                    ok=lambda r: r.status_code in (200, 202))
            if resp.status_code not in (200, 202):
                left.append(f"{osid} ({self.made[osid] or 'anonymous'}): {resp.status_code}")
        for external_id in self.external:  # best effort: gone already is fine
            resp = self.request("DELETE", self.by(external_id))
            if resp.status_code not in (200, 202, 404):
                left.append(f"{external_id}: {resp.status_code}")
        self.http.close()
        return left


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    client = Live()
    yield client
    left = client.cleanup()
    assert not left, f"users of run {RUN_ID} left in the app: {left}"


def name(suffix: str) -> str:
    return PREFIX + suffix


def errors_are_strings(resp: httpx.Response) -> bool:
    body = resp.json()
    return isinstance(body.get("errors"), list) and all(isinstance(e, str) for e in body["errors"])


# -- modeled behaviours ------------------------------------------------------------------------------


def test_create_user_on_an_existing_user_does_not_apply_properties(live: Live) -> None:
    external_id = name("upsert")
    assert live.create(external_id, properties={"tags": {"probe": "1"}}).status_code in (200, 201)
    time.sleep(SPACING_S)
    again = live.create(external_id, properties={"tags": {"probe": "2"}})
    assert again.status_code in (200, 202)
    answered = (again.json().get("properties") or {}).get("tags", {})
    assert answered.get("probe") != "2", "Create user merged properties into an existing user (simulator: ignores)"


def test_requests_by_alias_right_after_a_create_answer_404_only_within_the_consistency_window(live: Live) -> None:
    external_id = name("lag")
    assert live.create(external_id).status_code in (200, 201)
    resp, took, misses = live.until(lambda: live.request(
        "PATCH", live.by(external_id), json={"properties": {"tags": {"probe": "1"}}}))
    assert resp.status_code == 202, f"Update user still {resp.status_code} after {took:.0f} s"
    print(f"replication lag seen: {misses} 404(s), accepted after {took:.1f} s")


def test_a_delete_right_after_a_create_may_answer_404_but_deletes_within_the_window(live: Live) -> None:
    external_id = name("delete")
    created = live.create(external_id)
    assert created.status_code in (200, 201)
    resp, took, misses = live.until(lambda: live.request("DELETE", live.by(external_id)),
                                    ok=lambda r: r.status_code in (200, 202))
    assert resp.status_code in (200, 202), f"DELETE still {resp.status_code} after {took:.0f} s"
    gone, _, _ = live.until(lambda: live.request("GET", live.by(external_id)), ok=lambda r: r.status_code == 404)
    assert gone.status_code == 404
    live.made.pop(created.json()["identity"]["onesignal_id"], None)
    print(f"delete: {misses} 404(s) first, done after {took:.1f} s")


@pytest.mark.skipif(MAX_TAGS is None, reason="set ONESIGNAL_LIVE_MAX_TAGS to the app's per-user tag limit")
def test_a_write_past_the_tag_limit_is_400_naming_the_limit_and_applies_nothing(live: Live) -> None:
    assert MAX_TAGS is not None
    external_id = name("tags")
    refused = live.request("POST", live.users(), json={
        "identity": {"external_id": external_id},
        "properties": {"tags": {f"t{i}": "x" for i in range(MAX_TAGS + 1)}},
        "subscriptions": [{"type": "Email", "token": f"{external_id}@example.com"}]})
    assert refused.status_code == 400
    assert f"App is limited to a maximum of {MAX_TAGS} tags on a given player" in refused.text
    assert live.request("GET", live.by(external_id)).status_code == 404, "nothing in the refused request applied"


def test_a_wrong_key_and_the_basic_scheme_are_403_access_denied(live: Live) -> None:
    wrong = live.http.get(live.by(name("nobody")), headers={"Authorization": "Key os_v2_app_wrong"})
    basic = live.http.get(live.by(name("nobody")), headers={"Authorization": f"Basic {API_KEY}"})
    for resp in (wrong, basic):
        assert resp.status_code == 403, resp.text
        assert "Access denied" in resp.text and errors_are_strings(resp)


def test_an_app_id_the_key_is_not_for_is_403_like_a_wrong_key(live: Live) -> None:
    other = live.http.get(f"/apps/{uuid.uuid4()}/users/by/external_id/{name('nobody')}")
    assert other.status_code == 403, other.text
    assert "Access denied" in other.text


def test_429_has_string_errors_and_view_user_is_limited_to_about_one_per_second(live: Live) -> None:
    external_id = name("views")
    live.create(external_id)
    time.sleep(SPACING_S)
    answers = [live.http.get(live.by(external_id)) for _ in range(5)]
    limited = [r for r in answers if r.status_code == 429]
    assert limited, f"5 View user requests at once were all answered {[r.status_code for r in answers]}"
    assert all(errors_are_strings(r) and "API rate limit exceeded" in r.text for r in limited)
    print("Retry-After on the 429s:", [r.headers.get("Retry-After") for r in limited])


def test_a_subscription_sent_again_keeps_its_consent_and_notification_types_is_its_own_field(live: Live) -> None:
    external_id = name("consent")
    token = f"{external_id}@example.com"
    created = live.create(external_id, subscriptions=[{"type": "Email", "token": token, "enabled": True}])
    assert created.status_code in (200, 201)
    time.sleep(SPACING_S)
    again = live.create(external_id, subscriptions=[{"type": "Email", "token": token, "enabled": False,
                                                     "notification_types": -2}])
    subs = [s for s in again.json().get("subscriptions", []) if s.get("token") == token]
    assert subs and subs[0].get("enabled") is not False, "a re-sent subscription took the consent sent"
    sub_id = subs[0]["id"]
    live.until(lambda: live.request("PATCH", f"/apps/{APP_ID}/subscriptions/{sub_id}",
                                    json={"subscription": {"enabled": False}}))
    viewed, _, _ = live.until(lambda: live.request("GET", live.by(external_id)))
    (sub,) = [s for s in viewed.json()["subscriptions"] if s["id"] == sub_id]
    assert sub.get("enabled") is False
    assert sub.get("notification_types") == 1, \
        f"enabled=false alone changed notification_types to {sub.get('notification_types')} (simulator: separate)"


def test_a_21st_subscription_evicts_the_oldest_or_is_refused(live: Live) -> None:
    external_id = name("twenty")
    subs = [{"type": "Email", "token": f"{external_id}-{i}@example.com"} for i in range(20)]
    created = live.create(external_id, subscriptions=subs)
    assert created.status_code in (200, 201)
    ids = {s.get("token"): s.get("id") for s in created.json().get("subscriptions", [])}
    extra, _, _ = live.until(lambda: live.request(
        "POST", f"{live.by(external_id)}/subscriptions",
        json={"subscription": {"type": "Email", "token": f"{external_id}-20@example.com"}}),
        ok=lambda r: r.status_code != 404)
    assert extra.status_code in (200, 201, 202, 409), extra.text
    viewed, _, _ = live.until(lambda: live.request("GET", live.by(external_id)))
    held = viewed.json()["subscriptions"]
    assert len(held) <= 20
    if extra.status_code != 409:  # evicted: its new anonymous user must be cleaned up too
        evicted = {s["token"] for s in subs} - {s.get("token") for s in held}
        print("evicted:", evicted)
        for token in evicted:  # its new anonymous user, found through the subscription's id
            sub_view = live.request("GET", f"/apps/{APP_ID}/subscriptions/{ids.get(token)}/user/identity")
            osid = (sub_view.json().get("identity") or {}).get("onesignal_id") if sub_view.status_code == 200 else None
            if osid:
                live.made[osid] = ""


# -- the bridge's dispatcher against the real API ------------------------------------------------------


def test_the_bridge_converges_a_user_created_updated_and_deleted_moments_apart(live: Live) -> None:
    external_id = name("bridge")
    live.external.add(external_id)
    user = UserRef("external_id", external_id)
    done: list[int] = []

    async def scenario() -> None:
        http = build_http_client(BASE_URL, 30.0)
        dispatcher = Dispatcher(OneSignalClient(http, APP_ID, API_KEY), DeliveryConfig(flush_interval_ms=0),
                                MemoryDeadLetters(), done.extend,
                                onesignal=OneSignalConfig(app_id=APP_ID, api_key=API_KEY,
                                                          consistency_window_s=LAG_S))
        runner = asyncio.create_task(dispatcher.run())

        def change(seq: int, **kw: Any) -> None:
            dispatcher.submit(UserChange(user, Origin("live", f"id={seq}", f"0/{seq}", seq), **kw))

        change(1, tags={"plan": "free"}, subscriptions=(SubscriptionChange("email", f"{external_id}@example.com",
                                                                           False),))
        await dispatcher.flush_all(LAG_S)
        for seq in range(2, 5):
            change(seq, tags={"plan": f"p{seq}"}, properties={"language": "fr"})
            await asyncio.sleep(0.3)
        assert await dispatcher.flush_all(LAG_S + 30), "updates right after the create did not all arrive"
        viewed = live.until(lambda: live.request("GET", live.by(external_id)),
                            ok=lambda r: r.status_code == 200
                            and (r.json()["properties"].get("tags") or {}).get("plan") == "p4")[0]
        assert viewed.json()["properties"].get("language") == "fr"
        (sub,) = viewed.json()["subscriptions"]
        assert sub.get("enabled") is False
        change(5, delete_user=True)
        assert await dispatcher.flush_all(LAG_S + 30), "the deletion was not done"
        await dispatcher.drain(1.0)
        runner.cancel()
        await http.aclose()

    asyncio.run(scenario())
    assert sorted(done) == [1, 2, 3, 4, 5]
    gone, _, _ = live.until(lambda: live.request("GET", live.by(external_id)), ok=lambda r: r.status_code == 404)
    assert gone.status_code == 404
