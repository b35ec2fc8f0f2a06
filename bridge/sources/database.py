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
import os
import secrets
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import psycopg

from bridge.config import redact_dsn
from bridge.errors import BridgeError, LeadershipLost, SourceSetupError, connection_hint, one_line
from bridge.lease import Lease
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
            if isinstance(exc, LeadershipLost) or (isinstance(exc, BridgeError) and not exc.retriable):
                # LeadershipLost: for the runner (abandon, start over); SourceSetupError, ConfigError:
                raise  # for the operator, not for a retry
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


def lease_for(source: Any, request_timeout_s: float) -> Lease:
    """The leader lease of a `postgres` or `outbox` source configuration."""
    wait = source.takeover_wait_s
    return Lease(source.leader_lease_s, source.leader_lease_s + request_timeout_s if wait is None else wait)


LEADERS = "onesignal_bridge.leaders"
_TAKE_EPOCH = (
    f"INSERT INTO {LEADERS} AS l (lock_name, epoch, clean, holder) VALUES (%s, 1, false, %s)"
    " ON CONFLICT (lock_name) DO UPDATE SET epoch = l.epoch + 1, clean = false, holder = EXCLUDED.holder,"
    " updated_at = now() RETURNING epoch"
)


class Leadership:
    """One streaming replica per lock: `elect(conn)` takes a session-level advisory lock on `conn`
    (it goes away with the session, so a dead leader frees it); the other replicas wait as hot
    standbys (`standby` true, the standby gauge 1), retrying every `poll_s`, until they get it.
    `lock_sql` is the `pg_try_advisory_lock(...)` query of the kind: never change a kind's lock
    key, or two versions of the bridge would both lead during a rolling upgrade.

    Fencing (`bridge.lease`): `lease` says when this replica may send; `keep(conn)` renews it while
    the session holding the lock answers. Each replica that takes the lock starts a new epoch in
    `onesignal_bridge.leaders` (row `key`), written under the lock; a leader that stops with every
    request answered marks its epoch clean (`hand_over`). Taking the lock, a replica
    - finds no row (the stream's first leader) or a clean epoch: it sends at once;
    - finds another replica's epoch that did not end cleanly (a crash, a partition, a database
      restart): it waits the lease's takeover time before its first request;
    - finds an epoch other than its own after it led: another replica led in between, so what this
      one still holds is older than what that one sent: `LeadershipLost` (the runner abandons it).
    A replica that led and finds the lock held by another raises `LeadershipLost` as well."""

    def __init__(self, lock_sql: str, lock_args: tuple[Any, ...], what: str, poll_s: float,
                 log: logging.Logger, lease: Lease | None = None, key: str = "") -> None:
        self.lock_sql, self.lock_args, self.what, self.poll_s, self.log = lock_sql, lock_args, what, poll_s, log
        self.key = key or what
        self.lease = lease or Lease()
        self.standby = False
        self.epoch: int | None = None  # the epoch this replica started when it last took the lock
        # who started it: host, pid and a random token per epoch, compared with the epoch (a counter
        # alone could be written again by another replica after a database lost its last writes)
        self.holder = ""
        self._keeping = asyncio.Event()  # set: `keep` stops

    @property
    def led(self) -> bool:
        """This replica held the lock at some point."""
        return self.epoch is not None

    def _lost(self) -> LeadershipLost:
        return LeadershipLost(
            f"this replica lost the lock for {self.what} (its database session ended) and another replica "
            "led since: what this replica had not yet sent is abandoned (the leader re-reads it from the "
            "database); starting over")

    async def elect(self, conn: psycopg.AsyncConnection[Any], stop: asyncio.Event) -> bool:
        """True once `conn` holds the lock; False when `stop` was set while waiting."""
        waited = False
        clock = self.lease.clock
        while not stop.is_set():
            started = clock()
            cur = await conn.execute(self.lock_sql, self.lock_args)
            row = await cur.fetchone()
            if row and row[0]:
                await self._take(conn, started, waited)
                return True
            if self.led and not self._mine(await self._last(conn)):
                raise self._lost()  # another replica took it over: what this one holds is stale
            # (Still this replica's epoch: the holder may be its own old session, which the server
            # has not dropped yet, or a replica that has only just taken it; look again.)
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

    async def _last(self, conn: psycopg.AsyncConnection[Any]) -> tuple[int, bool, str] | None:
        """The lock's last epoch: (epoch, clean, holder), None when no replica recorded one."""
        cur = await conn.execute(f"SELECT epoch, clean, holder FROM {LEADERS} WHERE lock_name = %s", (self.key,))
        row = await cur.fetchone()
        return None if row is None else (int(row[0]), bool(row[1]), str(row[2]))

    def _mine(self, last: tuple[int, bool, str] | None) -> bool:
        return last is not None and (last[0], last[2]) == (self.epoch, self.holder)

    async def _take(self, conn: psycopg.AsyncConnection[Any], started: float, waited: bool) -> None:
        """The lock is held: read how the previous epoch ended, start this replica's, open the lease."""
        last = await self._last(conn)
        if self.epoch is not None and not self._mine(last):
            await conn.execute("SELECT pg_advisory_unlock_all()")  # the next generation takes it again
            raise self._lost()
        if last is None:
            # No epoch yet: the stream's first leader, unless the lock was held when this replica
            # came (a bridge from before schema version 3, during the upgrade to it): then wait.
            took_over = waited
        else:
            took_over = self.epoch is None and not last[1]
        holder = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(6)}"
        cur = await conn.execute(_TAKE_EPOCH, (self.key, holder))
        got = await cur.fetchone()
        assert got is not None  # INSERT ... RETURNING always returns the row
        self.epoch, self.holder = int(got[0]), holder
        self.standby = False
        m.STANDBY.set(0)
        wait = self.lease.acquired(started, took_over)
        if wait > 0:  # a takeover, or its wait still running when this replica took the lock again
            self.log.warning("this replica now holds the lock for %s: taking over; sending to OneSignal starts "
                             "in %.0fs (the previous leader did not stop cleanly and its requests may still be "
                             "in flight: source.takeover_wait_s)", self.what, wait)
        elif waited:
            self.log.warning("this replica now holds the lock for %s: taking over (the previous leader stopped "
                             "with nothing in flight)", self.what)

    async def keep(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Renew the lease while `conn` (the session holding the lock, used for nothing else) answers;
        raise when it fails. Runs beside the leader's work until `stop_keeping` (which lets a query
        in progress finish, so `conn` can still record a clean stop) or until cancelled."""
        clock = self.lease.clock
        every = max(0.05, self.lease.lease_s / 4)
        stop = self._keeping = asyncio.Event()
        while not stop.is_set():
            started = clock()
            await conn.execute("SELECT 1")
            self.lease.renew(started)
            try:
                await asyncio.wait_for(stop.wait(), every)
            except TimeoutError:
                pass

    async def lead(self, conn: psycopg.AsyncConnection[Any], body: Awaitable[None],
                   stopping: Callable[[], bool], idle: Callable[[], bool]) -> None:
        """Run `body` (the leader's work) while `conn` holds the lock, renewing the lease beside it
        from the start; when the lock's session fails, `body` is cancelled and the failure raised.
        When `body` returns because the source is `stopping`, the stop is recorded clean if `idle`
        (every request answered). Then the lease ends and `conn` is closed (the lock goes)."""
        keep = asyncio.create_task(self.keep(conn))
        work = asyncio.ensure_future(body)
        try:
            await asyncio.wait({keep, work}, return_when=asyncio.FIRST_COMPLETED)
            if work.done():
                work.result()
                if stopping():
                    await self.stop_keeping(keep)
                    await self.hand_over(conn, idle())
                return
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
            keep.result()  # raises what ended the lock's session
        finally:
            for t in (keep, work):
                t.cancel()
            await asyncio.gather(keep, work, return_exceptions=True)
            self.released()
            await conn.close()

    async def stop_keeping(self, task: asyncio.Task[None]) -> None:
        """End `keep` (its task) between two queries; cancel it if its query does not come back."""
        self._keeping.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), self.lease.lease_s)
        except Exception:  # noqa: BLE001 - the session failed or hangs: no clean stop on it anyway
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    def released(self) -> None:
        """The session that held the lock is being closed (or failed): another replica may take the
        lock from now on, so nothing more leaves from here until this one holds it again."""
        self.lease.end()

    async def hand_over(self, conn: psycopg.AsyncConnection[Any], idle: bool) -> None:
        """Stop leading; when `idle` (every request answered), mark this replica's epoch clean, so
        the next leader need not wait out its requests (call it last, then close `conn`, which frees
        the lock). Not while its own takeover wait runs (its predecessor's requests may still be in
        flight), nor when `conn` cannot carry it: the next leader then waits (logged)."""
        still_waiting = self.lease.waiting()  # its predecessor's requests may still be in flight
        self.lease.end()  # nothing more leaves from here
        if self.epoch is None:
            return
        why = ("requests were still unanswered" if not idle
               else "its own takeover wait had not ended" if still_waiting
               else "the lock's session was busy" if conn.pgconn.transaction_status != psycopg.pq.TransactionStatus.IDLE
               else "")
        if not why:
            try:
                await conn.execute(f"UPDATE {LEADERS} SET clean = true, updated_at = now()"
                                   " WHERE lock_name = %s AND epoch = %s", (self.key, self.epoch))
                return
            except psycopg.Error as exc:
                why = f"the database refused it: {clean(exc)}"
        self.log.info("not recorded as a clean stop (%s): the next leader waits source.takeover_wait_s "
                      "before sending", why)
