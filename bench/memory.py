"""Figure 5: memory. Peak RSS of the bridge while OneSignal is down and 1,000,000 changes are
pending. Target: <= 256 MiB (issue 16: memory stays as it is while ingest gets faster).

    .venv/bin/python bench/memory.py            # 1,000,000 changes, 3 rounds; updates docs/BENCHMARKS.md
    .venv/bin/python bench/memory.py --quick    # 30,000 changes (under the budget), 1 round; prints only
    .venv/bin/python bench/memory.py --before /tmp/before   # each round also runs an earlier checkout's bridge

Real processes: a private Postgres cluster, the OneSignal simulator answering every API request
with 503 (`/_simulator/faults {"error_rate": 1.0, "status": 503}`) and `python -m bridge run` with
the default delivery settings (max_pending_users 100,000, max_pending_bytes 64 MiB, retries with
backoff). With the bridge streaming, the writer inserts 1,000,000 new rows of `users` (8 columns,
so 1,000,000 changes to 1,000,000 different users, the worst case for pending state) in
transactions of 10,000. The bridge reads until its pending budget is full, then stops reading
(backpressure); the rest stays in the replication slot. The run ends when the bridge has read
nothing for `--settle` seconds (or after `--timeout`).

Reported per run: peak RSS (VmHWM of the bridge process, from /proc), RSS at the end, changes read
(`onesignal_bridge_changes_total`), pending users and pending bytes (the bridge's own metrics),
and the slot's lag (`pg_current_wal_lsn() - confirmed_flush_lsn`): nothing was confirmed, so the
WAL of all 1,000,000 changes is held by the slot, not by the bridge.
`--users N` writes the changes as updates spread over N existing users instead (deep coalescing).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    ROOT,
    USERS_DDL,
    Stack,
    git_describe,
    insert_users,
    machine_line,
    median,
    rss_peak_kib,
    spread,
    try_scrape,
    write_section,
)

CHUNK = 10_000


def write_inserts(stack: Stack, first: int, n: int) -> None:
    with stack.connect() as conn:
        insert_users(conn, first, first + n - 1, chunk=CHUNK)


def write_updates(stack: Stack, users: int, n: int) -> None:
    import random

    rng = random.Random(3)
    with stack.connect() as conn:
        for lo in range(0, n, CHUNK):
            ids = [rng.randint(1, users) for _ in range(min(CHUNK, n - lo))]
            conn.execute("SELECT bench_touch(%s::bigint[])", (ids,))


def run_once(stack: Stack, args: argparse.Namespace) -> dict:
    stack.setup()
    stack.sim.faults(error_rate=1.0, status=503)
    stack.start_bridge()
    pid = stack.bridge.proc.pid
    first = 10_000_000
    writer = threading.Thread(
        target=(write_inserts if args.users == 0 else write_updates),
        args=((stack, first, args.changes) if args.users == 0 else (stack, args.users, args.changes)),
    )
    t0 = time.monotonic()
    writer.start()
    samples: list[tuple[float, float]] = []  # (time, changes read)
    m: dict = {}
    while time.monotonic() - t0 < args.timeout:
        time.sleep(0.5)
        m = try_scrape(stack.metrics_port) or m
        now = time.monotonic()
        read = m.get("onesignal_bridge_changes_total", 0)
        samples.append((now, read))
        if read >= args.changes:
            break
        # settled: the writer is done and the bridge read under 1% more in the last `settle` seconds
        old = [r for t, r in samples if t <= now - args.settle]
        if not writer.is_alive() and old and read - old[-1] < 0.01 * max(read, 1):
            break
    writer.join()
    rss, hwm = rss_peak_kib(pid)
    m = try_scrape(stack.metrics_port) or m
    lag = stack.slot_lag_bytes()
    stack.sim.clear_faults()
    stack.stop_bridge()
    stack.drop_slot()
    stack.sim.reset()
    return {
        "peak_mib": hwm / 1024,
        "end_mib": rss / 1024,
        "read": m.get("onesignal_bridge_changes_total", 0),
        "pending_users": m.get("onesignal_bridge_pending_users", 0),
        "pending_bytes": m.get("onesignal_bridge_pending_bytes", 0),
        "lag_mib": lag / 2**20,
        "backpressure": m.get("onesignal_bridge_backpressure_waits_total", 0),
        "requests": sum(v for k, v in m.items() if k.startswith("onesignal_bridge_api_requests_total{")),
        "seconds": time.monotonic() - t0,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--changes", type=int, default=1_000_000)
    ap.add_argument(
        "--users", type=int, default=0, help="0: every change a new user (inserts); N: updates over N users"
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--settle", type=float, default=8.0)
    ap.add_argument("--timeout", type=float, default=240.0)
    ap.add_argument("--quick", action="store_true", help="30,000 changes, 1 round; no docs update")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--before", type=Path, help="a checkout of an earlier bridge (git worktree): each round runs both")
    args = ap.parse_args(argv)
    if args.quick:
        args.changes, args.rounds, args.no_write, args.settle = 30_000, 1, True, 4.0
    trees = {"bridge": ROOT} if args.before is None else {"after": ROOT, "before": args.before.resolve()}
    described = {who: git_describe(root) for who, root in trees.items()}

    by_tree: dict[str, list[dict]] = {who: [] for who in trees}
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        stack = Stack(Path(tmp))
        try:
            with stack.connect() as conn:
                conn.execute(USERS_DDL)
                if args.users:
                    insert_users(conn, 1, args.users)
            first = True
            runs = [(rnd, who) for rnd in range(args.rounds)
                    for who in (list(trees) if rnd % 2 == 0 else list(reversed(trees)))]
            for rnd, who in runs:
                if not first and args.users == 0:
                    with stack.connect() as conn:
                        conn.execute("DELETE FROM users WHERE id >= 10000000")
                        conn.execute("VACUUM users")
                first = False
                stack.use_bridge_of(trees[who], f"bridge-{who}")
                r = run_once(stack, args)
                by_tree[who].append(r)
                print(
                    f"round {rnd + 1}/{args.rounds} {who}: peak RSS {r['peak_mib']:.0f} MiB (end {r['end_mib']:.0f}), "
                    f"read {r['read']:,.0f} of {args.changes:,} changes, pending users {r['pending_users']:,.0f}, "
                    f"pending bytes {r['pending_bytes'] / 2**20:.1f} MiB, slot lag {r['lag_mib']:.0f} MiB, "
                    f"{r['requests']:,.0f} failed requests, {r['seconds']:.0f} s",
                    flush=True,
                )
            info = stack.info
        finally:
            stack.close()

    results = by_tree["after" if args.before else "bridge"]
    peak = median(r["peak_mib"] for r in results)
    what = (
        "1,000,000 inserted rows = 1,000,000 different users"
        if args.users == 0 and args.changes == 1_000_000
        else f"{args.changes:,} changes "
        + ("to as many new users" if args.users == 0 else f"over {args.users:,} users")
    )
    lines = [
        f"Machine: {machine_line(info)}.",
        "",
        f"Command: `.venv/bin/python bench/memory.py --changes {args.changes} --rounds {args.rounds}"
        + (f" --users {args.users}" if args.users else "")
        + (f" --before {args.before}" if args.before else "")
        + f"`. OneSignal down (every request 503), {what} "
        "written while the bridge streams, default delivery settings (max_pending_users 100,000, "
        f"max_pending_bytes 64 MiB). Median (range) over {args.rounds} rounds.",
        "",
        "| quantity | " + " | ".join(
            "value" if who == "bridge" else f"{who} ({described[who]})" for who in trees) + " |",
        "|---|" + "---:|" * len(trees),
    ]
    rows = [
        ("peak RSS of the bridge (VmHWM, MiB)", "peak_mib", "{:,.0f}", 1),
        ("RSS when it stopped reading (MiB)", "end_mib", "{:,.0f}", 1),
        ("changes read by the bridge", "read", "{:,.0f}", 1),
        ("pending users", "pending_users", "{:,.0f}", 1),
        ("pending bytes (the bridge's estimate, MiB)", "pending_bytes", "{:.1f}", 2**20),
        ("replication slot lag (MiB of WAL held by Postgres)", "lag_mib", "{:,.0f}", 1),
    ]
    for label, k, fmt, div in rows:
        lines.append(f"| {label} | " + " | ".join(spread([r[k] / div for r in by_tree[who]], fmt)
                                                  for who in trees) + " |")
    lines += [
        "",
        f"Target: peak RSS <= 256 MiB: **{'met' if peak <= 256 else f'missed by {peak - 256:.0f} MiB'}** "
        f"(median {peak:.0f} MiB).",
    ]
    table = "\n".join(lines)
    print("\n" + table)
    if not args.no_write:
        write_section("memory", "5. Memory with OneSignal down", table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
