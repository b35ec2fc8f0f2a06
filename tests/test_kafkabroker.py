"""The Kafka test harness itself: tansu is a real Kafka-protocol broker (records, headers, consumer
groups that split partitions, committed offsets)."""

from __future__ import annotations

import time
import uuid

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

try:
    from .kafkabroker import KafkaBroker, Record
except ImportError:
    from kafkabroker import KafkaBroker, Record


def _group(prefix: str = "g") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_round_trip_keeps_keys_values_headers_and_tombstones(kafka_broker: KafkaBroker) -> None:
    topic = kafka_broker.new_topic("rt")
    assert kafka_broker.bootstrap == f"127.0.0.1:{kafka_broker.port}"
    headers = [("op", b"c"), ("empty", None)]
    assert kafka_broker.produce(topic, b'{"id": 1}', key=b"k1", headers=headers) == (0, 0)
    assert kafka_broker.produce_many(topic, [(b"k2", b"v2"), {"key": b"k1", "value": None}, b"bare"]) == [
        (0, 1), (0, 2), (0, 3),
    ]
    kafka_broker.produce(topic, b"later", sync=False)
    assert kafka_broker.flush() == [(0, 4)]

    assert kafka_broker.consume_all(topic, timeout=10, at_least=5) == [
        Record(b"k1", b'{"id": 1}', [("op", b"c"), ("empty", None)], 0, 0),
        Record(b"k2", b"v2", [], 0, 1),
        Record(b"k1", None, [], 0, 2),  # tombstone
        Record(None, b"bare", [], 0, 3),
        Record(None, b"later", [], 0, 4),
    ]
    # tuples too: (key, value, headers, partition, offset)
    k, v, h, partition, offset = kafka_broker.consume_all(topic)[0]
    assert (k, v, h, partition, offset) == (b"k1", b'{"id": 1}', headers, 0, 0)


def test_consume_all_reads_every_partition_and_an_unknown_topic_as_empty(kafka_broker: KafkaBroker) -> None:
    topic = kafka_broker.new_topic("parts", partitions=3)
    assert kafka_broker.partitions(topic) == [0, 1, 2]
    kafka_broker.produce_many(topic, [{"value": b"p%d" % p, "partition": p} for p in (2, 0, 1, 2)])
    got = kafka_broker.consume_all(topic)
    assert [(r.partition, r.offset, r.value) for r in got] == [
        (0, 0, b"p0"), (1, 0, b"p1"), (2, 0, b"p2"), (2, 1, b"p2"),
    ]
    missing = f"missing-{uuid.uuid4().hex[:8]}"
    t = time.monotonic()
    assert kafka_broker.consume_all(missing, timeout=5) == []
    assert time.monotonic() - t < 2
    assert kafka_broker.partitions(missing) == []
    assert topic in kafka_broker.topics() and missing not in kafka_broker.topics()  # not auto-created


def test_one_group_splits_six_partitions_between_two_consumers(kafka_broker: KafkaBroker) -> None:
    """Default (eager range,roundrobin) assignor; one join round takes ~session.timeout.ms/2 = 3 s."""
    topic = kafka_broker.new_topic("split", partitions=6)
    kafka_broker.produce_many(topic, [{"value": b"%d" % p, "partition": p} for p in range(6)])
    group = _group("split")
    consumers = [kafka_broker.consumer(group), kafka_broker.consumer(group)]
    assigned: list[set[int]] = [set(), set()]
    seen: list[set[int]] = [set(), set()]

    def on_assign(i: int):  # type: ignore[no-untyped-def]
        def cb(_c: Consumer, parts: list[TopicPartition]) -> None:
            assigned[i] = {p.partition for p in parts}

        return cb

    try:
        for i, c in enumerate(consumers):
            c.subscribe([topic], on_assign=on_assign(i))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (
            assigned[0] and assigned[1] and seen[0] | seen[1] == set(range(6))
        ):
            for i, c in enumerate(consumers):
                msg = c.poll(0.05)
                if msg is not None and msg.error() is None:
                    seen[i].add(msg.partition())
        assert assigned[0] and assigned[1], assigned
        assert assigned[0] & assigned[1] == set()
        assert assigned[0] | assigned[1] == set(range(6))
        assert seen == assigned  # each consumer read exactly its own partitions

        for c in consumers:
            c.commit(asynchronous=False)
        assert kafka_broker.committed(group, topic) == {p: 1 for p in range(6)}
    finally:
        for c in consumers:
            c.close()


def test_committed_offsets_are_visible_after_a_commit(kafka_broker: KafkaBroker) -> None:
    topic = kafka_broker.new_topic("commit", partitions=2)
    kafka_broker.produce_many(topic, [{"value": b"x", "partition": p % 2} for p in range(5)])
    group = _group("commit")
    assert kafka_broker.committed(group, topic) == {}

    c = kafka_broker.consumer(group)
    try:
        c.subscribe([topic])
        got = 0
        deadline = time.monotonic() + 15
        while got < 5 and time.monotonic() < deadline:
            msg = c.poll(0.2)
            if msg is not None and msg.error() is None:
                got += 1
        assert got == 5
        c.commit(offsets=[TopicPartition(topic, 0, 2)], asynchronous=False)  # partition 0: 2 of 3 done
        assert kafka_broker.committed(group, topic) == {0: 2}
        c.commit(asynchronous=False)  # current positions
        assert kafka_broker.wait_committed(group, topic, {0: 3, 1: 2}, timeout=5) == {0: 3, 1: 2}
    finally:
        c.close()

    # the same group's offsets, read back by a new consumer without joining (Consumer.committed)
    c2 = kafka_broker.consumer(group)
    try:
        tps = c2.committed([TopicPartition(topic, 0), TopicPartition(topic, 1)], timeout=10)
        assert [(tp.partition, tp.offset) for tp in tps] == [(0, 3), (1, 2)]
    finally:
        c2.close()


def test_a_killed_broker_restarts_on_the_same_port_empty(kafka_broker: KafkaBroker) -> None:
    # a private broker (the session one stays up); the fixture only brings the skip/fail rule
    with KafkaBroker(binary=kafka_broker.binary) as kb:
        port = kb.port
        topic = kb.new_topic("gone")
        kb.produce(topic, b"x")
        kb.kill()
        assert not kb.running
        kb.start()
        assert kb.port == port
        assert topic not in kb.topics()  # memory storage
        assert kb.produce(kb.new_topic("back"), b"y") == (0, 0)


def test_consumer_config_carries_what_tansu_needs(kafka_broker: KafkaBroker) -> None:
    conf = kafka_broker.consumer_config("g", session_timeout_ms=3000, **{"client.id": "me"})
    assert conf["bootstrap.servers"] == kafka_broker.bootstrap
    assert conf["group.id"] == "g"
    assert conf["session.timeout.ms"] == 3000
    assert conf["heartbeat.interval.ms"] == 1000
    assert conf["auto.offset.reset"] == "earliest"
    assert conf["client.id"] == "me"


def test_creating_an_existing_topic_fails_unless_exist_ok(kafka_broker: KafkaBroker) -> None:
    topic = kafka_broker.new_topic("dup", partitions=2)
    with pytest.raises(KafkaException) as e:
        kafka_broker.create_topic(topic, partitions=2)
    assert e.value.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS
    assert kafka_broker.create_topic(topic, partitions=2, exist_ok=True) == topic
