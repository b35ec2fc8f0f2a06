"""Figure 2: Kafka ingest. Debezium change events/s the bridge consumes, parses, maps, coalesces,
applies to the OneSignal simulator and commits, versus a plain confluent-kafka loop that consumes
the same topic and `orjson.loads` each value. Target: ratio >= 0.2 (the goal 0.5).

    .venv/bin/python bench/kafka_decode.py                       # 200,000 records, 500 users, 5 rounds;
                                                                 # updates docs/BENCHMARKS.md
    .venv/bin/python bench/kafka_decode.py --before /tmp/before  # also the bridge of another checkout
    .venv/bin/python bench/kafka_decode.py --quick               # 30,000 records, 2 rounds; prints only
    .venv/bin/python bench/kafka_decode.py --profile FILE        # also one py-spy'd bridge pass
    .venv/bin/python bench/kafka_decode.py --replicas 2          # also 2 bridge processes in one group
    .venv/bin/python bench/kafka_decode.py --timeline            # and each pass's requests over time

Broker: tansu (tests/kafkabroker.py, memory storage) on loopback. One topic of 4 partitions,
keyed by the row id (the mapping's identity), holding Debezium PostgreSQL-connector change events
as JsonConverter writes them without the schema wrapper (`schemas.enable=false`,
`decimal.handling.mode=string`, timestamps as MicroTimestamp numbers): an 8-column `public.users`
row of one of `--users` users (500); a user's first event is a `c`, the rest are `u` (with the full
`before`, REPLICA IDENTITY FULL); every event has a `source` block (lsn, sequence, txId, ts_ms...).
(No deletes: a user deleted and created again within one flush window makes the dispatcher send a
DELETE for a user OneSignal never had, which it retries as replication lag for
`onesignal.consistency_window_s`; that would measure the dispatcher's 404 policy, not ingest.)

Each pass uses a fresh consumer group on the same topic, with the bridge's consumer settings.
Rounds run every reader once, in a rotating order.
- plain loop: `consumer.consume(500, 0.5)` on this thread and `orjson.loads(msg.value())` of each
  record; timed from the assignment (its on_assign callback) to the last record.
- bridge: `python -m bridge run` (a process, default delivery settings) against the simulator,
  timed from its `assigned` log line (process start-up and the group join excluded) to the
  moment its group's committed offsets reach the end of every partition (polled every 20 ms):
  every record parsed, mapped, applied by the simulator (2xx) and committed. The simulator is
  reset before each bridge pass and checked after it: every user holds its last event's `plan`
  and `score`.
"""

from __future__ import annotations

import argparse
import random
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import orjson  # noqa: E402
from _common import (  # noqa: E402
    API_KEY,
    APP_ID,
    ROOT,
    BridgeRun,
    Simulator,
    free_port,
    git_describe,
    machine,
    machine_line,
    median,
    spread,
    write_section,
)
from confluent_kafka import Consumer, Producer, TopicPartition  # noqa: E402
from kafkabroker import KafkaBroker  # noqa: E402

from bridge.sources.kafka import DEFAULT_CONSUMER  # noqa: E402

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
MISMATCHES: list[str] = []
ASSIGNMENTS: list[str] = []  # with --replicas: each pass's partitions per replica, in order


def _row(i: int, plan: str, score: int) -> dict[str, Any]:
    return {"id": i, "crm_id": f"crm-{i}", "plan": plan, "country": "FR", "created_at": 1714558272123456 + i,
            "locale": "fr-FR", "tz": "Europe/Paris", "score": f"{score}.00"}


