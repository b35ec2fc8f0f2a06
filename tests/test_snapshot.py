"""Initial snapshot: existing rows reach OneSignal, consistent with the stream, resumable."""

from __future__ import annotations

import random
import threading
import time

import psycopg
import pytest
from bridgeproc import LONG, Simulator, bridge_config, run_cli, wait_until

DDL = "CREATE TABLE users (id bigint PRIMARY KEY, plan text);"
MAPPING = [{"table": "public.users", "identity": {"external_id": "id"}, "tags": {"plan": "plan"}}]


@pytest.fixture
def fast_sim():  # type: ignore[no-untyped-def]
    """A simulator with a higher app-wide limit, so a snapshot's users go out at the bridge's 4,500/s
    (100,000 users, the ONESIGNAL_BRIDGE_LONG size, take a minute, not two)."""
    s = Simulator(extra=["--app-rate-per-s", "6000"])
    yield s
    s.close()


def _plans(sim) -> dict[str, str | None]:  # type: ignore[no-untyped-def]
    return {k: u["properties"].get("tags", {}).get("plan") for k, u in sim.by_external_id().items()}


def _start(pg_db, sim, bridge, rows: int, **source):  # type: ignore[no-untyped-def]
    pg_db.execute(DDL)
    pg_db.execute(f"INSERT INTO users SELECT g, 'old' FROM generate_series(1, {rows}) g")
    cfg = bridge_config(pg_db.dsn, sim.base_url, MAPPING, source={"snapshot": "initial", **source},
                        delivery={"app_requests_per_second": 4500, "max_in_flight": 128})
    b = bridge(cfg)
    out = run_cli("setup", "--config", str(b.config_path))
    assert out.returncode == 0, out.stderr
    assert not pg_db.fetch("SELECT 1 FROM pg_replication_slots"), "setup leaves the slot to the first run"
    return b


