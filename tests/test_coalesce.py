"""Coalescer: pending changes merged per user, and when each user may be sent (pure; virtual clock).

The property tests compare the coalescer against a tiny reference model of a OneSignal user
(tags, aliases, properties, subscriptions, exists): whatever the interleaving of arrivals,
batches taken, failures and retries, OneSignal ends where applying every change one by one
would have left it. They run with a fixed seed: a failure replays the same way (hypothesis
also prints the `@reproduce_failure` blob).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hypothesis import given, seed, settings
from hypothesis import strategies as st

from bridge.coalesce import Coalescer, UserBatch
from bridge.events import UNCHANGED, Origin, SubscriptionChange, UserChange, UserRef

SEED = 20240601
ALICE = UserRef("external_id", "alice")
BOB = UserRef("external_id", "bob")


def change(user: UserRef = ALICE, seq: int = 1, *, delete_user: bool = False,
           tags: dict[str, str | None] | None = None, properties: dict[str, Any] | None = None,
           aliases: dict[str, str | None] | None = None,
           subscriptions: tuple[SubscriptionChange, ...] = ()) -> UserChange:
    origin = Origin("public.users", f"id={user.id}", f"0/{seq:X}", seq, commit_time=1000.0 + seq)
    return UserChange(user, origin, delete_user, tags or {}, properties or {}, aliases or {}, subscriptions)


def take_all(c: Coalescer, now: float = 1e6) -> list[UserBatch]:
    return c.take_due(now, limit=10_000)


def only_batch(c: Coalescer, now: float = 1e6) -> UserBatch:
    batches = take_all(c, now)
    assert len(batches) == 1, batches
    return batches[0]


# -- merging ---------------------------------------------------------------------------------


def test_later_value_wins_per_field_and_other_fields_are_kept() -> None:
    c = Coalescer()
    c.add(change(seq=1, tags={"plan": "free", "country": "FR"}, aliases={"crm": "c1"}), now=0)
    c.add(change(seq=2, tags={"plan": "gold"}, properties={"language": "fr"}), now=0.1)
    c.add(change(seq=3, tags={"country": None}, aliases={"crm": "c2"}), now=0.1)

    batch = only_batch(c)

    assert batch.tags == {"plan": "gold", "country": None}
    assert batch.aliases == {"crm": "c2"}
    assert batch.properties == {"language": "fr"}
    assert not batch.delete_user
    assert list(batch.seqs) == [1, 2, 3]
    assert batch.changes == 3
    assert c.coalesced == 2


def test_delete_supersedes_everything_before_it() -> None:
    c = Coalescer()
    c.add(change(seq=1, tags={"plan": "gold"}, aliases={"crm": "c1"}, properties={"language": "fr"},
                 subscriptions=(SubscriptionChange("email", "a@example.com"),)), now=0)
    c.add(change(seq=2, delete_user=True), now=0)

    batch = only_batch(c)

    assert batch.delete_user
    assert batch.tags == {} and batch.aliases == {} and batch.properties == {} and batch.subscriptions == {}
    assert list(batch.seqs) == [1, 2]  # both are confirmed by this batch


def test_change_after_a_delete_recreates_the_user_from_scratch() -> None:
    c = Coalescer()
    c.add(change(seq=1, tags={"plan": "gold", "country": "FR"}), now=0)
    c.add(change(seq=2, delete_user=True), now=0)
    c.add(change(seq=3, tags={"plan": "free"}), now=0)

    batch = only_batch(c)

    assert batch.delete_user
    assert batch.tags == {"plan": "free"}  # country does not come back


def test_users_are_kept_apart() -> None:
    c = Coalescer()
    c.add(change(ALICE, 1, tags={"plan": "gold"}), now=0)
    c.add(change(BOB, 2, tags={"plan": "free"}), now=0)
    batches = {b.user: b for b in take_all(c)}
    assert batches[ALICE].tags == {"plan": "gold"} and batches[BOB].tags == {"plan": "free"}


def test_consent_only_change_keeps_the_pending_address() -> None:
    c = Coalescer()
    c.add(change(seq=1, subscriptions=(SubscriptionChange("email", "a@example.com", None, "old@example.com"),)),
          now=0)
    c.add(change(seq=2, subscriptions=(SubscriptionChange("email", UNCHANGED, False),)), now=0)
    assert only_batch(c).subscriptions["email"] == SubscriptionChange(
        "email", "a@example.com", False, "old@example.com")


def test_address_changed_twice_remembers_the_address_onesignal_holds() -> None:
    c = Coalescer()
    c.add(change(seq=1, subscriptions=(SubscriptionChange("email", "b@example.com", None, "a@example.com"),)),
          now=0)
    c.add(change(seq=2, subscriptions=(SubscriptionChange("email", "c@example.com", None, "b@example.com"),)),
          now=0)
    sub = only_batch(c).subscriptions["email"]
    assert (sub.token, sub.previous) == ("c@example.com", "a@example.com")


# -- schedule --------------------------------------------------------------------------------


def test_user_is_due_a_flush_window_after_its_first_pending_change() -> None:
    c = Coalescer(flush_interval_s=0.2)
    c.add(change(seq=1, tags={"plan": "free"}), now=10.0)
    c.add(change(seq=2, tags={"plan": "gold"}), now=10.15)  # does not push the deadline back

    assert c.next_due() == 10.2
    assert c.take_due(10.19, limit=10) == []
    (batch,) = c.take_due(10.2, limit=10)
    assert batch.tags == {"plan": "gold"}


def test_next_user_request_waits_the_per_user_interval_after_the_last_one() -> None:
    c = Coalescer(flush_interval_s=0.2, user_interval_s=1.0)
    c.add(change(seq=1, tags={"plan": "free"}), now=0.0)
    c.take_due(0.2, limit=10)
    c.finished(ALICE, last_request_at=0.3)
    c.add(change(seq=2, tags={"plan": "gold"}), now=0.35)

    assert c.next_due() == 1.3
    assert c.take_due(1.29, limit=10) == []
    assert len(c.take_due(1.3, limit=10)) == 1


def test_other_users_are_not_held_back_by_one_users_rate_limit() -> None:
    c = Coalescer(flush_interval_s=0.2, user_interval_s=1.0)
    c.add(change(ALICE, 1, tags={"plan": "free"}), now=0.0)
    c.take_due(0.2, limit=10)
    c.finished(ALICE, last_request_at=0.3)
    c.add(change(ALICE, 2, tags={"plan": "gold"}), now=0.35)
    c.add(change(BOB, 3, tags={"plan": "gold"}), now=0.35)

    assert [b.user for b in c.take_due(0.6, limit=10)] == [BOB]


def test_user_is_never_due_while_its_batch_is_in_flight() -> None:
    c = Coalescer(flush_interval_s=0.0, user_interval_s=1.0)
    c.add(change(seq=1, tags={"plan": "free"}), now=0.0)
    (first,) = c.take_due(0.0, limit=10)
    c.add(change(seq=2, tags={"plan": "gold"}), now=0.1)

    assert c.take_due(1e6, limit=10) == []
    assert c.next_due() is None
    assert (c.pending_users, c.in_flight_users) == (1, 1)

    c.finished(ALICE, last_request_at=0.5)
    (second,) = c.take_due(1.5, limit=10)
    assert second.tags == {"plan": "gold"} and list(second.seqs) == [2]


def test_take_due_returns_at_most_limit_batches_earliest_first() -> None:
    c = Coalescer(flush_interval_s=0.2)
    users = [UserRef("external_id", str(i)) for i in range(5)]
    for i, user in enumerate(users):
        c.add(change(user, i, tags={"n": str(i)}), now=float(i))
    assert [b.user for b in c.take_due(100.0, limit=2)] == users[:2]
    assert [b.user for b in c.take_due(100.0, limit=10)] == users[2:]


# -- retries ---------------------------------------------------------------------------------


def test_requeued_batch_merges_under_newer_changes_and_keeps_every_seq() -> None:
    c = Coalescer(flush_interval_s=0.2, user_interval_s=1.0)
    c.add(change(seq=1, tags={"plan": "free", "country": "FR"}, aliases={"crm": "c1"}), now=0.0)
    (failed,) = c.take_due(0.2, limit=10)
    c.add(change(seq=2, tags={"plan": "gold"}), now=0.3)

    c.finished(ALICE, last_request_at=0.4)
    c.requeue(failed, not_before=5.0, now=0.4)

    assert c.take_due(4.99, limit=10) == []
    (retry,) = c.take_due(5.0, limit=10)
    assert retry.tags == {"plan": "gold", "country": "FR"}
    assert retry.aliases == {"crm": "c1"}
    assert sorted(retry.seqs) == [1, 2]
    assert retry.attempt == 1
    assert {o.seq for o in retry.origins} == {1, 2}  # dead letters name every change involved


def test_requeued_batch_is_superseded_by_a_newer_delete_but_its_seqs_are_kept() -> None:
    c = Coalescer()
    c.add(change(seq=1, tags={"plan": "free"}), now=0.0)
    (failed,) = c.take_due(1.0, limit=10)
    c.add(change(seq=2, delete_user=True), now=1.0)
    c.finished(ALICE, last_request_at=1.0)
    c.requeue(failed, not_before=2.0, now=1.0)

    retry = only_batch(c)
    assert retry.delete_user and retry.tags == {}
    assert sorted(retry.seqs) == [1, 2]


def test_requeue_without_newer_changes_resends_the_same_batch_later() -> None:
    c = Coalescer()
    c.add(change(seq=1, tags={"plan": "free"}), now=0.0)
    (failed,) = c.take_due(1.0, limit=10)
    c.finished(ALICE, last_request_at=1.0)
    c.requeue(failed, not_before=30.0, now=1.0)

    assert c.next_due() == 30.0
    retry = only_batch(c)
    assert (retry.tags, list(retry.seqs), retry.attempt) == ({"plan": "free"}, [1], 1)


def test_pending_bytes_grow_with_pending_changes_and_return_to_zero_when_taken() -> None:
    c = Coalescer()
    c.add(change(ALICE, 1, tags={"plan": "x" * 1000}), now=0.0)
    c.add(change(BOB, 2, tags={"plan": "free"}), now=0.0)
    assert c.pending_bytes > 1000
    take_all(c)
    assert c.pending_bytes == 0 and c.pending_users == 0


# -- properties ------------------------------------------------------------------------------


@dataclass
class ModelUser:
    """What OneSignal holds for one user, as far as these tests care."""

    exists: bool = False
    tags: dict[str, str] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    properties: dict[str, Any] = field(default_factory=dict)
    subscriptions: dict[str, tuple[Any, Any]] = field(default_factory=dict)

    def apply(self, ch: UserChange | UserBatch) -> None:
        """One change, or one merged batch: the same fields mean the same thing."""
        if ch.delete_user:
            self.__init__()  # type: ignore[misc]
        for key, value in ch.tags.items():
            if value is None:
                self.tags.pop(key, None)
            else:
                self.tags[key] = value
        for label, alias in ch.aliases.items():
            if alias is None:
                self.aliases.pop(label, None)
            else:
                self.aliases[label] = alias
        self.properties.update(ch.properties)
        subs = ch.subscriptions.values() if isinstance(ch.subscriptions, dict) else ch.subscriptions
        for sub in subs:
            token, enabled = self.subscriptions.get(sub.channel, (None, None))
            token = token if sub.token is UNCHANGED else sub.token
            enabled = enabled if sub.enabled is None else sub.enabled
            self.subscriptions[sub.channel] = (token, enabled)
        if ch.tags or ch.aliases or ch.properties or subs:
            self.exists = True


USERS = [UserRef("external_id", name) for name in ("ann", "ben", "cy")]



TAG_UPDATES = [(k, v) for k in "abc" for v in (None, "1", "2", "3")]
ALIAS_UPDATES = [(k, v) for k in ("crm", "legacy") for v in (None, "x", "y")]
PROPERTY_UPDATES = [(k, v) for k in ("language", "country") for v in ("en", "fr")]
SUBSCRIPTION_UPDATES = [
    SubscriptionChange(channel, token, enabled)
    for channel in ("email", "sms")
    for token in (None, UNCHANGED, "t1", "t2")
    for enabled in (None, True, False)
]


def one_per_channel(subs: list[SubscriptionChange]) -> tuple[SubscriptionChange, ...]:
    return tuple({s.channel: s for s in subs}.values())


def change_specs(users: list[UserRef]) -> st.SearchStrategy[dict[str, Any]]:
    """A row change for one of `users`: small key spaces, so changes overlap and overwrite."""

    def updates(choices: list[Any], max_size: int) -> st.SearchStrategy[list[Any]]:
        return st.lists(st.sampled_from(choices), max_size=max_size)

    return st.fixed_dictionaries({
        "user": st.sampled_from(users),
        "delete_user": st.sampled_from([False, False, False, True]),
        "tags": updates(TAG_UPDATES, 3).map(dict),
        "aliases": updates(ALIAS_UPDATES, 2).map(dict),
        "properties": updates(PROPERTY_UPDATES, 2).map(dict),
        "subscriptions": updates(SUBSCRIPTION_UPDATES, 2).map(one_per_channel),
    })


def one_by_one(changes: list[UserChange]) -> dict[UserRef, ModelUser]:
    model = {u: ModelUser() for u in USERS}
    for ch in changes:
        model[ch.user].apply(ch)
    return model


@seed(SEED)
@settings(max_examples=150, deadline=None, print_blob=True)
@given(specs=st.lists(change_specs(USERS), max_size=40))
def test_coalesced_batches_leave_onesignal_where_one_by_one_changes_would(specs: list[dict[str, Any]]) -> None:
    changes = [change(seq=i, **spec) for i, spec in enumerate(specs)]
    c = Coalescer()
    for i, ch in enumerate(changes):
        c.add(ch, now=i * 0.01)
    server = {u: ModelUser() for u in USERS}
    for batch in take_all(c):
        server[batch.user].apply(batch)

    assert server == one_by_one(changes)
    assert c.pending_bytes == 0


STEPS = ["add", "add", "take", "ok", "fail"]
TWO_USER_CHANGES = change_specs(USERS[:2])


@seed(SEED)
@settings(max_examples=200, deadline=None, print_blob=True)
@given(steps=st.lists(st.sampled_from(STEPS), min_size=20, max_size=40), data=st.data())
def test_with_batches_in_flight_failing_and_retried_onesignal_still_converges(
    steps: list[str], data: st.DataObject
) -> None:
    """Arrivals, takes, successes and retriable failures interleave at random (two users)."""
    c = Coalescer(flush_interval_s=0.2, user_interval_s=1.0)
    server = {u: ModelUser() for u in USERS}
    changes: list[UserChange] = []
    in_flight: list[UserBatch] = []
    done_seqs: list[int] = []
    now = 0.0

    def finish(ok: bool) -> None:
        batch = in_flight.pop(0)
        c.finished(batch.user, last_request_at=now)
        if ok:
            server[batch.user].apply(batch)
            done_seqs.extend(batch.seqs)
        else:
            c.requeue(batch, not_before=now + 0.5, now=now)

    for step in steps:
        now += 0.3
        if step == "add":
            ch = change(seq=len(changes), **data.draw(TWO_USER_CHANGES))
            changes.append(ch)
            c.add(ch, now)
        elif step == "take":
            for batch in c.take_due(now, 2):
                assert batch.user not in {b.user for b in in_flight}, "a user was due while in flight"
                in_flight.append(batch)
        elif in_flight:
            finish(step == "ok")

    # Drain: everything in flight succeeds, then whatever is pending is sent.
    while in_flight:
        finish(True)
    while c.pending_users:
        now += 10.0
        in_flight.extend(c.take_due(now, 100))
        while in_flight:
            finish(True)

    assert server == one_by_one(changes)
    assert sorted(done_seqs) == list(range(len(changes)))  # every change confirmed exactly once
    assert c.pending_bytes == 0
    assert c.in_flight_users == 0


@seed(SEED)
@settings(max_examples=100, deadline=None, print_blob=True)
@given(specs=st.lists(change_specs(USERS), min_size=1, max_size=30), flush=st.floats(0.0, 1.0),
       gaps=st.lists(st.floats(0.0, 0.5), min_size=30, max_size=30))
def test_no_user_is_taken_before_its_flush_window_or_its_rate_limit(
    specs: list[dict[str, Any]], flush: float, gaps: list[float]
) -> None:
    c = Coalescer(flush_interval_s=flush, user_interval_s=1.0)
    first_pending: dict[UserRef, float] = {}
    last_sent: dict[UserRef, float] = {}
    now = 0.0
    for i, spec in enumerate(specs):
        now += gaps[i]
        ch = change(seq=i, **spec)
        first_pending.setdefault(ch.user, now)
        c.add(ch, now)
        for batch in c.take_due(now, 100):
            assert now >= first_pending.pop(batch.user) + flush
            if batch.user in last_sent:
                assert now >= last_sent[batch.user] + 1.0
            last_sent[batch.user] = now
            c.finished(batch.user, last_request_at=now)


def test_a_lone_change_to_an_idle_user_is_due_after_the_debounce_not_the_flush_window() -> None:
    c = Coalescer(flush_interval_s=0.2, user_interval_s=1.0, idle_debounce_s=0.005)
    c.add(change(ALICE, tags={"plan": "pro"}), now=10.0)
    assert c.take_due(10.004, 10) == [], "the rest of its transaction may still come"
    (batch,) = c.take_due(10.006, 10)
    assert batch.tags == {"plan": "pro"}, "out long before the 200 ms flush window would have ended"


def test_a_hot_user_is_still_held_to_its_interval_and_coalesced() -> None:
    c = Coalescer(flush_interval_s=0.2, user_interval_s=1.0, idle_debounce_s=0.005)
    c.add(change(ALICE, tags={"n": "1"}), now=10.0)
    (first,) = c.take_due(10.01, 10)
    c.finished(first.user, 10.05)  # its response arrived at 10.05
    for i in range(2, 6):
        c.add(change(ALICE, i, tags={"n": str(i)}), now=10.1 + i / 100)
    assert c.take_due(11.0, 10) == [], "1 request/s per user: not before 11.05"
    (second,) = c.take_due(11.06, 10)
    assert second.tags == {"n": "5"} and second.changes == 4, "the changes of the hot second are merged"
