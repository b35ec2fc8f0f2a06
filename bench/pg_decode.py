"""Figure 1: Postgres ingest. Row changes/s the bridge reads, maps, coalesces, applies to the
OneSignal simulator and confirms to Postgres, versus `pg_recvlogical` reading the same slot's
stream to /dev/null. Target: ratio >= 0.5 (the longer goal 0.8).

    .venv/bin/python bench/pg_decode.py                       # 500,000 changes on 100 users, 5 rounds;
                                                              # updates docs/BENCHMARKS.md
    .venv/bin/python bench/pg_decode.py --before /tmp/before  # also the bridge of another checkout, side by side
    .venv/bin/python bench/pg_decode.py --quick               # 50,000 changes, 2 rounds; prints only
    .venv/bin/python bench/pg_decode.py --profile FILE        # also one py-spy'd pass of the bridge (needs py-spy)

Everything runs as processes on loopback: a private cluster (bridge.devtools.localpg.PgCluster), the
OneSignal simulator (bench/_common.Simulator: documented limits, 1,000 writes/s per app, 1 per user
per second) and `python -m bridge run` with default delivery settings (flush 200 ms, 900 requests/s).

Workload: `users` (8 columns: bigint key, 5 text, timestamptz, numeric; REPLICA IDENTITY FULL, as
`setup` makes it for on_delete: delete_user), `--users` rows (100). A server-side procedure commits
transactions that each update every user once (`plan` flips, `score` + 1: 100 row changes per
transaction, each with its whole old row) until `--changes` row changes are written. The mapping
(one alias, four tags, two properties, on_delete: delete_user) reads 7 of the 8 columns.

Fairness: `setup` runs once; a template slot is created before the workload; every pass reads a
fresh copy of it (`pg_copy_logical_replication_slot`), so every reader gets the same WAL decoded by
the walsender from the same start, with the same publication and proto_version 1. The end: the
end LSN of the last commit (read once with `pg_logical_slot_peek_binary_changes`). Each round runs
every reader once, in a rotating order.

- `pg_recvlogical`: wall time of `pg_recvlogical --start --endpos <last commit end> -f /dev/null`
  (process start, connect, stream, exit on the last commit).
- bridge: from the log line `streaming from slot` (process start-up, imports, connections and the
  leader lock excluded) to the first moment the slot's `confirmed_flush_lsn` reaches the last
  commit's end (polled every 10 ms): everything decoded, mapped, coalesced, applied by the
  simulator (2xx) and confirmed. The simulator is reset before each bridge pass and checked after
  it: every user's `plan` and `score` tags must equal the table's final row.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
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

from bridge.devtools.localpg import PgCluster  # noqa: E402

DDL = """
CREATE TABLE users (
    id bigint PRIMARY KEY, crm_id text, plan text, country text, created_at timestamptz,
    locale text, tz text, score numeric(10,2)
);
CREATE PROCEDURE bench_workload(changes int) LANGUAGE plpgsql AS $$
DECLARE written int := 0; n int;
BEGIN
  WHILE written < changes LOOP
    UPDATE users SET plan = CASE WHEN plan = 'free' THEN 'pro' ELSE 'free' END, score = score + 1;
    GET DIAGNOSTICS n = ROW_COUNT;
    written := written + n;
    COMMIT;
  END LOOP;
