"""Ingest cost per change, stage by stage, in this process (no network, no OneSignal): where the
CPU of figures 1 and 2 goes, for profiling. Not a target figure; prints only.

    .venv/bin/python bench/ingest_stages.py                 # both sources, 50,000 changes each
    .venv/bin/python bench/ingest_stages.py --source kafka  # one of them
    .venv/bin/python bench/ingest_stages.py --profile       # and a cProfile of the whole path

Postgres: the workload of figure 1 (updates of 100 users, REPLICA IDENTITY FULL) is written to a
private cluster and its pgoutput stream read once with `pg_logical_slot_peek_binary_changes`;
the CopyData frames are then replayed (as memoryviews, as psycopg hands them over) through the
real `PostgresSource` reading loop into the real `Pipeline` and `Dispatcher` (its delivery task
not running, so changes coalesce as they would while requests are in flight). Kafka: the records
of figure 2 go through `KafkaSource`'s hand-over (parse, event, offer) into the same pipeline.

Each line is CPU seconds per change (best of `--repeat` passes) with the later stages knocked
out, so the differences are the stages' costs: source only (the pipeline's `offer` a no-op),
+ mapping and the pipeline (the dispatcher's submit a no-op), + the coalescer (everything).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import socket
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT  # noqa: E402,F401  (puts the project first on sys.path)

from bridge.config import parse_config  # noqa: E402
from bridge.dispatch import Dispatcher  # noqa: E402
from bridge.errors import SourceError  # noqa: E402
from bridge.pipeline import Pipeline  # noqa: E402

STAGES = ("source", "+ mapping, pipeline", "+ coalescer (all)")


class _NoDeadLetters:
    async def put(self, letters: list[Any]) -> None:
        return None


def _pipeline(config: Any, stage: int) -> Pipeline:
    def make(done: Any) -> Dispatcher:
        d = Dispatcher(None, config.delivery, _NoDeadLetters(), done)  # type: ignore[arg-type]
        if stage < 2:
            d.submit = d.submit_quiet = lambda change: None  # type: ignore[method-assign]
        return d

    p = Pipeline(config, make)
    if stage < 1:
        p.offer = lambda event, order=(): None  # type: ignore[method-assign]
    return p


# -- Postgres ------------------------------------------------------------------------------------


def capture_pg(changes: int) -> list[memoryview]:
    import tempfile

    import pg_decode as P
    from _common import BridgeRun

    from bridge.devtools.localpg import PgCluster

    cluster = PgCluster(settings={"max_replication_slots": 20, "max_wal_senders": 20})
    cluster.start()
    tmp = tempfile.TemporaryDirectory(prefix="bench-stages-")
    try:
        cluster.create_database("bench")
        cluster.execute(P.DDL, dbname="bench")
        cluster.execute("INSERT INTO users SELECT g, 'crm-' || g, 'free', 'FR', now(), 'fr-FR', 'Europe/Paris', 0"
                        " FROM generate_series(1, 100) g", dbname="bench")
        setup = BridgeRun(ROOT, P.config_for(cluster.dsn("bench"), "http://127.0.0.1:9", "tmpl"), Path(tmp.name),
                          "setup")
        out = setup.cli("setup", "--config", str(setup.config_path))
        if out.returncode != 0:
            raise RuntimeError(out.stderr)
        with cluster.connect("bench") as conn:
            conn.autocommit = True
            conn.execute("CALL bench_workload(%s)", (changes,))
        P.last_commit_end(cluster)  # waits until the workload is flushed
        rows = cluster.execute(
            "SELECT lsn - '0/0'::pg_lsn, data FROM pg_logical_slot_peek_binary_changes('tmpl', NULL, NULL,"
            " 'proto_version', '1', 'publication_names', 'onesignal_bridge')", dbname="bench")
    finally:
        cluster.destroy()
        tmp.cleanup()
    return [memoryview(b"w" + struct.pack("!QQq", int(lsn), int(lsn), 0) + bytes(data)) for lsn, data in rows]


class _ReplayedConnection:
    """What `PostgresSource._read` uses of libpq, over captured CopyData."""

    def __init__(self, frames: list[memoryview]) -> None:
        self.frames, self.i = frames, 0
        self._a, self._b = socket.socketpair()
        self.socket = self._a.fileno()

    def get_copy_data(self, async_: int) -> tuple[int, Any]:
        if self.i < len(self.frames):
            frame = self.frames[self.i]
            self.i += 1
            return len(frame), frame
        return -1, b""

    def get_result(self) -> None:
        return None

    def consume_input(self) -> None:
        return None

    def put_copy_data(self, data: bytes) -> None:
        return None

    def flush(self) -> int:
        return 0

    def close(self) -> None:
        self._a.close()
        self._b.close()


def pg_pass(frames: list[memoryview], stage: int) -> float:
    import pg_decode as P

    from bridge.sources.postgres import PostgresSource

    config = parse_config({"onesignal": {"app_id": "a", "api_key": "k", "base_url": "http://127.0.0.1:9"},
                           "source": {"kind": "postgres", "dsn": "postgresql://x@127.0.0.1:1/x", "snapshot": "never"},
                           "mappings": [P.MAPPING]})

    async def run() -> float:
        p = _pipeline(config, stage)
        src = PostgresSource.from_config(config)
        src._pkeys = {"public.users": ["id"]}
        src.backfills = type("NoBackfills", (), {"on_change": lambda self, *a: None, "open_chunks": False})()  # type: ignore[assignment]
        pg = _ReplayedConnection(frames)
        src._pg = pg
        t0 = time.process_time()
        try:
            await src._read(pg, p)
        except SourceError:
            pass  # the end of the replay
        finally:
            pg.close()
        return time.process_time() - t0

    return asyncio.run(run())


# -- Kafka ---------------------------------------------------------------------------------------


class _Record:
    __slots__ = ("_k", "_o", "_p", "_t", "_v")

    def __init__(self, topic: str, partition: int, offset: int, key: bytes, value: bytes) -> None:
        self._t, self._p, self._o, self._k, self._v = topic, partition, offset, key, value

    def topic(self) -> str:
        return self._t

    def partition(self) -> int:
        return self._p

    def offset(self) -> int:
        return self._o

    def key(self) -> bytes:
        return self._k

    def value(self) -> bytes:
        return self._v

    def headers(self) -> None:
        return None


def kafka_pass(records: list[_Record], stage: int) -> float:
    import kafka_decode as K

    from bridge.sources.kafka import FEED_BATCH, KafkaSource

    config = parse_config({"onesignal": {"app_id": "a", "api_key": "k", "base_url": "http://127.0.0.1:9"},
                           "source": {"kind": "kafka", "bootstrap_servers": "127.0.0.1:1", "group_id": "g",
                                      "topics": [K.TOPIC]},
                           "mappings": [K.MAPPING]})

    async def run() -> float:
        p = _pipeline(config, stage)
        src = KafkaSource(config.source, config)  # type: ignore[arg-type]
        t0 = time.process_time()
        last: dict[tuple[str, int], int] = {}
        for i, rec in enumerate(records):  # what KafkaSource._feed does with a batch
            pending = src._hand_over(rec, p)  # type: ignore[arg-type]
            if pending is not None:
                await pending
            last[(rec.topic(), rec.partition())] = rec.offset()
            if i % FEED_BATCH == FEED_BATCH - 1:
                for (topic, partition), offset in last.items():
                    p.mark((topic, partition, offset))
                last.clear()
                await asyncio.sleep(0)
        return time.process_time() - t0

    return asyncio.run(run())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", choices=("postgres", "kafka", "both"), default="both")
    ap.add_argument("--changes", type=int, default=50_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args(argv)

    runs: list[tuple[str, Callable[[int], float], int]] = []
    if args.source in ("postgres", "both"):
        frames = capture_pg(args.changes)
        n = sum(1 for f in frames if f[25] in (0x49, 0x55, 0x44))
        runs.append(("postgres", lambda stage: pg_pass(frames, stage), n))
    if args.source in ("kafka", "both"):
        import kafka_decode as K

        recs, _ = K.records(args.changes, 500)
        records = [_Record(K.TOPIC, i % K.PARTITIONS, i, k, v) for i, (k, v) in enumerate(recs)]
        runs.append(("kafka", lambda stage: kafka_pass(records, stage), len(records)))
    for name, one_pass, n in runs:
        print(f"{name}: {n:,} changes, CPU µs per change (best of {args.repeat})", flush=True)
        prev = 0.0
        for stage, label in enumerate(STAGES):
            us = min(one_pass(stage) for _ in range(args.repeat)) / n * 1e6
            print(f"  {label:<22} {us:6.1f} µs  (this stage {us - prev:+.1f})  -> {1e6 / us:,.0f} changes/s",
                  flush=True)
            prev = us
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            one_pass(2)
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(20)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
