"""The simulator's rate limits (pure: the caller supplies a monotonic `now` in seconds).

`WriteLimiter` holds the documented write limits (per app and per user or subscription),
`ViewLimiter` the app-wide limit on View endpoints; a handler raises `RateLimited` when one
refuses, and the HTTP layer (`simulator.py`) answers it with a 429.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable


class RateLimited(Exception):
    """Raised by a handler when a limiter refuses the request; becomes a 429."""

    def __init__(self, wait_s: float) -> None:
        super().__init__(f"rate limited for {wait_s:.3f}s")
        self.wait_s = wait_s


class WriteLimiter:
    """The documented write limits: N accepted writes per trailing second per app, and one
    accepted write per `user_interval_s` per user or subscription. Refused writes are not
    recorded, so a client that honours Retry-After is never starved by its own retries."""

    def __init__(self, app_rate_per_s: int, user_interval_s: float) -> None:
        self.app_rate_per_s = app_rate_per_s
        self.user_interval_s = user_interval_s
        self._window: deque[float] = deque()
        self._last: OrderedDict[str, float] = OrderedDict()
        self.refused = {"app": 0, "user": 0}  # 429s by the limit that refused (both when both did)

    def admit(self, keys: Iterable[str], now: float) -> float | None:
        """Record and return None when the write is accepted, else the seconds to wait."""
        keys = list(keys)
        self._prune(now)
        app_wait = user_wait = 0.0
        if self.app_rate_per_s > 0 and len(self._window) >= self.app_rate_per_s:
            app_wait = 1.0 - (now - self._window[0])
        for key in keys:
            last = self._last.get(key)
            if last is not None:
                user_wait = max(user_wait, self.user_interval_s - (now - last))
        if app_wait > 0 or user_wait > 0:
            self.refused["app"] += app_wait > 0
            self.refused["user"] += user_wait > 0
            return max(app_wait, user_wait)
        self._window.append(now)
        self.touch(keys, now)
        return None

    def touch(self, keys: Iterable[str], now: float) -> None:
        """Mark keys as written at `now` (e.g. the onesignal_id of a user a create just made)."""
        for key in keys:
            self._last[key] = now
            self._last.move_to_end(key)

    def _prune(self, now: float) -> None:
        while self._window and now - self._window[0] >= 1.0:
            self._window.popleft()
        while self._last:
            key, last = next(iter(self._last.items()))
            if now - last < self.user_interval_s:
                break
            del self._last[key]


class ViewLimiter:
    """App-wide limit on View endpoints: a token bucket of `rate_per_s` (burst of the same size)."""

    def __init__(self, rate_per_s: float) -> None:
        self.rate_per_s = rate_per_s
        self._capacity = max(1.0, rate_per_s)
        self._tokens = self._capacity
        self._stamp: float | None = None

    def admit(self, now: float) -> float | None:
        if self.rate_per_s <= 0:
            return None
        if self._stamp is not None:
            self._tokens = min(self._capacity, self._tokens + (now - self._stamp) * self.rate_per_s)
        self._stamp = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return None
        return (1.0 - self._tokens) / self.rate_per_s
