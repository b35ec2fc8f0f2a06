"""Figure 6: throughput ceiling. Sustained changes/s the bridge absorbs while OneSignal accepts
1,000 requests/s (the simulator's documented app limit), as a function of how many distinct users
change per second.

    .venv/bin/python bench/ceiling.py            # 5 pools x 3 rounds; updates docs/BENCHMARKS.md
    .venv/bin/python bench/ceiling.py --quick    # 2 pools, 1 round, 15,000 changes; prints only

Real processes: a private Postgres cluster, the OneSignal simulator (1,000 writes/s per app, 1 per
user per second) and `python -m bridge run` with the default delivery settings (flush 200 ms, 900
requests/s app budget, max_pending_users 100,000, max_pending_bytes 64 MiB).

For each pool size P, a backlog of `--changes` row changes is written while the bridge is stopped
(updates of users drawn uniformly from P users, 5,000 per transaction; pool `new`: inserts, every
change a different user). Then the bridge starts and drains it; its metrics are sampled every
0.5 s for up to `--window` seconds. The writer is thus out of the measurement and the bridge reads
as fast as it can: what limits it is its own CPU (decode, mapping, coalescing, HTTP) or the
request budget (backpressure once max_pending users wait for their request).

- absorbed changes/s: slope of `onesignal_bridge_changes_total` over the second half of the reading
  period (from the first change read to the last, or to the end of the window);
- distinct users changing per second: distinct users in each second's worth of the absorbed
  stream (from the generated sequence), averaged;
- requests/s: slope of `onesignal_bridge_api_requests_total` over the same interval.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    USERS_DDL,
    Stack,
    insert_users,
    machine_line,
    spread,
    try_scrape,
    write_section,
)

CHUNK = 5_000
NEW_BASE = 10_000_000


def backlog(stack: Stack, pool: str, n: int, rng: random.Random) -> list[int]:
    with stack.connect() as conn:
        if pool == "new":
            seq = list(range(NEW_BASE, NEW_BASE + n))
            insert_users(conn, NEW_BASE, NEW_BASE + n - 1, chunk=CHUNK)
            return seq
        p = int(pool)
        seq = [rng.randint(1, p) for _ in range(n)]
        for lo in range(0, n, CHUNK):
            conn.execute("SELECT bench_touch(%s::bigint[])", (seq[lo:lo + CHUNK],))
        return seq


def run_once(stack: Stack, pool: str, args: argparse.Namespace, rng: random.Random) -> dict:
    stack.setup()
    seq = backlog(stack, pool, args.changes, rng)
    stack.sim.reset()
    # Sampled from the moment the process starts, every 0.1 s: since issue 16 the bridge reads a
    # small backlog in less time than waiting for its readiness took, and the window saw nothing.
    stack.bridge.start()
    samples: list[tuple[float, float, float, float]] = []  # time, read, requests, pending users
    t0 = time.monotonic()
    while time.monotonic() - t0 < args.window + 10.0:
        m = try_scrape(stack.metrics_port)
        if m:
            reqs = sum(v for k, v in m.items() if k.startswith("onesignal_bridge_api_requests_total{"))
            samples.append((time.monotonic(), m.get("onesignal_bridge_changes_total", 0), reqs,
                            m.get("onesignal_bridge_pending_users", 0)))
            if samples[-1][1] >= args.changes:
                break
        if len(samples) > 0 and time.monotonic() - samples[0][0] >= args.window:
            break
        time.sleep(0.1)
    r429 = stack.sim.stats()["rate_limited"]
    if samples:
        print(f"  [{pool}] {len(samples)} samples; first at {samples[0][0] - t0:.2f} s (read {samples[0][1]:,.0f}), "
              f"last at {samples[-1][0] - t0:.2f} s (read {samples[-1][1]:,.0f})", flush=True)
    stack.bridge.kill()
    stack.drop_slot()
    if pool == "new":
        with stack.connect() as conn:
            conn.execute("DELETE FROM users WHERE id >= %s", (NEW_BASE,))
    started = next((s for s in samples if s[1] > 0), samples[0])
    end = samples[-1]
    if started[1] >= args.changes:
        # Read whole between two samples (start-up included): only a lower bound.
        return {"pool": pool, "rate": args.changes / (started[0] - t0), "distinct_per_s": math.nan,
                "req_per_s": math.nan, "pending": end[3], "read": end[1], "r429": r429, "finished": True,
                "seconds": started[0] - t0, "lower_bound": True}
    mid_t = started[0] + (end[0] - started[0]) / 2
    mid = min(samples, key=lambda s: abs(s[0] - mid_t))
    dt = max(1e-9, end[0] - mid[0])
    rate = (end[1] - mid[1]) / dt
    a, b = int(mid[1]), int(end[1])
    step = max(1, int(rate))
    chunks = [seq[i:i + step] for i in range(a, b, step)] or [seq[a:b]]
    distinct = sum(len(set(c)) for c in chunks) / len(chunks) * (rate / step if step else 1)
    return {"pool": pool, "rate": rate, "distinct_per_s": distinct, "req_per_s": (end[2] - mid[2]) / dt,
            "pending": end[3], "read": end[1], "r429": r429, "finished": end[1] >= args.changes,
            "seconds": end[0] - started[0]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pools", default="100,1000,10000,100000,new")
    ap.add_argument("--changes", type=int, default=100_000)
    ap.add_argument("--window", type=float, default=25.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="pools 1000 and new, 1 round, 15,000 changes; no docs update")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.pools, args.rounds, args.changes, args.window, args.no_write = "1000,new", 1, 15_000, 10.0, True
    pools = args.pools.split(",")
    rng = random.Random(17)
    results: dict[str, list[dict]] = {p: [] for p in pools}
    with tempfile.TemporaryDirectory(prefix="bench-ceiling-") as tmp:
        stack = Stack(Path(tmp))
        try:
            with stack.connect() as conn:
                conn.execute(USERS_DDL)
                insert_users(conn, 1, max([int(p) for p in pools if p != "new"] or [1]))
            for rnd in range(args.rounds):
                for pool in (pools if rnd % 2 == 0 else list(reversed(pools))):
                    r = run_once(stack, pool, args, rng)
                    results[pool].append(r)
                    print(f"round {rnd + 1}/{args.rounds} pool {pool:>6}: absorbed {r['rate']:,.0f} changes/s, "
                          f"{r['distinct_per_s']:,.0f} distinct users/s, {r['req_per_s']:,.0f} requests/s, "
                          f"pending users {r['pending']:,.0f}, read {r['read']:,.0f} in {r['seconds']:.1f} s, "
                          f"429s {r['r429']}", flush=True)
            info = stack.info
        finally:
            stack.close()

    lines = [
        f"Machine: {machine_line(info)}.",
        "",
        f"Command: `.venv/bin/python bench/ceiling.py --changes {args.changes} --rounds {args.rounds}`. A backlog "
        f"of {args.changes:,} changes per pool, drained by the bridge (process) against the simulator "
        "(1,000 requests/s per app); default delivery settings. Median (range) over "
        f"{args.rounds} rounds.",
        "",
        "| users in the pool | distinct users changing per second (absorbed stream) | changes/s absorbed | "
        "requests/s | pending users at the end | 429s |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for pool in pools:
        rs = results[pool]
        label = "every change a new user" if pool == "new" else f"{int(pool):,}"
        if any(r.get("lower_bound") for r in rs):  # the whole backlog read between two samples
            lines.append(f"| {label} | - | > {min(r['rate'] for r in rs):,.0f} (all {args.changes:,} read "
                         "by the first sample that saw any, start-up included: a lower bound) | - | "
                         f"{spread([r['pending'] for r in rs])} | "
                         f"{sum(r['r429'] for r in rs)} |")
            continue
        lines.append(f"| {label} | {spread([r['distinct_per_s'] for r in rs])} | {spread([r['rate'] for r in rs])} | "
                     f"{spread([r['req_per_s'] for r in rs])} | {spread([r['pending'] for r in rs])} | "
                     f"{sum(r['r429'] for r in rs)} |")
    table = "\n".join(lines)
    print("\n" + table)
    if not args.no_write:
        write_section("ceiling", "6. Throughput ceiling", table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
