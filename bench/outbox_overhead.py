"""What the outbox trigger costs the application's writes: pgbench with and without it.

    .venv/bin/python bench/outbox_overhead.py            # ~5 minutes; updates docs/BENCHMARKS.md
    .venv/bin/python bench/outbox_overhead.py --quick    # 2 runs of 3 s each, prints only

A private Postgres cluster (bridge.devtools.localpg.PgCluster, wal_level=replica) holds `users` (100,000
rows, the columns of the example mapping plus an unmapped 200-byte column). pgbench runs a custom
script: one UPDATE of a mapped column of a random user per transaction, `-M prepared`, at 1 and 4
clients. Three variants run interleaved (none, trigger, none, trigger, ...) so that drift of the
machine hits them alike; the table reports the median and the best of the runs:

- `none`: no trigger (the application today);
- `trigger, bridge draining`: the capture trigger as `setup` installs it (mapped columns only, jsonb
  row images) while the bridge is busy: the wake-up flag is down, nothing is notified. This is the
  steady state under write load;
- `trigger, bridge idle`: the same with the flag up, so that every transaction sends pg_notify.
  A real bridge lowers the flag as soon as it wakes, so this is the worst case: it shows what
  NOTIFY costs (a notifying transaction takes a cluster-wide lock at commit, serialising it with
  every other notifying commit) and why the trigger notifies only an idle bridge.

The outbox is emptied (TRUNCATE) and the table vacuumed before every run: the bridge keeps the
outbox short in practice, and a growing outbox would slow later runs. A bulk UPDATE of 50,000 rows
in one statement is timed the same way. The cluster runs with the harness's settings (fsync off,
synchronous_commit off); with durable commits each transaction costs more and the trigger's share
is smaller, so these are upper bounds of the relative overhead.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bridge.devtools.localpg import PgCluster  # noqa: E402
from bridge.sources.outbox_kind import OUTBOX_SQL  # noqa: E402

ROWS = 100_000
BULK_ROWS = 50_000
CAPTURED = ["id", "plan", "country", "score", "updated_at"]
DDL = f"""
DROP TABLE IF EXISTS users;
CREATE TABLE users (id bigint PRIMARY KEY, plan text, country text, score numeric(8,2),
                    updated_at timestamptz, filler text);
