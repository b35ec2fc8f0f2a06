"""The outbox source deletes applied rows by id; a deletion that fails must be tried again, not
forgotten (in process: the real OutboxSource against a real Postgres, a stand-in sink whose
confirmations the test decides)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import psycopg

from bridge import schema
from bridge.config import Config, parse_config
from bridge.events import ChangeEvent
from bridge.observability import metrics as m
from bridge.sources.outbox import OutboxSource
from bridge.sources.outbox_kind import setup_statements

DDL = "CREATE TABLE users (id bigint PRIMARY KEY, plan text);"


def _config(dsn: str) -> Config:
    return parse_config({
        "onesignal": {"app_id": "00000000-0000-0000-0000-000000000000", "api_key": "os_v2_app_test",
                      "base_url": "http://127.0.0.1:9"},
        "source": {"kind": "outbox", "dsn": dsn, "poll_interval_ms": 200, "metrics_interval_s": 3600},
        "mappings": [{"table": "public.users", "identity": {"external_id": "id"}, "tags": {"plan": "plan"}}],
    }, env={})


def _set_up(pg_db: Any) -> Config:
    """The users table and what `setup` makes for it (the bridge's schema, outbox, trigger), as the
    test's superuser."""
    pg_db.execute(DDL)
    with psycopg.connect(pg_db.dsn, autocommit=True) as conn:
        schema.migrate(conn)
    cfg = _config(pg_db.dsn)
    for st in setup_statements(cfg):
        if "privileges" not in st.why:
            pg_db.execute(st.text)
    return cfg


class Sink:
    """Applies nothing; `confirmable` is what the test says was applied."""

    def __init__(self) -> None:
        self.events: list[ChangeEvent] = []
        self.marks: list[Any] = []
        self.confirmable: Any = None
        self.idle = True

    async def put(self, event: ChangeEvent, order: tuple[Any, ...] = ()) -> None:
        self.events.append(event)

    def offer(self, event: ChangeEvent, order: tuple[Any, ...] = ()) -> None:
        self.events.append(event)

    def mark(self, position: Any) -> None:
        self.marks.append(position)

    def on_confirm(self, listener: Any) -> None:
        pass


async def _until(pred: Any, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def test_applied_rows_whose_deletion_failed_are_deleted_later_not_stranded(pg_db: Any) -> None:
    """The connection drops while the applied rows are being deleted (here: the DELETE waits on a
    lock and its backend is terminated). The source reconnects; the rows must still be deleted,
    and their ids must not stay held (held ids are skipped by every claim and count against
    `max_unconfirmed_rows`: enough of them would stop delivery for good)."""
    cfg = _set_up(pg_db)
    pg_db.execute("INSERT INTO users SELECT g, 'p' FROM generate_series(1, 5) g")

    async def main() -> tuple[int, int, int]:
        sink = Sink()
        src = OutboxSource(cfg.source, cfg)  # type: ignore[arg-type]  # an outbox config
        stop = asyncio.Event()
        task = asyncio.create_task(src.run(sink, stop))  # type: ignore[arg-type]  # the sink's stand-in
        assert await _until(lambda: len(sink.events) == 5)
        locker = await psycopg.AsyncConnection.connect(pg_db.dsn)
        monitor = await psycopg.AsyncConnection.connect(pg_db.dsn, autocommit=True)
        try:
            await locker.execute("LOCK TABLE onesignal_bridge.outbox IN ACCESS EXCLUSIVE MODE")
            sink.confirmable = sink.marks[-1]  # all five applied: the source deletes them (and waits)
            deadline = time.monotonic() + 15
            while True:
                cur = await monitor.execute(
                    "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND query LIKE 'DELETE FROM onesignal_bridge.outbox%%'")
                waiting = await cur.fetchall()
                if waiting:
                    break
                assert time.monotonic() < deadline, "the source never tried to delete the applied rows"
                await asyncio.sleep(0.05)
            await monitor.execute("SELECT pg_terminate_backend(%s)", (waiting[0][0],))
            await locker.rollback()
            pg_db.execute("INSERT INTO users VALUES (100, 'x')")
            assert await _until(lambda: len(sink.events) == 6), "the source did not go on after reconnecting"
            sink.confirmable = sink.marks[-1]
            assert await _until(lambda: not src._held)
            cur = await monitor.execute("SELECT count(*) FROM onesignal_bridge.outbox")
            row = await cur.fetchone()
            assert row is not None
            left = row[0]
        finally:
            stop.set()
            await asyncio.wait_for(task, 15)
            await locker.close()
            await monitor.close()
        return left, len(src._held), len(sink.events)

    left, held, events = asyncio.run(main())
    assert (left, held) == (0, 0), f"{left} applied rows left in the outbox, {held} ids still held"
    assert events == 6  # nothing applied twice in this run


def test_rows_of_a_table_renamed_after_setup_are_counted_and_named_never_dropped_silently(
        pg_db: Any, caplog: Any) -> None:
    """ALTER TABLE users RENAME TO members: the capture trigger goes on writing rows, now under the
    new name, which no mapping names. They cannot be applied; the operator must hear which table,
    how many rows, and what to do (once per table in the log, every row in the metric)."""
    cfg = _set_up(pg_db)
    pg_db.execute("ALTER TABLE users RENAME TO members")
    before = m.REGISTRY.get_sample_value("onesignal_bridge_outbox_unmapped_rows_total",
                                         {"table": "public.members"}) or 0.0
    pg_db.execute("INSERT INTO members SELECT g, 'p' FROM generate_series(1, 3) g")

    async def main() -> list[ChangeEvent]:
        sink = Sink()
        src = OutboxSource(cfg.source, cfg)  # type: ignore[arg-type]  # an outbox config
        stop = asyncio.Event()
        task = asyncio.create_task(src.run(sink, stop))  # type: ignore[arg-type]  # the sink's stand-in
        try:
            assert await _until(lambda: bool(sink.marks))
        finally:
            stop.set()
            await asyncio.wait_for(task, 15)
        return sink.events

    with caplog.at_level(logging.WARNING):
        events = asyncio.run(main())
    assert events == []
    after = m.REGISTRY.get_sample_value("onesignal_bridge_outbox_unmapped_rows_total", {"table": "public.members"})
    assert after == before + 3
    warnings = [r.getMessage() for r in caplog.records if "no mapping names" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "public.members" in warnings[0] and "mappings[].table" in warnings[0] and "setup" in warnings[0]
