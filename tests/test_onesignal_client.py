"""OneSignal client: what goes over the wire, and every documented failure as a typed error.

Each request is answered by a handler (an `httpx.Request` in, an `httpx.Response` out), reached
two ways: through an `httpx.MockTransport` (the client's httpx path, which the CLI's one-off
clients take), and over real HTTP on loopback through the client the bridge runs
(`build_http_client`: the direct aiohttp path). Every test runs both ways unless it is marked
`mock_only` (a handler that raises httpx's own exceptions has no wire equivalent; the real
timeouts and refused connections are tested on the wire below).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web

from bridge.onesignal import errors
from bridge.onesignal.client import OneSignalClient, Request, UnroutableRequest, build_http_client, requests

API_KEY = "os_v2_app_s3cr3tk3yDONOTPRINTs3cr3t"
APP_ID = "2d5e1c1a-0000-4000-8000-000000000001"

Handler = Callable[[httpx.Request], httpx.Response]


class WireServer:
    """A real HTTP server on loopback, in its own thread and event loop, that answers every
    request with the current test's handler (the request it saw, as the handler's input)."""

    def __init__(self) -> None:
        self.handler: Handler = lambda r: httpx.Response(500)
        self.loop = asyncio.new_event_loop()
        self.url = ""
        ready = threading.Event()
        threading.Thread(target=self._serve, args=(ready,), daemon=True).start()
        assert ready.wait(10), "the test HTTP server did not start"

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._answer)
        runner = web.AppRunner(app, access_log=None)
        self.loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        port = runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        ready.set()
        self.loop.run_forever()

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        seen = httpx.Request(request.method, self.url + request.raw_path, headers=list(request.headers.items()),
                             content=await request.read())
        resp = self.handler(seen)
        headers = {k: v for k, v in resp.headers.items() if k.lower() not in ("content-length", "content-encoding")}
        return web.Response(status=resp.status_code, body=resp.content, headers=headers)


_SERVER: WireServer | None = None
_MODE = {"over": "mock"}
_OPEN: list[httpx.AsyncClient] = []


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "over" in metafunc.fixturenames:
        modes = ["mock"] if metafunc.definition.get_closest_marker("mock_only") else ["mock", "wire"]
        metafunc.parametrize("over", modes, indirect=True)


@pytest.fixture(autouse=True)
async def over(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """Which way the test's requests go: `mock` (httpx MockTransport) or `wire` (real HTTP)."""
    _MODE["over"] = getattr(request, "param", "mock")
    yield _MODE["over"]
    while _OPEN:
        await _OPEN.pop().aclose()


def client_for(handler: Handler) -> OneSignalClient:
    global _SERVER
    if _MODE["over"] == "wire":
        if _SERVER is None:
            _SERVER = WireServer()
        _SERVER.handler = handler
        http = build_http_client(_SERVER.url, 5.0)
        _OPEN.append(http)
        return OneSignalClient(http, APP_ID, API_KEY)
    http = httpx.AsyncClient(base_url="https://api.onesignal.com", transport=httpx.MockTransport(handler))
    return OneSignalClient(http, APP_ID, API_KEY)


def answer(status: int, body: Any = None, *, content: bytes | None = None,
           headers: dict[str, str] | None = None) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        if content is not None:
            return httpx.Response(status, content=content, headers=headers)
        if body is None:
            return httpx.Response(status, headers=headers)
        return httpx.Response(status, json=body, headers=headers)

    return handler


async def failure(handler: Handler, req: Request | None = None) -> errors.OneSignalError:
    client = client_for(handler)
    with pytest.raises(errors.OneSignalError) as info:
        await client.send(req or requests.create_user({"external_id": "ada"}, {"tags": {"plan": "gold"}}))
    return info.value


def assert_secret_free(exc: BaseException) -> None:
    for text in (str(exc), repr(exc), str(getattr(exc, "detail", "")), repr(getattr(exc, "body", ""))):
        assert API_KEY not in text


