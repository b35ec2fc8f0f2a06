"""Coalescer: pending changes keyed by user, merged in source order (pure; injected clock).

Rules: later values win per field; a user deletion supersedes what came before it; a change after
a deletion starts afresh (the batch deletes, then re-creates). A user becomes *due* when its
oldest pending change has waited the flush window, no request of its own is in flight, and its
per-user rate limit (1 request/s) allows it. While a user waits, changes keep merging into one
pending entry instead of queueing requests: that is what keeps the call count down.
"""

from __future__ import annotations

import heapq
from array import array
from dataclasses import dataclass
from typing import Any

from bridge.events import UNCHANGED, Origin, SubscriptionChange, UserChange, UserRef

MAX_ORIGINS = 8  # origins kept per batch for dead letters and logs (all seqs are kept)


@dataclass(frozen=True, slots=True)
class UserBatch:
    """The net effect of one user's pending changes, ready to be turned into requests."""

    user: UserRef
    delete_user: bool
    tags: dict[str, str | None]
    properties: dict[str, Any]
    aliases: dict[str, str | None]
    subscriptions: dict[str, SubscriptionChange]
    seqs: array[int]
    origins: tuple[Origin, ...]
    changes: int  # how many UserChanges were merged into this batch
    attempt: int = 0
    first_commit_time: float | None = None
    recreate: bool = False  # a change arrived after the deletion: the user exists again
    renamed_from: UserRef | None = None  # first rename OneSignal's user `renamed_from` to `user`

    @property
    def is_empty(self) -> bool:
        return not (self.delete_user or self.tags or self.properties or self.aliases or self.subscriptions
                    or self.renamed_from)


class _Pending:
    """One user's pending changes, merged in place (mutable, private to the coalescer); `freeze`
    makes the `UserBatch` that leaves the stage."""

    __slots__ = ("user", "first_at", "delete_user", "tags", "properties", "aliases", "subscriptions", "seqs",
                 "origins", "changes", "attempt", "not_before", "size", "first_commit_time", "recreate",
                 "renamed_from")

    def __init__(self, user: UserRef, first_at: float, attempt: int = 0, not_before: float = 0.0,
                 renamed_from: UserRef | None = None) -> None:
        self.user = user
        self.first_at = first_at
        self.delete_user = False
        self.tags: dict[str, str | None] = {}
        self.properties: dict[str, Any] = {}
        self.aliases: dict[str, str | None] = {}
        self.subscriptions: dict[str, SubscriptionChange] = {}
        self.seqs: array[int] = array("q")
        self.origins: list[Origin] = []
        self.changes = 0
        self.attempt = attempt
        self.not_before = not_before
        self.size = 1536  # measured: a pending user with a few fields costs about 1.5-2 KiB of heap
        self.first_commit_time: float | None = None
        self.recreate = False
        self.renamed_from = renamed_from

    def merge(self, ch: UserChange) -> int:
        """Apply one change on top; return the growth in estimated bytes (64 per new tag plus its
        name, every tag value's length, 64 per property, 64 plus the label per alias, 128 per
        subscription, 8 per change)."""
        before = self.size
        if ch.delete_user:
            self.delete_user = True
            self.tags.clear()
            self.properties.clear()
            self.aliases.clear()
            self.subscriptions.clear()
            self.size = 1536 + 8 * len(self.seqs)
            self.recreate = False
        elif self.delete_user:
            self.recreate = True
        grown = 8
        tags = self.tags
        for k, v in ch.tags.items():
            if k not in tags:
                grown += 64 + len(k)
            tags[k] = v
            if v:
                grown += len(v)
        if ch.properties:
            self.properties.update(ch.properties)
            grown += 64 * len(ch.properties)
        if ch.aliases:
            aliases = self.aliases
            for k, a in ch.aliases.items():
                aliases[k] = a
                grown += 64 + len(k)
        if ch.subscriptions:
            subs = self.subscriptions
            for sub in ch.subscriptions:
                subs[sub.channel] = _merge_sub(subs.get(sub.channel), sub)
            grown += 128 * len(ch.subscriptions)
        origin = ch.origin
        self.seqs.append(origin.seq)
        origins = self.origins
        if len(origins) < MAX_ORIGINS:
            origins.append(origin)
        else:
            origins[-1] = origin  # keep the first few and the latest
        if self.first_commit_time is None:
            self.first_commit_time = origin.commit_time
        self.changes += 1
        self.size += grown
        return self.size - before

    def freeze(self) -> UserBatch:
        return UserBatch(
            self.user, self.delete_user, dict(self.tags), dict(self.properties), dict(self.aliases),
            dict(self.subscriptions), self.seqs, tuple(self.origins), self.changes, self.attempt,
            self.first_commit_time, self.recreate, self.renamed_from,
        )


