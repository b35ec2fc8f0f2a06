"""The OneSignal simulator, exercised over real HTTP the way the bridge (and the official SDK) use it.

Each test starts the simulator on a free 127.0.0.1 port and talks to it with httpx. The simulator
is strict by default (issue 14); tests about other semantics start it without replication lag so
that a user can be read and updated right after it is created.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from bridge.devtools.simlimits import ViewLimiter, WriteLimiter
from bridge.devtools.simsettings import LENIENT as LENIENT_SETTINGS
from bridge.devtools.simstate import LENIENT, SimState, tag_limit_message
from bridge.devtools.simulator import ACCESS_DENIED, build_app
from bridge.devtools.simvalidation import SimError

API_KEY = "os_v2_app_simulatortestkeydonotleak"
APP_ID = "0b7f2c4e-1111-4a2b-9c3d-5e6f7a8b9c0d"
USERS = f"/apps/{APP_ID}/users"
REPO = Path(__file__).resolve().parents[1]


@dataclass
class Sim:
    """A running simulator and an authenticated client for it."""

    base_url: str
    client: httpx.AsyncClient

    def user_path(self, alias_id: str, label: str = "external_id") -> str:
        return f"{USERS}/by/{label}/{alias_id}"

    async def create(self, external_id: str, **body: Any) -> httpx.Response:
        return await self.client.post(USERS, json={"identity": {"external_id": external_id}, **body})

    async def user(self, external_id: str) -> dict[str, Any]:
        response = await self.client.get(self.user_path(external_id))
        assert response.status_code == 200, response.text
        return response.json()

    async def control(self, what: str) -> Any:
        response = await self.client.get(f"/_simulator/{what}")
        assert response.status_code == 200
        return response.json()


StartSim = Callable[..., Awaitable[Sim]]


@pytest.fixture
async def start_sim() -> AsyncIterator[StartSim]:
    """Start simulators with the given build_app options; by default writes to one user are not
    throttled (user_interval_s=0) and a new user is readable at once (replication_lag_ms=0) so that
    tests about semantics don't trip the per-user limit or the replication lag."""
    runners: list[web.AppRunner] = []
    clients: list[httpx.AsyncClient] = []

    async def start(**options: Any) -> Sim:
        options = {"api_key": API_KEY, "user_interval_s": 0.0, "view_rate_per_s": 1000.0,
                   "replication_lag_ms": 0.0, **options}
        runner = web.AppRunner(build_app(**options), shutdown_timeout=1.0)
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        base_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        client = httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Key {API_KEY}"},
                                   timeout=5.0, trust_env=False)
        clients.append(client)
        return Sim(base_url, client)

    yield start
    for client in clients:
        await client.aclose()
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def sim(start_sim: StartSim) -> Sim:
    return await start_sim()


async def poll(attempt: Callable[[], Awaitable[Any]], done: Callable[[Any], bool],
               deadline_s: float = 5.0) -> Any:
    """Call `attempt` until `done(result)`; fail when the deadline passes first."""
    deadline = time.monotonic() + deadline_s
    while True:
        result = await attempt()
        if done(result):
            return result
        assert time.monotonic() < deadline, f"condition not met within {deadline_s}s: {result!r}"
        await asyncio.sleep(0.02)


def error_codes(response: httpx.Response) -> list[str]:
    return [e["code"] for e in response.json()["errors"]]


# -- create / upsert ----------------------------------------------------------------------------


async def test_create_is_200_for_a_new_user_and_202_when_an_alias_finds_an_existing_one(sim: Sim) -> None:
    first = await sim.create("u1", properties={"tags": {"plan": "pro"}})
    again = await sim.client.post(USERS, json={"identity": {"external_id": "u1", "crm_id": "c-1"},
                                               "properties": {"tags": {"seats": "3"}}})
    assert first.status_code == 200
    assert again.status_code == 202
    onesignal_id = first.json()["identity"]["onesignal_id"]
    assert again.json()["identity"] == {"onesignal_id": onesignal_id, "external_id": "u1", "crm_id": "c-1"}
    assert len((await sim.control("users"))["users"]) == 1


async def test_create_on_an_existing_user_applies_aliases_and_subscriptions_but_ignores_properties(
        sim: Sim) -> None:
    await sim.create("u1", properties={"tags": {"plan": "pro"}, "language": "en"})
    again = await sim.client.post(USERS, json={
        "identity": {"external_id": "u1", "crm_id": "c-1"},
        "properties": {"tags": {"plan": "team", "seats": "3"}, "language": "fr"},
        "subscriptions": [{"type": "Email", "token": "u1@example.com"}]})
    assert again.status_code == 202
    answered = again.json()
    assert answered["properties"]["tags"] == {"plan": "pro"}, "the answer shows the properties were not applied"
    stored = await sim.user("u1")
    assert stored["properties"]["tags"] == {"plan": "pro"} and stored["properties"]["language"] == "en"
    assert stored["identity"]["crm_id"] == "c-1"
    assert [s["token"] for s in stored["subscriptions"]] == ["u1@example.com"]


async def test_lenient_create_merges_properties_into_an_existing_user(start_sim: StartSim) -> None:
    sim = await start_sim(settings=LENIENT_SETTINGS)
    await sim.create("u1", properties={"tags": {"plan": "pro"}})
    again = await sim.create("u1", properties={"tags": {"seats": "3"}})
    assert again.status_code == 202
    assert again.json()["properties"]["tags"] == {"plan": "pro", "seats": "3"}


async def test_new_user_gets_a_uuid_onesignal_id_it_can_be_looked_up_by(sim: Sim) -> None:
    created = (await sim.create("u1")).json()
    onesignal_id = created["identity"]["onesignal_id"]
    assert len(onesignal_id) == 36 and onesignal_id.count("-") == 4
    by_id = await sim.client.get(sim.user_path(onesignal_id, "onesignal_id"))
    assert by_id.json()["identity"]["external_id"] == "u1"


