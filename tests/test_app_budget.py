"""OneSignal's app-wide write limit (1,000 requests per trailing second at the server) is kept by
construction: whatever the latency, queueing or stalls between the bridge and OneSignal, no
second at the server receives more requests than `delivery.app_requests_per_second` (issue 16).
And the request slots (`delivery.max_in_flight`) go to requests, not to batches waiting."""

from __future__ import annotations

import asyncio
import heapq
import random
from collections.abc import Callable

import pytest

from bridge.config import DeliveryConfig, OneSignalConfig
from bridge.deadletter import MemoryDeadLetters
from bridge.dispatch import Dispatcher
from bridge.events import Origin, UserChange, UserRef
from bridge.onesignal.client import OneSignalClient, build_http_client
from bridge.onesignal.ratelimit import AnsweredWindow, TokenBucket

try:
    from .bridgeproc import API_KEY, APP_ID, Simulator
except ImportError:
    from bridgeproc import API_KEY, APP_ID, Simulator  # type: ignore[no-redef]  # run as a plain module


def _busiest_server_second(arrivals: list[float]) -> int:
    """The most arrivals in any window (t - 1, t], as a trailing-second limiter counts them."""
    arrivals = sorted(arrivals)
    most, first = 0, 0
    for last, t in enumerate(arrivals):
        while arrivals[first] <= t - 1.0:
            first += 1
        most = max(most, last - first + 1)
    return most


class _StallingServer:
    """When requests reach OneSignal: a few milliseconds after they leave, except that every second
    or so the path stalls for up to 300 ms (a descheduled process, a full queue, a slow hop) and
    what left meanwhile arrives at once when it ends."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.stalls: list[tuple[float, float]] = []
        t = 0.0
        while t < 60.0:
            t += self.rng.uniform(0.5, 1.5)
            self.stalls.append((t, t + self.rng.uniform(0.05, 0.3)))

    def arrival(self, left_at: float) -> float:
        for begin, end in self.stalls:
            if begin <= left_at < end:
                return end
        return left_at + self.rng.uniform(0.0, 0.005)


def _send_all(requests: int, grant: Callable[[], bool], answered: Callable[[], None],
              wait_s: Callable[[], float | None], clock: list[float], seed: int) -> tuple[list[float], float]:
    """Discrete-event run: `requests` requests all ready at 0, each granted as soon as the limiter
    allows, reaching a `_StallingServer` and answered a few milliseconds after they arrive.
    Returns the server's arrival times and when the last answer came."""
    server = _StallingServer(seed)
    answers: list[float] = []
    arrivals: list[float] = []
    left = requests
    while left or answers:
        while left and grant():
            left -= 1
            arrival = server.arrival(clock[0])
            arrivals.append(arrival)
            heapq.heappush(answers, arrival + server.rng.uniform(0.001, 0.005))
        wait = wait_s() if left else None
        step = [answers[0]] if answers else []
        if wait is not None:
            step.append(clock[0] + max(wait, 1e-6))
        clock[0] = min(step)
        while answers and answers[0] <= clock[0]:
            heapq.heappop(answers)
            answered()
    return arrivals, clock[0]


@pytest.mark.parametrize("seed", range(5))
def test_no_second_at_the_server_holds_more_than_the_budget_whatever_the_stalls(seed):
    clock = [0.0]
    window = AnsweredWindow(100, clock=lambda: clock[0])
    arrivals, finished = _send_all(1_000, window.try_grant, window.answered, window.wait_s, clock, seed)
    assert len(arrivals) == 1_000
    assert _busiest_server_second(arrivals) <= 100
    # the bound costs little: 1,000 requests at 100 per second, with stalls
    assert finished < 14.0, f"took {finished:.1f} s"


def test_a_token_bucket_alone_lets_a_server_second_exceed_the_limit_under_the_same_stalls():
    """Why the window exists: the former scheme (90 % of the limit, a tenth of a second of burst)
    kept the times requests left under the limit, not the times they arrived."""
    worst = 0
    for seed in range(5):
        clock = [0.0]
        bucket = TokenBucket(90, clock=lambda: clock[0])  # noqa: B023 - used within this iteration
        arrivals, _ = _send_all(1_000, bucket.try_acquire, lambda: None,
                                lambda: (1 - bucket._tokens) / bucket.rate, clock, seed)  # noqa: B023
        worst = max(worst, _busiest_server_second(arrivals))
    assert worst > 100


