#!/usr/bin/env python3
"""Write the files in `sql/` that are produced from the package (`python scripts/regen_sql.py`).

- `sql/postgres-source.sql`: what `onesignal-bridge setup --print-sql` prints for the example
  configuration below (the bridge's schema migrations, publication, replica identity, slot).
- `sql/outbox.sql`: the package's `bridge/sql/outbox.sql`, for DBAs who install the outbox by hand.

`tests/test_check_and_setup.py` fails when either file is not what this script would write.
The role scripts in `sql/` are written by hand.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bridge import setup  # noqa: E402
from bridge.config import parse_config  # noqa: E402
from bridge.schema import sql_file  # noqa: E402

EXAMPLE = {
    "onesignal": {"app_id": "00000000-0000-0000-0000-000000000000", "api_key": "unused"},
    "source": {"kind": "postgres", "dsn": "postgresql://bridge@db/app", "slot": "onesignal_bridge",
               "publication": "onesignal_bridge", "snapshot": "never"},
    "mappings": [
        {"table": "public.users", "identity": {"external_id": "id"}, "aliases": {"crm_id": "crm_id"},
         "tags": {"plan": "plan"}, "on_delete": "delete_user"},
        {"table": "public.orders", "identity": {"external_id": "user_id"}, "tags": {"last_order_total": "total"}},
    ],
}


def generated() -> dict[Path, str]:
    config = parse_config(EXAMPLE, where="scripts/regen_sql.py", env={})
    return {
        ROOT / "sql" / "postgres-source.sql": setup.render(setup.statements(config)),
        ROOT / "sql" / "outbox.sql": sql_file("outbox.sql"),
    }


def main() -> int:
    for path, text in generated().items():
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
