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

from bridge import schema
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


def test_taking_the_lock_again_during_a_takeover_wait_does_not_shorten_it():
    clock = _Clock()
    lease = Lease(lease_s=10, takeover_wait_s=25, clock=clock)
    lease.acquired(started_at=100.0, took_over=True)  # sends from 125
    clock.t = 102.0
    lease.end()  # a reconnect: the session that held the lock is gone ...
    assert lease.acquired(started_at=102.0, took_over=False) == pytest.approx(23)  # ... and taken again
    assert lease.open_in(110.0) == pytest.approx(15)
    assert lease.waiting()


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
TAKEOVER_S = 25


@pytest.fixture(autouse=True)
async def _close_held():  # type: ignore[no-untyped-def]
    yield
    while _HELD:
        await _HELD.pop().close()


@pytest.fixture
def dsn(pg_db) -> str:  # type: ignore[no-untyped-def]
    """A database with the bridge's schema (the leaders table)."""
    with psycopg.connect(pg_db.dsn, autocommit=True) as conn:
        schema.migrate(conn)
    return str(pg_db.dsn)


def _leadership(takeover_wait_s: float = TAKEOVER_S) -> Leadership:
    return Leadership(LOCK[0], LOCK[1], "the test lock", 0.05, _log, Lease(10, takeover_wait_s), key="test")


async def _connect(dsn: str) -> psycopg.AsyncConnection:  # type: ignore[type-arg]
    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    _HELD.append(conn)  # referenced until the test ends: a collected connection frees its lock
    return conn


async def _leads(dsn: str, replica: Leadership) -> psycopg.AsyncConnection:  # type: ignore[type-arg]
    conn = await _connect(dsn)
    assert await asyncio.wait_for(replica.elect(conn, asyncio.Event()), 10)
    return conn


async def _waits(dsn: str, standby: Leadership) -> asyncio.Task[bool]:
    """`standby` waiting for the lock on a connection of its own (its `elect` task; the connection
    is `_HELD[-1]` when it returns)."""
    task = asyncio.create_task(standby.elect(await _connect(dsn), asyncio.Event()))
    for _ in range(100):
        if standby.standby:
            return task
        await asyncio.sleep(0.02)
    raise AssertionError("the replica did not wait behind the lock's holder")


async def _end_holder(dsn: str) -> None:
    """End the session holding the test lock (as a crash, a partition or a database restart would)."""
    admin = await _connect(dsn)
    await admin.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())")


def _wait_of(replica: Leadership) -> float:
    return replica.lease.open_in(replica.lease.clock())


async def test_the_first_leader_of_a_stream_sends_at_once(dsn):
    leader = _leadership()
    await _leads(dsn, leader)
    assert _wait_of(leader) == 0


async def test_a_standby_that_takes_over_from_a_vanished_leader_waits_out_its_requests(dsn):
    leader, standby = _leadership(), _leadership()
    conn = await _leads(dsn, leader)
    waiting = await _waits(dsn, standby)
    await conn.close()  # the leader's session ends without a word (a crash, a partition)
    assert await asyncio.wait_for(waiting, 10)
    assert _wait_of(standby) == pytest.approx(TAKEOVER_S, abs=1), (
        "the new leader must not send while the old one's requests may still land")


async def test_a_leader_that_stops_cleanly_lets_the_next_one_send_at_once(dsn):
    leader, standby = _leadership(), _leadership()
    conn = await _leads(dsn, leader)
    waiting = await _waits(dsn, standby)
    await leader.hand_over(conn, idle=True)
    assert _wait_of(leader) == math.inf, "nothing leaves a leader that handed over"
    await conn.close()
    assert await asyncio.wait_for(waiting, 10)
    assert _wait_of(standby) == 0


async def test_a_replica_that_finds_the_lock_free_after_a_database_restart_still_waits(dsn):
    leader, standby = _leadership(), _leadership()
    await _leads(dsn, leader)
    waiting = await _waits(dsn, standby)
    admin = await _connect(dsn)  # the database restarts: every session ends
    await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE datname = current_database() AND pid <> pg_backend_pid()")
    with pytest.raises(psycopg.OperationalError):
        await asyncio.wait_for(waiting, 10)
    reconnected = standby  # the standby's next session finds the lock free at once
    await _leads(dsn, reconnected)
    assert _wait_of(reconnected) == pytest.approx(TAKEOVER_S, abs=1), (
        "the old leader's requests may still be in flight: a free lock does not mean it stopped")


