"""Command line: `onesignal-bridge run|check|setup|simulator|demo|dlq` (also `python -m bridge`)."""

from __future__ import annotations

import argparse
import asyncio
import sys

from bridge import __version__
from bridge.config import Config, load_config
from bridge.errors import BridgeError, ConfigError
from bridge.observability.logging import redact, scrub, setup_logging


def _load(path: str) -> Config:
    config = load_config(path)
    redact(config.onesignal.api_key.get_secret_value())
    for k, v in (getattr(config.source, "consumer", None) or {}).items():
        if any(w in k for w in ("password", "secret", "key")) and isinstance(v, str):
            redact(v)  # sasl.password, ssl.key.password ... never printed
    dsn = getattr(config.source, "dsn", None)
    if dsn is not None:
        from urllib.parse import urlsplit

        try:
            redact(urlsplit(dsn.get_secret_value()).password)
        except ValueError:
            pass
    return config


def cmd_run(args: argparse.Namespace) -> int:
    setup_logging(args.log_level, args.log_format)
    config = _load(args.config)
    from bridge.runner import run_bridge

    return asyncio.run(run_bridge(config))


def cmd_check(args: argparse.Namespace) -> int:
    setup_logging("warning", "text")
    config = _load(args.config)
    from bridge.check import run_checks

    findings = run_checks(config)
    for f in findings:
        print(scrub(f.render()))
    failed = [f for f in findings if not f.ok]
    print(scrub(f"\n{len(findings) - len(failed)} ok, {len(failed)} failed"))
    return 1 if failed else 0


def cmd_setup(args: argparse.Namespace) -> int:
    setup_logging("warning", "text")
    config = _load(args.config)
    from bridge import setup

    if args.print_sql:
        print(setup.render(config), end="")
        return 0
    for k, v in (getattr(config.source, "consumer", None) or {}).items():
        if any(w in k for w in ("password", "secret", "key")) and isinstance(v, str):
            redact(v)  # sasl.password, ssl.key.password ... never printed
    dsn = getattr(config.source, "dsn", None)
    if dsn is None:
        print("setup: source.kind kafka has nothing to create in a database", file=sys.stderr)
        return 0
    for line in setup.apply(config, dsn.get_secret_value()):
        print(f"[ok  ] {line}")
    return 0


def cmd_teardown(args: argparse.Namespace) -> int:
    setup_logging("warning", "text")
    config = _load(args.config)
    from bridge import setup

    stmts = setup.teardown(config)
    if args.print_sql:
        print(setup.render(config, stmts), end="")
        return 0
    dsn = getattr(config.source, "dsn", None)
    if dsn is None or not stmts:
        print(f"teardown: source.kind {config.source.kind} has nothing to remove from a database", file=sys.stderr)
        return 0
    for line in setup.apply(config, dsn.get_secret_value(), stmts):
        print(f"[ok  ] removed {line}")
    return 0


def cmd_simulator(args: argparse.Namespace) -> int:
    from bridge.onesignal import simulator

    argv = ["--host", args.host, "--port", str(args.port)]
    if args.api_key:
        argv += ["--api-key", args.api_key]
    return simulator.main(argv)


def cmd_demo(args: argparse.Namespace) -> int:
    setup_logging("warning", "text")
    from bridge.demo import run_demo

    return run_demo(args.dir, keep=args.keep)


