"""`check`'s findings for `triggers:` on a database source: each trigger table exists, has the
columns its triggers read, and can be read by the bridge's role."""

from __future__ import annotations

from typing import Any

from bridge.ports import Finding


def findings(conn: Any, config: Any) -> list[Finding]:
    """`conn`: a psycopg connection to the source database; `config`: the bridge's `Config`."""
    out: list[Finding] = []
    wanted: dict[str, set[str]] = {}
    for t in config.triggers:
        wanted.setdefault(t.table, set()).update(t.columns() | t.old_columns())
    for table, columns in wanted.items():
        names = ", ".join(t.name for t in config.triggers if t.table == table)
        exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()[0]
        if not exists:
            out.append(Finding(False, f"trigger table {table} ({names}) does not exist",
                               "fix `triggers[].table` or create the table"))
            continue
        have = {r[0] for r in conn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped",
            (table,))}
        missing = sorted(columns - have)
        out.append(Finding(not missing, f"trigger table {table} ({names}): "
                           + ("every column the triggers read exists" if not missing
                              else f"missing columns {', '.join(missing)}"),
                           "" if not missing else f"fix the triggers on {table} or add the columns"))
    return out
