"""A rebalance without stale writes: when a member's partitions are revoked while some of its
requests are still on their way to OneSignal, the next owner (which reads from the last commit)
must not send its newer values for those users before the old requests have landed. Two bridge
processes in one consumer group on the real broker, the simulator holding the first member's
requests across the rebalance."""

from __future__ import annotations

import json
import time
import uuid

from bridgeproc import wait_until
from test_kafka_source import USERS, _config, _event

HOLD_S = 8.0  # the simulator holds the first member's updates this long before applying them
USER_IDS = range(1, 9)


def _plans(sim) -> dict[str, str | None]:  # type: ignore[no-untyped-def]
    return {k: u["properties"].get("tags", {}).get("plan") for k, u in sim.by_external_id().items()}


def _member(kafka_broker, sim, bridge, topic, group, name):  # type: ignore[no-untyped-def]
    cfg = _config(kafka_broker, sim, [topic], USERS, group=group)
    cfg["onesignal"]["request_timeout_s"] = HOLD_S + 4
    return bridge(cfg, name=name)


def test_a_revoked_members_late_requests_do_not_overwrite_the_next_owners_values(kafka_broker, sim, bridge):
    topic = kafka_broker.new_topic("dbserver1.public.users", 4)
    group = f"g-{uuid.uuid4().hex[:8]}"
    lsn = 0

    def produce(op: str, plan: str) -> None:
        nonlocal lsn
        for uid in USER_IDS:
            lsn += 1
            kafka_broker.produce(topic, _event(op, {"id": uid, "plan": plan}, None, lsn),
                                 key=json.dumps({"id": uid}).encode(), sync=False)
        kafka_broker.flush()

    first = _member(kafka_broker, sim, bridge, topic, group, "a").start()
    wait_until(lambda: "assigned" in first.logs(), timeout=30, what="member a assigned every partition")
    produce("c", "v0")
    wait_until(lambda: _plans(sim) == {str(u): "v0" for u in USER_IDS}, what="the users created by a")
    time.sleep(2.5)  # past onesignal.post_create_delay_s: a sends the next updates at once

    sim.faults(latency_ms=HOLD_S * 1000, paths="/users/by/external_id/")
    produce("u", "v1")
    wait_until(lambda: sim.stats()["in_progress"] >= len(USER_IDS), what="a's v1 updates held at the simulator")
    held_at = time.monotonic()  # a's v1 updates are applied about HOLD_S after this
    sim.clear_faults()
    second = _member(kafka_broker, sim, bridge, topic, group, "b").start()  # a rebalance: b takes partitions
    wait_until(lambda: f"assigned {topic}[" in second.logs(), timeout=40, what="member b assigned partitions")
    produce("u", "v2")

    time.sleep(max(0.0, held_at + HOLD_S + 1.0 - time.monotonic()))  # a's held v1s have landed by now
    want = {str(u): "v2" for u in USER_IDS}
    wait_until(lambda: _plans(sim) == want, timeout=30, what="every user at its last value after the rebalance")
    time.sleep(1.0)
    assert _plans(sim) == want, "a late request of the revoked member overwrote a newer value"
    assert first.alive() and second.alive()
