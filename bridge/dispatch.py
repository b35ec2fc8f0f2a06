"""Dispatcher: the asyncio shell around the coalescer that sends due users' batches to OneSignal.

- App-wide token bucket (`delivery.app_requests_per_second`), per-user spacing (1 request/s, kept
  by the coalescer's schedule and between the requests of one batch), a cap on in-flight requests.
- 429: the user waits at least `Retry-After`. 5xx, timeouts, connection errors: the batch goes back
  into the coalescer with exponential backoff and full jitter, with no limit in time, without
  blocking other users. 400/409: the request is dead-lettered and the rest of the batch goes on.
  401/403: dispatching stops (readiness false, the source is held back, nothing is confirmed) and
  one probe batch is retried every `AUTH_PROBE_S` until the key works again.
- A batch is *done* (its source positions may be confirmed) when every request succeeded or was
  dead-lettered.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from bridge.coalesce import Coalescer, UserBatch
from bridge.config import DeliveryConfig
from bridge.deadletter import DeadLetter, DeadLetterStore
from bridge.events import UNCHANGED, UserChange
from bridge.observability import metrics as m
from bridge.onesignal import errors
from bridge.onesignal.client import OneSignalClient, Request, Response, requests
from bridge.onesignal.ratelimit import TokenBucket
from bridge.plan import SUBSCRIPTION_TYPES, plan, subscription_item
from bridge.subscriptions import KnownSubscription, MemorySubscriptionState, SubscriptionState

Step = tuple[Request, Callable[[], Awaitable[bool]] | None, Callable[[Response], Awaitable[None]] | None]

log = logging.getLogger("bridge.dispatch")

BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 60.0
AUTH_PROBE_S = 5.0
# The per-user interval is counted from when the previous response *arrived*: OneSignal received
# that request earlier still, so the gap it sees is never shorter than ours.
USER_SPACING_MARGIN_S = 0.02


def backoff(attempt: int, rng: random.Random) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
    return rng.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * (2 ** min(attempt, 16))))


class Dispatcher:
    def __init__(
        self,
        client: OneSignalClient,
        delivery: DeliveryConfig,
        dead_letters: DeadLetterStore,
        on_done: Callable[[Iterable[int]], None],
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        subscriptions: SubscriptionState | None = None,
    ) -> None:
        self.client = client
        self.subscriptions: SubscriptionState = subscriptions or MemorySubscriptionState()
        self.delivery = delivery
        self.dead_letters = dead_letters
        self.on_done = on_done
        self.clock = clock
        self.rng = rng or random.Random()
        self.user_interval = 1.0 / delivery.user_requests_per_second + USER_SPACING_MARGIN_S
        self.coalescer = Coalescer(delivery.flush_interval_ms / 1000.0, self.user_interval)
        self.bucket = TokenBucket(delivery.app_requests_per_second)
        self.slots = asyncio.Semaphore(delivery.max_in_flight)
        self.auth_error: errors.AuthError | None = None
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._probe_at = 0.0

    # -- input side (called by the pipeline) -------------------------------------------

    def submit(self, change: UserChange) -> None:
        before = self.coalescer.coalesced
        self.coalescer.add(change, self.clock())
        if self.coalescer.coalesced != before:
            m.COALESCED.inc()
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
            free = self.delivery.max_in_flight - len(self._tasks)
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
        """Send everything pending now (used by shutdown with a deadline, and by tests)."""
        deadline = self.clock() + timeout
        while self.clock() < deadline:
            if self.idle:
                return True
            await asyncio.sleep(0.02)
        return self.idle

    # -- one user's batch ----------------------------------------------------------------

    async def _deliver(self, batch: UserBatch) -> None:
        user = batch.user
        last_at: float | None = None
        letters: list[DeadLetter] = []
        try:
            steps = await self._steps(batch)
            for req, check, after in steps:
                if check is not None and not await check():
                    continue
                if last_at is not None:
                    wait = last_at + self.user_interval - self.clock()
                    if wait > 0:
                        await asyncio.sleep(wait)
                try:
                    resp = await self._send(req)
                    last_at = self.clock()
                    if after is not None:
                        await after(resp)
                except (errors.Conflict, errors.Rejected, errors.NotFound) as exc:
                    last_at = self.clock()
                    letters.append(self._letter(batch, req, exc))
        except errors.RateLimited as exc:
            m.API_RATE_LIMITED.inc()
            m.API_RETRIES.labels("rate_limited").inc()
            self._requeue(batch, exc.retry_after + self.rng.uniform(0, 0.25), last_at)
            return
        except errors.AuthError as exc:
            if self.auth_error is None:
                log.error("%s; stopped consuming until the key works again (probing every %ss)", exc, AUTH_PROBE_S)
            self.auth_error = exc
            m.READY.set(0)
            self._probe_at = self.clock() + AUTH_PROBE_S
            self._requeue(batch, AUTH_PROBE_S, last_at)
            return
        except errors.OneSignalError as exc:  # retriable: 5xx, timeouts, connection errors
            m.API_RETRIES.labels(exc.reason).inc()
            delay = backoff(batch.attempt, self.rng)
            if batch.attempt in (0, 3, 10) or batch.attempt % 50 == 0:
                log.warning("%s; user %s retried in %.1fs (attempt %d)", exc, user, delay, batch.attempt + 1)
            self._requeue(batch, delay, last_at)
            return
        except asyncio.CancelledError:
            self.coalescer.finished(user, last_at)  # abandoned at shutdown: not confirmed, re-read next start
            raise
        except Exception as exc:  # e.g. the subscription state store failed: retry like an outage
            m.API_RETRIES.labels("internal").inc()
            log.warning("delivery for user %s failed (%s: %s); retried", user, type(exc).__name__, exc,
                        exc_info=batch.attempt == 0)
            self._requeue(batch, backoff(batch.attempt, self.rng), last_at)
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
        self.coalescer.finished(user, last_at)
        self.on_done(batch.seqs)
        self._update_room()

    async def _steps(self, batch: UserBatch) -> list[Step]:
        """The batch's requests, with subscription changes decided against the known state."""
        if not batch.subscriptions and not batch.delete_user:
            return [(r, None, None) for r in plan(batch)]
        owner = str(batch.user)
        state = self.subscriptions
        owned = [] if batch.delete_user else await state.owned(owner)
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
            known = await state.lookup(channel, token)
            if known is not None and known.owner != owner:
                m.SUBSCRIPTION_TRANSFERS.inc()  # OneSignal moves the address to this user (202)

        steps: list[Step] = []
        items = [subscription_item(c, t, e) for c, t, e in new]
        for req in plan(batch, items):
            after: Callable[[Response], Awaitable[None]] | None = None
            if req.method == "DELETE" and req.endpoint == "DELETE /users/by":
                async def forget_owner(_resp: Response, owner: str = owner) -> None:
                    await state.forget_owner(owner)
                after = forget_owner
            elif req.endpoint == "POST /users" and new:
                async def learn_ids(resp: Response, new: list[tuple[str, str, bool | None]] = new) -> None:
                    await self._learn_ids(owner, new, resp.body)
                after = learn_ids
            steps.append((req, None, after))
        for known, enabled in patches:
            async def after_patch(_resp: Response, k: KnownSubscription = known, e: bool = enabled) -> None:
                await state.record(KnownSubscription(k.channel, k.token, k.owner, k.subscription_id, e))
            steps.append((requests.update_subscription(known.subscription_id, {"enabled": enabled}), None, after_patch))
        for known, mode in retire:
            async def still_mine(k: KnownSubscription = known) -> bool:
                now = await state.lookup(k.channel, k.token)
                return now is not None and now.owner == owner and now.subscription_id == k.subscription_id
            if mode == "disable":
                async def after_disable(_resp: Response, k: KnownSubscription = known) -> None:
                    await state.record(KnownSubscription(k.channel, k.token, k.owner, k.subscription_id, False))
                steps.append((requests.update_subscription(known.subscription_id, {"enabled": False}),
                              still_mine, after_disable))
            else:
                async def after_delete(_resp: Response, k: KnownSubscription = known) -> None:
                    await state.forget(k.channel, k.token)
                steps.append((requests.delete_subscription(known.subscription_id), still_mine, after_delete))
        return steps

    async def _learn_ids(self, owner: str, new: list[tuple[str, str, bool | None]], body: Any) -> None:
        """Remember the ids OneSignal gave the subscriptions it created (from the upsert's answer)."""
        subs = body.get("subscriptions") if isinstance(body, dict) else None
        if not isinstance(subs, list):
            return
        wanted: dict[tuple[Any, Any], tuple[str, bool | None]] = {
            (SUBSCRIPTION_TYPES[c], t): (c, e) for c, t, e in new}
        for s in subs:
            if not isinstance(s, dict) or not s.get("id"):
                continue
            hit = wanted.get((s.get("type"), s.get("token")))
            if hit is not None:
                channel, enabled = hit
                await self.subscriptions.record(KnownSubscription(
                    channel, str(s["token"]), owner, str(s["id"]),
                    enabled if enabled is not None else s.get("enabled", True)))

    async def _send(self, req: Request) -> Response:
        """Send one request (the per-user interval starts when its answer arrived)."""
        async with self.slots:
            # The app-wide token is taken right before the request leaves, never before a wait
            # for a slot: requests that queued must not leave back to back past the limit.
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
        self._update_room()

    def _letter(self, batch: UserBatch, req: Request, exc: errors.OneSignalError) -> DeadLetter:
        positions = ",".join(o.position for o in batch.origins[:4])
        log.warning("dead-lettered %s %s for user %s: %s", req.method, req.endpoint, batch.user, exc)
        return DeadLetter.from_origins(
            batch.origins,
            field=None,
            reason=exc.reason,
            message=f"user {batch.user}: {exc}",
            position=positions,
            user=str(batch.user),
            request={"method": req.method, "path": req.path, "body": req.body},
        )

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
