"""`onesignal-bridge export-csv`: OneSignal import files from a consistent snapshot, then `run`
streams only what changed after it (no gap, no double work).

What OneSignal's CSV import takes (documentation.onesignal.com/docs/en/import, "CSV import";
docs/onboarding.md cites it): UTF-8 without BOM, no non-printable or non-ASCII characters,
unique headers, under 150 MB (about 2 million rows) per file, at least one identifier
(`external_id`, `email`, `phone_number`, `subscription_id`), one identifier of each type per
row (several addresses of one user: several rows sharing the `external_id`); columns
`subscribed` (with an address in the row), `language`, `timezone_id`, `country`, and one column
per tag (at most 1,000 tag columns per import; a tag named like a property is written
`{{key}}`).

The files: `external_id` (the identity), `email` / `phone_number` where mapped, `subscribed` where
consent is mapped (`yes`/`no`), `language`, `timezone_id`, `country` where mapped, then one
column per mapped tag. A mapping whose fields the import cannot carry (an identity label other
than `external_id`, custom aliases, `lat`, `long`, `first_active`, `last_active`) is refused up
front with the alternatives: the importer would silently drop them and `run` would never send
them (the snapshot is marked done).

Values pass through the mapping stage first (as `run` would send them); what the mapping rejects
is dead-lettered as `run` would. A value the CSV rules cannot carry (non-ASCII, a control
character) is dead-lettered with reason `csv_unrepresentable` and left out of the file (an
identity that cannot be written drops the user's row): `dlq replay --reason csv_unrepresentable`
sends those rows through the API after the import.

Consistent points (the `ConsistentPoint` implementations below):

- `postgres`: the replication slot is created with an exported snapshot
  (`CREATE_REPLICATION_SLOT ... (SNAPSHOT 'export')`) and the tables are read in a REPEATABLE
  READ transaction that imports it: exactly the rows as of the slot's consistent point. Before
  reading, `onesignal_bridge.snapshot_progress` gets a row per table (not done); after the files
  are written, the rows are marked done, so `run` skips its initial snapshot and streams from the
  slot's start: every change committed after the snapshot, none before. If the export fails the
  slot and the progress rows are removed (run it again); if it is killed, the slot stays with
  progress "not done", and `run` would send the whole tables through the API (drop the slot to
  export again).
- `outbox`: the export takes the outbox leader lock (no bridge drains meanwhile) and reads the
  tables and the outbox in one REPEATABLE READ transaction, then deletes, in that same
  transaction, exactly the outbox rows its snapshot sees: their changes are in the files. Rows of
  transactions that commit later are invisible to it, stay, and `run` applies them. (A high-water
  outbox id would be wrong: a transaction that drew a lower id may commit after the snapshot.)
  Nothing is deleted unless the files were written.
"""

from __future__ import annotations

import asyncio
import csv
import io
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson
import psycopg
from psycopg import sql

from bridge import schema
from bridge.config import Config, OutboxSourceConfig, PostgresSourceConfig
from bridge.deadletter import DeadLetter, PostgresDeadLetters
from bridge.errors import ConfigError, SourceSetupError
from bridge.events import Origin
from bridge.mapping import Mapper
from bridge.onboarding.desired import Desired, Store, collect, table_order

log = logging.getLogger("bridge.export")

MAX_FILE_BYTES = 145_000_000  # OneSignal: "under 150 MB"
MAX_FILE_ROWS = 1_900_000  # "(about 2 million rows)"
MAX_TAG_COLUMNS = 1000  # "Include up to 1,000 Tags per import"
CSV_PROPERTIES = ("language", "timezone_id", "country")
# Columns the importer reads as something else than a tag: a tag of that name is written {{name}}.
IMPORT_COLUMNS = frozenset({"external_id", "email", "phone_number", "subscription_id", "subscribed", "suppressed",
                            *CSV_PROPERTIES})
REASON = "csv_unrepresentable"
FILE_PREFIX = "onesignal-import-"


class ExportError(ConfigError):
    """The mapping asks for something OneSignal's CSV import cannot carry."""


def printable_ascii(text: str) -> bool:
    return all(" " <= c <= "~" for c in text)


# -- the file layout ----------------------------------------------------------------------------


