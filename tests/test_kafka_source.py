"""Kafka source end to end: Debezium events on a real Kafka-protocol broker (tansu), the bridge as
processes in one consumer group, the OneSignal simulator over HTTP."""

from __future__ import annotations

import base64
import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from bridgeproc import APP_ID, API_KEY, free_port, wait_until

SHARED = Path(__file__).resolve().parents[2] / "shared" / "debezium"

FIXTURE_MAPPINGS = [
    {"table": "public.customers", "identity": {"external_id": "id"},
     "tags": {"first_name": "first_name", "last_name": "last_name",
              "created_at": {"column": "created_at", "decode": "zoned_timestamp"}},
     "on_delete": "delete_user"},
    {"table": "inventory.customers", "identity": {"external_id": "id"},
     "tags": {"first_name": "first_name", "biography": "biography"}, "on_delete": "delete_user"},
    {"table": "inventory.orderline", "identity": {"external_id": "order_id"},
     "tags": {"totalprice": {"column": "totalprice", "decode": "decimal", "scale": 2}, "status": "status"}},
    {"table": "inventory.purchaseorder", "identity": {"external_id": "customerid"},
     "tags": {"orderdate": {"column": "orderdate", "decode": "micro_timestamp"}}},
    {"table": "inventory.products", "identity": {"external_id": "id"}, "tags": {"name": "name"}},
    {"table": "inventory.authors", "identity": {"external_id": "id"},
     "tags": {"first_name": "first_name", "biography": "biography",
              "dob": {"column": "dob", "decode": "micro_timestamp"}}},
    {"table": "inventory.outboxevent", "identity": {"external_id": "aggregateid"}, "tags": {"type": "type"}},
]

# fixture -> (topic, expected users by external_id: tags subset) or None for "no OneSignal call"
EXPECTED: dict[str, tuple[str, dict[str, dict[str, str]] | str | None]] = {
    "pg_create_schema": ("dbserver1.public.customers", {"1": {"first_name": "Anne", "last_name": "Kretchmar"}}),
    "pg_create_zonedtimestamp_docs": ("dbserver1.public.customers", {"1": {"created_at": "1294764030"}}),
    "pg_update_default_docs": ("dbserver1.public.customers", {"1": {"first_name": "Anne Marie"}}),
    "pg_truncate": ("dbserver1.public.customers", None),
    "pg_message_transactional": ("dbserver1.message", None),
    "pg_message_nontransactional": ("dbserver1.message", None),
    "pg_tx_begin": ("dbserver1.transaction", None),
    "pg_tx_end": ("dbserver1.transaction", None),
    "pg_create_with_tx_block": ("dbserver1.public.tx_demo", None),
    "pg_create_outbox_legacy_docs": ("dbserver1.inventory.outboxevent", {"1": {"type": "OrderCreated"}}),
    "pg_unwrap_add_fields_docs": ("flat", None),
    "pg_unwrap_delete_rewrite_docs": ("flat", None),
    "real/pg_create_decimal_noschema": ("dbserver1.inventory.orderline", {"1": {"totalprice": "39.98", "status": "ENTERED"}}),
    "real/pg_update_nofull_noschema": ("dbserver1.inventory.orderline", {"1": {"totalprice": "29.99", "status": "CANCELLED"}}),
    "real/pg_create_microtimestamp_noschema": ("dbserver1.inventory.purchaseorder", {"123": {"orderdate": "1548936781"}}),
    "real/pg_create_streaming": ("dbserver1.inventory.customers", {"1005": {"first_name": "Bob"}}),
    "real/pg_snapshot_read": ("dbserver1.inventory.customers", {"1001": {"first_name": "Sally"}}),
    "real/pg_update_full": ("dbserver1.inventory.products", {"107": {"name": "1111111111"}}),
    "real/pg_update_toast_3x": ("dbserver1.inventory.authors", {"1001": {"first_name": "Tom", "dob": "-1257206400"}}),
    "real/pg_update_toast_noschema": ("dbserver1.inventory.customers", {"1004": {"first_name": "Dana"}}),
    "real/pg_message_logical_decoding": ("dbserver1.message", None),
    "derived/pg_delete_tombstone": ("dbserver1.public.customers", None),
    "derived/pg_heartbeat": ("__debezium-heartbeat.dbserver1", None),
    "derived/pg_heartbeat_noschema": ("__debezium-heartbeat.dbserver1", None),
    # last: a deletion makes older events for the same user stale (fixtures come from unrelated databases)
    "pg_delete_default_docs": ("dbserver1.public.customers", "DELETE 1"),
}


