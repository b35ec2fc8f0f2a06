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
from bridge.errors import LeadershipLost
from bridge.observability import metrics as m
from bridge.observability.http import HealthServer
from bridge.onboarding import reconcile
from bridge.onesignal import legacy
from bridge.pipeline import Pipeline
from bridge.ports import DoneCallback, Source
from bridge.sources import registry

log = logging.getLogger("bridge.run")

SOURCE_STOP_S = 30.0  # after the dispatcher drained: the source's last confirmations and clean stop


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

    def generation(source: Source) -> _Generation:
        return _Generation(config, source, client, http, dsn, dead_letters, subscriptions)

    gen = generation(source)

    def ready() -> tuple[bool, str]:
        if gen.source.standby:
            return True, "hot standby: waiting for the leader's lock"
        if not gen.source.connected:
            return False, "source not connected"
        if gen.dispatcher.auth_error is not None:
            return False, "OneSignal rejects the API key"
        return True, "ok"

    health = HealthServer(config.metrics.host, config.metrics.port, ready)
    port = await health.start()
    log.info("onesignal-bridge %s: metrics and health on %s:%d", __version__, config.metrics.host, port)
    readiness = asyncio.create_task(_readiness(ready))
    try:
        while True:
            try:
                return await gen.run(stop)
            except LeadershipLost as exc:
                # Another replica leads now: everything this generation held for OneSignal was
                # abandoned with it (the new leader re-reads it); start again, as a standby.
                log.warning("%s", exc)
            gen = generation(kind.create(config))
    finally:
        readiness.cancel()
        await asyncio.gather(readiness, return_exceptions=True)
        await health.stop()
        await http.aclose()
        for store in (dead_letters, subscriptions):
            close = getattr(store, "close", None)
            if close is not None:
                await close()
        m.UP.set(0)


class _Generation:
    """A source, the pipeline and the outputs it feeds, run together until stopped or until the
    source loses its leadership; then every task is cancelled (requests in flight with them)."""

    def __init__(self, config: Config, source: Source, client: Any, http: Any, dsn: str | None,
                 dead_letters: Any, subscriptions: Any) -> None:
        self.config, self.source = config, source

        def user_updates(done: DoneCallback) -> Dispatcher:
            if config.onesignal.api == "legacy":
                return legacy.LegacyDispatcher(client, config.delivery, dead_letters, done,
                                               missing_user=config.onesignal.legacy_missing_user)
            return Dispatcher(client, config.delivery, dead_letters, done, subscriptions=subscriptions,
                              onesignal=config.onesignal,
                              identity_conflicts={mc.table: mc.on_identity_conflict for mc in config.mappings})

        # The leader lease (bridge/lease.py), if the source elects a leader: awaited before each request.
        gate = source.lease.gate if source.lease is not None else None
        client.gate = gate
        # Continuous reconcile (reconcile.interval_s; None when off) watches the pipeline's output.
        self.drift = reconcile.attach(config, client, dsn, lambda: source.connected and not source.standby)
        self.pipeline = Pipeline(config, self.drift.outputs(user_updates) if self.drift is not None else user_updates)
        self.dispatcher: Dispatcher = self.pipeline.output  # type: ignore[assignment]  # built by user_updates
        self.triggers = _attach_triggers(config, self.pipeline, http, dead_letters)  # None without `triggers:`
        if self.triggers is not None:
            self.triggers.gate = gate

    async def drain(self) -> None:
        config, dispatcher = self.config, self.dispatcher
        ok = await dispatcher.flush_all(config.delivery.shutdown_timeout_s)
        await dispatcher.drain(0 if ok else 1.0)
        if self.triggers is not None:  # what is not sent now is re-read and sent under the same keys
            await self.triggers.drain(config.delivery.shutdown_timeout_s)
        if not ok:
            log.warning("shutdown deadline reached: %d user(s) not sent; they are re-read on the next start",
                        dispatcher.pending)

    async def run(self, stop: asyncio.Event) -> int:
        dispatcher, pipeline = self.dispatcher, self.pipeline
        dispatch_task = asyncio.create_task(dispatcher.run())
        source_task = asyncio.create_task(self.source.run(pipeline, stop, self.drain))
        tasks: list[asyncio.Task[Any]] = [dispatch_task, source_task]
        if self.drift is not None:
            tasks.append(asyncio.create_task(self.drift.run(pipeline)))
        if self.triggers is not None:
            tasks.append(asyncio.create_task(self.triggers.run()))
        try:
            done, _ = await asyncio.wait({dispatch_task, source_task}, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                exc = t.exception()
                if exc is not None:
                    raise exc
            if source_task not in done:
                # The dispatcher ends only when the source's shutdown drained it: the source still
                # confirms what was applied (and records a clean stop); let it finish, within bounds
                # (a database that stopped answering must not hold the process).
                try:
                    await asyncio.wait_for(asyncio.shield(source_task), SOURCE_STOP_S)
                except TimeoutError:
                    log.warning("the source did not finish stopping within %.0fs (is the database answering?); "
                                "what it did not confirm is read again on the next start", SOURCE_STOP_S)
            return 0
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await dispatcher.drain(0)  # cancels the requests still in flight (an abandoned generation)
            if self.triggers is not None:
                self.triggers.abandon()


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
