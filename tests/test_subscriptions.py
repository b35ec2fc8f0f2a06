"""Email and SMS subscriptions follow the database (real Postgres, bridge process, simulator)."""

from __future__ import annotations

import psycopg
from bridgeproc import bridge_config, run_cli, wait_until

DDL = "CREATE TABLE users (id bigint PRIMARY KEY, email text, phone text, marketing_opt_in boolean, plan text);"
MAPPING = [{
    "table": "public.users", "identity": {"external_id": "id"}, "tags": {"plan": "plan"},
    "subscriptions": {"email": {"column": "email", "enabled": "marketing_opt_in"}, "sms": "phone"},
    "on_delete": "delete_user",
}]


def _start(pg_db, sim, bridge, mapping=None):  # type: ignore[no-untyped-def]
    pg_db.execute(DDL)
    b = bridge(bridge_config(pg_db.dsn, sim.base_url, mapping or MAPPING))
    assert run_cli("setup", "--config", str(b.config_path)).returncode == 0
    return b.start()


def _subs(sim, uid: str):  # type: ignore[no-untyped-def]
    u = sim.user(uid)
    if u is None:
        return None
    return {(s["type"], s["token"], s.get("enabled", True)) for s in u.get("subscriptions", [])}


def _expect(sim, uid, want, what):  # type: ignore[no-untyped-def]
    wait_until(lambda: _subs(sim, uid) == want, timeout=20, what=what)


def test_subscriptions_follow_address_changes_opt_out_and_deletion(pg_db, sim, bridge):
    _start(pg_db, sim, bridge)
    pg_db.execute("INSERT INTO users VALUES (1, 'ada@example.com', '+12125550199', true, 'pro')")
    _expect(sim, "1", {("Email", "ada@example.com", True), ("SMS", "+12125550199", True)}, "email and SMS")
    pg_db.execute("UPDATE users SET email = 'ada@work.example.com' WHERE id = 1")
    _expect(sim, "1", {("Email", "ada@work.example.com", True), ("SMS", "+12125550199", True)}, "first email change")
    pg_db.execute("UPDATE users SET email = 'ada@home.example.com' WHERE id = 1")
    _expect(sim, "1", {("Email", "ada@home.example.com", True), ("SMS", "+12125550199", True)}, "second email change")
    pg_db.execute("UPDATE users SET phone = NULL WHERE id = 1")
    _expect(sim, "1", {("Email", "ada@home.example.com", True)}, "phone removed")
    pg_db.execute("UPDATE users SET marketing_opt_in = false WHERE id = 1")
    _expect(sim, "1", {("Email", "ada@home.example.com", False)}, "consent revoked")
    pg_db.execute("UPDATE users SET marketing_opt_in = true WHERE id = 1")
    _expect(sim, "1", {("Email", "ada@home.example.com", True)}, "consent restored")
    pg_db.execute("DELETE FROM users WHERE id = 1")
    wait_until(lambda: sim.user("1") is None, what="user deleted")
    assert not any(s for u in sim.users() for s in u.get("subscriptions", [])), "no subscription left behind"
    assert sim.stats()["rate_limited"] == 0


def test_disable_mode_keeps_the_old_address_unsubscribed(pg_db, sim, bridge):
    mapping = [dict(MAPPING[0], on_address_change="disable")]
    _start(pg_db, sim, bridge, mapping)
    pg_db.execute("INSERT INTO users VALUES (1, 'old@example.com', NULL, true, 'pro')")
    _expect(sim, "1", {("Email", "old@example.com", True)}, "email")
    pg_db.execute("UPDATE users SET email = 'new@example.com' WHERE id = 1")
    _expect(sim, "1", {("Email", "old@example.com", False), ("Email", "new@example.com", True)}, "old disabled")


def test_two_users_swapping_email_addresses_in_one_transaction_converge(pg_db, sim, bridge):
    _start(pg_db, sim, bridge)
    pg_db.execute(
        "INSERT INTO users VALUES (1, 'a@example.com', NULL, true, 'x'), (2, 'b@example.com', NULL, true, 'y')"
    )
    _expect(sim, "1", {("Email", "a@example.com", True)}, "user 1 email")
    _expect(sim, "2", {("Email", "b@example.com", True)}, "user 2 email")
    with psycopg.connect(pg_db.dsn) as conn:
        conn.execute("UPDATE users SET email = 'tmp' WHERE id = 1")
        conn.execute("UPDATE users SET email = 'a@example.com' WHERE id = 2")
        conn.execute("UPDATE users SET email = 'b@example.com' WHERE id = 1")
    _expect(sim, "1", {("Email", "b@example.com", True)}, "user 1 has b")
    _expect(sim, "2", {("Email", "a@example.com", True)}, "user 2 has a")


def test_phone_numbers_normalized_and_invalid_ones_dead_lettered_while_tags_sync(pg_db, sim, bridge):
    _start(pg_db, sim, bridge)
    pg_db.execute(
        "INSERT INTO users VALUES (1, NULL, '(212) 555-0199', true, 'a'), (2, NULL, 'not-a-phone', true, 'b'),"
        " (3, NULL, '+1 555 010 0199', true, 'c')"
    )
    _expect(sim, "1", {("SMS", "+12125550199", True)}, "normalized phone")
    wait_until(lambda: (sim.user("2") or {}).get("properties", {}).get("tags") == {"plan": "b"}, what="user 2 tags")
    wait_until(lambda: (sim.user("3") or {}).get("properties", {}).get("tags") == {"plan": "c"}, what="user 3 tags")
    assert _subs(sim, "2") == set() and _subs(sim, "3") == set()
    letters = wait_until(
        lambda: (
            pg_db.fetch("SELECT row_key, field, message FROM onesignal_bridge.dead_letters ORDER BY row_key")
            if len(pg_db.fetch("SELECT 1 FROM onesignal_bridge.dead_letters")) == 2
            else None
        ),
        what="two dead letters",
    )
    assert [(k, f) for k, f, _ in letters] == [("id=2", "phone"), ("id=3", "phone")]
    assert "not-a-phone" in letters[0][2] and "+1 555 010 0199" in letters[1][2]


def test_restart_between_address_change_and_its_application_leaves_no_stale_subscription(pg_db, sim, bridge):
    b = _start(pg_db, sim, bridge)
    pg_db.execute("INSERT INTO users VALUES (1, 'first@example.com', NULL, true, 'a')")
    _expect(sim, "1", {("Email", "first@example.com", True)}, "first email")
    b.kill()
    pg_db.execute("UPDATE users SET email = 'second@example.com' WHERE id = 1")
    b.start()
    _expect(sim, "1", {("Email", "second@example.com", True)}, "only the new address after restart")