END $$;
"""
MAPPING = {
    "table": "public.users",
    "identity": {"external_id": "id"},
    "aliases": {"crm_id": "crm_id"},
    "tags": {"plan": "plan", "country": "country", "signup_at": "created_at", "score": "score"},
    "properties": {"language": "locale", "timezone_id": "tz"},
    "on_delete": "delete_user",
}
PUBLICATION = "onesignal_bridge"
MISMATCHES: list[str] = []  # passes whose end state in the simulator differed from the table


def expected_changes(changes: int, users: int) -> int:
    """What `bench_workload(changes)` writes: whole transactions of `users` updates."""
    return -(-changes // users) * users


def config_for(dsn: str, sim_url: str, slot: str) -> dict[str, Any]:
    return {
        "onesignal": {"app_id": APP_ID, "api_key": API_KEY, "base_url": sim_url},
        "source": {"kind": "postgres", "dsn": dsn, "slot": slot, "publication": PUBLICATION, "snapshot": "never"},
        "mappings": [MAPPING],
        "metrics": {"port": free_port(), "host": "127.0.0.1"},
    }


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
        for _ in range(200):
            try:
                self.cluster.execute("SELECT pg_drop_replication_slot(%s)", (name,), dbname="bench")
                return
            except Exception:  # still active for a moment after the client left
                time.sleep(0.05)


def last_commit_end(cluster: PgCluster) -> int:
    """End LSN of the last commit in the template slot's stream (pgoutput Commit: 'C', flags,
    commit_lsn, end_lsn, commit_time), once the whole workload is flushed (synchronous_commit is
    off: decoding reads only flushed WAL)."""
    (insert,) = cluster.execute("SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn", dbname="bench")[0]
    deadline = time.monotonic() + 60
    while cluster.execute("SELECT pg_current_wal_flush_lsn() - '0/0'::pg_lsn", dbname="bench")[0][0] < insert:
        if time.monotonic() > deadline:
            raise RuntimeError("the workload's WAL was not flushed within 60 s")
        time.sleep(0.05)
    rows = cluster.execute(
        "SELECT data FROM pg_logical_slot_peek_binary_changes('tmpl', NULL, NULL, 'proto_version', '1',"
        f" 'publication_names', '{PUBLICATION}') WHERE get_byte(data, 0) = 67 ORDER BY lsn DESC LIMIT 1",
        dbname="bench")
    data = bytes(rows[0][0])
    return int.from_bytes(data[10:18], "big")


def lsn_str(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def run_recvlogical(cluster: PgCluster, slot: str, endpos: int) -> float:
    cmd = [str(cluster.bindir / "pg_recvlogical"), "-d", cluster.dsn("bench"), "--slot", slot, "--start",
           "-o", "proto_version=1", "-o", f"publication_names={PUBLICATION}", "--endpos", lsn_str(endpos),
           "-f", "/dev/null", "-F", "0", "-s", "1", "--no-loop"]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    dt = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"pg_recvlogical failed ({out.returncode}): {out.stderr}")
    return dt


def final_rows(cluster: PgCluster) -> dict[str, tuple[str, str]]:
    rows = cluster.execute("SELECT id, plan, score FROM users", dbname="bench")
    return {str(i): (plan, str(score)) for i, plan, score in rows}


def check_applied(sim: Simulator, want: dict[str, tuple[str, str]]) -> str | None:
    """None when the simulator holds every row's final plan and score; else what differs."""
    got = {}
    for u in sim.users():
        ext = (u.get("identity") or {}).get("external_id")
        if ext is not None:
            tags = (u.get("properties") or {}).get("tags") or {}
            got[ext] = (tags.get("plan"), tags.get("score"))
    bad = [k for k, v in want.items() if got.get(k) != v]
    if bad:
        k = bad[0]
        return f"{len(bad)} of {len(want)} users differ (user {k}: simulator {got.get(k)}, table {want[k]})"
    return None


