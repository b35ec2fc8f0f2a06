"""The faults the simulator injects (5xx, latency, requests held open): what to break, and where.

`POST /_simulator/faults` sets them (`parse_faults`); the HTTP layer (`simulator.py`) decides them
per request before anything else happens and builds the faulty answers.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any

from bridge.devtools.simvalidation import SimError


@dataclass
class Faults:
    """What to break, and where. Decided per request before anything else happens."""

    error_rate: float = 0.0
    status: int = 503
    latency_ms: float = 0.0
    latency_jitter_ms: float = 0.0  # plus a uniform 0..jitter: arrivals reorder and bunch
    timeout_rate: float = 0.0
    hold_s: float = 30.0
    paths: re.Pattern[str] | None = None
    rng: random.Random = field(default_factory=random.Random)

    def applies_to(self, path: str) -> bool:
        return self.paths is None or self.paths.search(path) is not None

    def public(self) -> dict[str, Any]:
        return {"error_rate": self.error_rate, "status": self.status, "latency_ms": self.latency_ms,
                "latency_jitter_ms": self.latency_jitter_ms,
                "timeout_rate": self.timeout_rate, "hold_s": self.hold_s,
                "paths": self.paths.pattern if self.paths else None}


def _rate(body: dict[str, Any], key: str, problems: list[str]) -> float:
    value = body.get(key, 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        problems.append(f"{key} must be a number between 0 and 1")
        return 0.0
    return float(value)


def parse_faults(body: Any) -> Faults:
    """Validate a POST /_simulator/faults body; SimError 400 names every bad field."""
    if not isinstance(body, dict):
        raise SimError.one(400, "invalid-body", "the faults body must be a JSON object")
    problems: list[str] = []
    faults = Faults(error_rate=_rate(body, "error_rate", problems),
                    timeout_rate=_rate(body, "timeout_rate", problems))
    status = body.get("status", 503)
    if not isinstance(status, int) or isinstance(status, bool) or not 400 <= status <= 599:
        problems.append("status must be an HTTP error status (400-599)")
    else:
        faults.status = status
    for key in ("latency_ms", "latency_jitter_ms", "hold_s"):
        value = body.get(key, getattr(faults, key))
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            problems.append(f"{key} must be a non-negative number")
        else:
            setattr(faults, key, float(value))
    if body.get("paths") is not None:
        try:
            faults.paths = re.compile(body["paths"])
        except (re.error, TypeError):
            problems.append("paths must be a regular expression")
    if isinstance(body.get("seed"), int):
        faults.rng.seed(body["seed"])
    if problems:
        raise SimError(400, [{"code": "invalid-faults", "title": p} for p in problems])
    return faults
