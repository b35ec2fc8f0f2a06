"""`setup`: the SQL that prepares a database for the bridge (publication, slot, replica identity,
dead-letter table), generated from the configuration and applied idempotently.

The same statements ship as files in `sql/` for DBAs who prefer to run them by hand.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg import sql

from bridge.config import Config, OutboxSourceConfig, PostgresSourceConfig
from bridge.deadletter import SCHEMA_SQL
from bridge.sources.backfill import SCHEMA_SQL as BACKFILL_SQL
from bridge.sources.snapshot import SCHEMA_SQL as SNAPSHOT_SQL
from bridge.subscriptions import SCHEMA_SQL as SUBSCRIPTIONS_SQL


@dataclass(frozen=True)
class Statement:
    why: str
    text: str


def _qualified(table: str) -> str:
    schema, name = table.split(".", 1)
    return f"{_ident(schema)}.{_ident(name)}"


# Postgres keywords that cannot stand unquoted as a name (pg_get_keywords() catcode R and T, 15).
_RESERVED = frozenset(
    "all analyse analyze and any array as asc asymmetric authorization binary both case cast check collate "
    "collation column concurrently constraint create cross current_catalog current_date current_role "
    "current_schema current_time current_timestamp current_user default deferrable desc distinct do else end "
    "except false fetch for foreign freeze from full grant group having ilike in initially inner intersect "
    "into is isnull join lateral leading left like limit localtime localtimestamp natural not notnull null "
    "offset on only or order outer overlaps placing primary references returning right select session_user "
    "similar some symmetric table tablesample then to trailing true union unique user using variadic verbose "
    "when where window with".split()
)


def _ident(name: str) -> str:
    """A name as SQL: unquoted when Postgres reads it back unchanged, else double-quoted."""
    plain = name.isidentifier() and name.isascii() and name.islower() and name not in _RESERVED
    return name if plain else '"' + name.replace('"', '""') + '"'


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def needs_full_identity(config: Config) -> list[str]:
    """Tables whose deletes or address changes need the whole old row (REPLICA IDENTITY FULL)."""
    out = []
    for m in config.mappings:
        if m.on_delete != "ignore" or m.subscriptions:
            out.append(m.table)
    return out


def statements(config: Config) -> list[Statement]:
    src = config.source
    out = [Statement("dead-letter store", SCHEMA_SQL),
           Statement("subscription ids the bridge learned (email/SMS)", SUBSCRIPTIONS_SQL)]
    if isinstance(src, OutboxSourceConfig):
        from bridge.sources.outbox import setup_statements

        return out + [Statement(why, text) for why, text in setup_statements(config)]
    if not isinstance(src, PostgresSourceConfig):
        return out
    out.append(Statement("backfill requests (read back through the stream)", BACKFILL_SQL))
    tables = ", ".join([_qualified(m.table) for m in config.mappings] + ["onesignal_bridge.backfill_requests"])
    pub = _ident(src.publication)
    out.append(Statement(
        f"publication {src.publication} for the mapped tables",
        "DO $$ BEGIN\n"
        f"  IF EXISTS (SELECT 1 FROM pg_publication WHERE pubname = {_literal(src.publication)}) THEN\n"
        f"    ALTER PUBLICATION {pub} SET TABLE {tables};\n"
        "  ELSE\n"
        f"    CREATE PUBLICATION {pub} FOR TABLE {tables};\n"
        "  END IF;\nEND $$;",
    ))
    for table in needs_full_identity(config):
        out.append(Statement(
            f"{table}: deletes and address changes need the old row",
            f"ALTER TABLE {_qualified(table)} REPLICA IDENTITY FULL;",
        ))
    out.append(Statement("initial snapshot progress", SNAPSHOT_SQL))
    if src.snapshot != "never":
        return out  # the first `run` creates the slot itself, exporting its snapshot for the initial read
    out.append(Statement(
        f"replication slot {src.slot} (pgoutput)",
        f"SELECT pg_create_logical_replication_slot({_literal(src.slot)}, 'pgoutput')\n"
        f"WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = {_literal(src.slot)});",
    ))
    return out


def teardown(config: Config) -> list[Statement]:
    """The SQL that removes what `statements` created for the source (the dead-letter and
    subscription tables stay: they hold history)."""
    src = config.source
    if isinstance(src, OutboxSourceConfig):
        from bridge.sources.outbox import teardown_statements

        return [Statement(why, text) for why, text in teardown_statements(config)]
    if isinstance(src, PostgresSourceConfig):
        return [
            Statement(f"replication slot {src.slot}",
                      "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                      f" WHERE slot_name = {_literal(src.slot)};"),
            Statement(f"publication {src.publication}", f"DROP PUBLICATION IF EXISTS {_ident(src.publication)};"),
        ]
    return []


def render(config: Config, stmts: list[Statement] | None = None) -> str:
    stmts = statements(config) if stmts is None else stmts
    return "\n\n".join(f"-- {s.why}\n{s.text}" for s in stmts) + "\n"


def apply(config: Config, dsn: str, stmts: list[Statement] | None = None) -> list[str]:
    """Run the statements; return what was done, one line each."""
    done = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        for s in statements(config) if stmts is None else stmts:
            conn.execute(sql.SQL(s.text))
            done.append(s.why)
    return done
