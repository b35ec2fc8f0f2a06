"""`source.kind: outbox` end to end: triggers capture changes into onesignal_bridge.outbox in a real
Postgres with wal_level=replica (no logical decoding), the bridge drains it, and the OneSignal
simulator (real HTTP) ends with the users the database implies."""

from __future__ import annotations

import datetime as dt
import random
import re
import time
import uuid
from decimal import Decimal

import httpx
import psycopg
import pytest
from bridgeproc import ROOT, bridge_config, run_cli, wait_until
from pgcluster import PgDb

from bridge.sources.outbox import COLUMNS_SQL
from bridge.sources.outbox_kind import OUTBOX_SQL
from bridge.sources.outbox_values import TableDecoder, parse_row
from bridge.sources.pgtypes import converter_for

ROLE = "onesignal_bridge_outbox"

USERS_DDL = """
CREATE TABLE users (
    id bigint PRIMARY KEY, crm_id text, plan text, country text, created_at timestamptz,
    locale text, tz text, vip boolean, score numeric(6,2), notes text
);
CREATE TABLE profiles (id bigint PRIMARY KEY, user_id bigint NOT NULL, nickname text);
"""

MAPPINGS = [
    {
        "table": "public.users",
        "identity": {"external_id": "id"},
        "aliases": {"crm_id": "crm_id"},
        "tags": {"plan": "plan", "country": "country", "signup_at": "created_at", "vip": "vip", "score": "score"},
        "properties": {"language": "locale", "timezone_id": "tz"},
        "on_delete": "delete_user",
    },
    {
        "table": "public.profiles",
        "identity": {"external_id": "user_id"},
        "tags": {"nickname": "nickname"},
    },
]


@pytest.fixture
def odb(pg_cluster_replica):  # type: ignore[no-untyped-def]
    """A fresh database in the wal_level=replica cluster."""
    name = f"ob_{uuid.uuid4().hex[:8]}"
    dsn = pg_cluster_replica.create_database(name)
    try:
        yield PgDb(name=name, dsn=dsn, cluster=pg_cluster_replica)
    finally:
        pg_cluster_replica.drop_database(name)


def _config(dsn: str, sim_url: str, mappings=MAPPINGS, **source):  # type: ignore[no-untyped-def]
    cfg = bridge_config(dsn, sim_url, mappings)
    cfg["source"] = {"kind": "outbox", "dsn": dsn, "poll_interval_ms": 500, "metrics_interval_s": 0.5, **source}
    return cfg


def _prepare(db, sim, bridge, ddl=USERS_DDL, mappings=MAPPINGS, name="bridge", **source):  # type: ignore[no-untyped-def]
    if ddl:
        db.execute(ddl)
    b = bridge(_config(db.dsn, sim.base_url, mappings, **source), name=name)
    out = run_cli("setup", "--config", str(b.config_path))
    assert out.returncode == 0, out.stderr
    return b


def _depth(db) -> int:  # type: ignore[no-untyped-def]
    return db.fetch("SELECT count(*) FROM onesignal_bridge.outbox")[0][0]


def _tags(sim, uid: str) -> dict:  # type: ignore[no-untyped-def]
    return ((sim.user(uid) or {}).get("properties") or {}).get("tags") or {}


def _metrics(b) -> dict[str, float]:  # type: ignore[no-untyped-def]
    port = int(re.findall(r"metrics and health on [\d.]+:(\d+)", b.logs())[-1])
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    out = {}
    for line in text.splitlines():
        if line.startswith("onesignal_bridge_outbox"):
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out


# -- database side, no bridge -------------------------------------------------------------------


def test_sql_file_is_what_setup_applies():
    assert (ROOT / "sql" / "outbox.sql").read_text() == OUTBOX_SQL


