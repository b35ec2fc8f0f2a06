"""Kafka source end to end: Debezium events on a real Kafka-protocol broker (tansu), the bridge as
processes in one consumer group, the OneSignal simulator over HTTP."""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from bridgeproc import API_KEY, APP_ID, free_port, wait_until

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
    "real/pg_create_decimal_noschema": (
        "dbserver1.inventory.orderline",
        {"1": {"totalprice": "39.98", "status": "ENTERED"}},
    ),
    "real/pg_update_nofull_noschema": (
        "dbserver1.inventory.orderline",
        {"1": {"totalprice": "29.99", "status": "CANCELLED"}},
    ),
    "real/pg_create_microtimestamp_noschema": (
        "dbserver1.inventory.purchaseorder",
        {"123": {"orderdate": "1548936781"}},
    ),
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
        "source": {
            "kind": "kafka",
            "bootstrap_servers": kafka_broker.bootstrap,
            "group_id": group or f"g-{uuid.uuid4().hex[:8]}",
            "topics": topics,
            "format": fmt,
            "dead_letter_topic": dlq or f"dlq-{uuid.uuid4().hex[:8]}",
            "consumer": {"topic.metadata.refresh.interval.ms": 2000},
        },
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
    flat_cfg = _config(
        kafka_broker,
        sim,
        [flat_topic],
        [{"table": "public.flat", "identity": {"external_id": "pk"}, "tags": {"cola": "cola"}}],
        fmt="debezium-flat",
    )
    flat = bridge(flat_cfg, name="flat").start()
    problems = []
    for name, (topic, want) in EXPECTED.items():
        # Each fixture's requests, from the log: users stay (emptying the simulator behind the
        # bridge's back would be a user deleted outside it moments after its creation, which the
        # bridge rightly takes for OneSignal's replication lag and waits out).
        before = len(sim.requests())
        real_topic, grp = (flat_topic, flat_cfg["source"]["group_id"]) if topic == "flat" else (topic, group)
        _, offset = kafka_broker.produce(real_topic, _read(SHARED / f"{name}.json"), key=_key_for(name))
        kafka_broker.wait_committed(grp, real_topic, lambda c, o=offset: c.get(0, -1) > o, timeout=30)
        writes = [r for r in sim.requests()[before:] if r["method"] != "GET"]
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
            if name.endswith("toast_noschema") and "biography" in (sim.user("1004") or {}).get("properties", {}).get(
                "tags", {}
            ):
                problems.append(f"{name}: the unavailable TOAST placeholder became a tag")
    assert not problems, "\n".join(problems) + "\n" + b.logs()[-3000:] + flat.logs()[-2000:]


def _event(op: str, row: dict[str, Any] | None, before: dict[str, Any] | None, lsn: int) -> bytes:
    return json.dumps(
        {
            "before": before,
            "after": row,
            "op": op,
            "ts_ms": 1700000000000 + lsn,
            "source": {"schema": "public", "table": "users", "lsn": lsn, "ts_ms": 1700000000000 + lsn},
        }
    ).encode()


USERS = [
    {"table": "public.users", "identity": {"external_id": "id"}, "tags": {"plan": "plan"}, "on_delete": "delete_user"}
]


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
            kafka_broker.produce(
                topic,
                _event("c" if round_ == 0 else "u", {"id": uid, "plan": value}, None, lsn),
                key=json.dumps({"id": uid}).encode(),
                sync=False,
            )
            expected[uid] = value
        kafka_broker.flush()
        if round_ == 10:
            a.kill()
        time.sleep(0.1)
    want = {str(k): v for k, v in expected.items()}
    wait_until(
        lambda: {k: u["properties"].get("tags", {}).get("plan") for k, u in sim.by_external_id().items()} == want,
        timeout=60,
        what="every user at its last value after one replica was killed",
    )
    assert b.alive()


