"""`setup` and `teardown`: prepare (or clean up) the database for the bridge.

`setup` = the bridge's own schema (`bridge/schema.py`: versioned migrations of its tables) plus
what the source kind needs (`SourceKind.setup`: publication, slot and replica identity; or the
outbox and its triggers). Everything is idempotent. `--print-sql` prints the same statements for
a DBA; `sql/postgres-source.sql` is that output for the example configuration
(`scripts/regen-sql.py` writes it, a test checks it is current).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql

from bridge import schema
from bridge.config import Config
from bridge.ports import Statement
from bridge.sources import registry


def statements(config: Config) -> list[Statement]:
    """Everything `setup` does, in order, as SQL."""
    kind = registry.for_config(config)
    if kind.database_dsn(config) is None:
        return []
    return [*schema.statements(), *kind.setup(config)]


def teardown(config: Config) -> list[Statement]:
    """What removes the kind's objects (the bridge's tables stay: they hold dead letters)."""
    return list(registry.for_config(config).teardown(config))


def render(stmts: Sequence[Statement]) -> str:
    return "\n\n".join(f"-- {s.why}\n{s.text}" for s in stmts) + "\n"


def apply(config: Config, dsn: str) -> list[str]:
    """Run `setup`: migrate the bridge's schema, then the kind's statements; what was done, one
    line each."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        done = schema.migrate(conn)
        version = schema.current_version(conn)
        done.append(f"onesignal_bridge schema at version {version}")
        done += run(conn, registry.for_config(config).setup(config))
    return done


def run(conn: psycopg.Connection[Any], stmts: Sequence[Statement]) -> list[str]:
    done = []
    for s in stmts:
        conn.execute(sql.SQL(s.text))  # generated from the configuration, names quoted
        done.append(s.why)
    return done


def apply_teardown(config: Config, dsn: str) -> list[str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return run(conn, teardown(config))