INSERT INTO users SELECT g, 'free', 'FR', 1.5, now(), repeat('x', 200) FROM generate_series(1, {ROWS}) g;
"""
SCRIPT = f"""\\set id random(1, {ROWS})
\\set n random(1, 1000000)
UPDATE users SET plan = 'p' || :n, updated_at = now() WHERE id = :id;
"""
VARIANTS = ("none", "trigger, bridge draining", "trigger, bridge idle")
BEGIN, END = "<!-- outbox-overhead:begin -->", "<!-- outbox-overhead:end -->"


def _psql(cluster: PgCluster, sql: str) -> None:
    with cluster.connect("bench") as conn:
        conn.execute(sql)


def _variant(cluster: PgCluster, variant: str) -> None:
    if variant == "none":
        _psql(cluster, "SELECT onesignal_bridge.remove_trigger('users')")
    else:
        cols = ", ".join(f"'{c}'" for c in CAPTURED)
        _psql(cluster, f"SELECT onesignal_bridge.install_trigger('users', ARRAY[{cols}])")
        _psql(
            cluster, f"UPDATE onesignal_bridge.wakeup SET waiting = {'true' if variant.endswith('idle') else 'false'}"
        )
    _psql(cluster, "TRUNCATE onesignal_bridge.outbox")
    _psql(cluster, "VACUUM users")
    _psql(cluster, "CHECKPOINT")


def _pgbench(cluster: PgCluster, script: Path, clients: int, seconds: int) -> tuple[float, float]:
    out = subprocess.run(
        [
            str(cluster.bindir / "pgbench"),
            "-n",
            "-M",
            "prepared",
            "-f",
            str(script),
            "-c",
            str(clients),
            "-j",
            str(min(clients, os.cpu_count() or 1)),
            "-T",
            str(seconds),
            "-h",
            cluster.host,
            "-p",
            str(cluster.port),
            "-U",
            "postgres",
            "bench",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    tps = float(re.search(r"tps = ([\d.]+)", out).group(1))  # type: ignore[union-attr]
    lat = float(re.search(r"latency average = ([\d.]+) ms", out).group(1))  # type: ignore[union-attr]
    return tps, lat


def _bulk(cluster: PgCluster) -> float:
    with cluster.connect("bench") as conn:
        t0 = time.perf_counter()
        conn.execute(f"UPDATE users SET plan = 'bulk-' || id, updated_at = now() WHERE id <= {BULK_ROWS}")
        return (time.perf_counter() - t0) * 1000


def _load() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def _machine(cluster: PgCluster) -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))  # type: ignore[union-attr]
        mem = f"{mem_kb / 1024 / 1024:.0f} GiB RAM"
    except (OSError, AttributeError):
        mem = "RAM unknown"
    with cluster.connect("bench") as conn:
        version = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
        settings = ", ".join(
            f"{k}={conn.execute(f'SHOW {k}').fetchone()[0]}"  # type: ignore[index]
            for k in ("fsync", "synchronous_commit", "shared_buffers", "wal_level")
        )
    pgbench = subprocess.run(
        [str(cluster.bindir / "pgbench"), "--version"], capture_output=True, text=True
    ).stdout.strip()
    return (
        f"{cpu}, {os.cpu_count()} vCPU, {mem}, Linux {platform.release()}; PostgreSQL {version} ({settings}); "
        f"{pgbench}; Python {platform.python_version()}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="runs per variant and client count (median reported)")
    ap.add_argument("--seconds", type=int, default=8, help="pgbench duration of one run")
    ap.add_argument("--clients", default="1,4", help="comma-separated client counts")
    ap.add_argument("--quick", action="store_true", help="2 runs of 3 s, 1 client; do not write the docs")
    ap.add_argument("--no-write", action="store_true", help="print the results, leave docs/BENCHMARKS.md alone")
    args = ap.parse_args(argv)
    if args.quick:
        args.runs, args.seconds, args.clients, args.no_write = 2, 3, "1", True
    clients = [int(c) for c in args.clients.split(",")]

    load_before = _load()
    cluster = PgCluster(wal_level="replica")
    cluster.start()
    try:
        cluster.create_database("bench")
        _psql(cluster, DDL)
        _psql(cluster, OUTBOX_SQL)
        tps: dict[tuple[str, int], list[float]] = {}
        lat: dict[tuple[str, int], list[float]] = {}
        bulk: dict[str, list[float]] = {v: [] for v in VARIANTS}
        with tempfile.TemporaryDirectory() as tmp:
            script = Path(tmp) / "update.sql"
            script.write_text(SCRIPT)
            os.chmod(tmp, 0o755)
            os.chmod(script, 0o644)
            for run in range(args.runs):
                for variant in VARIANTS:
                    for c in clients:
                        _variant(cluster, variant)
                        t, lt = _pgbench(cluster, script, c, args.seconds)
                        tps.setdefault((variant, c), []).append(t)
                        lat.setdefault((variant, c), []).append(lt)
                        print(
                            f"run {run + 1}/{args.runs} {variant:<26} {c} client(s): {t:9.1f} tps {lt:7.3f} ms",
                            flush=True,
                        )
                    _variant(cluster, variant)
                    bulk[variant].append(_bulk(cluster))
                    print(
                        f"run {run + 1}/{args.runs} {variant:<26} bulk UPDATE of {BULK_ROWS}: "
                        f"{bulk[variant][-1]:8.0f} ms",
                        flush=True,
                    )
        machine = _machine(cluster)
    finally:
        cluster.destroy()

    med = statistics.median
    lines = [
        f"Machine: {machine}.",
        "",
        f"`.venv/bin/python bench/outbox_overhead.py`: pgbench `-M prepared -T {args.seconds}`, one UPDATE of a "
        f"mapped column of a random row of {ROWS:,} per transaction; median of {args.runs} interleaved runs per cell.",
        "",
        "| clients | variant | TPS (median) | TPS (best) | latency (ms, median) | TPS vs none (median / best) "
        "| latency added per write (median / best) |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for c in clients:
        base_t, base_l = med(tps[("none", c)]), med(lat[("none", c)])
        best_t, best_l = max(tps[("none", c)]), min(lat[("none", c)])
        for v in VARIANTS:
            t, lt, bt, bl = med(tps[(v, c)]), med(lat[(v, c)]), max(tps[(v, c)]), min(lat[(v, c)])
            rel = "" if v == "none" else f"{(t / base_t - 1) * 100:+.0f}% / {(bt / best_t - 1) * 100:+.0f}%"
            add = "" if v == "none" else f"{(lt - base_l) * 1000:+.0f} / {(bl - best_l) * 1000:+.0f} µs"
            lines.append(f"| {c} | {v} | {t:,.0f} | {bt:,.0f} | {lt:.3f} | {rel} | {add} |")
    base_b, best_b = med(bulk["none"]), min(bulk["none"])
    lines += [
        "",
        f"Bulk `UPDATE` of {BULK_ROWS:,} rows in one statement:",
        "",
        "| variant | ms (median) | ms (best) | per row added (median / best) |",
        "|---|---:|---:|---:|",
    ]
    for v in VARIANTS:
        b, bb = med(bulk[v]), min(bulk[v])
        add = (
            ""
            if v == "none"
            else f"{(b - base_b) * 1000 / BULK_ROWS:+.0f} / {(bb - best_b) * 1000 / BULK_ROWS:+.0f} µs"
        )
        lines.append(f"| {v} | {b:,.0f} | {bb:,.0f} | {add} |")
    lines += [
        "",
        f"Load average (1 min) before / after: {load_before} / {_load()}. The machine is shared: "
        "the best run of each cell is the least disturbed estimate of the trigger's own cost.",
    ]
    table = "\n".join(lines)
    print("\n" + table)
    if not args.no_write:
        _write_docs(table)
    return 0


def _write_docs(table: str) -> None:
    path = ROOT / "docs" / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = f"{BEGIN}\n{table}\n{END}"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + section + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip() + "\n\n## Outbox trigger overhead\n\n" + section + "\n"
    path.write_text(text)
    print(f"\nwrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    raise SystemExit(main())
