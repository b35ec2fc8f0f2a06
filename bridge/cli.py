"""Command line: `onesignal-bridge run|check|setup|simulator|demo|dlq` (also `python -m bridge`)."""

from __future__ import annotations

import argparse
import asyncio
import sys
import traceback
from typing import Any

from bridge import __version__
from bridge.config import Config, load_config
from bridge.errors import describe_failure, one_line
from bridge.observability.logging import (
    force_level,
    redact,
    redact_dsn_secrets,
    redact_environment,
    scrub,
    setup_logging,
)

# librdkafka keys whose values are secrets (the Helm chart's values schema refuses the same).
SECRET_CONSUMER_KEY_PARTS = ("password", "passphrase", "secret", "key", "jaas", "oauthbearer.config", ".pem")

_loaded: Config | None = None  # the configuration of this invocation, for error messages


def _load(path: str) -> Config:
    """Load the configuration and register every secret in it before anything can print one."""
    global _loaded
    config = load_config(path)
    redact(config.onesignal.api_key.get_secret_value())
    for k, v in (getattr(config.source, "consumer", None) or {}).items():
        if isinstance(v, str) and any(w in k for w in SECRET_CONSUMER_KEY_PARTS):
            redact(v)  # sasl.password, ssl.key.password, sasl.oauthbearer.config ... never printed
    dsn = getattr(config.source, "dsn", None)
    if dsn is not None:
        redact_dsn_secrets(dsn.get_secret_value())  # also malformed ones libpq refuses to parse
    _loaded = config
    return config


def cmd_run(args: argparse.Namespace) -> int:
    setup_logging(args.log_level or "info", args.log_format)
    config = _load(args.config)
    _preflight(config)
    from bridge.runner import run_bridge
    from bridge.taglimit import warn_tag_limit

    warn_tag_limit(config)  # onesignal.max_tags_per_user: a mapping that can exceed it

    return asyncio.run(run_bridge(config))


def cmd_check(args: argparse.Namespace) -> int:
    setup_logging("warning", "text")
    config = _load(args.config)
    from bridge.check import run_checks

    findings = run_checks(config, live_probe=args.live_probe)
    for f in findings:
        print(scrub(f.render()))
    failed = [f for f in findings if not f.ok]
    print(scrub(f"\n{len(findings) - len(failed)} ok, {len(failed)} failed"))
    return 1 if failed else 0


def cmd_setup(args: argparse.Namespace) -> int:
    setup_logging("warning", "text")
    config = _load(args.config)
    from bridge import setup
    from bridge.sources import registry

    kind = registry.for_config(config)
    dsn = kind.database_dsn(config)
    if dsn is None:
        print(f"setup: source.kind {kind.name} has nothing to create in a database", file=sys.stderr)
        return 0
    if args.print_sql:
        print(setup.render(setup.statements(config)), end="")
        return 0
    for line in setup.apply(config, dsn):
        print(f"[ok  ] {line}")
    return 0


def cmd_teardown(args: argparse.Namespace) -> int:
    setup_logging("warning", "text")
    config = _load(args.config)
    from bridge import setup
    from bridge.sources import registry

    kind = registry.for_config(config)
    stmts = setup.teardown(config)
    if args.print_sql:
        print(setup.render(stmts), end="")
        return 0
    dsn = kind.database_dsn(config)
    if dsn is None or not stmts:
        print(f"teardown: source.kind {kind.name} has nothing to remove from a database", file=sys.stderr)
        return 0
    for line in setup.apply_teardown(config, dsn):
        print(f"[ok  ] removed {line}")
    return 0


def cmd_simulator(args: argparse.Namespace) -> int:
    from bridge.devtools import simulator

    return simulator.run(args)  # every flag of bridge/devtools/simflags.py passes through


def cmd_demo(args: argparse.Namespace) -> int:
    setup_logging("warning", "text")
    from bridge.devtools.demo import run_demo

    return run_demo(args.dir, keep=args.keep)


def cmd_backfill(args: argparse.Namespace) -> int:
    setup_logging("warning", "text")
    config = _load(args.config)
    from bridge.ports import BackfillRequest
    from bridge.sources import backfill, registry

    table = args.table if "." in args.table else f"public.{args.table}"
    if config.mapping_for(table) is None:
        print(f"backfill: table {table} is not mapped in {args.config}", file=sys.stderr)
        return 2
    kind = registry.for_config(config)
    try:
        backfill.check_where(args.where)  # before connecting; Postgres checks it again before it is used
        return kind.backfill(config, BackfillRequest(table, args.where, args.resume, args.chunk_size,
                                                     not args.no_wait, args.timeout))
    except backfill.BackfillError as exc:  # a bad --where (WhereError) or table: one line, nothing recorded
        print(f"backfill: {exc}", file=sys.stderr)
        return 2


