"""What the kinds that read the application's Postgres share (`postgres`, `outbox`).

- The bridge's own tables live in that database: dead letters and learned subscription ids.
- `check` connects once and reports a connection that fails on one scrubbed line with its fix.
- The streaming loop of both sources: reconnect with capped exponential backoff, leader
  election on a session-level advisory lock (the other replicas wait as hot standbys), and error
  text without connection strings.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import psycopg

from bridge.config import redact_dsn
from bridge.errors import BridgeError, SourceSetupError, connection_hint, one_line
from bridge.observability import metrics as m
from bridge.observability.logging import dsn_secrets, mask_secrets
from bridge.ports import Finding

if TYPE_CHECKING:
    from bridge.config import Config
    from bridge.deadletter import DeadLetterStore
    from bridge.ports import Source
    from bridge.subscriptions import SubscriptionState

RECONNECT_MAX_S = 30.0
STANDBY_POLL_S = 1.0


class DatabaseKind:
    """Base of the kinds whose configuration has a `dsn`: the bridge's tables are there."""

    def database_dsn(self, config: Config) -> str | None:
        dsn: str = config.source.dsn.get_secret_value()  # type: ignore[union-attr]  # every database kind has one
        return dsn

    def dead_letters(self, config: Config, source: Source) -> DeadLetterStore:
        from bridge.deadletter import PostgresDeadLetters

        return PostgresDeadLetters(self.database_dsn(config) or "")

    def subscription_state(self, config: Config) -> SubscriptionState:
        from bridge.subscriptions import PostgresSubscriptionState

        return PostgresSubscriptionState(self.database_dsn(config) or "")


def connect_for_check(dsn: str) -> tuple[psycopg.Connection[Any] | None, Finding]:
    """A connection for `check`, and the finding that says so (or why not, with the fix). The
    DSN and libpq's message are scrubbed of every spelling of the password."""
    try:
        conn = psycopg.connect(dsn, autocommit=True, connect_timeout=5)
    except psycopg.Error as exc:
        text = str(exc).strip() or type(exc).__name__
        detail = one_line(text.removeprefix("connection failed: "))
        detail = redact_dsn(mask_secrets(detail, dsn_secrets(dsn)))
        return None, Finding(False, f"cannot connect to Postgres at {redact_dsn(dsn)}: {detail}",
                             connection_hint(text, dsn))
    return conn, Finding(True, f"connected to Postgres at {redact_dsn(dsn)}")


def clean(exc: BaseException) -> str:
    """An exception as text without connection strings (which may carry passwords)."""
    text = str(exc).strip()
    return redact_dsn(text.splitlines()[0] if text else type(exc).__name__)


async def reconnecting(session: Callable[[], Awaitable[None]], stop: asyncio.Event, what: str,
                       log: logging.Logger, on_lost: Callable[[BaseException], bool] | None = None,
                       fatal: Callable[[BaseException], SourceSetupError | None] | None = None) -> None:
    """Run `session()` until it returns or `stop` is set; after a connection error wait (capped
    exponential backoff, reset once a session got going: `on_lost` may say so) and run it again.
    `SourceSetupError` (and what `fatal` turns into one) is for the operator: it ends the loop."""
    attempt = 0
    while not stop.is_set():
        try:
            await session()
        except (psycopg.Error, BridgeError, OSError) as exc:
            if isinstance(exc, BridgeError) and not exc.retriable:
                raise  # SourceSetupError, ConfigError: for the operator, not for a retry
            setup_problem = fatal(exc) if fatal is not None else None
            if setup_problem is not None:
                raise setup_problem from None
            if on_lost is not None and on_lost(exc):
                attempt = 0  # it worked until now: retry quickly
            delay = min(RECONNECT_MAX_S, 0.5 * 2 ** min(attempt, 6))
            attempt += 1
            if isinstance(exc, psycopg.errors.InsufficientPrivilege):
                log.error("%s: the bridge's role lacks a privilege; grant it (`onesignal-bridge check` names "
                          "what is missing); retrying in %.0fs", clean(exc), delay)
            else:
                log.warning("%s lost (%s); reconnecting in %.1fs", what, clean(exc), delay)
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except TimeoutError:
                pass
        else:
            return


class Leadership:
    """One streaming replica per lock: `elect(conn)` takes a session-level advisory lock on `conn`
    (it goes away with the session, so a dead leader frees it); the other replicas wait as hot
    standbys (`standby` true, the standby gauge 1), retrying every `poll_s`, until they get it.
    `lock_sql` is the `pg_try_advisory_lock(...)` query of the kind: never change a kind's lock
    key, or two versions of the bridge would both lead during a rolling upgrade."""

    def __init__(self, lock_sql: str, lock_args: tuple[Any, ...], what: str, poll_s: float,
                 log: logging.Logger) -> None:
        self.lock_sql, self.lock_args, self.what, self.poll_s, self.log = lock_sql, lock_args, what, poll_s, log
        self.standby = False

    async def elect(self, conn: psycopg.AsyncConnection[Any], stop: asyncio.Event) -> bool:
        """True once `conn` holds the lock; False when `stop` was set while waiting."""
        waited = False
        while not stop.is_set():
            cur = await conn.execute(self.lock_sql, self.lock_args)
            row = await cur.fetchone()
            if row and row[0]:
                self.standby = False
                m.STANDBY.set(0)
                if waited:
                    self.log.warning("this replica now holds the lock for %s: taking over", self.what)
                return True
            if not waited:
                self.log.info("another replica streams %s; waiting as a hot standby", self.what)
                waited = True
            self.standby = True
            m.STANDBY.set(1)
            try:
                await asyncio.wait_for(stop.wait(), self.poll_s)
            except TimeoutError:
                pass
        return False