def records(n: int, users: int, seed: int = 7) -> tuple[list[tuple[bytes, bytes]], dict[str, tuple[str, str] | None]]:
    """n Debezium envelopes over `users` users, and each user's final (plan, score)."""
    rng = random.Random(seed)
    out: list[tuple[bytes, bytes]] = []
    state: dict[int, tuple[str, int]] = {}
    lsn = 40_000_000
    ts = 1_714_558_272_000
    for k in range(n):
        i = k + 1 if k < users else rng.randint(1, users)
        cur = state.get(i)
        if cur is None:
            op, before, after = "c", None, _row(i, "free", 0)
            state[i] = ("free", 0)
        else:
            plan, score = cur
            nxt = ("pro" if plan == "free" else "free", score + 1)
            op, before, after = "u", _row(i, plan, score), _row(i, *nxt)
            state[i] = nxt
        lsn += 120
        ts += 1
        source = {"version": "2.5.0.Final", "connector": "postgresql", "name": "dbserver1", "ts_ms": ts,
                  "snapshot": "false", "db": "app", "sequence": f'["{lsn - 120}","{lsn}"]', "schema": "public",
                  "table": "users", "txId": 1000 + k // 100, "lsn": lsn, "xmin": None}
        value = {"before": before, "after": after, "source": source, "op": op, "ts_ms": ts + 5,
                 "transaction": None}
        out.append((orjson.dumps({"id": i}), orjson.dumps(value)))
    want: dict[str, tuple[str, str] | None] = {str(i): (s[0], f"{s[1]}.00") for i, s in state.items()}
    return out, want


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


def end_offsets(bootstrap: str) -> dict[int, int]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"probe-{uuid.uuid4().hex[:8]}"})
    try:
        return {p: c.get_watermark_offsets(TopicPartition(TOPIC, p), 10)[1] for p in range(PARTITIONS)}
    finally:
        c.close()


def run_plain(bootstrap: str, expected: int) -> float:
    """Seconds from the assignment to the last record consumed and parsed."""
    c = Consumer({**DEFAULT_CONSUMER, "bootstrap.servers": bootstrap, "group.id": f"plain-{uuid.uuid4().hex[:8]}"})
    assigned: list[float] = []
    c.subscribe([TOPIC], on_assign=lambda consumer, parts: assigned.append(time.perf_counter()))
    n = 0
    last = 0.0
    loads = orjson.loads
    deadline = time.monotonic() + 300
    try:
        while n < expected and time.monotonic() < deadline:
            for msg in c.consume(500, 0.5):
                if msg.error() is not None:
                    continue
                loads(msg.value())
                n += 1
            last = time.perf_counter()
    finally:
        c.close()
    if n < expected or not assigned:
        raise RuntimeError(f"plain consumer read {n} of {expected}")
    return last - assigned[0]


def check_applied(sim: Simulator, want: dict[str, tuple[str, str] | None]) -> str | None:
    got: dict[str, tuple[Any, Any]] = {}
    for u in sim.users():
        ext = (u.get("identity") or {}).get("external_id")
        if ext is not None:
            tags = (u.get("properties") or {}).get("tags") or {}
            got[ext] = (tags.get("plan"), tags.get("score"))
    bad = [k for k, v in want.items() if got.get(k) != v]
    if bad:
        k = bad[0]
        return f"{len(bad)} of {len(want)} users differ (user {k}: simulator {got.get(k)}, last event {want[k]})"
    return None


def timeline(sim: Simulator) -> str:
    """The last pass's requests to the simulator, counted per 0.25 s after the first one."""
    reqs = sim.http.get("/_simulator/requests").json()["requests"]
    if not reqs:
        return "no requests"
    t0 = min(r["time"] for r in reqs)
    per: dict[float, int] = {}
    for r in reqs:
        slot = int((r["time"] - t0) * 4) / 4
        per[slot] = per.get(slot, 0) + 1
    return f"{len(reqs)} requests; per 0.25 s: " + " ".join(f"{k:.2f}:{v}" for k, v in sorted(per.items()))


