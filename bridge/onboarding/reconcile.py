"""`onesignal-bridge reconcile` and continuous reconcile in `run`: does OneSignal still hold what
the database implies, and if not, send the database state again.

What counts (`compare`): only what the mapping owns, for the tables that have rows for the user.

- every mapped tag: the database value, or absent where the column is NULL (a tag the mapping
  does not name, set by an app SDK or the dashboard, is not drift and is never removed);
- every mapped property with a value (a NULL property is never sent, so never owned);
- every mapped alias with a value;
- every mapped email/SMS address: a subscription with that address (and, when consent is
  mapped, that opt-in). Other subscriptions (push, addresses other writers added) are not drift;
- a user OneSignal does not have at all.

Repairs (`--repair`, and `reconcile.repair` in `run`) build one `UserChange` with the user's
whole database state and hand it to a `Dispatcher`, the normal delivery path: the app-wide and
per-user rate limits, retries, the request planner, dead letters for what OneSignal refuses.
What the dispatcher remembers is corrected first where the comparison proved it wrong: a user
OneSignal no longer has is forgotten (so it is created again with everything), a subscription
OneSignal no longer has is forgotten (so it is created again), one whose opt-in differs is
recorded with OneSignal's opt-in (so it is updated).

Reading OneSignal (`readers.py`): View user is about 1 request/s per app, so `--sample N` and
`--all` up to `AUTO_VIEW_MAX` users use it (a few minutes); a larger `--all` asks for OneSignal's
CSV export (one request, a file after a few minutes, about 2,000 records/s) and compares what its
columns carry (tags, language, time zone, country, email and SMS subscriptions); users without a
subscription are not in the export and are read by View user. `--read` forces one way.

In `run` (`attach`), every `reconcile.interval_s` a sample of `reconcile.sample` users is
compared by View user; users the stream changed within `reconcile.settle_s` (before the database
read or since) are skipped (OneSignal applies writes asynchronously, and a repair must never
overtake a newer change of the stream); a replica that is not streaming (hot standby) does not
sample, nor does any replica while the initial snapshot of its slot is still being sent.
Metrics: `onesignal_bridge_drift_users` (drifted in the last sample),
`onesignal_bridge_drift_checked_total`, `onesignal_bridge_drift_repaired_total`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import shutil
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import orjson
import psycopg

from bridge.config import Config
from bridge.deadletter import DeadLetter, DeadLetterStore
from bridge.dispatch import Dispatcher
from bridge.events import UserChange, UserRef
from bridge.observability import metrics as m
from bridge.onboarding.desired import Desired, Store, collect, desired_for, sample_users, table_order
from bridge.onboarding.readers import EXPORT_COVERS, ViewReader, export_csv, merge_rows, parse_export
from bridge.onesignal.client import OneSignalClient, build_http_client
from bridge.plan import SUBSCRIPTION_TYPES, answered_enabled
from bridge.ports import DoneCallback, Output
from bridge.sources import registry
from bridge.subscriptions import KnownSubscription, SubscriptionState

log = logging.getLogger("bridge.reconcile")

AUTO_VIEW_MAX = 600  # --all up to this many users reads by View user (10 minutes at 1/s)
POSITION = "reconcile"
_MISSING = "(missing)"


@dataclass(frozen=True)
class Difference:
    field: str
    database: Any
    onesignal: Any

    def json(self) -> dict[str, Any]:
        return {"field": self.field, "database": self.database, "onesignal": self.onesignal}


def _same(want: Any, have: Any) -> bool:
    if isinstance(want, (int, float)) and not isinstance(want, bool):
        try:
            return have is not None and math.isclose(float(want), float(have), rel_tol=0, abs_tol=1e-6)
        except (TypeError, ValueError):
            return False
    return bool(want == have)


def compare(d: Desired, actual: dict[str, Any] | None, covers: Iterable[str] | None = None) -> list[Difference]:
    """What differs between the database's `d` and OneSignal's `actual` (View user shape; None:
    OneSignal has no such user). `covers`: the fields `actual` can show (an export row); None: all."""
    scope = None if covers is None else set(covers)
    if actual is None:
        return [Difference("user", "present", None)]
    props = actual.get("properties") if isinstance(actual.get("properties"), dict) else {}
    assert isinstance(props, dict)
    tags = props.get("tags") if isinstance(props.get("tags"), dict) else {}
    assert isinstance(tags, dict)
    out: list[Difference] = []
    if scope is None or "tags" in scope:
        for key, want in sorted(d.tags.items()):
            have = tags.get(key)
            have = None if have in (None, "") else str(have)
            if want != have:
                out.append(Difference(f"tags.{key}", want, have))
    for key, want in sorted(d.properties.items()):
        if scope is not None and key not in scope:
            continue
        if not _same(want, props.get(key)):
            out.append(Difference(f"properties.{key}", want, props.get(key)))
    if scope is None:
        identity = actual.get("identity") if isinstance(actual.get("identity"), dict) else {}
        assert isinstance(identity, dict)
        for label, want_alias in sorted(d.aliases.items()):
            if want_alias is not None and identity.get(label) != want_alias:
                out.append(Difference(f"aliases.{label}", want_alias, identity.get(label)))
    if scope is None or "subscriptions" in scope:
        subs = [s for s in actual.get("subscriptions") or [] if isinstance(s, dict)]
        for channel, sc in sorted(d.subscriptions.items()):
            if sc.token is None:
                continue
            kind = SUBSCRIPTION_TYPES[channel]
            same_kind = [s for s in subs if s.get("type") == kind]
            hit = next((s for s in same_kind if s.get("token") == sc.token), None)
            if hit is None:
                held = sorted(str(s.get("token")) for s in same_kind) or None
                out.append(Difference(f"subscriptions.{channel}", sc.token, held))
            elif sc.enabled is not None and answered_enabled(hit) != sc.enabled:
                out.append(Difference(f"subscriptions.{channel}.enabled", sc.enabled, answered_enabled(hit)))
    return out


def _subscription(actual: dict[str, Any], channel: str, token: str) -> dict[str, Any] | None:
    for s in actual.get("subscriptions") or []:
        if isinstance(s, dict) and s.get("type") == SUBSCRIPTION_TYPES[channel] and s.get("token") == token:
            return s
    return None


async def correct_memory(dispatcher: Any, state: SubscriptionState, d: Desired, actual: dict[str, Any] | None) -> None:
    """Before a repair: make what the delivery path remembers agree with what OneSignal showed."""
    owner = str(d.user)
    if actual is None:
        known = getattr(dispatcher, "users", None)  # the dispatcher's KnownUsers, where it has them
        if known is not None:
            known.forget(d.user)
        await state.forget_owner(owner)
        return
    for channel, sc in d.subscriptions.items():
        if sc.token is None:
            continue
        hit = _subscription(actual, channel, sc.token)
        if hit is None:
            await state.forget(channel, sc.token)
        elif hit.get("id"):
            await state.record(KnownSubscription(channel, sc.token, owner, str(hit["id"]), answered_enabled(hit)))


@dataclass
class Drift:
    desired: Desired
    differences: list[Difference]
    actual: dict[str, Any] | None

    def json(self) -> dict[str, Any]:
        return {"user": str(self.desired.user), "fields": [x.json() for x in self.differences]}


@dataclass
class Report:
    read: str
    checked: int = 0
    drift: list[Drift] = field(default_factory=list)
    repaired: int | None = None
    dead_lettered: int = 0

    def json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"checked": self.checked, "drifted": len(self.drift),
                               "users": [x.json() for x in self.drift], "read": self.read}
        if self.repaired is not None:
            out.update(repaired=self.repaired, dead_lettered=self.dead_lettered)
        return out

    def text(self) -> str:
        how = {"view": "View user", "export": "OneSignal's CSV export (View user for users not in it)"}[self.read]
        lines = [f"checked {self.checked} user(s) by {how}: {len(self.drift)} drifted"]
        for x in self.drift:
            lines += [f"  {x.desired.user}: {described(diff)}" for diff in x.differences]
        if self.repaired is not None:
            lines.append(f"repaired {self.repaired} user(s) through the normal delivery path"
                         + (f" ({self.dead_lettered} dead letter(s): `dlq list`)" if self.dead_lettered else ""))
        return "\n".join(lines)


def _shown(v: Any) -> str:
    return "(none)" if v is None else repr(v)


def described(diff: Difference) -> str:
    if diff.field == "user":
        return "OneSignal has no such user"
    return f"{diff.field}: database {_shown(diff.database)}, OneSignal {_shown(diff.onesignal)}"


# -- the command ---------------------------------------------------------------------------------


def _read_desired(dsn: str, config: Config, users: list[UserRef]) -> dict[UserRef, Desired]:
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        conn.read_only = True
        return desired_for(conn, config, users)


def _sample(dsn: str, config: Config, n: int) -> dict[UserRef, Desired]:
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        conn.read_only = True
        users = sample_users(conn, config, n)
        conn.rollback()
        return desired_for(conn, config, users)


class _Progress:
    def __init__(self, total: int) -> None:
        self.total, self.done, self.last = total, 0, time.monotonic()

    def step(self) -> None:
        self.done += 1
        if time.monotonic() - self.last >= 10 and sys.stderr.isatty():
            self.last = time.monotonic()
            print(f"reconcile: {self.done}/{self.total} users checked", file=sys.stderr, flush=True)


async def _by_view(view: ViewReader, users: Iterable[Desired], report: Report, total: int) -> None:
    progress = _Progress(total)
    for d in users:
        actual = await view.get(d.user)
        report.checked += 1
        diffs = compare(d, actual)
        if diffs:
            report.drift.append(Drift(d, diffs, actual))
        progress.step()


def _load_export(store: Store, path: Any) -> None:
    db = store.db
    db.execute("CREATE TABLE actual (uid TEXT, data BLOB)")
    batch: list[tuple[str, bytes]] = []
    for ext, user in parse_export(path):
        batch.append((ext, orjson.dumps(user)))
        if len(batch) >= 10_000:
            db.executemany("INSERT INTO actual VALUES (?, ?)", batch)
            batch.clear()
    db.executemany("INSERT INTO actual VALUES (?, ?)", batch)
    db.execute("CREATE INDEX actual_uid ON actual (uid)")


def _exported(store: Store, uid: str) -> dict[str, Any] | None:
    rows = [orjson.loads(r[0]) for r in store.db.execute("SELECT data FROM actual WHERE uid = ?", (uid,))]
    return merge_rows(rows) if rows else None


async def _check(config: Config, dsn: str, client: OneSignalClient, http: Any, sample: int | None, read: str,
                 export_timeout: float) -> Report:
    view = ViewReader(client, config.reconcile.view_requests_per_second)
    if sample is not None:
        found = await asyncio.to_thread(_sample, dsn, config, sample)
        report = Report("export" if read == "export" else "view")
        if read != "export":
            await _by_view(view, found.values(), report, len(found))
            return report
        return await _by_export(config, client, http, view, found.values(), len(found), report, export_timeout,
                                None)
    store = Store(table_order(config))
    try:
        def read_all() -> int:
            with psycopg.connect(dsn, connect_timeout=10) as conn:
                conn.read_only = True
                conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
                collect(conn, config, store, lambda r: None)  # rejected rows are `run`'s dead letters
            return sum(1 for _ in store.db.execute("SELECT DISTINCT label, uid FROM changes"))

        total = await asyncio.to_thread(read_all)
        mode = read if read != "auto" else ("view" if total <= AUTO_VIEW_MAX else "export")
        report = Report(mode)
        if mode == "view":
            await _by_view(view, store.users(), report, total)
            return report
        return await _by_export(config, client, http, view, store.users(), total, report, export_timeout, store)
    finally:
        store.close()


async def _by_export(config: Config, client: OneSignalClient, http: Any, view: ViewReader,
                     users: Iterable[Desired], total: int, report: Report, timeout: float,
                     store: Store | None) -> Report:
    path = await export_csv(http, config.onesignal.app_id, config.onesignal.api_key.get_secret_value(), timeout)
    own = store is None
    holder = store or Store(table_order(config))
    try:
        await asyncio.to_thread(_load_export, holder, path)
        progress = _Progress(total)
        for d in users:
            actual = _exported(holder, d.user.id) if d.user.label == "external_id" else None
            if actual is None:  # no subscription (not in the export) or another identity label: View user
                actual = await view.get(d.user)
                diffs = compare(d, actual)
            else:
                diffs = compare(d, actual, EXPORT_COVERS)
            report.checked += 1
            if diffs:
                report.drift.append(Drift(d, diffs, actual))
            progress.step()
    finally:
        shutil.rmtree(path.parent, ignore_errors=True)
        if own:
            holder.close()
    return report


class _CountingLetters:
    def __init__(self, inner: DeadLetterStore) -> None:
        self.inner, self.count = inner, 0

    async def put(self, letters: list[DeadLetter]) -> None:
        await self.inner.put(letters)
        self.count += len(letters)


async def _repair(config: Config, dsn: str, client: OneSignalClient, report: Report) -> None:
    kind = registry.for_config(config)
    letters = _CountingLetters(kind.dead_letters(config, cast(Any, None)))  # database kinds ignore the source
    state = kind.subscription_state(config)
    done: set[int] = set()
    dispatcher = Dispatcher(client, config.delivery, letters, done.update, subscriptions=state,
                            onesignal=config.onesignal)
    task = asyncio.create_task(dispatcher.run())
    try:
        # Read again right before sending: a change committed since the comparison is not undone.
        fresh = await asyncio.to_thread(_read_desired, dsn, config, [x.desired.user for x in report.drift])
        sent = 0
        for seq, drift in enumerate(report.drift):
            d = fresh.get(drift.desired.user)
            if d is None:
                continue  # its rows are gone since: nothing left to send
            await correct_memory(dispatcher, state, d, drift.actual)
            await dispatcher.wait_for_room()
            dispatcher.submit(d.change(seq, POSITION))
            sent += 1
        budget = 120.0 + 3.0 * sent / config.delivery.app_requests_per_second + 3.0 * sent / 100
        await dispatcher.flush_all(budget)
        await dispatcher.drain(5.0)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        for store in (letters.inner, state):
            close = getattr(store, "close", None)
            if close is not None:
                await close()
    report.repaired = len(done)
    report.dead_lettered = letters.count


async def _main(config: Config, dsn: str, sample: int | None, repair: bool, read: str,
                export_timeout: float) -> Report:
    http = build_http_client(config.onesignal.base_url, config.onesignal.request_timeout_s)
    client = OneSignalClient(http, config.onesignal.app_id, config.onesignal.api_key.get_secret_value())
    try:
        report = await _check(config, dsn, client, http, sample, read, export_timeout)
        if repair and report.drift:
            await _repair(config, dsn, client, report)
        elif repair:
            report.repaired = 0
        return report
    finally:
        await http.aclose()


def run_command(config: Config, dsn: str, *, sample: int | None, repair: bool, fmt: str, read: str,
                export_timeout: float) -> int:
    """Exit 0: no drift, or every drifted user repaired; 1: drift left (or a repair not done)."""
    report = asyncio.run(_main(config, dsn, sample, repair, read, export_timeout))
    print(orjson.dumps(report.json(), option=orjson.OPT_INDENT_2).decode() if fmt == "json" else report.text())
    if not report.drift:
        return 0
    return 0 if repair and report.repaired == len(report.drift) and not report.dead_lettered else 1


# -- continuous reconcile in `run` -------------------------------------------------------------


class WatchedOutput:
    """The pipeline's output with a memory of when the stream last submitted a change per user
    (bounded: only the last `keep_s` seconds are kept)."""

    def __init__(self, inner: Output, keep_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.inner, self.keep_s, self.clock = inner, keep_s, clock
        self._touched: OrderedDict[UserRef, float] = OrderedDict()

    def touched_since(self, user: UserRef, since: float) -> bool:
        at = self._touched.get(user)
        return at is not None and at >= since

    def _forget_old(self, now: float) -> None:
        while self._touched:
            user, at = next(iter(self._touched.items()))
            if now - at <= self.keep_s:
                break
            del self._touched[user]

    # -- bridge.ports.Output ------------------------------------------------------------------

    @property
    def auth_error(self) -> Exception | None:
        return self.inner.auth_error

    def _touch(self, user: UserRef) -> None:
        now = self.clock()
        self._touched[user] = now
        self._touched.move_to_end(user)
        self._forget_old(now)

    def submit(self, change: UserChange) -> None:
        self._touch(change.user)
        self.inner.submit(change)

    def submit_quiet(self, change: UserChange) -> None:
        """The output's quiet submit (no wake-up per change, one `settle()` after a batch), where
        the output has one; else its plain submit."""
        self._touch(change.user)
        quiet = getattr(self.inner, "submit_quiet", None)
        (quiet or self.inner.submit)(change)

    def settle(self) -> None:
        settle = getattr(self.inner, "settle", None)
        if settle is not None:
            settle()

    def has_room(self) -> bool:
        return self.inner.has_room()

    async def wait_for_room(self) -> None:
        await self.inner.wait_for_room()

    async def dead_letter(self, letters: list[DeadLetter]) -> None:
        await self.inner.dead_letter(letters)

    async def run(self) -> None:
        await self.inner.run()

    async def flush_all(self, timeout: float) -> bool:
        return await self.inner.flush_all(timeout)

    async def drain(self, timeout: float) -> None:
        await self.inner.drain(timeout)

    @property
    def pending(self) -> int:
        return self.inner.pending


class ContinuousReconcile:
    """Samples users every `reconcile.interval_s`, exports the drift metrics, repairs.

    Built before the pipeline: `outputs(make_output)` is the factory the pipeline builds its
    output with (the output is watched from the start, and told the tokens of repairs apart), and
    `run(pipeline)` samples until cancelled."""

    def __init__(self, config: Config, client: OneSignalClient, dsn: str, active: Callable[[], bool]) -> None:
        self.config, self.dsn, self.active = config, dsn, active
        self.cfg = config.reconcile
        self.view = ViewReader(client, self.cfg.view_requests_per_second)
        self.tokens: set[int] = set()
        self.pipeline: Any = None
        self.inner: Any = None  # the pipeline's output (the Dispatcher): repairs go to it directly
        self.output: WatchedOutput | None = None

    def outputs(self, make_output: Callable[[DoneCallback], Output]) -> Callable[[DoneCallback], Output]:
        """`make_output` wrapped: the stream's changes pass the watch; finished repairs are counted."""
        def make(done: DoneCallback) -> Output:
            def counted(tokens: Iterable[int]) -> None:
                if self.tokens:
                    tokens = list(tokens)
                    mine = [t for t in tokens if t in self.tokens]
                    if mine:
                        m.DRIFT_REPAIRED.inc(len(mine))
                        self.tokens.difference_update(mine)
                done(tokens)

            self.inner = make_output(counted)
            self.output = WatchedOutput(self.inner, max(self.cfg.settle_s, 1.0) * 2 + 60.0)
            return self.output
        return make

    async def run(self, pipeline: Any) -> None:
        if self.output is None:
            raise RuntimeError("continuous reconcile: build the pipeline's output with outputs() first")
        self.pipeline = pipeline
        interval = self.cfg.interval_s or 60.0
        log.info("continuous reconcile: %d user(s) every %.0fs by View user (%.2g/s)%s", self.cfg.sample, interval,
                 self.cfg.view_requests_per_second, ", repairing drift" if self.cfg.repair else "")
        while True:
            started = time.monotonic()
            if self.active() and self.inner.auth_error is None:
                try:
                    await self.sample_once()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # a sample is best effort: the next one tries again
                    log.warning("continuous reconcile: sample failed (%s: %s); next in %.0fs",
                                type(exc).__name__, exc, interval)
            await asyncio.sleep(max(1.0, interval - (time.monotonic() - started)))

    def _snapshot_running(self) -> bool:
        """The initial snapshot is still sending the tables: users it has not reached yet would all
        look missing (and be sent twice)."""
        slot = getattr(self.config.source, "slot", None)
        if slot is None:
            return False
        with psycopg.connect(self.dsn, autocommit=True, connect_timeout=10) as conn:
            row = conn.execute("SELECT count(*) FROM onesignal_bridge.snapshot_progress WHERE slot = %s"
                               " AND NOT done", (slot,)).fetchone()
        return bool(row and row[0])

    async def sample_once(self) -> None:
        settle = self.cfg.settle_s
        watch = self.output
        assert watch is not None
        if await asyncio.to_thread(self._snapshot_running):
            log.info("continuous reconcile: the initial snapshot is still running; no sample until it is done")
            return
        read_at = time.monotonic()
        found = await asyncio.to_thread(_sample, self.dsn, self.config, self.cfg.sample)
        drifted = 0
        for user, d in found.items():
            if watch.touched_since(user, read_at - settle):
                continue  # changed by the stream lately: OneSignal may not show it yet
            actual = await self.view.get(user)
            if watch.touched_since(user, read_at - settle):
                continue
            m.DRIFT_CHECKED.inc()
            diffs = compare(d, actual)
            if not diffs:
                continue
            drifted += 1
            log.info("drift: %s: %s", user, "; ".join(described(x) for x in diffs[:5]))
            if self.cfg.repair:
                await self._repair(d, actual, read_at - settle)
        m.DRIFT_USERS.set(drifted)

    async def _repair(self, d: Desired, actual: dict[str, Any] | None, since: float) -> None:
        inner = self.inner
        state = getattr(inner, "subscriptions", None)
        if state is not None:
            await correct_memory(inner, state, d, actual)
        await inner.wait_for_room()
        if self.output is not None and self.output.touched_since(d.user, since):
            return  # the stream has a newer change for this user: it wins
        seq = self.pipeline.watermark.issue()
        self.tokens.add(seq)
        inner.submit(d.change(seq, POSITION))  # no await since the check: nothing can come between


def attach(config: Config, client: OneSignalClient, dsn: str | None,
           active: Callable[[], bool]) -> ContinuousReconcile | None:
    """Continuous reconcile for `run`, when `reconcile.interval_s` is set (else None): build the
    pipeline's output with `outputs(...)`, then start `run(pipeline)`."""
    if config.reconcile.interval_s is None:
        return None
    if dsn is None:
        log.warning("reconcile.interval_s is set but source.kind %s names no database to compare with: "
                    "continuous reconcile is off", config.source.kind)
        return None
    return ContinuousReconcile(config, client, dsn, active)
