"""The `outbox` source kind: what `setup`, `teardown`, `check` and `backfill` do for it.

The database side is `bridge/sql/outbox.sql` (the outbox table, the wake-up flag, the capture
trigger function and the functions that install and remove the per-table triggers), then one
trigger pair per mapped table, then the privileges of the bridge's role. `sql/outbox.sql` at the
top of the repository is the same file, for DBAs (`scripts/regen-sql.py` writes it).
"""

from __future__ import annotations

from typing import Any

import psycopg

from bridge.config import Config, OutboxSourceConfig
from bridge.ports import BackfillRequest, Finding, Source, Statement
from bridge.schema import ident, literal, qualified, sql_file
from bridge.sources.database import DatabaseKind, connect_for_check
from bridge.sources.outbox import CAPTURE_FUNCTION, REL_OID, TRIGGER, TRUNCATE_TRIGGER, OutboxSource

OUTBOX_SQL = sql_file("outbox.sql")

BRIDGE_GRANTS = (
    "GRANT USAGE ON SCHEMA onesignal_bridge TO {role};\n"
    "GRANT SELECT ON onesignal_bridge.schema_version TO {role};\n"
    "GRANT SELECT, DELETE ON onesignal_bridge.outbox TO {role};\n"
    "GRANT SELECT, UPDATE ON onesignal_bridge.wakeup TO {role};\n"
    "GRANT SELECT, INSERT, UPDATE, DELETE ON onesignal_bridge.dead_letters TO {role};\n"
    "GRANT USAGE ON SEQUENCE onesignal_bridge.dead_letters_id_seq TO {role};\n"
    "GRANT SELECT, INSERT, UPDATE, DELETE ON onesignal_bridge.subscriptions TO {role};\n"
    "GRANT SELECT, INSERT, UPDATE ON onesignal_bridge.leaders TO {role};"
)


class OutboxKind(DatabaseKind):
    name = "outbox"
    config_model = OutboxSourceConfig

    def create(self, config: Config) -> Source:
        assert isinstance(config.source, OutboxSourceConfig)
        return OutboxSource(config.source, config)

    def setup(self, config: Config) -> list[Statement]:
        return setup_statements(config)

    def teardown(self, config: Config) -> list[Statement]:
        return teardown_statements(config)

    def checks(self, config: Config) -> list[Finding]:
        assert isinstance(config.source, OutboxSourceConfig)
        return outbox_checks(config, config.source)

    def backfill(self, config: Config, request: BackfillRequest) -> int:
        from bridge.sources import backfill

        return backfill.outbox_backfill(self.database_dsn(config) or "", request.table, request.where,
                                        request.chunk_size)


KIND = OutboxKind()


def captured_columns(mp: Any) -> list[str]:
    """The columns a mapping reads: what the trigger captures (plus the primary key)."""
    from bridge.mapping import TableMapping

    return sorted(TableMapping.compile(mp).columns)


def dsn_user(dsn: str) -> str | None:
    try:
        return psycopg.conninfo.conninfo_to_dict(dsn).get("user") or None  # type: ignore[return-value]
    except psycopg.ProgrammingError:
        return None


def setup_statements(config: Config) -> list[Statement]:
    """(why, SQL) to prepare a database for the outbox source: sql/outbox.sql, one trigger pair per
    mapped table, no triggers left on tables no longer mapped, privileges of the bridge's role."""
    out = [Statement("outbox table and capture trigger function (sql/outbox.sql)", OUTBOX_SQL.strip())]
    captured: dict[str, set[str]] = {mp.table: set(captured_columns(mp)) for mp in config.mappings}
    for t in config.triggers:  # trigger tables (bridge/triggers): the columns they read too
        captured.setdefault(t.table, set()).update(t.columns() | t.old_columns())
    for table, columns in captured.items():
        cols = ", ".join(literal(c) for c in sorted(columns))
        out.append(Statement(
            f"{table}: capture triggers (INSERT, UPDATE, DELETE, TRUNCATE)",
            f"SELECT onesignal_bridge.install_trigger({literal(qualified(table))}, ARRAY[{cols}]::text[]);",
        ))
    mapped = ", ".join(literal(qualified(table)) for table in captured)
    out.append(Statement(
        "no capture triggers on tables that are no longer mapped",
        "DO $$\nDECLARE r record;\nBEGIN\n"
        f"  FOR r IN SELECT tgrelid::regclass AS tbl FROM pg_trigger WHERE tgname = '{TRIGGER}'\n"
        f"      AND tgrelid NOT IN (SELECT to_regclass(t) FROM unnest(ARRAY[{mapped}]::text[]) AS t\n"
        "                          WHERE to_regclass(t) IS NOT NULL) LOOP\n"
        "    PERFORM onesignal_bridge.remove_trigger(r.tbl);\n"
        "  END LOOP;\nEND $$;",
    ))
    role = dsn_user(config.source.dsn.get_secret_value()) if isinstance(config.source, OutboxSourceConfig) else None
    if role:
        grants = BRIDGE_GRANTS.format(role=ident(role)).replace("\n", "\n    ")
        out.append(Statement(
            f"privileges of the bridge's role {role} (the user in source.dsn); see sql/role-outbox.sql",
            "DO $$ BEGIN\n"
            f"  IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = {literal(role)}) THEN\n"
            f"    {grants}\n"
            "  END IF;\nEND $$;",
        ))
    return out


