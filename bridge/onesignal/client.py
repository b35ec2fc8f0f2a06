"""OneSignal REST client (httpx, async, pooled): the user, alias and subscription calls.

Every call returns the parsed JSON body on 2xx and raises a typed `OneSignalError` otherwise
(see `errors.py`). The client is injected with its `httpx.AsyncClient`, so tests can hand it a
`MockTransport` or point it at the simulator.

Routing is exact or nothing. A request names its path as a tuple of segments (alias labels and
ids, subscription ids); before anything is sent, every segment must be a usable OneSignal alias
(`alias_problem`: 1-128 characters, not `.` or `..`, no `/?#&=`, whitespace or control
characters), and the URL that httpx built must split back into exactly the intended segments.
Otherwise `send` raises `UnroutableRequest` (a non-retriable `Rejected`, so the dispatcher
dead-letters it) and no byte leaves the process: an identity `..` can never turn
`DELETE /users/by/external_id/..` into `DELETE /users/by`.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

import httpx
import orjson
import yarl

from bridge.onesignal import errors
from bridge.onesignal.transport import AiohttpTransport, body_headers

USER_AGENT = "onesignal-bridge/0.1"

MAX_ALIAS_LENGTH = 128  # onesignal-api.md: alias labels and ids, "keep them short (128 chars)"
# Characters an alias label or id must not hold: OneSignal's list (/?#&=, whitespace, control
# characters), C1 controls, and lone surrogates (not encodable as UTF-8, so not sendable at all).
_FORBIDDEN = re.compile(r"[/?#&=\s\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_DOT_SEGMENTS = frozenset((".", ".."))


def alias_problem(text: str) -> str | None:
    """Why `text` cannot be an alias label, alias id or any other path segment (None: it can).

    The same rule serves mapping (a bad identity or alias value becomes a dead letter) and the
    client (a path segment that breaks it is never sent), so both agree on what is routable.
    """
    if not text:
        return "is empty"
    if text in _DOT_SEGMENTS or (len(text) <= 8 and not text.isascii()
                                 and unicodedata.normalize("NFKC", text) in _DOT_SEGMENTS):
        return ("is (or normalises to) a dot segment, which HTTP clients and servers remove from a URL "
                "path: the request would reach another endpoint")
    if len(text) > MAX_ALIAS_LENGTH:
        return f"is {len(text)} characters long (at most {MAX_ALIAS_LENGTH})"
    bad = _FORBIDDEN.search(text)
    if bad is not None:
        return (f"contains {bad.group()!r} at offset {bad.start()} (no /?#&=, whitespace or control "
                f"characters)")
    return None


class UnroutableRequest(errors.Rejected):
    """A request whose URL would not reach exactly the intended endpoint: never sent.

    A `Rejected` (not retriable), so the dispatcher dead-letters the change with this reason.
    """

    @property
    def reason(self) -> str:
        return "unroutable_request"


@dataclass(frozen=True, slots=True)
class Request:
    """One API call, planned before it is sent (the planner is pure).

    `segments` are the path below /apps/{app_id}, unencoded, e.g. ("users", "by", label, id);
    `path` is their percent-encoded form (for logs and dead letters). `send` routes by
    `segments`; a request made without them is read back from `path`.
    """

    method: str
    path: str  # relative to /apps/{app_id}
    endpoint: str  # route template, for metrics: "POST /users"
    body: dict[str, Any] | None = None
    ok_statuses: frozenset[int] = frozenset()  # extra statuses that count as success (e.g. 404 on delete)
    segments: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: Any


def seg(value: str) -> str:
    """One path segment, percent-encoded (every reserved character, `/` included)."""
    return quote(value, safe="", errors="backslashreplace")  # a lone surrogate: shown, never sent


def _request(method: str, segments: tuple[str, ...], endpoint: str, body: dict[str, Any] | None = None,
             ok_statuses: frozenset[int] = frozenset()) -> Request:
    path = "/" + "/".join(seg(s) if isinstance(s, str) else repr(s) for s in segments)
    return Request(method, path, endpoint, body, ok_statuses, segments)


def route_problem(segments: tuple[str, ...]) -> str | None:
    """Why a path made of `segments` could not be routed as intended (None: it can)."""
    for i, s in enumerate(segments):
        if not isinstance(s, str):
            return f"path segment {i + 1} is {type(s).__name__}, not text"
        problem = alias_problem(s)
        if problem is not None:
            return f"path segment {i + 1} ({s[:40]!r}) {problem}"
    return None


class PooledClient(httpx.AsyncClient):
    """The client `build_http_client` makes: an httpx client whose transport is aiohttp's pool.
    `OneSignalClient` sends through `wire` directly (transport.py: ~40% of httpx's CPU per
    request); everything else that holds it uses it as the httpx client it is."""

    def __init__(self, base_url: str, timeout_s: float, max_connections: int) -> None:
        self.wire = AiohttpTransport(max_connections=max_connections, connect_timeout=min(timeout_s, 5.0))
        self.timeout_s = timeout_s
        super().__init__(
            base_url=base_url,
            transport=self.wire,
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0)),
            headers=DEFAULT_HEADERS,
        )


DEFAULT_HEADERS = {"user-agent": USER_AGENT, "accept": "application/json"}


def build_http_client(base_url: str, timeout_s: float, max_connections: int = 100) -> httpx.AsyncClient:
    """The pooled client the bridge uses: httpx on top of aiohttp's connection pool (transport.py)."""
    return PooledClient(base_url, timeout_s, max_connections)


