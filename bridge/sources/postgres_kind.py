"""The `postgres` source kind (logical replication): `setup`, `teardown`, `check`, `backfill`.

`setup` creates the publication of the mapped tables (plus the backfill request table, which the
streaming bridge reads back through its own stream), sets REPLICA IDENTITY FULL where deletes or
address changes need the old row, and, with `snapshot: never`, the slot (otherwise the first
`run` creates it and exports its snapshot for the initial read).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bridge.config import Config, PostgresSourceConfig
from bridge.ports import BackfillRequest, Finding, Source, Statement
from bridge.schema import ident, literal, qualified
from bridge.sources.database import DatabaseKind, connect_for_check

BACKFILL_REQUESTS = "onesignal_bridge.backfill_requests"


def needs_full_identity(config: Config, primary_key: Callable[[str], list[str] | None] | None = None) -> list[str]:
    """Tables whose deletes, address changes or identity changes need the whole old row (REPLICA
    IDENTITY FULL). A unique identity column that is not the primary key changes without Postgres
    sending the old value otherwise (a rename needs it); `primary_key(table)` names the table's
    key columns when its identity column is unique on its own, else None. Without it, only the
    tables that need it whatever their key."""
    out = []
    for m in config.mappings:
        if m.on_delete != "ignore" or m.subscriptions:
            out.append(m.table)
        elif primary_key is not None and (key := primary_key(m.table)) is not None and key != [m.identity_column]:
            out.append(m.table)
    # Triggers with `changed:`, `old:` or on deletes read the old row (bridge/triggers).
    out += sorted({t.table for t in config.triggers if t.needs_old_row or "delete" in t.on} - set(out))
    return out


def _identity_not_key(table: str, column: str) -> str:
    """REPLICA IDENTITY FULL when `column` is unique on its own (one row, one user) but not the
    primary key: an update of it is a rename, and Postgres sends its old value only with FULL.
    Decided in the database: a column that is not unique (orders.user_id) is left alone."""
    return (
        "DO $$ BEGIN\n"
        "  IF EXISTS (SELECT 1 FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid\n"
        f"      AND a.attnum = i.indkey[0] WHERE i.indrelid = {literal(qualified(table))}::regclass\n"
        "      AND i.indisunique AND NOT i.indisprimary AND i.indnatts = 1 AND i.indpred IS NULL\n"
        f"      AND a.attname = {literal(column)}) THEN\n"
        f"    ALTER TABLE {qualified(table)} REPLICA IDENTITY FULL;\n"
        "  END IF;\nEND $$;"
    )


class PostgresKind(DatabaseKind):
    name = "postgres"
    config_model = PostgresSourceConfig

    def create(self, config: Config) -> Source:
        from bridge.sources.postgres import PostgresSource

        return PostgresSource.from_config(config)

    def setup(self, config: Config) -> list[Statement]:
        src = config.source
        assert isinstance(src, PostgresSourceConfig)
        published = dict.fromkeys([m.table for m in config.mappings] + [t.table for t in config.triggers])
        tables = ", ".join([qualified(t) for t in published] + [BACKFILL_REQUESTS])
        pub = ident(src.publication)
        out = [Statement(
            f"publication {src.publication} for the mapped tables",
            "DO $$ BEGIN\n"
            f"  IF EXISTS (SELECT 1 FROM pg_publication WHERE pubname = {literal(src.publication)}) THEN\n"
            f"    ALTER PUBLICATION {pub} SET TABLE {tables};\n"
            "  ELSE\n"
            f"    CREATE PUBLICATION {pub} FOR TABLE {tables};\n"
            "  END IF;\nEND $$;",
        )]
        for table in needs_full_identity(config):
            out.append(Statement(
                f"{table}: deletes and address changes need the old row",
                f"ALTER TABLE {qualified(table)} REPLICA IDENTITY FULL;",
            ))
        full = set(needs_full_identity(config))
        for mc in config.mappings:
            if mc.table not in full:
                out.append(Statement(
                    f"{mc.table}: a unique identity column other than the primary key needs the old row (renames)",
                    _identity_not_key(mc.table, mc.identity_column),
                ))
        if src.snapshot != "never":
            return out  # the first `run` creates the slot itself, exporting its snapshot for the initial read
        out.append(Statement(
            f"replication slot {src.slot} (pgoutput)",
            f"SELECT pg_create_logical_replication_slot({literal(src.slot)}, 'pgoutput')\n"
            f"WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = {literal(src.slot)});",
        ))
        return out

    def teardown(self, config: Config) -> list[Statement]:
        src = config.source
        assert isinstance(src, PostgresSourceConfig)
        return [
            Statement(f"replication slot {src.slot}",
                      "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                      f" WHERE slot_name = {literal(src.slot)};"),
            Statement(f"publication {src.publication}", f"DROP PUBLICATION IF EXISTS {ident(src.publication)};"),
        ]

    def checks(self, config: Config) -> list[Finding]:
        assert isinstance(config.source, PostgresSourceConfig)
        return postgres_checks(config, config.source)

    def backfill(self, config: Config, request: BackfillRequest) -> int:
        from bridge.sources import backfill

        return backfill.request(self.database_dsn(config) or "", request.table, request.where, request.resume,
                                request.chunk_size, request.wait, timeout=request.timeout)


KIND = PostgresKind()


def postgres_checks(config: Config, src: PostgresSourceConfig) -> list[Finding]:
    out: list[Finding] = []
    dsn = src.dsn.get_secret_value()
    conn, connected = connect_for_check(dsn)
    if conn is None:
        return [connected]
    with conn:
        def one(q: Any, *a: Any) -> Any:  # the first row, or None
            return conn.execute(q, a).fetchone()

        out.append(connected)
        (wal_level,) = one("SHOW wal_level")
        out.append(
            Finding(
                wal_level == "logical",
                f"wal_level is {wal_level}" + ("" if wal_level == "logical" else ", logical decoding needs logical"),
                ""
                if wal_level == "logical"
                else "set wal_level = logical in postgresql.conf (ALTER SYSTEM SET wal_level = logical) and "
                "restart Postgres; or use source.kind: outbox",
            )
        )
        role, superuser, replication = one(
            "SELECT current_user, rolsuper, rolreplication FROM pg_roles WHERE rolname = current_user"
        )
        out.append(
            Finding(
                bool(superuser or replication),
                f"role {role} " + ("may replicate" if superuser or replication else "lacks the REPLICATION attribute"),
                ""
                if superuser or replication
                else f"ALTER ROLE {role} WITH REPLICATION; (see sql/role-postgres-source.sql)",
            )
        )
        for m in config.mappings:
            schema, name = m.table.split(".", 1)
            exists = one("SELECT to_regclass(%s) IS NOT NULL", m.table)[0]
            if not exists:
                out.append(
                    Finding(False, f"table {m.table} does not exist", "fix `mappings[].table` or create the table")
                )
                continue
            cols = {
                r[0]
                for r in conn.execute(
                    "SELECT attname FROM pg_attribute"
                    " WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped",
                    (m.table,),
                )
            }
            wanted = {m.identity_column, *m.aliases.values()}
            for ref in list(m.tags.values()) + list(m.properties.values()):
                wanted.add(ref if isinstance(ref, str) else ref.column)
            for sub in m.subscriptions.values():
                wanted.add(sub if isinstance(sub, str) else sub.column)
                if not isinstance(sub, str) and sub.enabled:
                    wanted.add(sub.enabled)
            missing = sorted(wanted - cols)
            out.append(
                Finding(
                    not missing,
                    f"table {m.table}: "
                    + ("all mapped columns exist" if not missing else f"missing columns {', '.join(missing)}"),
                    "" if not missing else f"fix the mapping for {m.table} or add the columns",
                )
            )
            can_select = one("SELECT has_table_privilege(current_user, %s, 'SELECT')", m.table)[0]
            out.append(
                Finding(
                    bool(can_select),
                    f"role {role} " + ("can" if can_select else "cannot") + f" SELECT from {m.table}",
                    "" if can_select else f"GRANT SELECT ON {m.table} TO {role};",
                )
            )
        pub = one("SELECT 1 FROM pg_publication WHERE pubname = %s", src.publication)
        if pub is None:
            out.append(
                Finding(
                    False,
                    f"publication {src.publication} does not exist",
                    "run `onesignal-bridge setup --config FILE` (or `--print-sql` for a DBA)",
                )
            )
        else:
            covered = {
                f"{s}.{t}"
                for s, t in conn.execute(
                    "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s", (src.publication,)
                )
            }
            missing = sorted({m.table for m in config.mappings} - covered
                             | ({t.table for t in config.triggers} - covered))
            out.append(
                Finding(
                    not missing,
                    f"publication {src.publication} "
                    + ("covers every mapped table" if not missing else f"does not cover {', '.join(missing)}"),
                    ""
                    if not missing
                    else f"ALTER PUBLICATION {ident(src.publication)} ADD TABLE {', '.join(missing)}; (or run setup)",
                )
            )
        if config.triggers:  # trigger tables and their columns (bridge/triggers)
            from bridge.triggers.check import findings as trigger_findings

            out.extend(trigger_findings(conn, config))
        identity_of = {mc.table: mc.identity_column for mc in config.mappings}

        def primary_key(table: str) -> list[str] | None:  # None unless the identity column is unique
            unique = one("SELECT 1 FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid"
                         " AND a.attnum = i.indkey[0] WHERE i.indrelid = to_regclass(%s) AND i.indisunique"
                         " AND i.indnatts = 1 AND i.indpred IS NULL AND a.attname = %s", table, identity_of[table])
            if unique is None:
                return None
            rows = conn.execute(
                "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid"
                " AND a.attnum = ANY(i.indkey) WHERE i.indrelid = to_regclass(%s) AND i.indisprimary",
                (table,)).fetchall()
            return [r[0] for r in rows]

        for table in needs_full_identity(config, primary_key):
            r = one("SELECT relreplident FROM pg_class WHERE oid = to_regclass(%s)", table)
            if r is None:
                continue
            full = r[0] == "f"
            out.append(
                Finding(
                    full,
                    f"table {table} replica identity is "
                    + ("FULL" if full else "not FULL: deletes and address changes cannot name the user"),
                    "" if full else f"ALTER TABLE {table} REPLICA IDENTITY FULL; (or run setup)",
                )
            )
        slot = one("SELECT plugin, active FROM pg_replication_slots WHERE slot_name = %s", src.slot)
        if slot is None and src.snapshot != "never":
            out.append(
                Finding(
                    True,
                    f"replication slot {src.slot} does not exist yet: the first run creates it and "
                    f"takes the initial snapshot (source.snapshot: {src.snapshot})",
                    warning=True,
                )
            )
        elif slot is None:
            out.append(
                Finding(
                    False, f"replication slot {src.slot} does not exist", "run `onesignal-bridge setup --config FILE`"
                )
            )
        else:
            out.append(
                Finding(
                    slot[0] == "pgoutput",
                    f"replication slot {src.slot} uses {slot[0]}"
                    + ("" if slot[0] == "pgoutput" else " (expected pgoutput)"),
                    "" if slot[0] == "pgoutput" else f"SELECT pg_drop_replication_slot('{src.slot}'); then run setup",
                )
            )
    return out