def _merge_sub(older: SubscriptionChange | None, newer: SubscriptionChange) -> SubscriptionChange:
    if older is None:
        return newer
    token = older.token if newer.token is UNCHANGED else newer.token
    enabled = newer.enabled if newer.enabled is not None else older.enabled
    # What OneSignal holds is the address before the first change of this window.
    previous = older.previous if older.token is not UNCHANGED else (older.previous or newer.previous)
    return SubscriptionChange(newer.channel, token, enabled, previous)


class Coalescer:
    """Pending user changes and the schedule of when each user may be sent next."""

    def __init__(self, flush_interval_s: float = 0.2, user_interval_s: float = 1.0,
                 idle_debounce_s: float | None = None) -> None:
        self.flush_interval_s = flush_interval_s
        self.user_interval_s = user_interval_s
        # A user with no request in the last user interval is due after this short debounce (the
        # rest of its transaction), not after the flush window: nothing is gained by waiting, and
        # a hot user is still held to its interval. None: the flush window for everyone.
        self.idle_debounce_s = flush_interval_s if idle_debounce_s is None else min(idle_debounce_s,
                                                                                       flush_interval_s)
        self._pending: dict[UserRef, _Pending] = {}
        self._in_flight: set[UserRef] = set()
        self._last_sent: dict[UserRef, float] = {}
        self._heap: list[tuple[float, int, UserRef]] = []
        self._tick = 0
        # Renames that must wait (source order): the old user's batch is in flight, or the new
        # identity has pending changes of its own. Changes for the users they name wait behind them.
        self._parked: list[UserChange] = []
        self._parked_users: set[UserRef] = set()
        # old identity -> new, for every rename pending or in flight: a change for the old identity
        # (a new row taking it over) waits until OneSignal's user no longer answers to it
        self._renames: dict[UserRef, UserRef] = {}
        self.pending_bytes = 0
        self.coalesced = 0  # changes merged into an already pending user

    # -- input ---------------------------------------------------------------------------

    def add(self, change: UserChange, now: float) -> None:
        if self._parked_users and change.user in self._parked_users:
            self._park(change)
            return
        if self._renames and change.user in self._renames:
            target = self._renames[change.user]
            # Only the rename back of a rename still pending merges (a -> b -> a: no rename at all).
            if not (change.renamed_from == target and target in self._pending):
                self._park(change)
                return
        if change.renamed_from is not None:
            self._rename(change, now)
            return
        p = self._pending.get(change.user)
        if p is None:
            p = self._pending[change.user] = _Pending(change.user, first_at=now)
            self.pending_bytes += p.size
            self.pending_bytes += p.merge(change)
            self._schedule(p)
        else:
            self.coalesced += 1
            self.pending_bytes += p.merge(change)

    def _park(self, change: UserChange) -> None:
        self._parked.append(change)
        self._parked_users.add(change.user)
        if change.renamed_from is not None:
            self._parked_users.add(change.renamed_from)

    def _rename(self, change: UserChange, now: float) -> None:
        """A rename is a point in the user's history: what was pending for the old identity moves
        under the new one behind the rename (the same OneSignal user; the batch renames first, then
        applies), a chain a -> b -> c becomes a -> c and a -> b -> a no rename at all. When the old
        user's batch is in flight, or the new identity has pending changes of its own (another
        user until the rename), the change waits until those are sent (`release`)."""
        old, new = change.renamed_from, change.user
        assert old is not None
        if (old in self._parked_users or old in self._in_flight or new in self._in_flight
                or new in self._pending or (old in self._pending and self._pending[old].delete_user)):
            self._park(change)
            return
        p = self._pending.pop(old, None)
        if p is None:
            p = _Pending(new, first_at=now, renamed_from=old)
            self.pending_bytes += p.size
        else:
            self.coalesced += 1
            p.user = new
            first = p.renamed_from or old
            p.renamed_from = None if first == new else first
            if p.renamed_from is None:
                self._renames.pop(first, None)
        if p.renamed_from is not None:
            self._renames[p.renamed_from] = new
        self._pending[new] = p
        self.pending_bytes += p.merge(change)
        self._schedule(p)

    def release(self, now: float) -> None:
        """Let waiting renames (and the changes behind them) in again, in source order."""
        if not self._parked:
            return
        parked, self._parked = self._parked, []
        self._parked_users = set()
        for change in parked:
            self.add(change, now)

    def requeue(self, batch: UserBatch, not_before: float, now: float) -> None:
        """A batch that failed retriably goes back *under* whatever arrived since it left."""
        self._in_flight.discard(batch.user)
        newer = self._pending.pop(batch.user, None)
        if newer is not None:
            self.pending_bytes -= newer.size
        p = _Pending(batch.user, first_at=now, attempt=batch.attempt + 1, not_before=not_before)
        p.delete_user = batch.delete_user
        p.tags, p.properties, p.aliases = dict(batch.tags), dict(batch.properties), dict(batch.aliases)
        p.subscriptions = dict(batch.subscriptions)
        p.seqs = array("q", batch.seqs)
        p.origins = list(batch.origins)
        p.changes = batch.changes
        p.first_commit_time = batch.first_commit_time
        p.recreate = batch.recreate
        p.renamed_from = batch.renamed_from
        p.size = 1536 + 8 * len(p.seqs) + 96 * (len(p.tags) + len(p.properties) + len(p.aliases))
        if newer is not None:
            if newer.delete_user:
                newer.seqs = array("q", p.seqs) + newer.seqs
                newer.attempt, newer.not_before = p.attempt, not_before
                newer.first_commit_time = p.first_commit_time
                newer.size += 8 * len(p.seqs)
                p = newer
            else:
                p.recreate = p.recreate or (p.delete_user and newer.changes > 0)
                p.tags.update(newer.tags)
                p.properties.update(newer.properties)
                p.aliases.update(newer.aliases)
                for ch, sub in newer.subscriptions.items():
                    p.subscriptions[ch] = _merge_sub(p.subscriptions.get(ch), sub)
                p.seqs.extend(newer.seqs)
                for origin in newer.origins:  # dead letters name the newer changes too
                    if len(p.origins) < MAX_ORIGINS:
                        p.origins.append(origin)
                    else:
                        p.origins[-1] = origin
                p.changes += newer.changes
                p.size += newer.size
        self._pending[batch.user] = p
        self.pending_bytes += p.size
        if p.renamed_from is not None:
            self._renames[p.renamed_from] = batch.user
        self._schedule(p)

    # -- output --------------------------------------------------------------------------

    def _due(self, p: _Pending) -> float:
        last = self._last_sent.get(p.user)
        idle = last is None or last + self.user_interval_s <= p.first_at
        due = max(p.first_at + (self.idle_debounce_s if idle else self.flush_interval_s), p.not_before)
        if last is not None:
            due = max(due, last + self.user_interval_s)
        return due

    def _schedule(self, p: _Pending) -> None:
        if p.user in self._in_flight:
            return  # scheduled again when the in-flight batch finishes
        self._tick += 1
        heapq.heappush(self._heap, (self._due(p), self._tick, p.user))

    def next_due(self) -> float | None:
        while self._heap:
            due, _, user = self._heap[0]
            p = self._pending.get(user)
            if p is None or user in self._in_flight or self._due(p) != due:
                heapq.heappop(self._heap)
                if p is not None and user not in self._in_flight:
                    self._schedule(p)
                continue
            return due
        return None

    def take_due(self, now: float, limit: int) -> list[UserBatch]:
        """Remove and return up to `limit` due users' batches; they are now in flight."""
        out: list[UserBatch] = []
        while len(out) < limit:
            due = self.next_due()
            if due is None or due > now:
                break
            _, _, user = heapq.heappop(self._heap)
            p = self._pending.pop(user)
            self.pending_bytes -= p.size
            self._in_flight.add(user)
            out.append(p.freeze())
        return out

    def finished(self, user: UserRef, last_request_at: float | None) -> None:
        """The user's in-flight batch is done; its next batch may go a rate-limit interval later."""
        self._in_flight.discard(user)
        if last_request_at is not None:
            self._last_sent[user] = last_request_at
        p = self._pending.get(user)
        if self._renames:  # its rename is done (a retry puts it back: `requeue`)
            for old in [o for o, n in self._renames.items() if n == user and (p is None or p.renamed_from != o)]:
                del self._renames[old]
        if p is not None:
            self._schedule(p)

    def forget_idle(self, now: float) -> None:
        """Drop rate-limit memory older than the interval (keeps memory bounded)."""
        cutoff = now - self.user_interval_s
        stale = [u for u, t in self._last_sent.items() if t < cutoff]
        for u in stale:
            del self._last_sent[u]

    @property
    def pending_users(self) -> int:
        return len(self._pending) + len(self._parked)

    @property
    def in_flight_users(self) -> int:
        return len(self._in_flight)

    def pending_batches(self) -> list[UserBatch]:
        return [p.freeze() for p in self._pending.values()]
