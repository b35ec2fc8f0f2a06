"""Figure 1: Postgres decode. Changes/s through the bridge's `postgres` source + pgoutput decode +
mapping (OneSignal stubbed out at the dispatcher boundary) versus `pg_recvlogical` writing the same
slot's stream to /dev/null. Target: ratio >= 0.5.

    .venv/bin/python bench/pg_decode.py            # 500,000 changes, 5 rounds; updates docs/BENCHMARKS.md
    .venv/bin/python bench/pg_decode.py --quick    # 30,000 changes, 2 rounds; prints only
    .venv/bin/python bench/pg_decode.py --profile  # also one cProfile'd bridge pass (top functions)

Workload: a private cluster (bridge.localpg.PgCluster) with `users` (8 columns: bigint key, 5 text,
timestamptz, numeric; REPLICA IDENTITY FULL as `setup` makes it for on_delete: delete_user).
Autocommit statements of 100 rows: insert a block, update the previous block (two columns), delete
half of the block before that: 40% inserts, 40% updates, 20% deletes, 100 changes per transaction.

Fairness: a template slot is created before the workload; every pass reads a fresh copy of it
(`pg_copy_logical_replication_slot`), so both readers get the same WAL decoded by the walsender
from the same start, with the same publication and proto_version 1. A warm-up bridge pass (not
counted) learns the end LSN of the last commit and warms the page cache. Then each round runs
both readers one after the other, alternating which goes first.

- `pg_recvlogical`: wall time of `pg_recvlogical --start --endpos <last commit end> -f /dev/null`
  (process start, connect, stream, exit on the last commit).
- bridge: `PostgresSource.from_config(config).run(pipeline)` in this process, `pipeline` being the real
  `bridge.pipeline.Pipeline` (metrics, mapping into UserChanges, checkpoint bookkeeping) whose
  dispatcher is a stub that accepts each change and reports it done. Time from `run()` to the last
  change handed to the dispatcher.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    counting_pipeline,
    machine,
    machine_line,
    median,
    spread,
    write_section,
)

from bridge.config import parse_config  # noqa: E402
from bridge.localpg import PgCluster  # noqa: E402
from bridge.sources.postgres import PostgresSource  # noqa: E402

DDL = """
CREATE TABLE users (
    id bigint PRIMARY KEY, crm_id text, plan text, country text, created_at timestamptz,
    locale text, tz text, score numeric(8,2)
);
ALTER TABLE users REPLICA IDENTITY FULL;
CREATE PUBLICATION bench_pub FOR TABLE users;
"""
MAPPING = {
    "table": "public.users",
    "identity": {"external_id": "id"},
    "aliases": {"crm_id": "crm_id"},
    "tags": {"plan": "plan", "country": "country", "signup_at": "created_at", "score": "score"},
    "properties": {"language": "locale", "timezone_id": "tz"},
    "on_delete": "delete_user",
}
BLOCK = 100
STEP = BLOCK + BLOCK + BLOCK // 2  # changes per step: insert 100, update 100, delete 50


def generate(cluster: PgCluster, changes: int) -> int:
    """Write the workload; returns the number of row changes written."""
    steps = -(-changes // STEP)
    written = 0
    with cluster.connect("bench") as conn:
        for b in range(steps + 2):
            lo = b * BLOCK + 1
            if b < steps:
                conn.execute(
                    "INSERT INTO users SELECT g, 'crm-' || g, 'free', 'FR', now(), 'fr-FR', 'Europe/Paris', g %% 1000"
                    " FROM generate_series(%s::bigint, %s::bigint) g", (lo, lo + BLOCK - 1))
                written += BLOCK
            if 1 <= b <= steps:
                plo = lo - BLOCK
                conn.execute("UPDATE users SET plan = 'pro', score = score + 1 WHERE id BETWEEN %s AND %s",
                             (plo, plo + BLOCK - 1))
                written += BLOCK
            if 2 <= b <= steps + 1:
                dlo = lo - 2 * BLOCK
                conn.execute("DELETE FROM users WHERE id BETWEEN %s AND %s AND id %% 2 = 0", (dlo, dlo + BLOCK - 1))
                written += BLOCK // 2
    return written


class Slots:
    def __init__(self, cluster: PgCluster) -> None:
        self.cluster = cluster
        self.n = 0

    def fresh(self) -> str:
        self.n += 1
        name = f"copy_{self.n}"
        self.cluster.execute("SELECT pg_copy_logical_replication_slot('tmpl', %s)", (name,), dbname="bench")
        return name

    def drop(self, name: str) -> None:
        for _ in range(100):
            try:
                self.cluster.execute("SELECT pg_drop_replication_slot(%s)", (name,), dbname="bench")
                return
            except Exception:  # still active for a moment after the client left
                time.sleep(0.05)


def run_recvlogical(cluster: PgCluster, slot: str, endpos: str) -> float:
    cmd = [str(cluster.bindir / "pg_recvlogical"), "-d", cluster.dsn("bench"), "--slot", slot, "--start",
           "-o", "proto_version=1", "-o", "publication_names=bench_pub", "--endpos", endpos,
           "-f", "/dev/null", "-F", "0", "-s", "1", "--no-loop"]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    dt = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"pg_recvlogical failed ({out.returncode}): {out.stderr}")
    return dt


def run_bridge(cluster: PgCluster, slot: str, expected: int, profile: cProfile.Profile | None = None
               ) -> tuple[float, int, float]:
    """Returns (seconds from run() to the last change, received LSN, seconds first->last change)."""
    config = parse_config({
        "onesignal": {"app_id": "bench", "api_key": "bench", "base_url": "http://127.0.0.1:9"},
        "source": {"kind": "postgres", "dsn": cluster.dsn("bench"), "slot": slot, "publication": "bench_pub",
                   "snapshot": "never", "standby": False},
        "mappings": [MAPPING],
    })

    async def main() -> tuple[float, int, float]:
        done = asyncio.Event()
        pipeline = counting_pipeline(config, expected, done)
        source = PostgresSource.from_config(config)
        stop = asyncio.Event()
        t0 = time.perf_counter()
        task = asyncio.create_task(source.run(pipeline, stop))
        waiter = asyncio.create_task(done.wait())
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()
            raise RuntimeError(f"source stopped after {pipeline.seen} of {expected} changes")
        stop.set()
        await asyncio.wait_for(task, 60)
        assert pipeline.last is not None and pipeline.first is not None
        return pipeline.last - t0, source.received_lsn, pipeline.last - pipeline.first

    if profile is not None:
        profile.enable()
    try:
        return asyncio.run(main())
    finally:
        if profile is not None:
            profile.disable()


def lsn_str(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--changes", type=int, default=500_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="30,000 changes, 2 rounds, no docs update")
    ap.add_argument("--profile", action="store_true", help="one extra cProfile'd bridge pass; print top functions")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.changes, args.rounds, args.no_write = 30_000, 2, True

    cluster = PgCluster(settings={"max_replication_slots": 20, "max_wal_senders": 20,
                                  "logical_decoding_work_mem": "64MB"})
    cluster.start()
    try:
        cluster.create_database("bench")
        cluster.execute(DDL, dbname="bench")
        cluster.execute("SELECT pg_create_logical_replication_slot('tmpl', 'pgoutput')", dbname="bench")
        t0 = time.perf_counter()
        written = generate(cluster, args.changes)
        gen_s = time.perf_counter() - t0
        wal = cluster.execute("SELECT pg_current_wal_lsn() - confirmed_flush_lsn FROM pg_replication_slots"
                              " WHERE slot_name = 'tmpl'", dbname="bench")[0][0]
        print(f"workload: {written:,} row changes in {gen_s:.1f} s; {int(wal) / 2**20:.0f} MiB of WAL", flush=True)
        slots = Slots(cluster)
        info = machine(cluster.bindir)

        slot = slots.fresh()
        warm, end_lsn, _ = run_bridge(cluster, slot, written)
        slots.drop(slot)
        endpos = lsn_str(end_lsn)
        print(f"warm-up bridge pass: {warm:.2f} s ({written / warm:,.0f} changes/s); last commit ends at {endpos}",
              flush=True)

        rec: list[float] = []
        brg: list[float] = []
        ratios: list[float] = []
        for r in range(args.rounds):
            order = ("recvlogical", "bridge") if r % 2 == 0 else ("bridge", "recvlogical")
            res: dict[str, float] = {}
            for who in order:
                slot = slots.fresh()
                try:
                    if who == "recvlogical":
                        res[who] = run_recvlogical(cluster, slot, endpos)
                    else:
                        res[who], got, _ = run_bridge(cluster, slot, written)
                finally:
                    slots.drop(slot)
            rec.append(written / res["recvlogical"])
            brg.append(written / res["bridge"])
            ratios.append(brg[-1] / rec[-1])
            print(f"round {r + 1}/{args.rounds}: pg_recvlogical {res['recvlogical']:.2f} s ({rec[-1]:,.0f}/s), "
                  f"bridge {res['bridge']:.2f} s ({brg[-1]:,.0f}/s), ratio {ratios[-1]:.2f}", flush=True)

        prof_text = ""
        if args.profile:
            prof = cProfile.Profile()
            slot = slots.fresh()
            t, _, _ = run_bridge(cluster, slot, written, prof)
            slots.drop(slot)
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(18)
            prof_text = buf.getvalue()
            print(f"\nprofiled bridge pass (cProfile inflates Python-heavy code): {t:.2f} s\n{prof_text}")
    finally:
        cluster.destroy()

    ok = median(ratios) >= 0.5
    table = "\n".join([
        f"Machine: {machine_line(info)}.",
        "",
        f"Command: `.venv/bin/python bench/pg_decode.py --changes {args.changes} --rounds {args.rounds}`. "
        f"Workload: {written:,} row changes of an 8-column table (40% insert, 40% update, 20% delete, "
        f"100 per transaction, REPLICA IDENTITY FULL), {int(wal) / 2**20:.0f} MiB of WAL. Every pass reads a "
        "fresh copy of one slot created before the workload; rounds alternate which reader goes first.",
        "",
        "| reader | changes/s, median (range) over rounds |",
        "|---|---:|",
        f"| `pg_recvlogical` (pgoutput, proto 1) to /dev/null | {spread(rec)} |",
        f"| bridge: source + pgoutput decode + mapping, dispatcher stubbed | {spread(brg)} |",
        "",
        f"Ratio bridge / pg_recvlogical, median of the per-round ratios: **{median(ratios):.2f}** "
        f"(range {min(ratios):.2f}–{max(ratios):.2f}; target >= 0.5: {'met' if ok else 'missed'}).",
    ])
    print("\n" + table)
    if not args.no_write:
        write_section("pg-decode", "1. Postgres decode", table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