def test_trigger_captures_mapped_columns_null_vs_missing_and_truncate(odb, sim, bridge):
    _prepare(odb, sim, bridge)
    odb.execute("INSERT INTO users (id, plan, notes) VALUES (1, 'pro', 'not mapped')")
    odb.execute("UPDATE users SET notes = 'still not mapped' WHERE id = 1")  # no captured column changes
    odb.execute("UPDATE users SET plan = NULL WHERE id = 1")
    odb.execute("DELETE FROM users WHERE id = 1")
    odb.execute("TRUNCATE profiles")
    rows = odb.fetch(
        "SELECT op, table_name, new_row, old_row, txid IS NOT NULL FROM onesignal_bridge.outbox ORDER BY id"
    )
    assert [(r[0], r[1]) for r in rows] == [
        ("I", "public.users"),
        ("U", "public.users"),
        ("D", "public.users"),
        ("T", "public.profiles"),
    ]
    captured = {"id", "crm_id", "plan", "country", "created_at", "locale", "tz", "vip", "score"}
    assert set(rows[0][2]) == captured, "only the mapped columns and the primary key"
    assert rows[1][2]["plan"] is None and "plan" in rows[1][2], "NULL is a key with null"
    assert rows[1][3]["plan"] == "pro"
    assert rows[2][2] is None and rows[2][3]["id"] == 1
    assert all(r[4] for r in rows)


def test_writers_notify_once_per_transaction_and_only_while_the_bridge_waits(odb, sim, bridge):
    _prepare(odb, sim, bridge)  # not started: the flag is what a bridge would set
    with psycopg.connect(odb.dsn, autocommit=True) as listener, odb.connect() as writer:
        listener.execute("LISTEN onesignal_bridge_outbox")
        writer.execute("INSERT INTO users (id, plan) SELECT g, 'a' FROM generate_series(1, 100) g")
        assert list(listener.notifies(timeout=0.5)) == [], "a busy bridge needs no notification"
        writer.execute("UPDATE onesignal_bridge.wakeup SET waiting = true")
        writer.execute("UPDATE users SET plan = 'b'")  # 100 rows, one transaction
        with writer.transaction():
            writer.execute("UPDATE users SET plan = 'c' WHERE id = 1")
            writer.execute("UPDATE users SET plan = 'd' WHERE id = 2")
        assert len(list(listener.notifies(timeout=0.5))) == 2


def test_values_equal_what_the_postgres_source_produces(odb):
    """jsonb written in an odd session (TimeZone, DateStyle) decodes to the same Python values as
    the text form that pgoutput sends, through the same converters."""
    odb.execute(OUTBOX_SQL)
    odb.execute("""
        CREATE TABLE typed (id int PRIMARY KEY, i2 int2, i8 int8, n numeric(6,2), nbig numeric, f4 float4,
          f8 float8, fnan float8, b bool, t text, vc varchar(10), u uuid, d date, ts timestamp,
          tstz timestamptz, tinf timestamptz, j jsonb, js json, ai int[], at text[], atz timestamptz[],
          an numeric[], nul text);
        SELECT onesignal_bridge.install_trigger('typed');
    """)
    with odb.connect() as conn:
        conn.execute("SET TimeZone = 'Asia/Kolkata'")
        conn.execute("SET DateStyle = 'SQL, DMY'")
        conn.execute("""INSERT INTO typed VALUES (1, -7, 9007199254740993, 12.50, 12345678901234567890123.456,
            0.1, 1.5e300, 'NaN', true, 'tëxt "q"', 'vc', 'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11', '2024-02-29',
            '2024-01-02 03:04:05.123456', '2024-01-02 03:04:05+00', 'infinity',
            '{"a": 1.50, "b": [1, 2, 12345678901234567890], "c": null, "d": "x"}', '{"k": [true, 0.5]}',
            '{1,NULL,3}', '{"a b",NULL,"c,d"}', '{"2024-01-01 00:00:00+00"}', '{1.10,2}', NULL)""")
        text = conn.execute("SELECT new_row::text FROM onesignal_bridge.outbox").fetchone()[0]
        cols = [(r[0], r[1], r[2]) for r in conn.execute(COLUMNS_SQL, ("public", "typed")).fetchall()]
        conn.execute("SET TimeZone = 'UTC'")
        conn.execute("SET DateStyle = 'ISO'")
        names = [c[0] for c in cols]
        texts = conn.execute("SELECT " + ", ".join(f"{n}::text" for n in names) + " FROM typed").fetchone()
        oids = dict(
            conn.execute(
                "SELECT attname, atttypid::int FROM pg_attribute WHERE attrelid = 'typed'::regclass AND attnum > 0"
            ).fetchall()
        )
    got = TableDecoder("public.typed", cols, ["id"]).row(parse_row(text))
    assert got is not None
    for name, t in zip(names, texts, strict=True):
        want = None if t is None else converter_for(oids[name])(t)
        if name == "fnan":
            assert got[name] != got[name] and want != want
            continue
        assert got[name] == want and type(got[name]) is type(want), f"{name}: {got[name]!r} != {want!r}"
    assert got["n"] == Decimal("12.50") and str(got["n"]) == "12.50"
    assert got["tstz"] == dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    assert got["nul"] is None and "nul" in got


