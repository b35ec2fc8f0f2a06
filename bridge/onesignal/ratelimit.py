"""OneSignal's app-wide write limit: a token bucket that paces requests, and a window of answered
requests that keeps every server-side second under the limit whatever the queueing (the per-user
limit lives in the coalescer)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Callable


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


class AnsweredWindow:
    """At most `limit` requests in any `window_s` at the server, by construction.

    OneSignal counts the writes it receives in a trailing second; the bridge cannot see when a
    request reaches it, only that it happens after the request left and before its answer came back.
    So each request holds a place from the moment it is granted until `window_s` after its answer
    arrived (or it failed), and a request is granted only while fewer than `limit` places are held.

    Why no server window can hold more than `limit`: take any `limit + 1` requests the server counted
    in one window (t - window_s, t], and the one of them granted last, at time g. Every other one
    reached the server after t - window_s; at g it was either in flight (holding a place) or answered
    at some time e with e >= its arrival > t - window_s >= g - window_s (arrival <= t, and g <= its own
    arrival <= t), so still holding a place. That is `limit` places held at g: it was not granted.
    Queueing, connection-pool waits, retries and stalls on either side only delay requests, which
    this bound does not depend on; a token bucket's bound does (rate x the longest queueing).
    """

    def __init__(self, limit: int, window_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self.window_s = window_s
        self._clock = clock
        self._answered: deque[float] = deque()  # answer times, oldest first (the clock is monotonic)
        self.in_flight = 0
        self._lock = asyncio.Lock()
        self._released = asyncio.Event()

    def held(self) -> int:
        """Places held now: requests in flight and those answered within the last `window_s`."""
        cutoff = self._clock() - self.window_s
        answered = self._answered
        while answered and answered[0] <= cutoff:
            answered.popleft()
        return self.in_flight + len(answered)

    def try_grant(self) -> bool:
        if self.held() >= self.limit:
            return False
        self.in_flight += 1
        return True

    def answered(self) -> None:
        """The granted request's answer arrived, or it failed: its place frees `window_s` from now."""
        self.in_flight -= 1
        self._answered.append(self._clock())
        self._released.set()

    def wait_s(self) -> float | None:
        """How long until a place frees by time alone; None when every place is in flight."""
        if not self._answered:
            return None
        return max(0.0, self._answered[0] + self.window_s - self._clock())

    async def grant(self) -> None:
        async with self._lock:  # FIFO among waiters
            while not self.try_grant():
                wait = self.wait_s()
                self._released.clear()
                if wait is None:
                    await self._released.wait()
                else:
                    await asyncio.sleep(wait)

    @contextlib.asynccontextmanager
    async def place(self) -> AsyncIterator[None]:
        """Hold a place for the request sent inside the block."""
        await self.grant()
        try:
            yield
        finally:
            self.answered()
