"""An httpx transport that sends requests over aiohttp's connection pool.

httpx stays the client interface (request building, `MockTransport` in tests); the wire goes
through aiohttp, whose pool stays fast at the concurrency the dispatcher runs (measured on the
2-core reference machine against the simulator, 64 requests in flight: httpcore's pool ≈60
requests/s, aiohttp ≈780/s; see docs/BENCHMARKS.md). HTTP/1.1 with keep-alive.
"""

from __future__ import annotations

import aiohttp
import httpx
import yarl


class AiohttpTransport(httpx.AsyncBaseTransport):
    def __init__(self, max_connections: int = 100, connect_timeout: float = 5.0) -> None:
        self._limit = max_connections
        self._connect_timeout = connect_timeout
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._limit, ttl_dns_cache=300),
                auto_decompress=True,
                skip_auto_headers=("User-Agent",),
            )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout", {})
        total = timeouts.get("read") or 30.0
        timeout = aiohttp.ClientTimeout(total=total, sock_connect=timeouts.get("connect") or self._connect_timeout)
        body = request.content if request.content else None
        try:
            async with self._get_session().request(
                # encoded=True: send the path exactly as httpx built it (yarl would otherwise
                # decode %2E and remove the dot segments it makes, re-routing the request).
                request.method, yarl.URL(str(request.url), encoded=True), data=body,
                headers=[(k, v) for k, v in request.headers.multi_items() if k.lower() != "host"],
                timeout=timeout, allow_redirects=False,
            ) as resp:
                content = await resp.read()
                return httpx.Response(resp.status, headers=list(resp.headers.items()), content=content,
                                      request=request)
        except TimeoutError:
            raise httpx.ReadTimeout("OneSignal did not answer in time", request=request) from None
        except aiohttp.ClientConnectorError as exc:
            raise httpx.ConnectError(str(exc.os_error or exc), request=request) from None
        except aiohttp.ClientError as exc:
            raise httpx.ReadError(type(exc).__name__, request=request) from None

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