def test_poison_messages_go_to_the_dead_letter_topic_and_consumption_continues(kafka_broker, sim, bridge):
    topic = kafka_broker.new_topic("dbserver1.public.users", 1)
    cfg = _config(kafka_broker, sim, [topic], USERS)
    dlq = cfg["source"]["dead_letter_topic"]
    bridge(cfg).start()
    kafka_broker.produce(topic, b"{not json", key=b'{"id": 1}')
    kafka_broker.produce(
        topic, json.dumps({"after": {"id": 2, "plan": "x"}, "source": {"schema": "public", "table": "users"}}).encode()
    )
    kafka_broker.produce(
        topic,
        json.dumps(
            {
                "schema": {
                    "type": "struct",
                    "fields": [
                        {
                            "field": "after",
                            "type": "struct",
                            "optional": True,
                            "fields": [{"field": "id", "type": "int32"}, {"field": "plan", "type": "string"}],
                        }
                    ],
                },
                "payload": {
                    "op": "c",
                    "after": {"id": "three", "plan": "x"},
                    "source": {"schema": "public", "table": "users"},
                },
            }
        ).encode(),
    )
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
    mappings = [
        {
            "table": "public.accounts",
            "identity": {"external_id": "email"},
            "tags": {"plan": "plan"},
            "on_delete": "delete_user",
            "on_identity_change": "rename",  # one account per email: a new email is the same person
        }
    ]
    bridge(_config(kafka_broker, sim, [topic], mappings)).start()

    def ev(op: str, after: Any, before: Any, lsn: int) -> bytes:
        return json.dumps(
            {
                "before": before,
                "after": after,
                "op": op,
                "source": {"schema": "public", "table": "accounts", "lsn": lsn},
            }
        ).encode()

    kafka_broker.produce(topic, ev("c", {"id": 1, "email": "ada", "plan": "free"}, None, 1), key=b'{"id": 1}')
    wait_until(lambda: sim.user("ada"), timeout=30, what="user ada")
    # id 1 -> 2, same email: a delete (newkey header) then a create (oldkey header)
    kafka_broker.produce(
        topic,
        ev("d", None, {"id": 1, "email": "ada", "plan": "free"}, 2),
        key=b'{"id": 1}',
        headers=[("__debezium.newkey", b'{"id": 2}')],
    )
    kafka_broker.produce(
        topic,
        ev("c", {"id": 2, "email": "ada", "plan": "pro"}, None, 3),
        key=b'{"id": 2}',
        headers=[("__debezium.oldkey", b'{"id": 1}')],
    )
    wait_until(
        lambda: (sim.user("ada") or {}).get("properties", {}).get("tags", {}).get("plan") == "pro",
        timeout=30,
        what="the same user updated",
    )
    assert not any(r["method"] == "DELETE" for r in sim.requests()), "a primary-key change must not delete the user"
    # id 2 -> 3 and the identity column changes too: the user is renamed (issue 15)
    kafka_broker.produce(
        topic,
        ev("d", None, {"id": 2, "email": "ada", "plan": "pro"}, 4),
        key=b'{"id": 2}',
        headers=[("__debezium.newkey", b'{"id": 3}')],
    )
    kafka_broker.produce(
        topic,
        ev("c", {"id": 3, "email": "grace", "plan": "pro"}, None, 5),
        key=b'{"id": 3}',
        headers=[("__debezium.oldkey", b'{"id": 2}')],
    )
    wait_until(lambda: sim.user("grace") and sim.user("ada") is None, timeout=30, what="ada renamed to grace")
    assert len(sim.users()) == 1 and not any(r["method"] == "DELETE" for r in sim.requests())


# -- the consumer under an outage and under rebalances ------------------------------------------

ASSIGNED = re.compile(r"\bassigned (?:nothing|\S+\[\d+\])")
REVOKED = re.compile(r"\brevoked (?:nothing|\S+\[\d+\])")
DEAD_TASK_SIGNS = (
    "Task exception was never retrieved",
    "dictionary changed size",
    "Traceback",
    "consumer thread failed",
    "MAXPOLL",
    "maximum poll interval",
)


