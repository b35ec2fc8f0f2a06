"""Operating the bridge: hot standby, metrics moving, lag back to zero, heartbeats, JSON logs."""

from __future__ import annotations

import json
import time

import httpx
import psycopg
from bridgeproc import bridge_config, free_port, run_cli, wait_until

DDL = "CREATE TABLE users (id bigint PRIMARY KEY, plan text); CREATE TABLE noise (id serial PRIMARY KEY, v text);"
MAPPING = [{"table": "public.users", "identity": {"external_id": "id"}, "tags": {"plan": "plan"}}]


def _config(pg_db, sim, **source):  # type: ignore[no-untyped-def]
    cfg = bridge_config(pg_db.dsn, sim.base_url, MAPPING, source=source or None)
    cfg["metrics"]["port"] = free_port()
    return cfg


def _metrics(cfg) -> dict[str, float]:  # type: ignore[no-untyped-def]
    try:
        text = httpx.get(f"http://127.0.0.1:{cfg['metrics']['port']}/metrics", timeout=5).text
    except httpx.ConnectError:
        return {}  # not listening yet
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name = line.split("{")[0].split(" ")[0]
            out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def _setup(pg_db, b) -> None:  # type: ignore[no-untyped-def]
    out = run_cli("setup", "--config", str(b.config_path))
    assert out.returncode == 0, out.stderr


def test_hot_standby_takes_over_within_fifteen_seconds_without_losing_a_change(pg_db, sim, bridge):
    pg_db.execute(DDL)
    leader = bridge(_config(pg_db, sim, takeover_wait_s=None), name="leader")  # the default wait
    standby_cfg = _config(pg_db, sim, takeover_wait_s=None)
    standby = bridge(standby_cfg, name="standby")
    _setup(pg_db, leader)
    leader.start()
    pg_db.execute("INSERT INTO users VALUES (1, 'a')")
    wait_until(lambda: sim.user("1"), what="the leader to stream")
    standby.start()
    wait_until(lambda: "hot standby" in standby.logs(), what="the second replica to wait as a standby")
    ready = httpx.get(f"http://127.0.0.1:{standby_cfg['metrics']['port']}/readyz").json()
    assert "standby" in ready["reason"]

    leader.kill()
    killed_at = time.monotonic()
    with psycopg.connect(pg_db.dsn, autocommit=True) as conn:
        for i in range(2, 52):
            conn.execute("INSERT INTO users VALUES (%s, 'after-failover')", (i,))
    wait_until(lambda: len(sim.users()) == 51, timeout=30, what="every change after the failover")
    assert "taking over" in standby.logs()
    took_over = time.monotonic() - killed_at
    assert took_over < 15 + 5, f"standby needed {took_over:.1f}s"
    assert all(
        u["properties"]["tags"]["plan"] == "after-failover" for u in sim.users() if u["identity"]["external_id"] != "1"
    )


def test_metrics_move_during_a_stream_and_lag_returns_to_zero(pg_db, sim, bridge):
    pg_db.execute(DDL)
    cfg = _config(pg_db, sim)
    b = bridge(cfg)
    _setup(pg_db, b)
    b.start()
    wait_until(lambda: _metrics(cfg).get("onesignal_bridge_ready") == 1.0, what="ready")
    before = _metrics(cfg)
    with psycopg.connect(pg_db.dsn, autocommit=True) as conn:
        for i in range(1, 101):
            conn.execute("INSERT INTO users VALUES (%s, 'x')", (i,))
    wait_until(lambda: len(sim.users()) == 100, what="100 users")
    wait_until(lambda: _metrics(cfg).get("onesignal_bridge_source_lag_seconds", 1) == 0.0, what="lag back to zero")
    after = _metrics(cfg)
    assert after["onesignal_bridge_changes_total"] - before.get("onesignal_bridge_changes_total", 0) == 100
    assert after["onesignal_bridge_api_requests_total"] >= 100
    assert after["onesignal_bridge_end_to_end_latency_seconds_count"] >= 100
    assert after["onesignal_bridge_up"] == 1.0
    wait_until(
        lambda: _metrics(cfg).get("onesignal_bridge_replication_slot_lag_bytes", -1) >= 0, what="slot lag metric"
    )


def test_heartbeats_let_the_slot_advance_while_only_unmapped_tables_change(pg_db, sim, bridge):
    pg_db.execute(DDL)
    cfg = _config(pg_db, sim, heartbeat_interval_s=0.5)
    b = bridge(cfg)
    _setup(pg_db, b)
    b.start()
    pg_db.execute("INSERT INTO users VALUES (1, 'a')")
    wait_until(lambda: sim.user("1"), what="user 1")

    def confirmed() -> int:
        return int(pg_db.fetch("SELECT confirmed_flush_lsn - '0/0' FROM pg_replication_slots")[0][0])

    start = confirmed()
    for _ in range(5):
        pg_db.execute("INSERT INTO noise (v) SELECT repeat('x', 100) FROM generate_series(1, 2000)")
    (busy_lsn,) = pg_db.fetch("SELECT pg_current_wal_lsn() - '0/0'")[0]
    wait_until(lambda: confirmed() >= busy_lsn, timeout=45, what="the slot to move past unrelated WAL")
    assert confirmed() > start


def test_json_logs_are_one_object_per_line_without_secrets(pg_db, sim, bridge):
    pg_db.execute(DDL)
    cfg = _config(pg_db, sim)
    b = bridge(cfg)
    _setup(pg_db, b)
    b.extra_args = ["--log-format", "json"]
    b.start()
    pg_db.execute("INSERT INTO users VALUES (1, 'a')")
    wait_until(lambda: sim.user("1"), what="user 1")
    b.stop()
    lines = [ln for ln in b.logs().splitlines() if ln.startswith("{")]
    assert lines, b.logs()
    for ln in lines:
        obj = json.loads(ln)
        assert {"ts", "level", "logger", "msg"} <= obj.keys()
    assert cfg["onesignal"]["api_key"] not in b.logs()
