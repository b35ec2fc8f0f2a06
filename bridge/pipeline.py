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

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from bridge.checkpoint import Watermark
from bridge.config import Config
from bridge.deadletter import DeadLetter
from bridge.events import ChangeEvent, Op, Rejection, UserChange
from bridge.mapping import Mapper, MappingResult
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
        self._counters: dict[tuple[str, Op], Any] = {}  # changes_total children
        self._tally: dict[tuple[str, Op], int] = {}  # events not yet added to them
        self.mapper = Mapper(config)
        self._tables = self.mapper.tables
        self.output = make_output(self.done)
        self.triggers: Any = None  # the trigger output (bridge/triggers), once `attach_triggers` ran
        # An output may offer a quiet submit (the dispatcher does): no metric updates or wake-up per
        # change, one `settle()` after the source's synchronous pass. Otherwise `submit` it is.
        quiet = getattr(self.output, "submit_quiet", None)
        settle = getattr(self.output, "settle", None)
        self._settle_soon = False
        self._submit: Callable[[UserChange], None] = self.output.submit
        self._settle_output: Callable[[], None] | None = None
        if quiet is not None and settle is not None:
            self._submit = quiet
            self._settle_output = settle

    # -- triggers (bridge/triggers): a second output beside the user updates ---------------

    def attach_triggers(self, make: Callable[[DoneCallback, Callable[[int, int], int | None]], Any]) -> Any:
        """Fan every event out to the trigger matcher after mapping. `make(done, first_open)` builds
        the trigger output (`bridge.triggers.output.TriggerOutput`). Without triggers nothing here
        runs: `offer` stays the plain fast path."""
        from bridge.triggers.match import Matcher

        matcher = Matcher(self.config.triggers, source_identity(self.config))
        self._matcher = matcher
        self._trigger_tables = matcher.tables
        self._ordinals: dict[tuple[str, str], int] = {}
        self._ordinal_position: str | None = None
        self.triggers = make(self.done, self.watermark.first_open)
        self.offer = self._offer_triggered  # type: ignore[method-assign]
        return self.triggers

    def _offer_triggered(self, event: ChangeEvent, order: tuple[Any, ...] = ()) -> Awaitable[None] | None:
        """`offer`, then the triggers: their tokens come after the event's own changes' tokens, so a
        send waits for them (and for every change before it in the stream)."""
        waiting = Pipeline.offer(self, event, order)
        if event.table not in self._trigger_tables or event.op is Op.SNAPSHOT:
            return waiting
        if event.position != self._ordinal_position:
            self._ordinal_position = event.position
            self._ordinals.clear()
        row = (event.table, repr(sorted(event.key.items())))
        ordinal = self._ordinals.get(row, 0)
        self._ordinals[row] = ordinal + 1
        sends = self._matcher.match(event, ordinal)
        if not sends:
            return waiting
        triggers = self.triggers
        for send in sends:
            send.seq = self.watermark.issue()
            triggers.submit(send)
        if triggers.has_room():
            return waiting
        return self._wait_both(waiting, triggers)

    @staticmethod
    async def _wait_both(waiting: Awaitable[None] | None, triggers: Any) -> None:
        if waiting is not None:
            await waiting
        await triggers.wait_for_room()

    # -- the output's side ---------------------------------------------------------------

    def done(self, tokens: Iterable[int]) -> None:
        self.watermark.complete_many(tokens)
        if self.triggers is not None:  # sends may wait for these tokens
            self.triggers.poke()

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
        pending = self.offer(event, order)
        if pending is not None:
            await pending

    def offer(self, event: ChangeEvent, order: tuple[Any, ...] = ()) -> Awaitable[None] | None:
        """`put` without a coroutine per event (`bridge.ports.Sink.offer`): the event is mapped and
        its changes submitted at once while the output has room; returns None then, else an
        awaitable that finishes the hand-over (waiting for room, storing dead letters), which the
        source awaits before it offers anything else."""
        watermark = self.watermark
        seq = watermark.issue()
        tally = self._tally
        counted = (event.table, event.op)
        tally[counted] = tally.get(counted, 0) + 1
        if not self._settle_soon:
            self._settle_later()
        tm = self._tables.get(event.table)
        if tm is None:
            watermark.complete(seq)
            return None
        result = tm.map_one(event, seq)
        if type(result) is UserChange:  # the usual row: one change, nothing rejected
            change = self.stale.filter(result, order) if order else result
            if change is None:  # nothing of it is current
                watermark.complete(seq)
                return None
            if self.output.has_room():
                self._submit(change)
                return None
            return self._finish((change,), (), [])
        assert isinstance(result, MappingResult)
        changes = result.changes
        rejections = result.rejections
        if order and changes:
            changes = tuple(c for c in (self.stale.filter(ch, order) for ch in changes) if c is not None)
        if not rejections:
            if len(changes) == 1:
                output = self.output
                if output.has_room():
                    self._submit(changes[0])
                    return None
                return self._finish(changes, (), [])
            if not changes:
                watermark.complete(seq)
                return None
        elif not changes and len(rejections) == 1:
            return self._finish((), rejections, [seq])
        # One token per outcome, so the event is done only when all its outcomes are.
        tokens = [seq, *[watermark.issue() for _ in range(len(changes) + len(rejections) - 1)]]
        changes = tuple(ch.with_seq(t) for ch, t in zip(changes, tokens, strict=False))
        rejected = tokens[len(changes):]
        if not rejections:
            output = self.output
            for i, ch in enumerate(changes):
                if not output.has_room():
                    return self._finish(changes[i:], (), [])
                self._submit(ch)
            return None
        return self._finish(changes, rejections, rejected)

    async def _finish(self, changes: tuple[UserChange, ...], rejections: tuple[Rejection, ...],
                      rejected: list[int]) -> None:
        """The rest of a hand-over that cannot complete at once: submit as room comes, then store
        the dead letters (durably) and report their tokens done."""
        self._flush_counts()
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

    def _settle_later(self) -> None:
        """After the source's synchronous pass (when the event loop runs again): count the events
        in `changes_total` and settle the output's quiet submits, once for the whole pass."""
        self._settle_soon = True
        try:
            asyncio.get_running_loop().call_soon(self._settle)
        except RuntimeError:  # no event loop (a synchronous caller): at once
            self._settle()

    def _settle(self) -> None:
        self._settle_soon = False
        self._flush_counts()
        if self._settle_output is not None:
            self._settle_output()

    def _flush_counts(self) -> None:
        """Add the events counted since the last flush to the `changes_total` counter (one
        `inc` per table and op, not one per event)."""
        tally = self._tally
        if not tally:
            return
        counters = self._counters
        for (table, op), n in tally.items():
            counter = counters.get((table, op))
            if counter is None:
                counter = counters[(table, op)] = m.CHANGES.labels(table, op.value)
            counter.inc(n)
        tally.clear()


def source_identity(config: Config) -> str:
    """What names this stream for idempotency keys: the source kind and its slot, topics or outbox."""
    src = config.source
    kind = getattr(src, "kind", "source")
    for attr in ("slot", "group_id", "topics", "table"):
        value = getattr(src, attr, None)
        if value:
            return f"{kind}:{value}"
    return str(kind)
