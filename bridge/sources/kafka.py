"""`kafka` source: Debezium change events from Kafka topics, in a consumer group.

- librdkafka (confluent-kafka) runs on one dedicated thread; the asyncio side awaits it.
- Each record becomes a `ChangeEvent` (via `debezium.parse_record`); every record also gets a
  checkpoint marker `(topic, partition, offset)`. When the pipeline's low watermark passes a
  marker, that offset is *confirmable*; offsets are committed per partition (offset + 1) from a
  timer, on revocation, and at shutdown. Auto-commit is off: nothing is committed before it was
  applied or dead-lettered.
- Rebalance: on revocation the confirmable offsets of the revoked partitions are committed, and
  nothing of them is committed afterwards, so unfinished work is re-read by the next owner.
- Poison records (invalid JSON, missing `op`, wrong types) go to the dead-letter topic with
  headers naming the reason and the source topic, partition and offset; the consumer moves on.
- A primary-key update arrives as a delete carrying `__debezium.newkey` and a create carrying
  `__debezium.oldkey`: the delete never deletes the user; the create is handled as an update
  from the old row, so the identity moves only when the identity column itself changed.
- Stale values: events for one user may arrive through different partitions. The pipeline drops
  a value for a (user, field) when an event with a higher source position (`source.lsn`, else
  `ts_ms`) already set it (see `bridge/staleness.py`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
from collections import OrderedDict
from typing import Any, Awaitable, Callable

import orjson
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from bridge.config import ColumnSpec, Config, KafkaSourceConfig
from bridge.deadletter import DeadLetter
from bridge.events import ChangeEvent, Op
from bridge.observability import metrics as m
from bridge.sources import debezium

log = logging.getLogger("bridge.source.kafka")

COMMIT_INTERVAL_S = 1.0
LAG_INTERVAL_S = 5.0
BATCH = 500
PK_CACHE = 10_000

DEFAULT_CONSUMER = {
    "enable.auto.commit": False,
    "auto.offset.reset": "earliest",
    "session.timeout.ms": 6000,
    "heartbeat.interval.ms": 1000,
    "enable.partition.eof": False,
    "topic.metadata.refresh.interval.ms": 10000,  # notice new topics (pattern subscriptions) quickly
}


def _headers(msg: Message) -> list[tuple[str, bytes]]:
    return [(k, v if isinstance(v, bytes) else (v or b"")) for k, v in (msg.headers() or [])]


def decoders_from(config: Config) -> dict[str, dict[str, ColumnSpec]]:
    out: dict[str, dict[str, ColumnSpec]] = {}
    for mp in config.mappings:
        for ref in list(mp.tags.values()) + list(mp.properties.values()):
            if isinstance(ref, ColumnSpec) and ref.decode:
                out.setdefault(mp.table, {})[ref.column] = ref
    return out


class KafkaDeadLetters:
    """Dead letters as JSON records on the dead-letter topic (headers say why and from where)."""

    def __init__(self, producer: Producer, topic: str) -> None:
        self.producer, self.topic = producer, topic

    async def put(self, letters: list[DeadLetter]) -> None:
        for d in letters:
            value = orjson.dumps({
                "table": d.table, "row_key": d.row_key, "field": d.field, "reason": d.reason,
                "message": d.message, "position": d.position, "user": d.user, "payload": d.payload,
                "request": d.request,
            }, default=str)
            self.producer.produce(self.topic, value=value, headers=[
                ("dlq.reason", d.reason.encode()), ("dlq.table", d.table.encode()),
                ("dlq.position", d.position.encode()),
                *([("dlq.row_keys", orjson.dumps(d.row_keys))] if d.row_keys is not None else []),
            ])
        remaining = await asyncio.to_thread(self.producer.flush, 30)
        if remaining:
            raise RuntimeError(f"{remaining} dead letter(s) not acknowledged by Kafka")


class KafkaSource:
    def __init__(self, cfg: KafkaSourceConfig, config: Config) -> None:
        self.cfg = cfg
        self.tables = {mp.table for mp in config.mappings}
        self.decoders = decoders_from(config)
        self.connected = False
        self.dead_letter_topic = cfg.dead_letter_topic or "onesignal-bridge.dlq"
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="librdkafka")
        conf = {**DEFAULT_CONSUMER, **cfg.consumer, "bootstrap.servers": cfg.bootstrap_servers,
                "group.id": cfg.group_id}
        self.consumer = Consumer(conf)
        producer_conf = {k: v for k, v in cfg.consumer.items() if k.startswith(("security.", "sasl.", "ssl."))}
        self.producer = Producer({**producer_conf, "bootstrap.servers": cfg.bootstrap_servers})
        self.dead_letters = KafkaDeadLetters(self.producer, self.dead_letter_topic)
        self._assigned: set[tuple[str, int]] = set()
        self._confirmed: dict[tuple[str, int], int] = {}
        self._committed: dict[tuple[str, int], int] = {}
        self._pk_old_rows: OrderedDict[str, dict[str, Any]] = OrderedDict()

    async def _call(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, lambda: fn(*args, **kw))

    # -- checkpoint --------------------------------------------------------------------

    def on_confirm(self, position: Any) -> None:
        """Called by the pipeline for every marker the low watermark passes."""
        topic, partition, offset = position
        tp = (topic, partition)
        if tp in self._assigned and offset >= self._confirmed.get(tp, -1):
            self._confirmed[tp] = offset

    def _to_commit(self, only: set[tuple[str, int]] | None = None) -> list[TopicPartition]:
        out = []
        for tp, off in self._confirmed.items():
            if (only is None or tp in only) and self._committed.get(tp) != off:
                out.append(TopicPartition(tp[0], tp[1], off + 1))
        return out

    def _commit_sync(self, offsets: list[TopicPartition]) -> None:
        if not offsets:
            return
        try:
            self.consumer.commit(offsets=offsets, asynchronous=False)
            for tp in offsets:
                self._committed[(tp.topic, tp.partition)] = tp.offset - 1
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError._NO_OFFSET:
                log.warning("offset commit failed (%s); retried", exc.args[0].str())

    # -- rebalance callbacks (run on the librdkafka thread, inside consume) --------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for p in partitions:
            self._assigned.add((p.topic, p.partition))
        log.info("assigned %s", ", ".join(f"{p.topic}[{p.partition}]" for p in partitions) or "nothing")

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        revoked = {(p.topic, p.partition) for p in partitions}
        self._commit_sync(self._to_commit(revoked))
        for tp in revoked:
            self._assigned.discard(tp)
            self._confirmed.pop(tp, None)
            self._committed.pop(tp, None)
            m.KAFKA_CONSUMER_LAG.remove(tp[0], str(tp[1])) if (tp[0], str(tp[1])) in _lag_labels() else None
        log.info("revoked %s", ", ".join(f"{t}[{p}]" for t, p in sorted(revoked)) or "nothing")

    # -- run ---------------------------------------------------------------------------

    async def run(self, sink: Any, stop: asyncio.Event | None = None,
                  drain: Callable[[], Awaitable[None]] | None = None) -> None:
        stop = stop or asyncio.Event()
        sink.on_confirm = self.on_confirm
        if self.cfg.topic_pattern:
            topics = ["^" + self.cfg.topic_pattern.lstrip("^")]
        else:
            topics = list(self.cfg.topics or [])
        await self._call(self.consumer.subscribe, topics, on_assign=self._on_assign, on_revoke=self._on_revoke)
        self.connected = True
        committer = asyncio.create_task(self._commit_timer())
        lag = asyncio.create_task(self._lag_timer())
        try:
            while not stop.is_set():
                msgs = await self._call(self.consumer.consume, BATCH, 0.5)
                for msg in msgs:
                    if stop.is_set():
                        break
                    await self._handle(msg, sink)
            if drain is not None:
                await drain()
            await self._call(self._commit_sync, self._to_commit())
        finally:
            committer.cancel()
            lag.cancel()
            self.connected = False
            await self._call(self.consumer.close)
            await asyncio.to_thread(self.producer.flush, 10)
            self._pool.shutdown(wait=False)

    async def _handle(self, msg: Message, sink: Any) -> None:
        err = msg.error()
        if err is not None:
            if err.code() != KafkaError._PARTITION_EOF:
                log.warning("consumer error: %s", err.str())
            return
        topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
        position = f"{topic}[{partition}]@{offset}"
        try:
            parsed = debezium.parse_record(topic, msg.key(), msg.value(), _headers(msg),
                                           fmt=self.cfg.format, decoders=self.decoders)
        except debezium.PoisonMessage as exc:
            await self._poison(msg, str(exc))
            sink.mark((topic, partition, offset))
            return
        if parsed.kind == "change" and parsed.table in self.tables:
            event = self._event(parsed, position)
            if event is not None:
                await sink.put(dataclasses.replace(event, seq=sink.issue()), order=parsed.source_order)
        elif parsed.kind == "truncate" and parsed.table in self.tables:
            log.warning("TRUNCATE of %s at %s: OneSignal users are left as they are (on_truncate: ignore)",
                        parsed.table, position)
        sink.mark((topic, partition, offset))

    def _event(self, p: debezium.ParsedMessage, position: str) -> ChangeEvent | None:
        assert p.op is not None and p.table is not None
        op, old = p.op, p.old
        if p.pk_change == "old":  # first half of a primary-key update: never delete the user here
            self._pk_old_rows[_key_id(p.table, p.other_key)] = dict(p.old or p.key)
            while len(self._pk_old_rows) > PK_CACHE:
                self._pk_old_rows.popitem(last=False)
            return None
        if p.pk_change == "new":
            old = self._pk_old_rows.pop(_key_id(p.table, p.key), None)
            op = Op.UPDATE  # from the old row: the identity moves only if its column changed
        return ChangeEvent(p.table, op, p.new, old, p.key, -1, position, p.commit_time)

    async def _poison(self, msg: Message, reason: str) -> None:
        topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
        log.warning("poison record %s[%d]@%d sent to %s: %s", topic, partition, offset, self.dead_letter_topic, reason)
        headers = [
            ("dlq.reason", reason.encode()[:1000]), ("dlq.topic", topic.encode()),
            ("dlq.partition", str(partition).encode()), ("dlq.offset", str(offset).encode()),
        ]
        self.producer.produce(self.dead_letter_topic, key=msg.key(), value=msg.value(), headers=headers)
        remaining = await asyncio.to_thread(self.producer.flush, 30)
        if remaining:
            raise RuntimeError("the dead-letter topic did not acknowledge a poison record; not moving on")
        m.DEAD_LETTERS.labels(topic, "poison").inc()

    async def _commit_timer(self) -> None:
        while True:
            await asyncio.sleep(COMMIT_INTERVAL_S)
            offsets = self._to_commit()
            if offsets:
                await self._call(self._commit_sync, offsets)

    async def _lag_timer(self) -> None:
        while True:
            await asyncio.sleep(LAG_INTERVAL_S)
            for topic, partition in list(self._assigned):
                try:
                    _, high = await self._call(self.consumer.get_watermark_offsets,
                                               TopicPartition(topic, partition), 2.0, True)
                except KafkaException:
                    continue
                done = self._confirmed.get((topic, partition))
                committed = (done + 1) if done is not None else 0
                if high >= 0:
                    m.KAFKA_CONSUMER_LAG.labels(topic, str(partition)).set(max(0, high - committed))


def _lag_labels() -> set[tuple[str, str]]:
    out = set()
    for metric in m.KAFKA_CONSUMER_LAG.collect():
        for sample in metric.samples:
            out.add((sample.labels.get("topic", ""), sample.labels.get("partition", "")))
    return out


def _key_id(table: str, key: dict[str, Any] | None) -> str:
    return table + ":" + orjson.dumps(key or {}, option=orjson.OPT_SORT_KEYS, default=str).decode()