class OneSignalClient:
    def __init__(self, http: httpx.AsyncClient, app_id: str, api_key: str, scheme: str = "Key") -> None:
        """`scheme`: `Key` (User Model app keys) or `Basic` (a legacy REST API key, legacy calls)."""
        self._http = http
        self._app_id = app_id
        self._prefix = f"/apps/{seg(app_id)}"
        self._auth = {"authorization": f"{scheme} {api_key}"}
        self._key = api_key
        # Awaited before every request: the leader lease (bridge/lease.py) of a source that elects a
        # leader; None sends at once.
        self.gate: Callable[[], Awaitable[None]] | None = None
        # The direct path (`_send_on_wire`): the base URL's origin and path, and the headers
        # httpx would have sent, prepared once. A base URL with a query or fragment has no
        # direct path (httpx's path checks it, and refuses it).
        self._wire: AiohttpTransport | None = None
        base = http.base_url
        if isinstance(http, PooledClient) and not base.query and not base.fragment:
            self._wire = http.wire
            self._wire_timeout = http.wire.timeout(http.timeout_s)
            raw_base = base.raw_path.decode("ascii").rstrip("/")
            self._wire_origin = str(base.copy_with(raw_path=b"/")).rstrip("/")
            self._wire_base = raw_base
            self._wire_base_segments = _split(base.raw_path)
            self._wire_headers = {**DEFAULT_HEADERS, **self._auth}
            self._wire_json_headers = {**self._wire_headers, "content-type": "application/json"}

    def __repr__(self) -> str:  # never show the key
        return f"OneSignalClient(prefix={self._prefix!r})"

    def _intended(self, req: Request) -> tuple[str, ...]:
        """The path segments `req` must reach: ("apps", app_id, *segments); `UnroutableRequest`
        when one of them is not a usable alias (`alias_problem`)."""
        intended = ("apps", self._app_id, *(req.segments or _segments_of(req.path)))
        problem = route_problem(intended)
        if problem is not None:
            raise UnroutableRequest(f"{req.endpoint} not sent: {problem}",
                                    endpoint=req.endpoint, detail=problem)
        return intended

    def prepare(self, req: Request) -> httpx.Request:
        """The HTTP request for `req`, checked to reach exactly the intended endpoint.

        Raises `UnroutableRequest` when a path segment is not a usable alias (see
        `alias_problem`) or when the URL, after httpx's normalisation, does not split back into
        exactly /apps/{app_id}/<segments> below the base URL.
        """
        intended = self._intended(req)
        content = orjson.dumps(req.body) if req.body is not None else None
        headers = dict(self._auth)
        if content is not None:
            headers["content-type"] = "application/json"
        path = "/" + "/".join(seg(s) for s in intended)
        request = self._http.build_request(req.method, path, content=content, headers=headers)
        base = _split(self._http.base_url.raw_path)
        sent = _split(request.url.raw_path)
        if (request.url.query or request.url.fragment or sent[: len(base)] != base
                or tuple(unquote(s) for s in sent[len(base):]) != intended):
            built = request.url.raw_path.decode("ascii", "replace")[:300]
            detail = f"the URL path {built!r} is not /apps/{{app_id}}/ followed by the intended segments"
            raise UnroutableRequest(f"{req.endpoint} not sent: {detail}",
                                    endpoint=req.endpoint, detail=detail)
        return request

    async def send(self, req: Request) -> Response:
        if self.gate is not None:
            await self.gate()
        if self._wire is not None:
            return await self._send_on_wire(req, self._wire)
        request = self.prepare(req)
        try:
            resp = await self._http.send(request)
        except httpx.HTTPError as exc:
            raise errors.from_exception(exc, req.endpoint) from None
        if 200 <= resp.status_code < 300 or resp.status_code in req.ok_statuses:
            return Response(resp.status_code, errors.parse_body(resp.content))
        raise errors.from_response(resp, req.endpoint, secret=self._key)

    async def _send_on_wire(self, req: Request, wire: AiohttpTransport) -> Response:
        """`send` straight over aiohttp's pool: the same routing checks as `prepare`, the same
        headers and body, the same answers and errors, without httpx's per-request objects."""
        intended = self._intended(req)
        path = self._wire_base + "/" + "/".join(seg(s) for s in intended)
        url = yarl.URL(self._wire_origin + path, encoded=True)
        sent = _split(url.raw_path.encode("ascii", "replace"))
        base = self._wire_base_segments
        if (url.raw_query_string or url.raw_fragment or sent[: len(base)] != base
                or tuple(unquote(s) for s in sent[len(base):]) != intended):
            detail = f"the URL path {url.raw_path[:300]!r} is not /apps/{{app_id}}/ followed by the intended segments"
            raise UnroutableRequest(f"{req.endpoint} not sent: {detail}", endpoint=req.endpoint, detail=detail)
        if req.body is not None:
            content: bytes | None = orjson.dumps(req.body)
            headers = self._wire_json_headers
        else:
            content, headers = None, self._wire_headers
        try:
            status, got, raw = await wire.exchange(req.method, url, content, headers, self._wire_timeout)
        except httpx.HTTPError as exc:
            raise errors.from_exception(exc, req.endpoint) from None
        if 200 <= status < 300 or status in req.ok_statuses:
            return Response(status, errors.parse_body(raw))
        answer = httpx.Response(status, headers=body_headers(got), content=raw)
        raise errors.from_response(answer, req.endpoint, secret=self._key)

    # -- convenience wrappers (used by `check`, the demo and tests) ---------------------

    async def create_user(self, identity: dict[str, str], properties: dict[str, Any] | None = None,
                          subscriptions: list[dict[str, Any]] | None = None) -> Response:
        return await self.send(requests.create_user(identity, properties, subscriptions))

    async def view_user(self, label: str, alias: str) -> Response:
        return await self.send(requests.view_user(label, alias))

    async def update_user(self, label: str, alias: str, properties: dict[str, Any]) -> Response:
        return await self.send(requests.update_user(label, alias, properties))

    async def delete_user(self, label: str, alias: str) -> Response:
        return await self.send(requests.delete_user(label, alias))


