"""SlotAllocator on tiny pools: exact slot ids, the runs a sequence's tokens get, the fallbacks, the bookkeeping."""

from __future__ import annotations

import random

import pytest
import torch

from deltaserve.kv.allocator import PAGE, OutOfSlots, SlotAllocator


def ids(t: torch.Tensor) -> list[int]:
    return t.tolist()


def span(lo: int, hi: int) -> list[int]:
    return list(range(lo, hi))


def test_a_fresh_pool_hands_out_whole_pages_in_order():
    a = SlotAllocator(4 * PAGE)
    assert ids(a.allocate(3)) == [0, 1, 2]
    assert ids(a.allocate(2)) == [16, 17]  # another sequence: a page of its own, not slot 3
    assert ids(a.allocate(20)) == span(32, 52)  # a page, then the next page continuing it (entirely free)
    assert a.num_free == 64 - 25
    a.check_integrity(torch.tensor([0, 1, 2, 16, 17, *span(32, 52)]))


def test_a_sequence_continues_its_last_slot():
    a = SlotAllocator(4 * PAGE)
    first = a.allocate(3)  # positions 0..2, page 0
    other = a.allocate(9)  # another sequence, page 1
    assert ids(a.allocate(9, pos=3, after=int(first[-1]))) == span(3, 12)  # same page, right after
    # positions 12..15 take the rest of page 0; page 1 is not entirely free, so position 16 opens page 2
    assert ids(a.allocate(8, pos=12, after=11)) == span(12, 16) + span(32, 36)
    assert ids(a.allocate(4, pos=9, after=int(other[-1]))) == span(25, 29)  # page 1 still has room
    a.check_integrity(torch.tensor(span(0, 16) + span(16, 29) + span(32, 36)))


def test_a_new_page_puts_a_position_at_its_offset():
    """Position p at offset p % PAGE: the kernels' 16-key windows (positions 16k .. 16k + 15) are whole pages."""
    a = SlotAllocator(4 * PAGE)
    assert ids(a.allocate(4, pos=18)) == [2, 3, 4, 5]  # page 0, offset 2; slots 0 and 1 stay free
    assert a.free_slots()[:2] == [0, 1]
    assert ids(a.allocate(2)) == [16, 17]  # slots 0 and 1 are not a whole page: the next whole page
    # a tail that is not where its position says (a prefix from elsewhere) still continues in its page
    assert ids(a.allocate(2, pos=7, after=17)) == [18, 19]


def test_crossing_a_page_boundary_needs_the_whole_next_page():
    a = SlotAllocator(3 * PAGE)
    assert ids(a.allocate(16)) == span(0, 16)
    assert ids(a.allocate(1)) == [16]  # someone else in page 1
    # position 16 of the first sequence: page 1 is not entirely free, so the next whole page, at offset 0
    assert ids(a.allocate(3, pos=16, after=15)) == [32, 33, 34]


def test_rejected_slots_come_back_to_the_same_sequence():
    """Speculative rejects free a sequence's last slots; its next reservation takes them again, so verify steps of
    interleaved sequences still leave each one's keys in runs."""
    a = SlotAllocator(8 * PAGE)
    s1, s2 = ids(a.allocate(5)), ids(a.allocate(5))
    for _ in range(6):  # each step: both reserve 1 + 8 drafts, keep 3, give back 6
        for s in (s1, s2):
            new = a.allocate(9, pos=len(s), after=s[-1])
            a.free(new[3:])
            s.extend(ids(new[:3]))
    assert s1 == span(0, 16) + span(32, 39)  # page 0, then a whole page at offset 0 for position 16
    assert s2 == span(16, 32) + span(48, 55)
    a.check_integrity(torch.tensor(s1 + s2))


def test_without_whole_pages_free_slots_come_by_next_fit():
    a = SlotAllocator(2 * PAGE)
    held = [a.allocate(PAGE), a.allocate(PAGE)]
    a.free(torch.tensor([3, 4, 20, 21, 22]))  # no page entirely free
    assert ids(a.allocate(4)) == [3, 4, 20, 21]  # the next free slots from the cursor (0), runs kept together
    assert ids(a.allocate(1)) == [22]
    with pytest.raises(OutOfSlots):
        a.allocate(1)
    owned = sorted(set(ids(torch.cat(held))))
    a.check_integrity(torch.tensor(owned))