@dataclass
class Layout:
    """The columns of the import files and how a `Desired` user becomes rows."""

    tags: list[str]  # tag keys, in mapping order
    properties: list[str]
    email: bool
    sms: bool
    consent: set[str]  # channels whose consent is mapped
    tag_columns: dict[str, str] = field(default_factory=dict)  # (table, tag) -> column, for dead letters
    tag_sources: dict[tuple[str, str], str] = field(default_factory=dict)

    @classmethod
    def for_config(cls, config: Config) -> Layout:
        problems: list[str] = []
        tags: dict[str, None] = {}
        props: set[str] = set()
        email = sms = False
        consent: set[str] = set()
        sources: dict[tuple[str, str], str] = {}
        mapper = Mapper(config)
        for m in config.mappings:
            tm = mapper.tables[m.table]
            if m.identity_label != "external_id":
                problems.append(f"{m.table}: identity {m.identity_label} (the import identifies users by "
                                f"external_id only)")
            if m.aliases:
                problems.append(f"{m.table}: aliases {', '.join(m.aliases)} (the import sets no custom alias)")
            extra = sorted(set(m.properties) - set(CSV_PROPERTIES))
            if extra:
                problems.append(f"{m.table}: properties {', '.join(extra)} (the import has no column for them)")
            props |= set(m.properties) & set(CSV_PROPERTIES)
            for tag, col in tm.tags:
                tags[tag] = None
                sources[(m.table, tag)] = col
                if not printable_ascii(tag) or not tag:
                    problems.append(f"{m.table}: tag key {tag!r} (headers must be printable ASCII)")
            for channel, _col, enabled_col in tm.subscriptions:
                email |= channel == "email"
                sms |= channel == "sms"
                if enabled_col:
                    consent.add(channel)
        if len(tags) > MAX_TAG_COLUMNS:
            problems.append(f"{len(tags)} tag keys (an import takes at most {MAX_TAG_COLUMNS} tag columns)")
        if problems:
            raise ExportError(
                "export-csv: OneSignal's CSV import cannot carry what the mappings send, and `run` would never "
                "send it after the import (the snapshot is marked done): " + "; ".join(problems)
                + ". Use the API snapshot instead (`run` with source.snapshot: initial), or export without "
                  "these fields and send them afterwards (`backfill`)")
        layout = cls(list(tags), [p for p in CSV_PROPERTIES if p in props], email, sms, consent)
        layout.tag_sources = sources
        return layout

    @property
    def split_sms(self) -> bool:
        """Consent for both channels: one `subscribed` column cannot say both, so the SMS address
        goes on a second row with the same external_id (the importer's documented pattern)."""
        return self.email and self.sms and bool(self.consent)

    def header(self) -> list[str]:
        cols = ["external_id"]
        if self.email:
            cols.append("email")
        if self.sms:
            cols.append("phone_number")
        if self.consent:
            cols.append("subscribed")
        cols += self.properties
        cols += [f"{{{{{t}}}}}" if t in IMPORT_COLUMNS else t for t in self.tags]
        return cols

    def rows(self, d: Desired, reject: Callable[[Origin | None, str, str, str], None]) -> list[list[str]]:
        """The user's rows (none when the user has nothing to send or its identity cannot be
        written). `reject(origin, column, value, why)` dead-letters a value the rules refuse."""
        if d.empty():
            return []
        if not printable_ascii(d.user.id):
            reject(d.origins[0] if d.origins else None, "", d.user.id,
                   "the identity is not printable ASCII, which OneSignal's CSV import refuses: the user is left "
                   "out of the files")
            return []

        def cell(value: Any, origin: Origin | None, column: str) -> str:
            if value is None:
                return ""
            text = str(value)
            if printable_ascii(text):
                return text
            reject(origin, column, text, "not printable ASCII, which OneSignal's CSV import refuses: left out of "
                                         "the file")
            return ""

        tags = d.tags
        winner: dict[str, tuple[str, Origin | None]] = {}
        for table, part in d.parts.items():
            for key in part.tags:
                winner[key] = (table, part.origin)
        subs = d.subscriptions
        props = d.properties

        def sub_origin(channel: str) -> Origin | None:
            found = None
            for part in d.parts.values():
                if channel in part.subscriptions:
                    found = part.origin
            return found

        def consent(channel: str) -> str:
            sc = subs.get(channel)
            if sc is None or sc.enabled is None or sc.token is None:
                return ""
            return "yes" if sc.enabled else "no"

        row = [d.user.id]
        sms_text = ""
        email_sc, sms_sc = subs.get("email"), subs.get("sms")
        if self.email:
            row.append(cell(email_sc.token if email_sc else None, sub_origin("email"), "email"))
        if self.sms:
            sms_text = cell(sms_sc.token if sms_sc else None, sub_origin("sms"), "phone_number")
            row.append("" if self.split_sms else sms_text)
        if self.consent:
            row.append(consent("email") if self.email else consent("sms"))
        row += [cell(props.get(p), None, p) for p in self.properties]
        for tag in self.tags:
            table, origin = winner.get(tag, ("", None))
            row.append(cell(tags.get(tag), origin, self.tag_sources.get((table, tag), tag)))
        out = [row]
        if self.split_sms and sms_text:
            second = [d.user.id] + [""] * (len(row) - 1)
            second[2] = sms_text
            second[3] = consent("sms")
            out.append(second)
        return out


