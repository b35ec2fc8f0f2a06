"""`run`: wire source, pipeline, dispatcher and the HTTP endpoints; stop cleanly on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from typing import Any

from bridge import __version__, schema
from bridge.config import Config
from bridge.dispatch import Dispatcher
from bridge.observability import metrics as m
from bridge.observability.http import HealthServer
from bridge.onboarding import reconcile
from bridge.onesignal import legacy
from bridge.pipeline import Pipeline
from bridge.ports import DoneCallback
from bridge.sources import registry

log = logging.getLogger("bridge.run")


async def run_bridge(config: Config, stop: asyncio.Event | None = None) -> int:
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    kind = registry.for_config(config)
    dsn = kind.database_dsn(config)
    if dsn is not None:  # the bridge's own tables must be there, at this version: say which command fixes it
        await asyncio.to_thread(schema.require_current, dsn)
    m.UP.set(1)
    m.READY.set(0)
    m.BUILD.info({"version": __version__})
    # onesignal.api picks the output: the User Model's Dispatcher, or the legacy player model's
    # (one Edit tags with external user id per change; bridge/onesignal/legacy.py).
    http, client = legacy.make_client(config.onesignal, max_connections=config.delivery.max_in_flight)
    source = kind.create(config)
    dead_letters = kind.dead_letters(config, source)
    subscriptions = kind.subscription_state(config)

    def user_updates(done: DoneCallback) -> Dispatcher:
        if config.onesignal.api == "legacy":
            return legacy.LegacyDispatcher(client, config.delivery, dead_letters, done,
                                           missing_user=config.onesignal.legacy_missing_user)
        return Dispatcher(client, config.delivery, dead_letters, done, subscriptions=subscriptions,
                          onesignal=config.onesignal,
                          identity_conflicts={mc.table: mc.on_identity_conflict for mc in config.mappings})

    # Continuous reconcile (reconcile.interval_s; None when off) watches the pipeline's output.
    drift = reconcile.attach(config, client, dsn, lambda: source.connected and not source.standby)
    pipeline = Pipeline(config, drift.outputs(user_updates) if drift is not None else user_updates)
    dispatcher = pipeline.output
    triggers = _attach_triggers(config, pipeline, http, dead_letters)  # None without `triggers:`

    def ready() -> tuple[bool, str]:
        if source.standby:
            return True, "hot standby: waiting for the leader's lock"
        if not source.connected:
            return False, "source not connected"
        if dispatcher.auth_error is not None:
            return False, "OneSignal rejects the API key"
        return True, "ok"

    health = HealthServer(config.metrics.host, config.metrics.port, ready)
    port = await health.start()
    log.info("onesignal-bridge %s: metrics and health on %s:%d", __version__, config.metrics.host, port)

    async def drain() -> None:
        ok = await dispatcher.flush_all(config.delivery.shutdown_timeout_s)
        await dispatcher.drain(0 if ok else 1.0)
        if triggers is not None:  # what is not sent now is re-read and sent under the same keys
            await triggers.drain(config.delivery.shutdown_timeout_s)
        if not ok:
            log.warning("shutdown deadline reached: %d user(s) not sent; they are re-read on the next start",
                        dispatcher.pending)

    dispatch_task = asyncio.create_task(dispatcher.run())
    source_task = asyncio.create_task(source.run(pipeline, stop, drain))
    readiness = asyncio.create_task(_readiness(ready))
    drift_task = asyncio.create_task(drift.run(pipeline)) if drift is not None else readiness
    trigger_task = asyncio.create_task(triggers.run()) if triggers is not None else readiness
    try:
        done, _ = await asyncio.wait({dispatch_task, source_task}, return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            exc = t.exception()
            if exc is not None:
                raise exc
        return 0
    finally:
        for t in (dispatch_task, source_task, readiness, drift_task, trigger_task):
            t.cancel()
        await asyncio.gather(dispatch_task, source_task, readiness, drift_task, trigger_task, return_exceptions=True)
        await health.stop()
        await http.aclose()
        for store in (dead_letters, subscriptions):
            close = getattr(store, "close", None)
            if close is not None:
                await close()
        m.UP.set(0)


def _attach_triggers(config: Config, pipeline: Pipeline, http: Any, dead_letters: Any) -> Any:
    """The trigger output (bridge/triggers) beside the user updates, when `triggers:` has any."""
    if not config.triggers:
        return None
    from bridge.triggers.output import TriggerOutput

    return pipeline.attach_triggers(lambda done, first_open: TriggerOutput(
        http, config.onesignal.app_id, config.onesignal.api_key.get_secret_value(), dead_letters, done,
        first_open, config.delivery.messages_per_second))


async def _readiness(ready: Callable[[], tuple[bool, str]]) -> None:
    while True:
        m.READY.set(1 if ready()[0] else 0)
        await asyncio.sleep(1.0)
