"""What the database implies for OneSignal, user by user, through the pipeline's mapping stage.

Every mapped table is read the way the initial snapshot reads it (tables in name order, rows in
primary-key order, values through psycopg's loaders) and every row goes through
`TableMapping.map` as an `Op.SNAPSHOT` event: the `UserChange`s and `Rejection`s are exactly the
ones `run` would produce for those rows. The changes of one user are then merged the way the
coalescer merges them (later values win per field): a `Desired` user.

For whole tables (`plan`, `export-csv`, `reconcile --all`) the changes are kept on disk, in a
SQLite file in a temporary directory, and read back grouped by user: memory stays flat whether the
tables hold a thousand users or ten million, and a user that several tables (or several rows)
map to comes out once. For a few users (`reconcile --sample`, continuous reconcile) the rows are
looked up by identity (`desired_for`).

A user is a `UserRef` (alias label and id): two tables that name the same person by different
labels (`external_id` and `crm_id`) count as two users here, as they are two requests for `run`.
"""

from __future__ import annotations

import os
import random
import sqlite3
import tempfile
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import psycopg
from psycopg import sql

from bridge.coalesce import UserBatch
from bridge.config import Config
from bridge.deadletter import RowKey, key_value
from bridge.events import ChangeEvent, Op, Origin, Rejection, SubscriptionChange, UserChange, UserRef
from bridge.mapping import Mapper, TableMapping
from bridge.values import InvalidValue, alias_id

POSITION = "database"  # the position of a change read from the tables (not from a stream)
FETCH_ROWS = 5000


@dataclass
class Part:
    """One table's contribution to a user: its rows merged in primary-key order."""

    tags: dict[str, str | None] = field(default_factory=dict)
    properties: dict[str, Any] = field(default_factory=dict)
    aliases: dict[str, str | None] = field(default_factory=dict)
    subscriptions: dict[str, SubscriptionChange] = field(default_factory=dict)
    origin: Origin | None = None  # the first row (dead letters and `dlq replay` find it by its key)
    rows: int = 0

    def merge(self, ch: UserChange) -> None:
        self.tags.update(ch.tags)
        self.properties.update(ch.properties)
        self.aliases.update(ch.aliases)
        for sub in ch.subscriptions:
            older = self.subscriptions.get(sub.channel)
            if older is not None and sub.enabled is None:
                sub = SubscriptionChange(sub.channel, sub.token, older.enabled, None, sub.on_address_change)
            self.subscriptions[sub.channel] = sub
        if self.origin is None:
            self.origin = ch.origin
        self.rows += 1


@dataclass
class Desired:
    """One user as the database implies it. `tags` and `aliases` map to None where the mapped
    column is NULL: the mapping owns the key and wants it absent."""

    user: UserRef
    parts: dict[str, Part] = field(default_factory=dict)  # table -> part, in merge order

    def add(self, table: str, ch: UserChange) -> None:
        part = self.parts.get(table)
        if part is None:
            part = self.parts[table] = Part()
        part.merge(ch)

    def _merged(self, name: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for part in self.parts.values():
            out.update(getattr(part, name))
        return out

    @property
    def tags(self) -> dict[str, str | None]:
        return self._merged("tags")

    @property
    def properties(self) -> dict[str, Any]:
        return self._merged("properties")

    @property
    def aliases(self) -> dict[str, str | None]:
        return self._merged("aliases")

    @property
    def subscriptions(self) -> dict[str, SubscriptionChange]:
        return self._merged("subscriptions")

    @property
    def origins(self) -> tuple[Origin, ...]:
        return tuple(p.origin for p in self.parts.values() if p.origin is not None)

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.parts.values())

    def tag_count(self) -> int:
        """Tags the user carries once everything is applied (NULLs carry none)."""
        return sum(1 for v in self.tags.values() if v is not None)

    def empty(self) -> bool:
        """Nothing to send: the request planner makes no call for such a user (`bridge.plan.plan`:
        no tag key, even a NULL one, no property, alias or address)."""
        return not (self.tags or self.properties or any(v is not None for v in self.aliases.values())
                    or any(s.token is not None for s in self.subscriptions.values()))

    def change(self, seq: int, position: str = POSITION) -> UserChange:
        """The whole database state of the user as one change (what a repair sends)."""
        first = self.origins[0] if self.origins else Origin("", "", position, seq)
        origin = Origin(first.table, first.key, position, seq)
        return UserChange(self.user, origin, tags=self.tags, properties=self.properties,
                          aliases=self.aliases, subscriptions=tuple(self.subscriptions.values()))

    def batches(self) -> list[UserBatch]:
        """One batch per table, in the snapshot's order: what `run`'s initial snapshot hands the
        planner for this user (tables are read one after another)."""
        out = []
        for part in self.parts.values():
            origins = (part.origin,) if part.origin is not None else ()
            out.append(UserBatch(self.user, False, dict(part.tags), dict(part.properties), dict(part.aliases),
                                 dict(part.subscriptions), array("q"), origins, part.rows))
        return out


