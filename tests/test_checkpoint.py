"""Checkpoint watermark: the source confirms a position only when everything before it is done."""

from __future__ import annotations

import random

from hypothesis import given, seed, settings
from hypothesis import strategies as st

from bridge.checkpoint import Watermark

SEED = 20240601


def test_nothing_is_confirmable_before_the_first_marker() -> None:
    w = Watermark()
    w.complete(w.issue())
    assert w.confirmable is None


def test_marker_with_nothing_outstanding_is_confirmable_at_once() -> None:
    w = Watermark()
    w.mark("0/10")
    assert w.confirmable == "0/10"
    assert w.idle


def test_marker_waits_for_every_earlier_event() -> None:
    w = Watermark()
    a, b = w.issue(), w.issue()
    w.mark("0/10")
    w.complete(b)
    assert w.confirmable is None
    assert not w.idle
    w.complete(a)
    assert w.confirmable == "0/10"
    assert w.idle


def test_out_of_order_completion_confirms_only_up_to_the_first_gap() -> None:
    w = Watermark()
    first = w.issue()
    w.mark("0/10")
    second = w.issue()
    w.mark("0/20")
    third = w.issue()
    w.mark("0/30")

    w.complete(third)
    w.complete(second)
    assert w.confirmable is None
    w.complete(first)
    assert w.confirmable == "0/30"


def test_confirmable_never_passes_an_event_that_is_not_done() -> None:
    w = Watermark()
    first = w.issue()
    w.mark("0/10")
    second = w.issue()
    w.mark("0/20")
    w.complete(first)
    assert w.confirmable == "0/10"
    w.complete(second)
    assert w.confirmable == "0/20"


def test_events_issued_after_a_marker_do_not_hold_it_back() -> None:
    w = Watermark()
    e = w.issue()
    w.mark("0/10")
    later = w.issue()
    w.complete(e)
    assert w.confirmable == "0/10"
    assert w.outstanding == 1 and not w.idle
    w.complete(later)
    assert w.idle


def test_duplicate_completions_are_harmless() -> None:
    w = Watermark()
    a, b = w.issue(), w.issue()
    w.mark("0/10")
    w.complete(a)
    w.complete(a)
    assert w.confirmable is None
    w.complete_many([b, b, a])
    assert w.confirmable == "0/10"
    w.complete(b)
    w.complete_many([a, b])
    assert w.confirmable == "0/10" and w.idle


def test_complete_many_advances_past_a_batch_of_seqs() -> None:
    w = Watermark()
    seqs = [w.issue() for _ in range(5)]
    w.mark("0/50")
    w.complete_many(seqs[1:])
    assert w.confirmable is None
    w.complete_many(seqs[:1])
    assert w.confirmable == "0/50"


def test_correct_across_compaction_after_many_seqs() -> None:
    """More than 65,536 seqs pass while an early one stays outstanding, then the rest follows."""
    w = Watermark()
    blocker = w.issue()
    w.mark("first")
    for _ in range(70_000):
        w.complete(w.issue())
    w.mark("second")
    assert w.confirmable is None
    w.complete(blocker)
    assert w.confirmable == "second"
    # A long run that passes the compaction threshold with the head still moving.
    seqs = [w.issue() for _ in range(140_000)]
    w.mark("third")
    rng = random.Random(SEED)
    tail = seqs[70_000:]
    for s in seqs[:70_000]:
        w.complete(s)
    assert w.confirmable == "second"
    rng.shuffle(tail)
    w.complete_many(tail)
    assert w.confirmable == "third"
    assert w.idle and w.outstanding == 0


def test_memory_stays_bounded_while_the_watermark_moves() -> None:
    w = Watermark()
    for i in range(300_000):
        w.complete(w.issue())
        if i % 1000 == 0:
            w.mark(i)
    assert len(w._done) <= 65_537 + 1


class NaiveWatermark:
    """The specification, spelled out: the last marker below the first seq not done."""

    def __init__(self) -> None:
        self.not_done: set[int] = set()
        self.markers: list[tuple[int, object]] = []
        self.next = 0

    def issue(self) -> int:
        self.not_done.add(self.next)
        self.next += 1
        return self.next - 1

    def mark(self, position: object) -> None:
        seq = self.issue()
        self.markers.append((seq, position))
        self.complete(seq)

    def complete(self, seq: int) -> None:
        self.not_done.discard(seq)

    @property
    def confirmable(self) -> object:
        first_gap = min(self.not_done, default=self.next)
        passed = [position for seq, position in self.markers if seq < first_gap]
        return passed[-1] if passed else None


def run_against_the_naive_model(w: Watermark, naive: NaiveWatermark, plan: list[tuple[int, bool]],
                                data: st.DataObject, outstanding: list[int]) -> None:
    """Each step issues a few events (optionally closing with a marker), then completes some
    outstanding ones in random order, with duplicates, one by one or as a batch."""
    done: list[int] = []
    for step, (events, marker) in enumerate(plan):
        for _ in range(events):
            seq = w.issue()
            assert seq == naive.issue()
            outstanding.append(seq)
        if marker:
            w.mark(step)
            naive.mark(step)
        candidates = outstanding + done
        picked = data.draw(st.lists(st.sampled_from(candidates), max_size=6)) if candidates else []
        if data.draw(st.booleans()):
            w.complete_many(picked)
        else:
            for s in picked:
                w.complete(s)
        for s in picked:
            naive.complete(s)
            if s in outstanding:
                outstanding.remove(s)
                done.append(s)
        assert w.confirmable == naive.confirmable
    for s in outstanding:
        w.complete(s)
        naive.complete(s)
    assert w.confirmable == naive.confirmable
    assert w.idle


steps = st.lists(st.tuples(st.integers(0, 4), st.booleans()), min_size=1, max_size=40)


@seed(SEED)
@settings(max_examples=200, deadline=None, print_blob=True)
@given(plan=steps, data=st.data())
def test_random_completion_orders_match_the_naive_model(plan: list[tuple[int, bool]], data: st.DataObject) -> None:
    run_against_the_naive_model(Watermark(), NaiveWatermark(), plan, data, [])


@seed(SEED)
@settings(max_examples=20, deadline=None, print_blob=True)
@given(plan=steps, data=st.data())
def test_random_completion_orders_match_the_naive_model_across_compaction(
    plan: list[tuple[int, bool]], data: st.DataObject
) -> None:
    """An old event stays outstanding while more than 65,536 later ones are done: compaction
    happens in the middle of the random part, when that event completes."""
    w, naive = Watermark(), NaiveWatermark()
    blocker = w.issue()
    naive.issue()
    w.mark("bulk")
    naive.mark("bulk")
    bulk = [w.issue() for _ in range(65_600)]
    for _ in bulk:
        naive.issue()
    w.complete_many(bulk)
    for s in bulk:
        naive.complete(s)
    run_against_the_naive_model(w, naive, plan, data, [blocker])
