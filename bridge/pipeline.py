"""The pipeline: source -> mapping -> coalescer/dispatcher, with the checkpoint watermark.

Sources call `issue()` for every event they read (in source order), `put(event)` to hand it
over (this awaits while the pending budget is full: backpressure), and `mark(position)` where
confirming would be safe (a commit). They read `confirmable` to know what they may confirm.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

from bridge.checkpoint import Watermark
from bridge.config import Config
from bridge.deadletter import DeadLetter, DeadLetterStore
from bridge.dispatch import Dispatcher
from bridge.events import ChangeEvent
from bridge.mapping import Mapper, MappingResult
from bridge.staleness import StaleFilter
from bridge.observability import metrics as m
from bridge.onesignal.client import OneSignalClient
from bridge.subscriptions import SubscriptionState

log = logging.getLogger("bridge.pipeline")


class Pipeline:
    def __init__(self, config: Config, client: OneSignalClient, dead_letters: DeadLetterStore,
                 subscriptions: SubscriptionState | None = None) -> None:
        self.config = config
        self.watermark = Watermark(on_pass=self._passed)
        self.on_confirm: Callable[[Any], None] | None = None  # a source that wants every passed marker
        self.stale = StaleFilter()
        self._counters: dict[Any, Any] = {}
        self.mapper = Mapper(config)
        self.dead_letters = dead_letters
        self.dispatcher = Dispatcher(client, config.delivery, dead_letters, self.watermark.complete_many,
                                     subscriptions=subscriptions)

    # -- the source's side ---------------------------------------------------------------

    def _passed(self, position: Any) -> None:
        if self.on_confirm is not None:
            self.on_confirm(position)

    def issue(self) -> int:
        return self.watermark.issue()

    def mark(self, position: Any) -> None:
        self.watermark.mark(position)

    @property
    def confirmable(self) -> Any:
        return self.watermark.confirmable

    @property
    def idle(self) -> bool:
        """Everything handed over so far is done (applied or dead-lettered)."""
        return self.watermark.idle

    async def put(self, event: ChangeEvent, order: tuple[Any, ...] = ()) -> None:
        """Map and hand over one event. `order`: the source position for stale-value filtering
        (sources whose events for one user can arrive out of order, i.e. Kafka partitions)."""
        counter = self._counters.get((event.table, event.op))
        if counter is None:
            counter = self._counters[(event.table, event.op)] = m.CHANGES.labels(event.table, event.op.value)
        counter.inc()
        result = self.mapper.map(event)
        if order and result.changes:
            kept = [c for c in (self.stale.filter(ch, order) for ch in result.changes) if c is not None]
            result = MappingResult(tuple(kept), result.rejections)
        n = len(result.changes) + len(result.rejections)
        if n == 0:
            self.watermark.complete(event.seq)
            return
        # One seq per outcome, so the event is done only when all its outcomes are.
        seqs = [event.seq] + [self.watermark.issue() for _ in range(n - 1)]
        if n == 1:
            changes = list(result.changes)  # the mapping already carries the event's seq
        else:
            changes = [
                dataclasses.replace(ch, origin=dataclasses.replace(ch.origin, seq=s))
                for ch, s in zip(result.changes, seqs)
            ]
        rejected_seqs = seqs[len(changes):]
        for ch in changes:
            await self.dispatcher.wait_for_room()
            self.dispatcher.submit(ch)
        if result.rejections:
            letters = [DeadLetter.from_rejection(r) for r in result.rejections]
            for d in letters:
                log.warning("dead-lettered: %s", d.message)
            await self.dispatcher._store_letters(letters)
            self.watermark.complete_many(rejected_seqs)
