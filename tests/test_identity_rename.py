"""Identity changes keep the OneSignal user: rename, never delete (issue 15).

Real Postgres, the bridge as a process, the strict simulator. The app's SDK adds a push
subscription to the user (as `login(external_id)` does); then the row's identity changes.
"""

from __future__ import annotations

import json
import os
import random
import time
import uuid
from typing import Any

import psycopg
import pytest
from bridgeproc import API_KEY, APP_ID, bridge_config, run_cli, wait_until
from pgcluster import PgDb

AUTH = {"Authorization": f"Key {API_KEY}"}
DDL = "CREATE TABLE users (id text PRIMARY KEY, member_uuid text UNIQUE, crm_id text, plan text);"
BY_ID = {"table": "public.users", "identity": {"external_id": "id"}, "aliases": {"crm_id": "crm_id"},
         "tags": {"plan": "plan"}, "on_delete": "delete_user"}
BY_UUID = {"table": "public.users", "identity": {"external_id": "member_uuid"}, "aliases": {"crm_id": "crm_id"},
           "tags": {"plan": "plan"}, "on_identity_change": "rename"}  # unique, not the primary key


def _start(pg_db, sim, bridge, mapping: dict[str, Any], **kw: Any):  # type: ignore[no-untyped-def]
    pg_db.execute(DDL)
    b = bridge(bridge_config(pg_db.dsn, sim.base_url, [mapping], **kw))
    assert run_cli("setup", "--config", str(b.config_path)).returncode == 0
    return b.start()


def _app_logs_in(sim, external_id: str, token: str) -> None:  # type: ignore[no-untyped-def]
    """What the app's SDK does: a push subscription on the user (retried through replication lag)."""
    path = f"/apps/{APP_ID}/users/by/external_id/{external_id}/subscriptions"
    body = {"subscription": {"type": "iOSPush", "token": token, "enabled": True}}
    wait_until(lambda: sim.http.post(path, json=body, headers=AUTH).status_code in (200, 201, 202),
               timeout=20, what="the app's push subscription")


def _push_tokens(user: dict[str, Any] | None) -> set[str]:
    return {s["token"] for s in (user or {}).get("subscriptions", []) if s["type"] == "iOSPush"}


def _no_deletes(sim) -> None:  # type: ignore[no-untyped-def]
    deletes = [r for r in sim.requests() if r["method"] == "DELETE" and r["endpoint"].endswith("{alias_id}")]
    assert not deletes, deletes


def _synced(sim, external_id: str, **tags: str) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    def ok() -> bool:
        u = sim.user(external_id)
        return u is not None and all(u["properties"].get("tags", {}).get(k) == v for k, v in tags.items())
    wait_until(ok, timeout=30, what=f"user {external_id} with {tags}")
    u = sim.user(external_id)
    assert u is not None
    return u


def test_primary_key_change_renames_the_user_keeping_onesignal_id_push_subscription_and_aliases(pg_db, sim, bridge):
    _start(pg_db, sim, bridge, BY_ID)
    pg_db.execute("INSERT INTO users VALUES ('old1', NULL, 'crm-1', 'free')")
    before = _synced(sim, "old1", plan="free")
    _app_logs_in(sim, "old1", "push-token-1")
    with psycopg.connect(pg_db.dsn) as conn:  # one transaction: the key and another column change
        conn.execute("UPDATE users SET id = 'new1' WHERE id = 'old1'")
        conn.execute("UPDATE users SET plan = 'pro' WHERE id = 'new1'")
    after = _synced(sim, "new1", plan="pro")
    assert after["identity"]["onesignal_id"] == before["identity"]["onesignal_id"]
    assert after["identity"]["crm_id"] == "crm-1"
    assert _push_tokens(after) == {"push-token-1"}
    assert sim.user("old1") is None
    assert len(sim.users()) == 1
    _no_deletes(sim)


