"""Checkpoint: the low watermark of done events.

A source issues a sequence number for every event it hands to the pipeline, in source order, and
a *marker* (with the position to confirm, e.g. a commit's end LSN) at every point where it would be
safe to confirm. An event is done when its user change was applied or dead-lettered. The source
confirms only `confirmable`: the last marker with every sequence number before it done.

Memory is one byte per outstanding sequence number.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import Any


class Watermark:
    def __init__(self, on_pass: Callable[[Any], None] | None = None) -> None:
        self.on_pass = on_pass  # called with every marker's position the watermark passes
        self._base = 0  # sequence number of _done[_head]
        self._head = 0
        self._done = bytearray()
        self._markers: deque[tuple[int, Any]] = deque()
        self.confirmable: Any = None
        self._next = 0

    def issue(self) -> int:
        """A sequence number for the next event, in source order."""
        seq = self._next
        self._next += 1
        self._done.append(0)
        return seq

    def mark(self, position: Any) -> None:
        """Everything issued so far, once done, makes `position` confirmable."""
        seq = self.issue()
        self._markers.append((seq, position))
        self.complete(seq)

    def complete(self, seq: int) -> None:
        idx = seq - self._base + self._head
        if idx < self._head:
            return  # already passed (a duplicate completion)
        self._done[idx] = 1
        if idx == self._head:
            self._advance()

    def complete_many(self, seqs: Iterable[int]) -> None:
        head_idx = self._head
        advance = False
        for seq in seqs:
            idx = seq - self._base + self._head
            if idx >= self._head:
                self._done[idx] = 1
                advance = advance or idx == head_idx
        if advance:
            self._advance()

    def _advance(self) -> None:
        end = self._done.find(0, self._head)
        if end == -1:
            end = len(self._done)
        passed = end - self._head
        if passed == 0:
            return
        self._base += passed
        self._head = end
        while self._markers and self._markers[0][0] < self._base:
            self.confirmable = self._markers.popleft()[1]
            if self.on_pass is not None:
                self.on_pass(self.confirmable)
        if self._head > 65536 or self._head == len(self._done):
            del self._done[: self._head]
            self._head = 0

    def first_open(self, start: int, end: int) -> int | None:
        """The first sequence number in [start, end) issued and not yet done (None: all done)."""
        lo = max(start, self._base)
        if lo >= end:
            return None
        offset = self._head - self._base
        i = self._done.find(0, lo + offset, end + offset)
        return None if i == -1 else i - offset

    @property
    def outstanding(self) -> int:
        """Sequence numbers issued and not yet passed by the watermark."""
        return self._next - self._base

    @property
    def idle(self) -> bool:
        return self._next == self._base
