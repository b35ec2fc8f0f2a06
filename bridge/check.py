"""`check`: verify configuration, database and OneSignal before running; a fix for each problem."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import psycopg

from bridge.config import Config, OutboxSourceConfig, PostgresSourceConfig, redact_dsn
from bridge.errors import connection_hint, one_line
from bridge.observability.logging import dsn_secrets, mask_secrets
from bridge.onesignal import errors
from bridge.onesignal.client import OneSignalClient, build_http_client
from bridge.setup import _ident, needs_full_identity


@dataclass(frozen=True)
class Finding:
    ok: bool
    what: str
    fix: str = ""
    warning: bool = False

    def render(self) -> str:
        tag = "ok  " if self.ok else ("warn" if self.warning else "FAIL")
        return f"[{tag}] {self.what}" + (f"\n       fix: {self.fix}" if self.fix else "")


def _connect_failure(dsn: str, exc: Exception) -> Finding:
    """A failed connection, on one line, with the fix libpq's message points to. The DSN and the
    message are both scrubbed of every spelling of the password (libpq quotes a password it cannot
    decode; `password Secret` without `=` is still a password)."""
    text = str(exc).strip() or type(exc).__name__
    detail = one_line(text.removeprefix("connection failed: "))
    detail = redact_dsn(mask_secrets(detail, dsn_secrets(dsn)))
    return Finding(False, f"cannot connect to Postgres at {redact_dsn(dsn)}: {detail}",
                   connection_hint(text, dsn))


def _pg_checks(config: Config, src: PostgresSourceConfig) -> list[Finding]:
    out: list[Finding] = []
    dsn = src.dsn.get_secret_value()
    try:
        conn = psycopg.connect(dsn, autocommit=True, connect_timeout=5)
    except psycopg.Error as exc:
        return [_connect_failure(dsn, exc)]
    with conn:
        def one(q: Any, *a: Any) -> Any:  # the first row, or None
            return conn.execute(q, a).fetchone()

        out.append(Finding(True, f"connected to Postgres at {redact_dsn(dsn)}"))
        (wal_level,) = one("SHOW wal_level")
        out.append(Finding(wal_level == "logical", f"wal_level is {wal_level}" + ("" if wal_level == "logical" else ", logical decoding needs logical"),
                           "" if wal_level == "logical" else "set wal_level = logical in postgresql.conf (ALTER SYSTEM SET wal_level = logical) and restart Postgres; or use source.kind: outbox"))
        role, superuser, replication = one("SELECT current_user, rolsuper, rolreplication FROM pg_roles WHERE rolname = current_user")
        out.append(Finding(bool(superuser or replication), f"role {role} " + ("may replicate" if superuser or replication else "lacks the REPLICATION attribute"),
                           "" if superuser or replication else f"ALTER ROLE {role} WITH REPLICATION; (see sql/role-postgres-source.sql)"))
        for m in config.mappings:
            schema, name = m.table.split(".", 1)
            exists = one("SELECT to_regclass(%s) IS NOT NULL", m.table)[0]
            if not exists:
                out.append(Finding(False, f"table {m.table} does not exist", "fix `mappings[].table` or create the table"))
                continue
            cols = {r[0] for r in conn.execute("SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped", (m.table,))}
            wanted = {m.identity_column, *m.aliases.values()}
            for ref in list(m.tags.values()) + list(m.properties.values()):
                wanted.add(ref if isinstance(ref, str) else ref.column)
            for sub in m.subscriptions.values():
                wanted.add(sub if isinstance(sub, str) else sub.column)
                if not isinstance(sub, str) and sub.enabled:
                    wanted.add(sub.enabled)
            missing = sorted(wanted - cols)
            out.append(Finding(not missing, f"table {m.table}: " + ("all mapped columns exist" if not missing else f"missing columns {', '.join(missing)}"),
                               "" if not missing else f"fix the mapping for {m.table} or add the columns"))
            can_select = one("SELECT has_table_privilege(current_user, %s, 'SELECT')", m.table)[0]
            out.append(Finding(bool(can_select), f"role {role} " + ("can" if can_select else "cannot") + f" SELECT from {m.table}",
                               "" if can_select else f"GRANT SELECT ON {m.table} TO {role};"))
        pub = one("SELECT 1 FROM pg_publication WHERE pubname = %s", src.publication)
        if pub is None:
            out.append(Finding(False, f"publication {src.publication} does not exist",
                               "run `onesignal-bridge setup --config FILE` (or `--print-sql` for a DBA)"))
        else:
            covered = {f"{s}.{t}" for s, t in conn.execute("SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s", (src.publication,))}
            missing = sorted({m.table for m in config.mappings} - covered)
            out.append(Finding(not missing, f"publication {src.publication} " + ("covers every mapped table" if not missing else f"does not cover {', '.join(missing)}"),
                               "" if not missing else f"ALTER PUBLICATION {_ident(src.publication)} ADD TABLE "
                                                      f"{', '.join(missing)}; (or run setup)"))
        for table in needs_full_identity(config):
            r = one("SELECT relreplident FROM pg_class WHERE oid = to_regclass(%s)", table)
            if r is None:
                continue
            full = r[0] == "f"
            out.append(Finding(full, f"table {table} replica identity is " + ("FULL" if full else "not FULL: deletes and address changes cannot name the user"),
                               "" if full else f"ALTER TABLE {table} REPLICA IDENTITY FULL; (or run setup)"))
        slot = one("SELECT plugin, active FROM pg_replication_slots WHERE slot_name = %s", src.slot)
        if slot is None and src.snapshot != "never":
            out.append(Finding(True, f"replication slot {src.slot} does not exist yet: the first run creates it and "
                                     f"takes the initial snapshot (source.snapshot: {src.snapshot})", warning=True))
        elif slot is None:
            out.append(Finding(False, f"replication slot {src.slot} does not exist", "run `onesignal-bridge setup --config FILE`"))
        else:
            out.append(Finding(slot[0] == "pgoutput", f"replication slot {src.slot} uses {slot[0]}" + ("" if slot[0] == "pgoutput" else " (expected pgoutput)"),
                               "" if slot[0] == "pgoutput" else f"SELECT pg_drop_replication_slot('{src.slot}'); then run setup"))
        dl = one("SELECT to_regclass('onesignal_bridge.dead_letters') IS NOT NULL")[0]
        out.append(Finding(bool(dl), "dead-letter table onesignal_bridge.dead_letters " + ("exists" if dl else "is missing"),
                           "" if dl else "run `onesignal-bridge setup --config FILE`"))
    return out


def _outbox_checks(config: Config, src: OutboxSourceConfig) -> list[Finding]:
    """Outbox mode: table, function and triggers present, the role's privileges, no REPLICATION
    or superuser needed. Each missing privilege is named with the GRANT that fixes it. Objects are
    looked up in the catalogs (by name, not with to_regclass), so that a missing USAGE on a schema
    is reported rather than raised."""
    from bridge.sources.outbox import CAPTURE_FUNCTION, REL_OID, TRIGGER, TRUNCATE_TRIGGER, captured_columns, qualified

    out: list[Finding] = []
    dsn = src.dsn.get_secret_value()
    setup_fix = "run `onesignal-bridge setup --config FILE` as the tables' owner (or `--print-sql` for a DBA)"
    try:
        conn = psycopg.connect(dsn, autocommit=True, connect_timeout=5)
    except psycopg.Error as exc:
        return [_connect_failure(dsn, exc)]
    with conn:
        def one(q: Any, *a: Any) -> Any:  # the first row, or None
            return conn.execute(q, a).fetchone()


        def oid(name: str) -> int | None:
            found: int | None = one(f"SELECT {REL_OID}", *name.split(".", 1))[0]
            return found

        out.append(Finding(True, f"connected to Postgres at {redact_dsn(dsn)}"))
        (wal_level,) = one("SHOW wal_level")
        out.append(Finding(True, f"wal_level is {wal_level}: the outbox needs no logical decoding"))
        role, superuser, replication = one("SELECT current_user, rolsuper, rolreplication FROM pg_roles WHERE rolname = current_user")
        if superuser or replication:
            out.append(Finding(True, f"role {role} has {'SUPERUSER' if superuser else 'REPLICATION'}: the outbox needs neither",
                               "run the bridge as a role like the one in sql/role-outbox.sql", warning=True))
        else:
            out.append(Finding(True, f"role {role} has no SUPERUSER or REPLICATION (none needed)"))
        has_outbox = oid("onesignal_bridge.outbox") is not None
        out.append(Finding(has_outbox, "outbox table onesignal_bridge.outbox " + ("exists" if has_outbox else "is missing"),
                           "" if has_outbox else setup_fix))
        has_flag = oid("onesignal_bridge.wakeup") is not None
        out.append(Finding(has_flag, "wake-up flag table onesignal_bridge.wakeup " + ("exists" if has_flag else "is missing: writes to the mapped tables fail"),
                           "" if has_flag else setup_fix))
        fn = one("SELECT p.oid FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
                 " WHERE n.nspname = %s AND p.proname = %s AND p.pronargs = 0", *CAPTURE_FUNCTION.split("."))
        fn_oid = fn[0] if fn else None
        out.append(Finding(fn_oid is not None, f"trigger function {CAPTURE_FUNCTION}() " + ("exists" if fn_oid is not None else "is missing"),
                           "" if fn_oid is not None else setup_fix))
        for m in config.mappings:
            rel = qualified(m.table)
            table_oid = oid(m.table)
            if table_oid is None:
                out.append(Finding(False, f"table {m.table} does not exist", "fix `mappings[].table` or create the table"))
                continue
            cols = {r[0] for r in conn.execute("SELECT attname FROM pg_attribute WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped", (table_oid,))}
            wanted = set(captured_columns(m))
            missing = sorted(wanted - cols)
            out.append(Finding(not missing, f"table {m.table}: " + ("all mapped columns exist" if not missing else f"missing columns {', '.join(missing)}"),
                               "" if not missing else f"fix the mapping for {m.table} or add the columns"))
            triggers = {name: (enabled, args) for name, enabled, args in conn.execute(
                "SELECT tgname, tgenabled <> 'D', encode(tgargs, 'escape') FROM pg_trigger"
                " WHERE tgrelid = %s AND tgname IN (%s, %s) AND tgfoid = %s",
                (table_oid, TRIGGER, TRUNCATE_TRIGGER, fn_oid))}
            for name, what in ((TRIGGER, "INSERT, UPDATE and DELETE"), (TRUNCATE_TRIGGER, "TRUNCATE")):
                if name not in triggers:
                    out.append(Finding(False, f"table {m.table}: trigger {name} ({what}) is missing: its changes are not captured", setup_fix))
                elif not triggers[name][0]:
                    out.append(Finding(False, f"table {m.table}: trigger {name} is disabled: its changes are not captured",
                                       f"ALTER TABLE {rel} ENABLE TRIGGER {name};"))
            if TRIGGER in triggers and triggers[TRIGGER][0]:
                skipped = {a.replace("\\\\", "\\") for a in (triggers[TRIGGER][1] or "").split("\\000") if a}
                uncaptured = sorted(wanted & skipped)
                out.append(Finding(not uncaptured, f"table {m.table}: " + (f"trigger {TRIGGER} captures every mapped column" if not uncaptured
                                   else f"trigger {TRIGGER} does not capture {', '.join(uncaptured)} (the mapping changed since setup)"),
                                   "" if not uncaptured else "run `onesignal-bridge setup --config FILE` again"))
        dl = oid("onesignal_bridge.dead_letters") is not None
        out.append(Finding(dl, "dead-letter table onesignal_bridge.dead_letters " + ("exists" if dl else "is missing"),
                           "" if dl else setup_fix))
        # The privileges the bridge uses, object by object; the same GRANTs setup and sql/role-outbox.sql make.
        ns = one("SELECT oid FROM pg_namespace WHERE nspname = 'onesignal_bridge'")
        if ns is not None:
            ok = one("SELECT has_schema_privilege(%s::oid, 'USAGE')", ns[0])[0]
            out.append(Finding(bool(ok), f"role {role} " + ("may use" if ok else "lacks USAGE on") + " schema onesignal_bridge",
                               "" if ok else f"GRANT USAGE ON SCHEMA onesignal_bridge TO {role};"))
        needs = [
            ("onesignal_bridge.outbox", "TABLE", ("SELECT", "DELETE"), "read and delete outbox rows", False),
            ("onesignal_bridge.wakeup", "TABLE", ("SELECT", "UPDATE"), "ask to be notified of new rows", False),
            ("onesignal_bridge.dead_letters", "TABLE", ("INSERT",), "store dead letters", False),
            ("onesignal_bridge.dead_letters_id_seq", "SEQUENCE", ("USAGE",), "number dead letters", False),
            ("onesignal_bridge.subscriptions", "TABLE", ("SELECT", "INSERT", "UPDATE", "DELETE"), "remember email/SMS subscription ids", False),
            ("onesignal_bridge.dead_letters", "TABLE", ("SELECT", "UPDATE", "DELETE"), "run `dlq list|replay|purge` with this configuration", True),
        ]
        for obj, kind, privs, why, optional in needs:
            obj_oid = oid(obj)
            if obj_oid is None:
                continue
            fn_name = "has_sequence_privilege" if kind == "SEQUENCE" else "has_table_privilege"
            lacking = [p for p in privs if not one(f"SELECT {fn_name}(%s::oid, %s)", obj_oid, p)[0]]
            if lacking:
                out.append(Finding(optional, f"role {role} lacks {', '.join(lacking)} on {obj}: it cannot {why}",
                                   f"GRANT {', '.join(lacking)} ON {'SEQUENCE ' if kind == 'SEQUENCE' else ''}{obj} TO {role};",
                                   warning=optional))
            elif not optional:
                out.append(Finding(True, f"role {role} has {', '.join(privs)} on {obj}"))
    return out


async def _onesignal_check(config: Config) -> Finding:
    os_cfg = config.onesignal
    http = build_http_client(os_cfg.base_url, min(os_cfg.request_timeout_s, 10.0), 2)
    client = OneSignalClient(http, os_cfg.app_id, os_cfg.api_key.get_secret_value())
    try:
        await client.view_user("external_id", "onesignal-bridge-check")
        return Finding(True, f"OneSignal at {os_cfg.base_url} accepts the API key")
    except errors.NotFound:
        return Finding(True, f"OneSignal at {os_cfg.base_url} accepts the API key")
    except errors.AuthError as exc:
        return Finding(False, f"OneSignal rejects the API key for app {os_cfg.app_id} ({exc.status})",
                       "set onesignal.api_key to the app's REST API key (Settings > Keys & IDs) and onesignal.app_id to its app id")
    except errors.OneSignalError as exc:
        return Finding(False, f"OneSignal at {os_cfg.base_url} is not usable: {exc}", "check onesignal.base_url and the network path to it")
    finally:
        await http.aclose()


def run_checks(config: Config) -> list[Finding]:
    out: list[Finding] = [Finding(True, "configuration is valid")]
    src: Any = config.source
    if isinstance(src, PostgresSourceConfig):
        out += _pg_checks(config, src)
    elif isinstance(src, OutboxSourceConfig):
        out += _outbox_checks(config, src)
    else:
        out.append(Finding(False, f"source.kind {src.kind} is not active in this version", "use source.kind: postgres"))
    out.append(asyncio.run(_onesignal_check(config)))
    return out
