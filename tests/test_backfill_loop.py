"""Issue 12, defect 1: a backfill runs once per request and then stays quiet, across restarts;
a `--where` cannot escape the parentheses it is run in.

Everything goes through the real CLI and processes: a private Postgres, the simulator, and
`onesignal-bridge run` streaming from slot and publication `onesignal_bridge`.
"""

from __future__ import annotations

import time

import pytest
import yaml
from bridgeproc import bridge_config, run_cli, wait_until

from bridge import schema

DDL = "CREATE TABLE users (id bigint PRIMARY KEY, plan text);"
MAPPING = [{"table": "public.users", "identity": {"external_id": "id"}, "tags": {"plan": "plan"}}]
STARTED = "backfill #1 of public.users"
# An idle cluster still logs a little WAL (the background writer's running-transactions record,
# about every 15 s after activity). The loop of issue 12 wrote ~400 KB per 10 s; one extra
# backfill run of five rows writes several KB.
IDLE_WAL_BYTES = 1024


def _streaming_bridge(pg_db, sim, bridge, rows: list[tuple[int, str]]):  # type: ignore[no-untyped-def]
    pg_db.execute(DDL)
    with pg_db.connect() as conn:
        conn.cursor().executemany("INSERT INTO users (id, plan) VALUES (%s, %s)", rows)
    # snapshot: never, flush_interval_ms: 100, no heartbeats: an idle bridge writes nothing
    cfg = bridge_config(pg_db.dsn, sim.base_url, MAPPING)
    assert "heartbeat_interval_s" not in cfg["source"]
    b = bridge(cfg)
    out = run_cli("setup", "--config", str(b.config_path))
    assert out.returncode == 0, out.stdout + out.stderr
    b.start()
    wait_until(lambda: "streaming from slot" in b.logs(), what="the bridge to stream")
    return b


def _wal(pg_db) -> int:  # type: ignore[no-untyped-def]
    return int(pg_db.fetch("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")[0][0])


def _requests(pg_db) -> list[tuple]:  # type: ignore[no-untyped-def]
    return pg_db.fetch("SELECT id, status, rows_sent, message FROM onesignal_bridge.backfill_requests"
                       " ORDER BY id")


