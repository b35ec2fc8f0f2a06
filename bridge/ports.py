"""The ports: the small interfaces where the stages of the pipeline meet.

```
 Source ──ChangeEvent──▶ Sink (the pipeline: mapping, checkpoint) ──UserChange──▶ Output ──▶ OneSignal
   ▲                          │                                                    │
   └── confirmable / on_confirm ◀── Watermark ◀────────── done(tokens) ────────────┘
```

A source knows nothing of OneSignal and an output knows nothing of where changes come from: the
pipeline between them maps events to changes and keeps the checkpoint. Everything here runs on
the one asyncio event loop of the process unless a docstring says otherwise; a component that
owns a thread (the Kafka consumer) marshals onto the loop before it calls a port.

Each source kind (`postgres`, `outbox`, `kafka`, ...) is described once by a `SourceKind`
(`bridge/sources/registry.py`): its configuration model, how to build the source, where its
dead letters and subscription state live, and what `setup`, `teardown`, `check` and `backfill`
do for it. The commands and the runner ask the registry; they never test for a kind.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from pydantic import BaseModel

    from bridge.config import Config
    from bridge.deadletter import DeadLetter, DeadLetterStore
    from bridge.events import ChangeEvent, UserChange
    from bridge.lease import Lease
    from bridge.subscriptions import SubscriptionState

#: Called by an output with the checkpoint tokens it finished (applied or dead-lettered).
DoneCallback = Callable[[Iterable[int]], None]


class Sink(Protocol):
    """The pipeline as a source sees it.

    Contract:
    - `put(event)` hands over one event, in source order. The pipeline assigns the event's
      checkpoint token (a source never does). It returns once the event is accepted, which is
      not when it is applied; it waits while the pipeline has no room (backpressure), so a
      source never drops and never buffers without bound.
    - `mark(position)` says: once every event put so far is done, `position` may be confirmed
      to the upstream system (a commit's end LSN, a Kafka offset, an outbox batch). Call it only
      where confirming is safe, in source order.
    - `confirmable` is the last marked position with everything before it done (None before the
      first). Confirming more than that can lose changes at a crash; confirming less only
      repeats work (every request is idempotent).
    - `on_confirm(listener)` registers `listener(position)`, called for every marked position the
      low watermark passes, in order. Several listeners may register (the source, its snapshot
      reader); none is replaced.
    - `idle` is true when everything put so far is done.
    - `offer(event, order)` is `put` without a coroutine per event, for sources that hand over
      many events at a time: it does what `put` does and returns None when the event was
      accepted at once, or an awaitable (the pipeline has no room yet, or dead letters must be
      stored first) that the source must await before it offers or puts anything else.
      `w = sink.offer(e)` then `if w is not None: await w` is exactly `await sink.put(e)`: the
      backpressure is the same, only the common case costs no await.
    """

    async def put(self, event: ChangeEvent, order: tuple[Any, ...] = ()) -> None: ...

    def offer(self, event: ChangeEvent, order: tuple[Any, ...] = ()) -> Awaitable[None] | None: ...

    def mark(self, position: Any) -> None: ...

    @property
    def confirmable(self) -> Any: ...

    @property
    def idle(self) -> bool: ...

    def on_confirm(self, listener: Callable[[Any], None]) -> None: ...


class Source(Protocol):
    """A stream of row changes with positions that can be confirmed.

    `run` reads until `stop` is set, handing events to `sink` in source order (at-least-once:
    after a restart, everything after the last confirmed position comes again). When `stop` is
    set it stops reading, awaits `drain()` (the output sends what it holds), confirms what is
    confirmable, and returns. It raises `SourceSetupError` for what an operator must fix (a
    missing publication, a missing privilege) and retries what heals by itself (a dropped
    connection). `connected` and `standby` feed readiness: a hot standby is ready and idle.

    `lease`: for a source that elects a leader through a database lock, the `bridge.lease.Lease`
    that fences what this replica sends (the runner has the OneSignal client await its gate before
    each request); None where no lock decides who sends (Kafka's group assigns partitions). Such a
    source raises `LeadershipLost` from `run` when another replica took its lock over: the runner
    then abandons everything held for OneSignal and starts source and pipeline again.
    """

    @property
    def connected(self) -> bool: ...

    @property
    def standby(self) -> bool: ...

    @property
    def lease(self) -> Lease | None: ...

    async def run(self, sink: Sink, stop: asyncio.Event | None = None,
                  drain: Callable[[], Awaitable[None]] | None = None) -> None: ...


class Output(Protocol):
    """Where mapped changes go (OneSignal user updates; later, messages and custom events).

    Contract:
    - `submit(change)` takes one `UserChange` whose origin carries its checkpoint token. The
      output reports every token it finishes through the `DoneCallback` it was built with,
      exactly once per token, after the change was applied or dead-lettered (never before).
    - `has_room` / `wait_for_room()` are backpressure: the pipeline waits before it submits when
      the output holds as much as its budget allows, or cannot deliver at all (a rejected key).
    - `dead_letter(letters)` stores values that can never be applied; it returns once they are
      durable (then the pipeline reports their tokens done).
    - `run()` delivers until cancelled. `flush_all(timeout)` sends what is pending now and says
      whether everything went; `drain(timeout)` waits for requests in flight.
    - `auth_error` is set while the destination refuses the credentials (readiness false).
    """

    @property
    def auth_error(self) -> Exception | None: ...

    def submit(self, change: UserChange) -> None: ...

    def has_room(self) -> bool: ...

    async def wait_for_room(self) -> None: ...

    async def dead_letter(self, letters: list[DeadLetter]) -> None: ...

    async def run(self) -> None: ...

    async def flush_all(self, timeout: float) -> bool: ...

    async def drain(self, timeout: float) -> None: ...

    @property
    def pending(self) -> int:
        """Users (or items) held and not yet delivered: what a shutdown would leave unsent."""
        ...


@dataclass(frozen=True)
class Statement:
    """One SQL statement that `setup` runs (or prints), and why, for the operator."""

    why: str
    text: str


@dataclass(frozen=True)
class Finding:
    """One result of `check`: what was found and, when it is a problem, the fix."""

    ok: bool
    what: str
    fix: str = ""
    warning: bool = False

    def render(self) -> str:
        tag = "ok  " if self.ok else ("warn" if self.warning else "FAIL")
        return f"[{tag}] {self.what}" + (f"\n       fix: {self.fix}" if self.fix else "")


@dataclass(frozen=True)
class BackfillRequest:
    """What `onesignal-bridge backfill` asks of a source kind."""

    table: str
    where: str | None
    resume: bool
    chunk_size: int
    wait: bool
    timeout: float = 3600.0


class SourceKind(Protocol):
    """Everything the commands need to know about one kind of source (one registration each).

    - `name` is the `source.kind` value; `config_model` the pydantic model of its `source:`
      section (with `kind: Literal[name]`).
    - `create(config)` builds the `Source` for a validated configuration.
    - `database_dsn(config)` is the Postgres database that holds the bridge's own tables (dead
      letters, subscription ids, progress), or None for a kind without one (Kafka).
    - `dead_letters(config, source)` / `subscription_state(config)`: where this kind keeps them.
    - `setup(config)` / `teardown(config)`: the kind's own statements, beside the bridge's schema
      (publication, slot, replica identity; outbox triggers).
    - `checks(config)`: `check`'s findings for this kind's side (connectivity, privileges, ...).
    - `backfill(config, request)`: run `backfill`; returns the exit status.
    """

    name: str
    config_model: type[BaseModel]

    def create(self, config: Config) -> Source: ...

    def database_dsn(self, config: Config) -> str | None: ...

    def dead_letters(self, config: Config, source: Source) -> DeadLetterStore: ...

    def subscription_state(self, config: Config) -> SubscriptionState: ...

    def setup(self, config: Config) -> Sequence[Statement]: ...

    def teardown(self, config: Config) -> Sequence[Statement]: ...

    def checks(self, config: Config) -> Sequence[Finding]: ...

    def backfill(self, config: Config, request: BackfillRequest) -> int: ...