def run_bridge(root: Path, cluster: PgCluster, sim: Simulator, slot: str, endpos: int, workdir: Path,
               name: str, want: dict[str, tuple[str, str]], timeout: float = 600,
               profile_to: Path | None = None) -> float:
    """Seconds from `streaming from slot` to the slot confirmed at `endpos`."""
    sim.reset()
    b = BridgeRun(root, config_for(cluster.dsn("bench"), sim.base_url, slot), workdir, name)
    spy = None
    with cluster.connect("bench") as conn:
        b.start(watch=("streaming from slot",))
        try:
            if profile_to is not None:
                spy = subprocess.Popen([profiler(), "record", "-r", "200", "--threads", "-f", "raw",
                                        "-o", str(profile_to),
                                        "-p", str(b.proc.pid)],  # type: ignore[union-attr]
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + timeout
            done_at = None
            while time.monotonic() < deadline:
                row = conn.execute("SELECT confirmed_flush_lsn - '0/0'::pg_lsn FROM pg_replication_slots"
                                   " WHERE slot_name = %s", (slot,)).fetchone()
                if row and row[0] is not None and int(row[0]) >= endpos:
                    done_at = time.perf_counter()
                    break
                if not b.alive():
                    raise RuntimeError(f"bridge exited:\n{b.logs()[-3000:]}")
                time.sleep(0.01)
            started = b.seen("streaming from slot")
            if done_at is None or started is None:
                raise RuntimeError(f"bridge did not confirm the last commit within {timeout}s:\n{b.logs()[-3000:]}")
        finally:
            b.stop()
            if spy is not None:
                spy.wait(30)
    problem = check_applied(sim, want)
    if problem:
        MISMATCHES.append(f"{name}: {problem}")
        print(f"  {name}: confirmed, but the simulator does not hold the final rows: {problem}", flush=True)
    return done_at - started


def profiler() -> str:
    for cand in (str(Path(sys.executable).parent / "py-spy"), shutil.which("py-spy") or ""):
        if cand and Path(cand).exists():
            return cand
    raise SystemExit("--profile needs py-spy (pip install py-spy into the venv; not a project dependency)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--changes", type=int, default=500_000)
    ap.add_argument("--users", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--before", type=Path, help="a checkout of an earlier bridge (git worktree) to run side by side")
    ap.add_argument("--quick", action="store_true", help="50,000 changes, 2 rounds, no docs update")
    ap.add_argument("--profile", type=Path, help="one extra bridge pass under py-spy; raw samples to this file")
    ap.add_argument("--replica-identity", choices=("full", "default"), default="full",
                    help="full: as `setup` makes it for on_delete (the old row in every update); default: "
                         "the primary key only (what deletes need when the identity is the key)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.changes, args.rounds, args.no_write = 50_000, 2, True
    if args.profile:
        profiler()
    trees: dict[str, Path] = {"bridge": ROOT}
    if args.before:
        trees = {"before": args.before.resolve(), "after": ROOT}

    cluster = PgCluster(settings={"max_replication_slots": 20, "max_wal_senders": 20,
                                  "logical_decoding_work_mem": "64MB"})
    cluster.start()
    tmp = tempfile.TemporaryDirectory(prefix="bench-pg-")
    workdir = Path(tmp.name)
    sim = Simulator(workdir, log_size=10_000)
    try:
        cluster.create_database("bench")
        cluster.execute(DDL, dbname="bench")
        cluster.execute("INSERT INTO users SELECT g, 'crm-' || g, 'free', 'FR', now(), 'fr-FR', 'Europe/Paris', 0"
                        " FROM generate_series(1, %s) g", (args.users,), dbname="bench")
        setup = BridgeRun(ROOT, config_for(cluster.dsn("bench"), sim.base_url, "tmpl"), workdir, "setup")
        out = setup.cli("setup", "--config", str(setup.config_path))
        if out.returncode != 0:
            raise RuntimeError(f"setup failed: {out.stdout}\n{out.stderr}")
        if args.replica_identity == "default":
            cluster.execute("ALTER TABLE users REPLICA IDENTITY DEFAULT", dbname="bench")
        t0 = time.perf_counter()
        with cluster.connect("bench") as conn:
            conn.autocommit = True
            conn.execute("CALL bench_workload(%s)", (args.changes,))
        gen_s = time.perf_counter() - t0
        written = expected_changes(args.changes, args.users)
        wal = cluster.execute("SELECT pg_current_wal_lsn() - confirmed_flush_lsn FROM pg_replication_slots"
                              " WHERE slot_name = 'tmpl'", dbname="bench")[0][0]
        endpos = last_commit_end(cluster)
        want = final_rows(cluster)
        print(f"workload: {written:,} row changes on {args.users} users in {gen_s:.1f} s; "
              f"{int(wal) / 2**20:.0f} MiB of WAL; last commit ends at {lsn_str(endpos)}", flush=True)
        info = machine(cluster.bindir)
        described = {who: git_describe(path) for who, path in trees.items()}
        slots = Slots(cluster)

        readers = ["recvlogical", *trees]
        rates: dict[str, list[float]] = {who: [] for who in readers}
        for r in range(args.rounds):
            order = readers[r % len(readers):] + readers[: r % len(readers)]
            secs: dict[str, float] = {}
            for who in order:
                slot = slots.fresh()
                try:
                    if who == "recvlogical":
                        secs[who] = run_recvlogical(cluster, slot, endpos)
                    else:
                        secs[who] = run_bridge(trees[who], cluster, sim, slot, endpos, workdir, f"{who}-{r}", want)
                finally:
                    slots.drop(slot)
                rates[who].append(written / secs[who])
            line = ", ".join(f"{who} {secs[who]:.2f} s ({written / secs[who]:,.0f}/s)" for who in readers)
            ratios = ", ".join(f"{who}/recvlogical {secs['recvlogical'] / secs[who]:.2f}" for who in trees)
            print(f"round {r + 1}/{args.rounds}: {line}; {ratios}", flush=True)

        if args.profile:
            slot = slots.fresh()
            t = run_bridge(ROOT, cluster, sim, slot, endpos, workdir, "profiled", want, profile_to=args.profile)
            slots.drop(slot)
            print(f"\nprofiled bridge pass: {t:.2f} s; py-spy raw samples in {args.profile}")
    finally:
        sim.close()
        cluster.destroy()
        tmp.cleanup()

    def ratios(who: str) -> list[float]:
        return [b / p for b, p in zip(rates[who], rates["recvlogical"], strict=True)]

    rows = ["| reader | changes/s, median (range) | ratio to pg_recvlogical, median (range) |",
            "|---|---:|---:|",
            f"| `pg_recvlogical` (pgoutput, proto 1) to /dev/null | {spread(rates['recvlogical'])} | 1 |"]
    for who in trees:
        label = "bridge" if who == "bridge" else f"bridge {who} ({described[who]})"
        rows.append(f"| {label}: decode, map, coalesce, apply (simulator), confirm | {spread(rates[who])} | "
                    f"{spread(ratios(who), '{:.2f}')} |")
    final = "after" if args.before else "bridge"
    verdict = median(ratios(final))
    table = "\n".join([
        f"Machine: {machine_line(info)}.",
        "",
        f"Command: `.venv/bin/python bench/pg_decode.py --changes {args.changes} --users {args.users} "
        f"--rounds {args.rounds}{' --before ' + str(args.before) if args.before else ''}"
        f"{' --replica-identity default' if args.replica_identity == 'default' else ''}`. "
        f"Workload: {written:,} row changes on {args.users} users (transactions that update every user once; "
        f"REPLICA IDENTITY {args.replica_identity.upper()}), "
        f"{int(wal) / 2**20:.0f} MiB of WAL. Every pass reads a fresh copy of one slot created before the "
        "workload; each round runs every reader once, in a rotating order. The bridge is a process with "
        "default delivery settings, timed from its `streaming from slot` log line to the slot confirmed at "
        "the last commit; every pass is checked against the table (all users' final tags in the simulator).",
        "",
        *rows,
        "",
        f"Ratio {final} / pg_recvlogical, median of the per-round ratios: **{verdict:.2f}** "
        f"(target >= 0.5: {'met' if verdict >= 0.5 else 'missed'}; goal 0.8).",
    ])
    print("\n" + table)
    if not args.no_write:
        write_section("pg-decode", "1. Postgres ingest", table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