# -- reading tables ------------------------------------------------------------------------------


def table_order(config: Config) -> list[str]:
    """The order the initial snapshot reads the mapped tables in (by name)."""
    return sorted(m.table for m in config.mappings)


def primary_key(conn: psycopg.Connection[Any], table: str) -> list[str]:
    rows = conn.execute(
        "SELECT a.attname FROM pg_index i JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) ON true"
        " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum"
        " WHERE i.indrelid = to_regclass(%s) AND i.indisprimary ORDER BY k.ord", (table,)).fetchall()
    return [r[0] for r in rows]


def table_problem(conn: psycopg.Connection[Any], tm: TableMapping) -> str | None:
    """Why `tm`'s table cannot be read as the snapshot reads it (None: it can)."""
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (tm.table,)).fetchone()
    if row is None or not row[0]:
        return f"table {tm.table} does not exist"
    cols = {r[0] for r in conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped",
        (tm.table,)).fetchall()}
    missing = sorted(tm.columns - cols)
    if missing:
        return f"table {tm.table} has no column(s) {', '.join(missing)}"
    if not primary_key(conn, tm.table):
        return f"table {tm.table} has no primary key (the snapshot reads tables in primary-key order)"
    return None


def _ident(table: str) -> sql.Composable:
    schema, name = table.split(".", 1)
    return sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(name))


_cursor_no = 0


def read_table(conn: psycopg.Connection[Any], tm: TableMapping, where: sql.Composable | None = None,
               params: Iterable[Any] = ()) -> Iterator[ChangeEvent]:
    """The rows of `tm`'s table (mapped and key columns), in primary-key order, as snapshot
    events. `conn` must be in a transaction (a server-side cursor streams the rows)."""
    global _cursor_no
    keys = primary_key(conn, tm.table)
    cols = sorted(tm.columns | set(keys))
    q = sql.SQL("SELECT {} FROM {}").format(sql.SQL(", ").join(map(sql.Identifier, cols)), _ident(tm.table))
    if where is not None:
        q = sql.SQL("{} WHERE {}").format(q, where)
    q = sql.SQL("{} ORDER BY {}").format(q, sql.SQL(", ").join(map(sql.Identifier, keys)))
    _cursor_no += 1
    with conn.cursor(name=f"onesignal_bridge_read_{_cursor_no}") as cur:
        cur.itersize = FETCH_ROWS
        cur.execute(q, list(params))
        for row in cur:
            new = dict(zip(cols, row, strict=True))
            yield ChangeEvent(tm.table, Op.SNAPSHOT, new, None, {k: new[k] for k in keys}, POSITION)


# -- whole tables: changes on disk, read back by user ---------------------------------------------


