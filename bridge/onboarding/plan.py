"""`onesignal-bridge plan`: what the first `run` would do to the OneSignal app, read-only.

The mapped tables are read in one read-only REPEATABLE READ transaction (nothing is written
anywhere: not the database, not OneSignal) and every row goes through the mapping stage
(`desired.py`). The numbers:

- `users`: distinct users (alias label and id) the mappings imply;
- `requests`: the calls the initial snapshot would make, from the request planner `run` uses
  (`bridge.plan.plan`): per user, one batch per table in the snapshot's order, the first one for a
  user OneSignal does not have yet; a user with nothing to send costs nothing;
- `duration_s`: `requests` at `delivery.app_requests_per_second`;
- `max_tags`: the most tags one user would carry (OneSignal's plans cap tags per user);
- `tables`: rows and users per table;
- `problems`: what `run` would dead-letter (bad identities, aliases, languages, time zones,
  addresses, values) or could not read, each with table, row key, field and reason; the list is
  capped (`--max-problems`), `problems_total` counts them all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import orjson
import psycopg

from bridge.config import Config
from bridge.events import Rejection
from bridge.onboarding.desired import Store, collect, table_order
from bridge.plan import plan as plan_requests

MAX_PROBLEMS = 100


@dataclass
class Problems:
    """Rejections, capped for display, all counted."""

    limit: int = MAX_PROBLEMS
    items: list[dict[str, Any]] = field(default_factory=list)
    total: int = 0

    def add(self, table: str, row_key: str | None, fld: str | None, reason: str) -> None:
        self.total += 1
        if len(self.items) < self.limit:
            self.items.append({"table": table, "row_key": row_key, "field": fld, "reason": reason})

    def rejection(self, r: Rejection) -> None:
        self.add(r.table, str(r.key), r.field, r.reason)


def make_plan(config: Config, dsn: str, max_problems: int = MAX_PROBLEMS) -> dict[str, Any]:
    problems = Problems(max_problems)
    tables = table_order(config)
    with psycopg.connect(dsn, connect_timeout=10) as conn, Store(tables) as store:
        conn.read_only = True
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        found = collect(conn, config, store, problems.rejection)
        conn.rollback()
        for table, why in found.unreadable.items():
            problems.add(table, None, None, why)
        users = requests = max_tags = 0
        for desired in store.users():
            users += 1
            max_tags = max(max_tags, desired.tag_count())
            exists = False
            for batch in desired.batches():
                calls = plan_requests(batch, exists=exists)
                requests += len(calls)
                exists = exists or bool(calls)
        per_table = store.users_per_table()
    rate = config.delivery.app_requests_per_second
    out: dict[str, Any] = {
        "users": users,
        "requests": requests,
        "duration_s": round(requests / rate, 1),
        "max_tags": max_tags,
        "tables": {t: {"rows": found.rows.get(t, 0), "users": per_table.get(t, 0)} for t in tables},
        "problems": problems.items,
        "problems_total": problems.total,
    }
    limit = getattr(config.onesignal, "max_tags_per_user", None)
    if limit is not None:
        out["max_tags_per_user"] = limit
    return out


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{math.ceil(seconds)} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def render_text(result: dict[str, Any], config: Config) -> str:
    rate = config.delivery.app_requests_per_second
    lines = [
        f"users      {result['users']:,}",
        f"requests   {result['requests']:,} (initial sync at {rate:g} requests/s: about "
        f"{_duration(result['duration_s'])})",
        f"max tags   {result['max_tags']} on one user"
        + (f" (the app allows {result['max_tags_per_user']})" if "max_tags_per_user" in result else ""),
        "tables",
    ]
    width = max((len(t) for t in result["tables"]), default=0)
    for table, n in result["tables"].items():
        lines.append(f"  {table:<{width}}  rows {n['rows']:,}  users {n['users']:,}")
    total = result["problems_total"]
    lines.append(f"problems   {total}" + (" (rows `run` would dead-letter or tables it cannot read)" if total else ""))
    for p in result["problems"]:
        where = p["table"] + (f" {p['row_key']}" if p["row_key"] else "")
        where += f" field {p['field']}" if p["field"] else ""
        lines.append(f"  {where}: {p['reason']}")
    if total > len(result["problems"]):
        lines.append(f"  ... and {total - len(result['problems'])} more (--max-problems, or --format json)")
    return "\n".join(lines)


def run(config: Config, dsn: str, fmt: str, max_problems: int = MAX_PROBLEMS) -> int:
    result = make_plan(config, dsn, max_problems)
    if fmt == "json":
        print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    else:
        print(render_text(result, config))
    return 0