def test_identity_column_that_is_not_the_key_renames_the_user(pg_db, sim, bridge):
    _start(pg_db, sim, bridge, BY_UUID)
    full = pg_db.fetch("SELECT relreplident FROM pg_class WHERE oid = 'public.users'::regclass")
    assert full == [("f",)], "setup sets REPLICA IDENTITY FULL where the identity is not the primary key"
    pg_db.execute("INSERT INTO users VALUES ('1', 'uuid-a', 'crm-1', 'free')")
    before = _synced(sim, "uuid-a", plan="free")
    _app_logs_in(sim, "uuid-a", "push-token-a")
    pg_db.execute("UPDATE users SET member_uuid = 'uuid-b', plan = 'pro', crm_id = 'crm-2' WHERE id = '1'")
    after = _synced(sim, "uuid-b", plan="pro")
    assert after["identity"]["onesignal_id"] == before["identity"]["onesignal_id"]
    assert after["identity"]["crm_id"] == "crm-2", "a mapped alias whose value changes is updated in place"
    assert _push_tokens(after) == {"push-token-a"}
    assert len(sim.users()) == 1
    _no_deletes(sim)


def test_a_chain_of_renames_in_one_flush_window_and_a_rename_back_keep_one_user(pg_db, sim, bridge):
    _start(pg_db, sim, bridge, BY_ID, delivery={"flush_interval_ms": 1500})
    pg_db.execute("INSERT INTO users VALUES ('a', NULL, NULL, 'free')")
    first = _synced(sim, "a", plan="free")
    _app_logs_in(sim, "a", "push-a")
    with psycopg.connect(pg_db.dsn) as conn:
        conn.execute("UPDATE users SET id = 'b', plan = 'mid' WHERE id = 'a'")
        conn.commit()
        conn.execute("UPDATE users SET id = 'c', plan = 'pro' WHERE id = 'b'")
    u = _synced(sim, "c", plan="pro")
    assert u["identity"]["onesignal_id"] == first["identity"]["onesignal_id"]
    assert _push_tokens(u) == {"push-a"}
    pg_db.execute("UPDATE users SET id = 'd' WHERE id = 'c'")
    _synced(sim, "d")
    pg_db.execute("UPDATE users SET id = 'c', plan = 'back' WHERE id = 'd'")
    u = _synced(sim, "c", plan="back")
    assert u["identity"]["onesignal_id"] == first["identity"]["onesignal_id"]
    assert _push_tokens(u) == {"push-a"}
    assert len(sim.users()) == 1
    _no_deletes(sim)


def test_a_new_row_taking_a_renamed_rows_old_id_becomes_a_new_user(pg_db, sim, bridge):
    """The row `a` becomes `b` and a new row takes `a` in the same breath: OneSignal's user (with the
    app's push subscription) is renamed to `b`, and `a` is a new user of its own. Sent together, the
    new `a` would have landed on the old user before the rename moved it away."""
    _start(pg_db, sim, bridge, BY_ID)
    pg_db.execute("INSERT INTO users VALUES ('a', NULL, NULL, 'old')")
    first = _synced(sim, "a", plan="old")
    _app_logs_in(sim, "a", "push-a")
    with psycopg.connect(pg_db.dsn) as conn:
        conn.execute("UPDATE users SET id = 'b', plan = 'renamed' WHERE id = 'a'")
        conn.execute("INSERT INTO users VALUES ('a', NULL, NULL, 'fresh')")
    renamed = _synced(sim, "b", plan="renamed")
    fresh = _synced(sim, "a", plan="fresh")
    assert renamed["identity"]["onesignal_id"] == first["identity"]["onesignal_id"]
    assert _push_tokens(renamed) == {"push-a"} and _push_tokens(fresh) == set()
    assert fresh["identity"]["onesignal_id"] != first["identity"]["onesignal_id"]
    assert len(sim.users()) == 2
    _no_deletes(sim)