def _split(raw_path: bytes) -> list[str]:
    """The path's raw segments (httpx's `raw_path` carries the query string too: cut it off)."""
    return [s for s in raw_path.partition(b"?")[0].decode("ascii", "replace").split("/") if s]


def _segments_of(path: str) -> tuple[str, ...]:
    """The segments of a request made without them (e.g. by hand): `path` read back."""
    if not path.startswith("/"):
        return (path,)
    return tuple(unquote(s) for s in path[1:].split("/"))


class requests:  # noqa: N801 - a namespace of request builders
    """Pure builders for each call of `onesignal-api.md`. They never raise: a segment that
    cannot be routed is refused by `OneSignalClient.prepare` (a dead letter, not a retry)."""

    @staticmethod
    def create_user(identity: dict[str, str], properties: dict[str, Any] | None = None,
                    subscriptions: list[dict[str, Any]] | None = None) -> Request:
        body: dict[str, Any] = {"identity": identity}
        if properties:
            body["properties"] = properties
        if subscriptions:
            body["subscriptions"] = subscriptions
        return _request("POST", ("users",), "POST /users", body)

    @staticmethod
    def view_user(label: str, alias: str) -> Request:
        return _request("GET", ("users", "by", label, alias), "GET /users/by")

    @staticmethod
    def update_user(label: str, alias: str, properties: dict[str, Any]) -> Request:
        return _request("PATCH", ("users", "by", label, alias), "PATCH /users/by", {"properties": properties})

    @staticmethod
    def delete_user(label: str, alias: str) -> Request:
        return _request("DELETE", ("users", "by", label, alias), "DELETE /users/by",
                        ok_statuses=frozenset({404}))

    @staticmethod
    def upsert_aliases(label: str, alias: str, identity: dict[str, str]) -> Request:
        return _request("PATCH", ("users", "by", label, alias, "identity"), "PATCH /identity",
                        {"identity": identity})

    @staticmethod
    def delete_alias(label: str, alias: str, label_to_delete: str) -> Request:
        return _request("DELETE", ("users", "by", label, alias, "identity", label_to_delete),
                        "DELETE /identity", ok_statuses=frozenset({404}))

    @staticmethod
    def create_subscription(label: str, alias: str, subscription: dict[str, Any]) -> Request:
        return _request("POST", ("users", "by", label, alias, "subscriptions"), "POST /subscriptions",
                        {"subscription": subscription})

    @staticmethod
    def update_subscription(subscription_id: str, subscription: dict[str, Any]) -> Request:
        return _request("PATCH", ("subscriptions", subscription_id), "PATCH /subscriptions",
                        {"subscription": subscription})

    @staticmethod
    def legacy_edit_tags(external_user_id: str, tags: dict[str, str], *, missing_ok: bool = False) -> Request:
        """Legacy player model: Edit tags with external user id, `PUT /apps/{app_id}/users/{id}`
        below the legacy base URL (documentation.onesignal.com/reference/edit-tags-with-external-user-id);
        a tag is deleted by `""`. `missing_ok`: a 404 (no player has the id) counts as done."""
        return _request("PUT", ("users", external_user_id), "PUT /apps/users", {"tags": tags},
                        ok_statuses=frozenset({404}) if missing_ok else frozenset())

    @staticmethod
    def delete_subscription(subscription_id: str) -> Request:
        return _request("DELETE", ("subscriptions", subscription_id), "DELETE /subscriptions",
                        ok_statuses=frozenset({404}))

    @staticmethod
    def rename_user(label: str, old: str, new: str) -> Request:
        """Create/update alias on the user's current alias: `label` becomes `new` on the same user
        (same onesignal_id, subscriptions kept). 404 and 409 are answers the caller reads."""
        return _request("PATCH", ("users", "by", label, old, "identity"), "PATCH /identity",
                        {"identity": {label: new}}, ok_statuses=frozenset({404, 409}))

    @staticmethod
    def transfer_subscription(subscription_id: str, identity: dict[str, str]) -> Request:
        return _request("PATCH", ("subscriptions", subscription_id, "owner"), "PATCH /subscriptions/owner",
                        {"identity": identity})
