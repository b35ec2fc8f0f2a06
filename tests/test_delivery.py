"""Delivery engine, end to end: coalescing, rate limits, outages, crashes, dead letters, backpressure.

Real Postgres, the bridge as a process, the OneSignal simulator over HTTP."""

from __future__ import annotations

import os
import random
import time
from collections import defaultdict

import httpx
import psutil
import psycopg
from bridgeproc import LONG, Simulator, bridge_config, free_port, run_cli, wait_until

from bridge import setup as bridge_setup
from bridge.config import load_config

DDL = "CREATE TABLE users (id bigint PRIMARY KEY, plan text, score int, tz text);"
MAPPING = [{
    "table": "public.users", "identity": {"external_id": "id"},
    "tags": {"plan": "plan", "score": "score"}, "properties": {"timezone_id": "tz"},
    "on_delete": "delete_user",
}]


def _start(pg_db, sim, bridge, *, delivery=None, name="bridge"):  # type: ignore[no-untyped-def]
    pg_db.execute(DDL)
    port = free_port()
    cfg = bridge_config(pg_db.dsn, sim.base_url, MAPPING, delivery=delivery)
    cfg["metrics"]["port"] = port
    b = bridge(cfg, name=name)
    out = run_cli("setup", "--config", str(b.config_path))
    assert out.returncode == 0, out.stderr
    b.metrics_url = f"http://127.0.0.1:{port}/metrics"
    return b


def _tags(sim):  # type: ignore[no-untyped-def]
    return {k: v["properties"].get("tags", {}) for k, v in sim.by_external_id().items()}


def _metric(b, name: str) -> float:  # type: ignore[no-untyped-def]
    text = httpx.get(b.metrics_url, timeout=5).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _max_requests_per_user_per_second(requests: list[dict]) -> float:
    """The shortest gap between two accepted writes for the same user, as a rate."""
    by_user: dict[str, list[float]] = defaultdict(list)
    for r in requests:
        if r["status"] < 300 and r["method"] != "GET":
            by_user[r["user"]].append(r["time"])
    shortest = min(
        (b - a for ts in by_user.values() for a, b in zip(sorted(ts), sorted(ts)[1:], strict=False)), default=10.0
    )
    return 1.0 / shortest


