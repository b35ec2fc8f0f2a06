"""The bridge's own tables in the application's database: one definition, versioned.

Every schema object the bridge owns is written once, in the package's SQL files
(`bridge/sql/NNNN_name.sql`, shipped with the package and read with `importlib.resources`).
They are ordered, forward-only migrations: `setup` applies those above the database's version,
each in one transaction with its row in `onesignal_bridge.schema_version`; `check` reports a
database that is behind; `run` refuses to start on one (with the command that fixes it) instead
of failing in the middle of a stream.

A database set up before versions existed has the tables but no version table: it counts as
version 0 and migration 1 (all `IF NOT EXISTS`) adopts what is there.

Kind-specific objects that depend on the configuration (publication, slot, replica identity,
outbox triggers) are not versioned: the source kind generates them and they are idempotent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import psycopg
from psycopg import sql

from bridge.errors import BridgeError, SourceSetupError
from bridge.ports import Statement

VERSION_TABLE = "onesignal_bridge.schema_version"
_VERSION_DDL = (
    "CREATE SCHEMA IF NOT EXISTS onesignal_bridge;\n"
    f"CREATE TABLE IF NOT EXISTS {VERSION_TABLE} (\n"
    "    version    int PRIMARY KEY,\n"
    "    name       text NOT NULL,\n"
    "    applied_at timestamptz NOT NULL DEFAULT now()\n"
    ");"
)
_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    text: str

    def record(self) -> str:
        return (f"INSERT INTO {VERSION_TABLE} (version, name) VALUES ({self.version}, '{self.name}')"
                " ON CONFLICT (version) DO NOTHING;")


def sql_file(name: str) -> str:
    """The text of one of the package's SQL files (e.g. `outbox.sql`)."""
    return (resources.files("bridge") / "sql" / name).read_text(encoding="utf-8")


@cache
def migrations() -> tuple[Migration, ...]:
    found = []
    for entry in (resources.files("bridge") / "sql").iterdir():
        m = _FILE.match(entry.name)
        if m:
            found.append(Migration(int(m.group(1)), m.group(2), entry.read_text(encoding="utf-8").strip()))
    found.sort(key=lambda mg: mg.version)
    if [mg.version for mg in found] != list(range(1, len(found) + 1)):
        raise BridgeError(f"bridge/sql: migrations must be numbered 1..n without gaps: {[m.version for m in found]}"
                          " (a packaging error: reinstall onesignal-bridge)")
    return tuple(found)


def latest() -> int:
    return migrations()[-1].version


def statements() -> list[Statement]:
    """Everything, as a DBA would run it on a fresh database (idempotent: each migration is
    recorded in the version table; a database at version N needs only the ones above N)."""
    out = [Statement("schema version table", _VERSION_DDL)]
    for mg in migrations():
        out.append(Statement(f"schema version {mg.version}: {mg.name.replace('_', ' ')}",
                             f"{mg.text}\n{mg.record()}"))
    return out


def current_version(conn: psycopg.Connection[Any]) -> int:
    """The database's schema version: 0 when the bridge's tables predate versions or are absent."""
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (VERSION_TABLE,)).fetchone()
    if row is None or not row[0]:
        return 0
    row = conn.execute(f"SELECT coalesce(max(version), 0) FROM {VERSION_TABLE}").fetchone()
    return int(row[0]) if row is not None else 0


def migrate(conn: psycopg.Connection[Any]) -> list[str]:
    """Apply the migrations above the database's version; return what was done, one line each."""
    done = []
    conn.execute(_VERSION_DDL)
    have = current_version(conn)
    for mg in migrations():
        if mg.version <= have:
            continue
        with conn.transaction():
            conn.execute(mg.text)
            conn.execute(mg.record())
        done.append(f"schema version {mg.version}: {mg.name.replace('_', ' ')}")
    return done


def problem(version: int) -> str | None:
    """What is wrong with a database at `version`, for the operator; None when it is current."""
    want = latest()
    if version == want:
        return None
    if version > want:
        return (f"the database's onesignal_bridge schema is at version {version}, newer than this bridge "
                f"knows ({want}): run a bridge at least as new as the one that set it up")
    if version == 0:
        return ("the database has no onesignal_bridge schema (or one from before schema versions): run "
                "`onesignal-bridge setup --config FILE` (or have the tables' owner run `setup --print-sql`)")
    return (f"the database's onesignal_bridge schema is at version {version}, this bridge needs {want}: "
            "run `onesignal-bridge setup --config FILE` to migrate it")


def require_current(dsn: str) -> None:
    """Raise `SourceSetupError` (with the fix) unless the database's schema is current."""
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
            version = current_version(conn)
    except psycopg.Error:
        return  # unreachable now: the source's own reconnect loop reports and retries it
    msg = problem(version)
    if msg is not None:
        raise SourceSetupError(msg)


# -- SQL text for the statements `setup` prints and runs -------------------------------------

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


def ident(name: str) -> str:
    """A name as SQL: bare when Postgres reads it back unchanged (readable `--print-sql`), else
    quoted by psycopg."""
    plain = name.isidentifier() and name.isascii() and name.islower() and name not in _RESERVED
    return name if plain else sql.Identifier(name).as_string(None)


def qualified(table: str) -> str:
    """`schema.table` as SQL (mixed-case names keep their case)."""
    schema, name = table.split(".", 1)
    return f"{ident(schema)}.{ident(name)}"


def literal(value: str) -> str:
    return sql.Literal(value).as_string(None)
