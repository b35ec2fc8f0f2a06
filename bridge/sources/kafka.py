"""`kafka` source: Debezium change events from Kafka topics, in a consumer group.

- One thread owns the consumer (:mod:`bridge.sources.kafka_consumer`: polling, flow control and
  pausing, rebalance callbacks, commits); it hands fetched batches to the event loop through a
  small buffer and commits what the loop confirms.
- Each record becomes a `ChangeEvent` (via `debezium.parse_record`); every record also gets a
  checkpoint marker `(topic, partition, offset)`. When the pipeline's low watermark passes a
  marker, that offset is *confirmable*; offsets are committed per partition (offset + 1) every
  second, as soon as the pipeline has caught up (everything handed over done), on revocation,
  and at shutdown. Records are handed over a consumed batch at a time (at most BATCH records)
  in one synchronous pass (`Sink.offer`), each batch's offsets marked per partition after it.
  Auto-commit is off: nothing is committed before it was applied or dead-lettered.
- Rebalance: on revocation nothing more of the revoked partitions is handed over, the revocation
  waits (at most 30 s, and half of `max.poll.interval.ms`) until what was handed over from them is
  applied or dead-lettered, then their confirmable offsets are committed, nothing of them is
  committed afterwards, and their buffered records are dropped (a record is handed over only while
  its partition is assigned under the assignment it was fetched with). So their next owner starts
  after this member's requests for them landed: a late older value cannot overwrite its newer
  one. Lost partitions (session expired) are not committed.
- A failure of the consumer thread ends `run` with :class:`bridge.errors.KafkaConsumerError`
  (what happened and what to do), logged with its traceback, so the process exits non-zero and
  is restarted; a failure of the hand-over ends it with that error.
- Poison records (invalid JSON, missing `op`, wrong types) go to the dead-letter topic with
  headers naming the reason and the source topic, partition and offset; the consumer moves on.
- A primary-key update arrives as a delete carrying `__debezium.newkey` and a create carrying
  `__debezium.oldkey`: the delete never deletes the user; the create is handled as an update
  from the old row (or, when the delete was not seen, from the old key in the header), so when
  the identity changed the OneSignal user is renamed in place (issue 15).
- Stale values: events for one user may arrive through different partitions. The pipeline drops
  a value for a (user, field) when an event with a higher source position (`source.lsn`, else
  `ts_ms`) already set it (see `bridge/staleness.py`). Not when the record key is exactly the
  table's identity column: one partition then holds all of a user's events, in order.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Generator
from typing import Any, Protocol, cast

import orjson
from confluent_kafka import Consumer, KafkaException, Message, Producer

from bridge.config import ColumnSpec, Config, KafkaSourceConfig
from bridge.deadletter import DeadLetter, DeadLetterStore
from bridge.errors import SourceError
from bridge.events import ChangeEvent, Op, change_event
from bridge.observability import metrics as m
from bridge.ports import BackfillRequest, Finding, Sink, Source, Statement
from bridge.sources import debezium
from bridge.sources.kafka_consumer import BATCH, DEFAULT_CONSUMER, ConsumerThread
from bridge.subscriptions import MemorySubscriptionState, SubscriptionState

__all__ = ["DEFAULT_CONSUMER", "FEED_BATCH", "KIND", "KafkaDeadLetters", "KafkaKind", "KafkaSource"]

log = logging.getLogger("bridge.source.kafka")

FEED_BATCH = BATCH  # records handed to the pipeline in one synchronous pass (a consumed batch)
PK_CACHE = 10_000


def identity_keyed_tables(config: Config) -> dict[str, str]:
    """{table: identity column} of the tables whose records need no source order: when a record
    key is exactly that column, one partition holds all of that table's events for a user, in
    order, so the parser skips the order (and the stale-value filter with it). Only for a table
    that is the one mapping of its identity label: where another table feeds the same users (an
    `orders` table keyed by order id whose identity is `user_id`), their events come from other
    partitions and a user's deletion must still make older events of the other table stale."""
    per_label = Counter(mp.identity_label for mp in config.mappings)
    per_table = Counter(mp.table for mp in config.mappings)
    return {mp.table: mp.identity_column for mp in config.mappings
            if per_label[mp.identity_label] == 1 and per_table[mp.table] == 1}


