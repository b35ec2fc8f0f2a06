"""The stale-value filter (Kafka partitions): one record per user, a field dropped when a later
source position already set it."""

from __future__ import annotations

from bridge.events import Origin, SubscriptionChange, UserChange, UserRef
from bridge.staleness import StaleFilter

U = UserRef("external_id", "1")


def change(seq: int, delete: bool = False, **tags: str) -> UserChange:
    return UserChange(U, Origin("public.users", "id=1", f"p{seq}", seq), delete_user=delete, tags=tags)


def test_a_change_with_nothing_stale_passes_as_it_is() -> None:
    f = StaleFilter()
    ch = change(1, plan="pro")
    assert f.filter(ch, (10,)) is ch
    newer = change(2, plan="free", country="FR")
    assert f.filter(newer, (11,)) is newer


def test_an_older_value_of_a_field_is_dropped_and_the_rest_kept() -> None:
    f = StaleFilter()
    f.filter(change(1, plan="pro"), (20,))
    late = f.filter(change(2, plan="free", country="FR"), (10,))
    assert late is not None and late.tags == {"country": "FR"} and late.origin.seq == 2
    assert f.filter(change(3, plan="gold"), (15,)) is None  # nothing of it is current
    assert f.dropped == 2


def test_a_deletion_supersedes_older_changes_and_a_later_one_starts_afresh() -> None:
    f = StaleFilter()
    assert f.filter(change(1, delete=True), (30,)) is not None
    assert f.filter(change(2, plan="pro"), (20,)) is None
    assert f.filter(change(3, plan="pro"), (40,)) is not None


def test_subscriptions_are_filtered_by_channel() -> None:
    f = StaleFilter()
    sub = SubscriptionChange("email", "a@example.com")
    f.filter(UserChange(U, Origin("t", "k", "p", 1), subscriptions=(sub,)), (50,))
    older = UserChange(U, Origin("t", "k", "p", 2), tags={"plan": "x"},
                       subscriptions=(SubscriptionChange("email", "b@example.com"),))
    kept = f.filter(older, (40,))
    assert kept is not None and kept.subscriptions == () and kept.tags == {"plan": "x"}


def test_memory_is_bounded_by_users_and_a_forgotten_user_accepts_the_next_value() -> None:
    f = StaleFilter(capacity=2)
    f.filter(change(1, plan="pro"), (100,))
    for i in range(2, 5):
        other = UserChange(UserRef("external_id", str(i)), Origin("t", "k", "p", i), tags={"plan": "x"})
        f.filter(other, (1,))
    assert len(f._users) == 2
    assert f.filter(change(9, plan="free"), (5,)) is not None  # user 1 was forgotten
