"""The trigger output: sends Create message and Create custom events requests, exactly once.

- Every send holds a checkpoint token, issued after the tokens of the event's own user changes.
  It is released only when every token before it that is *not* another send's is done: the
  changes before it in the stream (above all its user's) were applied or dead-lettered, so a
  template reading the user's tags sees the new values. Sends never wait for one another.
  Trade-off: a backlog of other users' changes ahead of a send delays it too.
- The token is reported done when OneSignal answered 2xx, or when the send was dead-lettered (a
  4xx, or an answer with an empty `id` and `errors`, e.g. `invalid_aliases`). 429, 5xx and network
  errors are retried with the same body, so the same `idempotency_key`: OneSignal creates nothing
  twice (documentation.onesignal.com/reference/idempotent-notification-requests).
- Requests are paced by `delivery.messages_per_second` (default 100), apart from the user-update
  budget. Each custom event goes in its own request (each carries its own `idempotency_key`).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import orjson

from bridge.deadletter import DeadLetter, DeadLetterStore, RowKey, render_row_keys, structured_keys
from bridge.observability import metrics as m
from bridge.ports import DoneCallback
from bridge.triggers.match import Send

log = logging.getLogger("bridge.triggers")

MAX_PENDING = 10_000
POLL_S = 0.02


class _Pace:
    def __init__(self, per_s: float) -> None:
        self.interval = 1.0 / per_s
        self.next = 0.0

    async def wait(self) -> None:
        now = time.monotonic()
        at = max(now, self.next)
        self.next = at + self.interval
        if at > now:
            await asyncio.sleep(at - now)


class TriggerOutput:
    """`TriggerOutput(http, app_id, api_key, dead_letters, done, first_open, messages_per_second)`.

    `first_open(start, end)` is the watermark's first token in [start, end) not yet done (None:
    all done); the pipeline calls `poke()` whenever tokens complete."""

    def __init__(self, http: httpx.AsyncClient, app_id: str, api_key: str, dead_letters: DeadLetterStore,
                 done: DoneCallback, first_open: Callable[[int, int], int | None],
                 messages_per_second: float = 100.0, max_in_flight: int = 32) -> None:
        self._http = http
        self._app_id = app_id
        self._headers = {"authorization": f"Key {api_key}", "content-type": "application/json"}
        self._dead = dead_letters
        self._done = done
        self._first_open = first_open
        self._pace = _Pace(messages_per_second)
        self._queue: deque[Send] = deque()  # in token order, not yet released
        self._open: set[int] = set()  # tokens of sends queued or in flight
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._slots = asyncio.Semaphore(max_in_flight)
        self._tasks: set[asyncio.Task[None]] = set()
        self.auth_error: Exception | None = None
        self.gate: Callable[[], Awaitable[None]] | None = None  # the leader lease (bridge/lease.py)

    # -- the pipeline's side --------------------------------------------------------------

    def submit(self, send: Send) -> None:
        self._queue.append(send)
        self._open.add(send.seq)
        if len(self._open) >= MAX_PENDING:
            self._room.clear()
        self._wake.set()

    def poke(self) -> None:
        self._wake.set()

    def has_room(self) -> bool:
        return self._room.is_set()

    async def wait_for_room(self) -> None:
        await self._room.wait()

    @property
    def pending(self) -> int:
        return len(self._open)

    # -- delivery -------------------------------------------------------------------------

    def _release(self) -> list[Send]:
        """Sends whose every earlier token, other sends' apart, is done (in order)."""
        out: list[Send] = []
        pos = 0
        queue = self._queue
        while queue:
            send = queue[0]
            while True:
                tok = self._first_open(pos, send.seq)
                if tok is None:
                    break
                if tok not in self._open:
                    return out  # a change before it is not applied yet
                pos = tok + 1
            out.append(queue.popleft())
            pos = send.seq + 1
        return out

    async def run(self) -> None:
        while True:
            for send in self._release():
                await self._slots.acquire()
                task = asyncio.create_task(self._deliver(send))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), POLL_S * 10)
            except TimeoutError:
                pass

    async def drain(self, timeout: float) -> None:
        """Wait (at most `timeout`) for what can go now; the rest is re-read after a restart."""
        deadline = time.monotonic() + timeout
        while (self._tasks or self._release_ready()) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(POLL_S)

    def abandon(self) -> None:
        """Cancel the requests in flight (a replica that lost its leadership: see bridge/lease.py)."""
        for t in list(self._tasks):
            t.cancel()

    def _release_ready(self) -> bool:
        if not self._queue:
            return False
        tok = self._first_open(0, self._queue[0].seq)
        return tok is None or tok in self._open

    def _finish(self, send: Send) -> None:
        self._open.discard(send.seq)
        if len(self._open) < MAX_PENDING:
            self._room.set()
        self._done([send.seq])

    async def _deliver(self, send: Send) -> None:
        try:
            delay = 0.5
            while True:
                await self._pace.wait()
                outcome, wait = await self._attempt(send)
                if outcome == "sent" or outcome == "rejected":
                    self._finish(send)
                    return
                send.attempts += 1
                if wait is None:
                    wait = delay * (0.5 + random.random())
                    delay = min(delay * 2, 30.0)
                await asyncio.sleep(wait)
        finally:
            self._slots.release()

    async def _attempt(self, send: Send) -> tuple[str, float | None]:
        """One request: ("sent" | "rejected" | "retry", how long to wait before the retry)."""
        if send.kind == "message":
            path = "/notifications"
            body = {"app_id": self._app_id, **send.body}
            counter = m.MESSAGES
        else:
            path = f"/apps/{self._app_id}/custom_events"
            body = {"events": [send.body]}
            counter = m.CUSTOM_EVENTS
        try:
            if self.gate is not None:
                await self.gate()
            r = await self._http.post(path, content=orjson.dumps(body), headers=self._headers)
        except httpx.HTTPError as exc:
            log.warning("trigger %s: %s for %s failed (%s); retrying with the same idempotency key",
                        send.trigger, path, send.user, exc)
            counter.labels(send.trigger, "retried").inc()
            return "retry", None
        status = r.status_code
        try:
            answer = r.json()
        except ValueError:
            answer = None
        if status in (401, 403):
            self.auth_error = RuntimeError(f"OneSignal answered {status} to {path}")
            counter.labels(send.trigger, "retried").inc()
            return "retry", 5.0
        self.auth_error = None
        if status == 429:
            counter.labels(send.trigger, "retried").inc()
            try:
                return "retry", max(1.0, float(r.headers.get("retry-after", "1")))
            except ValueError:
                return "retry", 1.0
        if status >= 500:
            counter.labels(send.trigger, "retried").inc()
            return "retry", None
        if 200 <= status < 300:
            problem = self._rejection(send, answer)
            if problem is None:
                counter.labels(send.trigger, "sent").inc()
                return "sent", None
            reason, message = problem
        else:
            reason, message = f"http_{status}", f"OneSignal answered {status}: {_short(answer, r.text)}"
        counter.labels(send.trigger, "dead_lettered").inc()
        await self._dead_letter(send, reason, message, body)
        return "rejected", None

    @staticmethod
    def _rejection(send: Send, answer: Any) -> tuple[str, str] | None:
        if not isinstance(answer, dict):
            return None
        errors = answer.get("errors")
        if send.kind == "message":
            if answer.get("id"):
                return None
            if not errors:
                return None if "id" not in answer else ("no_recipients", "Create message created nothing")
            reason = next(iter(errors), "errors") if isinstance(errors, dict) else "errors"
            return str(reason), f"Create message created nothing: {orjson.dumps(errors).decode()}"
        if errors:
            return "custom_event_error", f"Create custom events refused the event: {orjson.dumps(errors).decode()}"
        return None

    async def _dead_letter(self, send: Send, reason: str, message: str, request: dict[str, Any]) -> None:
        key = send.key
        keys = structured_keys([(send.table, RowKey(dict(key), "") if isinstance(key, dict) else key)])
        row_key = render_row_keys(keys, send.table) if keys is not None else str(key)
        text = f"trigger {send.trigger} ({send.kind}) for {send.user}: {message}"
        log.warning("dead-lettered: %s", text)
        letter = DeadLetter(send.table, row_key, f"trigger:{send.trigger}", reason, text, send.position,
                            user=send.user, request=request, row_keys=keys)
        delay = 1.0
        while True:
            try:
                await self._dead.put([letter])
                m.DEAD_LETTERS.labels(send.table, reason).inc()
                return
            except Exception as exc:  # the store is down: the token stays open, try again
                log.warning("cannot store a trigger dead letter (%s); retrying", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)


def _short(answer: Any, text: str) -> str:
    s = orjson.dumps(answer).decode() if answer is not None else text
    return s[:500]