def test_fifty_users_updated_a_hundred_times_converge_within_rate_limits(pg_db, sim, bridge):
    b = _start(pg_db, sim, bridge).start()
    with psycopg.connect(pg_db.dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO users (id, plan, score) SELECT g, 'p0', 0 FROM generate_series(1, 50) g")
        t0 = time.monotonic()
        for step in range(1, 101):
            conn.execute("UPDATE users SET plan = %s, score = %s", (f"p{step}", step))
            time.sleep(max(0.0, t0 + step * 0.05 - time.monotonic()))  # 100 rounds spread over 5 s
    want = {str(i): {"plan": "p100", "score": "100"} for i in range(1, 51)}
    wait_until(lambda want=want: _tags(sim) == want, timeout=30, what="50 users at their last values")
    stats = sim.stats()
    assert stats["rate_limited"] == 0
    reqs = sim.requests()
    assert _max_requests_per_user_per_second(reqs) <= 1.0
    # 5,050 row changes; at 1 request/s per user over ~6 s, about 6-7 requests per user.
    assert len([r for r in reqs if r["method"] != "GET"]) <= 50 * 9
    assert _metric(b, "onesignal_bridge_user_changes_coalesced_total") > 4000


def test_onesignal_outage_of_ten_seconds_or_more_loses_nothing(pg_db, sim, bridge):
    """OneSignal answers 503 to everything for a while, writes go on before, during and after it:
    nothing is lost, memory stays bounded, the retries are counted.

    Default outage 10 s (ONESIGNAL_BRIDGE_LONG=1: 20 s). Retries back off exponentially with full
    jitter (0.5 s doubling), so 10 s already takes each of the 200 users through at least four
    attempts with growing delays (the bridge logs "attempt 4" for every one of them): a bridge that
    gave up after a few attempts, or dropped changes coalesced behind a failing batch, still fails
    here. The outage's length mostly sets how long the last backoffs make convergence wait
    afterwards (~50 s after a 20 s outage, ~25 s after 10 s)."""
    outage_s = 20 if LONG else 10
    b = _start(pg_db, sim, bridge, delivery={"max_pending_bytes": 32 * 1024 * 1024}).start()
    rng = random.Random(3)
    expected: dict[int, str] = {}
    with psycopg.connect(pg_db.dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO users (id, plan) SELECT g, 'start' FROM generate_series(1, 200) g")
        expected.update({i: "start" for i in range(1, 201)})
        deadline = time.monotonic() + 3 + outage_s + 3
        step = 0
        outage_started = outage_ended = False
        t0 = time.monotonic()
        while time.monotonic() < deadline:
            step += 1
            uid = rng.randint(1, 200)
            conn.execute("UPDATE users SET plan = %s WHERE id = %s", (f"s{step}", uid))
            expected[uid] = f"s{step}"
            elapsed = time.monotonic() - t0
            if elapsed > 3 and not outage_started:
                sim.faults(error_rate=1.0, status=503)
                outage_started = True
            if elapsed > 3 + outage_s and not outage_ended:
                sim.clear_faults()
                outage_ended = True
            time.sleep(0.005)
    wait_until(
        lambda: all(_tags(sim).get(str(k), {}).get("plan") == v for k, v in expected.items()),
        timeout=90,
        what="convergence after the outage",
    )
    assert sim.stats()["by_status"].get("503", 0) > 0, "the outage was not observed"
    rss = psutil.Process(b.proc.pid).memory_info().rss
    assert rss < 200 * 1024 * 1024, f"bridge RSS {rss / 2**20:.0f} MiB"
    assert _metric(b, "onesignal_bridge_api_retries_total") > 0


CRASH_RUNS = int(
    os.environ.get("ONESIGNAL_BRIDGE_CRASH_RUNS", "200" if LONG else "20")
)
# Per step of a crash run's workload: a write, an LSN read and a look at the simulator's request
# count take ~2-3 ms; this pause paces the 200 steps over ~1 s, so delivery overlaps them.
CRASH_STEP_PAUSE_S = 0.003
# Runs at once, each with its own simulator, database and slot: a run mostly waits (bridge
# start-ups, OneSignal's 1 request/s per user), so two share the machine's cores well.
CRASH_WORKERS = 2


def _kill_and_witness(b, admin, name: str, requests_since_start: int, last_write_lsn: int | None,  # type: ignore[no-untyped-def]
                      step: int) -> dict:
    """SIGKILL the bridge and say where the kill landed: how many requests OneSignal had answered
    since this start, and whether the slot was still short of the last write (the slot's
    confirmed_flush_lsn, read once the walsender has let go, against the WAL position just before
    the last write's transaction: its commit lies beyond that, so it was not confirmed)."""
    b.kill()
    confirmed = wait_until(
        lambda: admin.execute(
            "SELECT confirmed_flush_lsn - '0/0' FROM pg_replication_slots WHERE database = %s AND NOT active",
            (name,),
        ).fetchone(),
        timeout=10,
        interval=0.005,
        what="the killed bridge's walsender to let go of the slot",
    )[0]
    unconfirmed = last_write_lsn is not None and confirmed <= last_write_lsn
    return {
        "step": step,
        "requests": requests_since_start,
        "unconfirmed": unconfirmed,
        "mid_delivery": requests_since_start >= 1 and unconfirmed,
    }


def _crash_run(run: int, pg_cluster, sim, bridge) -> tuple[str | None, list[dict]]:  # type: ignore[no-untyped-def]
    """One seeded run of test_randomized_crash_runs_always_converge: the failure (seed and diff)
    or None, and where its kills landed."""
    import uuid

    seed = 1000 + run
    rng = random.Random(seed)
    # Replication lag and post-create delay shorter than the defaults (2 s): the same retries and
    # waits, at a pace that lets 20 runs finish in a minute.
    sim.reset()
    sim.config(replication_lag_ms=500)
    n_users = rng.randint(5, 30)
    flush_interval_ms = rng.choice([0, 50, 200])
    workload = [(rng.randint(1, n_users), rng.random() < 0.15, rng.choice(["a", "b", "c", None]))
                for _ in range(200)]
    # Per kill: after how many answered requests since that start, or how long after the first of
    # them (whichever comes first), and how long the bridge then stays down. A third of the runs
    # kill it again after the restart, while it re-delivers.
    plan = [(rng.randint(1, 2 * n_users), rng.uniform(0.0, 1.0), rng.uniform(0.0, 0.25))
            for _ in range(2 if rng.random() < 1 / 3 else 1)]
    kills: list[dict] = []
    name = f"crash_{uuid.uuid4().hex[:8]}"
    dsn = pg_cluster.create_database(name)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn, \
                psycopg.connect(pg_cluster.dsn("postgres"), autocommit=True) as admin:
            conn.execute(DDL)
            cfg = bridge_config(dsn, sim.base_url, MAPPING, delivery={"flush_interval_ms": flush_interval_ms},
                                source={"slot": name})  # slot names are per cluster
            cfg["onesignal"]["post_create_delay_s"] = 0.5
            b = bridge(cfg, name=f"run{run}")
            # `setup`'s own code, in process: a CLI process per run only added an interpreter
            # start-up (~1 s); `setup` as a command is tested on its own (test_check_and_setup).
            bridge_setup.apply(load_config(b.config_path), dsn)
            b.start()
            started_at, base, first_at = time.monotonic(), sim.stats()["total_requests"], None
            killed_at: float | None = None
            step, last_write_lsn = 0, None
            while step < len(workload) or plan or killed_at is not None:
                if step < len(workload):
                    uid, delete, plan_value = workload[step]
                    (last_write_lsn,) = conn.execute("SELECT pg_current_wal_lsn() - '0/0'").fetchone()
                    with conn.transaction():
                        if delete:
                            conn.execute("DELETE FROM users WHERE id = %s", (uid,))
                        else:
                            conn.execute(
                                "INSERT INTO users (id, plan, score) VALUES (%s, %s, %s) ON CONFLICT (id) DO UPDATE"
                                " SET plan = excluded.plan, score = excluded.score",
                                (uid, plan_value, step),
                            )
                    step += 1
                now = time.monotonic()
                if killed_at is not None:
                    if now - killed_at >= plan[0][2]:
                        plan.pop(0)
                        b.start()
                        started_at, base, first_at = now, sim.stats()["total_requests"], None
                        killed_at = None
                elif plan:
                    seen = sim.stats()["total_requests"] - base
                    if seen and first_at is None:
                        first_at = now
                    after, delay, _ = plan[0]
                    # (the last clause: a bridge that never delivers is killed all the same,
                    # and the kill counts as not mid-delivery)
                    if (seen >= after or (first_at is not None and now - first_at >= delay)
                            or now - started_at >= 3.0 + delay):
                        kills.append({"seed": seed, "kill": b.runs,
                                      **_kill_and_witness(b, admin, name, seen, last_write_lsn, step)})
                        killed_at = time.monotonic()
                time.sleep(CRASH_STEP_PAUSE_S if step < len(workload) else 0.01)
            rows = conn.execute("SELECT id, plan, score FROM users").fetchall()
        want = {str(i): ({"plan": p} if p is not None else {}) | {"score": str(s)} for i, p, s in rows}
        failure = None
        try:
            wait_until(
                lambda want=want: _tags(sim) == want, timeout=45, what=f"run {run} (seed {seed}) to converge"
            )
        except AssertionError:
            got = _tags(sim)
            diff = {k: (want.get(k), got.get(k)) for k in set(want) | set(got) if want.get(k) != got.get(k)}
            failure = f"seed {seed}: (want, got) differ for {diff}"
        # SIGKILL, not a graceful stop: the run is over, and a stop can wait out retries of deletes
        # of users OneSignal never saw (404s within the consistency window).
        b.kill()
        return failure, kills
    finally:
        pg_cluster.drop_database(name)


def test_randomized_crash_runs_always_converge(pg_cluster, sim, bridge):
    """Seeded random workloads; the bridge is SIGKILLed while it is delivering and restarted.

    The kill is chosen by delivery progress, not by step: once OneSignal has answered a random
    number of requests since this start, or a random delay after the first one, whichever comes
    first (with a fallback a few seconds after the start). A third of the runs kill it a second
    time after the restart, while it re-delivers. Each kill records where it landed (requests
    answered since the start; whether the slot was still short of the last write), and the
    campaign must land at least half of its kills mid-delivery (>= 1 request answered, the last
    write not confirmed): kills that only hit a bridge still starting up prove little."""
    from concurrent.futures import ThreadPoolExecutor
    from queue import Queue

    sims: Queue[Simulator] = Queue()
    sims.put(sim)
    extra = [Simulator() for _ in range(CRASH_WORKERS - 1)]
    for s in extra:
        sims.put(s)

    def one(run: int) -> tuple[str | None, list[dict]]:
        s = sims.get()
        try:
            return _crash_run(run, pg_cluster, s, bridge)
        finally:
            sims.put(s)

    try:
        with ThreadPoolExecutor(CRASH_WORKERS) as pool:
            results = list(pool.map(one, range(CRASH_RUNS)))
    finally:
        for s in extra:
            s.close()
    failures = [f for f, _ in results if f is not None]
    kills = [k for _, ks in results for k in ks]
    assert not failures, failures
    mid = [k for k in kills if k["mid_delivery"]]
    print(f"crash runs: {len(mid)}/{len(kills)} kills landed mid-delivery; " + "; ".join(
        f"seed {k['seed']} kill {k['kill']}: step {k['step']}, {k['requests']} req, "
        f"{'unconfirmed' if k['unconfirmed'] else 'confirmed'}" for k in kills))
    assert 2 * len(mid) >= len(kills), (
        f"only {len(mid)} of {len(kills)} kills landed mid-delivery (>= 1 request answered since the start and"
        f" the slot short of the last write): {kills}"
    )


def test_invalid_value_is_dead_lettered_and_replayed_after_fix(pg_db, sim, bridge):
    b = _start(pg_db, sim, bridge).start()
    pg_db.execute("INSERT INTO users (id, plan, tz) VALUES (1, 'pro', 'Mars/Olympus_Mons'), (2, 'free', 'UTC')")
    wait_until(lambda: sim.user("2"), what="the stream to keep flowing")
    wait_until(
        lambda: pg_db.fetch("SELECT count(*) FROM onesignal_bridge.dead_letters")[0][0] == 1, what="a dead letter"
    )
    table, key, field, reason, message = pg_db.fetch(
        "SELECT source_table, row_key, field, reason, message FROM onesignal_bridge.dead_letters"
    )[0]
    assert (table, key, field) == ("public.users", "id=1", "tz")
    assert "Mars/Olympus_Mons" in message and "time zone" in message
    u1 = wait_until(lambda: sim.user("1"), what="user 1's other fields")
    assert u1["properties"]["tags"]["plan"] == "pro"
    assert "timezone_id" not in u1["properties"]
    assert _metric(b, "onesignal_bridge_dead_letters_total") == 1

    listed = run_cli("dlq", "list", "--config", str(b.config_path), "--table", "public.users")
    assert listed.returncode == 0 and "Mars/Olympus_Mons" in listed.stdout
    b.stop()  # stopped, so that only the replay can apply the fixed row
    pg_db.execute("UPDATE users SET tz = 'Europe/Paris' WHERE id = 1")
    replay = run_cli("dlq", "replay", "--config", str(b.config_path))
    assert replay.returncode == 0, replay.stdout + replay.stderr
    assert sim.user("1")["properties"]["timezone_id"] == "Europe/Paris"
    (replayed,) = pg_db.fetch("SELECT count(*) FROM onesignal_bridge.dead_letters WHERE replayed_at IS NOT NULL")[0]
    assert replayed == 1


def test_backpressure_keeps_memory_bounded_and_the_slot_holds_the_backlog(pg_db, sim, bridge):
    budget_users = 2000
    b = _start(pg_db, sim, bridge, delivery={"max_pending_users": budget_users}).start()
    pg_db.execute("INSERT INTO users (id, plan) VALUES (0, 'warm')")
    wait_until(lambda: sim.user("0"), what="warm-up")
    (before,) = pg_db.fetch("SELECT confirmed_flush_lsn - '0/0' FROM pg_replication_slots")[0]
    sim.faults(error_rate=1.0, status=503)
    pg_db.execute("INSERT INTO users (id, plan) SELECT g, 'x' FROM generate_series(1, 100000) g")
    pg_db.execute("UPDATE users SET plan = 'y' WHERE id > 0")  # 200,000 changes in all
    wait_until(
        lambda: _metric(b, "onesignal_bridge_pending_users") >= budget_users * 0.95,
        timeout=60,
        what="the pending budget to fill",
    )
    peak = 0
    for _ in range(20):
        peak = max(peak, psutil.Process(b.proc.pid).memory_info().rss)
        assert _metric(b, "onesignal_bridge_pending_users") <= budget_users
        time.sleep(0.25)
    assert peak < 150 * 2**20, f"peak RSS {peak / 2**20:.0f} MiB"
    (after,) = pg_db.fetch("SELECT confirmed_flush_lsn - '0/0' FROM pg_replication_slots")[0]
    (current,) = pg_db.fetch("SELECT pg_current_wal_lsn() - '0/0'")[0]
    assert after < current, "the slot must keep the unconfirmed backlog"
    assert _metric(b, "onesignal_bridge_backpressure_waits_total") >= 1
    # SIGKILL, not the fixture's SIGTERM: OneSignal is still down with ~2,000 users pending, so a
    # graceful stop would only wait out delivery.shutdown_timeout_s (10 s) and abandon them anyway.
    b.kill()