async def test_view_user_returns_full_subscription_objects_and_404_for_an_unknown_alias(sim: Sim) -> None:
    await sim.create("u1", subscriptions=[{"type": "Email", "token": "ann@example.com"},
                                          {"type": "SMS", "token": "+15555550123", "enabled": False}])
    user = await sim.user("u1")
    subs = {s["type"]: s for s in user["subscriptions"]}
    assert subs["Email"]["token"] == "ann@example.com" and subs["Email"]["enabled"] is True
    assert subs["SMS"]["enabled"] is False and subs["SMS"]["id"]
    missing = await sim.client.get(sim.user_path("nobody"))
    assert missing.status_code == 404
    assert error_codes(missing) == ["user-not-found"]


async def test_create_with_aliases_of_two_users_is_409_naming_the_conflicting_alias(sim: Sim) -> None:
    await sim.create("u1")
    await sim.client.post(USERS, json={"identity": {"crm_id": "c-2"}})
    both = await sim.client.post(USERS, json={"identity": {"external_id": "u1", "crm_id": "c-2"},
                                              "properties": {"tags": {"x": "1"}}})
    assert both.status_code == 409
    error = both.json()["errors"][0]
    assert error["code"] == "user-2"
    assert error["meta"]["conflicting_aliases"] == {"crm_id": "c-2"}
    assert (await sim.user("u1"))["properties"]["tags"] == {}, "a refused request changes nothing"


async def test_onesignal_id_cannot_be_set_by_the_client(sim: Sim) -> None:
    response = await sim.client.post(USERS, json={"identity": {"onesignal_id": "mine", "external_id": "u1"}})
    assert response.status_code == 400
    assert "alias-not-settable" in error_codes(response)


async def test_alias_with_a_slash_or_whitespace_or_too_long_is_rejected(sim: Sim) -> None:
    for identity in ({"external_id": "a/b"}, {"external_id": "a b"}, {"external_id": "x" * 129},
                     {"external_id": ""}, {"bad label": "x"}, {"external_id": 42}):
        response = await sim.client.post(USERS, json={"identity": identity})
        assert response.status_code == 400, identity
        assert "invalid-alias" in error_codes(response)
    assert (await sim.control("users"))["users"] == []


async def test_body_that_is_not_a_json_object_is_rejected_with_400(sim: Sim) -> None:
    not_json = await sim.client.post(USERS, content=b"{nope", headers={"Content-Type": "application/json"})
    a_list = await sim.client.post(USERS, json=[{"identity": {"external_id": "u1"}}])
    assert (not_json.status_code, error_codes(not_json)) == (400, ["invalid-json"])
    assert (a_list.status_code, error_codes(a_list)) == (400, ["invalid-body"])


# -- properties and tags ------------------------------------------------------------------------


async def test_tag_set_to_empty_string_deletes_it(sim: Sim) -> None:
    await sim.create("u1", properties={"tags": {"plan": "pro", "seats": "3"}})
    response = await sim.client.patch(sim.user_path("u1"), json={"properties": {"tags": {"plan": ""}}})
    assert response.status_code == 202
    assert (await sim.user("u1"))["properties"]["tags"] == {"seats": "3"}


async def test_tag_set_to_null_deletes_it_and_tags_left_out_are_unchanged(sim: Sim) -> None:
    await sim.create("u1", properties={"tags": {"plan": "pro", "seats": "3", "country": "fr"}})
    response = await sim.client.patch(sim.user_path("u1"),
                                      json={"properties": {"tags": {"plan": None, "seats": "4"}}})
    assert response.status_code == 202
    assert response.json() == {"properties": {"tags": {"plan": None, "seats": "4"}}}
    assert (await sim.user("u1"))["properties"]["tags"] == {"seats": "4", "country": "fr"}


async def test_patch_sets_language_timezone_country_and_location(sim: Sim) -> None:
    await sim.create("u1")
    props = {"language": "fr", "timezone_id": "Europe/Paris", "country": "FR", "lat": 48.85,
             "long": 2, "last_active": 1_700_000_000}
    assert (await sim.client.patch(sim.user_path("u1"), json={"properties": props})).status_code == 202
    stored = (await sim.user("u1"))["properties"]
    assert {k: stored[k] for k in props} == {**props, "long": 2.0}


async def test_patch_of_an_unknown_user_is_404(sim: Sim) -> None:
    response = await sim.client.patch(sim.user_path("ghost"), json={"properties": {"tags": {"a": "1"}}})
    assert response.status_code == 404
    assert error_codes(response) == ["user-not-found"]


async def test_more_than_100_property_updates_in_one_request_is_400_and_100_is_fine(start_sim: StartSim) -> None:
    sim = await start_sim(max_tags=0)  # no tag limit: this is about the per-request limit
    await sim.create("u1")
    tags_99 = {f"t{i}": "v" for i in range(99)}
    at_limit = await sim.client.patch(sim.user_path("u1"),
                                      json={"properties": {"tags": tags_99, "language": "en"}})
    over = await sim.client.patch(sim.user_path("u1"), json={"properties": {
        "tags": {f"n{i}": "v" for i in range(100)}, "language": "de"}})
    assert at_limit.status_code == 202
    assert over.status_code == 400
    assert "too-many-properties" in error_codes(over)
    assert (await sim.user("u1"))["properties"]["language"] == "en"


async def test_reserved_tag_key_is_rejected_and_nothing_is_applied(sim: Sim) -> None:
    await sim.create("u1")
    response = await sim.client.patch(sim.user_path("u1"),
                                      json={"properties": {"tags": {"ok": "1", "journey": "x"}}})
    assert response.status_code == 400
    assert error_codes(response) == ["reserved-tag-key"]
    assert "journey" in response.json()["errors"][0]["title"]
    assert (await sim.user("u1"))["properties"]["tags"] == {}