# -- end to end ------------------------------------------------------------------------------------


def test_inserts_updates_deletes_and_truncate_converge(odb, sim, bridge):
    b = _prepare(odb, sim, bridge).start()
    odb.execute(
        "INSERT INTO users VALUES"
        " (1, 'crm-1', 'pro', 'FR', '2024-01-02 03:04:05+00', 'fr-FR', 'Europe/Paris', true, 12.50),"
        " (2, 'crm-2', 'free', 'DE', NULL, NULL, NULL, false, NULL)"
    )
    u1 = wait_until(lambda: sim.user("1"), what="user 1 in OneSignal")
    assert u1["identity"]["crm_id"] == "crm-1"
    assert u1["properties"]["tags"] == {
        "plan": "pro",
        "country": "FR",
        "signup_at": "1704164645",
        "vip": "true",
        "score": "12.50",
    }
    assert u1["properties"]["language"] == "fr"
    assert u1["properties"]["timezone_id"] == "Europe/Paris"
    wait_until(lambda: sim.user("2"), what="user 2")

    odb.execute("UPDATE users SET plan = NULL, crm_id = NULL, country = 'ES' WHERE id = 1")
    wait_until(lambda: _tags(sim, "1").get("country") == "ES", what="country ES")
    u1 = sim.user("1")
    assert "plan" not in u1["properties"]["tags"], "NULL must remove the tag"
    assert "crm_id" not in u1["identity"], "NULL must remove the alias"

    odb.execute("DELETE FROM users WHERE id = 2")
    wait_until(lambda: sim.user("2") is None, what="user 2 deleted")

    odb.execute("INSERT INTO profiles VALUES (1, 10, 'neo')")
    wait_until(lambda: _tags(sim, "10").get("nickname") == "neo", what="nickname neo")
    odb.execute("TRUNCATE profiles")
    odb.execute("INSERT INTO profiles VALUES (1, 11, 'trinity')")
    wait_until(lambda: _tags(sim, "11").get("nickname") == "trinity", what="a row inserted after TRUNCATE")
    assert _tags(sim, "10").get("nickname") == "neo", "TRUNCATE leaves users as they are (on_truncate: ignore)"
    wait_until(lambda: _depth(odb) == 0, what="the outbox to be emptied once applied")
    assert "TRUNCATE of public.profiles" in b.logs()
    assert sim.stats()["rate_limited"] == 0
    assert b.terminate(30) == 0


def test_lost_notification_and_dropped_connections_only_delay(odb, sim, bridge):
    b = _prepare(odb, sim, bridge).start()
    odb.execute("INSERT INTO users (id, plan) VALUES (1, 'a')")
    wait_until(lambda: _tags(sim, "1").get("plan") == "a", what="user 1")
    wait_until(lambda: odb.fetch("SELECT waiting FROM onesignal_bridge.wakeup")[0][0], what="the bridge to wait")
    odb.execute("UPDATE onesignal_bridge.wakeup SET waiting = false")  # the notification gets lost
    odb.execute("INSERT INTO users (id, plan) VALUES (2, 'b')")
    wait_until(lambda: _tags(sim, "2").get("plan") == "b", timeout=5, what="user 2 by polling")

    killed = odb.fetch(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )[0][0]
    assert killed >= 2
    odb.execute("INSERT INTO users (id, plan) VALUES (3, 'c')")
    wait_until(lambda: _tags(sim, "3").get("plan") == "c", timeout=15, what="user 3 after reconnecting")
    assert "outbox connection lost" in b.logs()
    wait_until(lambda: _depth(odb) == 0, what="outbox emptied")
    assert b.terminate(30) == 0


