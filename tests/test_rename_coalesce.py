"""A rename is a point in the user's history (issue 15): the coalescer keeps it in order (pure)."""

from __future__ import annotations

from bridge.coalesce import Coalescer
from bridge.events import Origin, UserChange, UserRef

A, B, C = (UserRef("external_id", x) for x in "abc")


def change(user: UserRef, seq: int, renamed_from: UserRef | None = None, **tags: str) -> UserChange:
    origin = Origin("public.users", f"id={seq}", f"0/{seq:X}", seq)
    return UserChange(user, origin, tags=tags, renamed_from=renamed_from)


def test_pending_changes_of_the_old_identity_move_behind_the_rename():
    c = Coalescer(0.0, 1.0)
    c.add(change(A, 1, plan="free"), 0.0)
    c.add(change(B, 2, A, plan="pro"), 0.0)
    (batch,) = c.take_due(1.0, 10)
    assert (batch.user, batch.renamed_from) == (B, A)
    assert batch.tags == {"plan": "pro"} and list(batch.seqs) == [1, 2]


def test_a_chain_of_renames_in_one_window_is_one_rename_from_the_first_to_the_last():
    c = Coalescer(0.0, 1.0)
    c.add(change(B, 1, A), 0.0)
    c.add(change(C, 2, B, plan="pro"), 0.0)
    (batch,) = c.take_due(1.0, 10)
    assert (batch.user, batch.renamed_from, batch.tags) == (C, A, {"plan": "pro"})


def test_a_rename_and_back_in_one_window_is_no_rename():
    c = Coalescer(0.0, 1.0)
    c.add(change(B, 1, A), 0.0)
    c.add(change(A, 2, B, plan="back"), 0.0)
    (batch,) = c.take_due(1.0, 10)
    assert (batch.user, batch.renamed_from, batch.tags) == (A, None, {"plan": "back"})


def test_a_rename_waits_for_the_old_users_batch_in_flight_and_later_changes_wait_behind_it():
    c = Coalescer(0.0, 1.0)
    c.add(change(A, 1, plan="free"), 0.0)
    (first,) = c.take_due(1.0, 10)
    c.add(change(B, 2, A, plan="pro"), 1.0)
    c.add(change(B, 3, plan="vip"), 1.0)
    assert c.take_due(2.0, 10) == [] and c.pending_users == 2
    c.finished(first.user, 2.0)
    c.release(2.0)
    (batch,) = c.take_due(3.0, 10)
    assert (batch.user, batch.renamed_from, batch.tags, list(batch.seqs)) == (B, A, {"plan": "vip"}, [2, 3])


def test_a_rename_onto_an_identity_with_pending_changes_of_its_own_waits_until_they_are_sent():
    c = Coalescer(0.0, 1.0)
    c.add(change(B, 1, plan="other user"), 0.0)
    c.add(change(B, 2, A, plan="renamed"), 0.0)
    (first,) = c.take_due(1.0, 10)
    assert (first.renamed_from, first.tags) == (None, {"plan": "other user"})
    c.finished(first.user, 1.0)
    c.release(1.0)
    (batch,) = c.take_due(5.0, 10)
    assert (batch.renamed_from, batch.tags) == (A, {"plan": "renamed"})


def test_a_new_row_taking_the_old_identity_waits_until_the_rename_is_done():
    """UPDATE users SET id = 'b' WHERE id = 'a'; INSERT a new 'a'. Until OneSignal's user is
    renamed it still answers to `a`: the new row's change sent meanwhile would land on it (and be
    renamed away with it). It waits for the rename, pending or in flight, then goes as a new user."""
    c = Coalescer(0.0, 1.0)
    c.add(change(B, 1, A, plan="renamed"), 0.0)
    c.add(change(A, 2, plan="fresh"), 0.0)
    (rename,) = c.take_due(1.0, 10)
    assert (rename.user, rename.renamed_from, list(rename.seqs)) == (B, A, [1])
    assert c.take_due(2.0, 10) == []  # the new `a` waits while the rename is in flight
    c.finished(B, 1.0)
    c.release(1.0)
    (fresh,) = c.take_due(3.0, 10)
    assert (fresh.user, fresh.renamed_from, fresh.tags, list(fresh.seqs)) == (A, None, {"plan": "fresh"}, [2])


def test_a_swap_of_two_identities_in_one_window_goes_one_rename_at_a_time():
    """a -> t, b -> a, t -> b (swapping two ids through a temporary one): each rename waits until
    the identity it takes is free at OneSignal, so no two renames conflict (409) on one id."""
    c = Coalescer(0.0, 1.0)
    T = UserRef("external_id", "t")
    c.add(change(T, 1, A), 0.0)
    c.add(change(A, 2, B), 0.0)
    c.add(change(B, 3, T), 0.0)
    done: list[tuple[UserRef, UserRef | None]] = []
    now = 1.0
    while len(done) < 3:
        batches = c.take_due(now, 10)
        assert len(batches) <= 1, [(b.user, b.renamed_from) for b in batches]  # one at a time
        for batch in batches:
            done.append((batch.user, batch.renamed_from))
            c.finished(batch.user, now)
        c.release(now)
        now += 1.0
        assert now < 10, done
    assert done == [(T, A), (A, B), (B, T)]


def test_a_retried_rename_is_still_a_rename():
    c = Coalescer(0.0, 1.0)
    c.add(change(B, 1, A, plan="pro"), 0.0)
    (batch,) = c.take_due(1.0, 10)
    c.finished(B, 1.0)
    c.requeue(batch, 2.0, 1.0)
    (again,) = c.take_due(5.0, 10)
    assert again.renamed_from == A


def test_the_stale_value_filter_follows_a_rename():
    from bridge.staleness import StaleFilter

    f = StaleFilter()
    assert f.filter(change(A, 1, plan="newest"), (30,)) is not None
    renamed = f.filter(change(B, 2, A), (20,))
    assert renamed is not None and renamed.renamed_from == A, "a rename itself is never stale"
    assert f.filter(change(B, 3, plan="older"), (25,)) is None, "the field was set later under the old identity"
