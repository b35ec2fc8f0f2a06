"""The leader lease (bridge/lease.py) and the election that drives it (bridge/sources/database.py):
a replica that lost its lock stops sending within the lease, a replica taking the lock over waits
out the previous leader's requests unless it handed over cleanly, and a replica that led and finds
another one holding its lock abandons what it held."""

from __future__ import annotations

import asyncio
import logging
import math

import psycopg
import pytest

from bridge.errors import LeadershipLost
from bridge.lease import Lease
from bridge.sources.database import Leadership


class _Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


# -- the lease, pure -----------------------------------------------------------------------------


def test_a_leader_sends_while_its_lock_session_answered_within_the_lease():
    clock = _Clock()
    lease = Lease(lease_s=10, takeover_wait_s=25, clock=clock)
    assert lease.open_in(clock()) == math.inf, "nothing leaves before the lock is held"
    assert lease.acquired(started_at=100.0, took_over=False) == 0
    assert lease.open_in(105.0) == 0
    assert lease.open_in(110.5) == math.inf, "no answer from the lock's session for longer than the lease"
    lease.renew(started_at=104.0)  # a query that started at 104 was answered
    assert lease.open_in(110.5) == 0
    lease.renew(started_at=101.0)  # an older answer never shortens the lease
    assert lease.open_in(113.9) == 0
    assert lease.open_in(114.1) == math.inf


def test_a_replica_taking_the_lock_over_waits_before_its_first_request():
    clock = _Clock()
    lease = Lease(lease_s=10, takeover_wait_s=25, clock=clock)
    assert lease.acquired(started_at=99.5, took_over=True) == 25
    assert lease.open_in(100.0) == 25
    lease.renew(started_at=120.0)
    assert lease.open_in(124.0) == pytest.approx(1.0)
    assert lease.open_in(125.0) == 0


async def test_the_gate_holds_a_request_until_the_lease_opens_and_lets_it_go_then():
    clock = _Clock()
    lease = Lease(lease_s=10, takeover_wait_s=5, clock=clock)
    lease.acquired(started_at=clock(), took_over=True)
    request = asyncio.create_task(lease.gate())
    await asyncio.sleep(0.2)  # the gate looks again every 50 ms: the clock has not moved
    assert not request.done(), "a request left during the takeover wait"
    clock.t += 5
    lease.renew(clock.t)
    await asyncio.wait_for(request, 1)


async def test_a_request_waits_while_the_lock_session_does_not_answer_and_goes_when_it_does():
    clock = _Clock()
    lease = Lease(lease_s=10, clock=clock)
    lease.acquired(started_at=clock(), took_over=False)
    clock.t += 11
    request = asyncio.create_task(lease.gate())
    await asyncio.sleep(0.2)
    assert not request.done(), "a request left after the lease ran out"
    lease.renew(clock.t)
    await asyncio.wait_for(request, 1)


# -- the election, against a real Postgres --------------------------------------------------------

LOCK = ("SELECT pg_try_advisory_lock(hashtext(%s))", ("onesignal-bridge-test-lease",))
_log = logging.getLogger("test.lease")
_HELD: list[psycopg.AsyncConnection] = []  # type: ignore[type-arg]


@pytest.fixture(autouse=True)
async def _close_held():  # type: ignore[no-untyped-def]
    yield
    while _HELD:
        await _HELD.pop().close()


def _leadership(lease_s: float = 10, takeover_wait_s: float = 25) -> Leadership:
    return Leadership(LOCK[0], LOCK[1], "the test lock", 0.05, _log, Lease(lease_s, takeover_wait_s))


async def _connect(dsn: str) -> psycopg.AsyncConnection:  # type: ignore[type-arg]
    return await psycopg.AsyncConnection.connect(dsn, autocommit=True)


async def _standby_elects(dsn: str, standby: Leadership, stop: asyncio.Event) -> asyncio.Task[bool]:
    """`standby` waiting for the lock on a connection of its own (left open: holding the lock is
    holding the session)."""
    conn = await _connect(dsn)
    _HELD.append(conn)  # referenced until the test ends: a collected connection frees its lock
    task = asyncio.create_task(standby.elect(conn, stop))
    for _ in range(100):
        if standby.standby:
            break
        await asyncio.sleep(0.02)
    assert standby.standby, "the second replica did not wait behind the first"
    return task