# -- requests --------------------------------------------------------------------------------


async def test_requests_carry_the_app_key_in_an_authorization_key_header() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"identity": {"external_id": "ada", "onesignal_id": "x"}})

    resp = await client_for(handler).create_user({"external_id": "ada"}, {"tags": {"plan": "gold"}})

    (request,) = seen
    assert request.headers["authorization"] == f"Key {API_KEY}"
    assert request.headers["content-type"] == "application/json"
    assert request.method == "POST"
    assert request.url.path == f"/apps/{APP_ID}/users"
    assert orjson.loads(request.content) == {"identity": {"external_id": "ada"},
                                            "properties": {"tags": {"plan": "gold"}}}
    assert resp.status == 200 and resp.body["identity"]["onesignal_id"] == "x"


async def test_update_user_patches_the_user_by_alias_with_escaped_path_segments() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(202, json={"properties": {"tags": {"plan": "free"}}})

    resp = await client_for(handler).update_user("external_id", "a+b%é", {"tags": {"plan": "free"}})

    assert seen[0].method == "PATCH"
    assert seen[0].url.raw_path.decode() == f"/apps/{APP_ID}/users/by/external_id/a%2Bb%25%C3%A9"
    assert orjson.loads(seen[0].content) == {"properties": {"tags": {"plan": "free"}}}
    assert resp.status == 202


def recorder() -> tuple[OneSignalClient, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(202, json={})

    return client_for(handler), seen


@pytest.mark.parametrize("alias", [".", "..", "．．", "", "a/b", "a b", "a?b", "a#b", "tab\t", "nul\x00",
                                   "x" * 129, "\ud800"])
@pytest.mark.parametrize("build", [
    pytest.param(lambda a: requests.delete_user("external_id", a), id="delete-user"),
    pytest.param(lambda a: requests.update_user("external_id", a, {"tags": {"t": "1"}}), id="update-user"),
    pytest.param(lambda a: requests.delete_alias("external_id", a, "crm_id"), id="delete-alias"),
    pytest.param(lambda a: requests.delete_alias("external_id", "ada", a), id="delete-alias-label"),
    pytest.param(lambda a: requests.delete_subscription(a), id="delete-subscription"),
])
async def test_request_whose_path_segment_cannot_be_routed_is_never_sent(
        alias: str, build: Callable[[str], Request]) -> None:
    client, seen = recorder()
    with pytest.raises(UnroutableRequest) as info:
        await client.send(build(alias))
    assert seen == []
    exc = info.value
    assert isinstance(exc, errors.Rejected) and not exc.retriable  # the dispatcher dead-letters it
    assert exc.reason == "unroutable_request" and "not sent" in str(exc)


async def test_request_made_by_hand_with_a_dot_segment_in_its_path_is_never_sent() -> None:
    client, seen = recorder()
    with pytest.raises(UnroutableRequest, match="dot segment"):
        await client.send(Request("DELETE", "/users/by/external_id/..", "DELETE /users/by"))
    assert seen == []


@pytest.mark.mock_only
async def test_url_that_httpx_would_build_elsewhere_is_never_sent() -> None:
    # A base URL with a query string: httpx appends the path to the query, so the request
    # would reach "/" whatever the segments are.
    seen: list[httpx.Request] = []
    http = httpx.AsyncClient(base_url="https://api.onesignal.com/?tenant=1",
                             transport=httpx.MockTransport(lambda r: seen.append(r) or httpx.Response(200)))
    client = OneSignalClient(http, APP_ID, API_KEY)
    with pytest.raises(UnroutableRequest, match="not /apps/"):
        await client.delete_user("external_id", "ada")
    assert seen == []


async def test_alias_ids_with_dots_inside_are_routed_exactly() -> None:
    client, seen = recorder()
    for alias in ("...", ".a", "a.", "a..b", "%2e%2e"):
        await client.send(requests.delete_user("external_id", alias))
    assert [r.url.raw_path.decode().split("/")[-1] for r in seen] == ["...", ".a", "a.", "a..b", "%252e%252e"]


async def test_delete_of_a_user_that_is_already_gone_is_a_success() -> None:
    resp = await client_for(answer(404, {"errors": [{"title": "User not found"}]})).delete_user("external_id", "ada")
    assert resp.status == 404


async def test_request_without_body_sends_no_content_type() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"identity": {}})

    await client_for(handler).view_user("external_id", "ada")
    assert "content-type" not in seen[0].headers and seen[0].content == b""


