"""Test harness pieces: the simulator and the bridge as real processes, and polling helpers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "os_v2_app_testsecretkey0123456789abcdefghij"
# `make test-all` (ONESIGNAL_BRIDGE_LONG=1): the long campaigns and the full-size runs. Tests that
# size themselves by it say in their docstring what the default (bounded) size still covers.
LONG = os.environ.get("ONESIGNAL_BRIDGE_LONG", "").strip().lower() not in ("", "0", "false", "no")
APP_ID = "3f1c2b8e-0000-4000-8000-000000000001"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(pred: Callable[[], Any], timeout: float = 20.0, interval: float = 0.1, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last value: {last!r})")


class Simulator:
    """`onesignal-bridge simulator` in its own process, spoken to over HTTP.

    Strict (issue 14: OneSignal's less convenient reading of every point, `--app-id` APP_ID), so
    the whole suite runs against it. `config(...)` changes a setting for one test (e.g. a shorter
    replication lag); `reset()` (the `sim` fixture) restores the start-up settings."""

    def __init__(self, api_key: str = API_KEY, extra: list[str] | None = None, *,
                 log_dir: Path | None = None, request_log_size: int | None = None,
                 timeout_s: float = 10) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        log_dir = log_dir or (ROOT / ".pytest_cache" if (ROOT / ".pytest_cache").exists() else None)
        self.log_path = log_dir / f"simulator-{self.port}.log" if log_dir is not None else None
        self.log = open(self.log_path, "w+") if self.log_path is not None else subprocess.DEVNULL
        if request_log_size is not None:
            extra = ["--request-log-size", str(request_log_size), *(extra or [])]
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bridge.devtools.simulator",
                "--port",
                str(self.port),
                "--api-key",
                api_key,
                "--strict",
                "--app-id",
                APP_ID,
                *(extra or []),
            ],
            stdout=self.log,
            stderr=self.log,
            cwd=ROOT,
        )
        self.http = httpx.Client(base_url=self.base_url, timeout=timeout_s)
        wait_until(self._up, 20, what="simulator to listen")

    def _up(self) -> bool:
        try:
            return self.http.get("/_simulator/stats").status_code == 200
        except httpx.HTTPError:
            return False

    def users(self) -> list[dict[str, Any]]:
        return self.http.get("/_simulator/users").json()["users"]

    def user(self, external_id: str) -> dict[str, Any] | None:
        for u in self.users():
            if u["identity"].get("external_id") == external_id:
                return u
        return None

    def by_external_id(self) -> dict[str, dict[str, Any]]:
        return {u["identity"]["external_id"]: u for u in self.users() if "external_id" in u["identity"]}

    def stats(self) -> dict[str, Any]:
        return self.http.get("/_simulator/stats").json()

    def requests(self) -> list[dict[str, Any]]:
        return self.http.get("/_simulator/requests").json()["requests"]

    def faults(self, **kw: Any) -> None:
        self.http.post("/_simulator/faults", json=kw).raise_for_status()

    def clear_faults(self) -> None:
        self.http.delete("/_simulator/faults").raise_for_status()

    def reset(self) -> None:
        """Forget users, stats and the request log; back to the start-up (strict) settings."""
        self.http.post("/_simulator/reset").raise_for_status()

    def config(self, **settings: Any) -> dict[str, Any]:
        """Change settings until the next reset, e.g. config(replication_lag_ms=400, max_tags=3)."""
        response = self.http.post("/_simulator/config", json=settings)
        response.raise_for_status()
        return dict(response.json()["config"])

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.http.close()


def bridge_config(
    dsn: str,
    sim_url: str,
    mappings: list[dict[str, Any]],
    *,
    api_key: str = API_KEY,
    delivery: dict[str, Any] | None = None,
    source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "onesignal": {"app_id": APP_ID, "api_key": api_key, "base_url": sim_url},
        "source": {
            "kind": "postgres",
            "dsn": dsn,
            "slot": "onesignal_bridge",
            "publication": "onesignal_bridge",
            "snapshot": "never",
            # Tests restart bridges after SIGKILL all the time; a restart after a crash waits out
            # the dead process's requests (13 s by default, bridge/lease.py). That wait is what
            # test_lease, test_leader_fencing and test_operations' standby test are about; the
            # other tests start sending at once. (`takeover_wait_s: None` restores the default.)
            "takeover_wait_s": 0,
            **(source or {}),
        },
        "mappings": mappings,
        "delivery": {"flush_interval_ms": 100, **(delivery or {})},
        "metrics": {"port": 0, "host": "127.0.0.1"},
    }


class BridgeProcess:
    """`onesignal-bridge run` as a child process (so tests can SIGKILL it)."""

    def __init__(
        self,
        config: dict[str, Any],
        workdir: Path,
        *,
        log_level: str = "info",
        env: dict[str, str] | None = None,
        name: str = "bridge",
    ) -> None:
        self.workdir = workdir
        self.config_path = workdir / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / f"{name}.log"
        self.log_level = log_level
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0
        self.extra_args: list[str] = []

    def start(self) -> BridgeProcess:
        self.runs += 1
        log = open(self.log_path, "ab")
        log.write(f"\n==== start #{self.runs} ====\n".encode())
        log.flush()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bridge",
                "run",
                "--config",
                str(self.config_path),
                "--log-level",
                self.log_level,
                *self.extra_args,
            ],
            stdout=log,
            stderr=log,
            cwd=ROOT,
            env=self.env,
        )
        return self

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 30) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.alive():
            try:
                self.terminate(15)
            except subprocess.TimeoutExpired:
                self.kill()


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )
