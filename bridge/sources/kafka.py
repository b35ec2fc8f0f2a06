"""`kafka` source: Debezium change events from Kafka topics, in a consumer group.

- One thread owns the consumer: every consumer call (subscribe, poll, pause/resume, commit,
  watermarks, close) and therefore every rebalance callback runs on it. It shares exactly two
  things with the event loop, both under one lock: a small buffer of fetched records not yet
  handed to the pipeline, and the confirmed offsets. The loop hands records over from the buffer
  (oldest first) and posts confirmations; the consumer thread commits them.
- The consumer thread never stops polling, so the member stays in the group however long the
  pipeline has no room (OneSignal down, a rejected API key, `max_pending_users` or the byte budget
  reached): when the buffer has been full for a second it pauses the assigned partitions and
  keeps polling (which returns nothing while paused but keeps `max.poll.interval.ms` satisfied);
  it resumes them once the buffer has drained. Pausing drops librdkafka's own prefetch and resuming
  fetches from the record after the last one polled, so nothing is lost or reordered.
- Each record becomes a `ChangeEvent` (via `debezium.parse_record`); every record also gets a
  checkpoint marker `(topic, partition, offset)`. When the pipeline's low watermark passes a
  marker, that offset is *confirmable*; offsets are committed per partition (offset + 1) every
  second, as soon as the pipeline has caught up (everything handed over done), on revocation,
  and at shutdown. Records are handed over in batches (at most FEED_BATCH records and about
  FEED_BATCH_BYTES) in one synchronous pass (`Sink.offer`), each batch's offsets marked per
  partition after it. Auto-commit is off:
  nothing is committed before it was applied or dead-lettered.
- Rebalance: on revocation the confirmable offsets of the revoked partitions are committed,
  nothing of them is committed afterwards, and their buffered records are dropped, so unfinished
  work is re-read by the next owner. Lost partitions (session expired) are not committed.
- A failure of the consumer thread (or of the hand-over) ends `run` with the error, logged with
  its traceback, so the process exits non-zero and is restarted.
- Poison records (invalid JSON, missing `op`, wrong types) go to the dead-letter topic with
  headers naming the reason and the source topic, partition and offset; the consumer moves on.
- A primary-key update arrives as a delete carrying `__debezium.newkey` and a create carrying
  `__debezium.oldkey`: the delete never deletes the user; the create is handled as an update
  from the old row (or, when the delete was not seen, from the old key in the header), so when
  the identity changed the OneSignal user is renamed in place (issue 15).
- Stale values: events for one user may arrive through different partitions. The pipeline drops
  a value for a (user, field) when an event with a higher source position (`source.lsn`, else
  `ts_ms`) already set it (see `bridge/staleness.py`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Generator
from typing import Any

import orjson
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from bridge.config import ColumnSpec, Config, KafkaSourceConfig
from bridge.deadletter import DeadLetter, DeadLetterStore
from bridge.events import ChangeEvent, Op, change_event
from bridge.observability import metrics as m
from bridge.ports import BackfillRequest, Finding, Sink, Source, Statement
from bridge.sources import debezium
from bridge.subscriptions import MemorySubscriptionState, SubscriptionState

log = logging.getLogger("bridge.source.kafka")

COMMIT_INTERVAL_S = 1.0
LAG_INTERVAL_S = 5.0
BATCH = 500
FEED_BATCH, FEED_BATCH_BYTES = 500, 1 << 20  # records handed to the pipeline in one synchronous pass
PK_CACHE = 10_000
POLL_S = 0.1  # the consumer thread's longest wait: bounds the latency of commits and pause/resume
# The buffer between the consumer thread and the pipeline: full at HIGH, room again at LOW.
BUFFER_HIGH, BUFFER_HIGH_BYTES = 2 * BATCH, 8 << 20
BUFFER_LOW, BUFFER_LOW_BYTES = BATCH, 4 << 20
# Full for this long (at most a quarter of max.poll.interval.ms): pause the partitions and poll on.
# Shorter waits are ordinary flow control and keep librdkafka's prefetch, which a pause drops.
PAUSE_AFTER_S = 1.0
PAUSE_LOG_AFTER_S = 5.0  # a pause this long is logged at info

DEFAULT_CONSUMER = {
    "enable.auto.commit": False,
    "auto.offset.reset": "earliest",
    "session.timeout.ms": 6000,
    "heartbeat.interval.ms": 1000,
    "enable.partition.eof": False,
    "topic.metadata.refresh.interval.ms": 10000,  # notice new topics (pattern subscriptions) quickly
}


def _headers(raw: Any) -> list[tuple[str, bytes]]:
    """A record's headers (`msg.headers()`) as (name, bytes) pairs."""
    out: list[tuple[str, bytes]] = []
    for k, v in raw.items() if isinstance(raw, dict) else raw or []:
        out.append((k, v if isinstance(v, bytes) else (v.encode() if isinstance(v, str) else b"")))
    return out