def _encode(ch: UserChange) -> bytes:
    key = ch.origin.key
    cols = {str(k): key_value(v) for k, v in key.columns.items()} if isinstance(key, RowKey) else None
    subs = [[s.channel, s.token, s.enabled, s.on_address_change] for s in ch.subscriptions]
    return orjson.dumps({"t": ch.tags, "p": ch.properties, "a": ch.aliases, "s": subs, "k": cols,
                         "kt": str(key)}, default=str)


def _decode(user: UserRef, table: str, blob: bytes) -> UserChange:
    d = orjson.loads(blob)
    key: str = RowKey(d["k"], d["kt"]) if d["k"] is not None else d["kt"]
    subs = tuple(SubscriptionChange(c, t, e, None, mode) for c, t, e, mode in d["s"])
    return UserChange(user, Origin(table, key, POSITION, 0), tags=d["t"], properties=d["p"], aliases=d["a"],
                      subscriptions=subs)


class Store:
    """Changes per user in a SQLite file in a temporary directory (removed by `close`)."""

    def __init__(self, tables: list[str]) -> None:
        self.tables = tables
        self._dir = tempfile.TemporaryDirectory(prefix="onesignal-bridge-")
        # Used from one thread at a time (the caller may hand it to a worker thread): no sharing check.
        self.db = sqlite3.connect(os.path.join(self._dir.name, "desired.sqlite"), check_same_thread=False)
        self.db.execute("PRAGMA journal_mode = OFF")
        self.db.execute("PRAGMA synchronous = OFF")
        self.db.execute("CREATE TABLE changes (label TEXT, uid TEXT, tbl INTEGER, seq INTEGER, data BLOB)")
        self._buf: list[tuple[str, str, int, int, bytes]] = []
        self._seq = 0

    def add(self, table: str, ch: UserChange) -> None:
        self._seq += 1
        self._buf.append((ch.user.label, ch.user.id, self.tables.index(table), self._seq, _encode(ch)))
        if len(self._buf) >= 10_000:
            self.flush()

    def flush(self) -> None:
        if self._buf:
            self.db.executemany("INSERT INTO changes VALUES (?, ?, ?, ?, ?)", self._buf)
            self._buf.clear()

    def users(self) -> Iterator[Desired]:
        """Every user, once, in (label, id) order."""
        self.flush()
        current: Desired | None = None
        for label, uid, tbl, data in self.db.execute(
                "SELECT label, uid, tbl, data FROM changes ORDER BY label, uid, tbl, seq"):
            if current is None or current.user.label != label or current.user.id != uid:
                if current is not None:
                    yield current
                current = Desired(UserRef(label, uid))
            table = self.tables[tbl]
            current.add(table, _decode(current.user, table, data))
        if current is not None:
            yield current

    def users_per_table(self) -> dict[str, int]:
        self.flush()
        out = dict.fromkeys(self.tables, 0)
        for tbl, n in self.db.execute(
                "SELECT tbl, count(*) FROM (SELECT DISTINCT tbl, label, uid FROM changes) GROUP BY tbl"):
            out[self.tables[tbl]] = n
        return out

    def close(self) -> None:
        self.db.close()
        self._dir.cleanup()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Collected:
    """What reading every mapped table found: rows per table and the tables it could not read."""

    rows: dict[str, int] = field(default_factory=dict)
    unreadable: dict[str, str] = field(default_factory=dict)  # table -> why


def collect(conn: psycopg.Connection[Any], config: Config, store: Store,
            on_rejection: Callable[[Rejection], None]) -> Collected:
    """Read every mapped table (in `conn`'s transaction) into `store`; every value the mapping
    rejects goes to `on_rejection`, as `run` would dead-letter it."""
    mapper = Mapper(config)
    out = Collected()
    for table in store.tables:
        tm = mapper.tables[table]
        problem = table_problem(conn, tm)
        if problem is not None:
            out.unreadable[table] = problem
            continue
        n = 0
        for event in read_table(conn, tm):
            n += 1
            result = tm.map(event)
            for ch in result.changes:
                store.add(table, ch)
            for r in result.rejections:
                on_rejection(r)
        out.rows[table] = n
    store.flush()
    return out