def test_a_window_with_every_place_in_flight_grants_again_only_a_window_after_an_answer():
    clock = [10.0]
    window = AnsweredWindow(2, clock=lambda: clock[0])
    assert window.try_grant() and window.try_grant()
    assert not window.try_grant() and window.wait_s() is None, "both in flight: wait for an answer"
    clock[0] = 10.4
    window.answered()
    assert not window.try_grant(), "an answered request still counts for a second"
    assert window.wait_s() == pytest.approx(1.0)
    clock[0] = 11.4
    assert window.try_grant()


# -- end to end, over HTTP: a simulator whose arrivals bunch ---------------------------------------

@pytest.fixture(scope="module")
def tight_simulator():
    """A simulator whose app limit is 30 writes per second, the bridge's budget with no margin."""
    s = Simulator(extra=["--app-rate-per-s", "30"])
    try:
        yield s
    finally:
        s.close()


async def test_a_budget_equal_to_the_limit_gets_no_429_when_arrivals_bunch(tight_simulator):
    sim = tight_simulator
    sim.reset()
    # every request waits 0-250 ms before the simulator counts it: requests reorder and bunch
    sim.faults(latency_jitter_ms=250, seed=16)
    done: list[int] = []
    http = build_http_client(sim.base_url, 5.0)
    delivery = DeliveryConfig(flush_interval_ms=0, app_requests_per_second=30)
    dispatcher = Dispatcher(OneSignalClient(http, APP_ID, API_KEY), delivery, MemoryDeadLetters(), done.extend,
                            onesignal=OneSignalConfig(app_id=APP_ID, api_key=API_KEY))
    runner = asyncio.create_task(dispatcher.run())
    try:
        for i in range(120):
            dispatcher.submit(UserChange(UserRef("external_id", f"u{i}"), Origin("public.users", f"id={i}", "0/1", i),
                                         tags={"plan": "pro"}))
        assert await dispatcher.flush_all(60.0)
        await dispatcher.drain(0)
    finally:
        runner.cancel()
        await http.aclose()
    statuses = [r["status"] for r in sim.requests()]
    assert statuses.count(429) == 0, f"{statuses.count(429)} of {len(statuses)} requests were refused"
    assert sorted(done) == list(range(120))
    assert len(sim.by_external_id()) == 120


# -- request slots -----------------------------------------------------------------------------------

async def test_a_batch_waiting_out_its_users_spacing_does_not_hold_a_request_slot(sim):
    """A user deleted outside the bridge: its update answers 404 and its Create user must wait a
    second (1 request/s per user). Meanwhile the only request slot serves another user."""
    sim.config(replication_lag_ms=0)
    done: list[int] = []
    http = build_http_client(sim.base_url, 5.0)
    one_slot = DeliveryConfig(flush_interval_ms=0, max_in_flight=1)
    dispatcher = Dispatcher(OneSignalClient(http, APP_ID, API_KEY), one_slot, MemoryDeadLetters(), done.extend,
                            onesignal=OneSignalConfig(app_id=APP_ID, api_key=API_KEY, post_create_delay_s=0))
    runner = asyncio.create_task(dispatcher.run())

    def change(uid: str, n: int, plan: str) -> UserChange:
        return UserChange(UserRef("external_id", uid), Origin("public.users", f"id={n}", "0/1", n), tags={"plan": plan})
    try:
        dispatcher.submit(change("gone", 1, "a"))
        assert await dispatcher.flush_all(10.0)
        sim.reset()  # OneSignal no longer has the user; the bridge still knows it
        sim.config(replication_lag_ms=0)
        await asyncio.sleep(1.1)  # past the user's spacing: its next update leaves at once
        dispatcher.submit(change("gone", 2, "b"))
        await asyncio.sleep(0.2)  # its update answered 404; its Create user waits out the second
        dispatcher.submit(change("other", 3, "a"))
        assert await dispatcher.flush_all(10.0)
    finally:
        runner.cancel()
        await http.aclose()
    log = sim.requests()
    first = {(r["user"], r["status"]): r["time"] for r in reversed(log)}
    assert ("gone", 404) in first, log
    assert first[("other", 200)] < first[("gone", 200)], f"the other user waited for the slot: {log}"
    assert sorted(done) == [1, 2, 3]
    assert sim.user("gone")["properties"]["tags"] == {"plan": "b"}