async def test_tag_values_must_be_strings(sim: Sim) -> None:
    await sim.create("u1")
    response = await sim.client.patch(sim.user_path("u1"), json={"properties": {"tags": {"n": 3, "b": True}}})
    assert response.status_code == 400
    assert error_codes(response) == ["invalid-tag-value", "invalid-tag-value"]


async def test_language_and_country_must_be_iso_codes(sim: Sim) -> None:
    await sim.create("u1")
    response = await sim.client.patch(sim.user_path("u1"),
                                      json={"properties": {"language": "EN", "country": "fr"}})
    assert response.status_code == 400
    assert sorted(error_codes(response)) == ["invalid-country", "invalid-language"]


# -- subscriptions ------------------------------------------------------------------------------


async def test_bad_sms_and_email_tokens_are_rejected(sim: Sim) -> None:
    bad_sms = await sim.create("u1", subscriptions=[{"type": "SMS", "token": "555-0123"}])
    bad_email = await sim.create("u1", subscriptions=[{"type": "Email", "token": "not-an-email"}])
    unknown = await sim.create("u1", subscriptions=[{"type": "Pigeon", "token": "x"}])
    assert (bad_sms.status_code, error_codes(bad_sms)) == (400, ["invalid-phone-number"])
    assert (bad_email.status_code, error_codes(bad_email)) == (400, ["invalid-email"])
    assert (unknown.status_code, error_codes(unknown)) == (400, ["invalid-subscription-type"])
    assert (await sim.control("users"))["users"] == []


async def test_adding_a_subscription_is_201_new_then_200_when_the_user_already_has_it(sim: Sim) -> None:
    await sim.create("u1")
    body = {"subscription": {"type": "Email", "token": "ann@example.com"}}
    new = await sim.client.post(f"{sim.user_path('u1')}/subscriptions", json=body)
    same = await sim.client.post(f"{sim.user_path('u1')}/subscriptions", json=body)
    assert new.status_code == 201
    assert same.status_code == 200
    assert new.json()["subscription"]["id"] == same.json()["subscription"]["id"]
    assert len((await sim.user("u1"))["subscriptions"]) == 1


async def test_subscription_of_another_user_is_moved_with_202(sim: Sim) -> None:
    await sim.create("old", subscriptions=[{"type": "Email", "token": "shared@example.com"}])
    await sim.create("new")
    moved = await sim.client.post(f"{sim.user_path('new')}/subscriptions",
                                  json={"subscription": {"type": "Email", "token": "shared@example.com"}})
    assert moved.status_code == 202
    assert (await sim.user("old"))["subscriptions"] == []
    assert [s["token"] for s in (await sim.user("new"))["subscriptions"]] == ["shared@example.com"]


async def test_lenient_21st_subscription_is_refused_with_409(start_sim: StartSim) -> None:
    sim = await start_sim(subscription_overflow="refuse")
    twenty = [{"type": "SMS", "token": f"+1555555{i:04d}"} for i in range(20)]
    assert (await sim.create("u1", subscriptions=twenty)).status_code == 200
    extra = await sim.client.post(f"{sim.user_path('u1')}/subscriptions",
                                  json={"subscription": {"type": "Email", "token": "one@example.com"}})
    assert extra.status_code == 409
    assert error_codes(extra) == ["subscription-limit"]
    assert len((await sim.user("u1"))["subscriptions"]) == 20


async def test_subscription_can_be_disabled_transferred_and_deleted_by_id(sim: Sim) -> None:
    created = await sim.create("a", subscriptions=[{"type": "Email", "token": "a@example.com"}])
    await sim.create("b")
    sub_id = created.json()["subscriptions"][0]["id"]
    sub_path = f"/apps/{APP_ID}/subscriptions/{sub_id}"
    disabled = await sim.client.patch(sub_path, json={"subscription": {"enabled": False}})
    owner = await sim.client.patch(f"{sub_path}/owner", json={"identity": {"external_id": "b"}})
    assert (disabled.status_code, owner.status_code) == (200, 200)
    assert owner.json()["identity"]["external_id"] == "b"
    assert (await sim.user("b"))["subscriptions"][0]["enabled"] is False
    assert (await sim.client.delete(sub_path)).status_code == 202
    assert (await sim.user("b"))["subscriptions"] == []
    assert (await sim.client.patch(sub_path, json={"subscription": {"enabled": True}})).status_code == 404


async def test_deleting_a_user_deletes_its_subscriptions_and_aliases(sim: Sim) -> None:
    created = (await sim.create("u1", subscriptions=[{"type": "Email", "token": "a@example.com"}])).json()
    deleted = await sim.client.delete(sim.user_path("u1"))
    assert deleted.status_code == 202
    assert deleted.json() == {"identity": {"onesignal_id": created["identity"]["onesignal_id"]}}
    assert (await sim.client.get(sim.user_path("u1"))).status_code == 404
    assert (await sim.client.delete(sim.user_path("u1"))).status_code == 404
    again = await sim.create("u2", subscriptions=[{"type": "Email", "token": "a@example.com"}])
    assert again.status_code == 200, "the email went away with the deleted user"
    assert again.json()["subscriptions"][0]["id"] != created["subscriptions"][0]["id"]


# -- aliases ------------------------------------------------------------------------------------


async def test_aliases_can_be_added_viewed_and_deleted(sim: Sim) -> None:
    await sim.create("u1")
    added = await sim.client.patch(f"{sim.user_path('u1')}/identity", json={"identity": {"crm_id": "c-1"}})
    assert added.status_code == 200 and added.json()["identity"]["crm_id"] == "c-1"
    by_crm = await sim.client.get(f"{sim.user_path('c-1', 'crm_id')}/identity")
    assert by_crm.json()["identity"]["external_id"] == "u1"
    removed = await sim.client.delete(f"{sim.user_path('u1')}/identity/crm_id")
    assert removed.status_code == 200 and "crm_id" not in removed.json()["identity"]
    assert (await sim.client.get(sim.user_path("c-1", "crm_id"))).status_code == 404


