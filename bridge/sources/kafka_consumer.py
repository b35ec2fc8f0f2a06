"""The thread that owns the `kafka` source's consumer, and what it shares with the event loop.

- Every consumer call (subscribe, poll, pause/resume, commit, watermarks, close) and therefore
  every rebalance callback runs on this thread. It shares exactly two things with the event loop,
  both under one lock: a small buffer of fetched records not yet handed to the pipeline, and the
  confirmed offsets. The loop takes records from the buffer (oldest first) and posts
  confirmations; this thread commits them.
- The buffer holds what one `consume()` returned, as it came: (assignment generation, records,
  bytes), so the thread does almost no Python per record (an error check and a size). The loop
  checks each record's partition when it hands it over: a record is handed over only while its
  partition is still assigned under the assignment it was fetched under (generation), so records
  of a revoked partition, or of one revoked and assigned again, are left to their next reading.
- It never stops polling, so the member stays in the group however long the pipeline has no room:
  when the buffer has been full for a second it pauses the assigned partitions and keeps polling
  (which returns nothing while paused but keeps `max.poll.interval.ms` satisfied); it resumes
  them once the buffer has drained. Pausing drops librdkafka's own prefetch and resuming fetches
  from the record after the last one polled, so nothing is lost or reordered.
- Offsets are committed per partition (offset + 1) every second, at once when the loop says it
  caught up, on revocation (before the partitions go, after what was handed over from them was
  applied: `_settle`) and at close. Lost partitions (session
  expired) are not committed.
- When it fails, it records the failure, fails pending commands and closes the consumer; the loop
  raises :class:`bridge.errors.KafkaConsumerError` (see :func:`consumer_failed`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from bridge.errors import KafkaConsumerError, one_line
from bridge.observability import metrics as m

log = logging.getLogger("bridge.source.kafka")

COMMIT_INTERVAL_S = 1.0
LAG_INTERVAL_S = 5.0
BATCH = 500  # records per consume()
POLL_S = 0.1  # the consumer thread's longest wait: bounds the latency of commits and pause/resume
# The buffer between the consumer thread and the pipeline: full at HIGH, room again at LOW.
BUFFER_HIGH, BUFFER_HIGH_BYTES = 2 * BATCH, 8 << 20
BUFFER_LOW, BUFFER_LOW_BYTES = BATCH, 4 << 20
# Full for this long (at most a quarter of max.poll.interval.ms): pause the partitions and poll on.
# Shorter waits are ordinary flow control and keep librdkafka's prefetch, which a pause drops.
PAUSE_AFTER_S = 1.0
PAUSE_LOG_AFTER_S = 5.0  # a pause this long is logged at info
# A revocation waits at most this long (and at most half of max.poll.interval.ms) for what was
# handed over from the revoked partitions to be applied, before it lets them go to their next owner.
REVOKE_WAIT_S = 30.0

DEFAULT_CONSUMER = {
    "enable.auto.commit": False,
    "auto.offset.reset": "earliest",
    "session.timeout.ms": 6000,
    "heartbeat.interval.ms": 1000,
    "enable.partition.eof": False,
    "topic.metadata.refresh.interval.ms": 10000,  # notice new topics (pattern subscriptions) quickly
}

TP = tuple[str, int]


def consumer_failed(failure: BaseException | None, what: str = "failed") -> KafkaConsumerError:
    """The error the source ends with when its consumer thread is gone: what happened, what it
    means for the offsets, and what to do."""
    detail = f": {type(failure).__name__}: {one_line(str(failure), 300)}" if failure is not None else ""
    retriable = True
    hint = ("it is restarted by its supervisor; if it keeps failing, check source.bootstrap_servers, the "
            "security settings in source.consumer and that the brokers are up "
            "(`onesignal-bridge check --config FILE`)")
    if isinstance(failure, KafkaException) and failure.args and isinstance(failure.args[0], KafkaError):
        err: KafkaError = failure.args[0]
        if "subscription" in (err.str() or "").lower() or err.code() == KafkaError._INVALID_ARG:
            retriable = False
            hint = ("correct source.topics or source.topic_pattern (librdkafka reads the pattern as a POSIX "
                    "extended regular expression: no (?:...), lookarounds or \\d) and start it again")
    return KafkaConsumerError(
        f"the Kafka consumer thread {what}{detail}; the kafka source stopped and the process exits non-zero. "
        f"Nothing that was not applied was committed: the next start re-reads from the committed offsets; "
        f"{hint}", retriable=retriable)


class ConsumerThread:
    def __init__(self, consumer: Consumer, max_poll_interval_s: float) -> None:
        self.consumer = consumer
        self.connected = False
        # Shared by the event loop and the consumer thread: only under lock.
        self.lock = threading.Lock()
        self.assigned: dict[TP, int] = {}  # partition -> the assignment (generation) it came with
        self._confirmed: dict[TP, int] = {}  # highest offset the watermark passed
        self._handed: dict[TP, int] = {}  # highest offset handed to the pipeline
        self._revoking: set[TP] = set()  # revoked, waiting for what was handed over to be applied
        self._settled = threading.Condition(self.lock)  # notified when a revoking partition confirms
        self._buffer: deque[tuple[int, list[Message], int]] = deque()  # fetched, not yet handed over
        self._buffered = 0  # records in _buffer
        self._buffer_bytes = 0
        # the batch the event loop took and is still handing over: it counts as buffered until
        # `release()`, so a batch that waits for room keeps the partitions paused
        self._in_hand = (0, 0)
        self._commands: list[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = []
        self.exited = False
        self.commit_soon = False  # set by the loop when it caught up: commit at the next turn
        self.room = threading.Event()  # set by the loop when a full buffer has drained, or a command came
        self._full = False  # under lock
        self.failure: BaseException | None = None
        # The consumer thread's own.
        self._committed: dict[TP, int] = {}
        self._assignment = 0
        self._assignment_changed = False
        self._pause_after = min(PAUSE_AFTER_S, max_poll_interval_s / 4)
        self._revoke_wait_s = min(REVOKE_WAIT_S, max_poll_interval_s / 2)
        self._full_since = 0.0
        self._paused = False
        self._paused_at = 0.0
        self._pause_logged = False
        self._closing = False
        self._closed = False
        self._thread: threading.Thread | None = None
        # The event loop's.
        self._loop: asyncio.AbstractEventLoop | None = None
        self.wake: asyncio.Event | None = None

    # -- the event loop's side -----------------------------------------------------------

    def start(self, topics: list[str]) -> None:
        self._loop = asyncio.get_running_loop()
        self.wake = asyncio.Event()
        self._thread = threading.Thread(target=self._main, args=(topics,), name="kafka-consumer", daemon=True)
        self._thread.start()

    def confirm(self, tp: TP, offset: int) -> None:
        with self.lock:
            if (tp in self.assigned or tp in self._revoking) and offset > self._confirmed.get(tp, -1):
                self._confirmed[tp] = offset
                if tp in self._revoking:
                    self._settled.notify_all()

    def handed(self, last: dict[TP, int]) -> None:
        """The loop handed these offsets (the highest per partition of a batch) to the pipeline."""
        with self.lock:
            handed = self._handed
            for tp, offset in last.items():
                if offset > handed.get(tp, -1):
                    handed[tp] = offset

    def check(self) -> None:
        """Raise :class:`KafkaConsumerError` when the thread is gone."""
        if self.failure is not None:
            raise consumer_failed(self.failure) from self.failure
        if self._thread is not None and not self._thread.is_alive():
            raise consumer_failed(None, "ended unexpectedly")

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the consumer thread (between two polls) and await its result."""
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self.lock:
            if self.exited:
                raise consumer_failed(self.failure, "is not running") from self.failure
            self._commands.append((fn, fut))
        self.room.set()
        return await asyncio.wrap_future(fut)

    def take(self) -> tuple[int, list[Message]] | None:
        """The oldest buffered batch (as one `consume()` returned it) and the assignment generation
        it was fetched under, or None."""
        with self.lock:
            if not self._buffer:
                return None
            generation, msgs, nbytes = self._buffer.popleft()
            self._buffered -= len(msgs)
            self._buffer_bytes -= nbytes
            self._in_hand = (len(msgs), nbytes)
        return generation, msgs

    def release(self) -> None:
        """The batch `take()` returned is handed over: it no longer counts as buffered."""
        with self.lock:
            self._in_hand = (0, 0)
            if self._revoking:
                self._settled.notify_all()
            if self._full and self._buffered <= BUFFER_LOW and self._buffer_bytes <= BUFFER_LOW_BYTES:
                self.room.set()

    def has_buffered(self) -> bool:
        with self.lock:
            return bool(self._buffer)

    async def stop(self) -> None:
        thread = self._thread
        if thread is None:
            return
        with self.lock:
            exited = self.exited  # the thread failed and closed the consumer itself
        if not exited:
            try:
                await self.call(self._close_consumer)
            except Exception as exc:
                log.warning("closing the Kafka consumer: %s: %s", type(exc).__name__, exc)
        await asyncio.to_thread(thread.join, 30)
        if thread.is_alive():
            log.warning("the Kafka consumer thread did not end within 30s")

    # -- the consumer thread -------------------------------------------------------------

    def _main(self, topics: list[str]) -> None:
        try:
            self.consumer.subscribe(topics, on_assign=self._on_assign, on_revoke=self._on_revoke,
                                    on_lost=self._on_lost)
            self.connected = True
            now = time.monotonic()
            next_commit, next_lag = now + COMMIT_INTERVAL_S, now + LAG_INTERVAL_S
            while True:
                if self._commands:
                    self._run_commands()
                if self._closing:
                    break
                if self._flow_control():
                    msgs = self._poll()
                    if msgs:
                        self._enqueue(msgs)
                now = time.monotonic()
                if now >= next_commit or self.commit_soon:
                    self.commit_soon = False
                    self.commit_confirmed()
                    next_commit = now + COMMIT_INTERVAL_S
                if now >= next_lag:
                    self._update_lag()
                    next_lag = now + LAG_INTERVAL_S
        except BaseException as exc:
            self.failure = exc
            log.error("the Kafka consumer thread failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
        finally:
            self.connected = False
            with self.lock:
                self.exited = True
                commands, self._commands = self._commands, []
            for _, fut in commands:
                if fut.set_running_or_notify_cancel():
                    fut.set_exception(consumer_failed(self.failure, "is not running"))
            if not self._closed:
                try:
                    self._close_consumer()
                except Exception as exc:
                    log.warning("closing the Kafka consumer: %s: %s", type(exc).__name__, exc)
            self._notify_loop()

    def _run_commands(self) -> None:
        with self.lock:
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
        """Buffer a consumed batch as it came (errors taken out). Which of its records are still
        wanted is decided when they are handed over (`assigned` and the generation)."""
        nbytes = 0
        bad = False
        for msg in msgs:
            if msg.error() is not None:
                bad = True
                continue
            value, key = msg.value(), msg.key()
            nbytes += (len(value) if value else 0) + (len(key) if key else 0)
        if bad:
            msgs = self._without_errors(msgs)
        if not msgs:
            return
        with self.lock:
            self._buffer.append((self._assignment, msgs, nbytes))
            self._buffered += len(msgs)
            self._buffer_bytes += nbytes
        self._notify_loop()

    @staticmethod
    def _without_errors(msgs: list[Message]) -> list[Message]:
        out = []
        for msg in msgs:
            err = msg.error()
            if err is None:
                out.append(msg)
                continue
            if err.fatal():
                raise KafkaException(err)
            if err.code() != KafkaError._PARTITION_EOF:
                log.warning("consumer error: %s", err.str())
        return out

    def _notify_loop(self) -> None:
        loop, wake = self._loop, self.wake
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
        with self.lock:
            n, nbytes = self._buffered + self._in_hand[0], self._buffer_bytes + self._in_hand[1]
            if not self._full and (n >= BUFFER_HIGH or nbytes >= BUFFER_HIGH_BYTES):
                self._full, self._full_since = True, now
            elif self._full and n <= BUFFER_LOW and nbytes <= BUFFER_LOW_BYTES:
                self._full = False
            self.room.clear()
            want = self._full
        if want and not self._paused and now - self._full_since < self._pause_after:
            self.room.wait(min(POLL_S, self._full_since + self._pause_after - now))
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

    def _to_commit(self, only: set[TP] | None = None) -> list[TopicPartition]:
        with self.lock:
            confirmed = [(tp, off) for tp, off in self._confirmed.items() if only is None or tp in only]
        return [TopicPartition(tp[0], tp[1], off + 1)
                for tp, off in confirmed if self._committed.get(tp) != off]

    def commit_confirmed(self, only: set[TP] | None = None) -> None:
        """Commit what the pipeline confirmed (on this thread: a command from the loop, or here)."""
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
        with self.lock:
            partitions = list(self.assigned)
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

    # -- rebalance callbacks (on this thread, inside poll/consume/close) --------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._assignment += 1
        with self.lock:
            for p in partitions:
                self.assigned[(p.topic, p.partition)] = self._assignment
        self._assignment_changed = True
        log.info("assigned %s", ", ".join(f"{p.topic}[{p.partition}]" for p in partitions) or "nothing")

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        revoked = {(p.topic, p.partition) for p in partitions}
        if not self._closing:  # at close the shutdown drain has already waited for what could go
            self._settle(revoked)
        self.commit_confirmed(revoked)
        dropped = self._forget(revoked)
        left = f" ({dropped} fetched record(s) not handed over are left to the next owner)" if dropped else ""
        log.info("revoked %s%s", ", ".join(f"{t}[{p}]" for t, p in sorted(revoked)) or "nothing", left)

    def _settle(self, revoked: set[TP]) -> None:
        """Before a revocation completes, wait (at most `_revoke_wait_s`) until everything handed
        over from those partitions was applied or dead-lettered, so that their next owner, which
        reads from the commit, never sends a user's value before this member's older request for
        it has landed (a late older value would overwrite the newer one). Nothing more of them is
        handed over meanwhile."""
        deadline = time.monotonic() + self._revoke_wait_s
        with self.lock:
            for tp in revoked:
                self.assigned.pop(tp, None)  # the loop hands over nothing more of them
                self._revoking.add(tp)
            while True:
                behind = [tp for tp in revoked if self._confirmed.get(tp, -1) < self._handed.get(tp, -1)]
                if not behind and not self._in_hand[0]:
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._settled.wait(min(left, POLL_S))
        log.warning("revoking %s: what was handed over from them is not all applied after %.0fs; its "
                    "requests go on, and may reach OneSignal after the next owner's for the same users",
                    ", ".join(f"{t}[{p}]" for t, p in sorted(behind)) or "a batch in hand", self._revoke_wait_s)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        lost = {(p.topic, p.partition) for p in partitions}
        self._forget(lost)
        log.warning("lost %s (this member left the group: session timeout or poll interval); nothing of "
                    "them is committed, the next owner re-reads what was not", ", ".join(
                        f"{t}[{p}]" for t, p in sorted(lost)) or "nothing")

    def _forget(self, partitions: set[TP]) -> int:
        with self.lock:
            for tp in partitions:
                self.assigned.pop(tp, None)
                self._confirmed.pop(tp, None)
                self._handed.pop(tp, None)
                self._revoking.discard(tp)
            kept: deque[tuple[int, list[Message], int]] = deque()
            dropped = 0
            for generation, msgs, nbytes in self._buffer:
                left = [msg for msg in msgs if (msg.topic(), msg.partition()) not in partitions]
                if len(left) != len(msgs):
                    dropped += len(msgs) - len(left)
                    nbytes = sum(_size(msg) for msg in left)
                if left:
                    kept.append((generation, left, nbytes))
            self._buffer = kept
            self._buffered = sum(len(msgs) for _, msgs, _ in kept)
            self._buffer_bytes = sum(nbytes for _, _, nbytes in kept)
        self._assignment_changed = True
        labels = _lag_labels()
        for tp in partitions:
            self._committed.pop(tp, None)
            if (tp[0], str(tp[1])) in labels:
                m.KAFKA_CONSUMER_LAG.remove(tp[0], str(tp[1]))
        return dropped


def _lag_labels() -> set[tuple[str, str]]:
    out = set()
    for metric in m.KAFKA_CONSUMER_LAG.collect():
        for sample in metric.samples:
            out.add((sample.labels.get("topic", ""), sample.labels.get("partition", "")))
    return out


def _size(msg: Message) -> int:
    return len(msg.value() or b"") + len(msg.key() or b"")
