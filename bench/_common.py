"""Shared pieces of the benchmark scripts (machine description, results file, processes, stats).

Nothing here is a benchmark. Each `bench/<figure>.py` imports it; `tests/` is put on sys.path for
the harness pieces (`bridgeproc.BridgeProcess`, `kafkabroker.KafkaBroker`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for p in (str(ROOT), str(ROOT / "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)

import httpx  # noqa: E402
from bridgeproc import API_KEY, APP_ID, BridgeProcess, free_port, wait_until  # noqa: E402,F401
from bridgeproc import Simulator as TestSimulator  # noqa: E402

DOC = ROOT / "docs" / "BENCHMARKS.md"
PY = sys.executable


# ---------------------------------------------------------------------------------------------
# Statistics


def median(xs: Iterable[float]) -> float:
    xs = list(xs)
    return statistics.median(xs) if xs else float("nan")


def percentile(sorted_xs: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an already sorted sequence."""
    if not sorted_xs:
        return float("nan")
    k = max(0, min(len(sorted_xs) - 1, math.ceil(q / 100 * len(sorted_xs)) - 1))
    return sorted_xs[k]


def spread(xs: Sequence[float], fmt: str = "{:,.0f}") -> str:
    """'median (min-max)' for a results table."""
    xs = list(xs)
    if not xs:
        return "n/a"
    if len(xs) == 1:
        return fmt.format(xs[0])
    return f"{fmt.format(median(xs))} ({fmt.format(min(xs))}–{fmt.format(max(xs))})"


# ---------------------------------------------------------------------------------------------
# The machine


def _first(pattern: str, text: str, default: str = "?") -> str:
    m = re.search(pattern, text, re.M)
    return m.group(1).strip() if m else default


def machine(pg_bindir: str | os.PathLike[str] | None = None) -> dict[str, str]:
    info: dict[str, str] = {}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    info["cpu"] = _first(r"^model name\s*:\s*(.*)$", cpuinfo, platform.processor() or "?")
    info["nproc"] = str(os.cpu_count())
    try:
        mem_kb = int(_first(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text(), "0"))
        info["ram"] = f"{mem_kb / 1024 / 1024:.0f} GiB"
    except OSError:
        info["ram"] = "?"
    info["kernel"] = platform.release()
    info["python"] = platform.python_version()
    try:
        import psycopg

        info["psycopg"] = f"{psycopg.__version__} (libpq {psycopg.pq.version()})"
    except Exception:  # pragma: no cover - informational only
        info["psycopg"] = "?"
    try:
        import confluent_kafka

        v, lv = confluent_kafka.version(), confluent_kafka.libversion()
        v = v[0] if isinstance(v, tuple) else v
        lv = lv[0] if isinstance(lv, tuple) else lv
        info["confluent_kafka"] = f"{v} (librdkafka {lv})"
    except Exception:  # pragma: no cover
        info["confluent_kafka"] = "?"
    if pg_bindir is None:
        try:
            from bridge.devtools.localpg import find_bindir

            pg_bindir = find_bindir()
        except Exception:  # pragma: no cover
            pg_bindir = None
    if pg_bindir:
        try:
            out = subprocess.run([str(Path(pg_bindir) / "postgres"), "--version"], capture_output=True, text=True)
            info["postgres"] = out.stdout.strip().replace("postgres (PostgreSQL) ", "")
        except OSError:
            info["postgres"] = "?"
    try:
        info["load"] = "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        info["load"] = "?"
    return info


def machine_line(info: dict[str, str]) -> str:
    return (f"{info['cpu']}, nproc {info['nproc']}, {info['ram']} RAM, Linux {info['kernel']}; "
            f"Python {info['python']}; PostgreSQL {info.get('postgres', '?')}; psycopg {info['psycopg']}; "
            f"confluent-kafka {info['confluent_kafka']}; load average at start {info['load']}")


# ---------------------------------------------------------------------------------------------
# docs/BENCHMARKS.md: each figure owns the text between its two markers


