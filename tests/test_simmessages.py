"""The simulator's Create message and Create custom events (bridge/devtools/simmessages.py), over HTTP."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from aiohttp import web

from bridge.devtools.simulator import build_app

API_KEY = "os_v2_app_simmessages_test_key"
APP = "3f1c2b8e-0000-4000-8000-0000000000ee"


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    runner = web.AppRunner(build_app(api_key=API_KEY, app_id=APP, user_interval_s=0.0, replication_lag_ms=0.0),
                           shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    c = httpx.AsyncClient(base_url=f"http://127.0.0.1:{runner.addresses[0][1]}",
                          headers={"Authorization": f"Key {API_KEY}"}, timeout=5.0, trust_env=False)
    r = await c.post(f"/apps/{APP}/users", json={"identity": {"external_id": "ada"},
                                                  "subscriptions": [{"type": "Email", "token": "ada@example.com"}]})
    assert r.status_code in (200, 201, 202), r.text
    r = await c.post(f"/apps/{APP}/users", json={"identity": {"external_id": "bob"}})
    assert r.status_code in (200, 201, 202), r.text
    yield c
    await c.aclose()
    await runner.cleanup()


def _message(to: str, key: str | None = None, **extra: object) -> dict[str, object]:
    body: dict[str, object] = {"app_id": APP, "include_aliases": {"external_id": [to]}, "target_channel": "email",
                               "contents": {"en": "shipped"}, **extra}
    if key is not None:
        body["idempotency_key"] = key
    return body


async def test_a_repeated_idempotency_key_gets_the_first_answer_and_creates_nothing(client: httpx.AsyncClient) -> None:
    key = str(uuid.uuid4())
    first = await client.post("/notifications", json=_message("ada", key))
    again = await client.post("/notifications", json=_message("ada", key))
    assert first.status_code == again.status_code == 200 and first.json()["id"]
    assert again.json() == first.json() and again.headers.get("Idempotent-Replayed") == "true"
    listed = (await client.get("/_simulator/notifications")).json()["notifications"]
    assert [(n["id"], n["idempotency_key"]) for n in listed] == [(first.json()["id"], key)]


async def test_a_recipient_without_a_subscription_on_the_channel_is_an_invalid_alias(client: httpx.AsyncClient) -> None:
    r = await client.post("/notifications", json=_message("bob", str(uuid.uuid4())))
    assert r.status_code == 200
    assert r.json() == {"id": "", "errors": {"invalid_aliases": {"external_id": ["bob"]}}}
    push = await client.post("/notifications", json={**_message("ada"), "target_channel": "push"})
    assert push.json()["id"] == ""  # ada has email only
    assert (await client.get("/_simulator/notifications")).json()["notifications"] == []


@pytest.mark.parametrize("extra", [{"template_id": "6d6f3b1e-0000-4000-8000-000000000001"},
                                   {"target_channel": "fax"}, {"idempotency_key": "not-a-uuid"}])
async def test_malformed_messages_are_400_with_errors(client: httpx.AsyncClient, extra: dict[str, object]) -> None:
    r = await client.post("/notifications", json=_message("ada", **extra))
    assert r.status_code == 400 and r.json()["errors"]


async def test_create_message_allows_150_requests_per_second_then_429_with_retry_after(
        client: httpx.AsyncClient) -> None:
    answers = await asyncio.gather(*[client.post("/notifications", json=_message("bob")) for _ in range(160)])
    limited = [a for a in answers if a.status_code == 429]
    assert len(limited) == 10
    assert limited[0].headers["Retry-After"] == "1" and limited[0].json()["errors"]


async def test_custom_events_are_created_once_per_key_and_unknown_users_are_202_errors(
        client: httpx.AsyncClient) -> None:
    key = str(uuid.uuid4())
    events = {"events": [{"name": "order_placed", "external_id": "ada", "idempotency_key": key,
                          "properties": {"order_id": 1}},
                         {"name": "order_placed", "external_id": "nobody", "idempotency_key": str(uuid.uuid4())}]}
    r = await client.post(f"/apps/{APP}/custom_events", json=events)
    assert r.status_code == 202
    assert [e["event_user_id"] for e in r.json()["errors"]] == ["nobody"]
    await client.post(f"/apps/{APP}/custom_events", json=events)
    listed = (await client.get("/_simulator/custom_events")).json()["events"]
    assert [(e["name"], e["external_id"], e["payload"], e["idempotency_key"]) for e in listed] == [
        ("order_placed", "ada", {"order_id": 1}, key)]
    await client.post("/_simulator/reset")
    assert (await client.get("/_simulator/custom_events")).json()["events"] == []