def _where(msg: Message) -> tuple[str, int, int]:
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
            raise RuntimeError(f"{remaining} dead letter(s) not acknowledged by Kafka")


class KafkaSource:
    def __init__(self, cfg: KafkaSourceConfig, config: Config) -> None:
        self.cfg = cfg
        # mapped tables and trigger tables (bridge/triggers)
        self.tables = {mp.table for mp in config.mappings} | {t.table for t in config.triggers}
        self.decoders = decoders_from(config)
        self.connected = False
        self.standby = False  # every member of the group reads its own partitions
        self.dead_letter_topic = cfg.dead_letter_topic or "onesignal-bridge.dlq"
        conf = {**DEFAULT_CONSUMER, **cfg.consumer, "bootstrap.servers": cfg.bootstrap_servers,
                "group.id": cfg.group_id}
        self.consumer = Consumer(conf)
        producer_conf = {k: v for k, v in cfg.consumer.items() if k.startswith(("security.", "sasl.", "ssl."))}
        self.producer = Producer({**producer_conf, "bootstrap.servers": cfg.bootstrap_servers})
        self.dead_letters = KafkaDeadLetters(self.producer, self.dead_letter_topic)
        self._pk_old_rows: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._keys: dict[Any, dict[str, Any]] = {}  # parsed record keys (debezium.parse_record's key_cache)
        self._sink: Sink | None = None
        self._commit_soon = False  # set by the loop when it caught up: the consumer thread commits at once
        self._identity = {mp.table: mp.identity_column for mp in config.mappings}
        # Shared by the event loop and the consumer thread: only under _lock.
        self._lock = threading.Lock()
        self._assigned: dict[tuple[str, int], int] = {}  # partition -> the assignment it came with
        self._confirmed: dict[tuple[str, int], int] = {}  # highest offset the watermark passed
        self._buffer: deque[tuple[int, Message]] = deque()  # fetched, not yet handed over
        self._buffer_bytes = 0
        self._commands: list[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = []
        self._exited = False
        # The consumer thread's own.
        self._committed: dict[tuple[str, int], int] = {}
        self._assignment = 0
        self._assignment_changed = False
        max_poll_s = float(conf.get("max.poll.interval.ms", 300_000)) / 1000
        self._pause_after = min(PAUSE_AFTER_S, max_poll_s / 4)
        self._room = threading.Event()  # set by the loop when a full buffer has drained, or a command came
        self._full = False  # under _lock
        self._full_since = 0.0
        self._paused = False
        self._paused_at = 0.0
        self._pause_logged = False
        self._closing = False
        self._closed = False
        self._failure: BaseException | None = None
        self._thread: threading.Thread | None = None
        # The event loop's own.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None

    # -- the event loop's side -----------------------------------------------------------

    def on_confirm(self, position: Any) -> None:
        """Called by the pipeline (on the event loop) for every marker the low watermark passes."""
        topic, partition, offset = position
        tp = (topic, partition)
        with self._lock:
            if tp in self._assigned and offset > self._confirmed.get(tp, -1):
                self._confirmed[tp] = offset
        sink = self._sink
        if sink is not None and sink.idle and not self._commit_soon:
            # Caught up: everything handed over is done. Commit now (at the consumer thread's next
            # turn, within POLL_S) rather than at the next commit interval.
            self._commit_soon = True
            self._room.set()

    async def _on_consumer_thread(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the consumer thread (between two polls) and await its result."""
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._lock:
            if self._exited:
                raise RuntimeError("the Kafka consumer thread is not running") from self._failure
            self._commands.append((fn, fut))
        self._room.set()
        return await asyncio.wrap_future(fut)

    def _next_records(self, limit: int, limit_bytes: int) -> list[tuple[int, Message]]:
        """The oldest buffered records (with the assignment each came with), up to `limit` of them
        and about `limit_bytes` (at least one), all under one lock; those of partitions no longer
        assigned are dropped. What the hand-over holds is thus bounded too, beside the buffer."""
        out: list[tuple[int, Message]] = []
        with self._lock:
            buffer, assigned = self._buffer, self._assigned
            taken = 0
            while buffer and len(out) < limit and taken < limit_bytes:
                item = buffer.popleft()
                msg = item[1]
                taken += _size(msg)
                if assigned.get((msg.topic() or "", msg.partition() or 0)) == item[0]:
                    out.append(item)
            self._buffer_bytes -= taken
            if self._full and len(buffer) <= BUFFER_LOW and self._buffer_bytes <= BUFFER_LOW_BYTES:
                self._room.set()
        return out

    async def run(self, sink: Sink, stop: asyncio.Event | None = None,
                  drain: Callable[[], Awaitable[None]] | None = None) -> None:
        stop = stop or asyncio.Event()
        self._sink = sink
        sink.on_confirm(self.on_confirm)
        if self.cfg.topic_pattern:
            topics = ["^" + self.cfg.topic_pattern.lstrip("^")]
        else:
            topics = list(self.cfg.topics or [])
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._thread = threading.Thread(target=self._consumer_thread, args=(topics,), name="kafka-consumer",
                                        daemon=True)
        self._thread.start()
        feeder = asyncio.create_task(self._feed(sink))
        stopped = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({feeder, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if feeder.done():
                feeder.result()  # the hand-over or the consumer thread failed: raise it
                raise RuntimeError("the Kafka hand-over ended on its own")
            # Stopping: what is not handed over yet is re-read on the next start (nothing of it
            # is committed), even when the pipeline has no room and the hand-over is waiting.
            feeder.cancel()
            await asyncio.gather(feeder, return_exceptions=True)
            if drain is not None:
                await drain()
            await self._on_consumer_thread(self._commit_confirmed)
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError):
                log.error("the Kafka source failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
            raise
        finally:
            for t in (feeder, stopped):
                t.cancel()
            await asyncio.gather(feeder, stopped, return_exceptions=True)
            self.connected = False
            await self._stop_consumer_thread()
            await asyncio.to_thread(self.producer.flush, 10)

    async def _feed(self, sink: Sink) -> None:
        """Hand the buffered records to the pipeline, a batch at a time in one synchronous pass
        (`Sink.offer`: no await per record unless the pipeline has no room), letting the event
        loop run (the dispatcher, the health endpoint) between batches."""
        assert self._wake is not None and self._thread is not None
        hand_over = self._hand_over
        assigned = self._assigned
        while True:
            batch = self._next_records(FEED_BATCH, FEED_BATCH_BYTES)
            if batch:
                # Offsets are marked once per partition per batch, after the batch's events: the
                # marker of its last record covers the records before it (commits are per second).
                last: dict[tuple[str, int], int] = {}
                for assignment, msg in batch:
                    tp = (msg.topic() or "", msg.partition() or 0)
                    # a revocation in the middle of the batch: leave the rest to the next owner
                    if assigned.get(tp) != assignment:
                        continue
                    pending = hand_over(msg, sink)
                    if pending is not None:
                        await pending
                    last[tp] = msg.offset() or 0
                for (topic, partition), offset in last.items():
                    sink.mark((topic, partition, offset))
                await _LET_OTHERS_RUN
                continue
            if self._failure is not None:
                raise RuntimeError("the Kafka consumer thread failed") from self._failure
            if not self._thread.is_alive():
                raise RuntimeError("the Kafka consumer thread ended unexpectedly")
            self._wake.clear()
            with self._lock:
                if self._buffer:
                    continue
            try:
                await asyncio.wait_for(self._wake.wait(), 1.0)
            except TimeoutError:
                pass

    async def _stop_consumer_thread(self) -> None:
        thread = self._thread
        if thread is None:
            return
        with self._lock:
            exited = self._exited  # the thread failed and closed the consumer itself
        if not exited:
            try:
                await self._on_consumer_thread(self._close_consumer)
            except Exception as exc:
                log.warning("closing the Kafka consumer: %s: %s", type(exc).__name__, exc)
        await asyncio.to_thread(thread.join, 30)
        if thread.is_alive():
            log.warning("the Kafka consumer thread did not end within 30s")

    # -- the consumer thread -------------------------------------------------------------

    def _consumer_thread(self, topics: list[str]) -> None:
        try:
            self.consumer.subscribe(topics, on_assign=self._on_assign, on_revoke=self._on_revoke,
                                    on_lost=self._on_lost)
            self.connected = True
            now = time.monotonic()
            next_commit, next_lag = now + COMMIT_INTERVAL_S, now + LAG_INTERVAL_S
            while True:
                self._run_commands()
                if self._closing:
                    break
                if self._flow_control():
                    msgs = self._poll()
                    if msgs:
                        self._enqueue(msgs)
                now = time.monotonic()
                if now >= next_commit or self._commit_soon:
                    self._commit_soon = False
                    self._commit_confirmed()
                    next_commit = now + COMMIT_INTERVAL_S
                if now >= next_lag:
                    self._update_lag()
                    next_lag = now + LAG_INTERVAL_S
        except BaseException as exc:
            self._failure = exc
            log.error("the Kafka consumer thread failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
        finally:
            self.connected = False
            with self._lock:
                self._exited = True
                commands, self._commands = self._commands, []
            for _, fut in commands:
                if fut.set_running_or_notify_cancel():
                    fut.set_exception(RuntimeError("the Kafka consumer thread is not running"))
            if not self._closed:
                try:
                    self._close_consumer()
                except Exception as exc:
                    log.warning("closing the Kafka consumer: %s: %s", type(exc).__name__, exc)
            self._notify_loop()

    def _run_commands(self) -> None:
        with self._lock:
            commands, self._commands = self._commands, []
        for fn, fut in commands:
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc)

    def _close_consumer(self) -> None:
        self._closing = True
        if not self._closed:
            self._closed = True
            self.consumer.close()  # revokes (and so commits) what this member still owns

    def _poll(self) -> list[Message]:
        if self._paused:  # nothing comes while paused; polling keeps this member in the group
            return self.consumer.consume(BATCH, POLL_S)
        first = self.consumer.poll(POLL_S)  # at once when a record is there: no batching delay
        if first is None:
            return []
        return [first, *self.consumer.consume(BATCH - 1, 0)]

    def _enqueue(self, msgs: list[Message]) -> None:
        added = 0
        with self._lock:
            for msg in msgs:
                err = msg.error()
                if err is not None:
                    if err.fatal():
                        raise KafkaException(err)
                    if err.code() != KafkaError._PARTITION_EOF:
                        log.warning("consumer error: %s", err.str())
                    continue
                topic, partition, _ = _where(msg)
                assignment = self._assigned.get((topic, partition))
                if assignment is None:
                    continue  # revoked in the meantime: the next owner reads it
                self._buffer.append((assignment, msg))
                self._buffer_bytes += _size(msg)
                added += 1
        if added:
            self._notify_loop()

    def _notify_loop(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:  # the loop is closed
                pass

    def _flow_control(self) -> bool:
        """Whether to poll now. A full buffer first waits (briefly) for the pipeline; full for longer
        than `_pause_after`, every assigned partition is paused and polling goes on; once the buffer
        has drained to LOW they are resumed."""
        now = time.monotonic()
        with self._lock:
            n, nbytes = len(self._buffer), self._buffer_bytes
            if not self._full and (n >= BUFFER_HIGH or nbytes >= BUFFER_HIGH_BYTES):
                self._full, self._full_since = True, now
            elif self._full and n <= BUFFER_LOW and nbytes <= BUFFER_LOW_BYTES:
                self._full = False
            self._room.clear()
            want = self._full
        if want and not self._paused and now - self._full_since < self._pause_after:
            self._room.wait(min(POLL_S, self._full_since + self._pause_after - now))
            return False
        if want == self._paused and not self._assignment_changed:
            if want and not self._pause_logged and now - self._paused_at >= PAUSE_LOG_AFTER_S:
                self._pause_logged = True
                log.info("paused %d partition(s) for %.0fs: delivery has no room (%d records, %d bytes "
                         "fetched and waiting); still polling, so this member stays in the group",
                         len(self.consumer.assignment()), now - self._paused_at, n, nbytes)
            return True
        partitions = self.consumer.assignment()
        if partitions:
            # also after a rebalance: newly assigned partitions get the current state explicitly
            (self.consumer.pause if want else self.consumer.resume)(partitions)
        self._assignment_changed = False
        if want != self._paused:
            if want:
                self._paused_at, self._pause_logged = now, False
                log.debug("paused %d partition(s): %d records fetched and waiting", len(partitions), n)
            elif self._pause_logged:
                log.info("resumed %d partition(s) after %.1fs: delivery has room again",
                         len(partitions), now - self._paused_at)
            else:
                log.debug("resumed %d partition(s) after %.2fs", len(partitions), now - self._paused_at)
            self._paused = want
        return True

    def _to_commit(self, only: set[tuple[str, int]] | None = None) -> list[TopicPartition]:
        with self._lock:
            confirmed = [(tp, off) for tp, off in self._confirmed.items() if only is None or tp in only]
        return [TopicPartition(tp[0], tp[1], off + 1)
                for tp, off in confirmed if self._committed.get(tp) != off]

    def _commit_confirmed(self, only: set[tuple[str, int]] | None = None) -> None:
        offsets = self._to_commit(only)
        if not offsets:
            return
        try:
            self.consumer.commit(offsets=offsets, asynchronous=False)
            for tp in offsets:
                self._committed[(tp.topic, tp.partition)] = tp.offset - 1
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError._NO_OFFSET:
                log.warning("offset commit failed (%s); retried", exc.args[0].str())

    def _update_lag(self) -> None:
        with self._lock:
            partitions = list(self._assigned)
            confirmed = dict(self._confirmed)
        for topic, partition in partitions:
            try:
                _, high = self.consumer.get_watermark_offsets(TopicPartition(topic, partition), 2.0, True)
            except KafkaException:
                continue
            done = confirmed.get((topic, partition))
            committed = (done + 1) if done is not None else 0
            if high >= 0:
                m.KAFKA_CONSUMER_LAG.labels(topic, str(partition)).set(max(0, high - committed))

    # -- rebalance callbacks (on the consumer thread, inside poll/consume/close) -----------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._assignment += 1
        with self._lock:
            for p in partitions:
                self._assigned[(p.topic, p.partition)] = self._assignment
        self._assignment_changed = True
        log.info("assigned %s", ", ".join(f"{p.topic}[{p.partition}]" for p in partitions) or "nothing")

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        revoked = {(p.topic, p.partition) for p in partitions}
        self._commit_confirmed(revoked)
        dropped = self._forget(revoked)
        left = f" ({dropped} fetched record(s) not handed over are left to the next owner)" if dropped else ""
        log.info("revoked %s%s", ", ".join(f"{t}[{p}]" for t, p in sorted(revoked)) or "nothing", left)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        lost = {(p.topic, p.partition) for p in partitions}
        self._forget(lost)
        log.warning("lost %s (this member left the group: session timeout or poll interval); nothing of "
                    "them is committed, the next owner re-reads what was not", ", ".join(
                        f"{t}[{p}]" for t, p in sorted(lost)) or "nothing")

    def _forget(self, partitions: set[tuple[str, int]]) -> int:
        with self._lock:
            for tp in partitions:
                self._assigned.pop(tp, None)
                self._confirmed.pop(tp, None)
            kept = deque(item for item in self._buffer
                         if (item[1].topic(), item[1].partition()) not in partitions)
            dropped = len(self._buffer) - len(kept)
            self._buffer = kept
            self._buffer_bytes = sum(_size(msg) for _, msg in kept)
        self._assignment_changed = True
        labels = _lag_labels()
        for tp in partitions:
            self._committed.pop(tp, None)
            if (tp[0], str(tp[1])) in labels:
                m.KAFKA_CONSUMER_LAG.remove(tp[0], str(tp[1]))
        return dropped

    def _hand_over(self, msg: Message, sink: Sink) -> Awaitable[None] | None:
        """Parse one record and offer its event (the caller marks its offset after it). Returns
        what to await first when that cannot happen at once (no room, a poison record)."""
        topic, partition, offset = msg.topic() or "", msg.partition() or 0, msg.offset() or 0
        raw_headers = msg.headers()
        try:
            parsed = debezium.parse_record(topic, msg.key(), msg.value(),
                                           _headers(raw_headers) if raw_headers else None, fmt=self.cfg.format,
                                           decoders=self.decoders, key_cache=self._keys)
        except debezium.PoisonMessage as exc:
            return self._poison(msg, str(exc))
        if parsed.kind == "change" and parsed.table in self.tables:
            event = self._event(parsed, f"{topic}[{partition}]@{offset}")
            if event is not None:
                # One partition holds all of a user's events when the record key is the user's
                # identity: nothing can arrive out of order, so no stale-value filtering.
                key = parsed.key
                order = () if len(key) == 1 and self._identity.get(parsed.table) in key else parsed.source_order
                return sink.offer(event, order)
        elif parsed.kind == "truncate" and parsed.table in self.tables:
            log.warning("TRUNCATE of %s at %s[%d]@%d: OneSignal users are left as they are (on_truncate: ignore)",
                        parsed.table, topic, partition, offset)
        return None

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
            if old is None and p.other_key:  # the delete half was not seen here (another partition, a
                old = dict(p.other_key)      # restart): the old key from the header names the old user
            op = Op.UPDATE  # from the old row: a changed identity renames the user (issue 15)
        return change_event(p.table, op, p.new, old, p.key, position, p.commit_time)

    async def _poison(self, msg: Message, reason: str) -> None:
        topic, partition, offset = _where(msg)
        log.warning("poison record %s[%d]@%d sent to %s: %s", topic, partition, offset, self.dead_letter_topic, reason)
        headers: list[tuple[str, str | bytes | None]] = [
            ("dlq.reason", reason.encode()[:1000]), ("dlq.topic", topic.encode()),
            ("dlq.partition", str(partition).encode()), ("dlq.offset", str(offset).encode()),
        ]
        self.producer.produce(self.dead_letter_topic, key=msg.key(), value=msg.value(), headers=headers)
        remaining = await asyncio.to_thread(self.producer.flush, 30)
        if remaining:
            raise RuntimeError("the dead-letter topic did not acknowledge a poison record; not moving on")
        m.DEAD_LETTERS.labels(topic, "poison").inc()


class _LetOthersRun:
    """Awaiting it yields to the event loop once (what `asyncio.sleep(0)` does), reusable."""

    def __await__(self) -> Generator[None, None, None]:
        yield


_LET_OTHERS_RUN = _LetOthersRun()


def _lag_labels() -> set[tuple[str, str]]:
    out = set()
    for metric in m.KAFKA_CONSUMER_LAG.collect():
        for sample in metric.samples:
            out.add((sample.labels.get("topic", ""), sample.labels.get("partition", "")))
    return out


def _size(msg: Message) -> int:
    return len(msg.value() or b"") + len(msg.key() or b"")


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
