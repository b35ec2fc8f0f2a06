"""The watermark window of backfills, without I/O: rows changed between the low and the high
watermark are left to the stream; the rest of the chunk enters the pipeline at the high mark."""

from __future__ import annotations

from bridge.sources.backfill import Backfills, _Chunk


class Sink:
    def __init__(self) -> None:
        self.events: list = []
        self.n = 0

    def issue(self) -> int:
        self.n += 1
        return self.n

    async def put(self, event) -> None:  # type: ignore[no-untyped-def]
        self.events.append(event)


async def test_row_changed_inside_the_window_is_not_overwritten_by_the_chunk():
    sink = Sink()
    bf = Backfills("unused", {"public.users"}, sink)
    chunk = _Chunk("public.users", ["id"], {})
    bf._chunks["1.1"] = chunk
    await bf.on_message(b"low:1.1")
    bf.on_change("public.users", {"id": 2})  # the stream saw id 2 change after the low mark
    chunk.rows = {(1,): {"id": 1, "plan": "a"}, (2,): {"id": 2, "plan": "stale"}, (3,): {"id": 3, "plan": "c"}}
    bf.on_change("public.orders", {"id": 3})  # another table: irrelevant
    await bf.on_message(b"high:1.1")
    assert [e.new["id"] for e in sink.events] == [1, 3]
    assert chunk.emitted.is_set()


async def test_changes_before_the_low_watermark_do_not_remove_rows():
    sink = Sink()
    bf = Backfills("unused", {"public.users"}, sink)
    chunk = _Chunk("public.users", ["id"], {(1,): {"id": 1, "plan": "current"}})
    bf._chunks["1.1"] = chunk
    bf.on_change("public.users", {"id": 1})  # before the low mark: the SELECT already sees it
    await bf.on_message(b"low:1.1")
    await bf.on_message(b"high:1.1")
    assert [e.new["plan"] for e in sink.events] == ["current"]
