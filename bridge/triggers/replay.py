"""`dlq replay` of a trigger's dead letters: the stored request is sent again under its
`idempotency_key`, so OneSignal creates nothing twice. A letter counts as replayed when OneSignal
answers 2xx with something created (a message `id`, no event `errors`).

OneSignal answers a repeated key with its first answer: a send whose first answer created nothing
(an empty `id`, e.g. `invalid_aliases`) would get that answer forever. Such a key is safe to abandon
(nothing was created under it), so the send goes again at once under the next key,
uuid5(key, "dlq-replay"); if that creates nothing either, the letter keeps the new key for the
next replay. A key is never abandoned unless OneSignal said nothing was created under it."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import orjson

from bridge.triggers.match import NAMESPACE

ATTEMPTS = 5


def next_key(body: dict[str, Any]) -> dict[str, Any]:
    """The same request under the next idempotency key (each event's, or the message's)."""
    def rotate(key: Any) -> str:
        return str(uuid.uuid5(NAMESPACE, f"{key}|dlq-replay"))

    if "events" in body:
        return {**body, "events": [{**e, "idempotency_key": rotate(e.get("idempotency_key"))}
                                   for e in body["events"]]}
    return {**body, "idempotency_key": rotate(body.get("idempotency_key"))}


async def replay(config: Any, letters: list[tuple[int, str, Any]]
                 ) -> list[tuple[int, bool, str, dict[str, Any] | None]]:
    """(id, field, request) -> (id, replayed, what happened, the request to keep when it changed)."""
    os = config.onesignal
    headers = {"authorization": f"Key {os.api_key.get_secret_value()}", "content-type": "application/json"}
    out: list[tuple[int, bool, str, dict[str, Any] | None]] = []
    async with httpx.AsyncClient(base_url=os.base_url, timeout=os.request_timeout_s) as http:
        for letter_id, field, request in letters:
            body = orjson.loads(request) if isinstance(request, str) else request
            if not isinstance(body, dict):
                out.append((letter_id, False, "no stored request to send again", None))
                continue
            path = "/notifications" if "events" not in body else f"/apps/{os.app_id}/custom_events"
            ok, detail, nothing = await _send(http, path, body, headers, field)
            kept: dict[str, Any] | None = None
            if nothing:  # nothing was created under this key: the next one is safe
                kept = next_key(body)
                ok, detail, nothing = await _send(http, path, kept, headers, field)
            out.append((letter_id, ok, detail, None if ok else kept))
    return out


async def _send(http: httpx.AsyncClient, path: str, body: dict[str, Any], headers: dict[str, str],
                field: str) -> tuple[bool, str, bool]:
    """(sent, what happened, OneSignal said nothing was created under the key)."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            r = await http.post(path, content=orjson.dumps(body), headers=headers)
        except httpx.HTTPError as exc:
            if attempt == ATTEMPTS:
                return False, f"{path}: {exc}", False
            await asyncio.sleep(0.5 * 2 ** attempt)
            continue
        if r.status_code == 429 or r.status_code >= 500:
            if attempt == ATTEMPTS:
                return False, f"{path} answered {r.status_code}", False
            await asyncio.sleep(min(30.0, float(r.headers.get("retry-after", 0.5 * 2 ** attempt) or 1)))
            continue
        try:
            answer = r.json()
        except ValueError:
            answer = None
        if not 200 <= r.status_code < 300:
            return False, f"{path} answered {r.status_code}: {r.text[:300]}", False
        if isinstance(answer, dict) and (("id" in answer and not answer["id"]) or
                                         ("id" not in answer and answer.get("errors"))):
            return False, f"{path} created nothing: {orjson.dumps(answer.get('errors')).decode()}", True
        created = answer.get("id") if isinstance(answer, dict) else None
        return True, f"{field[len('trigger:'):]}: sent again" + (f" (message {created})" if created else ""), False
    return False, f"{path}: no answer", False