class Files:
    """CSV files in `out`, each below `max_bytes` and `max_rows`, each with the header."""

    def __init__(self, out: Path, header: list[str], max_bytes: int, max_rows: int) -> None:
        self.out, self.header, self.max_bytes, self.max_rows = out, header, max_bytes, max_rows
        self.done: list[dict[str, Any]] = []
        self._file: io.TextIOWrapper | None = None
        self._bytes = self._rows = 0
        self._head = self._line(header)
        if len(self._head) >= max_bytes:
            raise ExportError(f"export-csv: --max-file-bytes {max_bytes} is smaller than the header")

    @staticmethod
    def _line(row: list[str]) -> str:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(row)
        return buf.getvalue()

    def _open(self) -> None:
        self.close()
        path = self.out / f"{FILE_PREFIX}{len(self.done) + 1:04d}.csv"
        self._file = open(path, "w", encoding="ascii", newline="")  # noqa: SIM115 - closed by close()
        self._file.write(self._head)
        self._bytes, self._rows = len(self._head), 0
        self.done.append({"file": path.name, "rows": 0, "bytes": self._bytes})

    def write(self, row: list[str]) -> None:
        line = self._line(row)
        if (self._file is None or self._bytes + len(line) > self.max_bytes or self._rows >= self.max_rows):
            self._open()
        assert self._file is not None
        self._file.write(line)
        self._bytes += len(line)
        self._rows += 1
        self.done[-1].update(rows=self._rows, bytes=self._bytes)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


# -- consistent points --------------------------------------------------------------------------


class ConsistentPoint(Protocol):
    """Where the files' snapshot ends and `run`'s stream begins, for one source kind."""

    def check(self) -> None: ...

    def open(self) -> psycopg.Connection[Any]:
        """A connection in a transaction that sees exactly the snapshot."""
        ...

    def commit(self, rows: dict[str, int]) -> dict[str, Any]:
        """The files are written: record that `run` starts after the snapshot; what was recorded."""
        ...

    def abort(self) -> None: ...


