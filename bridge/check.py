"""`check`: verify configuration, database and OneSignal before running; a fix for each problem."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import psycopg

from bridge.config import Config, PostgresSourceConfig, redact_dsn
from bridge.onesignal import errors
from bridge.onesignal.client import OneSignalClient, build_http_client
from bridge.setup import needs_full_identity


@dataclass(frozen=True)
class Finding:
    ok: bool
    what: str
    fix: str = ""
    warning: bool = False

    def render(self) -> str:
        tag = "ok  " if self.ok else ("warn" if self.warning else "FAIL")
        return f"[{tag}] {self.what}" + (f"\n       fix: {self.fix}" if self.fix else "")


def _pg_checks(config: Config, src: PostgresSourceConfig) -> list[Finding]:
    out: list[Finding] = []
    dsn = src.dsn.get_secret_value()
    try:
        conn = psycopg.connect(dsn, autocommit=True, connect_timeout=5)
    except psycopg.Error as exc:
        detail = redact_dsn(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        return [Finding(False, f"cannot connect to Postgres at {redact_dsn(dsn)}: {detail}",
                        "check source.dsn (host, port, database, user, password) and that the server is up")]
    with conn:
        one = lambda q, *a: conn.execute(q, a).fetchone()  # noqa: E731
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
                               "" if not missing else f"ALTER PUBLICATION {src.publication} ADD TABLE {', '.join(missing)}; (or run setup)"))
        for table in needs_full_identity(config):
            r = one("SELECT relreplident FROM pg_class WHERE oid = to_regclass(%s)", table)
            if r is None:
                continue
            full = r[0] == "f"
            out.append(Finding(full, f"table {table} replica identity is " + ("FULL" if full else "not FULL: deletes and address changes cannot name the user"),
                               "" if full else f"ALTER TABLE {table} REPLICA IDENTITY FULL; (or run setup)"))
        slot = one("SELECT plugin, active FROM pg_replication_slots WHERE slot_name = %s", src.slot)
        if slot is None:
            out.append(Finding(False, f"replication slot {src.slot} does not exist", "run `onesignal-bridge setup --config FILE`"))
        else:
            out.append(Finding(slot[0] == "pgoutput", f"replication slot {src.slot} uses {slot[0]}" + ("" if slot[0] == "pgoutput" else " (expected pgoutput)"),
                               "" if slot[0] == "pgoutput" else f"SELECT pg_drop_replication_slot('{src.slot}'); then run setup"))
        dl = one("SELECT to_regclass('onesignal_bridge.dead_letters') IS NOT NULL")[0]
        out.append(Finding(bool(dl), "dead-letter table onesignal_bridge.dead_letters " + ("exists" if dl else "is missing"),
                           "" if dl else "run `onesignal-bridge setup --config FILE`"))
    if src.snapshot != "never":
        out.append(Finding(True, f"source.snapshot: {src.snapshot} is not active in this version: only changes made after the slot was created are streamed", warning=True))
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
    else:
        out.append(Finding(False, f"source.kind {src.kind} is not active in this version", "use source.kind: postgres"))
    out.append(asyncio.run(_onesignal_check(config)))
    return out