class Ledger:
    """Every record produced, by partition and offset, so the committed offsets can be checked
    against what OneSignal holds: a committed offset C on a partition promises that each user's
    last record below C was applied (the tag `plan` is `r<round>`; rounds only grow)."""

    def __init__(self, kafka_broker, topic: str) -> None:  # type: ignore[no-untyped-def]
        self.kb, self.topic = kafka_broker, topic
        self.records: dict[int, list[tuple[int, str, int]]] = {}
        self.last: dict[str, int] = {}
        self.lsn = 0

    def produce_round(self, round_: int, users: range, pad: int = 0) -> None:
        """One record per user; `pad` bytes in a column no mapping reads make the record bigger."""
        values = []
        for uid in users:
            self.lsn += 1
            op = "u" if str(uid) in self.last else "c"
            row = {"id": uid, "plan": f"r{round_}", **({"pad": "x" * pad} if pad else {})}
            values.append((json.dumps({"id": uid}).encode(), _event(op, row, None, self.lsn)))
        for uid, (partition, offset) in zip(users, self.kb.produce_many(self.topic, values), strict=True):
            self.records.setdefault(partition, []).append((offset, str(uid), round_))
            self.last[str(uid)] = round_

    def end_offsets(self) -> dict[int, int]:
        return {p: max(o for o, _, _ in recs) + 1 for p, recs in self.records.items()}

    def expected(self) -> dict[str, str]:
        return {uid: f"r{r}" for uid, r in self.last.items()}

    def unapplied_commits(self, committed: dict[int, int], sim) -> list[str]:  # type: ignore[no-untyped-def]
        """Read `committed` before calling: what OneSignal holds only moves forward."""
        applied = {uid: int(v[1:]) for uid, v in _plans(sim).items() if v and v.startswith("r")}
        problems = []
        for partition, upto in committed.items():
            need: dict[str, int] = {}
            for offset, uid, round_ in self.records.get(partition, []):
                if offset < upto:
                    need[uid] = max(need.get(uid, -1), round_)
            problems += [
                f"partition {partition} committed up to {upto}, but user {uid} is at round {applied.get(uid)} < {r}"
                for uid, r in need.items()
                if applied.get(uid, -1) < r
            ]
        return problems


def _plans(sim) -> dict[str, str | None]:  # type: ignore[no-untyped-def]
    return {k: u["properties"].get("tags", {}).get("plan") for k, u in sim.by_external_id().items()}


def _group_state(kafka_broker, group: str) -> str:  # type: ignore[no-untyped-def]
    desc = kafka_broker.admin.describe_consumer_groups([group], request_timeout=10)[group].result(10)
    return desc.state.name


def test_an_outage_longer_than_max_poll_interval_pauses_the_partitions_and_keeps_the_member_in_the_group(
    kafka_broker, sim, bridge
):
    max_poll_s, outage_s = 6, 10
    topic = kafka_broker.new_topic("dbserver1.public.users", 2)
    cfg = _config(kafka_broker, sim, [topic], USERS)
    cfg["source"]["consumer"]["max.poll.interval.ms"] = max_poll_s * 1000
    cfg["delivery"]["max_pending_users"] = 10  # backpressure after ten users
    group = cfg["source"]["group_id"]
    b = bridge(cfg).start()
    wait_until(lambda: ASSIGNED.search(b.logs()), timeout=30, what="the partitions assigned")
    users = range(1, 21)
    ledger = Ledger(kafka_broker, topic)
    ledger.produce_round(0, users)
    wait_until(lambda: _plans(sim) == ledger.expected(), timeout=30, what="the first round applied")
    before = kafka_broker.wait_committed(group, topic, ledger.end_offsets())

    sim.faults(error_rate=1.0, status=503)
    try:
        ledger.produce_round(1, users)  # the ten users that fill the pipeline...
        # ...and 10 MB more than the source buffers (8 MiB) before it pauses the partitions
        ledger.produce_round(1, range(21, 121), pad=100_000)
        deadline = time.monotonic() + outage_s
        while time.monotonic() < deadline:
            # nothing can be applied during the outage, so nothing more may be committed
            assert kafka_broker.committed(group, topic) == before
            assert _group_state(kafka_broker, group) == "STABLE", b.logs()[-3000:]
            time.sleep(1)
        assert "paused 2 partition(s)" in b.logs(), b.logs()[-3000:]
    finally:
        sim.clear_faults()

    problems: list[str] = []

    def converged() -> bool:
        problems.extend(ledger.unapplied_commits(kafka_broker.committed(group, topic), sim))
        return _plans(sim) == ledger.expected()

    wait_until(converged, timeout=60, interval=0.5, what="every user at its last value after the outage")
    kafka_broker.wait_committed(group, topic, ledger.end_offsets())
    assert not problems, problems[:10]
    logs = b.logs()
    assert len(ASSIGNED.findall(logs)) == 1 and not REVOKED.search(logs) and "lost " not in logs, logs[-3000:]
    assert not [s for s in DEAD_TASK_SIGNS if s in logs], logs[-3000:]
    assert "resumed 2 partition(s)" in logs
    assert b.terminate() == 0