def test_bulk_update_of_50000_rows_converges_with_one_notification(odb, sim, bridge):
    odb.execute(
        "CREATE TABLE devices (id bigint PRIMARY KEY, user_id bigint NOT NULL, model text);"
        "INSERT INTO devices SELECT g, g % 400, 'a' FROM generate_series(1, 50000) g"
    )  # before setup
    mappings = [{"table": "public.devices", "identity": {"external_id": "user_id"}, "tags": {"model": "model"}}]
    b = _prepare(odb, sim, bridge, ddl=None, mappings=mappings, batch_size=5000, max_unconfirmed_rows=50_000).start()
    wait_until(
        lambda: odb.fetch("SELECT waiting FROM onesignal_bridge.wakeup")[0][0],
        what="the idle bridge to ask for a notification",
    )

    with psycopg.connect(odb.dsn, autocommit=True) as listener, odb.connect() as writer:
        listener.execute("LISTEN onesignal_bridge_outbox")
        n = writer.execute("UPDATE devices SET model = 'b-' || user_id").rowcount
        assert n == 50_000
        got = list(listener.notifies(timeout=1.0))
    assert len(got) == 1, f"{len(got)} notifications for one bulk statement"

    def converged() -> bool:
        users = sim.by_external_id()
        return len(users) == 400 and all(
            (u.get("properties") or {}).get("tags", {}).get("model") == f"b-{uid}" for uid, u in users.items()
        )

    wait_until(converged, timeout=90, interval=0.5, what="every user at model b-<id>")
    wait_until(lambda: _depth(odb) == 0, timeout=30, what="the outbox emptied")
    assert b.alive()


def test_sigkill_mid_batch_loses_nothing_and_never_deletes_before_applied(odb, sim, bridge):
    b = _prepare(odb, sim, bridge, batch_size=50, takeover_wait_s=0).start()  # restarts send at once
    odb.execute("INSERT INTO users (id, plan) SELECT g, 'v0' FROM generate_series(1, 40) g")
    wait_until(lambda: len(sim.users()) == 40, what="40 users")
    wait_until(lambda: _depth(odb) == 0, what="outbox emptied")

    # OneSignal refuses everything: claimed rows must stay in the outbox.
    sim.faults(error_rate=1.0, status=503)
    odb.execute("UPDATE users SET plan = 'outage' WHERE id <= 20")
    wait_until(lambda: sim.stats()["by_status"].get("503", 0) >= 3, what="the bridge to try and fail")
    time.sleep(1.5)
    assert _depth(odb) == 20, "a row was deleted from the outbox before OneSignal accepted it"
    metrics = wait_until(
        lambda: (mt := _metrics(b)).get("onesignal_bridge_outbox_depth") == 20 and mt, what="outbox depth metric"
    )
    assert metrics["onesignal_bridge_outbox_oldest_age_seconds"] > 0.5
    b.kill()  # mid-batch: claimed, nothing applied
    assert _depth(odb) == 20
    sim.clear_faults()
    b.start()
    wait_until(
        lambda: all(_tags(sim, str(i)).get("plan") == "outage" for i in range(1, 21)),
        timeout=30,
        what="the outage's changes after restart",
    )

    # Kill while batches are in flight (slow OneSignal), keep writing, restart.
    sim.faults(latency_ms=150)
    rng = random.Random(42)
    written: list[tuple[int, int]] = []  # (user, step) in commit order
    with psycopg.connect(odb.dsn, autocommit=True) as conn:
        for step in range(1, 301):
            uid = rng.randint(1, 40)
            conn.execute("UPDATE users SET plan = %s WHERE id = %s", (f"v{step}", uid))
            written.append((uid, step))
            if step == 60:
                wait_until(lambda: _depth(odb) == 0, what="the first 60 applied and deleted")
            if step == 120:
                b.kill()
                # Every row no longer in the outbox was applied: the user is at that step or later.
                left = {
                    (int(u), int(p[1:]))
                    for u, p in odb.fetch(
                        "SELECT new_row->>'id', new_row->>'plan' FROM onesignal_bridge.outbox WHERE op = 'U'"
                        " AND new_row->>'plan' LIKE 'v%'"
                    )
                }
                users = sim.by_external_id()
                applied = 0
                for u, s in written:
                    if (u, s) in left:
                        continue
                    applied += 1
                    plan = users[str(u)]["properties"]["tags"]["plan"]
                    have = int(plan[1:]) if re.fullmatch(r"v\d+", plan) else -1
                    assert have >= s, f"outbox row of user {u} step {s} deleted, OneSignal has {plan}"
                assert applied > 0 and left, "the kill should land with rows both applied and unconfirmed"
            if step == 200:
                sim.clear_faults()
                b.start()
    final = {u: s for u, s in written}

    def converged() -> bool:
        users = sim.by_external_id()
        return all(users[str(u)]["properties"]["tags"].get("plan") == f"v{s}" for u, s in final.items())

    wait_until(converged, timeout=60, what="every user at its last value after SIGKILL and restart")
    wait_until(lambda: _depth(odb) == 0, what="outbox emptied")
    assert b.runs == 3