def _config(kafka_broker, sim, topics, mappings, *, group=None, fmt="debezium-json", dlq=None):  # type: ignore[no-untyped-def]
    return {
        "onesignal": {"app_id": APP_ID, "api_key": API_KEY, "base_url": sim.base_url},
        "source": {"kind": "kafka", "bootstrap_servers": kafka_broker.bootstrap,
                   "group_id": group or f"g-{uuid.uuid4().hex[:8]}", "topics": topics, "format": fmt,
                   "dead_letter_topic": dlq or f"dlq-{uuid.uuid4().hex[:8]}",
                   "consumer": {"topic.metadata.refresh.interval.ms": 2000}},
        "mappings": mappings,
        "delivery": {"flush_interval_ms": 50},
        "metrics": {"host": "127.0.0.1", "port": free_port()},
    }


def _read(path: Path) -> bytes | None:
    text = path.read_text()
    return None if text.strip() == "null" else text.encode()


def _fixture_files() -> list[str]:
    if not SHARED.exists():
        return []
    names = []
    for p in sorted(SHARED.rglob("*.json")):
        if p.name.endswith(".key.json"):
            continue
        names.append(str(p.relative_to(SHARED))[: -len(".json")])
    return names


def _key_for(name: str) -> bytes | None:
    for cand in (SHARED / f"{name}.key.json", SHARED / "derived" / f"{Path(name).name}.key.json"):
        if cand.exists():
            return _read(cand)
    return None


def test_every_fixture_has_an_expectation():
    if not SHARED.exists():
        pytest.skip(f"{SHARED} not present (the Debezium fixtures live in ../shared)")
    assert set(_fixture_files()) == set(EXPECTED), "a fixture without an expectation (or a stale expectation)"


def test_each_debezium_fixture_produces_the_expected_onesignal_calls(kafka_broker, sim, bridge):
    if not SHARED.exists():
        pytest.skip(f"{SHARED} not present (the Debezium fixtures live in ../shared)")
    topics = sorted({t for t, _ in EXPECTED.values() if t != "flat"})
    for t in topics:
        kafka_broker.create_topic(t, 1, exist_ok=True)
    cfg = _config(kafka_broker, sim, topics, FIXTURE_MAPPINGS)
    b = bridge(cfg, name="fixtures").start()
    group = cfg["source"]["group_id"]
    flat_topic = "dbserver2.public.flat"
    kafka_broker.create_topic(flat_topic, 1, exist_ok=True)
    flat_cfg = _config(kafka_broker, sim, [flat_topic],
                       [{"table": "public.flat", "identity": {"external_id": "pk"}, "tags": {"cola": "cola"}}],
                       fmt="debezium-flat")
    flat = bridge(flat_cfg, name="flat").start()
    problems = []
    for name, (topic, want) in EXPECTED.items():
        sim.reset()
        real_topic, grp = (flat_topic, flat_cfg["source"]["group_id"]) if topic == "flat" else (topic, group)
        _, offset = kafka_broker.produce(real_topic, _read(SHARED / f"{name}.json"), key=_key_for(name))
        kafka_broker.wait_committed(grp, real_topic, lambda c, o=offset: c.get(0, -1) > o, timeout=30)
        writes = [r for r in sim.requests() if r["method"] != "GET"]
        if want is None:
            if writes:
                problems.append(f"{name}: expected no OneSignal call, got {writes}")
        elif want == "DELETE 1":
            if not any(r["method"] == "DELETE" and r["user"] == "1" for r in writes):
                problems.append(f"{name}: expected user 1 deleted, got {writes}")
        else:
            for uid, tags in want.items():
                got = (sim.user(uid) or {}).get("properties", {}).get("tags", {})
                if {k: got.get(k) for k in tags} != tags:
                    problems.append(f"{name}: user {uid} tags {got}, expected {tags}")
            if name.endswith("toast_noschema") and "biography" in (sim.user("1004") or {}).get("properties", {}).get("tags", {}):
                problems.append(f"{name}: the unavailable TOAST placeholder became a tag")
    assert not problems, "\n".join(problems) + "\n" + b.logs()[-3000:] + flat.logs()[-2000:]


def _event(op: str, row: dict[str, Any] | None, before: dict[str, Any] | None, lsn: int) -> bytes:
    return json.dumps({"before": before, "after": row, "op": op, "ts_ms": 1700000000000 + lsn,
                       "source": {"schema": "public", "table": "users", "lsn": lsn, "ts_ms": 1700000000000 + lsn}}).encode()


USERS = [{"table": "public.users", "identity": {"external_id": "id"}, "tags": {"plan": "plan"}, "on_delete": "delete_user"}]