def test_two_rows_swapping_their_ids_swap_their_users(pg_db, sim, bridge):
    """a -> t, b -> a, t -> b in one transaction (a swap through a temporary id): each user keeps
    its push subscription under the other id; no conflict, nothing dead-lettered, nothing deleted."""
    _start(pg_db, sim, bridge, BY_ID)
    pg_db.execute("INSERT INTO users VALUES ('a', NULL, NULL, 'was-a'), ('b', NULL, NULL, 'was-b')")
    _synced(sim, "a", plan="was-a")
    _synced(sim, "b", plan="was-b")
    _app_logs_in(sim, "a", "push-a")
    _app_logs_in(sim, "b", "push-b")
    with psycopg.connect(pg_db.dsn) as conn:
        conn.execute("UPDATE users SET id = 't' WHERE id = 'a'")
        conn.execute("UPDATE users SET id = 'a' WHERE id = 'b'")
        conn.execute("UPDATE users SET id = 'b' WHERE id = 't'")
    wait_until(lambda: _push_tokens(sim.user("a")) == {"push-b"} and _push_tokens(sim.user("b")) == {"push-a"},
               timeout=30, what="the swapped users")
    assert sim.user("t") is None and len(sim.users()) == 2
    assert pg_db.fetch("SELECT count(*) FROM onesignal_bridge.dead_letters") == [(0,)]
    _no_deletes(sim)


def test_a_rename_onto_an_identity_another_user_holds_is_dead_lettered_naming_both(pg_db, sim, bridge):
    b = _start(pg_db, sim, bridge, BY_UUID)
    pg_db.execute("INSERT INTO users VALUES ('1', 'ann', NULL, 'free'), ('2', 'bob', NULL, 'free')")
    _synced(sim, "ann", plan="free")
    _synced(sim, "bob", plan="free")
    pg_db.execute("DELETE FROM users WHERE id = '2'")  # on_delete ignore: OneSignal's bob stays
    pg_db.execute("UPDATE users SET member_uuid = 'bob', plan = 'pro' WHERE id = '1'")
    wait_until(lambda: pg_db.fetch("SELECT count(*) FROM onesignal_bridge.dead_letters")[0][0] >= 1,
               timeout=30, what="dead letter")
    (message,) = pg_db.fetch("SELECT message FROM onesignal_bridge.dead_letters")[0]
    assert "external_id=ann" in message and "external_id=bob" in message, message
    assert sim.user("ann") is not None and sim.user("bob")["properties"]["tags"]["plan"] == "free"
    assert len(sim.users()) == 2
    assert b.alive()


def _ann_and_bob_with_push_subscriptions_merging_on_conflict(pg_db, sim, bridge) -> None:  # type: ignore[no-untyped-def]
    """Two rows synced (identity member_uuid 'ann' and 'bob'), each user with the app's push
    subscription, and a bridge that merges on an identity conflict."""
    _start(pg_db, sim, bridge, dict(BY_UUID, on_identity_conflict="merge"))
    pg_db.execute("INSERT INTO users VALUES ('1', 'ann', NULL, 'free'), ('2', 'bob', NULL, 'free')")
    _synced(sim, "ann", plan="free")
    _synced(sim, "bob", plan="free")
    _app_logs_in(sim, "ann", "push-ann")
    _app_logs_in(sim, "bob", "push-bob")


def test_merge_on_identity_conflict_leaves_one_user_with_both_users_subscriptions(pg_db, sim, bridge):
    _ann_and_bob_with_push_subscriptions_merging_on_conflict(pg_db, sim, bridge)
    pg_db.execute("DELETE FROM users WHERE id = '2'")
    pg_db.execute("UPDATE users SET member_uuid = 'bob', plan = 'pro' WHERE id = '1'")
    u = _synced(sim, "bob", plan="pro")
    wait_until(lambda: len(sim.users()) == 1, timeout=30, what="one user left")
    u = sim.user("bob")
    assert _push_tokens(u) == {"push-ann", "push-bob"}


