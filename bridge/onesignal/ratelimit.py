"""Token bucket for OneSignal's app-wide write limit (the per-user limit lives in the coalescer)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class TokenBucket:
    """`rate` tokens per second, at most `burst` saved up; `acquire()` waits for one.

    With rate 900/s and a burst of a tenth of a second, no trailing 1-second window can hold more
    than rate + burst requests: below OneSignal's 1,000/s.
    """

    def __init__(self, rate: float, burst: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = max(1.0, burst if burst is not None else rate / 10)
        self._clock = clock
        self._tokens = self.burst
        self._stamp = clock()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def try_acquire(self) -> bool:
        self._refill()
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False

    async def acquire(self) -> None:
        async with self._lock:  # FIFO among waiters
            while not self.try_acquire():  # noqa: ASYNC110 - waits for tokens to refill over time; no task signals it
                await asyncio.sleep((1 - self._tokens) / self.rate)
