"""The bridge's own HTTP endpoints: `/metrics`, `/healthz` (alive, loop turning), `/readyz`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from bridge.observability.metrics import REGISTRY

LOOP_STALL_S = 10.0


class HealthServer:
    def __init__(self, host: str, port: int, ready: Callable[[], tuple[bool, str]]) -> None:
        self.host, self.port = host, port
        self._ready = ready
        self._beat = time.monotonic()
        self._runner: web.AppRunner | None = None
        self._beat_task: asyncio.Task[None] | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        return app

    async def _metrics(self, _: web.Request) -> web.Response:
        body = generate_latest(REGISTRY)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, _: web.Request) -> web.Response:
        age = time.monotonic() - self._beat
        if age > LOOP_STALL_S:
            return web.json_response({"status": "stalled", "loop_stall_s": round(age, 1)}, status=503)
        return web.json_response({"status": "ok"})

    async def _readyz(self, _: web.Request) -> web.Response:
        ok, why = self._ready()
        return web.json_response({"ready": ok, "reason": why}, status=200 if ok else 503)

    async def _heartbeat(self) -> None:
        while True:
            self._beat = time.monotonic()
            await asyncio.sleep(1.0)

    async def start(self) -> int:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self._beat_task = asyncio.create_task(self._heartbeat())
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        return sockets[0].getsockname()[1] if sockets else self.port

    async def stop(self) -> None:
        if self._beat_task:
            self._beat_task.cancel()
        if self._runner:
            await self._runner.cleanup()