def teardown_statements(config: Config) -> list[Statement]:
    """(why, SQL) that undo `setup_statements`: every capture trigger, the functions, the outbox.
    The dead-letter and subscription tables stay (they hold history `dlq` can still read)."""
    return [Statement(*s) for s in [
        ("capture triggers on every table",
         "DO $$\nDECLARE r record;\nBEGIN\n"
         "  IF to_regprocedure('onesignal_bridge.capture()') IS NULL THEN RETURN; END IF;\n"
         "  FOR r IN SELECT tgrelid::regclass AS tbl, tgname FROM pg_trigger\n"
         "      WHERE tgfoid = 'onesignal_bridge.capture()'::regprocedure LOOP\n"
         "    EXECUTE format('DROP TRIGGER %I ON %s', r.tgname, r.tbl);\n"
         "  END LOOP;\nEND $$;"),
        ("capture and trigger-management functions",
         "DROP FUNCTION IF EXISTS onesignal_bridge.capture();\n"
         "DROP FUNCTION IF EXISTS onesignal_bridge.install_trigger(regclass, text[]);\n"
         "DROP FUNCTION IF EXISTS onesignal_bridge.remove_trigger(regclass);"),
        ("the outbox table (rows not yet applied are dropped with it) and the wake-up flag",
         "DROP TABLE IF EXISTS onesignal_bridge.outbox;\nDROP TABLE IF EXISTS onesignal_bridge.wakeup;"),
    ]]


