"""The leader lease: when a replica that leads through a database lock may send to OneSignal.

The `postgres` (with `standby`) and `outbox` sources elect one leader per stream with a
session-level advisory lock. The lock alone does not fence the output: a leader whose database
session ended (a network partition, a restarted or failed-over database, a terminated backend)
may not know it yet, and its queued requests and retries would still reach OneSignal while a
standby, now holding the lock, re-reads the same rows and applies newer values. A late old
value then overwrites a newer one, and nothing corrects it until the row changes again.

The lease closes that window by construction, with two rules and the client's request timeout:

1. A leader sends only while its lease runs: `renew(t0)` after every query that succeeded on the
   session holding the lock, where `t0` is when the query *started*; the lease then runs until
   `t0 + lease_s`. The session was alive when Postgres answered, so the lock was still held after
   `t0`; whenever the session ends, the lease ran out at most `lease_s` later, by this replica's
   own clock, whether or not it noticed. Requests that started before then end (answered or
   abandoned) within `request_timeout_s`.
2. A replica that takes the lock over from another one sends nothing for `takeover_wait_s` (by
   default `lease_s + request_timeout_s`) after it got the lock, unless the previous leader
   stopped cleanly: with every request answered, recorded in `onesignal_bridge.leaders` (see
   `bridge.sources.database.Leadership`). A lock found free says nothing: the previous leader
   may be cut off, not gone.

Together: the previous leader's last request left before the lock was free plus `lease_s`, and
was over `request_timeout_s` after that, before the new leader's first request leaves. What the
previous leader still held (queued, waiting for a retry) is abandoned, not sent, as soon as it
learns that another replica led: the leader re-reads it from the database (see `LeadershipLost`).

Pure: the clock is injected; `gate()` is what the OneSignal client awaits before each request.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable

log = logging.getLogger("bridge.lease")

GATE_POLL_S = 0.05  # how often a closed gate is looked at again
DEFAULT_LEASE_S = 3.0


class Lease:
    """`Lease(lease_s, takeover_wait_s)`: sends are open while `open_in(now) == 0`."""

    def __init__(self, lease_s: float = DEFAULT_LEASE_S, takeover_wait_s: float = 0.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.lease_s = lease_s
        self.takeover_wait_s = takeover_wait_s
        self.clock = clock
        self.held_until = -math.inf  # sends stop here unless renewed (closed until the lock is taken)
        self.send_from = -math.inf  # no sends before this (a takeover's wait)
        self._closed_since: float | None = None  # for the log line when sends wait long

    def acquired(self, started_at: float, took_over: bool) -> float:
        """The lock was taken by a query that started at `started_at`. `took_over`: another
        replica held it before (and did not hand over cleanly). Returns how long sends wait."""
        now = self.clock()
        wait = self.takeover_wait_s if took_over else 0.0
        # A wait already running goes on: taking the lock again (a reconnect) does not shorten it.
        self.send_from = max(self.send_from, now + wait)
        self.held_until = started_at + self.lease_s
        return max(0.0, self.send_from - now)

    def waiting(self) -> bool:
        """A takeover's wait is still running: the previous leader's requests may be in flight."""
        return self.clock() < self.send_from

    def end(self) -> None:
        """The session holding the lock is closed (or known dead): nothing more leaves until the
        lock is held again. Requests already on their way are what `takeover_wait_s` covers."""
        self.held_until = -math.inf

    def renew(self, started_at: float) -> None:
        """A query that started at `started_at` succeeded on the session holding the lock."""
        until = started_at + self.lease_s
        if until > self.held_until:
            self.held_until = until

    def open_in(self, now: float) -> float:
        """0 when a request may leave at `now`; else how long until it may at the earliest
        (`inf` while the lease is out: only a renewal opens it again)."""
        if now < self.send_from:
            return self.send_from - now
        if now > self.held_until:
            return math.inf
        return 0.0

    async def gate(self) -> None:
        """Return once a request may leave (the OneSignal client awaits this before each one)."""
        now = self.clock()
        wait = self.open_in(now)
        if wait == 0.0:
            self._closed_since = None
            return
        while wait > 0.0:
            if self._closed_since is None:
                self._closed_since = now
            elif now - self._closed_since >= self.lease_s and math.isinf(wait):
                log.warning("sending to OneSignal is paused: the leader lock's database session has not "
                            "answered for %.0fs (lease %.0fs); requests wait until it answers, or until "
                            "this replica is replaced as the leader", now - self.held_until + self.lease_s,
                            self.lease_s)
                self._closed_since = now  # once per lease period
            await asyncio.sleep(min(GATE_POLL_S, wait))
            now = self.clock()
            wait = self.open_in(now)
        self._closed_since = None
