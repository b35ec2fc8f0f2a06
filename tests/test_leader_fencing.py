"""Failover without stale writes (bridge/lease.py): when the leader's database session ends while
one of its requests is still on its way to OneSignal, the replica that takes over must not let
that old request land after its own newer one. Two bridge processes, a real Postgres, the
simulator over real HTTP holding the old leader's request."""

from __future__ import annotations

import time

from bridgeproc import run_cli, wait_until
from test_outbox import USERS_DDL, _config, _tags

HOLD_S = 5.0  # the simulator holds the old leader's request this long before applying it
FENCE = {"leader_lease_s": 2.0}  # takeover wait: lease 2 s + request timeout 7 s


def _replica(db, sim, bridge, name, **source):  # type: ignore[no-untyped-def]
    cfg = _config(db.dsn, sim.base_url, **FENCE, **source)
    cfg["onesignal"]["request_timeout_s"] = HOLD_S + 2
    return bridge(cfg, name=name)


def _lock_holder(db) -> int:  # type: ignore[no-untyped-def]
    rows = db.fetch("SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
                    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())")
    assert len(rows) == 1, rows
    return int(rows[0][0])


def _leader_and_standby(pg_db, sim, bridge):  # type: ignore[no-untyped-def]
    """Replica a leading the outbox, replica b waiting behind it. b polls the lock every 100 ms, so
    it takes over before a has reconnected."""
    pg_db.execute(USERS_DDL)
    first = _replica(pg_db, sim, bridge, "a")
    out = run_cli("setup", "--config", str(first.config_path))
    assert out.returncode == 0, out.stderr
    first.start()
    wait_until(lambda: "as the leader" in first.logs(), what="replica a to lead")
    second = _replica(pg_db, sim, bridge, "b", poll_interval_ms=100).start()
    wait_until(lambda: "hot standby" in second.logs(), what="replica b to wait as a hot standby")
    return first, second


def test_an_old_leaders_late_request_does_not_overwrite_the_new_leaders_value(pg_db, sim, bridge):
    first, second = _leader_and_standby(pg_db, sim, bridge)
    pg_db.execute("INSERT INTO users (id, crm_id, plan) VALUES (1, 'c1', 'v0')")
    wait_until(lambda: _tags(sim, "1").get("plan") == "v0", what="user 1 created by a")

    sim.faults(latency_ms=HOLD_S * 1000, paths="/users/by/external_id/1$")
    pg_db.execute("UPDATE users SET plan = 'v1' WHERE id = 1")
    wait_until(lambda: sim.stats()["in_progress"] >= 1, what="a's update to v1 held at the simulator")
    held_at = time.monotonic()  # v1 is applied about HOLD_S after it arrived
    pg_db.execute(f"SELECT pg_terminate_backend({_lock_holder(pg_db)})")  # a's lock session ends
    sim.clear_faults()
    pg_db.execute("UPDATE users SET plan = 'v2' WHERE id = 1")

    wait_until(lambda: "taking over" in second.logs(), timeout=10, what="replica b to take over")
    time.sleep(max(0.0, held_at + HOLD_S + 1.0 - time.monotonic()))  # a's held v1 has landed by now
    wait_until(lambda: _tags(sim, "1").get("plan") == "v2", timeout=20,
               what="user 1 at the database's last value after the failover")
    time.sleep(1.0)
    assert _tags(sim, "1").get("plan") == "v2", "a late request of the old leader overwrote the newer value"
    assert "sending to OneSignal starts in 9s" in second.logs()
    wait_until(lambda: "another replica led since" in first.logs(), timeout=15,
               what="replica a to abandon what it held and wait as a standby")
    assert first.alive() and second.alive()


def test_a_leader_stopped_with_sigterm_hands_over_and_the_next_one_sends_at_once(pg_db, sim, bridge):
    first, second = _leader_and_standby(pg_db, sim, bridge)
    pg_db.execute("INSERT INTO users (id, plan) VALUES (1, 'v0')")
    wait_until(lambda: _tags(sim, "1").get("plan") == "v0", what="user 1 created by a")

    assert first.terminate(30) == 0  # a rolling update: SIGTERM, drain, stop
    assert "stopped; 1 outbox row(s) deleted" in first.logs(), "a confirmed what it applied before it let go"
    wait_until(lambda: "taking over" in second.logs(), timeout=10, what="replica b to take over")
    assert "stopped with nothing in flight" in second.logs(), "a's epoch was recorded as a clean stop"
    assert pg_db.fetch("SELECT epoch, clean FROM onesignal_bridge.leaders WHERE lock_name = 'outbox'") == [
        (2, False)], "b leads in an epoch of its own"
    taken = time.monotonic()
    pg_db.execute("INSERT INTO users (id, plan) VALUES (2, 'v0')")
    wait_until(lambda: _tags(sim, "2").get("plan") == "v0", what="user 2 created by b")
    assert time.monotonic() - taken < 5, "b waited as if a had crashed (its takeover wait is 9 s)"