def run_bridge(root: Path, bootstrap: str, sim: Simulator, ends: dict[int, int], workdir: Path, name: str,
               want: dict[str, tuple[str, str] | None], timeout: float = 600, profile_to: Path | None = None,
               replicas: int = 1) -> float:
    """Seconds from the first `assigned` log line to every partition committed at its end.
    `replicas` processes, started together, share one consumer group (the chart's scale-out for
    Kafka); each logs which partitions it got (kept in ASSIGNMENTS)."""
    sim.reset()
    group = f"bridge-{uuid.uuid4().hex[:8]}"
    runs = []
    for n in range(replicas):
        config = {
            "onesignal": {"app_id": APP_ID, "api_key": API_KEY, "base_url": sim.base_url},
            "source": {"kind": "kafka", "bootstrap_servers": bootstrap, "group_id": group, "topics": [TOPIC],
                       "format": "debezium-json"},
            "mappings": [MAPPING],
            "metrics": {"port": free_port(), "host": "127.0.0.1"},
        }
        runs.append(BridgeRun(root, config, workdir, name if replicas == 1 else f"{name}-r{n}"))
    b = runs[0]
    probe = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    parts = [TopicPartition(TOPIC, p) for p in range(PARTITIONS)]
    spy = None
    for run in runs:
        run.start(watch=("assigned",))
    try:
        if profile_to is not None:
            from pg_decode import profiler

            spy = subprocess.Popen([profiler(), "record", "-r", "200", "--threads", "-f", "raw",
                                        "-o", str(profile_to),
                                    "-p", str(b.proc.pid)],  # type: ignore[union-attr]
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        done_at = None
        while time.monotonic() < deadline:
            committed = probe.committed(parts, 10)
            if all(tp.offset >= ends[tp.partition] for tp in committed):
                done_at = time.perf_counter()
                break
            for run in runs:
                if not run.alive():
                    raise RuntimeError(f"bridge exited:\n{run.logs()[-3000:]}")
            time.sleep(0.02)
        seen = [t for t in (run.seen("assigned") for run in runs) if t is not None]
        if done_at is None or not seen:
            raise RuntimeError(f"bridge did not commit every record within {timeout}s:\n{b.logs()[-3000:]}")
        started = min(seen)
        if replicas > 1:
            ASSIGNMENTS.append(" / ".join(
                " then ".join(",".join(re.findall(r"\[(\d+)\]", line)) or "-" for line in run.logs().splitlines()
                              if " assigned " in line) for run in runs))
    finally:
        probe.close()
        for run in runs:
            run.stop()
        if spy is not None:
            spy.wait(30)
    problem = check_applied(sim, want)
    if problem:
        MISMATCHES.append(f"{name}: {problem}")
        print(f"  {name}: committed, but the simulator does not hold the final rows: {problem}", flush=True)
    return done_at - started


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--users", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--before", type=Path, help="a checkout of an earlier bridge (git worktree) to run side by side")
    ap.add_argument("--quick", action="store_true", help="30,000 records, 2 rounds, no docs update")
    ap.add_argument("--profile", type=Path, help="one extra bridge pass under py-spy; raw samples to this file")
    ap.add_argument("--replicas", type=int, default=1,
                    help="also run N bridge processes in one consumer group (scale-out), side by side")
    ap.add_argument("--timeline", action="store_true",
                    help="after each bridge pass, print its OneSignal requests per 0.25 s (where the time goes)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.records, args.rounds, args.no_write = 30_000, 2, True
    trees: dict[str, Path] = {"bridge": ROOT}
    if args.before:
        trees = {"before": args.before.resolve(), "after": ROOT}

    info = machine()
    described = {who: git_describe(path) for who, path in trees.items()}
    broker = KafkaBroker().start()
    tmp = tempfile.TemporaryDirectory(prefix="bench-kafka-")
    workdir = Path(tmp.name)
    sim = Simulator(workdir, log_size=10_000)
    try:
        broker.create_topic(TOPIC, PARTITIONS)
        recs, want = records(args.records, args.users)
        avg = sum(len(v) for _, v in recs) / len(recs)
        t0 = time.perf_counter()
        produce(broker.bootstrap, recs)
        del recs
        ends = end_offsets(broker.bootstrap)
        print(f"produced {args.records:,} records over {args.users} users (mean value {avg:.0f} bytes) in "
              f"{time.perf_counter() - t0:.1f} s; end offsets {ends}", flush=True)
        readers = ["plain", *trees]
        scaled = f"bridge x{args.replicas}"
        if args.replicas > 1:
            readers.append(scaled)
        rates: dict[str, list[float]] = {who: [] for who in readers}
        for r in range(args.rounds):
            order = readers[r % len(readers):] + readers[: r % len(readers)]
            secs: dict[str, float] = {}
            for who in order:
                if who == "plain":
                    secs[who] = run_plain(broker.bootstrap, args.records)
                elif who == scaled:
                    secs[who] = run_bridge(ROOT, broker.bootstrap, sim, ends, workdir, f"x{args.replicas}-{r}", want,
                                           replicas=args.replicas)
                else:
                    secs[who] = run_bridge(trees[who], broker.bootstrap, sim, ends, workdir, f"{who}-{r}", want)
                    if args.timeline:
                        print(f"  {who} pass: {timeline(sim)}", flush=True)
                rates[who].append(args.records / secs[who])
            line = ", ".join(f"{who} {secs[who]:.2f} s ({args.records / secs[who]:,.0f}/s)" for who in readers)
            ratios = ", ".join(f"{who}/plain {secs['plain'] / secs[who]:.3f}" for who in readers[1:])
            print(f"round {r + 1}/{args.rounds}: {line}; {ratios}", flush=True)
        if args.profile:
            t = run_bridge(ROOT, broker.bootstrap, sim, ends, workdir, "profiled", want, profile_to=args.profile)
            print(f"\nprofiled bridge pass: {t:.2f} s; py-spy raw samples in {args.profile}")
    finally:
        sim.close()
        broker.stop()
        tmp.cleanup()

    def ratios(who: str) -> list[float]:
        return [b / p for b, p in zip(rates[who], rates["plain"], strict=True)]

    rows = ["| reader | records/s, median (range) | ratio to the plain loop, median (range) |",
            "|---|---:|---:|",
            f"| plain confluent-kafka `consume(500)` + `orjson.loads` | {spread(rates['plain'])} | 1 |"]
    for who in trees:
        label = "bridge" if who == "bridge" else f"bridge {who} ({described[who]})"
        rows.append(f"| {label}: parse, map, coalesce, apply (simulator), commit | {spread(rates[who])} | "
                    f"{spread(ratios(who), '{:.3f}')} |")
    if args.replicas > 1:
        rows.append(f"| bridge, {args.replicas} processes in one consumer group (partitions split between them) | "
                    f"{spread(rates[scaled])} | {spread(ratios(scaled), '{:.3f}')} |")
    final = "after" if args.before else "bridge"
    verdict = median(ratios(final))
    table = "\n".join([
        f"Machine: {machine_line(info)}. Broker: tansu (memory storage) on loopback.",
        "",
        f"Command: `.venv/bin/python bench/kafka_decode.py --records {args.records} --users {args.users} "
        f"--rounds {args.rounds}{' --before ' + str(args.before) if args.before else ''}`. "
        f"{args.records:,} Debezium JSON envelopes (no schema wrapper, mean {avg:.0f} bytes; 8 columns; a user's "
        f"first event `c`, then `u` with the full `before`) over {args.users} users, keyed by id, in one "
        f"{PARTITIONS}-partition topic. Each pass: a fresh consumer group; each round runs every reader once, in a "
        "rotating order. The bridge is a process with default delivery settings, timed from its `assigned` log "
        "line to its group's offsets committed at the end of every partition; every pass is checked against the "
        "events (all users' final tags in the simulator).",
        "",
        *rows,
        "",
        f"Ratio {final} / plain loop, median of the per-round ratios: **{verdict:.3f}** "
        f"(target >= 0.2: {'met' if verdict >= 0.2 else 'missed'}; goal 0.5).",
        *([] if args.replicas == 1 else [
            "",
            f"Scale-out: {args.replicas} bridge processes started together in one group (the chart's `replicaCount` "
            f"for Kafka), timed from the first `assigned` line; median ratio **{median(ratios(scaled)):.3f}**. "
            "Partitions per replica, per pass: " + "; ".join(f"`{a}`" for a in ASSIGNMENTS) + "."]),
    ])
    print("\n" + table)
    if MISMATCHES:
        print("\nmismatches:\n" + "\n".join(MISMATCHES))
    if not args.no_write:
        write_section("kafka-decode", "2. Kafka ingest", table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