# -- a few users: looked up by identity -----------------------------------------------------------


def _identity_type(conn: psycopg.Connection[Any], tm: TableMapping) -> str | None:
    row = conn.execute("SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = %s::regclass"
                       " AND attname = %s AND NOT attisdropped", (tm.table, tm.identity_column)).fetchone()
    return str(row[0]) if row else None


def desired_for(conn: psycopg.Connection[Any], config: Config, users: Iterable[UserRef]) -> dict[UserRef, Desired]:
    """The database state of `users` (in `conn`'s transaction). A user with no row in any
    mapped table is absent from the result."""
    mapper = Mapper(config)
    wanted: dict[str, list[str]] = {}
    for u in dict.fromkeys(users):
        wanted.setdefault(u.label, []).append(u.id)
    asked = {label: set(ids) for label, ids in wanted.items()}
    out: dict[UserRef, Desired] = {}
    for table in table_order(config):
        tm = mapper.tables[table]
        ids = wanted.get(tm.label)
        if not ids or table_problem(conn, tm) is not None:
            continue
        col = sql.Identifier(tm.identity_column)
        typ = _identity_type(conn, tm)
        for i in range(0, len(ids), 1000):
            chunk = ids[i:i + 1000]
            typed = sql.SQL("{} = ANY(%s::{}[])").format(col, sql.SQL(typ or "text"))
            try:
                with conn.transaction():  # a savepoint: an identity text the column type refuses
                    events = list(read_table(conn, tm, typed, [chunk]))
            except (psycopg.errors.DataError, psycopg.errors.UndefinedFunction):
                events = list(read_table(conn, tm, sql.SQL("{}::text = ANY(%s)").format(col), [chunk]))
            for event in events:
                for ch in tm.map(event).changes:
                    d = out.get(ch.user)
                    if d is None:
                        d = out[ch.user] = Desired(ch.user)
                    d.add(table, ch)
    return {u: d for u, d in out.items() if u.id in asked.get(u.label, ())}


def sample_users(conn: psycopg.Connection[Any], config: Config, n: int,
                 rng: random.Random | None = None) -> list[UserRef]:
    """About `n` users picked at random among those the mapped tables name (large tables are
    sampled with TABLESAMPLE, so a sample never reads a whole big table)."""
    rng = rng or random.Random()
    mapper = Mapper(config)
    found: set[UserRef] = set()
    for table in table_order(config):
        tm = mapper.tables[table]
        if table_problem(conn, tm) is not None:
            continue
        col = sql.Identifier(tm.identity_column)
        row = conn.execute("SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass(%s)", (table,)).fetchone()
        estimate = int(row[0]) if row and row[0] is not None else -1
        if 0 <= estimate < 100_000:
            q = sql.SQL("SELECT {} FROM {} WHERE {} IS NOT NULL ORDER BY random() LIMIT %s").format(
                col, _ident(table), col)
            params: list[Any] = [n]
        else:
            share = 100.0 if estimate <= 0 else min(100.0, 100.0 * 4 * n / estimate)
            q = sql.SQL("SELECT {} FROM {} TABLESAMPLE BERNOULLI (%s) WHERE {} IS NOT NULL"
                        " ORDER BY random() LIMIT %s").format(col, _ident(table), col)
            params = [share, n]
        for (value,) in conn.execute(q, params).fetchall():
            try:
                found.add(UserRef(tm.label, alias_id(value)))
            except InvalidValue:
                continue  # never a OneSignal user: `run` dead-letters such rows
    picked = sorted(found, key=lambda u: (u.label, u.id))
    rng.shuffle(picked)
    return picked[:n]