async def test_client_repr_hides_the_key() -> None:
    assert API_KEY not in repr(client_for(answer(200, {})))


# -- error bodies ----------------------------------------------------------------------------


async def test_structured_error_body_becomes_a_rejection_with_onesignals_words() -> None:
    body = {"errors": [{"code": "invalid_value", "title": "Tag value too long", "meta": {"tag": "plan"}}]}
    exc = await failure(answer(400, body))
    assert type(exc) is errors.Rejected and not exc.retriable
    assert exc.status == 400 and exc.endpoint == "POST /users"
    assert "Tag value too long" in str(exc) and "invalid_value" in exc.detail
    assert exc.body == body


async def test_basic_error_body_is_read() -> None:
    exc = await failure(answer(400, {"errors": ["Invalid language code"], "success": False}))
    assert type(exc) is errors.Rejected
    assert exc.detail == "Invalid language code"


async def test_plain_text_errors_field_is_read() -> None:
    exc = await failure(answer(400, {"errors": "app_id not found"}))
    assert type(exc) is errors.Rejected and "app_id not found" in str(exc)


async def test_object_shaped_errors_field_is_read() -> None:
    exc = await failure(answer(400, {"errors": {"invalid_aliases": {"external_id": ["ghost"]}}}))
    assert type(exc) is errors.Rejected
    assert exc.detail == 'invalid_aliases: {"external_id":["ghost"]}'


async def test_empty_503_is_a_retriable_server_error() -> None:
    exc = await failure(answer(503, content=b""))
    assert type(exc) is errors.ServerError and exc.retriable
    assert exc.status == 503 and exc.reason == "http_503"


async def test_html_502_is_a_retriable_server_error_with_a_short_message() -> None:
    html = b"<html><head><title>502 Bad Gateway</title></head><body>" + b"x" * 5000 + b"</body></html>"
    exc = await failure(answer(502, content=html, headers={"content-type": "text/html"}))
    assert type(exc) is errors.ServerError and exc.retriable
    assert "502" in str(exc)
    assert len(str(exc)) < 400


@pytest.mark.parametrize(
    "body",
    [
        {"errors": ["API rate limit exceeded"]},
        {"errors": [{"code": "Rate Limit Exceeded", "title": "Too many requests"}]},
        {"errors": ["API rate limit exceeded"], "limit": "per-user"},
    ],
)
async def test_429_is_rate_limited_with_the_servers_retry_after(body: dict[str, Any]) -> None:
    exc = await failure(answer(429, body, headers={"Retry-After": "7"}))
    assert isinstance(exc, errors.RateLimited) and exc.retriable
    assert exc.retry_after == 7


@pytest.mark.parametrize("header", [None, "0", "-3", "soon", "0.2"])
async def test_429_waits_at_least_a_second_whatever_the_header_says(header: str | None) -> None:
    headers = {"Retry-After": header} if header is not None else None
    exc = await failure(answer(429, {"errors": ["API rate limit exceeded"]}, headers=headers))
    assert isinstance(exc, errors.RateLimited)
    assert exc.retry_after >= 1