def test_the_whole_page_freed_last_is_taken_first():
    a = SlotAllocator(4 * PAGE)
    pages = [a.allocate(PAGE) for _ in range(4)]
    a.free(pages[2])
    a.free(pages[0])
    a.free(pages[3][:8])
    assert ids(a.allocate(2)) == [0, 1]  # page 0 was freed last
    assert ids(a.allocate(2)) == [32, 33]  # then page 2
    assert ids(a.allocate(1)) == [2]  # no whole page left: the next free slot from the cursor (0)


def test_slots_past_the_last_whole_page_are_used():
    a = SlotAllocator(PAGE + 5)
    assert ids(a.allocate(PAGE)) == span(0, 16)
    assert ids(a.allocate(5)) == span(16, 21)  # no whole page there; next fit
    assert a.num_free == 0
    a.free(torch.tensor([18]))
    assert ids(a.allocate(1, pos=3, after=17)) == [18]


def test_shared_slots_free_with_their_last_holder():
    a = SlotAllocator(PAGE)
    s = a.allocate(4)
    a.share(s[:2])
    a.free(s)
    assert a.free_slots() == span(2, 16)
    a.free(s[:2])
    assert a.num_free == PAGE and a.num_shared == 0
    a.check_integrity(torch.empty(0, dtype=torch.int64))


def test_freeing_a_free_slot_is_refused():
    a = SlotAllocator(PAGE)
    s = a.allocate(2)
    a.free(s)
    with pytest.raises(RuntimeError, match="freed twice"):
        a.free(s[:1])


def test_check_integrity_finds_broken_bookkeeping():
    a = SlotAllocator(2 * PAGE)
    s = a.allocate(3)
    a._page_free[0] += 1
    with pytest.raises(AssertionError, match="page 0"):
        a.check_integrity(s)
    a._page_free[0] -= 1
    a.check_integrity(s)
    with pytest.raises(AssertionError, match="leak"):
        a.check_integrity(s[:2])


def test_the_queue_of_whole_pages_stays_bounded():
    """A page taken by a sequence crossing into it is not popped from the queue; freed again, it is queued again.
    The stale entries are dropped before the queue passes 2 x pages + 64, keeping each whole page once, in order."""
    a = SlotAllocator(2 * PAGE)
    tail = a.allocate(PAGE)  # page 0, positions 0..15
    for _ in range(200):
        s = a.allocate(1, pos=PAGE, after=int(tail[-1]))
        assert ids(s) == [PAGE]  # across the boundary into page 1, entirely free
        a.free(s)
        assert len(a._whole) <= 2 * 2 + 64
    a.check_integrity(tail)
    assert ids(a.allocate(3)) == [16, 17, 18]  # page 1, from the queue
    a.check_integrity(torch.cat([tail, torch.tensor([16, 17, 18])]))


def test_random_churn_keeps_the_books():
    """Sequences growing, rolling back and finishing at random; the queue of whole pages stays bounded."""
    rng = random.Random(0)
    a = SlotAllocator(10 * PAGE + 3)
    seqs: list[list[int]] = []
    for _ in range(3000):
        op = rng.random()
        if op < 0.5 and seqs:
            s = rng.choice(seqs)
            n = min(rng.randint(1, 20), a.num_free)
            if n:
                s.extend(ids(a.allocate(n, pos=len(s), after=s[-1] if s else None)))
        elif op < 0.7 and seqs:
            s = rng.choice(seqs)
            k = rng.randint(0, len(s))
            a.free(torch.tensor(s[k:], dtype=torch.int64))
            del s[k:]
        elif op < 0.8 and seqs:
            s = seqs.pop(rng.randrange(len(seqs)))
            a.free(torch.tensor(s, dtype=torch.int64))
        elif a.num_free:
            seqs.append(ids(a.allocate(min(rng.randint(1, 40), a.num_free))))
        a.check_integrity(torch.tensor([x for s in seqs for x in s], dtype=torch.int64))
        assert len(a._whole) <= 2 * a._num_pages + 64 + 1
