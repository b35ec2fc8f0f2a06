"""A local OneSignal REST API (user model) for development, staging and the tests.

It answers the endpoints of `onesignal-api.md` from in-memory state (`simstate.py`), enforces
the documented rate limits (429 + `Retry-After`, `simlimits.py`), and injects faults (5xx,
latency, requests held open, `simfaults.py`) so the bridge's retry and dead-letter paths can be
exercised for real.

Order in which a request to `/apps/...` is handled, so that a failed request changes nothing:
faults -> auth -> app id -> rate limit -> validation -> state change. Everything under
`/_simulator/` is a control endpoint: no auth, no limits, no faults, not logged in the stats.

Strict by default (issue 14; docs/onesignal-semantics.md names the source of each point): Create
user on an existing user ignores `properties`; a user answers 404 by alias for
`--replication-lag-ms` after its creation; `--max-tags` per user (400 with OneSignal's body); a
wrong key is 403 and `Basic` is refused; a wrong `--app-id` is 403 like a mismatched key; 429
carries `{"errors":["API rate limit exceeded."]}` and every second one has no `Retry-After`; View
endpoints 1 request/s per app; a 21st subscription evicts the oldest to a new anonymous user;
`notification_types` is a field of its own; a re-sent subscription keeps its state. `--lenient`
restores the kinder behaviour of earlier versions (`simsettings.py`); each point is also a flag of
its own, and `POST /_simulator/config` changes them at run time (`POST /_simulator/reset` restores the
start-up settings).

Run it: `python -m bridge.devtools.simulator --port 8089 [--api-key KEY] [--lenient]`.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import http
import logging
import signal
import sys
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import orjson
from aiohttp import web

from bridge.devtools.simfaults import Faults, parse_faults
from bridge.devtools.simflags import add_arguments
from bridge.devtools.simlimits import RateLimited, ViewLimiter, WriteLimiter
from bridge.devtools.simsettings import STRICT, Settings, parse_settings, settings_from_args
from bridge.devtools.simstate import SimState
from bridge.devtools.simvalidation import SimError

log = logging.getLogger("bridge.devtools.simulator")

REQUEST_LOG_SIZE = 100_000
# The text OneSignal's edge answers for a missing or wrong key (the SDK's error catalog).
ACCESS_DENIED = ("Access denied.  Please include an 'Authorization: ...' header with a valid API key "
                 "(https://documentation.onesignal.com/docs/en/keys-and-ids#api-keys).")
# 429 bodies: OneSignal's (rate-limits page; the SDK's RateLimitError wants strings) and the
# structured one earlier versions of the simulator answered (--rate-limit-body structured).
RATE_LIMIT_BODY = {"errors": ["API rate limit exceeded."]}
STRUCTURED_RATE_LIMIT_BODY = {"errors": [{"code": "Rate Limit Exceeded", "title": "API rate limit exceeded"}]}
_BAD_GATEWAY_HTML = (b"<html><head><title>502 Bad Gateway</title></head>"
                     b"<body><center><h1>502 Bad Gateway</h1></center></body></html>")
_USERS = "/apps/{app_id}/users"
# `[^/]+`: aiohttp's default `[^{}/]+` would not route an alias id holding `{` or `}`, which OneSignal does.
_BY_ALIAS = _USERS + "/by/{alias_label:[^/]+}/{alias_id:[^/]+}"
_SUBSCRIPTION = "/apps/{app_id}/subscriptions/{subscription_id}"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, headers=headers,
                        content_type="application/json")


def _error(status: int, code: str, title: str) -> web.Response:
    return _json({"errors": [{"code": code, "title": title}]}, status)


def _http_error(exc: web.HTTPException) -> web.Response:
    """aiohttp's own refusals (unknown path, wrong method, body too large) in the structured shape."""
    return _error(exc.status, "not-found" if exc.status == 404 else "invalid-request", exc.reason)


