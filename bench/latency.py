"""Figure 4: latency from database commit to OneSignal simulator 2xx, p50/p95/p99, at 100, 1,000 and
5,000 changes/s spread over many users. Target: p99 <=
flush interval + 250 ms at 1,000 changes/s.

    .venv/bin/python bench/latency.py            # 5 rounds; updates docs/BENCHMARKS.md
    .venv/bin/python bench/latency.py --quick    # 1 round, <= 1,000 changes per rate; prints only

Real processes: a private Postgres cluster, the OneSignal simulator (`bridge.devtools.simulator`,
documented limits: 1,000 writes/s per app, 1 per user per second) and `python -m bridge run` with
the default delivery settings (flush_interval_ms 200, app_requests_per_second 900).

Workload: `users` (8 columns). A writer thread commits one transaction every 10 ms (`synchronous_commit
= on`), each updating rate/100 rows; every row change in a run is to a different user (fresh ids,
shuffled), so each change needs a request of its own and the per-user limit never binds: this is
"spread over many users". Runs last `--seconds` (10), at most 5,000 changes (1,000/s: 5 s;
5,000/s: 1 s) so that saturated runs drain in bounded time; `--rates 100,800,1000,5000` adds a
point just under the 900/s request budget.

Latency of a change = the simulator's log time of the 2xx answer to the request that carried that
user (`/_simulator/requests`) minus the writer's clock right after its COMMIT returned (same host
clock). Percentiles are per run (nearest rank); the table gives the median over rounds.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    USERS_DDL,
    PacedWriter,
    Stack,
    insert_users,
    machine_line,
    median,
    percentile,
    write_section,
)

TICK_S = 0.01
MAX_CHANGES = 5_000


def run_once(stack: Stack, rate: int, seconds: float, first_id: int, rng: random.Random,
             max_changes: int = MAX_CHANGES) -> dict:
    n = int(min(rate * seconds, max_changes))
    seconds = n / rate
    ids = list(range(first_id, first_id + n))
    rng.shuffle(ids)
    ticks: list[list[int]] = []
    per_tick = rate * TICK_S
    acc = 0.0
    pos = 0
    for _ in range(int(round(seconds / TICK_S))):
        acc += per_tick
        k = int(acc)
        acc -= k
        ticks.append(ids[pos:pos + k])
        pos += k
    if pos < n:
        ticks[-1].extend(ids[pos:])
    stack.sim.reset()
    w = PacedWriter(stack.dsn, ticks, TICK_S).start()
    w.join()
    wanted = {str(i) for i in ids}
    # wait until every user got its 2xx (or progress stops for 20 s)
    deadline = time.monotonic() + 300
    last_ok, last_change = -1, time.monotonic()
    while time.monotonic() < deadline:
        st = stack.sim.stats()
        ok = sum(v for k, v in st["by_status"].items() if k.startswith("2"))
        if ok >= n:
            break
        if ok != last_ok:
            last_ok, last_change = ok, time.monotonic()
        elif time.monotonic() - last_change > 20:
            break
        time.sleep(0.2)
    reqs = stack.sim.requests()
    done_at: dict[str, float] = {}
    statuses: dict[str, int] = {}
    for r in reqs:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
        u = r.get("user")
        if u in wanted and 200 <= r["status"] < 300 and u not in done_at:
            done_at[u] = r["time"]
    lat = []
    missing = 0
    for tick_ids, committed in w.commits:
        for i in tick_ids:
            t = done_at.get(str(i))
            if t is None:
                missing += 1
            else:
                lat.append(t - committed)
    lat.sort()
    span = max(r["time"] for r in reqs) - min(r["time"] for r in reqs) if reqs else 0.0
    return {
        "rate": rate,
        "changes": w.changes,
        "seconds": seconds,
        "achieved": w.changes / max(1e-9, w.finished - w.started),
        "writer_behind_ms": w.max_behind * 1000,
        "p50": percentile(lat, 50),
        "p95": percentile(lat, 95),
        "p99": percentile(lat, 99),
        "max": lat[-1] if lat else float("nan"),
        "missing": missing,
        "requests": len(reqs),
        "req_per_s": len(reqs) / span if span else 0.0,
        "r429": statuses.get("429", 0),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", default="100,1000,5000")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--flush-ms", type=int, default=200)
    ap.add_argument("--max-changes", type=int, default=MAX_CHANGES, help="cap on the changes of one run")
    ap.add_argument(
        "--quick", action="store_true", help="1 round of 3 s per rate, at most 1,000 changes; no docs update"
    )
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds, args.max_changes, args.no_write = 1, 3.0, 1_000, True
    rates = [int(r) for r in args.rates.split(",")]
    per_round = sum(int(min(r * args.seconds, args.max_changes)) for r in rates)
    total_users = per_round * args.rounds

    rng = random.Random(11)
    with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp:
        stack = Stack(Path(tmp), delivery={"flush_interval_ms": args.flush_ms})
        try:
            with stack.connect() as conn:
                conn.execute(USERS_DDL)
                insert_users(conn, 1, total_users)
            stack.setup()
            stack.start_bridge()
            time.sleep(1.0)
            results: dict[int, list[dict]] = {r: [] for r in rates}
            next_id = 1
            for rnd in range(args.rounds):
                order = rates if rnd % 2 == 0 else list(reversed(rates))
                for rate in order:
                    res = run_once(stack, rate, args.seconds, next_id, rng, args.max_changes)
                    next_id += int(min(rate * args.seconds, args.max_changes))
                    results[rate].append(res)
                    print(
                        f"round {rnd + 1}/{args.rounds} {rate:>5}/s: {res['changes']:,} changes "
                        f"(writer {res['achieved']:,.0f}/s) p50 {res['p50'] * 1000:,.0f} ms "
                        f"p95 {res['p95'] * 1000:,.0f} ms p99 {res['p99'] * 1000:,.0f} ms "
                        f"max {res['max'] * 1000:,.0f} ms; {res['requests']:,} requests "
                        f"({res['req_per_s']:,.0f}/s), 429s {res['r429']}, undelivered {res['missing']}",
                        flush=True,
                    )
                    time.sleep(1.0)
            info = stack.info
        finally:
            stack.close()

    target_ms = args.flush_ms + 250
    lines = [
        f"Machine: {machine_line(info)}.",
        "",
        f"Command: `.venv/bin/python bench/latency.py --rounds {args.rounds} --seconds {args.seconds:g}"
        + (f" --max-changes {args.max_changes}" if args.max_changes != MAX_CHANGES else "")
        + "`. "
        f"Bridge and simulator as processes, default delivery settings (flush {args.flush_ms} ms, "
        "900 requests/s app budget). Every change in a run is to a different user (one request each). "
        "Latency: simulator 2xx log time minus the writer's time after COMMIT. Median over "
        f"{args.rounds} rounds of the per-run percentile (range in brackets).",
        "",
        "| changes/s | changes per run | p50 (ms) | p95 (ms) | p99 (ms) | requests/s sent | 429s |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def ms(key: str, rs: list[dict]) -> str:
        xs = [r[key] * 1000 for r in rs]
        return f"{median(xs):,.0f} ({min(xs):,.0f}–{max(xs):,.0f})" if len(xs) > 1 else f"{xs[0]:,.0f}"

    for rate in rates:
        rs = results[rate]
        lines.append(
            f"| {rate:,} | {rs[0]['changes']:,} | {ms('p50', rs)} | {ms('p95', rs)} | {ms('p99', rs)} | "
            f"{median(r['req_per_s'] for r in rs):,.0f} | {sum(r['r429'] for r in rs)} |"
        )
    if 1000 in results:
        p99 = median(r["p99"] for r in results[1000]) * 1000
        verdict = "met" if p99 <= target_ms else f"missed by {p99 - target_ms:,.0f} ms"
        lines += ["", f"Target at 1,000 changes/s: p99 <= {target_ms} ms; median p99 {p99:,.0f} ms: **{verdict}**."]
    table = "\n".join(lines)
    print("\n" + table)
    if not args.no_write:
        write_section("latency", "4. Latency, commit to OneSignal 2xx", table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