def test_two_replicas_split_partitions_and_survive_a_sigkill(kafka_broker, sim, bridge):
    topic = kafka_broker.new_topic("dbserver1.public.users", 6)
    group = f"g-{uuid.uuid4().hex[:8]}"
    a = bridge(_config(kafka_broker, sim, [topic], USERS, group=group), name="a").start()
    b = bridge(_config(kafka_broker, sim, [topic], USERS, group=group), name="b").start()
    wait_until(lambda: "assigned" in a.logs() and "assigned" in b.logs(), timeout=30, what="both replicas assigned")
    expected: dict[int, str] = {}
    lsn = 0
    for round_ in range(30):
        for uid in range(1, 41):
            lsn += 1
            value = f"r{round_}"
            kafka_broker.produce(topic, _event("c" if round_ == 0 else "u", {"id": uid, "plan": value}, None, lsn),
                                 key=json.dumps({"id": uid}).encode(), sync=False)
            expected[uid] = value
        kafka_broker.flush()
        if round_ == 10:
            a.kill()
        time.sleep(0.1)
    want = {str(k): v for k, v in expected.items()}
    wait_until(lambda: {k: u["properties"].get("tags", {}).get("plan") for k, u in sim.by_external_id().items()} == want,
               timeout=60, what="every user at its last value after one replica was killed")
    assert b.alive()


def test_poison_messages_go_to_the_dead_letter_topic_and_consumption_continues(kafka_broker, sim, bridge):
    topic = kafka_broker.new_topic("dbserver1.public.users", 1)
    cfg = _config(kafka_broker, sim, [topic], USERS)
    dlq = cfg["source"]["dead_letter_topic"]
    b = bridge(cfg).start()
    kafka_broker.produce(topic, b"{not json", key=b'{"id": 1}')
    kafka_broker.produce(topic, json.dumps({"after": {"id": 2, "plan": "x"}, "source": {"schema": "public", "table": "users"}}).encode())
    kafka_broker.produce(topic, json.dumps({
        "schema": {"type": "struct", "fields": [{"field": "after", "type": "struct", "optional": True, "fields": [
            {"field": "id", "type": "int32"}, {"field": "plan", "type": "string"}]}]},
        "payload": {"op": "c", "after": {"id": "three", "plan": "x"}, "source": {"schema": "public", "table": "users"}},
    }).encode())
    kafka_broker.produce(topic, _event("c", {"id": 4, "plan": "ok"}, None, 10))
    wait_until(lambda: sim.user("4"), timeout=30, what="the good record after three poison ones")
    records = kafka_broker.consume_all(dlq, timeout=10, at_least=3)
    records.sort(key=lambda r: int(dict(r.headers)["dlq.offset"]))  # the DLQ topic may have several partitions
    reasons = [dict(r.headers)["dlq.reason"].decode() for r in records]
    assert len(records) == 3, reasons
    assert "JSON" in reasons[0] or "json" in reasons[0]
    assert "op" in reasons[1]
    assert "three" in reasons[2] or "int" in reasons[2]
    assert all(dict(r.headers)["dlq.topic"].decode() == topic for r in records)
    assert [dict(r.headers)["dlq.offset"].decode() for r in records] == ["0", "1", "2"]


def test_primary_key_change_keeps_the_user_and_moves_the_identity_as_mapped(kafka_broker, sim, bridge):
    topic = kafka_broker.new_topic("dbserver1.public.accounts", 1)
    mappings = [{"table": "public.accounts", "identity": {"external_id": "email"}, "tags": {"plan": "plan"},
                 "on_delete": "delete_user"}]
    b = bridge(_config(kafka_broker, sim, [topic], mappings)).start()

    def ev(op: str, after: Any, before: Any, lsn: int) -> bytes:
        return json.dumps({"before": before, "after": after, "op": op,
                           "source": {"schema": "public", "table": "accounts", "lsn": lsn}}).encode()

    kafka_broker.produce(topic, ev("c", {"id": 1, "email": "ada", "plan": "free"}, None, 1), key=b'{"id": 1}')
    wait_until(lambda: sim.user("ada"), timeout=30, what="user ada")
    # id 1 -> 2, same email: a delete (newkey header) then a create (oldkey header)
    kafka_broker.produce(topic, ev("d", None, {"id": 1, "email": "ada", "plan": "free"}, 2), key=b'{"id": 1}',
                         headers=[("__debezium.newkey", b'{"id": 2}')])
    kafka_broker.produce(topic, ev("c", {"id": 2, "email": "ada", "plan": "pro"}, None, 3), key=b'{"id": 2}',
                         headers=[("__debezium.oldkey", b'{"id": 1}')])
    wait_until(lambda: (sim.user("ada") or {}).get("properties", {}).get("tags", {}).get("plan") == "pro",
               timeout=30, what="the same user updated")
    assert not any(r["method"] == "DELETE" for r in sim.requests()), "a primary-key change must not delete the user"
    # id 2 -> 3 and the identity column changes too: the user moves per on_delete
    kafka_broker.produce(topic, ev("d", None, {"id": 2, "email": "ada", "plan": "pro"}, 4), key=b'{"id": 2}',
                         headers=[("__debezium.newkey", b'{"id": 3}')])
    kafka_broker.produce(topic, ev("c", {"id": 3, "email": "grace", "plan": "pro"}, None, 5), key=b'{"id": 3}',
                         headers=[("__debezium.oldkey", b'{"id": 2}')])
    wait_until(lambda: sim.user("grace") and sim.user("ada") is None, timeout=30, what="identity moved to grace")