HEADER = """# Benchmarks

Every figure here comes from one script under `bench/` and can be reproduced with one command.
"""


def write_section(key: str, title: str, body: str, path: Path = DOC) -> None:
    begin, end = f"<!-- bench:{key}:begin -->", f"<!-- bench:{key}:end -->"
    text = path.read_text() if path.exists() else HEADER
    section = f"{begin}\n## {title}\n\n{body.strip()}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        if not text.lstrip().startswith("# "):
            text = HEADER + "\n" + text
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)
    print(f"\nwrote section {key!r} of {path.relative_to(ROOT)}")


# ---------------------------------------------------------------------------------------------
# The OneSignal simulator as a process, with a request log large enough for a whole run


class Simulator(TestSimulator):
    """The tests' simulator process (tests/bridgeproc.py: strict, documented limits of 1,000
    writes/s per app and 1 per user per second), its request log sized to hold a whole run."""

    def __init__(self, workdir: Path, log_size: int = 2_000_000, api_key: str = API_KEY) -> None:
        super().__init__(api_key, log_dir=workdir, request_log_size=log_size, timeout_s=60)


def bridge_config(dsn: str, sim_url: str, mappings: list[dict[str, Any]], metrics_port: int, *,
                  delivery: dict[str, Any] | None = None, source: dict[str, Any] | None = None,
                  slot: str = "onesignal_bridge", publication: str = "onesignal_bridge") -> dict[str, Any]:
    return {
        "onesignal": {"app_id": APP_ID, "api_key": API_KEY, "base_url": sim_url},
        "source": {"kind": "postgres", "dsn": dsn, "slot": slot, "publication": publication,
                   "snapshot": "never", **(source or {})},
        "mappings": mappings,
        "delivery": {**(delivery or {})},
        "metrics": {"port": metrics_port, "host": "127.0.0.1"},
    }


def run_setup(config_path: Path) -> None:
    out = subprocess.run([PY, "-m", "bridge", "setup", "--config", str(config_path)], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"setup failed: {out.stdout}\n{out.stderr}")


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eEinfNa]+)$")


def scrape(port: int, timeout: float = 5.0) -> dict[str, float]:
    """The bridge's /metrics as {name{labels}: value}, plus per-name sums under the bare name."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=timeout).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
        out[name + labels] = value
        if labels:
            out[name] = out.get(name, 0.0) + value
    return out


def try_scrape(port: int) -> dict[str, float] | None:
    try:
        return scrape(port)
    except (httpx.HTTPError, OSError):
        return None


def rss_peak_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in KiB, from /proc (VmHWM: the peak since it started)."""
    text = Path(f"/proc/{pid}/status").read_text()
    return int(_first(r"VmRSS:\s+(\d+)", text, "0")), int(_first(r"VmHWM:\s+(\d+)", text, "0"))


# ---------------------------------------------------------------------------------------------
# The bridge as a process, run from a given checkout (figures 1 and 2 compare two trees side by side)


