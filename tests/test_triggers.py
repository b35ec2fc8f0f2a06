"""End to end: change-triggered messages and custom events (issue 17). Real Postgres, the bridge as
a process, the OneSignal simulator over HTTP: exactly once across SIGKILLs, never from history,
after the user's earlier changes, and rejections dead-lettered."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import httpx
import psycopg
from bridgeproc import API_KEY, APP_ID, bridge_config, run_cli, wait_until

from bridge.triggers.replay import next_key

DDL = """
CREATE TABLE users (id text PRIMARY KEY, email text, plan text);
CREATE TABLE orders (id bigint PRIMARY KEY, user_id text, status text, total numeric(8,2), note text);
"""
TEMPLATE = "6d6f3b1e-0000-4000-8000-0000000000aa"
MAPPINGS = [{"table": "public.users", "identity": {"external_id": "id"}, "tags": {"plan": "plan"},
             "subscriptions": {"email": "email"}}]
TRIGGERS: list[dict[str, Any]] = [
    {"name": "order_shipped", "table": "public.orders", "on": ["update"], "changed": ["status"],
     "new": {"status": "shipped"}, "user": {"external_id": "user_id"},
     "message": {"template_id": TEMPLATE, "target_channel": "email",
                 "custom_data": {"order_id": "id", "total": "total"}}},
    {"name": "order_placed", "table": "public.orders", "on": ["insert"], "user": {"external_id": "user_id"},
     "custom_event": {"name": "order_placed", "payload": {"order_id": "id", "total": "total"}}},
]


def _notifications(sim) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    return list(httpx.get(sim.base_url + "/_simulator/notifications").json()["notifications"])


def _events(sim) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    return list(httpx.get(sim.base_url + "/_simulator/custom_events").json()["events"])


def _prepare(pg_db, sim, bridge, **source):  # type: ignore[no-untyped-def]
    pg_db.execute(DDL)
    cfg = bridge_config(pg_db.dsn, sim.base_url, MAPPINGS, source=source or None)
    cfg["triggers"] = TRIGGERS
    b = bridge(cfg)
    out = run_cli("setup", "--config", str(b.config_path))
    assert out.returncode == 0, out.stderr
    return b


def _users(conn: psycopg.Connection[Any], n: int) -> None:
    for i in range(1, n + 1):
        conn.execute("INSERT INTO users VALUES (%s, %s, 'free')", (f"u{i}", f"u{i}@example.com"))


def test_thirty_orders_shipped_across_three_sigkills_send_exactly_thirty_messages(pg_db, sim, bridge):
    b = _prepare(pg_db, sim, bridge).start()
    with psycopg.connect(pg_db.dsn, autocommit=True) as conn:
        _users(conn, 10)
        for i in range(1, 31):
            conn.execute("INSERT INTO orders VALUES (%s, %s, 'paid', %s)", (i, f"u{i % 10 + 1}", f"{i}.50"))
        wait_until(lambda: len(_events(sim)) >= 10, timeout=60, what="the first order_placed events")
        for i in range(1, 31):
            conn.execute("UPDATE orders SET status = 'shipped' WHERE id = %s", (i,))
            if i in (6, 14, 22):
                b.kill()
                time.sleep(0.3)
                b.start()
            time.sleep(0.05)
    wait_until(lambda: len(_notifications(sim)) >= 30 and len(_events(sim)) >= 30, timeout=90,
               what="30 messages and 30 events")
    time.sleep(2.0)  # anything sent twice would show by now
    messages = _notifications(sim)
    assert len(messages) == 30, f"{len(messages)} messages for 30 shipped orders"
    assert len({m["idempotency_key"] for m in messages}) == 30
    by_order = {m["body"]["custom_data"]["order_id"]: m["body"] for m in messages}
    assert sorted(by_order) == list(range(1, 31))
    for i, body in by_order.items():
        assert body["include_aliases"] == {"external_id": [f"u{i % 10 + 1}"]}
        assert body["custom_data"] == {"order_id": i, "total": f"{i}.50"}
        assert body["template_id"] == TEMPLATE and body["target_channel"] == "email"
        assert "contents" not in body
    assert len(_events(sim)) == 30, "the inserts' custom events were sent again after a restart"
    assert b.runs == 4


def test_fifty_inserted_orders_send_exactly_fifty_custom_events(pg_db, sim, bridge):
    b = _prepare(pg_db, sim, bridge).start()
    with psycopg.connect(pg_db.dsn, autocommit=True) as conn:
        _users(conn, 5)
        for i in range(1, 51):
            conn.execute("INSERT INTO orders VALUES (%s, %s, 'new', %s)", (i, f"u{i % 5 + 1}", f"{i}.00"))
            if i == 25:
                b.kill()
                b.start()
    wait_until(lambda: len(_events(sim)) >= 50, timeout=60, what="50 custom events")
    time.sleep(1.5)
    events = _events(sim)
    assert len(events) == 50
    assert sorted(e["payload"]["order_id"] for e in events) == list(range(1, 51))
    for e in events:
        assert e["name"] == "order_placed"
        assert e["external_id"] == f"u{e['payload']['order_id'] % 5 + 1}"
        assert e["payload"]["total"] == f"{e['payload']['order_id']}.00"
    assert len({e["idempotency_key"] for e in events}) == 50
    assert _notifications(sim) == [], "inserts fire no order_shipped message"


def test_rows_from_before_the_first_run_and_unrelated_updates_send_nothing(pg_db, sim, bridge):
    pg_db.execute(DDL)
    pg_db.execute("INSERT INTO users VALUES ('u1', 'u1@example.com', 'free')")
    pg_db.execute("INSERT INTO orders VALUES (1, 'u1', 'shipped', 5), (2, 'u1', 'paid', 6)")
    cfg = bridge_config(pg_db.dsn, sim.base_url, MAPPINGS, source={"snapshot": "initial"})
    cfg["triggers"] = TRIGGERS
    b = bridge(cfg)
    out = run_cli("setup", "--config", str(b.config_path))
    assert out.returncode == 0, out.stderr
    b.start()
    wait_until(lambda: sim.user("u1"), timeout=60, what="the snapshot's user")
    pg_db.execute("UPDATE orders SET note = 'gift wrap' WHERE id = 1")  # shipped already: status unchanged
    pg_db.execute("UPDATE orders SET total = 7 WHERE id = 2")  # not shipped
    pg_db.execute("UPDATE users SET plan = 'pro' WHERE id = 'u1'")
    wait_until(lambda: sim.user("u1")["properties"]["tags"].get("plan") == "pro", what="the later user change")
    time.sleep(1.5)
    assert _notifications(sim) == [] and _events(sim) == []
    pg_db.execute("UPDATE orders SET status = 'shipped' WHERE id = 2")  # the control: this one fires
    wait_until(lambda: len(_notifications(sim)) == 1, what="the one real shipment's message")


def test_a_message_waits_for_its_users_tag_change_from_the_same_transaction(pg_db, sim, bridge):
    b = _prepare(pg_db, sim, bridge).start()
    with psycopg.connect(pg_db.dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO users VALUES ('u1', 'u1@example.com', 'free')")
        conn.execute("INSERT INTO orders VALUES (1, 'u1', 'paid', 10)")
        wait_until(lambda: sim.user("u1"), what="user u1")
        with conn.transaction():  # OneSignal's 1 request/s per user holds the tag change back
            conn.execute("UPDATE users SET plan = 'gold' WHERE id = 'u1'")
            conn.execute("UPDATE orders SET status = 'shipped' WHERE id = 1")
    (message,) = wait_until(lambda: _notifications(sim), what="the message")
    wait_until(lambda: sim.user("u1")["properties"]["tags"].get("plan") == "gold", what="plan gold")
    patches = [r for r in sim.requests()
               if r["method"] == "PATCH" and r["path"].endswith("/external_id/u1") and 200 <= r["status"] < 300]
    assert patches, "no tag update was applied"
    assert patches[-1]["time"] <= message["time"], "the message went out before the user's tag change"
    assert b.alive()


def test_an_invalid_aliases_answer_is_dead_lettered_with_the_reason_and_the_stream_goes_on(pg_db, sim, bridge):
    b = _prepare(pg_db, sim, bridge).start()
    with psycopg.connect(pg_db.dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO users VALUES ('u1', NULL, 'free'), ('u2', 'u2@example.com', 'free')")
        conn.execute("INSERT INTO orders VALUES (1, 'u1', 'paid', 10), (2, 'u2', 'paid', 20)")
        wait_until(lambda: sim.user("u1") and sim.user("u2"), what="users")
        conn.execute("UPDATE orders SET status = 'shipped' WHERE id = 1")  # u1 has no email subscription
        conn.execute("UPDATE orders SET status = 'shipped' WHERE id = 2")
    wait_until(lambda: len(_notifications(sim)) == 1, timeout=30, what="the message to u2")
    assert _notifications(sim)[0]["body"]["include_aliases"] == {"external_id": ["u2"]}

    def listed() -> str:
        out = run_cli("dlq", "list", "--config", str(b.config_path))
        return out.stdout if "invalid_aliases" in out.stdout else ""

    text = wait_until(listed, what="the dead letter")
    assert "trigger=order_shipped" in text and "[invalid_aliases]" in text and "external_id=u1" in text
    assert b.alive()


def _debezium(table: str, op: str, row: dict[str, Any] | None, before: dict[str, Any] | None, lsn: int) -> bytes:
    return json.dumps({"before": before, "after": row, "op": op, "ts_ms": 1700000000000 + lsn,
                       "source": {"schema": "public", "table": table, "lsn": lsn,
                                  "ts_ms": 1700000000000 + lsn}}).encode()


def test_debezium_u_events_on_kafka_send_each_message_once_across_a_sigkill(kafka_broker, sim, bridge):
    users_topic = kafka_broker.new_topic("dbserver1.public.users", 1)
    orders_topic = kafka_broker.new_topic("dbserver1.public.orders", 3)
    cfg = {
        "onesignal": {"app_id": APP_ID, "api_key": API_KEY, "base_url": sim.base_url},
        "source": {"kind": "kafka", "bootstrap_servers": kafka_broker.bootstrap,
                   "group_id": f"g-{uuid.uuid4().hex[:8]}", "topics": [users_topic, orders_topic],
                   "dead_letter_topic": f"dlq-{uuid.uuid4().hex[:8]}",
                   "consumer": {"topic.metadata.refresh.interval.ms": 2000}},
        "mappings": MAPPINGS,
        "triggers": TRIGGERS,
        "delivery": {"flush_interval_ms": 100},
        "metrics": {"port": 0, "host": "127.0.0.1"},
    }
    b = bridge(cfg).start()
    wait_until(lambda: "assigned" in b.logs(), timeout=30, what="partitions assigned")
    lsn = 0
    for i in range(1, 6):
        lsn += 1
        kafka_broker.produce(users_topic, _debezium("users", "c", {"id": f"u{i}", "email": f"u{i}@example.com",
                                                                    "plan": "free"}, None, lsn),
                             key=json.dumps({"id": f"u{i}"}).encode())
    wait_until(lambda: len(sim.users()) == 5, timeout=30, what="five users")
    for i in range(1, 21):
        lsn += 1
        paid = {"id": i, "user_id": f"u{i % 5 + 1}", "status": "paid", "total": f"{i}.00"}
        kafka_broker.produce(orders_topic, _debezium("orders", "c", paid, None, lsn),
                             key=json.dumps({"id": i}).encode())
    for i in range(1, 21):
        lsn += 1
        paid = {"id": i, "user_id": f"u{i % 5 + 1}", "status": "paid", "total": f"{i}.00"}
        kafka_broker.produce(orders_topic, _debezium("orders", "u", {**paid, "status": "shipped"}, paid, lsn),
                             key=json.dumps({"id": i}).encode())
        lsn += 1  # an update that changes no status: no message
        kafka_broker.produce(orders_topic, _debezium("orders", "u", {**paid, "status": "shipped", "total": "1.00"},
                                                     {**paid, "status": "shipped"}, lsn),
                             key=json.dumps({"id": i}).encode())
        if i == 10:
            kafka_broker.flush()
            b.kill()
            b.start()
    kafka_broker.flush()
    wait_until(lambda: len(_notifications(sim)) >= 20 and len(_events(sim)) >= 20, timeout=90,
               what="20 messages and 20 events")
    time.sleep(2.0)
    messages = _notifications(sim)
    assert len(messages) == 20 and len(_events(sim)) == 20
    assert sorted(m["body"]["custom_data"]["order_id"] for m in messages) == list(range(1, 21))
    for m in messages:
        i = m["body"]["custom_data"]["order_id"]
        assert m["body"]["include_aliases"] == {"external_id": [f"u{i % 5 + 1}"]}


def test_outbox_source_sends_each_shipped_orders_message_once_across_a_sigkill(pg_db, sim, bridge):
    pg_db.execute(DDL)
    cfg = bridge_config(pg_db.dsn, sim.base_url, MAPPINGS)
    cfg["source"] = {"kind": "outbox", "dsn": pg_db.dsn, "poll_interval_ms": 200}
    cfg["triggers"] = TRIGGERS
    b = bridge(cfg)
    out = run_cli("setup", "--config", str(b.config_path))
    assert out.returncode == 0, out.stderr
    b.start()
    with psycopg.connect(pg_db.dsn, autocommit=True) as conn:
        _users(conn, 4)
        for i in range(1, 13):
            conn.execute("INSERT INTO orders VALUES (%s, %s, 'paid', %s)", (i, f"u{i % 4 + 1}", f"{i}.25"))
        wait_until(lambda: len(sim.users()) == 4, timeout=30, what="four users")
        for i in range(1, 13):
            conn.execute("UPDATE orders SET status = 'shipped' WHERE id = %s", (i,))
            conn.execute("UPDATE orders SET note = 'left at the door' WHERE id = %s", (i,))  # no status change
            if i == 6:
                b.kill()
                b.start()
    wait_until(lambda: len(_notifications(sim)) >= 12 and len(_events(sim)) >= 12, timeout=60,
               what="12 messages and 12 events")
    time.sleep(1.5)
    messages = _notifications(sim)
    assert len(messages) == 12 and len(_events(sim)) == 12
    for m in messages:
        i = m["body"]["custom_data"]["order_id"]
        assert m["body"]["include_aliases"] == {"external_id": [f"u{i % 4 + 1}"]}
        assert m["body"]["custom_data"]["total"] == f"{i}.25"


def test_check_names_a_missing_trigger_column_and_a_trigger_table_without_the_old_row(pg_db, sim, bridge):
    pg_db.execute(DDL)
    cfg = bridge_config(pg_db.dsn, sim.base_url, MAPPINGS)
    cfg["triggers"] = [TRIGGERS[0], {**TRIGGERS[1], "custom_event": {"name": "x", "payload": {"c": "colour"}}}]
    b = bridge(cfg)
    out = run_cli("check", "--config", str(b.config_path))
    assert out.returncode == 1
    assert "trigger table public.orders (order_shipped, order_placed): missing columns colour" in out.stdout
    assert "publication onesignal_bridge does not exist" in out.stdout
    assert run_cli("setup", "--config", str(b.config_path)).returncode == 0
    out = run_cli("check", "--config", str(b.config_path))
    assert "table public.orders replica identity is FULL" in out.stdout  # `changed:` needs the old row
    pg_db.execute("ALTER TABLE orders REPLICA IDENTITY DEFAULT")
    out = run_cli("check", "--config", str(b.config_path))
    assert "[FAIL] table public.orders replica identity is not FULL" in out.stdout


def test_dlq_replay_sends_a_trigger_dead_letter_once_the_user_can_receive_it_under_a_key_derived_from_its_own(
        pg_db, sim, bridge):
    b = _prepare(pg_db, sim, bridge).start()
    with psycopg.connect(pg_db.dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO users VALUES ('u1', NULL, 'free')")
        conn.execute("INSERT INTO orders VALUES (1, 'u1', 'paid', 10)")
        wait_until(lambda: sim.user("u1"), what="user u1")
        conn.execute("UPDATE orders SET status = 'shipped' WHERE id = 1")  # no email subscription yet
    wait_until(lambda: pg_db.fetch("SELECT 1 FROM onesignal_bridge.dead_letters WHERE reason = 'invalid_aliases'"),
               what="the dead letter")
    assert run_cli("dlq", "replay", "--config", str(b.config_path)).returncode == 1  # still no subscription
    assert _notifications(sim) == []
    pg_db.execute("UPDATE users SET email = 'u1@example.com' WHERE id = 'u1'")
    wait_until(lambda: any(s.get("type") == "Email" for s in sim.user("u1").get("subscriptions", [])),
               what="u1's email subscription")
    out = run_cli("dlq", "replay", "--config", str(b.config_path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "order_shipped: sent again" in out.stdout
    (message,) = _notifications(sim)
    assert message["body"]["include_aliases"] == {"external_id": ["u1"]}
    (stored,) = pg_db.fetch("SELECT request FROM onesignal_bridge.dead_letters")[0]
    # The stored key was answered "created nothing", which OneSignal repeats for that key: the next
    # key derived from it is the one that can send, and a re-run derives it again.
    assert message["idempotency_key"] == next_key(stored)["idempotency_key"]
    again = run_cli("dlq", "replay", "--config", str(b.config_path))
    assert again.returncode == 0 and len(_notifications(sim)) == 1