async def test_alias_held_by_another_user_is_409(sim: Sim) -> None:
    await sim.client.post(USERS, json={"identity": {"external_id": "u1", "crm_id": "c-1"}})
    await sim.create("u2")
    taken = await sim.client.patch(f"{sim.user_path('u2')}/identity", json={"identity": {"crm_id": "c-1"}})
    assert taken.status_code == 409
    assert taken.json()["errors"][0]["meta"]["conflicting_aliases"] == {"crm_id": "c-1"}
    missing = await sim.client.patch(f"{sim.user_path('ghost')}/identity", json={"identity": {"crm_id": "z"}})
    assert missing.status_code == 404


# -- auth ---------------------------------------------------------------------------------------


async def test_wrong_or_missing_key_is_403_access_denied_and_the_key_is_never_echoed(sim: Sim) -> None:
    wrong = await sim.client.post(USERS, json={"identity": {"external_id": "u1"}},
                                  headers={"Authorization": "Key os_v2_app_wrong"})
    async with httpx.AsyncClient(base_url=sim.base_url, trust_env=False) as anonymous:
        missing = await anonymous.get(sim.user_path("u1"))
    for response in (wrong, missing):
        assert response.status_code == 403
        assert response.json() == {"errors": [ACCESS_DENIED]}
        assert API_KEY not in response.text and "os_v2_app_wrong" not in response.text
    assert (await sim.control("users"))["users"] == []
    log = await sim.client.get("/_simulator/requests")
    assert API_KEY not in log.text


async def test_lenient_wrong_key_is_401_with_a_structured_body(start_sim: StartSim) -> None:
    sim = await start_sim(settings=LENIENT_SETTINGS)
    wrong = await sim.client.post(USERS, json={"identity": {"external_id": "u1"}},
                                  headers={"Authorization": "Key os_v2_app_wrong"})
    assert wrong.status_code == 401
    assert error_codes(wrong) == ["access-denied"]


async def test_basic_scheme_is_refused_on_the_user_model_endpoints(sim: Sim) -> None:
    response = await sim.client.post(USERS, json={"identity": {"external_id": "u1"}},
                                     headers={"Authorization": f"Basic {API_KEY}"})
    assert response.status_code == 403
    assert response.json() == {"errors": [ACCESS_DENIED]}
    assert (await sim.control("users"))["users"] == []


async def test_lenient_basic_scheme_is_accepted(start_sim: StartSim) -> None:
    sim = await start_sim(basic_auth="accept")
    response = await sim.client.post(USERS, json={"identity": {"external_id": "u1"}},
                                     headers={"Authorization": f"Basic {API_KEY}"})
    assert response.status_code == 200


async def test_without_a_configured_key_any_key_is_accepted(start_sim: StartSim) -> None:
    sim = await start_sim(api_key=None)
    response = await sim.client.post(USERS, json={"identity": {"external_id": "u1"}},
                                     headers={"Authorization": "Key anything"})
    assert response.status_code == 200


async def test_a_configured_app_id_refuses_other_apps(start_sim: StartSim) -> None:
    sim = await start_sim(app_id=APP_ID)
    other = await sim.client.post("/apps/another-app/users", json={"identity": {"external_id": "u1"}})
    assert other.status_code == 403
    assert other.json() == {"errors": [ACCESS_DENIED]}, "answered like a key that does not match the app"
    assert (await sim.create("u1")).status_code == 200


# -- rate limits --------------------------------------------------------------------------------


async def test_second_write_to_a_user_within_a_second_is_429_with_retry_after_then_succeeds(
        start_sim: StartSim) -> None:
    sim = await start_sim(user_interval_s=1.0)
    assert (await sim.create("u1")).status_code == 200
    def patch():  # type: ignore[no-untyped-def]
        return sim.client.patch(sim.user_path("u1"), json={"properties": {"tags": {"a": "1"}}})

    limited = await patch()
    refused_at = time.monotonic()
    assert limited.status_code == 429
    assert limited.headers["Retry-After"] == "1"
    assert limited.json() == {"errors": ["API rate limit exceeded."]}
    other_user = await sim.create("u2")
    assert other_user.status_code == 200, "the limit is per user"
    accepted = await poll(patch, lambda r: r.status_code != 429)
    assert accepted.status_code == 202
    assert time.monotonic() - refused_at <= int(limited.headers["Retry-After"]) + 0.5
    assert (await sim.user("u1"))["properties"]["tags"] == {"a": "1"}


async def test_per_user_limit_applies_whichever_alias_names_the_user(start_sim: StartSim) -> None:
    sim = await start_sim(user_interval_s=1.0)
    await sim.client.post(USERS, json={"identity": {"external_id": "u1", "crm_id": "c-1"}})
    by_crm = await sim.client.patch(sim.user_path("c-1", "crm_id"), json={"properties": {"language": "en"}})
    assert by_crm.status_code == 429