class _Consumed(Protocol):
    """A consumed record (a `Message` that is not an error event) as the hand-over reads it."""

    def topic(self) -> str: ...
    def partition(self) -> int: ...
    def offset(self) -> int: ...
    def key(self) -> bytes | None: ...
    def value(self) -> bytes | None: ...
    def headers(self) -> Any: ...


def _headers(raw: Any) -> list[tuple[str, bytes]]:
    """A record's headers (`msg.headers()`) as (name, bytes) pairs."""
    out: list[tuple[str, bytes]] = []
    for k, v in raw.items() if isinstance(raw, dict) else raw or []:
        out.append((k, v if isinstance(v, bytes) else (v.encode() if isinstance(v, str) else b"")))
    return out


def _where(msg: Message | _Consumed) -> tuple[str, int, int]:
    """A consumed record's topic, partition and offset (librdkafka types them optional: they are
    absent only on error events, which never reach here)."""
    return msg.topic() or "", msg.partition() or 0, msg.offset() or 0


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
            raise SourceError(f"{remaining} dead letter(s) not acknowledged by Kafka within 30s; check that the "
                              f"brokers are up and that this client may write to {self.topic}")


class KafkaSource:
    def __init__(self, cfg: KafkaSourceConfig, config: Config) -> None:
        self.cfg = cfg
        # mapped tables and trigger tables (bridge/triggers)
        self.tables = {mp.table for mp in config.mappings} | {t.table for t in config.triggers}
        self.decoders = decoders_from(config)
        self.standby = False  # every member of the group reads its own partitions
        self.lease = None  # the group assigns partitions: no leader lock fences the sends
        self.dead_letter_topic = cfg.dead_letter_topic or "onesignal-bridge.dlq"
        conf = {**DEFAULT_CONSUMER, **cfg.consumer, "bootstrap.servers": cfg.bootstrap_servers,
                "group.id": cfg.group_id}
        self.consumer = Consumer(conf)
        producer_conf = {k: v for k, v in cfg.consumer.items() if k.startswith(("security.", "sasl.", "ssl."))}
        self.producer = Producer({**producer_conf, "bootstrap.servers": cfg.bootstrap_servers})
        self.dead_letters = KafkaDeadLetters(self.producer, self.dead_letter_topic)
        self.thread = ConsumerThread(self.consumer, float(conf.get("max.poll.interval.ms", 300_000)) / 1000)
        self._pk_old_rows: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._keys: dict[Any, dict[str, Any]] = {}  # parsed record keys (debezium.parse_record's key_cache)
        self._sink: Sink | None = None
        self._identity = identity_keyed_tables(config)
        self._positions: dict[tuple[str, int], str] = {}  # "topic[partition]@" per partition

    @property
    def connected(self) -> bool:
        return self.thread.connected

    def on_confirm(self, position: Any) -> None:
        """Called by the pipeline (on the event loop) for every marker the low watermark passes."""
        topic, partition, offset = position
        thread = self.thread
        thread.confirm((topic, partition), offset)
        sink = self._sink
        if sink is not None and sink.idle and not thread.commit_soon:
            # Caught up: everything handed over is done. Commit now (at the consumer thread's next
            # turn, within POLL_S) rather than at the next commit interval.
            thread.commit_soon = True
            thread.room.set()

    async def run(self, sink: Sink, stop: asyncio.Event | None = None,
                  drain: Callable[[], Awaitable[None]] | None = None) -> None:
        stop = stop or asyncio.Event()
        self._sink = sink
        sink.on_confirm(self.on_confirm)
        if self.cfg.topic_pattern:
            topics = ["^" + self.cfg.topic_pattern.lstrip("^")]
        else:
            topics = list(self.cfg.topics or [])
        self.thread.start(topics)
        feeder = asyncio.create_task(self._feed(sink))
        stopped = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({feeder, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if feeder.done():
                feeder.result()  # the hand-over or the consumer thread failed: raise it
                raise SourceError("the Kafka source's hand-over loop stopped without an error (a bug in the "
                                  "bridge; please report it). Nothing that was not applied is committed: the "
                                  "bridge exits to be restarted, and re-reads from the last commit.")
            # Stopping: what is not handed over yet is re-read on the next start (nothing of it
            # is committed), even when the pipeline has no room and the hand-over is waiting.
            feeder.cancel()
            await asyncio.gather(feeder, return_exceptions=True)
            if drain is not None:
                await drain()
            await self.thread.call(self.thread.commit_confirmed)
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError):
                log.error("the Kafka source failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
            raise
        finally:
            for t in (feeder, stopped):
                t.cancel()
            await asyncio.gather(feeder, stopped, return_exceptions=True)
            await self.thread.stop()
            await asyncio.to_thread(self.producer.flush, 10)

    async def _feed(self, sink: Sink) -> None:
        """Hand the buffered batches to the pipeline, one at a time in one synchronous pass
        (`Sink.offer`: no await per record unless the pipeline has no room), letting the event
        loop run (the dispatcher, the health endpoint) between batches."""
        thread = self.thread
        wake = thread.wake
        assert wake is not None
        assigned = thread.assigned
        positions = self._positions
        hand_over = self._hand_over_at
        while True:
            taken = thread.take()
            if taken is not None:
                generation, batch = taken
                # consumed records: librdkafka leaves topic, partition and offset unset only on error
                # events, which the consumer thread keeps out of the buffer
                msgs = cast("list[_Consumed]", batch)
                # Offsets are marked once per partition per batch, after the batch's events: the
                # marker of its last record covers the records before it (commits are per second).
                last: dict[tuple[str, int], int] = {}
                for msg in msgs:
                    topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
                    tp = (topic, partition)
                    # Still assigned under the assignment it was fetched with? (A revocation, even
                    # in the middle of the batch, leaves the rest to the next owner.)
                    got = assigned.get(tp)
                    if got is None or got > generation:
                        continue
                    where = positions.get(tp)
                    if where is None:
                        where = positions[tp] = f"{topic}[{partition}]@"
                    pending = hand_over(msg, topic, partition, offset, where, sink)
                    if pending is not None:
                        await pending
                    last[tp] = offset
                for (topic, partition), offset in last.items():
                    sink.mark((topic, partition, offset))
                thread.handed(last)
                thread.release()
                await _LET_OTHERS_RUN
                continue
            thread.check()
            wake.clear()
            if thread.has_buffered():
                continue
            try:
                await asyncio.wait_for(wake.wait(), 1.0)
            except TimeoutError:
                pass

    def _hand_over(self, msg: Message, sink: Sink) -> Awaitable[None] | None:
        """Parse one record and offer its event (the caller marks its offset after it)."""
        topic, partition, offset = _where(msg)
        return self._hand_over_at(msg, topic, partition, offset, f"{topic}[{partition}]@", sink)

    def _hand_over_at(self, msg: Message | _Consumed, topic: str, partition: int, offset: int, where: str,
                      sink: Sink) -> Awaitable[None] | None:
        """`_hand_over` with the record's coordinates read. Returns what to await first when the
        offer cannot happen at once (no room, a poison record)."""
        raw_headers = msg.headers()
        try:
            parsed = debezium.parse_record(topic, msg.key(), msg.value(),
                                           _headers(raw_headers) if raw_headers else None, fmt=self.cfg.format,
                                           decoders=self.decoders, key_cache=self._keys,
                                           unordered_keys=self._identity)
        except debezium.PoisonMessage as exc:
            return self._poison(msg, str(exc))
        table = parsed.table
        if table in self.tables:
            if parsed.kind == "change":
                event: ChangeEvent | None
                if parsed.pk_change is None:
                    # a change always has its table and op: `table in self.tables` ruled out None
                    event = change_event(table, parsed.op, parsed.new, parsed.old,  # type: ignore[arg-type]  # op: see above
                                         parsed.key, where + str(offset), parsed.commit_time)
                else:
                    event = self._pk_event(parsed, where + str(offset))
                    if event is None:
                        return None
                return sink.offer(event, parsed.source_order)
            if parsed.kind == "truncate":
                log.warning("TRUNCATE of %s at %s[%d]@%d: OneSignal users are left as they are "
                            "(on_truncate: ignore)", table, topic, partition, offset)
        return None

    def _pk_event(self, p: debezium.ParsedMessage, position: str) -> ChangeEvent | None:
        """The event of one half of a primary-key update (or None for the first half)."""
        assert p.op is not None and p.table is not None
        if p.pk_change == "old":  # first half of a primary-key update: never delete the user here
            self._pk_old_rows[_key_id(p.table, p.other_key)] = dict(p.old or p.key)
            while len(self._pk_old_rows) > PK_CACHE:
                self._pk_old_rows.popitem(last=False)
            return None
        old = self._pk_old_rows.pop(_key_id(p.table, p.key), None)
        if old is None and p.other_key:  # the delete half was not seen here (another partition, a
            old = dict(p.other_key)      # restart): the old key from the header names the old user
        # from the old row: a changed identity renames the user (issue 15)
        return change_event(p.table, Op.UPDATE, p.new, old, p.key, position, p.commit_time)

    async def _poison(self, msg: Message | _Consumed, reason: str) -> None:
        topic, partition, offset = _where(msg)
        log.warning("poison record %s[%d]@%d sent to %s: %s", topic, partition, offset, self.dead_letter_topic, reason)
        headers: list[tuple[str, str | bytes | None]] = [
            ("dlq.reason", reason.encode()[:1000]), ("dlq.topic", topic.encode()),
            ("dlq.partition", str(partition).encode()), ("dlq.offset", str(offset).encode()),
        ]
        self.producer.produce(self.dead_letter_topic, key=msg.key(), value=msg.value(), headers=headers)
        remaining = await asyncio.to_thread(self.producer.flush, 30)
        if remaining:
            raise SourceError(f"the dead-letter topic {self.dead_letter_topic} did not acknowledge the poison record "
                              f"{topic}[{partition}]@{offset} within 30s, so the source does not move past it; check "
                              f"that the brokers are up and that this client may write to that topic")
        m.DEAD_LETTERS.labels(topic, "poison").inc()


class _LetOthersRun:
    """Awaiting it yields to the event loop once (what `asyncio.sleep(0)` does), reusable."""

    def __await__(self) -> Generator[None, None, None]:
        yield


_LET_OTHERS_RUN = _LetOthersRun()


def _key_id(table: str, key: dict[str, Any] | None) -> str:
    return table + ":" + orjson.dumps(key or {}, option=orjson.OPT_SORT_KEYS, default=str).decode()


class KafkaKind:
    """The `kafka` source kind: Debezium change events from a consumer group. Nothing to create in a
    database; dead letters go to the dead-letter topic and subscription ids are kept in memory."""

    name = "kafka"
    config_model = KafkaSourceConfig

    def create(self, config: Config) -> Source:
        assert isinstance(config.source, KafkaSourceConfig)
        return KafkaSource(config.source, config)

    def database_dsn(self, config: Config) -> str | None:
        return None

    def dead_letters(self, config: Config, source: Source) -> DeadLetterStore:
        assert isinstance(source, KafkaSource)
        return source.dead_letters

    def subscription_state(self, config: Config) -> SubscriptionState:
        return MemorySubscriptionState()

    def setup(self, config: Config) -> list[Statement]:
        return []

    def teardown(self, config: Config) -> list[Statement]:
        return []

    def checks(self, config: Config) -> list[Finding]:
        """The brokers answer, and the configured topics exist."""
        src = config.source
        assert isinstance(src, KafkaSourceConfig)
        conf = {k: v for k, v in src.consumer.items() if k.startswith(("security.", "sasl.", "ssl."))}
        probe = Producer({**conf, "bootstrap.servers": src.bootstrap_servers})
        try:
            meta = probe.list_topics(timeout=5)
        except KafkaException as exc:
            return [Finding(False, f"Kafka at {src.bootstrap_servers} does not answer: {exc.args[0]}",
                            "check source.bootstrap_servers, the network path and the security settings")]
        out = [Finding(True, f"Kafka at {src.bootstrap_servers} answers ({len(meta.brokers)} broker(s))")]
        for topic in src.topics or []:
            found = topic in meta.topics and meta.topics[topic].error is None
            out.append(Finding(found, f"topic {topic} " + ("exists" if found else "does not exist"),
                               "" if found else "create it, or check Debezium's topic.prefix and source.topics"))
        return out

    def backfill(self, config: Config, request: BackfillRequest) -> int:
        print("backfill: with source.kind kafka, re-snapshot through Debezium (an incremental snapshot signal)",
              file=sys.stderr)
        return 2


KIND = KafkaKind()