def test_merge_that_cannot_move_a_subscription_keeps_the_old_user_and_dead_letters_the_change(
        pg_db, sim, bridge):
    """`on_identity_conflict: merge` deletes the old user only once every subscription moved: a
    transfer OneSignal refuses (here 409 to every transfer) keeps the old user with what is still
    on it, and the change is dead-lettered naming both users."""
    _ann_and_bob_with_push_subscriptions_merging_on_conflict(pg_db, sim, bridge)
    sim.faults(error_rate=1.0, status=409, paths="/owner$")
    pg_db.execute("DELETE FROM users WHERE id = '2'")
    pg_db.execute("UPDATE users SET member_uuid = 'bob', plan = 'pro' WHERE id = '1'")
    wait_until(lambda: pg_db.fetch("SELECT reason, message FROM onesignal_bridge.dead_letters"),
               timeout=30, what="the dead letter")
    ((reason, message),) = pg_db.fetch("SELECT reason, message FROM onesignal_bridge.dead_letters")
    assert reason == "identity_conflict" and "could not move" in message and "ann" in message, message
    sim.clear_faults()
    assert _push_tokens(sim.user("ann")) == {"push-ann"}, "the old user (and its push subscription) is kept"
    assert _push_tokens(sim.user("bob")) == {"push-bob"}
    _no_deletes(sim)


CRASH_RUNS = int(os.environ.get("RENAME_CRASH_RUNS", "3"))


@pytest.mark.parametrize("seed", range(CRASH_RUNS))
def test_sigkill_around_a_rename_ends_with_exactly_one_user_per_row(pg_db, sim, bridge, seed):
    rng = random.Random(seed)
    pg_db.execute(DDL)
    b = bridge(bridge_config(pg_db.dsn, sim.base_url, [BY_ID]))
    assert run_cli("setup", "--config", str(b.config_path)).returncode == 0
    b.start()
    rows = [f"u{i}" for i in range(4)]
    pg_db.execute("INSERT INTO users VALUES " + ",".join(f"('{r}', NULL, NULL, 'free')" for r in rows))
    for r in rows:
        _synced(sim, r, plan="free")
    ids = {r: sim.user(r)["identity"]["onesignal_id"] for r in rows}
    for r in rows:
        pg_db.execute(f"UPDATE users SET id = '{r}-x', plan = 'pro' WHERE id = '{r}'")
    time.sleep(rng.uniform(0.05, 0.6))
    b.kill()
    b.start()
    for r in rows:
        u = _synced(sim, f"{r}-x", plan="pro")
        assert u["identity"]["onesignal_id"] == ids[r]
    assert sorted(u["identity"].get("external_id") for u in sim.users()) == sorted(f"{r}-x" for r in rows)
    _no_deletes(sim)


# -- outbox (triggers capture the old row) --------------------------------------------------------


@pytest.fixture
def odb(pg_cluster_replica):  # type: ignore[no-untyped-def]
    name = f"rn_{uuid.uuid4().hex[:8]}"
    dsn = pg_cluster_replica.create_database(name)
    try:
        yield PgDb(name=name, dsn=dsn, cluster=pg_cluster_replica)
    finally:
        pg_cluster_replica.drop_database(name)


@pytest.mark.parametrize(("mapping", "rename_sql", "old", "new"), [
    (BY_ID, "UPDATE users SET id = 'new1', plan = 'pro' WHERE id = 'old1'", "old1", "new1"),
    (BY_UUID, "UPDATE users SET member_uuid = 'uuid-b', plan = 'pro' WHERE id = 'old1'", "uuid-a", "uuid-b"),
], ids=["primary_key", "identity_column"])
def test_outbox_identity_change_renames_the_user_keeping_its_push_subscription(
        odb, sim, bridge, mapping, rename_sql, old, new):  # type: ignore[no-untyped-def]
    odb.execute(DDL)
    cfg = bridge_config(odb.dsn, sim.base_url, [mapping])
    cfg["source"] = {"kind": "outbox", "dsn": odb.dsn, "poll_interval_ms": 200}
    b = bridge(cfg)
    out = run_cli("setup", "--config", str(b.config_path))
    assert out.returncode == 0, out.stderr
    b.start()
    odb.execute("INSERT INTO users VALUES ('old1', 'uuid-a', 'crm-1', 'free')")
    before = _synced(sim, old, plan="free")
    _app_logs_in(sim, old, "push-outbox")
    odb.execute(rename_sql)
    after = _synced(sim, new, plan="pro")
    assert after["identity"]["onesignal_id"] == before["identity"]["onesignal_id"]
    assert after["identity"]["crm_id"] == "crm-1"
    assert _push_tokens(after) == {"push-outbox"}
    assert len(sim.users()) == 1
    _no_deletes(sim)


