"""Radix namespaces (tenant isolation): a match never crosses namespaces; LRU eviction stays global."""

from __future__ import annotations

from deltaserve.cache.radix import RadixCache
from tests.test_radix import Ticker, free_list, ids, make


def test_insert_in_a_is_not_matched_from_b():
    alloc, radix = make(8)
    radix.insert([1, 2, 3], alloc.allocate(3), namespace="A")
    assert radix.match_prefix([1, 2, 3], namespace="B").num_matched == 0
    assert radix.match_prefix([1, 2, 3]).num_matched == 0  # default namespace is its own
    m = radix.match_prefix([1, 2, 3, 4], namespace="A")
    assert m.num_matched == 3 and ids(m.slots) == [0, 1, 2]
    radix.check_integrity()


def test_same_prompt_in_two_namespaces_owns_two_slot_runs():
    alloc, radix = make(8)
    assert radix.insert([5, 6], alloc.allocate(2), namespace="A") == 0
    assert radix.insert([5, 6], alloc.allocate(2), namespace="B") == 0  # no sharing: B pays its own KV
    assert ids(radix.match_prefix([5, 6], namespace="B").slots) == [2, 3]
    assert radix.evictable_size == 4
    radix.check_integrity()


def test_lru_eviction_is_global_across_namespaces():
    alloc, radix = make(8, clock=Ticker())
    radix.insert([1, 2], alloc.allocate(2), namespace="A")  # slots 0,1 — oldest
    radix.insert([3, 4], alloc.allocate(2), namespace="B")  # slots 2,3
    radix.insert([5, 6], alloc.allocate(2), namespace="A")  # slots 4,5
    radix.match_prefix([1, 2], namespace="A")  # refresh A's first: B's is now oldest
    assert radix.evict(2) == 2
    assert free_list(alloc)[-2:] == [2, 3]
    assert radix.match_prefix([3, 4], namespace="B").num_matched == 0
    assert radix.match_prefix([5, 6], namespace="A").num_matched == 2
    radix.check_integrity()


def test_locks_and_reset_cover_every_namespace():
    alloc, radix = make(8)
    res = radix.insert_with_node([1, 2, 3], alloc.allocate(3), namespace="A")
    radix.lock(res.node)
    assert radix.protected_size == 3 and radix.evict(8) == 0
    radix.check_integrity()
    radix.unlock(res.node)
    radix.reset()
    assert radix.evictable_size == 0 and len(free_list(alloc)) == 8
    radix.check_integrity()


def test_is_still_a_radix_cache():
    assert isinstance(make()[1], RadixCache)