async def test_app_wide_limit_refuses_writes_beyond_the_rate_per_second(start_sim: StartSim) -> None:
    sim = await start_sim(app_rate_per_s=20)
    responses = await asyncio.gather(*(sim.create(f"user-{i}") for i in range(25)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 20 + [429] * 5
    retry_after = [r.headers.get("Retry-After") for r in responses if r.status_code == 429]
    assert sorted(retry_after, key=str) == ["1", "1", "1", None, None], "every second 429 has no Retry-After"
    assert len((await sim.control("users"))["users"]) == 20
    assert (await sim.control("stats"))["rate_limited"] == 5
    later = await poll(lambda: sim.create("late-user"), lambda r: r.status_code != 429)
    assert later.status_code == 200


async def test_view_endpoints_have_their_own_app_wide_limit(start_sim: StartSim) -> None:
    sim = await start_sim(view_rate_per_s=2.0)
    await sim.create("u1")
    statuses = [(await sim.client.get(sim.user_path("u1"))).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]
    assert (await sim.create("u2")).status_code == 200, "writes are not limited by views"


# -- faults -------------------------------------------------------------------------------------


async def test_injected_503_changes_nothing_and_clearing_faults_restores_service(sim: Sim) -> None:
    set_faults = await sim.client.post("/_simulator/faults", json={"error_rate": 1.0, "status": 503})
    assert set_faults.status_code == 200
    failed = await sim.create("u1")
    assert failed.status_code == 503
    assert failed.json() == {"errors": ["Service Unavailable"], "success": False}
    assert (await sim.control("users"))["users"] == [], "faults also never apply to /_simulator/"
    assert (await sim.client.delete("/_simulator/faults")).status_code == 200
    assert (await sim.create("u1")).status_code == 200


async def test_injected_502_answers_html_so_clients_must_parse_defensively(sim: Sim) -> None:
    await sim.client.post("/_simulator/faults", json={"error_rate": 1.0, "status": 502, "paths": "/users$"})
    failed = await sim.create("u1")
    assert failed.status_code == 502
    assert failed.headers["Content-Type"].startswith("text/html")
    with pytest.raises(ValueError):
        failed.json()
    unaffected = await sim.client.get(sim.user_path("u1"))
    assert unaffected.status_code == 404, "paths limits the fault to matching requests"


async def test_a_request_held_by_latency_is_applied_even_when_its_client_gave_up(sim: Sim) -> None:
    await sim.create("u1")
    await sim.client.post("/_simulator/faults", json={"latency_ms": 800, "paths": "/external_id/u1$"})
    with pytest.raises(httpx.ReadTimeout):
        await sim.client.patch(sim.user_path("u1"), json={"properties": {"tags": {"plan": "late"}}}, timeout=0.2)
    assert (await sim.control("stats"))["in_progress"] == 1, "the held request is counted while it is held"
    await sim.client.delete("/_simulator/faults")
    user = await poll(lambda: sim.user("u1"), lambda body: body["properties"].get("tags", {}).get("plan") == "late")
    assert user["properties"]["tags"] == {"plan": "late"}, "what OneSignal received, it applies"
    await poll(lambda: sim.control("stats"), lambda body: body["in_progress"] == 0)


async def test_timeout_fault_holds_the_request_until_the_client_leaves_and_applies_nothing(sim: Sim) -> None:
    await sim.client.post("/_simulator/faults", json={"timeout_rate": 1.0})
    with pytest.raises(httpx.ReadTimeout):
        await sim.client.post(USERS, json={"identity": {"external_id": "u1"}}, timeout=0.3)
    await sim.client.delete("/_simulator/faults")
    assert (await sim.client.get(sim.user_path("u1"))).status_code == 404
    log = await poll(lambda: sim.control("requests"),
                     lambda body: any(r["status"] == 504 for r in body["requests"]))
    assert [r["user"] for r in log["requests"] if r["status"] == 504] == ["u1"]


async def test_invalid_fault_settings_are_rejected(sim: Sim) -> None:
    response = await sim.client.post("/_simulator/faults", json={"error_rate": 2, "paths": "("})
    assert response.status_code == 400
    assert len(response.json()["errors"]) == 2


# -- observability of the simulator itself -------------------------------------------------------


async def test_request_log_records_time_method_path_endpoint_status_and_user(sim: Sim) -> None:
    before = time.time()
    await sim.create("u1")
    await sim.client.patch(sim.user_path("u1"), json={"properties": {"tags": {"journey": "x"}}})
    entries = (await sim.control("requests"))["requests"]
    assert [(e["method"], e["endpoint"], e["status"], e["user"]) for e in entries] == [
        ("POST", "POST /apps/{app_id}/users", 200, "u1"),
        ("PATCH", "PATCH /apps/{app_id}/users/by/{alias_label}/{alias_id}", 400, "u1"),
    ]
    assert entries[1]["path"] == f"{USERS}/by/external_id/u1"
    assert before <= entries[0]["time"] <= entries[1]["time"] <= time.time()


async def test_stats_count_requests_by_endpoint_status_and_rate_limiting(start_sim: StartSim) -> None:
    sim = await start_sim(user_interval_s=1.0)
    await sim.create("u1")
    await sim.create("u1")
    await sim.client.get(sim.user_path("nobody"))
    stats = await sim.control("stats")
    assert stats == {"total_requests": 3, "in_progress": 0, "rate_limited": 1,
                     "by_endpoint": {"POST /apps/{app_id}/users": 2,
                                     "GET /apps/{app_id}/users/by/{alias_label}/{alias_id}": 1},
                     "by_status": {"200": 1, "429": 1, "404": 1},
                     "rate_limited_by": {"app": 0, "user": 1}}, "the second create hit the per-user limit"


async def test_reset_forgets_users_stats_and_the_request_log(sim: Sim) -> None:
    await sim.create("u1")
    assert (await sim.client.post("/_simulator/reset")).status_code == 200
    assert (await sim.control("users"))["users"] == []
    assert (await sim.control("requests"))["requests"] == []
    assert (await sim.control("stats"))["total_requests"] == 0
    assert (await sim.create("u1")).status_code == 200


# -- the official SDK ---------------------------------------------------------------------------


def _sdk_round_trip(base_url: str) -> dict[str, Any]:
    """Create, update, view and delete a user with onesignal-python-api (synchronous)."""
    import onesignal
    from onesignal.api.default_api import DefaultApi
    from onesignal.exceptions import NotFoundException
    from onesignal.model.identity_object import IdentityObject
    from onesignal.model.properties_object import PropertiesObject
    from onesignal.model.subscription import Subscription
    from onesignal.model.update_user_request import UpdateUserRequest
    from onesignal.model.user import User

    config = onesignal.Configuration(host=base_url, rest_api_key=API_KEY)
    with onesignal.ApiClient(config) as api_client:
        api = DefaultApi(api_client)
        created = api.create_user(APP_ID, User(
            identity=IdentityObject(external_id="sdk-user"),
            properties=PropertiesObject(tags={"plan": "pro", "seats": "3"}, language="en"),
            subscriptions=[Subscription(type="Email", token="sdk@example.com")]))
        updated = api.update_user(APP_ID, "external_id", "sdk-user", UpdateUserRequest(
            properties=PropertiesObject(tags={"plan": "team", "seats": ""}, country="FR")))
        viewed = api.get_user(APP_ID, "external_id", "sdk-user")
        api.delete_user(APP_ID, "external_id", "sdk-user")
        try:
            api.get_user(APP_ID, "external_id", "sdk-user")
            gone = False
        except NotFoundException:
            gone = True
    return {"created_external_id": created.identity["external_id"],
            "updated_tags": updated.properties.tags,
            "viewed_tags": viewed.properties.tags, "viewed_country": viewed.properties.country,
            "viewed_tokens": [s.token for s in viewed.subscriptions], "gone": gone}


async def test_official_sdk_can_create_update_view_and_delete_a_user(sim: Sim) -> None:
    result = await asyncio.to_thread(_sdk_round_trip, sim.base_url)
    assert result == {"created_external_id": "sdk-user", "updated_tags": {"plan": "team", "seats": ""},
                      "viewed_tags": {"plan": "team"}, "viewed_country": "FR",
                      "viewed_tokens": ["sdk@example.com"], "gone": True}


# -- strict readings of what OneSignal does not promise (issue 14) --------------------------------


async def test_new_user_answers_404_by_alias_until_the_replication_lag_has_passed(start_sim: StartSim) -> None:
    sim = await start_sim(replication_lag_ms=400)
    created = await sim.create("u1", properties={"tags": {"plan": "pro"}})
    assert created.status_code == 200
    early = [await sim.client.get(sim.user_path("u1")),
             await sim.client.patch(sim.user_path("u1"), json={"properties": {"tags": {"plan": "team"}}}),
             await sim.client.patch(f"{sim.user_path('u1')}/identity", json={"identity": {"crm_id": "c-1"}}),
             await sim.client.delete(sim.user_path("u1"))]
    assert [r.status_code for r in early] == [404, 404, 404, 404]
    assert all(error_codes(r) == ["user-not-found"] for r in early), "indistinguishable from a missing user"
    again = await sim.create("u1")
    assert again.status_code == 202, "Create user finds the user during the lag"
    await asyncio.sleep(0.45)
    user = await sim.user("u1")
    assert user["properties"]["tags"] == {"plan": "pro"}, "nothing the 404 answers carried was applied"
    assert "crm_id" not in user["identity"]


async def test_tag_limit_refuses_a_write_that_adds_tags_past_it_with_onesignals_body(start_sim: StartSim) -> None:
    sim = await start_sim(max_tags=3)
    too_many = await sim.create("u1", properties={"tags": {f"t{i}": "x" for i in range(4)}},
                                subscriptions=[{"type": "Email", "token": "u1@example.com"}])
    assert too_many.status_code == 400
    assert too_many.json() == {"errors": [tag_limit_message(3)], "success": False}
    assert tag_limit_message(3) == "App is limited to a maximum of 3 tags on a given player"
    assert (await sim.control("users"))["users"] == [], "nothing in the refused request was applied"
    assert (await sim.create("u1", properties={"tags": {"a": "1", "b": "1", "c": "1"}})).status_code == 200
    adding = await sim.client.patch(sim.user_path("u1"), json={"properties": {"tags": {"d": "1"},
                                                                              "language": "fr"}})
    assert adding.status_code == 400 and adding.json()["errors"] == [tag_limit_message(3)]
    changing = await sim.client.patch(sim.user_path("u1"), json={"properties": {"tags": {"a": "2", "b": ""}}})
    assert changing.status_code == 202, "changing and deleting tags is always allowed"
    stored = (await sim.user("u1"))["properties"]
    assert stored["tags"] == {"a": "2", "c": "1"} and "language" not in stored


async def test_a_21st_subscription_evicts_the_oldest_to_a_new_anonymous_user(sim: Sim) -> None:
    sms = [{"type": "SMS", "token": f"+1555555{i:04d}"} for i in range(17)]
    emails = [{"type": "Email", "token": f"e{i}@example.com"} for i in range(3)]
    assert (await sim.create("u1", subscriptions=emails + sms)).status_code == 200
    extra = await sim.client.post(f"{sim.user_path('u1')}/subscriptions",
                                  json={"subscription": {"type": "SMS", "token": "+15555559999"}})
    assert extra.status_code == 201
    user = await sim.user("u1")
    tokens = [s["token"] for s in user["subscriptions"]]
    assert len(tokens) == 20 and "+15555559999" in tokens
    assert "+15555550000" not in tokens and "e0@example.com" in tokens, \
        "the oldest goes, but never one of the last three emails"
    users = (await sim.control("users"))["users"]
    (anonymous,) = [u for u in users if "external_id" not in u["identity"]]
    assert [s["token"] for s in anonymous["subscriptions"]] == ["+15555550000"]


async def test_notification_types_is_a_field_of_its_own(sim: Sim) -> None:
    created = await sim.create("u1", subscriptions=[{"type": "Email", "token": "u1@example.com"}])
    sub_path = f"/apps/{APP_ID}/subscriptions/{created.json()['subscriptions'][0]['id']}"
    await sim.client.patch(sub_path, json={"subscription": {"enabled": False}})
    (only_enabled,) = (await sim.user("u1"))["subscriptions"]
    assert (only_enabled["enabled"], only_enabled["notification_types"]) == (False, 1)
    await sim.client.patch(sub_path, json={"subscription": {"enabled": False, "notification_types": -2}})
    (both,) = (await sim.user("u1"))["subscriptions"]
    assert (both["enabled"], both["notification_types"]) == (False, -2)


async def test_lenient_notification_types_follows_enabled(start_sim: StartSim) -> None:
    sim = await start_sim(notification_types="derived")
    created = await sim.create("u1", subscriptions=[{"type": "Email", "token": "u1@example.com"}])
    sub_path = f"/apps/{APP_ID}/subscriptions/{created.json()['subscriptions'][0]['id']}"
    await sim.client.patch(sub_path, json={"subscription": {"enabled": False}})
    (sub,) = (await sim.user("u1"))["subscriptions"]
    assert (sub["enabled"], sub["notification_types"]) == (False, -2)


async def test_a_subscription_sent_again_keeps_its_consent_even_when_it_moves(sim: Sim) -> None:
    await sim.create("a", subscriptions=[{"type": "Email", "token": "x@example.com", "enabled": True}])
    same_user = await sim.create("a", subscriptions=[{"type": "Email", "token": "x@example.com",
                                                      "enabled": False, "notification_types": -2}])
    assert same_user.json()["subscriptions"][0]["enabled"] is True, "the answer shows what OneSignal kept"
    moved = await sim.create("b", subscriptions=[{"type": "Email", "token": "x@example.com", "enabled": False}])
    assert moved.status_code == 200
    (sub,) = moved.json()["subscriptions"]
    assert (sub["enabled"], sub["notification_types"]) == (True, 1)


async def test_lenient_moved_subscription_takes_the_consent_sent(start_sim: StartSim) -> None:
    sim = await start_sim(resent_subscription="update")
    await sim.create("a", subscriptions=[{"type": "Email", "token": "x@example.com", "enabled": True}])
    moved = await sim.create("b", subscriptions=[{"type": "Email", "token": "x@example.com", "enabled": False}])
    assert moved.json()["subscriptions"][0]["enabled"] is False


async def test_view_user_is_limited_to_one_request_per_second_per_app_by_default(start_sim: StartSim) -> None:
    sim = await start_sim(view_rate_per_s=None)
    await sim.create("u1")
    first, second = (await sim.client.get(sim.user_path("u1"))), (await sim.client.get(sim.user_path("u1")))
    assert (first.status_code, second.status_code) == (200, 429)


async def test_config_endpoint_changes_settings_per_test_and_reset_restores_the_start_up_ones(sim: Sim) -> None:
    changed = await sim.client.post("/_simulator/config", json={"replication_lag_ms": 5000, "max_tags": 2})
    assert changed.status_code == 200
    assert (changed.json()["config"]["replication_lag_ms"], changed.json()["config"]["max_tags"]) == (5000.0, 2)
    await sim.create("u1")
    assert (await sim.client.get(sim.user_path("u1"))).status_code == 404, "the new lag applies at once"
    lenient = await sim.client.post("/_simulator/config", json={"preset": "lenient"})
    assert lenient.json()["config"]["wrong_key_status"] == 401
    assert (await sim.client.get(sim.user_path("u1"))).status_code == 200, "users survive a config change"
    await sim.client.post("/_simulator/reset")
    config = (await sim.control("config"))["config"]
    assert config == (await sim.control("config"))["startup"]
    assert (config["replication_lag_ms"], config["wrong_key_status"]) == (0.0, 403)


async def test_invalid_config_is_refused_naming_every_bad_key(sim: Sim) -> None:
    response = await sim.client.post("/_simulator/config", json={
        "max_tags": -1, "basic_auth": "maybe", "no_such_setting": 1, "create_applies_properties": "yes"})
    assert response.status_code == 400
    assert len(response.json()["errors"]) == 4
    assert (await sim.control("config"))["config"]["max_tags"] == 10


def _sdk_error_bodies(base_url: str) -> list[tuple[int, list[str], bool]]:
    """Provoke each error the simulator answers and read it the way onesignal-python-api does:
    ApiException.error_messages, and the 429 body deserialized into the SDK's RateLimitError."""
    import json

    import onesignal
    from onesignal.api.default_api import DefaultApi
    from onesignal.exceptions import ApiException
    from onesignal.model.generic_error import GenericError
    from onesignal.model.identity_object import IdentityObject
    from onesignal.model.properties_object import PropertiesObject
    from onesignal.model.rate_limit_error import RateLimitError
    from onesignal.model.update_user_request import UpdateUserRequest
    from onesignal.model.user import User

    class Body:  # what ApiClient.deserialize reads from a response
        def __init__(self, data: str) -> None:
            self.data = data

        def getheader(self, name: str, default: Any = None) -> Any:
            return default

    def user(external_id: str, tags: dict[str, str] | None = None, **more: Any) -> User:
        return User(identity=IdentityObject(external_id=external_id),
                    properties=PropertiesObject(tags=tags or {}), **more)

    out: list[tuple[int, list[str], bool]] = []
    good = onesignal.Configuration(host=base_url, rest_api_key=API_KEY)
    bad = onesignal.Configuration(host=base_url, rest_api_key="os_v2_app_wrong")
    good.retries = False  # urllib3 would otherwise wait out a Retry-After and hide the first 429
    with onesignal.ApiClient(good) as client, onesignal.ApiClient(bad) as wrong_client:
        api, wrong = DefaultApi(client), DefaultApi(wrong_client)
        api.create_user(APP_ID, user("a", {"t0": "x"}))
        api.create_user(APP_ID, user("b"))
        calls = [
            lambda: api.create_user(APP_ID, user("c", {f"t{i}": "x" for i in range(11)})),  # 400 tag limit
            lambda: api.update_user(APP_ID, "external_id", "a", UpdateUserRequest(  # 400 validation
                properties=PropertiesObject(tags={"journey": "x"}))),
            lambda: wrong.get_user(APP_ID, "external_id", "a"),  # 403
            lambda: api.get_user(APP_ID, "external_id", "nobody"),  # 404
            lambda: api.create_user(APP_ID, User(identity=IdentityObject(external_id="a", crm_id="b-crm"))),
            lambda: api.get_user(APP_ID, "external_id", "a"),  # 429 (views: 1/s per app)
            lambda: api.get_user(APP_ID, "external_id", "a"),  # 429 again, this time without Retry-After
        ]
        for call in calls:
            try:
                call()
            except ApiException as exc:
                model = RateLimitError if exc.status == 429 else GenericError
                parsed = client.deserialize(Body(exc.body), (model,), True)
                out.append((exc.status, exc.error_messages, isinstance(parsed, model)))
                json.loads(exc.body)
    return out


async def test_official_sdk_parses_every_error_body_the_strict_simulator_returns(start_sim: StartSim) -> None:
    sim = await start_sim(view_rate_per_s=None)
    await sim.client.post(USERS, json={"identity": {"crm_id": "b-crm"}})
    results = await asyncio.to_thread(_sdk_error_bodies, sim.base_url)
    assert [status for status, _, _ in results] == [400, 400, 403, 404, 409, 429, 429]
    assert all(messages and parsed for _, messages, parsed in results), results
    assert results[0][1] == ["App is limited to a maximum of 10 tags on a given player"]
    assert results[5][1] == ["API rate limit exceeded."]


async def test_official_sdk_cannot_read_the_lenient_429_body_as_a_rate_limit_error(start_sim: StartSim) -> None:
    sim = await start_sim(rate_limit_body="structured", view_rate_per_s=1.0)
    await sim.create("u1")
    await sim.client.get(sim.user_path("u1"))
    limited = await sim.client.get(sim.user_path("u1"))
    assert limited.status_code == 429

    def parse(body: str) -> Any:
        import onesignal
        from onesignal.exceptions import ApiTypeError
        from onesignal.model.rate_limit_error import RateLimitError

        class Body:
            data = body

            def getheader(self, name: str, default: Any = None) -> Any:
                return default

        with onesignal.ApiClient(onesignal.Configuration(host=sim.base_url)) as client:
            try:
                return client.deserialize(Body(), (RateLimitError,), True)
            except ApiTypeError as exc:
                return exc

    assert not hasattr(await asyncio.to_thread(parse, limited.text), "errors"), \
        "why the strict body is OneSignal's: the SDK's model wants strings"


# -- the command line ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_module_runs_as_a_server_until_sigterm_and_never_logs_the_key() -> None:
    port = _free_port()
    proc = subprocess.Popen(  # noqa: ASYNC220 - returns at once; the server must run while this test awaits it
        [sys.executable, "-m", "bridge.devtools.simulator", "--port", str(port), "--api-key", API_KEY],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False) as client:
            async def stats() -> int:
                try:
                    return (await client.get("/_simulator/stats")).status_code
                except httpx.TransportError:
                    return 0
            assert await poll(stats, lambda status: status == 200, deadline_s=15.0) == 200
        proc.send_signal(signal.SIGTERM)
        output, _ = await asyncio.to_thread(proc.communicate, timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert f"listening on http://127.0.0.1:{port}" in output
    assert API_KEY not in output


async def test_onesignal_bridge_simulator_passes_every_flag_through_and_reports_its_settings() -> None:
    port = _free_port()
    proc = subprocess.Popen(  # noqa: ASYNC220 - returns at once; the server must run while this test awaits it
        [sys.executable, "-m", "bridge", "simulator", "--port", str(port), "--lenient", "--max-tags", "3",
         "--replication-lag-ms", "250", "--app-id", APP_ID],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "ONESIGNAL_API_KEY": ""})
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False) as client:
            async def config() -> Any:
                try:
                    return (await client.get("/_simulator/config")).json()["config"]
                except httpx.TransportError:
                    return None
            settings = await poll(config, lambda c: c is not None, deadline_s=15.0)
            other_app = await client.post("/apps/another-app/users", json={"identity": {"external_id": "u"}})
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.communicate, timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (settings["max_tags"], settings["replication_lag_ms"]) == (3, 250.0), "the flags on top of the preset"
    assert (settings["wrong_key_status"], settings["create_applies_properties"]) == (401, True), "--lenient"
    assert other_app.status_code == 403, "--app-id passed through"


# -- the pure model and limiters (no server) -----------------------------------------------------


def test_failed_create_leaves_the_state_untouched() -> None:
    state = SimState(rules=LENIENT)
    state.create_user({"identity": {"external_id": "u1"}, "subscriptions": [
        {"type": "SMS", "token": f"+1555555{i:04d}"} for i in range(20)]})
    before = state.view_all()
    with pytest.raises(SimError) as refused:
        state.create_user({"identity": {"external_id": "u1", "crm_id": "c"},
                           "properties": {"tags": {"a": "1"}},
                           "subscriptions": [{"type": "Email", "token": "x@example.com"}]})
    assert refused.value.status == 409
    assert state.view_all() == before and state.find("crm_id", "c") is None


def test_write_limiter_counts_only_accepted_writes() -> None:
    limiter = WriteLimiter(app_rate_per_s=2, user_interval_s=1.0)
    assert limiter.admit(["user:a"], now=0.0) is None
    assert limiter.admit(["user:a"], now=0.5) == pytest.approx(0.5)
    assert limiter.admit(["user:b"], now=0.6) is None
    assert limiter.admit(["user:c"], now=0.7) == pytest.approx(0.3)
    assert limiter.admit(["user:c"], now=1.0) is None, "refused writes did not fill the window"
    assert limiter.admit(["user:a"], now=1.0) == pytest.approx(0.6), "app window: b at 0.6 and c at 1.0"


def test_view_limiter_refills_at_its_rate() -> None:
    limiter = ViewLimiter(rate_per_s=1.0)
    assert limiter.admit(now=0.0) is None
    assert limiter.admit(now=0.5) == pytest.approx(0.5)
    assert limiter.admit(now=1.0) is None