def cmd_backfill(args: argparse.Namespace) -> int:
    setup_logging("warning", "text")
    config = _load(args.config)
    from bridge.config import PostgresSourceConfig
    from bridge.sources import backfill

    from bridge.config import OutboxSourceConfig

    table = args.table if "." in args.table else f"public.{args.table}"
    if config.mapping_for(table) is None:
        print(f"backfill: table {table} is not mapped in {args.config}", file=sys.stderr)
        return 2
    if not isinstance(config.source, (OutboxSourceConfig, PostgresSourceConfig)):
        print("backfill: with source.kind kafka, re-snapshot through Debezium (an incremental snapshot signal)",
              file=sys.stderr)
        return 2
    try:
        backfill.check_where(args.where)  # before connecting; Postgres checks it again before it is used
        if isinstance(config.source, OutboxSourceConfig):
            return backfill.outbox_backfill(config.source.dsn.get_secret_value(), table, args.where,
                                            args.chunk_size)
        return backfill.request(config.source.dsn.get_secret_value(), table, args.where, args.resume,
                                args.chunk_size, not args.no_wait, timeout=args.timeout)
    except backfill.BackfillError as exc:  # a bad --where (WhereError) or table: one line, nothing recorded
        print(f"backfill: {exc}", file=sys.stderr)
        return 2


def cmd_dlq(args: argparse.Namespace) -> int:
    setup_logging("warning", "text")
    config = _load(args.config)
    from bridge import dlqcli

    return dlqcli.run(config, args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="onesignal-bridge", description="Keep OneSignal users in step with a database.")
    p.add_argument("--version", action="version", version=f"onesignal-bridge {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="stream changes into OneSignal until SIGTERM/SIGINT")
    r.add_argument("--config", required=True, metavar="FILE")
    r.add_argument("--log-format", choices=["text", "json"], default="text")
    r.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("check", help="verify configuration, database and OneSignal; print a fix for each problem")
    c.add_argument("--config", required=True, metavar="FILE")
    c.set_defaults(func=cmd_check)

    s = sub.add_parser("setup", help="create the publication, slot and dead-letter table (idempotent)")
    s.add_argument("--config", required=True, metavar="FILE")
    s.add_argument("--print-sql", action="store_true", help="print the SQL instead of running it")
    s.set_defaults(func=cmd_setup)

    t = sub.add_parser("teardown", help="remove what setup created for the source (triggers, outbox, slot, publication)")
    t.add_argument("--config", required=True, metavar="FILE")
    t.add_argument("--print-sql", action="store_true", help="print the SQL instead of running it")
    t.set_defaults(func=cmd_teardown)

    sim = sub.add_parser("simulator", help="serve a local OneSignal API (in-memory) for development and tests")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=8089)
    sim.add_argument("--api-key", default=None)
    sim.set_defaults(func=cmd_simulator)

    d = sub.add_parser("demo", help="start Postgres, the simulator and the bridge; make changes; show the users")
    d.add_argument("--dir", default=".demo", help="where the demo keeps its Postgres cluster")
    d.add_argument("--keep", action="store_true", help="leave Postgres running afterwards")
    d.set_defaults(func=cmd_demo)

    bf = sub.add_parser("backfill", help="re-send a table (or a slice) while streaming continues")
    bf.add_argument("--config", required=True, metavar="FILE")
    bf.add_argument("--table", required=True)
    bf.add_argument("--where", help="SQL condition selecting the rows, e.g. \"plan = 'pro'\"")
    bf.add_argument("--resume", action="store_true", help="continue the last interrupted backfill of the table")
    bf.add_argument("--chunk-size", type=int, default=1000)
    bf.add_argument("--no-wait", action="store_true", help="record the request and return")
    bf.add_argument("--timeout", type=float, default=3600.0)
    bf.set_defaults(func=cmd_backfill)

    q = sub.add_parser("dlq", help="inspect and replay dead letters")
    q.add_argument("action", choices=["list", "show", "replay", "purge"])
    q.add_argument("id", nargs="?", type=int, help="a dead letter's id (show, replay, purge)")
    q.add_argument("--config", required=True, metavar="FILE")
    q.add_argument("--table")
    q.add_argument("--reason")
    q.add_argument("--older-than", metavar="AGE", help="e.g. 30m, 2h, 7d")
    q.add_argument("--newer-than", metavar="AGE")
    q.add_argument("--limit", type=int, default=100)
    q.set_defaults(func=cmd_dlq)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"onesignal-bridge: {scrub(str(exc))}", file=sys.stderr)
        return 2
    except BridgeError as exc:
        print(f"onesignal-bridge: {scrub(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