def test_two_replicas_hold_per_user_order(odb, sim, bridge):
    first = _prepare(odb, sim, bridge, name="a", batch_size=20).start()
    wait_until(lambda: "as the leader" in first.logs(), what="replica a to lead")
    second = bridge(_config(odb.dsn, sim.base_url, batch_size=20), name="b").start()
    wait_until(lambda: "hot standby" in second.logs(), what="replica b to wait as a hot standby")
    odb.execute("INSERT INTO users (id, plan) SELECT g, 'v0' FROM generate_series(1, 30) g")
    rng = random.Random(7)
    with psycopg.connect(odb.dsn, autocommit=True) as conn:
        for step in range(1, 401):
            with conn.transaction():  # some transactions touch one user twice, or several users
                for _ in range(rng.choice((1, 1, 2, 3))):
                    conn.execute(
                        "UPDATE users SET plan = %s WHERE id = %s", (f"v{step}-{rng.random():.6f}", rng.randint(1, 30))
                    )
            time.sleep(0.005)  # spread the writes over the failover
            if step == 150:
                sim.faults(latency_ms=100)
            if step == 200:
                first.kill()  # the leader dies with claimed rows in flight; b takes over
            if step == 260:
                sim.clear_faults()
                first.start()  # comes back as the standby
    want = dict(odb.fetch("SELECT id::text, plan FROM users"))

    def converged() -> bool:
        users = sim.by_external_id()
        return all(users.get(u, {}).get("properties", {}).get("tags", {}).get("plan") == p for u, p in want.items())

    wait_until(converged, timeout=60, what="every user at its last value with two replicas")
    wait_until(lambda: _depth(odb) == 0, what="outbox emptied")
    assert "taking over" in second.logs()
    assert "hot standby" in first.logs().split("==== start #2 ====")[1], "the restarted replica waits behind b"
    assert first.alive() and second.alive()


def test_least_privilege_role_runs_the_bridge_and_check_names_what_is_missing(odb, sim, bridge):
    cluster = odb.cluster
    odb.execute(USERS_DDL)
    try:
        with odb.connect() as admin:
            admin.execute((ROOT / "sql" / "role-outbox.sql").read_text())
            role = admin.execute("SELECT rolsuper, rolreplication FROM pg_roles WHERE rolname = %s", (ROLE,)).fetchone()
            assert role == (False, False)
            b = bridge(_config(cluster.dsn(odb.name, user=ROLE), sim.base_url))
            out = run_cli("setup", "--config", str(b.config_path), "--print-sql")
            assert out.returncode == 0, out.stderr
            admin.execute(out.stdout)  # the DBA runs it as the tables' owner
        with psycopg.connect(cluster.dsn(odb.name, user=ROLE), autocommit=True) as as_role:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                as_role.execute("SELECT 1 FROM users")  # no privilege on the application's tables

        out = run_cli("check", "--config", str(b.config_path))
        assert "FAIL" not in out.stdout, out.stdout
        assert out.returncode == 0, out.stdout + out.stderr

        b.start()
        odb.execute("INSERT INTO users (id, plan, tz) VALUES (1, 'pro', 'Europe/Paris'), (2, 'free', 'Mars/Olympus')")
        wait_until(
            lambda: _tags(sim, "1").get("plan") == "pro" and _tags(sim, "2").get("plan") == "free",
            what="users written by the least-privilege bridge",
        )
        wait_until(
            lambda: odb.fetch("SELECT count(*) FROM onesignal_bridge.dead_letters")[0][0] == 1,
            what="the bad time zone dead-lettered by the role",
        )
        odb.execute("DELETE FROM users WHERE id = 1")
        wait_until(lambda: sim.user("1") is None, what="user 1 deleted")
        wait_until(lambda: _depth(odb) == 0, what="the role deletes applied rows")
        assert b.terminate(30) == 0

        odb.execute(f"REVOKE DELETE ON onesignal_bridge.outbox FROM {ROLE}")
        odb.execute(f"REVOKE USAGE ON SCHEMA onesignal_bridge FROM {ROLE}")
        odb.execute("ALTER TABLE profiles DISABLE TRIGGER onesignal_bridge_capture")
        out = run_cli("check", "--config", str(b.config_path))
        assert out.returncode == 1
        fails = [line for line in out.stdout.splitlines() if "FAIL" in line]
        assert len(fails) == 3, out.stdout
        assert f"role {ROLE} lacks DELETE on onesignal_bridge.outbox" in out.stdout
        assert f"fix: GRANT DELETE ON onesignal_bridge.outbox TO {ROLE};" in out.stdout
        assert f"role {ROLE} lacks USAGE on schema onesignal_bridge" in out.stdout
        assert f"fix: GRANT USAGE ON SCHEMA onesignal_bridge TO {ROLE};" in out.stdout
        assert "trigger onesignal_bridge_capture is disabled" in out.stdout
        assert "fix: ALTER TABLE public.profiles ENABLE TRIGGER onesignal_bridge_capture;" in out.stdout

        b.start()  # the bridge itself stops with the pointer to check, instead of retrying forever
        assert b.proc is not None and b.proc.wait(30) != 0
        assert "`onesignal-bridge check --config FILE` prints the GRANT" in b.logs()
    finally:
        cluster.drop_database(odb.name)  # its grants go with it; then the role can go
        cluster.execute(f"DROP ROLE IF EXISTS {ROLE}")