def test_members_joining_and_leaving_while_offsets_are_committed_lose_nothing_and_leave_no_dead_task(
    kafka_broker, sim, bridge
):
    topic = kafka_broker.new_topic("dbserver1.public.users", 6)
    group = f"g-{uuid.uuid4().hex[:8]}"
    a = bridge(_config(kafka_broker, sim, [topic], USERS, group=group), name="a")
    b = bridge(_config(kafka_broker, sim, [topic], USERS, group=group), name="b")
    users = range(1, 61)
    ledger = Ledger(kafka_broker, topic)
    problems: list[str] = []
    stop = threading.Event()

    def produce() -> None:  # a round every 0.2 s, and the commits checked against OneSignal
        round_ = 0
        while not stop.is_set():
            ledger.produce_round(round_, users)
            round_ += 1
            problems.extend(ledger.unapplied_commits(kafka_broker.committed(group, topic), sim))
            time.sleep(0.2)

    def assignments(p) -> int:  # type: ignore[no-untyped-def]
        return len(ASSIGNED.findall(p.logs()))

    a.start()
    wait_until(lambda: assignments(a) == 1, timeout=30, what="a assigned")
    producer = threading.Thread(target=produce)
    producer.start()
    try:
        b.start()  # a is revoked while committing, both are assigned
        wait_until(lambda: assignments(a) == 2 and assignments(b) == 1, timeout=30, what="a and b share")
        time.sleep(1.5)
        assert b.terminate() == 0  # b leaves: a is revoked and takes everything
        wait_until(lambda: assignments(a) == 3, timeout=30, what="a owns everything again")
        b.start()
        wait_until(lambda: assignments(a) == 4 and assignments(b) == 2, timeout=30, what="b back")
        time.sleep(1.5)
        assert a.terminate() == 0  # a leaves: b takes everything
        wait_until(lambda: assignments(b) == 3, timeout=30, what="b owns everything")
        time.sleep(1.5)
    finally:
        stop.set()
        producer.join()
    revocations = len(REVOKED.findall(b.logs()))
    wait_until(lambda: _plans(sim) == ledger.expected(), timeout=30, what="every user at its last value")
    # the timer commits after all those rebalances: no revocation or shutdown needed
    kafka_broker.wait_committed(group, topic, ledger.end_offsets(), timeout=15)
    assert len(REVOKED.findall(b.logs())) == revocations
    problems.extend(ledger.unapplied_commits(kafka_broker.committed(group, topic), sim))
    assert not problems, problems[:10]
    assert b.terminate() == 0
    for p in (a, b):
        logs = p.logs()
        assert not [s for s in DEAD_TASK_SIGNS if s in logs], logs[-3000:]


def test_a_consumer_thread_failure_ends_the_process_non_zero_and_says_why(kafka_broker, sim, bridge):
    # Python's re accepts the non-capturing group; librdkafka's regex engine refuses it at subscribe
    cfg = _config(kafka_broker, sim, None, USERS)
    del cfg["source"]["topics"]
    cfg["source"]["topic_pattern"] = r"^dbserver1\.(?:public)\.users$"
    b = bridge(cfg).start()
    assert b.proc is not None
    rc = b.proc.wait(30)
    logs = b.logs()
    assert rc != 0, logs[-3000:]
    assert "consumer thread failed" in logs and "Failed to set subscription" in logs, logs[-3000:]
    # the last line is the operator's: a typed error saying what happened and what to do
    last = logs.strip().splitlines()[-1]
    assert last.startswith("run: the Kafka consumer thread failed: KafkaException"), last
    assert "Nothing that was not applied was committed" in last and "source.topic_pattern" in last, last
