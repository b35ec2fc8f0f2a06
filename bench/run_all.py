"""Run every figure's benchmark, one after the other (they must not share the 2 cores).

    .venv/bin/python bench/run_all.py            # full sizes; each script updates its docs/BENCHMARKS.md section
    .venv/bin/python bench/run_all.py --quick    # smoke test: every script with --quick (a few minutes in all)
    .venv/bin/python bench/run_all.py --only pg_decode,latency [--quick]

Extra arguments after `--` go to every script (e.g. `-- --no-write`).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FIGURES = ["pg_decode", "kafka_decode", "api_efficiency", "latency", "memory", "ceiling"]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1:]
        argv = argv[: argv.index("--")]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default=",".join(FIGURES))
    args = ap.parse_args(argv)
    failed = []
    for name in args.only.split(","):
        cmd = [sys.executable, str(HERE / f"{name}.py"), *(["--quick"] if args.quick else []), *extra]
        print(f"\n=== {' '.join(cmd)}", flush=True)
        t0 = time.monotonic()
        rc = subprocess.call(cmd)
        print(f"=== {name}: exit {rc} after {time.monotonic() - t0:.0f} s", flush=True)
        if rc != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