def test_teardown_removes_triggers_and_outbox_and_check_says_so(odb, sim, bridge):
    b = _prepare(odb, sim, bridge)
    printed = run_cli("teardown", "--config", str(b.config_path), "--print-sql")
    assert printed.returncode == 0 and "DROP TABLE IF EXISTS onesignal_bridge.outbox" in printed.stdout
    assert odb.fetch("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'onesignal_bridge_%'")[0][0] == 4
    out = run_cli("teardown", "--config", str(b.config_path))
    assert out.returncode == 0, out.stderr
    assert odb.fetch("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'onesignal_bridge_%'")[0][0] == 0
    assert odb.fetch("SELECT to_regclass('onesignal_bridge.outbox')")[0][0] is None
    assert odb.fetch("SELECT to_regclass('onesignal_bridge.dead_letters')")[0][0] is not None
    odb.execute("INSERT INTO users (id, plan) VALUES (1, 'pro')")  # the application is unaffected
    check = run_cli("check", "--config", str(b.config_path))
    assert check.returncode == 1
    assert "outbox table onesignal_bridge.outbox is missing" in check.stdout
    assert "table public.users: trigger onesignal_bridge_capture (INSERT, UPDATE and DELETE) is missing" in check.stdout
    # and setup brings it all back
    assert run_cli("setup", "--config", str(b.config_path)).returncode == 0
    assert odb.fetch("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'onesignal_bridge_%'")[0][0] == 4


def test_bridge_without_setup_exits_with_the_fix(odb, sim, bridge):
    odb.execute(USERS_DDL)
    b = bridge(_config(odb.dsn, sim.base_url)).start()
    assert b.proc is not None
    assert b.proc.wait(30) != 0
    assert "run `onesignal-bridge setup --config FILE`" in b.logs()


def test_backfill_writes_the_selected_rows_into_the_outbox_and_they_converge(odb, sim, bridge):
    b = _prepare(odb, sim, bridge)
    odb.execute("ALTER TABLE users DISABLE TRIGGER USER")  # rows that predate the bridge
    odb.execute("INSERT INTO users (id, plan) SELECT g, 'existing' FROM generate_series(1, 300) g")
    odb.execute("ALTER TABLE users ENABLE TRIGGER USER")
    b.start()
    out = run_cli(
        "backfill",
        "--config",
        str(b.config_path),
        "--table",
        "public.users",
        "--where",
        "id % 3 = 0",
        "--chunk-size",
        "40",
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "100 rows" in out.stdout
    wait_until(lambda: len(sim.users()) == 100, timeout=60, what="the 100 matching users")
    assert {u["identity"]["external_id"] for u in sim.users()} == {str(i) for i in range(3, 301, 3)}
    assert all(u["properties"]["tags"]["plan"] == "existing" for u in sim.users())