class PostgresPoint:
    def __init__(self, config: Config, dsn: str) -> None:
        assert isinstance(config.source, PostgresSourceConfig)
        self.src = config.source
        self.dsn = dsn
        self.tables = table_order(config)
        self.reader: psycopg.Connection[Any] | None = None
        self.consistent_point = ""

    def check(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True, connect_timeout=10) as conn:
            pub = conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (self.src.publication,)).fetchone()
            if pub is None:
                raise SourceSetupError(f"export-csv: publication {self.src.publication} does not exist: run "
                                       f"`onesignal-bridge setup --config FILE` first")
            if conn.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (self.src.slot,)).fetchone():
                raise SourceSetupError(
                    f"export-csv: replication slot {self.src.slot} already exists, so its start is not the export's "
                    f"snapshot (the bridge has run, or an export was interrupted). To export from scratch, stop the "
                    f"bridge and drop the slot (SELECT pg_drop_replication_slot('{self.src.slot}')); to bring an "
                    f"app that already streams in step, use `reconcile --all --repair`")

    def open(self) -> psycopg.Connection[Any]:
        repl = psycopg.connect(self.dsn, autocommit=True, replication="database", connect_timeout=10)
        try:
            res = repl.pgconn.exec_(
                f"CREATE_REPLICATION_SLOT {self.src.slot} LOGICAL pgoutput (SNAPSHOT 'export')".encode())
            if res.status != psycopg.pq.ExecStatus.TUPLES_OK:
                msg = (res.error_message or b"").decode(errors="replace").strip()
                raise SourceSetupError(f"export-csv: cannot create replication slot {self.src.slot}: {msg}")
            self.consistent_point = (res.get_value(0, 1) or b"").decode()
            snapshot = (res.get_value(0, 2) or b"").decode()
            with psycopg.connect(self.dsn, autocommit=True) as ctl:
                ctl.execute("DELETE FROM onesignal_bridge.snapshot_progress WHERE slot = %s", (self.src.slot,))
                for table in self.tables:  # not done: a killed export leaves `run` a full snapshot to do
                    ctl.execute("INSERT INTO onesignal_bridge.snapshot_progress (slot, table_name) VALUES (%s, %s)",
                                (self.src.slot, table))
            reader = psycopg.connect(self.dsn, connect_timeout=10)
            reader.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            reader.read_only = True
            # The exported snapshot stays valid until the replication connection's next command:
            # import it before that connection goes.
            reader.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
        except BaseException:
            repl.close()
            self._drop()
            raise
        repl.close()
        self.reader = reader
        log.info("replication slot %s created at %s; reading its exported snapshot", self.src.slot,
                 self.consistent_point)
        return reader

    def commit(self, rows: dict[str, int]) -> dict[str, Any]:
        with psycopg.connect(self.dsn, autocommit=True) as ctl, ctl.transaction():
            for table in self.tables:
                ctl.execute("UPDATE onesignal_bridge.snapshot_progress SET done = true, rows_done = %s,"
                            " updated_at = now() WHERE slot = %s AND table_name = %s",
                            (rows.get(table, 0), self.src.slot, table))
        self._close_reader()
        return {"kind": "postgres", "slot": self.src.slot, "consistent_point": self.consistent_point}

    def _close_reader(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None

    def _drop(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as ctl:
                ctl.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                            " WHERE slot_name = %s AND NOT active", (self.src.slot,))
                ctl.execute("DELETE FROM onesignal_bridge.snapshot_progress WHERE slot = %s", (self.src.slot,))
        except psycopg.Error as exc:
            log.error("could not remove replication slot %s after the failed export (%s): drop it by hand",
                      self.src.slot, exc)

    def abort(self) -> None:
        self._close_reader()
        self._drop()


OUTBOX_LOCK = "SELECT pg_try_advisory_lock(hashtextextended('onesignal_bridge.outbox', 0))"
OUTBOX_UNLOCK = "SELECT pg_advisory_unlock(hashtextextended('onesignal_bridge.outbox', 0))"


class OutboxPoint:
    def __init__(self, config: Config, dsn: str) -> None:
        self.dsn = dsn
        self.tables = table_order(config)
        self.conn: psycopg.Connection[Any] | None = None
        self.seen = 0

    def check(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True, connect_timeout=10) as conn:
            if conn.execute("SELECT to_regclass('onesignal_bridge.outbox') IS NOT NULL").fetchone() != (True,):
                raise SourceSetupError("export-csv: onesignal_bridge.outbox does not exist: run "
                                       "`onesignal-bridge setup --config FILE` first")
            for table in self.tables:
                row = conn.execute("SELECT 1 FROM pg_trigger WHERE tgrelid = to_regclass(%s)"
                                   " AND tgname = 'onesignal_bridge_capture'", (table,)).fetchone()
                if row is None:
                    raise SourceSetupError(f"export-csv: {table} has no capture trigger, so changes made during "
                                           f"and after the export would be lost: run `onesignal-bridge setup "
                                           f"--config FILE`")

    def open(self) -> psycopg.Connection[Any]:
        conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=10)
        row = conn.execute(OUTBOX_LOCK).fetchone()
        if row is None or not row[0]:
            conn.close()
            raise SourceSetupError("export-csv: a bridge is draining the outbox (it holds the outbox leader lock): "
                                   "stop it, export, then start it again")
        conn.autocommit = False
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        row = conn.execute("SELECT count(*) FROM onesignal_bridge.outbox").fetchone()  # takes the snapshot
        self.seen = int(row[0]) if row else 0
        self.conn = conn
        return conn

    def commit(self, rows: dict[str, int]) -> dict[str, Any]:
        assert self.conn is not None
        deleted = self.conn.execute("DELETE FROM onesignal_bridge.outbox").rowcount  # the snapshot's rows only
        self.conn.commit()
        self._release()
        return {"kind": "outbox", "outbox_rows_in_snapshot": self.seen, "outbox_rows_deleted": deleted}

    def _release(self) -> None:
        if self.conn is not None:
            try:
                self.conn.rollback()
                self.conn.autocommit = True
                self.conn.execute(OUTBOX_UNLOCK)
            finally:
                self.conn.close()
                self.conn = None

    def abort(self) -> None:
        self._release()


POINTS: dict[str, Callable[[Config, str], ConsistentPoint]] = {"postgres": PostgresPoint, "outbox": OutboxPoint}


# -- the command --------------------------------------------------------------------------------


@dataclass
class Result:
    files: list[dict[str, Any]]
    users: int
    rows: dict[str, int]
    dead_letters: int
    point: dict[str, Any]
    columns: list[str]