def test_an_order_moved_to_another_user_never_renames_the_first_user(
        odb, sim, bridge):  # type: ignore[no-untyped-def]
    """orders.user_id is many-to-one: the outbox carries the old row, yet a changed user_id is a row
    moving between users, not a person changing identity (on_identity_change: auto)."""
    odb.execute("CREATE TABLE orders (id bigint PRIMARY KEY, user_id text NOT NULL, total numeric)")
    orders = {"table": "public.orders", "identity": {"external_id": "user_id"}, "tags": {"last_total": "total"}}
    cfg = bridge_config(odb.dsn, sim.base_url, [orders])
    cfg["source"] = {"kind": "outbox", "dsn": odb.dsn, "poll_interval_ms": 200}
    b = bridge(cfg)
    assert run_cli("setup", "--config", str(b.config_path)).returncode == 0
    b.start()
    odb.execute("INSERT INTO orders VALUES (1, 'ann', 10), (2, 'ann', 20)")
    ann = _synced(sim, "ann", last_total="20")
    odb.execute("UPDATE orders SET user_id = 'bob', total = 30 WHERE id = 1")
    _synced(sim, "bob", last_total="30")
    after = sim.user("ann")
    assert after is not None and after["identity"]["onesignal_id"] == ann["identity"]["onesignal_id"], \
        "ann keeps her user: an order changing hands is not a rename"
    assert not [r for r in sim.requests() if r["endpoint"].endswith("/identity") and r["method"] == "PATCH"]
    _no_deletes(sim)


# -- Kafka (Debezium key changes) -----------------------------------------------------------------


def _kafka_config(kafka_broker, sim, topic: str) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    from bridgeproc import free_port

    return {
        "onesignal": {"app_id": APP_ID, "api_key": API_KEY, "base_url": sim.base_url},
        "source": {"kind": "kafka", "bootstrap_servers": kafka_broker.bootstrap,
                   "group_id": f"g-{uuid.uuid4().hex[:8]}", "topics": [topic], "format": "debezium-json",
                   "dead_letter_topic": f"dlq-{uuid.uuid4().hex[:8]}",
                   "consumer": {"topic.metadata.refresh.interval.ms": 2000}},
        "mappings": [{"table": "public.accounts", "identity": {"external_id": "id"},
                      "aliases": {"crm_id": "crm_id"}, "tags": {"plan": "plan"}, "on_delete": "delete_user"}],
        "delivery": {"flush_interval_ms": 50},
        "metrics": {"host": "127.0.0.1", "port": free_port()},
    }


def _debezium(op: str, after: Any, before: Any, lsn: int) -> bytes:
    return json.dumps({"before": before, "after": after, "op": op,
                       "source": {"schema": "public", "table": "accounts", "lsn": lsn}}).encode()