async def test_a_clean_stop_counts_only_for_the_leader_that_made_it(dsn):
    a, b, c = _leadership(), _leadership(), _leadership()
    conn_a = await _leads(dsn, a)
    await a.hand_over(conn_a, idle=True)
    await conn_a.close()
    await _leads(dsn, b)  # b takes over from a clean stop, then vanishes
    assert _wait_of(b) == 0
    await _end_holder(dsn)
    await asyncio.sleep(0.1)
    await _leads(dsn, c)
    assert _wait_of(c) == pytest.approx(TAKEOVER_S, abs=1), "a's clean stop was taken for b's"


async def test_a_leader_that_lost_its_session_to_a_new_leader_abandons_what_it_held(dsn):
    old, new = _leadership(), _leadership()
    await _leads(dsn, old)
    waiting = await _waits(dsn, new)
    await _end_holder(dsn)  # the old leader's session is terminated; the standby takes over
    assert await asyncio.wait_for(waiting, 10)
    with pytest.raises(LeadershipLost, match="another replica led since"):
        await asyncio.wait_for(old.elect(await _connect(dsn), asyncio.Event()), 10)


async def test_a_leader_that_finds_the_lock_free_after_another_led_meanwhile_abandons_what_it_held(dsn):
    old, other = _leadership(), _leadership(takeover_wait_s=0)
    await _leads(dsn, old)
    await _end_holder(dsn)  # the old leader is cut off for a while (its reconnects fail) ...
    await asyncio.sleep(0.1)
    conn = await _leads(dsn, other)  # ... another replica waits it out, leads, sends, stops cleanly
    await other.hand_over(conn, idle=True)
    await conn.close()
    with pytest.raises(LeadershipLost):
        await asyncio.wait_for(old.elect(await _connect(dsn), asyncio.Event()), 10)
    fresh = _leadership()  # the runner's next generation takes the lock again, as a new replica
    await _leads(dsn, fresh)
    assert _wait_of(fresh) == 0, "the other replica stopped cleanly"


async def test_a_leader_that_lost_its_session_and_got_the_lock_back_goes_on_at_once(dsn):
    leader = _leadership()
    await _leads(dsn, leader)
    await _end_holder(dsn)
    await asyncio.sleep(0.1)
    await _leads(dsn, leader)  # nobody else led meanwhile: its queue is still the newest
    assert _wait_of(leader) == 0


async def test_a_leader_still_in_its_takeover_wait_does_not_mark_a_clean_stop(dsn):
    old, b, c = _leadership(), _leadership(), _leadership()
    conn_old = await _leads(dsn, old)
    waiting = await _waits(dsn, b)
    await conn_old.close()  # the old leader vanishes with requests in flight
    assert await asyncio.wait_for(waiting, 10)
    assert _wait_of(b) > 20
    conn_b = _HELD[1]  # the connection b's election ran on (after the old leader's): it holds the lock
    await b.hand_over(conn_b, idle=True)  # b is stopped before its wait ended: it sent nothing, is idle ...
    await conn_b.close()
    await _leads(dsn, c)
    assert _wait_of(c) == pytest.approx(TAKEOVER_S, abs=1), "... but the old leader's requests may still land"


async def test_a_leader_whose_old_session_still_holds_the_lock_waits_for_it_and_goes_on(dsn):
    leader = _leadership()
    first = await _leads(dsn, leader)  # its network drops: the server keeps the old session a while
    again = asyncio.create_task(leader.elect(await _connect(dsn), asyncio.Event()))
    for _ in range(100):
        if leader.standby:
            break
        await asyncio.sleep(0.02)
    assert leader.standby and not again.done(), "its own old session is not another leader"
    await first.close()  # the server drops the old session
    assert await asyncio.wait_for(again, 10)
    assert _wait_of(leader) == 0, "nobody else led: it goes on with what it held"


async def test_a_replica_taking_the_lock_from_a_bridge_that_records_no_epoch_waits(dsn):
    older = await _connect(dsn)  # a bridge from before schema version 3 holds the lock
    cur = await older.execute(LOCK[0], LOCK[1])
    assert (await cur.fetchone())[0]
    standby = _leadership()
    waiting = await _waits(dsn, standby)
    await older.close()
    assert await asyncio.wait_for(waiting, 10)
    assert _wait_of(standby) == pytest.approx(TAKEOVER_S, abs=1)


async def test_an_epoch_written_again_by_another_replica_is_not_taken_for_its_own(dsn):
    old = _leadership()
    await _leads(dsn, old)
    await _end_holder(dsn)  # cut off; then the database fails over and loses the last writes:
    admin = await _connect(dsn)  # another replica ends up with the same epoch number, cleanly stopped
    await admin.execute("UPDATE onesignal_bridge.leaders SET holder = 'another-replica', clean = true"
                        " WHERE lock_name = 'test'")
    with pytest.raises(LeadershipLost):
        await asyncio.wait_for(old.elect(await _connect(dsn), asyncio.Event()), 10)
