"""`Pipeline.offer` (the Sink's fast path): the same hand-over as `put`, with no coroutine while the
output has room; backpressure and dead letters still wait."""

from __future__ import annotations

import asyncio
from typing import Any

from bridge.config import parse_config
from bridge.events import ChangeEvent, Op, UserChange
from bridge.pipeline import Pipeline
from bridge.ports import DoneCallback

CONFIG = parse_config({
    "onesignal": {"app_id": "app", "api_key": "os_v2_app_test"},
    "source": {"kind": "postgres", "dsn": "postgresql://bridge@db/app"},
    "mappings": [{"table": "public.users", "identity": {"external_id": "id"}, "tags": {"plan": "plan"},
                  "properties": {"timezone_id": "tz"}}],
}, env={})


class Output:
    """An output with a room budget; `quiet` adds the dispatcher's submit_quiet/settle pair."""

    def __init__(self, done: DoneCallback, room: int = 10, quiet: bool = False) -> None:
        self.done, self.room = done, room
        self.submitted: list[UserChange] = []
        self.settled = 0
        self.letters: list[Any] = []
        self._room = asyncio.Event()
        if quiet:
            self.submit_quiet = self.submit

    def settle(self) -> None:
        self.settled += 1

    def submit(self, change: UserChange) -> None:
        self.submitted.append(change)

    def has_room(self) -> bool:
        return len(self.submitted) < self.room

    async def wait_for_room(self) -> None:
        while not self.has_room():
            self._room.clear()
            await self._room.wait()

    def make_room(self) -> None:
        self.room += 10
        self._room.set()

    async def dead_letter(self, letters: list[Any]) -> None:
        self.letters.extend(letters)


def event(i: int, tz: str = "Europe/Paris") -> ChangeEvent:
    return ChangeEvent("public.users", Op.INSERT, {"id": i, "plan": "pro", "tz": tz}, None, {"id": i}, f"0/{i:X}")


def test_offer_hands_over_at_once_while_there_is_room() -> None:
    async def main() -> None:
        out: list[Output] = []
        p = Pipeline(CONFIG, lambda done: out.append(Output(done, quiet=True)) or out[0])  # type: ignore[func-returns-value]
        for i in range(5):
            assert p.offer(event(i)) is None
        assert [c.user.id for c in out[0].submitted] == ["0", "1", "2", "3", "4"]
        assert out[0].settled == 0  # settled once, when the event loop runs again
        await asyncio.sleep(0)
        assert out[0].settled == 1
        p.done(c.origin.seq for c in out[0].submitted)
        p.mark("0/5")
        assert p.idle and p.confirmable == "0/5"

    asyncio.run(main())


def test_offer_returns_what_to_await_when_the_output_is_full() -> None:
    async def main() -> None:
        out: list[Output] = []
        p = Pipeline(CONFIG, lambda done: out.append(Output(done, room=1)) or out[0])  # type: ignore[func-returns-value]
        assert p.offer(event(1)) is None
        pending = p.offer(event(2))
        assert pending is not None and len(out[0].submitted) == 1
        task = asyncio.ensure_future(pending)
        await asyncio.sleep(0.01)
        assert not task.done()
        out[0].make_room()
        await task
        assert [c.user.id for c in out[0].submitted] == ["1", "2"]

    asyncio.run(main())


def test_a_rejected_value_is_dead_lettered_before_the_next_event() -> None:
    async def main() -> None:
        out: list[Output] = []
        p = Pipeline(CONFIG, lambda done: out.append(Output(done)) or out[0])  # type: ignore[func-returns-value]
        pending = p.offer(event(1, tz="Mars/Olympus"))
        assert pending is not None  # the good part is submitted, the bad value must be stored first
        await pending
        assert len(out[0].letters) == 1 and "timezone_id" in out[0].letters[0].message
        assert [c.user.id for c in out[0].submitted] == ["1"]
        p.done(c.origin.seq for c in out[0].submitted)
        p.mark("0/1")
        assert p.idle

    asyncio.run(main())


def test_changes_total_is_counted_once_the_event_loop_runs() -> None:
    from bridge.observability import metrics as m

    def total() -> float:
        return m.REGISTRY.get_sample_value("onesignal_bridge_changes_total",
                                           {"table": "public.users", "op": "insert"}) or 0.0

    async def main() -> None:
        p = Pipeline(CONFIG, lambda done: Output(done, room=100))
        before = total()
        for i in range(3):
            p.offer(event(i))
        p.mark("0/3")
        assert total() == before  # one update per pass, not per event
        await asyncio.sleep(0)
        assert total() == before + 3

    asyncio.run(main())