def _assert_quiet(pg_db, sim, b, seconds: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    """Neither WAL nor OneSignal requests grow while nothing happens in the database."""
    wal0, sent0 = _wal(pg_db), sim.stats()["total_requests"]
    samples = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(1.0)
        samples.append((_wal(pg_db) - wal0, sim.stats()["total_requests"] - sent0))
    assert b.alive(), b.logs()
    wal_growth, sent = samples[-1]
    assert sent == 0, f"OneSignal requests while idle (WAL bytes, requests; each s): {samples}"
    assert wal_growth <= IDLE_WAL_BYTES, f"WAL written while idle (WAL bytes, requests; each s): {samples}"


def _sends_per_user(sim) -> dict[str, int]:  # type: ignore[no-untyped-def]
    out: dict[str, int] = {}
    for r in sim.requests():
        path = r["path"]
        if "/users/by/external_id/" in path or r["method"] == "POST" and path.endswith("/users"):
            out[str(r.get("user"))] = out.get(str(r.get("user")), 0) + 1
    return out


def test_a_finished_backfill_leaves_the_bridge_idle_and_a_restart_does_not_run_it_again(pg_db, sim, bridge):
    b = _streaming_bridge(pg_db, sim, bridge, [(i, "old") for i in range(1, 6)])

    out = run_cli("backfill", "--config", str(b.config_path), "--table", "public.users", timeout=90)
    assert out.returncode == 0, out.stdout + out.stderr
    wait_until(lambda: len(sim.users()) == 5, timeout=30, what="the five users")
    wait_until(lambda: [r[1:3] for r in _requests(pg_db)] == [("done", 5)], what="the request to be done")
    time.sleep(1.0)  # the last flush interval

    _assert_quiet(pg_db, sim, b)
    assert b.logs().count(STARTED + " started") == 1, b.logs()

    assert b.terminate() == 0
    b.start()
    wait_until(lambda: b.logs().count("streaming from slot") == 2, what="the restarted bridge to stream")
    time.sleep(1.0)

    _assert_quiet(pg_db, sim, b)
    assert b.logs().count(STARTED + " started") == 1, b.logs()
    assert [r[1:3] for r in _requests(pg_db)] == [("done", 5)]


def test_an_interrupted_backfill_resumes_once_when_the_bridge_starts_again(pg_db, sim, bridge):
    b = _streaming_bridge(pg_db, sim, bridge, [(i, "old") for i in range(1, 21)])
    b.terminate()
    # A request the bridge had claimed ('running', 5 rows done) when it stopped.
    pg_db.execute("INSERT INTO onesignal_bridge.backfill_requests"
                  " (table_name, chunk_size, status, last_key, rows_sent)"
                  " VALUES ('public.users', 5, 'running', '[5]', 5)")
    b.start()
    wait_until(lambda: [r[1:3] for r in _requests(pg_db)] == [("done", 20)], timeout=30,
               what="the interrupted request to finish")
    wait_until(lambda: len(sim.users()) == 15, timeout=30, what="the 15 users after the saved key")
    assert sorted(int(k) for k in sim.by_external_id()) == list(range(6, 21))
    time.sleep(1.0)
    _assert_quiet(pg_db, sim, b)
    assert b.logs().count(STARTED + " resumed") == 1, b.logs()


def test_an_unbalanced_where_is_refused_by_the_cli_and_nothing_is_sent(pg_db, sim, bridge):
    b = _streaming_bridge(pg_db, sim, bridge, [(1, "pro"), (2, "free"), (3, "free")])

    out = run_cli("backfill", "--config", str(b.config_path), "--table", "public.users",
                  "--where", "plan = 'pro') OR (true")
    assert out.returncode != 0
    err = out.stderr.strip()
    assert "Traceback" not in out.stdout + out.stderr
    assert len(err.splitlines()) == 1, err
    assert "--where" in err and "parenthes" in err, err
    assert _requests(pg_db) == [], "a refused where records no request"

    # Written around the CLI, straight into the table: the bridge refuses it as well.
    pg_db.execute("INSERT INTO onesignal_bridge.backfill_requests (table_name, where_sql)"
                  " VALUES ('public.users', 'plan = ''pro'') OR (true')")
    wait_until(lambda: [r[1] for r in _requests(pg_db)] == ["failed"],
               what="the bridge to refuse the request")
    assert "parenthes" in _requests(pg_db)[0][3]
    time.sleep(1.0)
    assert sim.stats()["total_requests"] == 0
    assert sim.users() == []


@pytest.mark.parametrize(("where", "problem"), [
    ("plan = 'pro') OR (true", "unbalanced parentheses"),
    ("(plan = 'pro'", "unbalanced parentheses"),
    ("true; DELETE FROM users", "';'"),
    ("plan = 'pro' -- and the rest", "comment"),
    ("plan = 'pro /* unterminated", "unterminated"),
    # Postgres continues an E'' literal on the next line, backslash escapes included: not a way out
    ("plan = E'a'\n'\\' ( ' ) OR (true) OR (' ) '", "unbalanced parentheses"),
    ("id > $1", "parameter"),
    ("nosuchcolumn = 1", "nosuchcolumn"),
    ("plan", "boolean"),
    ("  ", "empty"),
])
def test_a_where_that_is_not_one_boolean_expression_is_refused_with_a_one_line_reason(pg_db, tmp_path, where,
                                                                                    problem):
    pg_db.execute(DDL)
    with pg_db.connect() as conn:
        schema.migrate(conn)
    path = tmp_path / "bridge.yaml"
    path.write_text(yaml.safe_dump(bridge_config(pg_db.dsn, "http://127.0.0.1:9", MAPPING)))
    out = run_cli("backfill", "--config", str(path), "--table", "public.users", "--where", where, "--no-wait")
    assert out.returncode == 2, out.stdout + out.stderr
    err = out.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("backfill: --where") and problem in err, err
    assert _requests(pg_db) == []


def test_a_where_with_parentheses_inside_string_literals_sends_exactly_the_matching_rows_once(pg_db, sim,
                                                                                              bridge):
    rows = [(1, "pro"), (2, "a)b"), (3, "free"), (4, "a"), (5, "(pro"), (6, "pro"), (7, ") OR (true")]
    b = _streaming_bridge(pg_db, sim, bridge, rows)

    out = run_cli("backfill", "--config", str(b.config_path), "--table", "public.users",
                  "--where", "(plan = 'pro' OR plan = 'a)b') AND \"plan\" <> E'\\')' AND plan NOT LIKE '%(%'",
                  "--chunk-size", "2", timeout=90)
    assert out.returncode == 0, out.stdout + out.stderr
    wait_until(lambda: [r[1:3] for r in _requests(pg_db)] == [("done", 3)], what="the request to be done")
    wait_until(lambda: len(sim.users()) == 3, timeout=30, what="the three matching users")
    time.sleep(1.0)
    assert {k: u["properties"]["tags"]["plan"] for k, u in sim.by_external_id().items()} == {
        "1": "pro", "2": "a)b", "6": "pro"}
    sends = _sends_per_user(sim)
    assert sorted(sends.values()) == [1, 1, 1], sim.requests()
    _assert_quiet(pg_db, sim, b, seconds=3.0)
    assert b.logs().count(STARTED + " where") == 1, b.logs()