class BridgeRun:
    """`python -m bridge run` from the checkout at `root` (its own `bridge` package first on
    sys.path, so a `git worktree` of an older commit runs its own code), stderr read on a thread:
    `seen(text)` is the perf_counter() time the first log line containing `text` arrived."""

    def __init__(self, root: Path, config: dict[str, Any], workdir: Path, name: str,
                 log_level: str = "info") -> None:
        import yaml

        self.root = Path(root)
        self.config_path = workdir / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / f"{name}.log"
        self.log_level = log_level
        self.proc: subprocess.Popen[bytes] | None = None
        self._seen: dict[str, float] = {}
        self._watch: list[str] = []
        self._lines: list[str] = []

    def cli(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PYTHONPATH": str(self.root)}
        return subprocess.run([PY, "-m", "bridge", *argv], capture_output=True, text=True, cwd=self.root,
                              env=env, timeout=timeout)

    def start(self, watch: Sequence[str] = ()) -> BridgeRun:
        import threading

        self._watch = list(watch)
        env = {**os.environ, "PYTHONPATH": str(self.root)}
        self.proc = subprocess.Popen(
            [PY, "-m", "bridge", "run", "--config", str(self.config_path), "--log-level", self.log_level],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=self.root, env=env,
        )
        threading.Thread(target=self._reader, daemon=True).start()
        return self

    def _reader(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        with open(self.log_path, "ab") as log:
            for raw in self.proc.stderr:
                now = time.perf_counter()
                log.write(raw)
                line = raw.decode(errors="replace")
                for text in self._watch:
                    if text not in self._seen and text in line:
                        self._seen[text] = now
                if len(self._lines) < 2000:
                    self._lines.append(line)

    def seen(self, text: str) -> float | None:
        return self._seen.get(text)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def logs(self) -> str:
        return "".join(self._lines)

    def stop(self, timeout: float = 30) -> None:
        import signal

        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def git_describe(root: Path) -> str:
    """`<short commit>` of a checkout, with `+uncommitted` when bridge/ has local changes."""
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "bridge"],
                               capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"
    return head + (" + uncommitted changes" if dirty else "")


@dataclasses.dataclass
class Timer:
    t0: float = dataclasses.field(default_factory=time.perf_counter)

    def s(self) -> float:
        return time.perf_counter() - self.t0


# ---------------------------------------------------------------------------------------------
# Postgres + simulator + bridge process, for the figures that run the real bridge (3 to 6)

USERS_DDL = """
CREATE TABLE users (
    id bigint PRIMARY KEY, crm_id text, plan text, country text, created_at timestamptz,
    locale text, tz text, score numeric(10,2)
);
-- One transaction that changes the given users' rows, once per id (duplicates allowed: each is
-- a row change of its own).
CREATE FUNCTION bench_touch(ids bigint[]) RETURNS void LANGUAGE plpgsql AS $$
DECLARE i bigint;
BEGIN
  FOREACH i IN ARRAY ids LOOP
    UPDATE users SET score = score + 1, plan = CASE WHEN plan = 'free' THEN 'pro' ELSE 'free' END WHERE id = i;
  END LOOP;
END $$;
"""
USERS_MAPPING = {
    "table": "public.users",
    "identity": {"external_id": "id"},
    "tags": {"plan": "plan", "country": "country", "signup_at": "created_at", "score": "score"},
    "properties": {"language": "locale", "timezone_id": "tz"},
}


def insert_users(conn: Any, first: int, last: int, chunk: int = 50_000) -> None:
    for lo in range(first, last + 1, chunk):
        hi = min(last, lo + chunk - 1)
        conn.execute(
            "INSERT INTO users SELECT g, 'crm-' || g, 'free', 'FR', now(), 'fr-FR', 'Europe/Paris', 0"
            " FROM generate_series(%s::bigint, %s::bigint) g", (lo, hi))


class RootedBridgeProcess(BridgeProcess):
    """`BridgeProcess` running the bridge of the checkout at `root` (its `bridge` package first on
    sys.path), so one run can compare an earlier commit's bridge (a `git worktree`) with this one."""

    def __init__(self, root: Path, config: dict[str, Any], workdir: Path, **kw: Any) -> None:
        super().__init__(config, workdir, **kw)
        self.root = Path(root)
        self.env = {**self.env, "PYTHONPATH": str(self.root)}

    def start(self) -> RootedBridgeProcess:
        self.runs += 1
        log = open(self.log_path, "ab")
        log.write(f"\n==== start #{self.runs} ====\n".encode())
        log.flush()
        self.proc = subprocess.Popen(
            [PY, "-m", "bridge", "run", "--config", str(self.config_path), "--log-level", self.log_level,
             *self.extra_args],
            stdout=log, stderr=log, cwd=self.root, env=self.env,
        )
        return self


class Stack:
    """A private Postgres cluster with a `bench` database, the simulator and the bridge process."""

    def __init__(self, workdir: Path, *, pg_settings: dict[str, Any] | None = None,
                 delivery: dict[str, Any] | None = None, mappings: list[dict[str, Any]] | None = None,
                 sim_log_size: int = 2_000_000) -> None:
        from bridge.devtools.localpg import PgCluster

        self.workdir = workdir
        self.cluster = PgCluster(settings=pg_settings or {})
        self.cluster.start()
        self.cluster.create_database("bench")
        self.dsn = self.cluster.dsn("bench")
        self.sim = Simulator(workdir, log_size=sim_log_size)
        self.metrics_port = free_port()
        self.config = bridge_config(self.dsn, self.sim.base_url, mappings or [USERS_MAPPING], self.metrics_port,
                                    delivery=delivery)
        self.bridge = BridgeProcess(self.config, workdir, log_level="warning")
        self.info = machine(self.cluster.bindir)

    def use_bridge_of(self, root: Path, name: str) -> None:
        """From now on start the bridge of the checkout at `root` (see RootedBridgeProcess)."""
        self.bridge = RootedBridgeProcess(root, self.config, self.workdir, log_level="warning", name=name)

    def connect(self) -> Any:
        return self.cluster.connect("bench")

    def setup(self) -> None:
        """Publication, slot (from now on), dead-letter and subscription tables."""
        run_setup(self.bridge.config_path)

    def drop_slot(self) -> None:
        with self.connect() as conn:
            conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                         " WHERE slot_name = 'onesignal_bridge'")

    def slot_lag_bytes(self) -> int:
        with self.connect() as conn:
            row = conn.execute("SELECT pg_current_wal_lsn() - confirmed_flush_lsn FROM pg_replication_slots"
                               " WHERE slot_name = 'onesignal_bridge'").fetchone()
        return int(row[0]) if row and row[0] is not None else -1

    def start_bridge(self, timeout: float = 30.0) -> None:
        self.bridge.start()

        def ready() -> bool:
            if not self.bridge.alive():
                raise RuntimeError(f"bridge exited:\n{self.bridge.logs()[-3000:]}")
            m = try_scrape(self.metrics_port)
            return bool(m) and m.get("onesignal_bridge_confirmed_position", 0) >= 0 and \
                httpx.get(f"http://127.0.0.1:{self.metrics_port}/readyz").status_code in (200, 503)

        wait_until(ready, timeout, 0.1, what="bridge metrics endpoint")
        # the source is connected once /readyz says so or the dispatcher reports the simulator down
        wait_until(lambda: self._connected(), timeout, 0.1, what="bridge source to connect")

    def _connected(self) -> bool:
        try:
            body = httpx.get(f"http://127.0.0.1:{self.metrics_port}/readyz").json()
        except (httpx.HTTPError, ValueError):
            return False
        return body.get("reason") != "source not connected"

    def stop_bridge(self) -> None:
        self.bridge.stop()

    def close(self) -> None:
        try:
            self.bridge.stop()
        finally:
            try:
                self.sim.close()
            finally:
                self.cluster.destroy()


class PacedWriter:
    """Calls bench_touch(ids) on a fixed schedule (one transaction per tick) from its own thread;
    records (ids, commit time) of each tick: time.time() right after the commit returned."""

    def __init__(self, dsn: str, ticks: list[list[int]], tick_s: float) -> None:
        import threading

        self.dsn, self.ticks, self.tick_s = dsn, ticks, tick_s
        self.commits: list[tuple[list[int], float]] = []
        self.started = 0.0
        self.finished = 0.0
        self.max_behind = 0.0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> PacedWriter:
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("SET synchronous_commit = on")
            cur = conn.cursor()
            t0 = time.perf_counter()
            self.started = time.time()
            for k, ids in enumerate(self.ticks):
                due = t0 + k * self.tick_s
                now = time.perf_counter()
                if now < due:
                    time.sleep(due - now)
                else:
                    self.max_behind = max(self.max_behind, now - due)
                if ids:
                    cur.execute("SELECT bench_touch(%s::bigint[])", (ids,), prepare=True)
                    self.commits.append((ids, time.time()))
            self.finished = time.time()

    @property
    def changes(self) -> int:
        return sum(len(ids) for ids, _ in self.commits)
