"""A source kind that exists only in the test suite: changes handed over from a list in memory.

It proves the seam: a new kind is this one module plus `registry.register(KIND)`, and the real
pipeline, output and simulator run it end to end without any other edit.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from bridge.config import Config
from bridge.deadletter import DeadLetterStore, MemoryDeadLetters
from bridge.events import ChangeEvent
from bridge.ports import BackfillRequest, Finding, Sink, Source, Statement
from bridge.subscriptions import MemorySubscriptionState, SubscriptionState


class MemorySourceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["memory"]
    name: str = "memory"


class MemorySource:
    """Hands over what `feed()` puts in, in order; marks each event's position (an int) as
    confirmable; records what the pipeline confirmed."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[ChangeEvent, int]] = asyncio.Queue()
        self.confirmed: list[Any] = []
        self.connected = False
        self.standby = False
        self.lease = None  # no leader lock: nothing fences the sends

    def feed(self, event: ChangeEvent, position: int) -> None:
        self.queue.put_nowait((event, position))

    async def run(self, sink: Sink, stop: asyncio.Event | None = None,
                  drain: Callable[[], Awaitable[None]] | None = None) -> None:
        stop = stop or asyncio.Event()
        sink.on_confirm(self.confirmed.append)
        self.connected = True
        while not stop.is_set():
            try:
                event, position = await asyncio.wait_for(self.queue.get(), 0.05)
            except TimeoutError:
                continue
            await sink.put(event)
            sink.mark(position)
        if drain is not None:
            await drain()


class MemoryKind:
    name = "memory"
    config_model = MemorySourceConfig

    def __init__(self) -> None:
        self.sources: list[MemorySource] = []
        self.letters = MemoryDeadLetters()

    def create(self, config: Config) -> Source:
        source = MemorySource()
        self.sources.append(source)
        return source

    def database_dsn(self, config: Config) -> str | None:
        return None

    def dead_letters(self, config: Config, source: Source) -> DeadLetterStore:
        return self.letters

    def subscription_state(self, config: Config) -> SubscriptionState:
        return MemorySubscriptionState()

    def setup(self, config: Config) -> list[Statement]:
        return []

    def teardown(self, config: Config) -> list[Statement]:
        return []

    def checks(self, config: Config) -> list[Finding]:
        return [Finding(True, "in-memory source: nothing to check")]

    def backfill(self, config: Config, request: BackfillRequest) -> int:
        return 2