def _rate_limited(wait_s: float, body: dict[str, Any] = RATE_LIMIT_BODY, header: bool = True) -> web.Response:
    """429 with Retry-After in whole seconds, rounded up (waiting that long always succeeds), or
    without the header at all."""
    retry_after = max(1, int(-(-wait_s // 1)))
    return _json(body, 429, {"Retry-After": str(retry_after)} if header else None)


def _fault_response(status: int) -> web.Response:
    """Deterministic bodies per status so clients' defensive parsing gets exercised:
    502 an HTML page, 504 an empty body, others the basic shape (429: see Simulator._inject)."""
    if status == 502:
        return web.Response(body=_BAD_GATEWAY_HTML, status=502, content_type="text/html")
    if status == 504:
        return web.Response(status=504)
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    return _json({"errors": [phrase], "success": False}, status)


# ---------------------------------------------------------------------------------------------
# The simulator


class Simulator:
    """Everything the handlers share: the state, limiters, faults, stats and request log."""

    def __init__(self, *, api_key: str | None, app_id: str | None, app_rate_per_s: int,
                 user_interval_s: float, settings: Settings = STRICT) -> None:
        self._api_key = api_key
        self.app_id = app_id
        self._limits = (app_rate_per_s, user_interval_s)
        self.startup_settings = settings
        self.settings = settings
        self.faults: Faults | None = None
        self.stopping = asyncio.Event()
        self.in_progress = 0  # /apps/ requests received and not yet answered (kept across resets)
        self.reset()

    @property
    def requires_key(self) -> bool:
        return self._api_key is not None

    def reset(self) -> None:
        """Forget users, limiter windows, stats and the request log, and go back to the start-up
        settings (faults stay)."""
        app_rate, user_interval = self._limits
        self.settings = self.startup_settings
        self.state = SimState(rules=self.settings.rules())
        self.writes = WriteLimiter(app_rate, user_interval)
        self.views = ViewLimiter(self.settings.view_rate_per_s)
        self.rate_limit_answers = 0
        self.total_requests = 0
        self.rate_limited = 0
        self.by_endpoint: Counter[str] = Counter()
        self.by_status: Counter[str] = Counter()
        self.requests: deque[dict[str, Any]] = deque(maxlen=REQUEST_LOG_SIZE)

    def configure(self, settings: Settings) -> None:
        """Change the settings at run time; users, limiter windows and stats stay."""
        if settings.view_rate_per_s != self.settings.view_rate_per_s:
            self.views = ViewLimiter(settings.view_rate_per_s)
        self.settings = settings
        self.state.rules = settings.rules()

    def rate_limit_response(self, wait_s: float) -> web.Response:
        """A 429 as the settings say: OneSignal's body or the structured one; every Nth without
        Retry-After (OneSignal's SDK then waits 60 s; clients must not assume the header)."""
        self.rate_limit_answers += 1
        every = self.settings.omit_retry_after_every
        header = not (every and self.rate_limit_answers % every == 0)
        body = RATE_LIMIT_BODY if self.settings.rate_limit_body == "real" else STRUCTURED_RATE_LIMIT_BODY
        return _rate_limited(wait_s, body, header)

    # -- the pipeline every /apps/ request goes through ----------------------------------------

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith(("/apps/", "/api/v1/apps/")):  # /api/v1/: legacy (simlegacy.py)
            return await handler(request)
        status, subject = 500, None
        self.in_progress += 1
        try:
            try:
                # The whole request is read first, as a server that accepted it has it: a request
                # held by a fault is then applied even if its client has gone away meanwhile
                # (OneSignal does not undo what it received because the caller stopped listening).
                await request.read()
                subject = await self._subject(request)
            except web.HTTPException as exc:  # body over client_max_size: refused up front
                response: web.StreamResponse = _http_error(exc)
            else:
                response = await self._pipeline(request, handler)
            status = response.status
            return response
        finally:
            self.in_progress -= 1
            self._record(request, status, subject)

    async def _pipeline(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        faults = self.faults
        if faults is not None and faults.applies_to(request.path):
            injected = await self._inject(request, faults)
            if injected is not None:
                return injected
        if not self._authorized(request):
            if self.settings.wrong_key_status == 403:
                return _json({"errors": [ACCESS_DENIED]}, 403)
            return _error(401, "access-denied", ACCESS_DENIED)
        app_id = request.match_info.get("app_id")
        if self.app_id is not None and app_id is not None and app_id != self.app_id:
            if self.settings.wrong_key_status == 403:  # an app key for another app: "mismatched key"
                return _json({"errors": [ACCESS_DENIED]}, 403)
            return _error(403, "access-denied", "the API key is not valid for this app id")
        try:
            return await handler(request)
        except SimError as exc:
            return _json(exc.body(), exc.status)
        except RateLimited as exc:
            return self.rate_limit_response(exc.wait_s)
        except web.HTTPException as exc:  # unknown path or method under /apps/
            return _http_error(exc)

    async def _inject(self, request: web.Request, faults: Faults) -> web.StreamResponse | None:
        if faults.latency_ms or faults.latency_jitter_ms:
            await asyncio.sleep((faults.latency_ms + faults.rng.uniform(0.0, faults.latency_jitter_ms)) / 1000)
        if faults.timeout_rate and faults.rng.random() < faults.timeout_rate:
            await self._hold(request, faults.hold_s)
            return web.Response(status=504)
        if faults.error_rate and faults.rng.random() < faults.error_rate:
            if faults.status == 429:
                return self.rate_limit_response(1.0)
            if faults.status in (401, 403):  # a key refused, as OneSignal's edge answers it
                return _json({"errors": [ACCESS_DENIED]}, faults.status)
            return _fault_response(faults.status)
        return None

    async def _hold(self, request: web.Request, seconds: float) -> None:
        """Keep the request open without applying it, until `seconds` pass, the client goes
        away, or the server shuts down (so shutdown never waits on a simulated timeout)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while not self.stopping.is_set():
            transport = request.transport
            remaining = deadline - loop.time()
            if remaining <= 0 or transport is None or transport.is_closing():
                return
            try:
                await asyncio.wait_for(self.stopping.wait(), timeout=min(0.1, remaining))
            except TimeoutError:
                pass

    def _authorized(self, request: web.Request) -> bool:
        """Accept `Key <key>` (and `Basic <key>` when basic_auth is accept: the legacy scheme, not
        the User Model's); compare in constant time; never log the key."""
        if self._api_key is None:
            return True
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if request.path.startswith("/api/v1/"):  # the legacy player model's calls: `Basic` only
            if scheme.lower() != "basic":
                return False
        elif scheme.lower() not in (("key", "basic") if self.settings.basic_auth == "accept" else ("key",)):
            return False
        return hmac.compare_digest(token.strip().encode(), self._api_key.encode())

    async def _subject(self, request: web.Request) -> str | None:
        """The user a request is about, for the log: the path's alias id, or for Create user the
        body's external_id (else first alias). Read up front so faulted requests name it too."""
        if "alias_id" in request.match_info:
            return request.match_info["alias_id"]
        route = request.match_info.route.resource
        if request.method == "POST" and route is not None and route.canonical == _USERS:
            return self.state.create_subject(await _read_json(request))
        return None

    def _record(self, request: web.Request, status: int, user: str | None) -> None:
        route = request.match_info.route.resource
        endpoint = f"{request.method} {route.canonical}" if route is not None else "UNMATCHED"
        self.total_requests += 1
        self.by_endpoint[endpoint] += 1
        self.by_status[str(status)] += 1
        if status == 429:
            self.rate_limited += 1
        self.requests.append({"time": time.time(), "method": request.method, "path": request.path,
                              "endpoint": endpoint, "status": status, "user": user})

    # -- limiter helpers ----------------------------------------------------------------------

    def _admit_write(self, keys: list[str]) -> None:
        wait = self.writes.admit(keys, time.monotonic())
        if wait is not None:
            raise RateLimited(wait)

    def _admit_view(self) -> None:
        wait = self.views.admit(time.monotonic())
        if wait is not None:
            raise RateLimited(wait)

    def _alias_write(self, request: web.Request) -> tuple[str, str]:
        label, alias_id = request.match_info["alias_label"], request.match_info["alias_id"]
        self._admit_write(self.state.alias_keys(label, alias_id))
        return label, alias_id

    def _subscription_write(self, request: web.Request) -> str:
        sub_id = request.match_info["subscription_id"]
        self._admit_write([f"sub:{sub_id}"])
        return sub_id

    def _view_alias(self, request: web.Request) -> tuple[str, str]:
        self._admit_view()
        return request.match_info["alias_label"], request.match_info["alias_id"]

    # -- API handlers -------------------------------------------------------------------------

    async def create_user(self, request: web.Request) -> web.Response:
        body = await _read_json(request)
        self._admit_write(self.state.create_keys(body))
        status, view = self.state.create_user(_parsed(body))
        self.writes.touch([f"user:{view['identity']['onesignal_id']}"], time.monotonic())
        return _json(view, status)

    async def view_user(self, request: web.Request) -> web.Response:
        return _json(self.state.view(self.state.require(*self._view_alias(request))))

    async def update_user(self, request: web.Request) -> web.Response:
        body = await _read_json(request)
        return _json(self.state.update_user(*self._alias_write(request), _parsed(body)), 202)

    async def delete_user(self, request: web.Request) -> web.Response:
        return _json(self.state.delete_user(*self._alias_write(request)), 202)

    async def get_identity(self, request: web.Request) -> web.Response:
        return _json(self.state.get_identity(*self._view_alias(request)))

    async def upsert_identity(self, request: web.Request) -> web.Response:
        body = await _read_json(request)
        return _json(self.state.upsert_identity(*self._alias_write(request), _parsed(body)))

    async def delete_alias(self, request: web.Request) -> web.Response:
        label, alias_id = self._alias_write(request)
        return _json(self.state.delete_alias(label, alias_id, request.match_info["label_to_delete"]))

    async def create_subscription(self, request: web.Request) -> web.Response:
        body = await _read_json(request)
        status, result = self.state.create_subscription(*self._alias_write(request), _parsed(body))
        return _json(result, status)

    async def update_subscription(self, request: web.Request) -> web.Response:
        body = await _read_json(request)
        return _json(self.state.update_subscription(self._subscription_write(request), _parsed(body)))

    async def delete_subscription(self, request: web.Request) -> web.Response:
        return _json(self.state.delete_subscription(self._subscription_write(request)), 202)

    async def subscription_identity(self, request: web.Request) -> web.Response:
        self._admit_view()
        return _json(self.state.subscription_owner_identity(request.match_info["subscription_id"]))

    async def transfer_subscription(self, request: web.Request) -> web.Response:
        body = await _read_json(request)
        return _json(self.state.transfer_subscription(self._subscription_write(request), _parsed(body)))

    # -- control handlers ---------------------------------------------------------------------

    async def control_users(self, request: web.Request) -> web.Response:
        return _json({"users": self.state.view_all()})

    async def control_stats(self, request: web.Request) -> web.Response:
        return _json({"total_requests": self.total_requests, "in_progress": self.in_progress,
                      "by_endpoint": dict(self.by_endpoint),
                      "by_status": dict(self.by_status), "rate_limited": self.rate_limited,
                      "rate_limited_by": dict(self.writes.refused)})

    async def control_requests(self, request: web.Request) -> web.Response:
        return _json({"requests": list(self.requests)})

    async def control_get_faults(self, request: web.Request) -> web.Response:
        return _json({"faults": self.faults.public() if self.faults else None})

    async def control_set_faults(self, request: web.Request) -> web.Response:
        try:
            self.faults = parse_faults(_parsed(await _read_json(request)))
        except SimError as exc:
            return _json(exc.body(), exc.status)
        return _json({"faults": self.faults.public()})

    async def control_clear_faults(self, request: web.Request) -> web.Response:
        self.faults = None
        return _json({"faults": None})

    async def control_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return _json({"reset": True})

    async def control_get_config(self, request: web.Request) -> web.Response:
        return _json({"config": self.settings.public(), "startup": self.startup_settings.public()})

    async def control_set_config(self, request: web.Request) -> web.Response:
        try:
            self.configure(parse_settings(_parsed(await _read_json(request)), self.settings))
        except SimError as exc:
            return _json(exc.body(), exc.status)
        return _json({"config": self.settings.public()})


class _InvalidJson:
    """Marker for a body that is not JSON: refused only after the rate limiter saw the request."""


_INVALID_JSON = _InvalidJson()


async def _read_json(request: web.Request) -> Any:
    raw = await request.read()
    if not raw.strip():
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _INVALID_JSON


def _parsed(body: Any) -> Any:
    if body is _INVALID_JSON:
        raise SimError.one(400, "invalid-json", "the request body is not valid JSON")
    return body


# ---------------------------------------------------------------------------------------------
# Wiring

SIMULATOR_KEY = web.AppKey("onesignal_simulator", Simulator)


def build_app(*, api_key: str | None = None, app_id: str | None = None, app_rate_per_s: int = 1000,
              user_interval_s: float = 1.0, view_rate_per_s: float | None = None,
              settings: Settings = STRICT, **overrides: Any) -> web.Application:
    """The simulator as an aiohttp application (api_key/app_id None: accept any). `settings`
    (strict by default), then `view_rate_per_s` and any other `Settings` field given by name."""
    if view_rate_per_s is not None:
        overrides["view_rate_per_s"] = view_rate_per_s
    settings = replace(settings, **overrides)
    sim = Simulator(api_key=api_key, app_id=app_id, app_rate_per_s=app_rate_per_s,
                    user_interval_s=user_interval_s, settings=settings)
    app = web.Application(middlewares=[sim.middleware], client_max_size=4 * 1024 * 1024)
    app[SIMULATOR_KEY] = sim

    async def on_shutdown(_: web.Application) -> None:
        sim.stopping.set()

    app.on_shutdown.append(on_shutdown)
    app.router.add_routes([
        web.post(_USERS, sim.create_user),
        web.get(_BY_ALIAS, sim.view_user, allow_head=False),
        web.patch(_BY_ALIAS, sim.update_user),
        web.delete(_BY_ALIAS, sim.delete_user),
        web.get(_BY_ALIAS + "/identity", sim.get_identity, allow_head=False),
        web.patch(_BY_ALIAS + "/identity", sim.upsert_identity),
        web.delete(_BY_ALIAS + "/identity/{label_to_delete:[^/]+}", sim.delete_alias),
        web.post(_BY_ALIAS + "/subscriptions", sim.create_subscription),
        web.patch(_SUBSCRIPTION, sim.update_subscription),
        web.delete(_SUBSCRIPTION, sim.delete_subscription),
        web.patch(_SUBSCRIPTION + "/owner", sim.transfer_subscription),
        web.get(_SUBSCRIPTION + "/user/identity", sim.subscription_identity, allow_head=False),
        web.get("/_simulator/users", sim.control_users, allow_head=False),
        web.get("/_simulator/stats", sim.control_stats, allow_head=False),
        web.get("/_simulator/requests", sim.control_requests, allow_head=False),
        web.get("/_simulator/faults", sim.control_get_faults, allow_head=False),
        web.post("/_simulator/faults", sim.control_set_faults),
        web.delete("/_simulator/faults", sim.control_clear_faults),
        web.post("/_simulator/reset", sim.control_reset),
        web.get("/_simulator/config", sim.control_get_config, allow_head=False),
        web.post("/_simulator/config", sim.control_set_config),
    ])
    from bridge.devtools import simexport

    simexport.register(app, sim)  # POST /players/csv_export and the file's download (simexport.py)
    from bridge.devtools import simmessages

    simmessages.register(app, sim)  # Create message and Create custom events (simmessages.py)
    from bridge.devtools import simlegacy

    simlegacy.register(app, sim)  # the legacy player model: /api/v1/players, Edit tags (simlegacy.py)
    return app


async def _serve_app(app: web.Application, host: str, port: int) -> None:
    """Serve `app` until cancelled; logs the address (the real port when `port` is 0)."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        sim = app[SIMULATOR_KEY]
        bound = runner.addresses[0] if runner.addresses else (host, port)
        log.info("OneSignal simulator listening on http://%s:%s (API key %s)", bound[0], bound[1],
                 "required" if sim.requires_key else "not checked")
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


async def serve(host: str, port: int, api_key: str | None = None) -> None:
    """Run the simulator with the documented limits until cancelled."""
    await _serve_app(build_app(api_key=api_key), host, port)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="onesignal-bridge simulator",
                                     description="A local OneSignal REST API with in-memory state.")
    add_arguments(parser)
    return parser.parse_args(argv)


async def _run_until_signal(app: web.Application, host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(_serve_app(app, host, port))
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        log.info("OneSignal simulator stopped")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: serve until SIGINT/SIGTERM; 0 on a clean stop, 1 when it cannot listen."""
    return run(_parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Serve with parsed flags (see `add_arguments`)."""
    global REQUEST_LOG_SIZE
    REQUEST_LOG_SIZE = args.request_log_size
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = settings_from_args(args)
    log.info("OneSignal simulator settings (%s base): %s", args.preset,
             ", ".join(f"{k}={v}" for k, v in settings.public().items()))
    app = build_app(api_key=args.api_key, app_id=args.app_id, app_rate_per_s=args.app_rate_per_s,
                    user_interval_s=args.user_interval_s, settings=settings)
    try:
        asyncio.run(_run_until_signal(app, args.host, args.port))
    except OSError as exc:
        log.error("OneSignal simulator cannot listen on %s:%s: %s", args.host, args.port, exc.strerror)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
