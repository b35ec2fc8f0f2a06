"""Dispatcher: the asyncio shell around the coalescer that sends due users' batches to OneSignal.

- App-wide budget (`delivery.app_requests_per_second`): a window of answered requests that no
  server-side second can exceed whatever the queueing (`AnsweredWindow`), and a token bucket that
  paces; per-user spacing (1 request/s from the previous answer, kept by the coalescer's schedule
  and between the requests of one batch); a cap on in-flight requests.
- 429: the user waits at least `Retry-After` (without the header: 1 s doubling per attempt, at most
  60 s). 5xx, timeouts, connection errors: the batch goes back into the coalescer with exponential
  backoff and full jitter, with no limit in time, without blocking other users (less a Delete user
  it already did: the user it re-created is not deleted again). 400/409: the
  request is dead-lettered and the rest of the batch goes on. 401/403: dispatching stops
  (readiness false, the source is held back, nothing is confirmed) and one probe batch is retried
  every `AUTH_PROBE_S` until the key works again.
- OneSignal as it really behaves (docs/onesignal-semantics.md): a user the bridge knows to exist
  gets its tags and properties by Update user; when Create user's answer shows an existing user
  whose properties were not applied, they follow by Update user. A 404 for a user created or first
  seen within `onesignal.consistency_window_s` is replication lag: retried, never dead-lettered or
  taken as done; after creating a user, its next request waits `onesignal.post_create_delay_s`.
  The tag-limit 400 dead-letters only the tags the request added; the rest is sent again without
  them. Subscription consent is recorded as OneSignal answered it and corrected when it differs.
- A batch is *done* (its source positions may be confirmed) when every request succeeded or was
  dead-lettered.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any

from bridge.coalesce import Coalescer, UserBatch
from bridge.config import DeliveryConfig, OneSignalConfig
from bridge.deadletter import DeadLetter, DeadLetterStore
from bridge.events import UNCHANGED, UserChange, UserRef
from bridge.knownusers import KnownUsers
from bridge.observability import metrics as m
from bridge.onesignal import errors
from bridge.onesignal.client import OneSignalClient, Request, Response, requests
from bridge.onesignal.ratelimit import AnsweredWindow, TokenBucket
from bridge.plan import (
    SUBSCRIPTION_TYPES,
    answered_enabled,
    consent,
    plan,
    subscription_item,
    unapplied,
    without_tags,
)
from bridge.renames import RenameConflict, RenameSteps, rename_letter
from bridge.steps import After, Step, request_letter, tag_letter
from bridge.subscriptions import KnownSubscription, MemorySubscriptionState, SubscriptionState

log = logging.getLogger("bridge.dispatch")


BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 60.0
AUTH_PROBE_S = 5.0
LAG_BACKOFF_S = 1.0  # replication lag: retried after about 1, 2, 4, ... s (at most 60 s)
_ONESIGNAL_DEFAULTS = {k: OneSignalConfig.model_fields[k].default
                       for k in ("consistency_window_s", "post_create_delay_s")}
# The per-user interval is counted from when the previous response *arrived*: OneSignal received
# that request earlier still, so the gap it sees is never shorter than ours.
USER_SPACING_MARGIN_S = 0.02


def _rest(batch: UserBatch, deleted: bool) -> UserBatch:
    """What of `batch` a retry still has to do. Once its Delete user is done, the user must not be
    deleted again: by the time the retry runs, the user re-created by this batch may carry what
    the bridge did not create (a push subscription an app attached meanwhile). What follows a
    deletion then is a new user's: tag and alias removals have nothing left to remove."""
    if not (deleted and batch.delete_user):
        return batch
    return replace(batch, delete_user=False, recreate=False,
                   tags={k: v for k, v in batch.tags.items() if v is not None},
                   aliases={k: v for k, v in batch.aliases.items() if v is not None})


def backoff(attempt: int, rng: random.Random) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
    return rng.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * (2 ** min(attempt, 16))))