@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_5xx_is_a_retriable_server_error(status: int) -> None:
    exc = await failure(answer(status, {"errors": ["Internal error"], "success": False}))
    assert type(exc) is errors.ServerError and exc.retriable


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (401, {"errors": [{"code": "access_denied", "title": "Invalid API key"}]}),
        (403, {"errors": ["Access denied.  Please include an 'Authorization: ...' header with a valid API key"]}),
        (403, None),
    ],
)
async def test_401_and_403_are_fatal_auth_errors_pointing_at_the_config(status: int, body: Any) -> None:
    exc = await failure(answer(status, body))
    assert type(exc) is errors.AuthError and not exc.retriable
    assert "onesignal.api_key" in str(exc)


async def test_404_is_not_found() -> None:
    exc = await failure(answer(404, {"errors": [{"title": "User not found"}]}),
                        requests.update_user("external_id", "ghost", {"tags": {"a": "1"}}))
    assert type(exc) is errors.NotFound and not exc.retriable


async def test_409_is_a_conflict_naming_the_conflicting_aliases() -> None:
    body = {"errors": [{"code": "user-2", "title": "Aliases claimed by another user",
                        "meta": {"conflicting_aliases": {"crm_id": "c-1"}}}]}
    exc = await failure(answer(409, body))
    assert isinstance(exc, errors.Conflict) and not exc.retriable
    assert exc.conflicting_aliases == {"crm_id": "c-1"}


async def test_409_without_alias_details_has_no_conflicting_aliases() -> None:
    exc = await failure(answer(409, {"errors": ["Subscription limit reached"]}))
    assert isinstance(exc, errors.Conflict)
    assert exc.conflicting_aliases == {}


@pytest.mark.parametrize("status", [400, 422])
async def test_other_4xx_are_rejections_that_are_not_retried(status: int) -> None:
    exc = await failure(answer(status, {"errors": ["bad"]}))
    assert type(exc) is errors.Rejected and not exc.retriable


# -- transport failures ----------------------------------------------------------------------


@pytest.mark.mock_only
@pytest.mark.parametrize(
    ("raised", "reason"),
    [
        (httpx.ReadTimeout("timed out"), "timeout"),
        (httpx.ConnectTimeout("timed out"), "timeout"),
        (httpx.ConnectError("[Errno 111] Connection refused"), "connection"),
        (httpx.RemoteProtocolError("Server disconnected without sending a response."), "connection"),
    ],
)
async def test_timeouts_and_connection_failures_are_retriable_transport_errors(
    raised: httpx.HTTPError, reason: str
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise raised

    exc = await failure(handler)
    assert type(exc) is errors.TransportError and exc.retriable
    assert exc.reason == reason
    assert exc.endpoint == "POST /users"
    assert exc.__cause__ is None  # httpx's exception (with the request and its headers) is not chained


# -- the key never leaks ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "handler",
    [
        pytest.param(answer(401, {"errors": [f"Invalid key {API_KEY}"]}), id="401-echoing-the-key"),
        pytest.param(answer(403, content=f"Authorization: Key {API_KEY} rejected".encode()), id="403-text"),
        pytest.param(answer(400, {"errors": [{"code": "x", "title": f"bad header Key {API_KEY}"}]}), id="400"),
        pytest.param(answer(502, content=f"<html>{API_KEY}</html>".encode()), id="502-html"),
        pytest.param(answer(429, {"errors": {"detail": API_KEY}}), id="429-object"),
    ],
)
async def test_api_key_never_appears_in_an_error_even_when_the_server_echoes_it(handler: Handler) -> None:
    exc = await failure(handler)
    assert_secret_free(exc)


@pytest.mark.mock_only
async def test_api_key_never_appears_in_a_transport_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(f"failed sending {request.headers['authorization']}")

    exc = await failure(handler)
    assert_secret_free(exc)


# -- the bridge's own client, over real HTTP -------------------------------------------------


