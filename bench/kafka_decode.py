"""Figure 2: Kafka decode. Changes/s through the bridge's `kafka` source (consume + Debezium parse +
mapping, OneSignal stubbed out at the dispatcher boundary) versus a bare confluent-kafka consume
loop over the same topic. Target: ratio >= 0.5.

    .venv/bin/python bench/kafka_decode.py            # 200,000 records, 5 rounds; updates docs/BENCHMARKS.md
    .venv/bin/python bench/kafka_decode.py --quick    # 20,000 records, 2 rounds; prints only
    .venv/bin/python bench/kafka_decode.py --profile  # also one cProfile'd bridge pass

Broker: tansu (tests/kafkabroker.py, memory storage) on loopback. One topic of 4 partitions, keyed
by the row id, holding Debezium PostgreSQL-connector change events as JsonConverter writes them
without the schema wrapper (`schemas.enable=false`, `decimal.handling.mode=string`, timestamps as
MicroTimestamp numbers): an 8-column `public.users` row, 40% `c`, 40% `u` (with the full `before`,
REPLICA IDENTITY FULL), 20% `d`, with a `source` block (lsn, sequence, txId, ts_ms...).

Both readers use a fresh consumer group on the same topic, with the bridge's consumer settings,
and are timed from the first record they get to the last (the group join, ~3 s with
session.timeout.ms=6000, is left out of both). Rounds alternate which reader goes first.
- bare loop: `consumer.consume(500, 0.5)` on this thread, touching `msg.value()` of each record.
- bridge: `KafkaSource(cfg, config).run(pipeline)` in this process (librdkafka on its own thread,
  `debezium.parse_record`, the real `Pipeline`: stale-value filter, mapping, checkpoint markers)
  with a stub dispatcher that accepts each change and reports it done.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import random
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import orjson  # noqa: E402
from _common import counting_pipeline, machine, machine_line, median, spread, write_section  # noqa: E402
from confluent_kafka import Consumer, Producer  # noqa: E402
from kafkabroker import KafkaBroker  # noqa: E402

from bridge.config import parse_config  # noqa: E402
from bridge.sources.kafka import DEFAULT_CONSUMER, KafkaSource  # noqa: E402

TOPIC = "dbserver1.public.users"
PARTITIONS = 4
MAPPING = {
    "table": "public.users",
    "identity": {"external_id": "id"},
    "aliases": {"crm_id": "crm_id"},
    "tags": {"plan": "plan", "country": "country", "signup_at": {"column": "created_at", "decode": "micro_timestamp"},
             "score": "score"},
    "properties": {"language": "locale", "timezone_id": "tz"},
    "on_delete": "delete_user",
}


def _row(i: int, plan: str) -> dict:
    return {"id": i, "crm_id": f"crm-{i}", "plan": plan, "country": "FR", "created_at": 1714558272123456 + i,
            "locale": "fr-FR", "tz": "Europe/Paris", "score": f"{i % 1000}.00"}


def records(n: int, seed: int = 7) -> list[tuple[bytes, bytes]]:
    """n Debezium envelopes: inserts, then updates and deletes of rows inserted earlier."""
    rng = random.Random(seed)
    out: list[tuple[bytes, bytes]] = []
    live: list[int] = []
    next_id = 1
    lsn = 40_000_000
    ts = 1_714_558_272_000
    for k in range(n):
        r = rng.random()
        if r < 0.4 or len(live) < 100:
            i, op, before, after = next_id, "c", None, _row(next_id, "free")
            next_id += 1
            live.append(i)
        elif r < 0.8:
            i = live[rng.randrange(len(live))]
            op, before, after = "u", _row(i, "free"), _row(i, "pro")
        else:
            i = live.pop(rng.randrange(len(live)))
            op, before, after = "d", _row(i, "pro"), None
        lsn += 120
        ts += 1
        source = {"version": "2.5.0.Final", "connector": "postgresql", "name": "dbserver1", "ts_ms": ts,
                  "snapshot": "false", "db": "app", "sequence": f'["{lsn - 120}","{lsn}"]', "schema": "public",
                  "table": "users", "txId": 1000 + k // 100, "lsn": lsn, "xmin": None}
        value = {"before": before, "after": after, "source": source, "op": op, "ts_ms": ts + 5,
                 "transaction": None}
        out.append((orjson.dumps({"id": i}), orjson.dumps(value)))
    return out


def produce(bootstrap: str, recs: list[tuple[bytes, bytes]]) -> None:
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "batch.num.messages": 2000,
                  "enable.idempotence": False, "acks": "all", "queue.buffering.max.messages": 500_000})
    errors: list[object] = []
    for key, value in recs:
        while True:
            try:
                p.produce(TOPIC, value=value, key=key, on_delivery=lambda e, m: errors.append(e) if e else None)
                break
            except BufferError:
                p.poll(0.05)
        p.poll(0)
    left = p.flush(120)
    if left or errors:
        raise RuntimeError(f"produce failed: {left} left, {len(errors)} errors ({errors[:1]})")


def consumer_conf(bootstrap: str, group: str) -> dict:
    return {**DEFAULT_CONSUMER, "bootstrap.servers": bootstrap, "group.id": group}


def run_bare(bootstrap: str, expected: int) -> float:
    c = Consumer(consumer_conf(bootstrap, f"bare-{uuid.uuid4().hex[:8]}"))
    c.subscribe([TOPIC])
    n = 0
    first = last = 0.0
    size = 0
    deadline = time.monotonic() + 300
    try:
        while n < expected and time.monotonic() < deadline:
            for msg in c.consume(500, 0.5):
                if msg.error() is not None:
                    continue
                if n == 0:
                    first = time.perf_counter()
                size += len(msg.value())
                n += 1
            last = time.perf_counter()
    finally:
        c.close()
    if n < expected:
        raise RuntimeError(f"bare consumer read {n} of {expected}")
    return (expected - 1) / (last - first)


def run_bridge(bootstrap: str, expected: int, profile: cProfile.Profile | None = None) -> float:
    config = parse_config({
        "onesignal": {"app_id": "bench", "api_key": "bench", "base_url": "http://127.0.0.1:9"},
        "source": {"kind": "kafka", "bootstrap_servers": bootstrap, "group_id": f"bridge-{uuid.uuid4().hex[:8]}",
                   "topics": [TOPIC], "format": "debezium-json"},
        "mappings": [MAPPING],
    })

    async def main() -> float:
        done = asyncio.Event()
        pipeline = counting_pipeline(config, expected, done)
        source = KafkaSource(config.source, config)  # type: ignore[arg-type]
        stop = asyncio.Event()
        task = asyncio.create_task(source.run(pipeline, stop))
        waiter = asyncio.create_task(done.wait())
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED, timeout=300)
        if not done.is_set():
            if task.done():
                task.result()
            raise RuntimeError(f"bridge read {pipeline.seen} of {expected}")
        stop.set()
        await asyncio.wait_for(task, 60)
        assert pipeline.first is not None and pipeline.last is not None
        return (expected - 1) / (pipeline.last - pipeline.first)

    if profile is not None:
        profile.enable()
    try:
        return asyncio.run(main())
    finally:
        if profile is not None:
            profile.disable()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="20,000 records, 2 rounds, no docs update")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.records, args.rounds, args.no_write = 20_000, 2, True

    info = machine()
    broker = KafkaBroker().start()
    try:
        broker.create_topic(TOPIC, PARTITIONS)
        recs = records(args.records)
        avg = sum(len(v) for _, v in recs) / len(recs)
        t0 = time.perf_counter()
        produce(broker.bootstrap, recs)
        print(f"produced {len(recs):,} records (mean value {avg:.0f} bytes) in {time.perf_counter() - t0:.1f} s",
              flush=True)
        del recs
        bare: list[float] = []
        brg: list[float] = []
        ratios: list[float] = []
        for r in range(args.rounds):
            order = ("bare", "bridge") if r % 2 == 0 else ("bridge", "bare")
            res = {}
            for who in order:
                res[who] = run_bare(broker.bootstrap, args.records) if who == "bare" else \
                    run_bridge(broker.bootstrap, args.records)
            bare.append(res["bare"])
            brg.append(res["bridge"])
            ratios.append(res["bridge"] / res["bare"])
            print(f"round {r + 1}/{args.rounds}: bare consume {bare[-1]:,.0f}/s, bridge {brg[-1]:,.0f}/s, "
                  f"ratio {ratios[-1]:.2f}", flush=True)
        if args.profile:
            prof = cProfile.Profile()
            rate = run_bridge(broker.bootstrap, args.records, prof)
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(18)
            print(f"\nprofiled bridge pass (cProfile inflates Python-heavy code): {rate:,.0f}/s\n{buf.getvalue()}")
    finally:
        broker.stop()

    ok = median(ratios) >= 0.5
    table = "\n".join([
        f"Machine: {machine_line(info)}. Broker: tansu (memory storage) on loopback.",
        "",
        f"Command: `.venv/bin/python bench/kafka_decode.py --records {args.records} --rounds {args.rounds}`. "
        f"{args.records:,} Debezium JSON envelopes (no schema wrapper, mean {avg:.0f} bytes; 40% c, 40% u with "
        f"full before, 20% d; 8 columns) in one {PARTITIONS}-partition topic. Each pass: a fresh consumer group, "
        "timed from its first record to its last; rounds alternate which reader goes first.",
        "",
        "| reader | changes/s, median (range) over rounds |",
        "|---|---:|",
        f"| bare confluent-kafka `consume(500)` loop | {spread(bare)} |",
        f"| bridge: kafka source + Debezium parse + mapping, dispatcher stubbed | {spread(brg)} |",
        "",
        f"Ratio bridge / bare loop, median of the per-round ratios: **{median(ratios):.2f}** "
        f"(range {min(ratios):.2f}–{max(ratios):.2f}; target >= 0.5: {'met' if ok else 'missed'}).",
    ])
    print("\n" + table)
    if not args.no_write:
        write_section("kafka-decode", "2. Kafka decode", table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