class Dispatcher(RenameSteps):
    def __init__(
        self,
        client: OneSignalClient,
        delivery: DeliveryConfig,
        dead_letters: DeadLetterStore,
        on_done: Callable[[Iterable[int]], None],
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        subscriptions: SubscriptionState | None = None,
        onesignal: OneSignalConfig | None = None,
        identity_conflicts: Mapping[str, str] | None = None,
    ) -> None:
        self.client = client
        # table -> mappings[].on_identity_conflict ("dead_letter" unless "merge")
        self.identity_conflicts: Mapping[str, str] = identity_conflicts or {}
        self.subscriptions: SubscriptionState = subscriptions or MemorySubscriptionState()
        self.delivery = delivery
        self.dead_letters = dead_letters
        self.on_done = on_done
        self.clock = clock
        self.rng = rng or random.Random()
        self.user_interval = 1.0 / delivery.user_requests_per_second + USER_SPACING_MARGIN_S
        self.coalescer = Coalescer(delivery.flush_interval_ms / 1000.0, self.user_interval,
                                   delivery.idle_debounce_ms / 1000.0)
        self.bucket = TokenBucket(delivery.app_requests_per_second)
        self.window = AnsweredWindow(max(1, int(delivery.app_requests_per_second)))
        self.slots = asyncio.Semaphore(delivery.max_in_flight)
        self.auth_error: errors.AuthError | None = None
        window = onesignal.consistency_window_s if onesignal else _ONESIGNAL_DEFAULTS["consistency_window_s"]
        self.post_create_delay: float = (onesignal.post_create_delay_s if onesignal
                                         else _ONESIGNAL_DEFAULTS["post_create_delay_s"])
        self.users = KnownUsers(window, clock())
        self._lagging: set[UserRef] = set()  # users waiting out OneSignal's replication lag
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._tasks: set[asyncio.Task[None]] = set()
        # tasks waiting out their user's spacing between two requests of a batch: they hold no
        # request slot, so they do not count against max_in_flight (a batch that needs a second
        # request a second or two later must not stall every other user)
        self._resting = 0
        self._stopping = False
        self._probe_at = 0.0

    # -- input side (called by the pipeline) -------------------------------------------

    def submit(self, change: UserChange) -> None:
        self.coalescer.add(change, self.clock())
        self.settle()

    # The pipeline's fast path (issue 16): many changes in one synchronous pass, then one
    # `settle()` before the event loop runs again (the dispatcher cannot run in between anyway).
    _coalesced_counted = 0

    def submit_quiet(self, change: UserChange) -> None:
        """`submit` without its metric update and wake-up: the caller calls `settle()` after the
        pass. `has_room()` stays exact (it reads the coalescer)."""
        self.coalescer.add(change, self.clock())

    def settle(self) -> None:
        """What `submit` does after each change, once for all the `submit_quiet` calls before."""
        coalesced = self.coalescer.coalesced
        if coalesced != self._coalesced_counted:
            m.COALESCED.inc(coalesced - self._coalesced_counted)
            self._coalesced_counted = coalesced
        self._update_room()
        self._wake.set()

    def has_room(self) -> bool:
        c = self.coalescer
        return (
            self.auth_error is None
            and c.pending_users + c.in_flight_users < self.delivery.max_pending_users
            and c.pending_bytes < self.delivery.max_pending_bytes
        )

    async def wait_for_room(self) -> None:
        if not self.has_room():
            m.BACKPRESSURE.inc()
        while not self.has_room():
            self._room.clear()
            await self._room.wait()

    def _update_room(self) -> None:
        c = self.coalescer
        m.PENDING_USERS.set(c.pending_users)
        m.PENDING_BYTES.set(c.pending_bytes)
        if self.has_room():
            self._room.set()

    @property
    def idle(self) -> bool:
        return not self._tasks and self.coalescer.pending_users == 0

    @property
    def pending(self) -> int:
        """Users held (waiting or in flight): what a shutdown now would leave unsent."""
        return self.coalescer.pending_users + self.coalescer.in_flight_users

    # -- the loop ------------------------------------------------------------------------

    async def run(self) -> None:
        next_forget = 0.0
        while not self._stopping:
            now = self.clock()
            free = self.delivery.max_in_flight - (len(self._tasks) - self._resting)
            if self.auth_error is not None:
                free = 1 if (not self._tasks and now >= self._probe_at) else 0
            if free > 0:
                batches = self.coalescer.take_due(now, free)
                for batch in batches:
                    task = asyncio.create_task(self._deliver(batch))
                    self._tasks.add(task)
                    task.add_done_callback(self._task_done)
                free -= len(batches)
                self._update_room()
            if free <= 0 and self._tasks:
                timeout: float | None = None  # a finishing task wakes us
            elif self.auth_error is not None:
                timeout = max(0.05, self._probe_at - now)
            else:
                due = self.coalescer.next_due()
                timeout = None if due is None else max(0.001, due - self.clock())
            self._wake.clear()
            if timeout is None:
                await self._wake.wait()
            else:
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=timeout)
                except TimeoutError:
                    pass
            if now >= next_forget:
                self.coalescer.forget_idle(self.clock())  # rate-limit memory of idle users
                next_forget = now + 1.0

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("delivery task failed unexpectedly", exc_info=task.exception())
        self._wake.set()

    async def drain(self, timeout: float) -> None:
        """Stop taking new batches; wait up to `timeout` for in-flight ones, then abandon them."""
        self._stopping = True
        self._wake.set()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)

    async def flush_all(self, timeout: float) -> bool:
        """Send everything pending now (used by shutdown with a deadline, and by tests). Returns
        early (False) when nothing is in flight and what is pending cannot be sent before the
        deadline, or only waits out OneSignal's replication lag (not this process's to wait for:
        it is not confirmed, and is re-read at the next start)."""
        deadline = self.clock() + timeout
        while self.clock() < deadline:
            if self.idle:
                return True
            due = self.coalescer.next_due()
            if not self._tasks and ((due is not None and due > deadline)
                                    or self.coalescer.pending_users <= len(self._lagging)):
                return False
            await asyncio.sleep(0.02)
        return self.idle

    # -- one user's batch ----------------------------------------------------------------

    async def _deliver(self, batch: UserBatch) -> None:
        user = batch.user
        self._lagging.discard(user)
        last_at: float | None = None
        created_at: float | None = None  # this batch's Create user made the user
        unsure_delete = False  # a deletion answered 404 that may be replication lag (see below)
        deleted = False  # this batch's Delete user is done: a retry must not delete the user again
        letters: list[DeadLetter] = []
        try:
            queue = deque(await self._steps(batch))
            while queue:
                step = queue.popleft()
                if step.check is not None and not await step.check():
                    continue
                if last_at is not None:
                    gap = self.user_interval
                    if created_at is not None:  # a new user: give OneSignal's replicas time
                        gap = max(gap, created_at + self.post_create_delay - last_at)
                    wait = last_at + gap - self.clock()
                    if wait > 0:
                        self._resting += 1
                        self._wake.set()  # a slot is free for another user meanwhile
                        try:
                            await asyncio.sleep(wait)
                        finally:
                            self._resting -= 1
                try:
                    resp = await self._send(step.req)
                except errors.NotFound as exc:
                    last_at = self.clock()
                    recreate = self._not_found(batch, step, exc)
                    if recreate is None:
                        letters.append(request_letter(batch, step.req, exc))
                    else:
                        queue.appendleft(recreate)
                    continue
                except errors.TagLimitExceeded as exc:
                    last_at = self.clock()
                    dropped, retry = without_tags(step.req, deletions=step.tags_refused)
                    if dropped:
                        letters.append(tag_letter(batch, step.req, exc, dropped))
                    if retry is not None:  # everything else in the request still applies
                        queue.appendleft(Step(retry, after=step.after, tags_refused=True))
                    continue
                except (errors.Conflict, errors.Rejected) as exc:
                    last_at = self.clock()
                    letters.append(request_letter(batch, step.req, exc))
                    continue
                last_at = self.clock()
                if resp.status == 404 and self._may_lag(user, step.req, last_at):
                    if not (batch.recreate and step.req.endpoint == "DELETE /users/by"
                            and self.users.get(user) is None):
                        raise errors.ReplicationLag(
                            f"OneSignal answered 404 to {step.req.endpoint} for a user created or first seen "
                            f"moments ago (replication lag)", status=404, endpoint=step.req.endpoint)
                    # A user this process never saw, deleted and created again: the Create user that
                    # follows tells whether it existed (202: the deletion did not happen yet).
                    unsure_delete = True
                if step.req.endpoint == "DELETE /users/by" and not unsure_delete:
                    deleted = True
                if step.req.endpoint == "POST /users" and resp.status in (200, 201):
                    created_at = last_at
                elif step.req.endpoint == "POST /users" and unsure_delete:
                    self.users.seen(user, last_at, {})
                    raise errors.ReplicationLag(
                        "OneSignal answered 404 to DELETE /users/by for a user that exists (replication lag)",
                        status=404, endpoint="DELETE /users/by")
                if step.after is not None:
                    try:
                        more = await step.after(resp)
                    except RenameConflict as exc:  # nothing of the batch may touch the other user
                        letters.append(rename_letter(batch, step.req, exc.message))
                        queue.clear()
                        continue
                    if more:
                        queue.extendleft(reversed(more))
        except errors.ReplicationLag as exc:
            m.API_RETRIES.labels(exc.reason).inc()
            delay = min(BACKOFF_CAP_S, LAG_BACKOFF_S * 2 ** min(batch.attempt, 6)) * self.rng.uniform(0.8, 1.25)
            if batch.attempt in (0, 3, 10) or batch.attempt % 50 == 0:
                log.info("%s; user %s retried in %.1fs (attempt %d)", exc, user, delay, batch.attempt + 1)
            self._requeue(_rest(batch, deleted), delay, last_at)
            self._lagging.add(user)
            return
        except errors.RateLimited as exc:
            m.API_RATE_LIMITED.inc()
            m.API_RETRIES.labels("rate_limited").inc()
            wait = exc.retry_after
            if not exc.retry_after_given:  # no Retry-After: back off by attempt (1 s doubling, at most 60 s)
                wait = min(BACKOFF_CAP_S, 2.0 ** min(batch.attempt, 6))
            self._requeue(_rest(batch, deleted), wait + self.rng.uniform(0, 0.25), last_at)
            return
        except errors.AuthError as exc:
            if self.auth_error is None:
                log.error("%s; stopped consuming until the key works again (probing every %ss)", exc, AUTH_PROBE_S)
            self.auth_error = exc
            m.READY.set(0)
            self._probe_at = self.clock() + AUTH_PROBE_S
            self._requeue(_rest(batch, deleted), AUTH_PROBE_S, last_at)
            return
        except errors.OneSignalError as exc:  # retriable: 5xx, timeouts, connection errors
            m.API_RETRIES.labels(exc.reason).inc()
            delay = backoff(batch.attempt, self.rng)
            if batch.attempt in (0, 3, 10) or batch.attempt % 50 == 0:
                log.warning("%s; user %s retried in %.1fs (attempt %d)", exc, user, delay, batch.attempt + 1)
            self._requeue(_rest(batch, deleted), delay, last_at)
            return
        except asyncio.CancelledError:
            self.coalescer.finished(user, last_at)  # abandoned at shutdown: not confirmed, re-read next start
            raise
        except Exception as exc:  # e.g. the subscription state store failed: retry like an outage
            m.API_RETRIES.labels("internal").inc()
            log.warning("delivery for user %s failed (%s: %s); retried", user, type(exc).__name__, exc,
                        exc_info=batch.attempt == 0)
            self._requeue(_rest(batch, deleted), backoff(batch.attempt, self.rng), last_at)
            return
        if letters:
            await self.dead_letter(letters)
        if self.auth_error is not None:
            log.warning("OneSignal accepts the API key again; resuming")
            self.auth_error = None
            self._room.set()
        m.READY.set(1)
        if batch.first_commit_time is not None:
            m.END_TO_END.observe(max(0.0, time.time() - batch.first_commit_time))
        if created_at is not None and last_at is not None:  # the next batch waits out the post-create delay
            last_at = max(last_at, created_at + self.post_create_delay - self.user_interval)
        self.coalescer.finished(user, last_at)
        self.coalescer.release(self.clock())  # renames that waited for this user
        self.on_done(batch.seqs)
        self._update_room()

    def _may_lag(self, user: UserRef, req: Request, now: float) -> bool:
        """Whether a 404 to a request by alias may be OneSignal's replication lag rather than an
        answer: the bridge created or first saw the user within the consistency window; for a user
        deletion also any user it does not know during the first window after start-up (an
        earlier process may have created it a moment before it stopped)."""
        if req.segments[:2] != ("users", "by"):
            return False
        if self.users.young(user, now):
            return True
        return req.endpoint == "DELETE /users/by" and self.users.get(user) is None and self.users.early(now)

    def _not_found(self, batch: UserBatch, step: Step, exc: errors.NotFound) -> Step | None:
        """A 404 that is not an accepted outcome. Update user: Create user with the same properties
        tells the cases apart (202: the user exists, the 404 was replication lag, the properties
        follow by Update user again; 200: OneSignal no longer had the user, and now has it with the
        change); an Update user right after such a 202 that answers 404 is replication lag. Other
        requests by alias within the consistency window: replication lag. Else a dead letter (None)."""
        user, req = batch.user, step.req
        lag = errors.ReplicationLag(str(exc) + " (within the consistency window: replication lag)",
                                    status=404, endpoint=req.endpoint)
        if req.endpoint == "PATCH /users/by" and req.body is not None:
            if step.exists_confirmed:
                raise lag
            m.API_FOLLOW_UPS.labels("update_not_found").inc()
            create = requests.create_user({user.label: user.id}, req.body.get("properties") or None)
            return Step(create, after=self._after_create(batch, create, []))
        if self._may_lag(user, req, self.clock()):
            raise lag
        return None

    async def _steps(self, batch: UserBatch) -> list[Step]:
        """The batch's requests, with subscription changes decided against the known state and
        properties sent the way OneSignal documents for a user that does or does not exist."""
        if batch.renamed_from is not None:
            return self._rename_steps(batch)
        owner = str(batch.user)
        state = self.subscriptions
        known = None if batch.delete_user else self.users.get(batch.user)
        owned = await state.owned(owner) if batch.subscriptions and not batch.delete_user else []
        new: list[tuple[str, str, bool | None]] = []
        patches: list[tuple[KnownSubscription, bool]] = []
        retire: list[tuple[KnownSubscription, str]] = []
        for channel, sc in batch.subscriptions.items():
            mine = [k for k in owned if k.channel == channel]
            if sc.token not in (None, UNCHANGED):
                hit = next((k for k in mine if k.token == sc.token), None)
                if hit is None:
                    new.append((channel, sc.token, sc.enabled))
                elif sc.enabled is not None and sc.enabled != hit.enabled:
                    patches.append((hit, sc.enabled))
            elif sc.token is UNCHANGED and sc.enabled is not None:
                patches += [(k, sc.enabled) for k in mine if k.enabled != sc.enabled]
            if sc.token is not UNCHANGED:
                for k in mine:
                    if k.token != sc.token and not (sc.on_address_change == "disable" and k.enabled is False):
                        retire.append((k, sc.on_address_change))
        for channel, token, _ in new:
            found = await state.lookup(channel, token)
            if found is not None and found.owner != owner:
                m.SUBSCRIPTION_TRANSFERS.inc()  # OneSignal moves the address to this user (202)

        steps: list[Step] = []
        items = [subscription_item(c, t, e) for c, t, e in new]
        for req in plan(batch, items, exists=known is not None, aliases=known.aliases if known else None):
            steps.append(Step(req, after=self._after(batch, req, new)))
        for hit, enabled in patches:
            steps.append(self._consent_step(hit, enabled))
        for old, mode in retire:
            async def still_mine(k: KnownSubscription = old) -> bool:
                now = await state.lookup(k.channel, k.token)
                return now is not None and now.owner == owner and now.subscription_id == k.subscription_id
            if mode == "disable":
                step = self._consent_step(old, False)
                step.check = still_mine
                steps.append(step)
            else:
                async def after_delete(_resp: Response, k: KnownSubscription = old) -> None:
                    await state.forget(k.channel, k.token)
                steps.append(Step(requests.delete_subscription(old.subscription_id), still_mine, after_delete))
        return steps

    def _after(self, batch: UserBatch, req: Request, new: list[tuple[str, str, bool | None]]) -> After | None:
        """What the bridge learns from the answer to one of `plan`'s requests."""
        user = batch.user
        if req.endpoint == "POST /users":
            return self._after_create(batch, req, new)
        if req.endpoint == "DELETE /users/by":
            async def forget_user(_resp: Response) -> None:
                self.users.forget(user)
                await self.subscriptions.forget_owner(str(user))
            return forget_user
        if req.endpoint == "DELETE /identity":
            label = req.segments[-1]

            async def forget_alias(_resp: Response) -> None:
                self.users.forget_alias(user, label)
            return forget_alias
        return None

    def _after_create(self, batch: UserBatch, req: Request, new: list[tuple[str, str, bool | None]]) -> After:
        """After Create user: remember the user (and the aliases the answer confirms), the ids and
        the consent OneSignal answered for the subscriptions, and send by Update user whatever
        properties the answer does not show applied (an existing user's, by default)."""
        user = batch.user
        sent = req.body or {}

        async def after_create(resp: Response) -> list[Step]:
            body = resp.body if isinstance(resp.body, dict) else {}
            answered = body.get("identity")
            answered = answered if isinstance(answered, dict) else {}
            confirmed = {k: v for k, v in (sent.get("identity") or {}).items() if answered.get(k, v) == v}
            if resp.status in (200, 201):
                self.users.created(user, self.clock(), confirmed)
            else:
                self.users.seen(user, self.clock(), confirmed)
            follow: list[Step] = []
            properties = sent.get("properties")
            if properties and resp.status not in (200, 201):
                missing = unapplied(properties, body)
                if missing:
                    m.API_FOLLOW_UPS.labels("properties_not_applied").inc()
                    follow.append(Step(requests.update_user(user.label, user.id, missing), exists_confirmed=True))
            if new:
                follow += await self._learn_ids(str(user), new, body)
            return follow
        return after_create

    def _consent_step(self, known: KnownSubscription, enabled: bool) -> Step:
        """Update one subscription's consent (`enabled` with `notification_types`)."""
        async def record(_resp: Response) -> None:
            await self.subscriptions.record(KnownSubscription(
                known.channel, known.token, known.owner, known.subscription_id, enabled))
        return Step(requests.update_subscription(known.subscription_id, consent(enabled)), after=record)

    async def _learn_ids(self, owner: str, new: list[tuple[str, str, bool | None]], body: Any) -> list[Step]:
        """Remember the subscriptions OneSignal answered for the Create user (their ids, and the
        consent it holds, which for an address it already had is its own, not the one sent); where
        that consent is not the one the database wants, the update that fixes it."""
        subs = body.get("subscriptions") if isinstance(body, dict) else None
        if not isinstance(subs, list):
            return []
        wanted: dict[tuple[Any, Any], tuple[str, bool | None]] = {
            (SUBSCRIPTION_TYPES[c], t): (c, e) for c, t, e in new}
        fixes: list[Step] = []
        for s in subs:
            if not isinstance(s, dict) or not s.get("id"):
                continue
            hit = wanted.get((s.get("type"), s.get("token")))
            if hit is not None:
                channel, enabled = hit
                held = KnownSubscription(channel, str(s["token"]), owner, str(s["id"]), answered_enabled(s))
                await self.subscriptions.record(held)
                if enabled is not None and enabled != held.enabled:
                    m.API_FOLLOW_UPS.labels("consent_differs").inc()
                    fixes.append(self._consent_step(held, enabled))
        return fixes

    async def _send(self, req: Request) -> Response:
        """Send one request (the per-user interval starts when its answer arrived)."""
        # The answered window keeps every second at OneSignal under the app budget by construction
        # (see AnsweredWindow); the token bucket, taken last, paces what leaves.
        async with self.slots, self.window.place():
            await self.bucket.acquire()
            t0 = time.perf_counter()
            status = "error"
            try:
                resp = await self.client.send(req)
                status = str(resp.status)
                return resp
            except errors.OneSignalError as exc:
                status = str(exc.status) if exc.status else exc.reason
                raise
            finally:
                m.API_REQUESTS.labels(req.endpoint, status).inc()
                m.API_DURATION.labels(req.endpoint).observe(time.perf_counter() - t0)

    def _requeue(self, batch: UserBatch, delay: float, last_at: float | None) -> None:
        now = self.clock()
        self.coalescer.finished(batch.user, now)  # the failed request may have counted too
        self.coalescer.requeue(batch, now + delay, now)
        self.coalescer.release(now)
        self._update_room()

    async def dead_letter(self, letters: list[DeadLetter]) -> None:
        """Store `letters` durably (retrying while the store is down) and count them."""
        attempt = 0
        while True:
            try:
                await self.dead_letters.put(letters)
                break
            except Exception as exc:  # the store is down: do not confirm, keep trying
                attempt += 1
                delay = backoff(attempt, self.rng)
                log.error("cannot store %d dead letter(s) (%s); retrying in %.1fs", len(letters), exc, delay)
                await asyncio.sleep(delay)
        for d in letters:
            m.DEAD_LETTERS.labels(d.table, d.reason).inc()
