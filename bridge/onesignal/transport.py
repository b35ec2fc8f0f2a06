"""The bridge's HTTP wire: aiohttp's connection pool, spoken to directly or as an httpx transport.

The OneSignal client sends through `AiohttpTransport.exchange` (a method, a finished URL, bytes,
headers): no per-request httpx request or response objects, which cost about three times what
aiohttp itself does (`bench/client_cost.py` against the simulator, 5 runs: median 350 µs of CPU
per request through httpx on aiohttp, 132 µs direct, 111 µs bare aiohttp; docs/BENCHMARKS.md).
The same transport also serves as an `httpx.AsyncBaseTransport`, so an `httpx.AsyncClient`
goes over the same pool. aiohttp's pool stays fast at the concurrency the dispatcher runs
(64 requests in flight: httpcore's pool ≈60 requests/s, aiohttp's ≈780/s).
HTTP/1.1 with keep-alive.

Failures are raised as httpx's exception types (`ReadTimeout`, `ConnectError`, `ReadError`)
on both paths, so one mapping (`errors.from_exception`) turns them into the bridge's errors.
"""

from __future__ import annotations

from collections.abc import Mapping

import aiohttp
import httpx
import yarl
from aiohttp.typedefs import LooseHeaders

# aiohttp has already decompressed the body it returns: these headers describe the bytes on the
# wire, not the body handed on, and an httpx.Response built with them would decode it again.
_WIRE_ONLY = frozenset(("content-encoding", "content-length", "transfer-encoding"))


def body_headers(headers: Mapping[str, str]) -> list[tuple[str, str]]:
    """The answer's headers that still describe the (decompressed) body `exchange` returns."""
    return [(k, v) for k, v in headers.items() if k.lower() not in _WIRE_ONLY]


class AiohttpTransport(httpx.AsyncBaseTransport):
    def __init__(self, max_connections: int = 100, connect_timeout: float = 5.0) -> None:
        self._limit = max_connections
        self._connect_timeout = connect_timeout
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    def _get_session(self) -> aiohttp.ClientSession:
        if self._closed:  # as httpx refuses a closed client: nothing leaves after shutdown
            raise RuntimeError("Cannot send a request, as the client has been closed.")
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._limit, ttl_dns_cache=300),
                auto_decompress=True,
                skip_auto_headers=("User-Agent",),
            )
        return self._session

    def timeout(self, total: float) -> aiohttp.ClientTimeout:
        """A whole-request deadline of `total` seconds, connecting within the connect timeout."""
        return aiohttp.ClientTimeout(total=total, sock_connect=min(total, self._connect_timeout))

    async def exchange(self, method: str, url: yarl.URL, body: bytes | None,
                       headers: LooseHeaders, timeout: aiohttp.ClientTimeout,
                       ) -> tuple[int, Mapping[str, str], bytes]:
        """Send one request and read its whole answer: (status, headers, body).

        `url` is sent exactly as it is (build it with `encoded=True`: yarl would otherwise
        decode %2E and remove the dot segments that makes, re-routing the request). Redirects
        are not followed. Raises httpx.ReadTimeout, httpx.ConnectError or httpx.ReadError."""
        try:
            async with self._get_session().request(method, url, data=body, headers=headers,
                                                   timeout=timeout, allow_redirects=False) as resp:
                return resp.status, resp.headers, await resp.read()
        except TimeoutError:
            raise httpx.ReadTimeout("OneSignal did not answer in time") from None
        except aiohttp.ClientConnectorError as exc:
            raise httpx.ConnectError(str(exc.os_error or exc)) from None
        except aiohttp.ClientError as exc:
            raise httpx.ReadError(type(exc).__name__) from None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout", {})
        timeout = aiohttp.ClientTimeout(total=timeouts.get("read") or 30.0,
                                        sock_connect=timeouts.get("connect") or self._connect_timeout)
        headers = [(k, v) for k, v in request.headers.multi_items() if k.lower() != "host"]
        try:
            status, got, content = await self.exchange(
                request.method, yarl.URL(str(request.url), encoded=True), request.content or None,
                headers, timeout)
        except httpx.TransportError as exc:
            exc.request = request
            raise
        return httpx.Response(status, headers=body_headers(got), content=content, request=request)

    async def aclose(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()
