"""The pipeline between a source and an output: mapping, stale-value filtering, the checkpoint.

```
 Source ──put(event)──▶ Pipeline: token, map, filter ──submit(change)──▶ Output
   ▲                         │ Watermark ◀──────── done(tokens) ─────────────┘
   └── confirmable, on_confirm listeners
```

It is the `Sink` a source writes to (`bridge.ports.Sink`): it assigns every event its checkpoint
token, maps it, and hands the changes to the `Output` (OneSignal user updates today). It knows
nothing of Postgres or Kafka, and nothing of OneSignal's API: the output is built by the runner
and given the pipeline's `done` callback.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from bridge.checkpoint import Watermark
from bridge.config import Config
from bridge.deadletter import DeadLetter
from bridge.events import ChangeEvent
from bridge.mapping import Mapper
from bridge.observability import metrics as m
from bridge.ports import DoneCallback, Output
from bridge.staleness import StaleFilter

log = logging.getLogger("bridge.pipeline")


class Pipeline:
    """`Pipeline(config, make_output)`: `make_output(done)` builds the output, which reports the
    tokens it finished through `done`."""

    def __init__(self, config: Config, make_output: Callable[[DoneCallback], Output]) -> None:
        self.config = config
        self.watermark = Watermark(on_pass=self._passed)
        self._listeners: list[Callable[[Any], None]] = []
        self.stale = StaleFilter()
        self._counters: dict[Any, Any] = {}
        self.mapper = Mapper(config)
        self.output = make_output(self.done)

    # -- the output's side ---------------------------------------------------------------

    def done(self, tokens: Iterable[int]) -> None:
        self.watermark.complete_many(tokens)

    # -- the source's side (bridge.ports.Sink) -------------------------------------------

    def on_confirm(self, listener: Callable[[Any], None]) -> None:
        self._listeners.append(listener)

    def _passed(self, position: Any) -> None:
        for listener in self._listeners:
            listener(position)

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
        seq = self.watermark.issue()
        counter = self._counters.get((event.table, event.op))
        if counter is None:
            counter = self._counters[(event.table, event.op)] = m.CHANGES.labels(event.table, event.op.value)
        counter.inc()
        result = self.mapper.map(event, seq)
        changes = result.changes
        if order and changes:
            changes = tuple(c for c in (self.stale.filter(ch, order) for ch in changes) if c is not None)
        rejections = result.rejections
        n = len(changes) + len(rejections)
        if n == 0:
            self.watermark.complete(seq)
            return
        # One token per outcome, so the event is done only when all its outcomes are.
        if n > 1:
            extra = [self.watermark.issue() for _ in range(n - 1)]
            tokens = [seq, *extra]
            changes = tuple(ch.with_seq(t) for ch, t in zip(changes, tokens, strict=False))
            rejected = tokens[len(changes):]
        else:
            rejected = [seq] if rejections else []
        output = self.output
        for ch in changes:
            await output.wait_for_room()
            output.submit(ch)
        if rejections:
            letters = [DeadLetter.from_rejection(r) for r in rejections]
            for d in letters:
                log.warning("dead-lettered: %s", d.message)
            await output.dead_letter(letters)
            self.done(rejected)