def outbox_checks(config: Config, src: OutboxSourceConfig) -> list[Finding]:
    """Outbox mode: table, function and triggers present, the role's privileges, no REPLICATION
    or superuser needed. Each missing privilege is named with the GRANT that fixes it. Objects are
    looked up in the catalogs (by name, not with to_regclass), so that a missing USAGE on a schema
    is reported rather than raised."""
    out: list[Finding] = []
    dsn = src.dsn.get_secret_value()
    setup_fix = "run `onesignal-bridge setup --config FILE` as the tables' owner (or `--print-sql` for a DBA)"
    conn, connected = connect_for_check(dsn)
    if conn is None:
        return [connected]
    with conn:
        def one(q: Any, *a: Any) -> Any:  # the first row, or None
            return conn.execute(q, a).fetchone()


        def oid(name: str) -> int | None:
            found: int | None = one(f"SELECT {REL_OID}", *name.split(".", 1))[0]
            return found

        out.append(connected)
        (wal_level,) = one("SHOW wal_level")
        out.append(Finding(True, f"wal_level is {wal_level}: the outbox needs no logical decoding"))
        role, superuser, replication = one(
            "SELECT current_user, rolsuper, rolreplication FROM pg_roles WHERE rolname = current_user")
        if superuser or replication:
            out.append(
                Finding(
                    True,
                    f"role {role} has {'SUPERUSER' if superuser else 'REPLICATION'}: the outbox needs neither",
                    "run the bridge as a role like the one in sql/role-outbox.sql",
                    warning=True,
                )
            )
        else:
            out.append(Finding(True, f"role {role} has no SUPERUSER or REPLICATION (none needed)"))
        has_outbox = oid("onesignal_bridge.outbox") is not None
        out.append(
            Finding(
                has_outbox,
                "outbox table onesignal_bridge.outbox " + ("exists" if has_outbox else "is missing"),
                "" if has_outbox else setup_fix,
            )
        )
        has_flag = oid("onesignal_bridge.wakeup") is not None
        out.append(
            Finding(
                has_flag,
                "wake-up flag table onesignal_bridge.wakeup "
                + ("exists" if has_flag else "is missing: writes to the mapped tables fail"),
                "" if has_flag else setup_fix,
            )
        )
        fn = one(
            "SELECT p.oid FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
            " WHERE n.nspname = %s AND p.proname = %s AND p.pronargs = 0",
            *CAPTURE_FUNCTION.split("."),
        )
        fn_oid = fn[0] if fn else None
        out.append(
            Finding(
                fn_oid is not None,
                f"trigger function {CAPTURE_FUNCTION}() " + ("exists" if fn_oid is not None else "is missing"),
                "" if fn_oid is not None else setup_fix,
            )
        )
        for m in config.mappings:
            rel = qualified(m.table)
            table_oid = oid(m.table)
            if table_oid is None:
                out.append(
                    Finding(False, f"table {m.table} does not exist", "fix `mappings[].table` or create the table")
                )
                continue
            cols = {
                r[0]
                for r in conn.execute(
                    "SELECT attname FROM pg_attribute WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped",
                    (table_oid,),
                )
            }
            wanted = set(captured_columns(m))
            missing = sorted(wanted - cols)
            out.append(
                Finding(
                    not missing,
                    f"table {m.table}: "
                    + ("all mapped columns exist" if not missing else f"missing columns {', '.join(missing)}"),
                    "" if not missing else f"fix the mapping for {m.table} or add the columns",
                )
            )
            triggers = {
                name: (enabled, args)
                for name, enabled, args in conn.execute(
                    "SELECT tgname, tgenabled <> 'D', encode(tgargs, 'escape') FROM pg_trigger"
                    " WHERE tgrelid = %s AND tgname IN (%s, %s) AND tgfoid = %s",
                    (table_oid, TRIGGER, TRUNCATE_TRIGGER, fn_oid),
                )
            }
            for name, what in ((TRIGGER, "INSERT, UPDATE and DELETE"), (TRUNCATE_TRIGGER, "TRUNCATE")):
                if name not in triggers:
                    out.append(
                        Finding(
                            False,
                            f"table {m.table}: trigger {name} ({what}) is missing: its changes are not captured",
                            setup_fix,
                        )
                    )
                elif not triggers[name][0]:
                    out.append(
                        Finding(
                            False,
                            f"table {m.table}: trigger {name} is disabled: its changes are not captured",
                            f"ALTER TABLE {rel} ENABLE TRIGGER {name};",
                        )
                    )
            if TRIGGER in triggers and triggers[TRIGGER][0]:
                skipped = {a.replace("\\\\", "\\") for a in (triggers[TRIGGER][1] or "").split("\\000") if a}
                uncaptured = sorted(wanted & skipped)
                out.append(
                    Finding(
                        not uncaptured,
                        f"table {m.table}: "
                        + (
                            f"trigger {TRIGGER} captures every mapped column"
                            if not uncaptured
                            else f"trigger {TRIGGER} does not capture {', '.join(uncaptured)}"
                            " (the mapping changed since setup)"
                        ),
                        "" if not uncaptured else "run `onesignal-bridge setup --config FILE` again",
                    )
                )
        dl = oid("onesignal_bridge.dead_letters") is not None
        out.append(
            Finding(
                dl,
                "dead-letter table onesignal_bridge.dead_letters " + ("exists" if dl else "is missing"),
                "" if dl else setup_fix,
            )
        )
        # The privileges the bridge uses, object by object; the same GRANTs setup and sql/role-outbox.sql make.
        ns = one("SELECT oid FROM pg_namespace WHERE nspname = 'onesignal_bridge'")
        if ns is not None:
            ok = one("SELECT has_schema_privilege(%s::oid, 'USAGE')", ns[0])[0]
            out.append(
                Finding(
                    bool(ok),
                    f"role {role} " + ("may use" if ok else "lacks USAGE on") + " schema onesignal_bridge",
                    "" if ok else f"GRANT USAGE ON SCHEMA onesignal_bridge TO {role};",
                )
            )
        needs = [
            ("onesignal_bridge.outbox", "TABLE", ("SELECT", "DELETE"), "read and delete outbox rows", False),
            ("onesignal_bridge.wakeup", "TABLE", ("SELECT", "UPDATE"), "ask to be notified of new rows", False),
            ("onesignal_bridge.dead_letters", "TABLE", ("INSERT",), "store dead letters", False),
            ("onesignal_bridge.dead_letters_id_seq", "SEQUENCE", ("USAGE",), "number dead letters", False),
            (
                "onesignal_bridge.subscriptions",
                "TABLE",
                ("SELECT", "INSERT", "UPDATE", "DELETE"),
                "remember email/SMS subscription ids",
                False,
            ),
            ("onesignal_bridge.leaders", "TABLE", ("SELECT", "INSERT", "UPDATE"),
             "record its leadership (fencing a failover: docs/operations.md)", False),
            (
                "onesignal_bridge.dead_letters",
                "TABLE",
                ("SELECT", "UPDATE", "DELETE"),
                "run `dlq list|replay|purge` with this configuration",
                True,
            ),
        ]
        for obj, kind, privs, why, optional in needs:
            obj_oid = oid(obj)
            if obj_oid is None:
                continue
            fn_name = "has_sequence_privilege" if kind == "SEQUENCE" else "has_table_privilege"
            lacking = [p for p in privs if not one(f"SELECT {fn_name}(%s::oid, %s)", obj_oid, p)[0]]
            if lacking:
                out.append(
                    Finding(
                        optional,
                        f"role {role} lacks {', '.join(lacking)} on {obj}: it cannot {why}",
                        f"GRANT {', '.join(lacking)} ON {'SEQUENCE ' if kind == 'SEQUENCE' else ''}{obj} TO {role};",
                        warning=optional,
                    )
                )
            elif not optional:
                out.append(Finding(True, f"role {role} has {', '.join(privs)} on {obj}"))
    return out