def _letters(dsn: str, letters: list[DeadLetter]) -> None:
    async def put() -> None:
        store = PostgresDeadLetters(dsn)
        try:
            for i in range(0, len(letters), 1000):
                await store.put(letters[i:i + 1000])
        finally:
            await store.close()

    if letters:
        asyncio.run(put())


def export(config: Config, dsn: str, out: Path, max_bytes: int = MAX_FILE_BYTES,
           max_rows: int = MAX_FILE_ROWS) -> Result:
    layout = Layout.for_config(config)
    kind = config.source.kind
    if kind not in POINTS:
        raise ExportError(f"export-csv: source.kind {kind} has no consistent point to export from "
                          f"(postgres and outbox have)")
    if isinstance(config.source, (PostgresSourceConfig, OutboxSourceConfig)):
        schema.require_current(dsn)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob(f"{FILE_PREFIX}*.csv")):
        raise ExportError(f"export-csv: {out} already holds {FILE_PREFIX}*.csv files: choose an empty directory")
    point = POINTS[kind](config, dsn)
    point.check()
    letters: list[DeadLetter] = []

    def reject(origin: Origin | None, column: str, value: str, why: str) -> None:
        origins = (origin,) if origin is not None else ()
        letters.append(DeadLetter.from_origins(
            origins, field=column or None, reason=REASON, position="export-csv",
            message=f"user {user}: {column or 'identity'} {value[:40]!r} {why}; after the import, "
                    f"`onesignal-bridge dlq replay --reason {REASON}` sends the row through the API",
            user=user, payload={column or "identity": value}))

    user = ""
    started = time.monotonic()
    reader = point.open()
    files = Files(out, layout.header(), max_bytes, max_rows)
    try:
        with Store(table_order(config)) as store:
            found = collect(reader, config, store, lambda r: letters.append(DeadLetter.from_rejection(r)))
            if found.unreadable:
                raise SourceSetupError("export-csv: " + "; ".join(found.unreadable.values()))
            users = 0
            for desired in store.users():
                user = str(desired.user)
                rows = layout.rows(desired, reject)
                users += bool(rows)
                for row in rows:
                    files.write(row)
        files.close()
        _letters(dsn, letters)  # before the point is recorded: a value is never lost
        recorded = point.commit(found.rows)
    except BaseException:
        files.close()
        point.abort()
        raise
    result = Result(files.done, users, found.rows, len(letters), recorded, layout.header())
    manifest = {"files": result.files, "users": users, "rows": found.rows, "dead_letters": len(letters),
                "columns": result.columns, "consistent_point": recorded,
                "seconds": round(time.monotonic() - started, 1)}
    (out / "export.json").write_bytes(orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
    return result


def run(config: Config, out_dir: str, max_bytes: int = MAX_FILE_BYTES, max_rows: int = MAX_FILE_ROWS) -> int:
    dsn: str = config.source.dsn.get_secret_value()  # type: ignore[union-attr]  # a database kind (commands.py)
    out = Path(out_dir)
    result = export(config, dsn, out, max_bytes, max_rows)
    for f in result.files:
        print(f"{out / f['file']}  {f['rows']:,} rows, {f['bytes']:,} bytes")
    total_rows = sum(result.rows.values())
    per_table = ", ".join(f"{t} {n:,}" for t, n in result.rows.items())
    print(f"{result.users:,} users from {total_rows:,} rows ({per_table}); manifest {out / 'export.json'}")
    point = result.point
    if point["kind"] == "postgres":
        print(f"replication slot {point['slot']} starts at {point['consistent_point']}: the files hold everything "
              f"before it, `run` streams everything after it (the initial snapshot is marked done)")
    else:
        print(f"{point['outbox_rows_deleted']:,} outbox rows already in the files were removed; later changes stay "
              f"in the outbox for `run`")
    if result.dead_letters:
        print(f"{result.dead_letters:,} value(s) dead-lettered (`onesignal-bridge dlq list --config FILE`)")
    print("next: upload the files in OneSignal's dashboard (Audience > Import > CSV import), one at a time, and wait "
          "for each import to finish; then start `onesignal-bridge run --config FILE`"
          + (f"; then `onesignal-bridge dlq replay --reason {REASON} --config FILE` for the values the files could "
             f"not carry" if result.dead_letters else ""))
    if point["kind"] == "postgres":
        print("until `run` starts, Postgres keeps the WAL written since the export for the slot: do not wait days",
              file=sys.stderr)
    return 0
