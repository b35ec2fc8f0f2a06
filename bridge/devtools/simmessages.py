"""The simulator's Create message and Create custom events, for change-triggered sends (issue 17).

- `POST /notifications` (documentation.onesignal.com/reference/create-message): needs the app's
  key and `app_id`; `contents` or `template_id` (not both); `include_aliases` {label: [ids]} with
  `target_channel` (push | email | sms); `idempotency_key` a UUID. A recipient with no enabled
  subscription on the channel (or no such user) is an invalid alias: when none is valid, the answer
  is 200 `{"id": "", "errors": {"invalid_aliases": {label: [ids]}}}` and nothing is created.
- `POST /apps/{app_id}/custom_events` (documentation.onesignal.com/reference/create-custom-events):
  `{"events": [{name, external_id | onesignal_id, timestamp, idempotency_key, properties}]}`; 202,
  with `errors` for the events that failed (a user not found), the others created.
- Idempotent replay (documentation.onesignal.com/reference/idempotent-notification-requests): a
  message whose `idempotency_key` was seen gets the first answer again (`Idempotent-Replayed:
  true`) and creates nothing; an event whose key was seen is not created again.
- Rate limits (documentation.onesignal.com/reference/rate-limits): Create message 150 requests/s
  per app (the free plans' limit; paid plans 6,000), a 429 with OneSignal's body and Retry-After.
- `GET /_simulator/notifications` and `GET /_simulator/custom_events` list what was created;
  `POST /_simulator/reset` forgets them (with the users).
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from typing import Any

import orjson
from aiohttp import web

MESSAGE_RATE_PER_S = 150
EVENT_RATE_PER_S = 1000
def _channel_of(subscription_type: str) -> str:
    if subscription_type == "Email":
        return "email"
    if subscription_type == "SMS":
        return "sms"
    return "push" if subscription_type.endswith("Push") else "other"


_CHANNELS = ("push", "email", "sms")
MESSAGES_KEY = web.AppKey("onesignal_simulator_messages", dict)


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json", headers=headers)


def _is_uuid(v: Any) -> bool:
    try:
        uuid.UUID(str(v))
    except ValueError:
        return False
    return isinstance(v, str)


class _Window:
    """At most `per_s` requests in any one-second window."""

    def __init__(self, per_s: int) -> None:
        self.per_s = per_s
        self.times: deque[float] = deque()

    def take(self) -> float:
        now = time.monotonic()
        while self.times and self.times[0] <= now - 1.0:
            self.times.popleft()
        if len(self.times) >= self.per_s:
            return self.times[0] + 1.0 - now
        self.times.append(now)
        return 0.0


def register(app: web.Application, sim: Any) -> None:
    """Add the routes to the simulator's application (`sim`: its `Simulator`)."""
    store: dict[str, Any] = {"state": None}
    app[MESSAGES_KEY] = store

    def current() -> dict[str, Any]:
        if store["state"] is not sim.state:  # the simulator was reset: so is this
            store.update(state=sim.state, notifications=[], events=[], answers={}, event_keys=set(),
                         messages=_Window(MESSAGE_RATE_PER_S), event_rate=_Window(EVENT_RATE_PER_S))
        return store

    def recipient_ok(label: str, alias: Any, channel: str) -> bool:
        user = sim.state.find(label, alias) if isinstance(alias, str) else None
        if user is None:
            return False
        for sid in user.subscription_ids:
            sub = sim.state.subscriptions.get(sid)
            if sub is not None and sub.enabled and _channel_of(sub.type) == channel:
                return True
        return False

    async def read(request: web.Request) -> Any:
        raw = await request.read()
        try:
            return orjson.loads(raw) if raw.strip() else None
        except orjson.JSONDecodeError:
            return ValueError

    async def create_message(request: web.Request) -> web.Response:
        from bridge.devtools.simulator import ACCESS_DENIED, RATE_LIMIT_BODY

        s = current()
        if not sim._authorized(request):
            return _json({"errors": [ACCESS_DENIED]}, 403)
        wait = s["messages"].take()
        if wait > 0:
            return _json(RATE_LIMIT_BODY, 429, {"Retry-After": str(max(1, int(wait + 0.999)))})
        body = await read(request)
        if not isinstance(body, dict):
            return _json({"errors": ["the request body must be a JSON object"]}, 400)
        if not body.get("app_id"):
            return _json({"errors": ["You must include an app_id"]}, 400)
        if sim.app_id is not None and body["app_id"] != sim.app_id:
            return _json({"errors": [ACCESS_DENIED]}, 403)
        key = body.get("idempotency_key")
        if key is not None and not _is_uuid(key):
            return _json({"errors": ["idempotency_key must be a valid UUID"]}, 400)
        if key is not None and key in s["answers"]:
            status, first = s["answers"][key]
            return _json(first, status, {"Idempotent-Replayed": "true"})
        problems = []
        if body.get("template_id") is not None and body.get("contents") is not None:
            problems.append("Use either template_id or contents, not both")
        if body.get("template_id") is None and not isinstance(body.get("contents"), dict):
            problems.append("Notification contents must include at least one language (contents: {en: ...})")
        aliases = body.get("include_aliases")
        channel = body.get("target_channel")
        if not isinstance(aliases, dict) or not aliases or not all(
                isinstance(ids, list) and ids for ids in aliases.values()):
            problems.append("include_aliases must map an alias label to a list of ids")
        if channel not in _CHANNELS:
            problems.append("target_channel must be one of push, email, sms when include_aliases is used")
        custom = body.get("custom_data")
        if custom is not None and (not isinstance(custom, dict) or len(orjson.dumps(custom)) > (
                10240 if channel == "email" else 2048)):
            problems.append("custom_data must be an object of at most 2 KB (10 KB for email)")
        if problems:
            return _json({"errors": problems}, 400)
        assert isinstance(aliases, dict) and isinstance(channel, str)
        invalid: dict[str, list[Any]] = {}
        valid = 0
        for label, ids in aliases.items():
            for alias in ids:
                if recipient_ok(label, alias, channel):
                    valid += 1
                else:
                    invalid.setdefault(label, []).append(alias)
        answer: dict[str, Any]
        if valid == 0:
            answer = {"id": "", "errors": {"invalid_aliases": invalid}}
        else:
            nid = str(uuid.uuid4())
            answer = {"id": nid, "external_id": None}
            if invalid:
                answer["errors"] = {"invalid_aliases": invalid}
            s["notifications"].append({"id": nid, "idempotency_key": key, "body": body, "time": time.time()})
        if key is not None:
            s["answers"][key] = (200, answer)
        return _json(answer, 200)

    async def create_events(request: web.Request) -> web.Response:
        from bridge.devtools.simulator import RATE_LIMIT_BODY

        s = current()  # authorization and the app id were checked by the simulator's middleware
        wait = s["event_rate"].take()
        if wait > 0:
            return _json(RATE_LIMIT_BODY, 429, {"Retry-After": str(max(1, int(wait + 0.999)))})
        body = await read(request)
        events = body.get("events") if isinstance(body, dict) else None
        if not isinstance(events, list) or not events:
            return _json({"errors": [{"code": "invalid", "title": "events must be a non-empty list"}]}, 400)
        for i, e in enumerate(events):
            if not isinstance(e, dict) or not isinstance(e.get("name"), str) or not e["name"] \
                    or len(e["name"]) > 128:
                return _json({"errors": [{"code": "invalid", "title": f"events[{i}].name: 1 to 128 characters"}]},
                             400)
            if not isinstance(e.get("external_id"), str) and not isinstance(e.get("onesignal_id"), str):
                return _json({"errors": [{"code": "invalid",
                                          "title": f"events[{i}]: external_id or onesignal_id is required"}]}, 400)
            if "properties" in e and not isinstance(e["properties"], dict):
                return _json({"errors": [{"code": "invalid", "title": f"events[{i}].properties: an object"}]}, 400)
        errors = []
        for e in events:
            label, alias = ("external_id", e["external_id"]) if isinstance(e.get("external_id"), str) \
                else ("onesignal_id", e["onesignal_id"])
            if sim.state.find(label, alias) is None:
                title = f"failed to find a onesignal_id for user_id {alias}"
                errors.append({"event_user_id": alias, "event_id": str(uuid.uuid4()),
                               "error": {"code": "not found", "title": title}})
                continue
            key = e.get("idempotency_key")
            if key is not None and key in s["event_keys"]:
                continue  # a replay: created once already
            if key is not None:
                s["event_keys"].add(key)
            s["events"].append({"name": e["name"], "external_id": e.get("external_id"),
                                "payload": e.get("properties", {}), "idempotency_key": key, "time": time.time()})
        return _json({"errors": errors} if errors else {}, 202)

    async def list_notifications(_: web.Request) -> web.Response:
        return _json({"notifications": current()["notifications"]})

    async def list_events(_: web.Request) -> web.Response:
        return _json({"events": current()["events"]})

    app.router.add_routes([
        web.post("/notifications", create_message),
        web.post("/apps/{app_id}/custom_events", create_events),
        web.get("/_simulator/notifications", list_notifications, allow_head=False),
        web.get("/_simulator/custom_events", list_events, allow_head=False),
    ])
