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