def test_existing_rows_and_concurrent_updates_all_reach_their_latest_values(pg_db, fast_sim, bridge):
    """Rows that exist before the slot and 2,000 updates made while they are read and sent: every
    user ends at its latest value (a stream update never loses to an older snapshot row).

    Default size 20,000 rows in chunks of 2,000: ten chunks and their checkpoint markers, as the
    full size has; the sending lasts several seconds at the bridge's 4,500 requests/s, so the
    updates still land while snapshot rows are pending or in flight (asserted below: the first
    update comes before "snapshot complete"), both for users already sent and users not yet sent.
    ONESIGNAL_BRIDGE_LONG=1: 100,000 rows in the default chunk size (10,000), also ten chunks."""
    rows = 100_000 if LONG else 20_000
    source = {} if LONG else {"snapshot_chunk_size": 2000}
    b = _start(pg_db, fast_sim, bridge, rows, **source).start()
    expected = {i: "old" for i in range(1, rows + 1)}
    wait_until(lambda: pg_db.fetch("SELECT 1 FROM pg_replication_slots"), what="the slot")
    rng = random.Random(5)
    with psycopg.connect(pg_db.dsn, autocommit=True) as conn:
        for step in range(2000):  # while the snapshot is read and sent
            uid = rng.randint(1, rows)
            conn.execute("UPDATE users SET plan = %s WHERE id = %s", (f"new{step}", uid))
            expected[uid] = f"new{step}"
            if step == 0:
                assert "snapshot complete" not in b.logs(), "the updates must overlap the snapshot"
            if step % 200 == 0:
                time.sleep(0.1)
    want = {str(k): v for k, v in expected.items()}
    # Poll the cheap counter first: listing 100,000 users is itself heavy for the simulator.
    wait_until(lambda: fast_sim.stats()["total_requests"] >= rows, timeout=420, interval=1, what="one call per user")
    wait_until(lambda: _plans(fast_sim) == want, timeout=120, interval=max(1, rows // 10_000),
               what="every user at its latest value")
    assert fast_sim.stats()["rate_limited"] == 0
    # Completion is saved and logged by the progress saver (every 0.5 s), after the last rows are
    # confirmed: it may come a moment after OneSignal holds every user.
    wait_until(lambda: "snapshot complete" in b.logs(), timeout=30, what="the snapshot's completion logged")


def test_snapshot_killed_midway_resumes_from_a_chunk_boundary(pg_db, fast_sim, bridge):
    """SIGKILLed after a few chunks were applied, the snapshot resumes after the last saved key
    (not from zero), and users changed while it was down still reach their latest values.

    Default size 15,000 rows in chunks of 1,000, killed once 3,000 are applied: the bridge sends at
    most 4,500 users/s and progress is polled every 0.1 s (saved every 0.5 s), so the kill lands
    with chunks applied and well over half of the table still to read (the resume point is
    asserted strictly inside the table). ONESIGNAL_BRIDGE_LONG=1: 30,000 rows in chunks of 2,000,
    killed after 6,000."""
    rows, chunk = (30_000, 2000) if LONG else (15_000, 1000)
    b = _start(pg_db, fast_sim, bridge, rows, snapshot_chunk_size=chunk).start()
    wait_until(lambda: (pg_db.fetch("SELECT coalesce(sum(rows_done), 0) FROM onesignal_bridge.snapshot_progress")
                        or [[0]])[0][0] >= 3 * chunk, timeout=120, what="a few chunks applied")
    b.kill()
    (done_before,) = pg_db.fetch("SELECT sum(rows_done) FROM onesignal_bridge.snapshot_progress")[0]
    pg_db.execute("UPDATE users SET plan = 'after-crash' WHERE id IN (1, %s)", rows - 1)
    b.start()
    wait_until(lambda: "resumes after key" in b.logs(), timeout=30, what="the snapshot to resume")
    want = {str(i): "old" for i in range(1, rows + 1)} | {"1": "after-crash", str(rows - 1): "after-crash"}
    wait_until(lambda: fast_sim.stats()["total_requests"] >= rows, timeout=180, interval=1, what="one call per user")
    wait_until(lambda: _plans(fast_sim) == want, timeout=120, interval=5, what="convergence after the resume")
    line = next(ln for ln in b.logs().splitlines() if "resumes after key" in ln)
    resumed_rows_done = int(line.split("(")[-1].split()[0])
    assert 0 < resumed_rows_done < rows, "resumed from a chunk boundary, not from zero"
    assert resumed_rows_done >= done_before


def test_backfill_with_where_touches_only_matching_rows_and_keeps_newer_stream_values(pg_db, sim, bridge):
    pg_db.execute(DDL)
    pg_db.execute("INSERT INTO users SELECT g, 'old' FROM generate_series(1, 3000) g")
    cfg = bridge_config(pg_db.dsn, sim.base_url, MAPPING, source={"snapshot": "never"})
    b = bridge(cfg)
    assert run_cli("setup", "--config", str(b.config_path)).returncode == 0
    b.start()
    wait_until(lambda: "streaming from slot" in b.logs(), what="the bridge to stream")
    result: dict[str, object] = {}

    def run_backfill() -> None:
        result["out"] = run_cli("backfill", "--config", str(b.config_path), "--table", "public.users",
                                "--where", "id % 10 = 0", "--chunk-size", "20", timeout=240)

    t = threading.Thread(target=run_backfill)
    t.start()
    updated = set()
    with psycopg.connect(pg_db.dsn, autocommit=True) as conn:
        for uid in range(3000, 0, -10):  # matching rows, from the end the backfill reaches last
            conn.execute("UPDATE users SET plan = 'newer' WHERE id = %s", (uid,))
            updated.add(uid)
            if len(updated) >= 60:
                break
            time.sleep(0.02)
    t.join(240)
    out = result["out"]
    assert out.returncode == 0, out.stdout + out.stderr  # type: ignore[attr-defined]
    want = {str(i): ("newer" if i in updated else "old") for i in range(10, 3001, 10)}
    wait_until(lambda: _plans(sim) == want, timeout=60, interval=1, what="matching users only, newer values kept")
