"""End to end: rows change in a real Postgres, the bridge streams them over logical replication,
and the OneSignal simulator (real HTTP) ends with the users the database implies."""

from __future__ import annotations

import random
import time
from pathlib import Path

import psycopg
import pytest
from bridgeproc import API_KEY, bridge_config, run_cli, wait_until

USERS_DDL = """
CREATE TABLE users (
    id bigint PRIMARY KEY, crm_id text, plan text, country text, created_at timestamptz,
    locale text, tz text, vip boolean, score numeric(6,2)
);
CREATE TABLE profiles (id bigint PRIMARY KEY, user_id bigint NOT NULL, nickname text, bio text, notes text);
ALTER TABLE profiles ALTER COLUMN bio SET STORAGE EXTERNAL;
ALTER TABLE profiles ALTER COLUMN notes SET STORAGE EXTERNAL;
ALTER TABLE profiles SET (toast_tuple_target = 128);
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
        "tags": {"nickname": "nickname", "bio": "bio"},
    },
]


def _insert_returning_lsn(pg_db, statement: str) -> int:  # type: ignore[no-untyped-def]
    """Run `statement` in a transaction; return the WAL position just before its commit record."""
    with psycopg.connect(pg_db.dsn) as conn:
        conn.execute(statement)  # type: ignore[arg-type]
        (lsn,) = conn.execute("SELECT pg_current_wal_insert_lsn() - '0/0'").fetchone()  # type: ignore[misc]
    return int(lsn)


def _prepare(pg_db, sim, bridge, metrics_port=0, **kw):  # type: ignore[no-untyped-def]
    pg_db.execute(USERS_DDL)
    cfg = bridge_config(pg_db.dsn, sim.base_url, MAPPINGS, **kw)
    cfg["metrics"]["port"] = metrics_port
    b = bridge(cfg)
    out = run_cli("setup", "--config", str(b.config_path))
    assert out.returncode == 0, out.stderr
    return b


def test_insert_update_delete_become_tags_properties_aliases_and_user_deletion(pg_db, sim, bridge):
    _prepare(pg_db, sim, bridge).start()
    pg_db.execute(
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

    pg_db.execute("UPDATE users SET plan = NULL, crm_id = NULL, country = 'ES' WHERE id = 1")
    wait_until(lambda: sim.user("1")["properties"]["tags"].get("country") == "ES", what="country ES")
    u1 = sim.user("1")
    assert "plan" not in u1["properties"]["tags"], "NULL must remove the tag"
    assert "crm_id" not in u1["identity"], "NULL must remove the alias"

    pg_db.execute("DELETE FROM users WHERE id = 2")
    wait_until(lambda: sim.user("2") is None, what="user 2 deleted")
    assert sim.user("1") is not None
    assert sim.stats()["rate_limited"] == 0


def test_unchanged_toast_column_keeps_its_tag(pg_db, sim, bridge):
    _prepare(pg_db, sim, bridge).start()
    rng = random.Random(7)
    # Within OneSignal's tag size (1024 bytes). Postgres moves values out of line only from a row
    # of about 2 kB (toast_tuple_target 128 then says how far): the unmapped notes make it one.
    bio = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(1000))
    notes = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(1500))
    pg_db.execute("INSERT INTO profiles (id, user_id, nickname, bio, notes) VALUES (1, 10, 'neo', %s, %s)", bio, notes)
    (toast,) = pg_db.fetch("SELECT reltoastrelid::regclass::text FROM pg_class WHERE oid = 'profiles'::regclass")[0]
    (chunks,) = pg_db.fetch(f"SELECT count(DISTINCT chunk_id) FROM {toast}")[0]
    assert chunks == 2, "bio and notes are not both out of line: the test would not see an unchanged TOAST bio"
    wait_until(lambda: (sim.user("10") or {}).get("properties", {}).get("tags", {}).get("bio") == bio, what="bio tag")
    pg_db.execute("UPDATE profiles SET nickname = 'trinity' WHERE id = 1")  # bio is unchanged TOAST
    wait_until(lambda: sim.user("10")["properties"]["tags"].get("nickname") == "trinity", what="nickname")
    assert sim.user("10")["properties"]["tags"]["bio"] == bio, "an unchanged TOAST column is neither NULL nor a change"


def test_change_not_accepted_by_onesignal_is_never_confirmed_to_the_slot(pg_db, sim, bridge):
    _prepare(pg_db, sim, bridge).start()
    pg_db.execute("INSERT INTO users (id, plan) VALUES (1, 'warmup')")
    wait_until(lambda: sim.user("1"), what="warm-up user")

    def confirmed() -> int:
        (lsn,) = pg_db.fetch(
            "SELECT confirmed_flush_lsn - '0/0' FROM pg_replication_slots WHERE slot_name = 'onesignal_bridge'"
        )[0]
        return int(lsn)

    sim.faults(error_rate=1.0, status=503)
    commit_lsn = _insert_returning_lsn(pg_db, "INSERT INTO users (id, plan) VALUES (2, 'outage')")
    wait_until(lambda: sim.stats()["by_status"].get("503", 0) >= 2, what="the bridge to try and fail")
    time.sleep(2.5)  # several status-update intervals while OneSignal refuses
    assert confirmed() <= commit_lsn, "a change OneSignal has not accepted was confirmed"
    sim.clear_faults()
    wait_until(lambda: sim.user("2"), what="user 2 after the outage")
    wait_until(lambda: confirmed() > commit_lsn, what="the slot to confirm once applied")


def test_bridge_killed_mid_stream_loses_no_change(pg_db, sim, bridge):
    b = _prepare(pg_db, sim, bridge).start()
    rng = random.Random(42)
    expected: dict[int, str] = {}
    with psycopg.connect(pg_db.dsn, autocommit=True) as conn:
        for i in range(1, 41):
            conn.execute("INSERT INTO users (id, plan) VALUES (%s, 'v0')", (i,))
            expected[i] = "v0"
        for step in range(1, 301):
            uid = rng.randint(1, 40)
            with conn.transaction():
                conn.execute("UPDATE users SET plan = %s WHERE id = %s", (f"v{step}", uid))
            expected[uid] = f"v{step}"
            if step == 120:
                b.kill()
            if step == 200:
                b.start()

    def converged() -> bool:
        users = sim.by_external_id()
        return all(
            users.get(str(i), {}).get("properties", {}).get("tags", {}).get("plan") == v for i, v in expected.items()
        )

    wait_until(converged, timeout=60, what="every user at its last value after SIGKILL and restart")
    assert b.runs == 2


def test_sigterm_confirms_what_was_applied_and_exits_zero(pg_db, sim, bridge):
    b = _prepare(pg_db, sim, bridge).start()
    lsn = _insert_returning_lsn(pg_db, "INSERT INTO users (id, plan) VALUES (1, 'a')")
    wait_until(lambda: sim.user("1"), what="user 1")
    assert b.terminate(30) == 0
    (confirmed,) = pg_db.fetch(
        "SELECT confirmed_flush_lsn - '0/0' FROM pg_replication_slots WHERE slot_name = 'onesignal_bridge'"
    )[0]
    assert confirmed > lsn, "the applied change's commit was not confirmed at shutdown"


def test_api_key_never_appears_in_logs_even_at_debug(pg_db, sim, bridge):
    wrong_key = "os_v2_app_wrongwrongwrong0123456789secret"
    b = _prepare(pg_db, sim, bridge, api_key=wrong_key)
    b.log_level = "debug"
    b.start()
    pg_db.execute("INSERT INTO users (id, plan) VALUES (1, 'a')")
    wait_until(lambda: "rejects" in b.logs() or "403" in b.logs(), what="the bridge to report the rejected key")
    b.stop()
    logs = b.logs()
    assert "403" in logs, "OneSignal (and the strict simulator) answer a wrong key with 403"
    assert wrong_key not in logs
    out = run_cli("check", "--config", str(b.config_path))
    assert out.returncode != 0
    assert "rejects the API key" in out.stdout
    assert wrong_key not in out.stdout + out.stderr
    assert API_KEY not in out.stdout + out.stderr


def test_bridge_reconnects_after_the_replication_connection_drops(pg_db, sim, bridge):
    b = _prepare(pg_db, sim, bridge).start()
    pg_db.execute("INSERT INTO users (id, plan) VALUES (1, 'before')")
    wait_until(lambda: sim.user("1"), what="user 1")
    pg_db.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE active_pid IS NOT NULL")
    pg_db.execute("UPDATE users SET plan = 'after' WHERE id = 1")
    pg_db.execute("INSERT INTO users (id, plan) VALUES (2, 'after')")
    wait_until(
        lambda: (sim.user("2") or {}).get("properties", {}).get("tags", {}).get("plan") == "after",
        timeout=30,
        what="changes after the connection dropped",
    )
    wait_until(lambda: sim.user("1")["properties"]["tags"]["plan"] == "after", what="user 1's update")
    assert "reconnecting" in b.logs()
    assert b.alive()


def test_least_privilege_role_from_sql_runs_the_bridge(pg_db, sim, bridge):
    pg_db.execute(USERS_DDL)
    script = (Path(__file__).resolve().parent.parent / "sql" / "role-postgres-source.sql").read_text()
    pg_db.execute(script.replace("public.users, public.orders", "public.users, public.profiles"))
    role_dsn = pg_db.dsn.replace("postgresql://postgres@", "postgresql://onesignal_bridge:change-me@")
    # the tables' owner creates the publication and replica identity (setup as the owner)
    owner_cfg = bridge_config(pg_db.dsn, sim.base_url, MAPPINGS)
    owner = bridge(owner_cfg, name="owner")
    assert run_cli("setup", "--config", str(owner.config_path)).returncode == 0
    pg_db.execute("SELECT pg_drop_replication_slot('onesignal_bridge')")  # the role makes its own
    cfg = bridge_config(role_dsn, sim.base_url, MAPPINGS, source={"snapshot": "initial"})
    b = bridge(cfg, name="role")
    check = run_cli("check", "--config", str(b.config_path))
    assert "[FAIL]" not in check.stdout, check.stdout
    b.start()
    pg_db.execute("INSERT INTO users (id, plan) VALUES (7, 'least-privilege')")
    wait_until(lambda: sim.user("7"), timeout=30, what="the role to stream")
    (superuser,) = pg_db.fetch("SELECT rolsuper FROM pg_roles WHERE rolname = 'onesignal_bridge'")[0]
    assert superuser is False


@pytest.mark.parametrize("foreign_backfill", [False, True], ids=["plain", "with-another-bridges-backfill"])
def test_a_backlog_is_applied_while_it_is_read_and_metrics_answer_meanwhile(pg_db, sim, bridge, foreign_backfill):
    """Catching up a backlog (a bridge started after a burst, or back from an outage) must not
    take the event loop for the whole backlog: OneSignal gets a user's state while the rest is
    still being read (not only after the last change), and `/metrics` (like `/healthz`, which
    Kubernetes probes) answers during the catch-up. Not timed: the first request must carry an
    intermediate value, and a scrape must see a change count strictly between 0 and the total.
    The same holds when the stream also carries another bridge's backfill watermarks (one per
    transaction here): handling one must not give the reader a fresh share of the loop."""
    import threading

    import httpx
    from bridgeproc import free_port

    port = free_port()
    b = _prepare(pg_db, sim, bridge, metrics_port=port)
    users, rounds = 20, 6_000  # 120,000 updates, one transaction per round
    pg_db.execute("INSERT INTO users (id, plan) SELECT g, 'v0' FROM generate_series(1, %s) g", users)
    pg_db.execute(f"""
        DO $$ BEGIN FOR i IN 1..{rounds} LOOP
            UPDATE users SET plan = 'v' || i;
            {"PERFORM pg_logical_emit_message(true, 'onesignal_bridge_backfill', 'low:elsewhere-' || i);"
             if foreign_backfill else ""}
            COMMIT;
        END LOOP; END $$""")
    total = users + users * rounds

    seen: list[float] = []
    done = threading.Event()

    def scrape() -> None:
        while not done.is_set():
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
            except httpx.HTTPError:
                time.sleep(0.02)
                continue
            seen.append(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                            if line.startswith("onesignal_bridge_changes_total{")))
            time.sleep(0.02)

    scraper = threading.Thread(target=scrape, daemon=True)
    scraper.start()
    b.start()
    try:
        final = f"v{rounds}"
        wait_until(lambda: all((sim.user(str(u)) or {}).get("properties", {}).get("tags", {}).get("plan") == final
                               for u in range(1, users + 1)), timeout=240, what="every user at the last value")
    finally:
        done.set()
        scraper.join(35)
    # Read whole before anything was sent, each user would need exactly one request (a create
    # carrying the last value); sent while reading, the last value needs another one.
    per_user = [sum(1 for r in sim.requests() if r.get("user") == str(u)) for u in range(1, users + 1)]
    assert min(per_user) >= 2, f"requests per user {per_user}: nothing was sent until the backlog was read"
    midway = [n for n in seen if 0 < n < total]
    assert midway, f"/metrics never answered while the backlog was read (scrapes saw {sorted(set(seen))[:5]}...)"
    assert sim.stats()["rate_limited"] == 0
