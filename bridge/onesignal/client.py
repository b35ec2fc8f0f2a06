"""OneSignal REST client (httpx, async, pooled): the user, alias and subscription calls.

Every call returns the parsed JSON body on 2xx and raises a typed `OneSignalError` otherwise
(see `errors.py`). The client is injected with its `httpx.AsyncClient`, so tests can hand it a
`MockTransport` or point it at the simulator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import orjson

from bridge.onesignal import errors
from bridge.onesignal.transport import AiohttpTransport

USER_AGENT = "onesignal-bridge/0.1"


@dataclass(frozen=True, slots=True)
class Request:
    """One API call, planned before it is sent (the planner is pure)."""

    method: str
    path: str  # relative to /apps/{app_id}
    endpoint: str  # route template, for metrics: "POST /users"
    body: dict[str, Any] | None = None
    ok_statuses: frozenset[int] = frozenset()  # extra statuses that count as success (e.g. 404 on delete)


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: Any


def seg(value: str) -> str:
    return quote(value, safe="")


def build_http_client(base_url: str, timeout_s: float, max_connections: int = 100) -> httpx.AsyncClient:
    """The pooled client the bridge uses: httpx on top of aiohttp's connection pool (transport.py)."""
    return httpx.AsyncClient(
        base_url=base_url,
        transport=AiohttpTransport(max_connections=max_connections, connect_timeout=min(timeout_s, 5.0)),
        timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0)),
        headers={"user-agent": USER_AGENT, "accept": "application/json"},
    )


class OneSignalClient:
    def __init__(self, http: httpx.AsyncClient, app_id: str, api_key: str) -> None:
        self._http = http
        self._prefix = f"/apps/{seg(app_id)}"
        self._auth = {"authorization": f"Key {api_key}"}
        self._key = api_key

    def __repr__(self) -> str:  # never show the key
        return f"OneSignalClient(prefix={self._prefix!r})"

    async def send(self, req: Request) -> Response:
        content = orjson.dumps(req.body) if req.body is not None else None
        headers = dict(self._auth)
        if content is not None:
            headers["content-type"] = "application/json"
        try:
            resp = await self._http.request(req.method, self._prefix + req.path, content=content, headers=headers)
        except httpx.HTTPError as exc:
            raise errors.from_exception(exc, req.endpoint) from None
        if 200 <= resp.status_code < 300 or resp.status_code in req.ok_statuses:
            return Response(resp.status_code, errors.parse_body(resp.content))
        raise errors.from_response(resp, req.endpoint, secret=self._key)

    # -- convenience wrappers (used by `check`, the demo and tests) ---------------------

    async def create_user(self, identity: dict[str, str], properties: dict[str, Any] | None = None,
                          subscriptions: list[dict[str, Any]] | None = None) -> Response:
        return await self.send(requests.create_user(identity, properties, subscriptions))

    async def view_user(self, label: str, alias: str) -> Response:
        return await self.send(Request("GET", f"/users/by/{seg(label)}/{seg(alias)}", "GET /users/by"))

    async def update_user(self, label: str, alias: str, properties: dict[str, Any]) -> Response:
        return await self.send(requests.update_user(label, alias, properties))

    async def delete_user(self, label: str, alias: str) -> Response:
        return await self.send(requests.delete_user(label, alias))


class requests:  # noqa: N801 - a namespace of request builders
    """Pure builders for each call of `onesignal-api.md`."""

    @staticmethod
    def create_user(identity: dict[str, str], properties: dict[str, Any] | None = None,
                    subscriptions: list[dict[str, Any]] | None = None) -> Request:
        body: dict[str, Any] = {"identity": identity}
        if properties:
            body["properties"] = properties
        if subscriptions:
            body["subscriptions"] = subscriptions
        return Request("POST", "/users", "POST /users", body)

    @staticmethod
    def update_user(label: str, alias: str, properties: dict[str, Any]) -> Request:
        return Request("PATCH", f"/users/by/{seg(label)}/{seg(alias)}", "PATCH /users/by",
                       {"properties": properties})

    @staticmethod
    def delete_user(label: str, alias: str) -> Request:
        return Request("DELETE", f"/users/by/{seg(label)}/{seg(alias)}", "DELETE /users/by",
                       ok_statuses=frozenset({404}))

    @staticmethod
    def upsert_aliases(label: str, alias: str, identity: dict[str, str]) -> Request:
        return Request("PATCH", f"/users/by/{seg(label)}/{seg(alias)}/identity", "PATCH /identity",
                       {"identity": identity})

    @staticmethod
    def delete_alias(label: str, alias: str, label_to_delete: str) -> Request:
        return Request("DELETE", f"/users/by/{seg(label)}/{seg(alias)}/identity/{seg(label_to_delete)}",
                       "DELETE /identity", ok_statuses=frozenset({404}))

    @staticmethod
    def create_subscription(label: str, alias: str, subscription: dict[str, Any]) -> Request:
        return Request("POST", f"/users/by/{seg(label)}/{seg(alias)}/subscriptions", "POST /subscriptions",
                       {"subscription": subscription})

    @staticmethod
    def update_subscription(subscription_id: str, subscription: dict[str, Any]) -> Request:
        return Request("PATCH", f"/subscriptions/{seg(subscription_id)}", "PATCH /subscriptions",
                       {"subscription": subscription})

    @staticmethod
    def delete_subscription(subscription_id: str) -> Request:
        return Request("DELETE", f"/subscriptions/{seg(subscription_id)}", "DELETE /subscriptions",
                       ok_statuses=frozenset({404}))