async def _leader_and_standby(dsn: str, stop: asyncio.Event):  # type: ignore[no-untyped-def]
    """A leader holding the lock on its connection, and a standby waiting behind it (its `elect`
    task)."""
    leader, standby = _leadership(), _leadership()
    conn = await _connect(dsn)
    _HELD.append(conn)
    assert await leader.elect(conn, stop)
    return leader, conn, standby, await _standby_elects(dsn, standby, stop)


async def test_a_standby_that_takes_over_from_a_vanished_leader_waits_out_its_requests(pg_db):
    leader, first, standby, waiting = await _leader_and_standby(pg_db.dsn, asyncio.Event())
    assert leader.lease.open_in(leader.lease.clock()) == 0, "the first leader of a stream sends at once"
    await first.close()  # the leader's session ends without a word (a crash, a partition)
    assert await asyncio.wait_for(waiting, 10)
    assert standby.lease.open_in(standby.lease.clock()) == pytest.approx(25, abs=1), (
        "the new leader must not send while the old one's requests may still land")


async def test_a_leader_that_stops_cleanly_lets_the_standby_send_at_once(pg_db):
    leader, first, standby, waiting = await _leader_and_standby(pg_db.dsn, asyncio.Event())
    await leader.hand_over(first)
    assert leader.lease.open_in(leader.lease.clock()) == math.inf, "nothing leaves a leader that handed over"
    await first.close()
    assert await asyncio.wait_for(waiting, 10)
    assert standby.lease.open_in(standby.lease.clock()) == 0


async def test_a_hand_over_notice_seen_before_another_leader_took_the_lock_does_not_count(pg_db):
    stop = asyncio.Event()
    a, b, c = _leadership(), _leadership(), _leadership()
    conn_a = await _connect(pg_db.dsn)
    assert await a.elect(conn_a, stop)
    waiting_b = await _standby_elects(pg_db.dsn, b, stop)
    waiting_c = await _standby_elects(pg_db.dsn, c, stop)
    await a.hand_over(conn_a)
    await conn_a.close()
    done, _ = await asyncio.wait({waiting_b, waiting_c}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    winner, loser = (b, c) if waiting_b in done else (c, b)
    other = waiting_c if winner is b else waiting_b
    await asyncio.sleep(0.3)  # the loser fails a few more attempts behind the winner
    assert not other.done() and loser.standby
    # The winner vanishes without a word: the loser takes over, and must wait.
    assert winner.led
    await _close_holder(pg_db.dsn)
    assert await asyncio.wait_for(other, 10)
    assert loser.lease.open_in(loser.lease.clock()) == pytest.approx(25, abs=1), (
        "the first leader's clean hand-over was taken for the second one's")


async def _close_holder(dsn: str) -> None:
    """End the session holding the test lock (as a crash or a partition would)."""
    async with await _connect(dsn) as admin:
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())")


async def test_a_leader_that_lost_its_session_to_a_new_leader_abandons_what_it_held(pg_db):
    stop = asyncio.Event()
    old, _conn, _new, waiting = await _leader_and_standby(pg_db.dsn, stop)
    await _close_holder(pg_db.dsn)  # the old leader's session is terminated
    assert await asyncio.wait_for(waiting, 10)
    again = await _connect(pg_db.dsn)
    try:
        with pytest.raises(LeadershipLost, match="another replica leads now"):
            await asyncio.wait_for(old.elect(again, stop), 10)
    finally:
        await again.close()


async def test_a_leader_that_lost_its_session_and_got_the_lock_back_goes_on_at_once(pg_db):
    stop = asyncio.Event()
    leader = _leadership()
    conn = await _connect(pg_db.dsn)
    assert await leader.elect(conn, stop)
    await _close_holder(pg_db.dsn)
    again = await _connect(pg_db.dsn)
    try:
        assert await leader.elect(again, stop), "nobody else held the lock: it leads again"
        assert leader.lease.open_in(leader.lease.clock()) == 0
    finally:
        await again.close()
