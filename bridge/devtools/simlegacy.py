"""The simulator's legacy player model (issue 19): the call the bridge makes for legacy apps, and the
ones an app's SDK makes, so that tests can set up players.

- `POST /api/v1/players` (Add a device, as the older SDKs call it: no key): `app_id`,
  `device_type` (0 iOS, 1 Android, ..., 11 email, 14 SMS), `identifier` (push token, email
  address or phone number), `external_user_id`, `tags`, `notification_types` (default 1).
  Answers 200 `{"success": true, "id": <player id>}`.
- `PUT /api/v1/apps/{app_id}/users/{external_user_id}` `{"tags": {...}}` (Edit tags with external
  user id, https://documentation.onesignal.com/reference/edit-tags-with-external-user-id): edits
  every player with that external user id; `""` (or null) deletes a tag; keys left out are
  unchanged. 200 `{"success": true}`; 404 with a legacy body `{"errors": [...]}` when no player
  has the id; 400 for a body without a `tags` object. It goes through the simulator's middleware
  (request log, faults, `Basic` auth with the key, app id), and the per-user write limit.
- `GET /_simulator/players` -> `{"players": [{"id", "external_user_id", "device_type",
  "identifier", "tags", "notification_types"}]}`. `POST /_simulator/reset` forgets the players
  (they belong to the simulator's current state).
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

if TYPE_CHECKING:
    from bridge.devtools.simulator import Simulator

LEGACY_PREFIX = "/api/v1/"
_EDIT_TAGS = "/api/v1/apps/{app_id}/users/{alias_id:[^/]+}"  # `alias_id`: the request log names the user


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def _legacy_error(status: int, message: str) -> web.Response:
    return _json({"errors": [message]}, status)


class _Players:
    """The players of the simulator's current state (a reset makes a new state: no players)."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self._state: object = sim.state
        self._players: dict[str, dict[str, Any]] = {}

    @property
    def players(self) -> dict[str, dict[str, Any]]:
        if self._state is not self.sim.state:
            self._state, self._players = self.sim.state, {}
        return self._players

    async def add_device(self, request: web.Request) -> web.Response:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _legacy_error(400, "the request body is not valid JSON")
        if not isinstance(body, dict):
            return _legacy_error(400, "the request body must be a JSON object")
        problems = []
        app_id = body.get("app_id")
        if not isinstance(app_id, str) or not app_id:
            problems.append("app_id is required")
        elif self.sim.app_id is not None and app_id != self.sim.app_id:
            problems.append(f"app_id {app_id} not found")
        device_type = body.get("device_type")
        if not isinstance(device_type, int) or isinstance(device_type, bool):
            problems.append("device_type is required (an integer)")
        tags = body.get("tags", {})
        if not isinstance(tags, dict):
            problems.append("tags must be an object")
        external = body.get("external_user_id")
        if external is not None and not isinstance(external, str):
            problems.append("external_user_id must be a string")
        if problems:
            return _legacy_error(400, "; ".join(problems))
        player_id = str(uuid.uuid4())
        self.players[player_id] = {
            "id": player_id, "external_user_id": external, "device_type": device_type,
            "identifier": body.get("identifier"),
            "tags": {str(k): _text(v) for k, v in tags.items() if v not in ("", None)},
            "notification_types": body.get("notification_types", 1),
        }
        return _json({"success": True, "id": player_id})

    async def edit_tags(self, request: web.Request) -> web.Response:
        external = request.match_info["alias_id"]
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _legacy_error(400, "the request body is not valid JSON")
        tags = body.get("tags") if isinstance(body, dict) else None
        if not isinstance(tags, dict):
            return _legacy_error(400, "tags must be an object")
        bad = [k for k, v in tags.items() if isinstance(v, dict | list)]
        if bad:
            return _legacy_error(400, f"tag values must be strings or numbers: {', '.join(sorted(bad))}")
        self.sim._admit_write([f"legacy:{external}"])  # 1 request/s per user: RateLimited -> 429
        held = [p for p in self.players.values() if p["external_user_id"] == external]
        if not held:
            return _legacy_error(404, f"No player with external_user_id {external} found")
        for p in held:
            for k, v in tags.items():
                if v in ("", None):
                    p["tags"].pop(k, None)
                else:
                    p["tags"][k] = _text(v)
        return _json({"success": True})

    async def control_players(self, request: web.Request) -> web.Response:
        return _json({"players": list(self.players.values())})


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def register(app: web.Application, sim: Simulator) -> None:
    players = _Players(sim)
    app.router.add_routes([
        web.post("/api/v1/players", players.add_device),
        web.put(_EDIT_TAGS, players.edit_tags),
        web.get("/_simulator/players", players.control_players, allow_head=False),
    ])