def cmd_dlq(args: argparse.Namespace) -> int:
    setup_logging("warning", "text")
    config = _load(args.config)
    from bridge import dlqcli

    return dlqcli.run(config, args)


def cmd_plan(args: argparse.Namespace) -> int:
    setup_logging("warning", "text")
    from bridge.onboarding import commands

    return commands.plan(_load(args.config), args)


def cmd_export_csv(args: argparse.Namespace) -> int:
    setup_logging("warning", "text")
    from bridge.onboarding import commands

    return commands.export_csv(_load(args.config), args)


def cmd_reconcile(args: argparse.Namespace) -> int:
    setup_logging("warning", "text")
    from bridge.onboarding import commands

    config = _load(args.config)
    if config.onesignal.api == "legacy":  # issue 19: reconcile reads User Model users
        from bridge.errors import ConfigError

        raise ConfigError(f"{args.config}: onesignal.api: reconcile compares User Model users (View user, or the "
                          "CSV export) and is not available for legacy player-model apps yet")
    return commands.reconcile(config, args)


LOG_LEVELS = ["debug", "info", "warning", "error"]
LOG_LEVEL_HELP = "debug also prints the traceback of a failure (secrets scrubbed)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="onesignal-bridge", description="Keep OneSignal users in step with a database.")
    p.add_argument("--version", action="version", version=f"onesignal-bridge {__version__}")
    p.add_argument("--log-level", choices=LOG_LEVELS, default=None, help=LOG_LEVEL_HELP)
    # Each command also takes --log-level after its name (default: run info, the others warning).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", choices=LOG_LEVELS, default=argparse.SUPPRESS, help=LOG_LEVEL_HELP)
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", parents=[common], help="stream changes into OneSignal until SIGTERM/SIGINT")
    r.add_argument("--config", required=True, metavar="FILE")
    r.add_argument("--log-format", choices=["text", "json"], default="text")
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("check", parents=[common],
                       help="verify configuration, database and OneSignal; print a fix for each problem")
    c.add_argument("--config", required=True, metavar="FILE")
    c.add_argument("--live-probe", action="store_true",
                   help="also create and delete one throwaway OneSignal user to verify the key, the app id "
                        "and how Create user and replication lag behave in this app")
    c.set_defaults(func=cmd_check)

    s = sub.add_parser("setup", parents=[common],
                       help="create the publication, slot and dead-letter table (idempotent)")
    s.add_argument("--config", required=True, metavar="FILE")
    s.add_argument("--print-sql", action="store_true", help="print the SQL instead of running it")
    s.set_defaults(func=cmd_setup)

    t = sub.add_parser("teardown", parents=[common],
                       help="remove what setup created for the source (triggers, outbox, slot, publication)")
    t.add_argument("--config", required=True, metavar="FILE")
    t.add_argument("--print-sql", action="store_true", help="print the SQL instead of running it")
    t.set_defaults(func=cmd_teardown)

    sim = sub.add_parser("simulator", help="serve a local OneSignal API (in-memory) for development and tests")
    from bridge.devtools.simflags import add_arguments as add_simulator_arguments

    add_simulator_arguments(sim)  # --host --port --api-key --app-id, --strict/--lenient and each point
    sim.set_defaults(func=cmd_simulator)

    d = sub.add_parser("demo", parents=[common],
                       help="start Postgres, the simulator and the bridge; make changes; show the users")
    d.add_argument("--dir", default=".demo", help="where the demo keeps its Postgres cluster")
    d.add_argument("--keep", action="store_true", help="leave Postgres running afterwards")
    d.set_defaults(func=cmd_demo)

    bf = sub.add_parser("backfill", parents=[common],
                        help="re-send a table (or a slice) while streaming continues")
    bf.add_argument("--config", required=True, metavar="FILE")
    bf.add_argument("--table", required=True)
    bf.add_argument("--where", help="SQL condition selecting the rows, e.g. \"plan = 'pro'\"")
    bf.add_argument("--resume", action="store_true", help="continue the last interrupted backfill of the table")
    bf.add_argument("--chunk-size", type=int, default=1000)
    bf.add_argument("--no-wait", action="store_true", help="record the request and return")
    bf.add_argument("--timeout", type=float, default=3600.0)
    bf.set_defaults(func=cmd_backfill)

    q = sub.add_parser("dlq", parents=[common], help="inspect and replay dead letters")
    q.add_argument("action", choices=["list", "show", "replay", "purge"])
    q.add_argument("id", nargs="?", type=int, help="a dead letter's id (show, replay, purge)")
    q.add_argument("--config", required=True, metavar="FILE")
    q.add_argument("--table")
    q.add_argument("--reason")
    q.add_argument("--older-than", metavar="AGE", help="e.g. 30m, 2h, 7d")
    q.add_argument("--newer-than", metavar="AGE")
    q.add_argument("--limit", type=int, default=100)
    q.set_defaults(func=cmd_dlq)

    from bridge.onboarding.commands import add_arguments as add_onboarding_arguments

    pl = sub.add_parser("plan", parents=[common],
                        help="before the first run: users, requests, duration, tags and rejected rows (read-only)")
    ex = sub.add_parser("export-csv", parents=[common],
                        help="write OneSignal CSV import files from a consistent snapshot; run streams what follows")
    rc = sub.add_parser("reconcile", parents=[common],
                        help="compare OneSignal with what the database implies; --repair sends the difference")
    add_onboarding_arguments(pl, ex, rc)  # bridge/onboarding/commands.py
    pl.set_defaults(func=cmd_plan)
    ex.set_defaults(func=cmd_export_csv)
    rc.set_defaults(func=cmd_reconcile)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command. Whatever fails ends in one scrubbed line on stderr naming the command, what
    failed and what to do, and a non-zero exit (2: the configuration, 1: anything else); with
    `--log-level debug` the scrubbed traceback comes first."""
    global _loaded
    _loaded = None
    redact_environment()  # PGPASSWORD: libpq reads it, nothing may print it
    _install_scrubbing_hooks()
    args = build_parser().parse_args(argv)
    level = getattr(args, "log_level", None)
    force_level(level)
    command = args.command + (f" {args.action}" if getattr(args, "action", None) else "")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # the one place where every failure becomes one line
        if level == "debug":
            print(scrub("".join(traceback.format_exception(exc))), file=sys.stderr, end="", flush=True)
        dsn = getattr(_loaded.source, "dsn", None) if _loaded is not None else None
        line, code = describe_failure(exc, dsn=dsn.get_secret_value() if dsn is not None else None,
                                      base_url=_loaded.onesignal.base_url if _loaded is not None else None,
                                      config_path=getattr(args, "config", None))
        print(scrub(f"{command}: {line}"), file=sys.stderr, flush=True)
        return code


def _install_scrubbing_hooks() -> None:
    """Tracebacks that escape `main` (threads, interpreter shutdown) are scrubbed too."""
    import threading

    def show(exc_type: Any, exc: Any, tb: Any, prefix: str = "") -> None:
        sys.stderr.write(scrub(prefix + "".join(traceback.format_exception(exc_type, exc, tb))))

    sys.excepthook = show
    threading.excepthook = lambda a: show(a.exc_type, a.exc_value, a.exc_traceback,
                                          f"Exception in thread {getattr(a.thread, 'name', '?')}:\n")
    sys.unraisablehook = lambda u: show(u.exc_type, u.exc_value, u.exc_traceback,
                                        f"{u.err_msg or 'Exception ignored in'}: {u.object!r}\n")


_PERMANENT = ("password authentication failed", "no password supplied", "pg_hba.conf", "does not exist")


def _preflight(config: Config) -> None:
    """Before streaming, fail fast on a database connection that can never work (a DSN libpq cannot
    parse, a rejected password, a missing database or role): the sources retry every connection
    error forever. A server that is down or unreachable is not such a case: `run` waits for it."""
    dsn = getattr(config.source, "dsn", None)
    if dsn is None:
        return
    import logging

    import psycopg

    try:
        psycopg.connect(dsn.get_secret_value(), autocommit=True, connect_timeout=5).close()
    except psycopg.OperationalError as exc:
        if any(p in str(exc) for p in _PERMANENT):
            raise
        logging.getLogger("bridge.run").warning("Postgres is not reachable yet (%s); the source retries",
                                                one_line(str(exc)))