@contextlib.asynccontextmanager
async def serving(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> AsyncIterator[str]:
    """An HTTP server on loopback in this event loop, answering every path with `handler`."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@pytest.mark.mock_only
async def test_a_refused_connection_is_a_retriable_transport_error_without_the_key() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    http = build_http_client(f"http://127.0.0.1:{port}", 2.0)
    try:
        with pytest.raises(errors.TransportError) as info:
            await OneSignalClient(http, APP_ID, API_KEY).view_user("external_id", "ada")
    finally:
        await http.aclose()
    exc = info.value
    assert exc.retriable and exc.reason == "connection" and exc.endpoint == "GET /users/by"
    assert exc.__cause__ is None
    assert_secret_free(exc)


@pytest.mark.mock_only
async def test_an_answer_later_than_the_request_timeout_is_a_retriable_timeout() -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response(status=200)

    async with serving(slow) as url:
        http = build_http_client(url, 0.3)
        try:
            with pytest.raises(errors.TransportError) as info:
                await OneSignalClient(http, APP_ID, API_KEY).create_user({"external_id": "ada"})
        finally:
            await http.aclose()
    assert info.value.retriable and info.value.reason == "timeout"
    assert_secret_free(info.value)


@pytest.mark.mock_only
async def test_a_base_url_below_a_path_prefix_keeps_the_prefix_on_the_wire() -> None:
    seen: list[str] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(request.raw_path)
        return web.json_response({}, status=202)

    async with serving(record) as url:
        http = build_http_client(url + "/onesignal/v1", 5.0)
        try:
            await OneSignalClient(http, APP_ID, API_KEY).update_user("external_id", "a+b%é", {"tags": {"x": "1"}})
        finally:
            await http.aclose()
    assert seen == [f"/onesignal/v1/apps/{APP_ID}/users/by/external_id/a%2Bb%25%C3%A9"]


@pytest.mark.mock_only
@pytest.mark.parametrize("through", ["direct", "httpx"])
@pytest.mark.parametrize(("status", "body", "expected"), [
    (429, {"errors": ["API rate limit exceeded."]}, errors.RateLimited),
    (400, {"errors": ["Tag value too long"]}, errors.Rejected),
    (403, {"errors": ["Access denied."]}, errors.AuthError),
])
async def test_a_compressed_error_answer_is_read_as_the_error_it_is(
        through: str, status: int, body: Any, expected: type[errors.OneSignalError]) -> None:
    """aiohttp asks for gzip and decompresses; the answer's encoding header must not make the
    body be decoded twice (a CDN in front of OneSignal compresses JSON when asked)."""
    import gzip

    from bridge.onesignal.transport import AiohttpTransport

    async def compressed(request: web.Request) -> web.Response:
        return web.Response(status=status, body=gzip.compress(orjson.dumps(body)),
                            headers={"Content-Encoding": "gzip", "Content-Type": "application/json",
                                     "Retry-After": "7"})

    async with serving(compressed) as url:
        http = (build_http_client(url, 5.0) if through == "direct"
                else httpx.AsyncClient(base_url=url, transport=AiohttpTransport()))
        try:
            with pytest.raises(errors.OneSignalError) as info:
                await OneSignalClient(http, APP_ID, API_KEY).create_user({"external_id": "ada"})
        finally:
            await http.aclose()
    assert type(info.value) is expected, repr(info.value)
    assert body["errors"][0].rstrip(".") in str(info.value)
    if status == 429:
        assert isinstance(info.value, errors.RateLimited) and info.value.retry_after == 7.0


@pytest.mark.mock_only
async def test_a_closed_client_sends_nothing() -> None:
    seen: list[str] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(request.raw_path)
        return web.json_response({}, status=202)

    async with serving(record) as url:
        http = build_http_client(url, 5.0)
        client = OneSignalClient(http, APP_ID, API_KEY)
        await client.update_user("external_id", "ada", {"tags": {"x": "1"}})
        await http.aclose()
        with pytest.raises(RuntimeError, match="closed"):
            await client.update_user("external_id", "ada", {"tags": {"x": "2"}})
    assert len(seen) == 1