def test_debezium_key_change_renames_the_user_keeping_its_push_subscription(kafka_broker, sim, bridge):
    topic = kafka_broker.new_topic("dbserver1.public.accounts", 2)
    bridge(_kafka_config(kafka_broker, sim, topic)).start()
    row = {"id": "k1", "crm_id": "crm-1", "plan": "free"}
    kafka_broker.produce(topic, _debezium("c", row, None, 1), key=b'{"id": "k1"}')
    before = _synced(sim, "k1", plan="free")
    _app_logs_in(sim, "k1", "push-kafka")
    # k1 -> k2: a delete (newkey header) then a create (oldkey header)
    kafka_broker.produce(topic, _debezium("d", None, row, 2), key=b'{"id": "k1"}',
                         headers=[("__debezium.newkey", b'{"id": "k2"}')])
    kafka_broker.produce(topic, _debezium("c", dict(row, id="k2", plan="pro"), None, 3), key=b'{"id": "k2"}',
                         headers=[("__debezium.oldkey", b'{"id": "k1"}')])
    after = _synced(sim, "k2", plan="pro")
    assert after["identity"]["onesignal_id"] == before["identity"]["onesignal_id"]
    assert after["identity"]["crm_id"] == "crm-1" and _push_tokens(after) == {"push-kafka"}
    # k2 -> k3 as an update whose before and after identities differ
    kafka_broker.produce(topic, _debezium("u", dict(row, id="k3", plan="vip"), dict(row, id="k2", plan="pro"), 4),
                         key=b'{"id": "k3"}')
    after = _synced(sim, "k3", plan="vip")
    assert after["identity"]["onesignal_id"] == before["identity"]["onesignal_id"]
    assert _push_tokens(after) == {"push-kafka"}
    # k3 -> k4 where only the create half is seen (the delete went elsewhere): the header names the old key
    kafka_broker.produce(topic, _debezium("c", dict(row, id="k4", plan="max"), None, 5), key=b'{"id": "k4"}',
                         headers=[("__debezium.oldkey", b'{"id": "k3"}')])
    after = _synced(sim, "k4", plan="max")
    assert after["identity"]["onesignal_id"] == before["identity"]["onesignal_id"]
    assert len(sim.users()) == 1
    _no_deletes(sim)


def test_learned_subscription_ids_follow_the_rename_so_a_later_address_change_retires_the_old_address(
        pg_db, sim, bridge):
    pg_db.execute("CREATE TABLE users (id text PRIMARY KEY, email text, plan text)")
    mapping = {"table": "public.users", "identity": {"external_id": "id"}, "tags": {"plan": "plan"},
               "subscriptions": {"email": "email"}}
    b = bridge(bridge_config(pg_db.dsn, sim.base_url, [mapping]))
    assert run_cli("setup", "--config", str(b.config_path)).returncode == 0
    b.start()
    pg_db.execute("INSERT INTO users VALUES ('s1', 'a@example.com', 'free')")
    _synced(sim, "s1", plan="free")
    pg_db.execute("UPDATE users SET id = 's2', plan = 'pro' WHERE id = 's1'")
    _synced(sim, "s2", plan="pro")
    owners = pg_db.fetch("SELECT owner FROM onesignal_bridge.subscriptions")
    assert owners == [("external_id=s2",)]
    pg_db.execute("UPDATE users SET email = 'b@example.com' WHERE id = 's2'")

    def emails() -> set[str]:
        return {s["token"] for s in (sim.user("s2") or {}).get("subscriptions", []) if s["type"] == "Email"}
    wait_until(lambda: emails() == {"b@example.com"}, timeout=30, what="the old address retired")
    assert len(sim.users()) == 1


def test_a_delete_and_an_insert_of_another_identity_in_one_transaction_stay_a_delete_and_an_insert(
        pg_db, sim, bridge):
    _start(pg_db, sim, bridge, BY_ID)
    pg_db.execute("INSERT INTO users VALUES ('gone', NULL, NULL, 'free')")
    before = _synced(sim, "gone", plan="free")
    with psycopg.connect(pg_db.dsn) as conn:
        conn.execute("DELETE FROM users WHERE id = 'gone'")
        conn.execute("INSERT INTO users VALUES ('fresh', NULL, NULL, 'pro')")
    fresh = _synced(sim, "fresh", plan="pro")
    wait_until(lambda: sim.user("gone") is None, timeout=30, what="the deleted row's user deleted (on_delete)")
    assert fresh["identity"]["onesignal_id"] != before["identity"]["onesignal_id"]
    assert not any(r["endpoint"].endswith("/identity") and r["method"] == "PATCH" for r in sim.requests())
