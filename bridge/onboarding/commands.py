"""The command-line side of `plan`, `export-csv` and `reconcile`: their flags and entry points.

`bridge/cli.py` adds the three sub-commands and calls these functions with the loaded
configuration; everything else lives in this package.
"""

from __future__ import annotations

import argparse
import sys

from bridge.config import Config
from bridge.sources import registry


def add_arguments(plan: argparse.ArgumentParser, export: argparse.ArgumentParser,
                  reconcile: argparse.ArgumentParser) -> None:
    plan.add_argument("--config", required=True, metavar="FILE")
    plan.add_argument("--format", choices=["text", "json"], default="text")
    plan.add_argument("--max-problems", type=int, default=100, metavar="N",
                      help="list at most N problems (all are counted; default 100)")

    from bridge.onboarding.csvexport import MAX_FILE_BYTES, MAX_FILE_ROWS

    export.add_argument("--config", required=True, metavar="FILE")
    export.add_argument("--out", required=True, metavar="DIR", help="directory for the CSV files (created)")
    export.add_argument("--max-file-bytes", type=int, default=MAX_FILE_BYTES, metavar="N",
                        help=f"start a new file before one reaches N bytes (default {MAX_FILE_BYTES:,}, "
                             f"below OneSignal's 150 MB)")
    export.add_argument("--max-file-rows", type=int, default=MAX_FILE_ROWS, metavar="N",
                        help=f"and before it reaches N rows (default {MAX_FILE_ROWS:,})")

    reconcile.add_argument("--config", required=True, metavar="FILE")
    which = reconcile.add_mutually_exclusive_group(required=True)
    which.add_argument("--all", action="store_true", help="check every user the database implies")
    which.add_argument("--sample", type=int, metavar="N", help="check N users picked at random")
    reconcile.add_argument("--repair", action="store_true",
                           help="send each drifted user's database state through the normal delivery path")
    reconcile.add_argument("--format", choices=["text", "json"], default="text")
    reconcile.add_argument("--read", choices=["auto", "view", "export"], default="auto",
                           help="how OneSignal is read: View user (about 1 request/s per app), OneSignal's "
                                "CSV export, or auto (View user up to a few hundred users, else the export)")
    reconcile.add_argument("--export-timeout", type=float, default=3600.0, metavar="SECONDS",
                           help="how long to wait for OneSignal's CSV export file (default 3600)")


def _dsn(config: Config, command: str) -> str | None:
    kind = registry.for_config(config)
    dsn = kind.database_dsn(config)
    if dsn is None:
        print(f"{command}: source.kind {kind.name} names no database to read the mapped tables from; "
              f"{command} works with the postgres and outbox kinds", file=sys.stderr)
    return dsn


def plan(config: Config, args: argparse.Namespace) -> int:
    from bridge.onboarding import plan as planning

    dsn = _dsn(config, "plan")
    if dsn is None:
        return 2
    return planning.run(config, dsn, args.format, max(0, args.max_problems))


def export_csv(config: Config, args: argparse.Namespace) -> int:
    from bridge.onboarding import csvexport

    if _dsn(config, "export-csv") is None:
        return 2
    return csvexport.run(config, args.out, max_bytes=args.max_file_bytes, max_rows=args.max_file_rows)


def reconcile(config: Config, args: argparse.Namespace) -> int:
    import bridge.onboarding.reconcile as rec

    dsn = _dsn(config, "reconcile")
    if dsn is None:
        return 2
    if args.sample is not None and args.sample <= 0:
        print("reconcile: --sample takes a positive number of users", file=sys.stderr)
        return 2
    return rec.run_command(config, dsn, sample=args.sample, repair=args.repair, fmt=args.format,
                           read=args.read, export_timeout=args.export_timeout)
