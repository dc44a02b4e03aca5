"""RadixCache: exact slot ids and eviction order on tiny pools, then a stateful model check."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from deltaserve.cache.base import PrefixCache
from deltaserve.cache.radix import RadixCache, RadixNode
from deltaserve.kv.allocator import SlotAllocator


class Ticker:
    """Fake clock that advances one tick per reading: every operation is strictly later."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 1.0
        return self.t


class FreeOrder(SlotAllocator):
    """The allocator, recording the order its slots became free (never used ones first, by id): the eviction-order
    tests read which slots the tree gave back, and when."""

    def __init__(self, num_slots: int):
        super().__init__(num_slots)
        self.order = dict.fromkeys(range(num_slots))  # an insertion-ordered set

    def allocate(self, n: int, pos: int = 0, after: int | None = None) -> torch.Tensor:
        out = super().allocate(n, pos, after)
        for s in out.tolist():
            del self.order[s]
        return out

    def free(self, slots: torch.Tensor) -> None:
        super().free(slots)
        for s in slots.tolist():
            if self._is_free[s] and s not in self.order:  # a shared slot still held is not free yet
                self.order[s] = None


def make(num_slots: int = 8, clock=None) -> tuple[FreeOrder, RadixCache]:
    alloc = FreeOrder(num_slots)
    return alloc, RadixCache(alloc, clock=clock or Ticker())


def ids(t: torch.Tensor) -> list[int]:
    return t.tolist()


def free_list(alloc: FreeOrder) -> list[int]:
    """The free slots, in the order they became free."""
    return list(alloc.order)


def path_of(node: RadixNode) -> list[int]:
    keys = []
    while node.parent is not None:
        keys.append(node.key)
        node = node.parent
    return [t for k in reversed(keys) for t in k]


def insert_fresh(alloc: SlotAllocator, radix: RadixCache, tokens: list[int]) -> int:
    return radix.insert(tokens, alloc.allocate(len(tokens)))


def insert_engine(alloc: SlotAllocator, radix: RadixCache, tokens: list[int]) -> int:
    """What the engine does: reuse the matched slots, allocate only the rest."""
    m = radix.match_prefix(tokens)
    return radix.insert(tokens, torch.cat([m.slots, alloc.allocate(len(tokens) - m.num_matched)]))


# ---------------------------------------------------------------------- match / insert


def test_is_a_prefix_cache():
    assert isinstance(make()[1], PrefixCache)


def test_match_returns_exact_slots_and_splits():
    alloc, radix = make()
    assert insert_fresh(alloc, radix, [1, 2, 3, 4, 5]) == 0  # slots 0..4
    m = radix.match_prefix([1, 2, 3, 9])
    assert (ids(m.slots), m.num_matched) == ([0, 1, 2], 3)
    assert m.node.key == (1, 2, 3) and path_of(m.node) == [1, 2, 3]
    (lower,) = m.node.children.values()
    assert lower.key == (4, 5) and ids(lower.value) == [3, 4]
    assert radix.total_size == 5 and radix.evictable_size == 5
    radix.check_integrity()


def test_match_nothing_and_empty():
    alloc, radix = make()
    insert_fresh(alloc, radix, [1, 2])
    for q in ([], [2, 1], [7]):
        m = radix.match_prefix(q)
        assert m.num_matched == 0 and m.node is radix.root and m.slots.dtype == torch.int64 and m.slots.numel() == 0
    assert insert_fresh(alloc, radix, []) == 0
    radix.check_integrity()


def test_divergence_and_truncation():
    alloc, radix = make(16)
    insert_fresh(alloc, radix, [1, 2, 3, 4, 5])  # slots 0..4
    d = radix.match_prefix([1, 2, 3, 7, 8])  # diverges inside the node
    assert (ids(d.slots), path_of(d.node)) == ([0, 1, 2], [1, 2, 3])
    t = radix.match_prefix([1, 2])  # truncation: ends inside (1,2,3) → split again
    assert (ids(t.slots), path_of(t.node)) == ([0, 1], [1, 2])
    full = radix.match_prefix([1, 2, 3, 4, 5, 6])  # longer than cached
    assert (ids(full.slots), full.num_matched) == ([0, 1, 2, 3, 4], 5)
    # branch off at the divergence point; the shared prefix keeps its slots
    assert insert_engine(alloc, radix, [1, 2, 3, 7, 8]) == 3
    assert ids(radix.match_prefix([1, 2, 3, 7, 8]).slots) == [0, 1, 2, 5, 6]
    assert sorted(n.key for n in radix.match_prefix([1, 2, 3]).node.children.values()) == [(4, 5), (7, 8)]
    radix.check_integrity()


def test_insert_duplicate_frees_the_duplicates():
    alloc, radix = make(8)
    assert insert_fresh(alloc, radix, [1, 2, 3]) == 0  # tree owns 0,1,2
    assert insert_fresh(alloc, radix, [1, 2, 3, 4]) == 3  # passed 3,4,5,6: 3,4,5 duplicate
    assert free_list(alloc) == [7, 3, 4, 5]
    assert ids(radix.match_prefix([1, 2, 3, 4]).slots) == [0, 1, 2, 6]
    assert insert_fresh(alloc, radix, [1, 2]) == 2  # fully present: all passed slots freed (7, 3)
    assert free_list(alloc) == [4, 5, 7, 3]
    radix.check_integrity()


def test_insert_with_own_slots_frees_nothing():
    alloc, radix = make(8)
    insert_fresh(alloc, radix, [1, 2, 3])
    assert insert_engine(alloc, radix, [1, 2, 3, 4, 5]) == 3  # extends the leaf with slots 3,4
    assert free_list(alloc) == [5, 6, 7]
    r = radix.insert_with_node([1, 2, 3, 4, 5], radix.match_prefix([1, 2, 3, 4, 5]).slots)
    assert r.num_existing == 5 and path_of(r.node) == [1, 2, 3, 4, 5]
    assert free_list(alloc) == [5, 6, 7]
    radix.check_integrity()


def test_insert_splits_and_returns_node_ending_the_path():
    alloc, radix = make(8)
    insert_fresh(alloc, radix, [1, 2, 3, 4])  # 0..3
    r = radix.insert_with_node([1, 2, 5], torch.cat([torch.tensor([0, 1]), alloc.allocate(1)]))  # new slot 4
    assert r.num_existing == 2 and r.node.key == (5,) and path_of(r.node) == [1, 2, 5]
    upper = r.node.parent
    assert upper.key == (1, 2) and sorted(upper.children) == [3, 5]
    r2 = radix.insert_with_node([1], torch.tensor([0]))  # ends inside (1,2): split, nothing freed
    assert r2.num_existing == 1 and path_of(r2.node) == [1]
    assert free_list(alloc) == [5, 6, 7]
    radix.check_integrity()


def test_insert_rejects_wrong_slot_count():
    alloc, radix = make()
    with pytest.raises(ValueError):
        radix.insert([1, 2], alloc.allocate(3))


def test_insert_does_not_alias_callers_tensor():
    alloc, radix = make()
    slots = alloc.allocate(2)
    radix.insert([1, 2], slots)
    slots.fill_(99)
    assert ids(radix.match_prefix([1, 2]).slots) == [0, 1]


# ---------------------------------------------------------------------- locks


def test_lock_unlock_refcounts_and_sizes():
    alloc, radix = make(8)
    insert_fresh(alloc, radix, [1, 2, 3, 4])
    insert_engine(alloc, radix, [1, 2, 5])  # (1,2) -> {(3,4), (5)}
    leaf = radix.match_prefix([1, 2, 3, 4]).node
    upper = leaf.parent
    radix.lock(leaf)
    radix.lock(leaf)
    radix.lock(upper)
    assert (leaf.ref, upper.ref, leaf.own_locks, upper.own_locks) == (2, 3, 2, 1)
    assert (radix.protected_size, radix.evictable_size) == (4, 1)
    radix.check_integrity()
    radix.unlock(leaf)
    radix.unlock(leaf)
    assert (leaf.ref, upper.ref, radix.protected_size) == (0, 1, 2)
    with pytest.raises(ValueError):
        radix.unlock(leaf)  # below zero
    radix.unlock(upper)
    assert (radix.protected_size, radix.evictable_size) == (0, 5)
    radix.check_integrity()


def test_split_of_locked_node_inherits_ref():
    alloc, radix = make(8)
    insert_fresh(alloc, radix, [1, 2, 3, 4])
    node = radix.match_prefix([1, 2, 3, 4]).node
    radix.lock(node)
    m = radix.match_prefix([1, 2])  # splits the locked node
    assert m.node is not node and node.parent is m.node
    assert (m.node.ref, m.node.own_locks, node.ref, node.own_locks) == (1, 0, 1, 1)
    assert radix.protected_size == 4
    radix.check_integrity()
    radix.unlock(node)  # the handle still means "end of [1,2,3,4]"
    assert (m.node.ref, radix.evictable_size) == (0, 4)
    radix.check_integrity()


def test_lock_root_is_noop_and_lock_evicted_raises():
    alloc, radix = make(8)
    radix.lock(radix.root)
    radix.unlock(radix.root)
    insert_fresh(alloc, radix, [1])
    node = radix.match_prefix([1]).node
    assert radix.evict(1) == 1
    with pytest.raises(ValueError):
        radix.lock(node)
    radix.check_integrity()


# ---------------------------------------------------------------------- eviction order


def test_evict_lru_exact_order():
    alloc, radix = make(8)
    insert_fresh(alloc, radix, [1, 1])  # slots 0,1
    insert_fresh(alloc, radix, [2, 2])  # slots 2,3
    insert_fresh(alloc, radix, [3, 3])  # slots 4,5
    radix.match_prefix([1, 1])  # A is now the most recent
    assert radix.evict(2) == 2  # B is oldest
    assert free_list(alloc) == [6, 7, 2, 3]
    assert radix.match_prefix([2, 2]).num_matched == 0
    assert radix.evict(1) == 2  # whole node C, even though 1 was asked
    assert free_list(alloc) == [6, 7, 2, 3, 4, 5]
    assert radix.evict(100) == 2 and radix.total_size == 0
    assert free_list(alloc) == [6, 7, 2, 3, 4, 5, 0, 1]
    radix.check_integrity()


def test_evict_ties_broken_by_creation_order():
    alloc, radix = make(8, clock=lambda: 0.0)
    for t in ([5], [4], [3]):
        insert_fresh(alloc, radix, t)  # slots 0, 1, 2 at the same time
    assert radix.evict(1) == 1 and free_list(alloc)[-1] == 0
    assert radix.evict(1) == 1 and free_list(alloc)[-1] == 1


def test_evict_skips_locked_paths():
    alloc, radix = make(8)
    insert_fresh(alloc, radix, [1, 2])  # 0,1 (oldest)
    insert_fresh(alloc, radix, [3])  # 2
    radix.lock(radix.match_prefix([1, 2]).node)  # touches it too; lock regardless of age
    insert_fresh(alloc, radix, [4])  # 3
    assert radix.evict(10) == 2  # only [3] and [4]
    assert free_list(alloc)[-2:] == [2, 3]
    assert radix.match_prefix([1, 2]).num_matched == 2
    assert (radix.evictable_size, radix.protected_size) == (0, 2)
    radix.check_integrity()


def test_parent_becomes_leaf_then_evicted():
    alloc, radix = make(8)
    insert_fresh(alloc, radix, [1, 2, 3])  # 0,1,2
    insert_engine(alloc, radix, [1, 2, 4])  # (1,2)->{(3):2, (4):3}
    assert radix.evict(4) == 4
    assert free_list(alloc) == [4, 5, 6, 7, 2, 3, 0, 1]  # leaves first (older first), then the parent
    assert radix.total_size == 0 and not radix.root.children
    radix.check_integrity()


def test_parent_competes_with_other_leaves_by_age():
    alloc, radix = make(8)
    insert_fresh(alloc, radix, [1, 2, 3])  # 0,1,2 at t1
    radix.match_prefix([1, 2])  # split; (1,2) touched at t2, (3) stays at t1
    insert_fresh(alloc, radix, [5])  # 3 at t3
    assert radix.evict(1) == 1 and free_list(alloc)[-1] == 2  # leaf (3)
    assert radix.evict(1) == 2 and free_list(alloc)[-2:] == [0, 1]  # parent (1,2) older than (5)
    assert radix.match_prefix([5]).num_matched == 1
    radix.check_integrity()


def test_evict_locked_child_keeps_parent():
    alloc, radix = make(8)
    insert_fresh(alloc, radix, [1, 2, 3])
    insert_engine(alloc, radix, [1, 2, 4])
    radix.lock(radix.match_prefix([1, 2, 4]).node)
    assert radix.evict(10) == 1  # only leaf (3); (1,2) is on the locked path
    assert radix.match_prefix([1, 2, 4]).num_matched == 3
    radix.check_integrity()


def test_reset_and_extra_owned():
    alloc, radix = make(8)
    insert_fresh(alloc, radix, [1, 2, 3])
    private = alloc.allocate(2)  # a running sequence's tail, outside the tree
    radix.check_integrity(extra_owned=private)
    with pytest.raises(AssertionError):
        radix.check_integrity()  # those 2 look leaked without extra_owned
    node = radix.match_prefix([1, 2, 3]).node
    radix.lock(node)
    with pytest.raises(RuntimeError):
        radix.reset()
    radix.unlock(node)
    radix.reset()
    assert radix.total_size == 0 and alloc.num_free == 6 and node.detached
    radix.check_integrity(extra_owned=private)


# ---------------------------------------------------------------------- stateful model check

POOL = 16
tokens_st = st.lists(st.integers(0, 2), min_size=1, max_size=6)


class RadixMachine(RuleBasedStateMachine):
    """RadixCache vs a token-level model.

    Model: `cached` maps every cached prefix (tuple) to the slot of its last
    token (the set is prefix-closed); `atime` maps it to the op index that last
    touched it; `locks` are (node, prefix) pairs held. Protected prefixes are
    all prefixes of locked ones.
    """

    @initialize()
    def setup(self):
        self.alloc, self.radix = make(POOL)
        self.cached: dict[tuple[int, ...], int] = {}
        self.atime: dict[tuple[int, ...], int] = {}
        self.locks: list[tuple[RadixNode, tuple[int, ...]]] = []
        self.op = 0

    # -- model helpers
    def model_match(self, tokens) -> int:
        n = 0
        while n < len(tokens) and tuple(tokens[: n + 1]) in self.cached:
            n += 1
        return n

    def touch(self, tokens, n):
        self.op += 1
        for i in range(1, n + 1):
            self.atime[tuple(tokens[:i])] = self.op

    def protected(self) -> set[tuple[int, ...]]:
        return {p[:i] for _, p in self.locks for i in range(1, len(p) + 1)}

    def tree_prefixes(self) -> dict[tuple[int, ...], int]:
        out = {}
        stack = [(self.radix.root, ())]
        while stack:
            node, path = stack.pop()
            for child in node.children.values():
                for j, s in enumerate(child.value.tolist()):
                    out[path + child.key[: j + 1]] = s
                stack.append((child, path + child.key))
        return out

    def checked_match(self, tokens):
        want = self.model_match(tokens)
        m = self.radix.match_prefix(tokens)
        assert m.num_matched == want
        assert m.slots.tolist() == [self.cached[tuple(tokens[: i + 1])] for i in range(want)]
        assert path_of(m.node) == list(tokens[:want])
        self.touch(tokens, want)
        return m

    def checked_evict(self, k: int) -> int:
        before, free_before = dict(self.cached), self.alloc.num_free
        prot = self.protected()
        freed = self.radix.evict(k)
        after = self.tree_prefixes()
        removed = set(before) - set(after)
        assert set(after) <= set(before) and all(after[p] == before[p] for p in after)
        assert len(removed) == freed and self.alloc.num_free == free_before + freed
        assert not (removed & prot), "evicted a locked prefix"
        assert freed >= k or self.radix.evictable_size == 0
        # LRU: nothing evicted is newer than a surviving unlocked leaf
        leaves = [p for p in after if p not in prot and not any(q[:-1] == p for q in after)]
        if removed and leaves:
            assert max(self.atime[p] for p in removed) <= min(self.atime[p] for p in leaves)
        for p in removed:
            del self.cached[p], self.atime[p]
        return freed

    def make_room(self, n: int) -> bool:
        if not self.alloc.can_allocate(n):
            self.checked_evict(n - self.alloc.num_free)
        return self.alloc.can_allocate(n)

    # -- rules
    @rule(tokens=tokens_st)
    def insert_engine(self, tokens):
        m = self.checked_match(tokens)
        self.radix.lock(m.node)  # as the engine does while it runs: keeps the match alive across eviction
        ok = self.make_room(len(tokens) - m.num_matched)
        self.radix.unlock(m.node)
        if not ok:
            return
        new = self.alloc.allocate(len(tokens) - m.num_matched)
        assert self.radix.insert(tokens, torch.cat([m.slots, new])) == m.num_matched
        for i, s in enumerate(new.tolist()):
            self.cached[tuple(tokens[: m.num_matched + i + 1])] = s
        self.touch(tokens, len(tokens))

    @rule(tokens=tokens_st)
    def insert_fresh(self, tokens):
        if not self.make_room(len(tokens)):
            return
        slots = self.alloc.allocate(len(tokens))
        free_before, present = self.alloc.num_free, self.model_match(tokens)
        assert self.radix.insert(tokens, slots) == present
        assert self.alloc.num_free == free_before + present  # duplicates went back
        for i in range(present, len(tokens)):
            self.cached[tuple(tokens[: i + 1])] = int(slots[i])
        self.touch(tokens, len(tokens))

    @rule(tokens=tokens_st)
    def match(self, tokens):
        self.checked_match(tokens)

    @rule(tokens=tokens_st)
    def lock(self, tokens):
        m = self.checked_match(tokens)
        self.radix.lock(m.node)
        self.locks.append((m.node, tuple(tokens[: m.num_matched])))

    @precondition(lambda self: self.locks)
    @rule(data=st.data())
    def unlock(self, data):
        node, _ = self.locks.pop(data.draw(st.integers(0, len(self.locks) - 1)))
        self.radix.unlock(node)

    @rule(k=st.integers(1, POOL))
    def evict(self, k):
        self.checked_evict(k)

    @invariant()
    def consistent(self):
        self.radix.check_integrity()  # free + cached == pool, refs == locks through, sizes
        assert self.tree_prefixes() == self.cached
        prot = self.protected()
        assert self.radix.protected_size == len(prot)
        assert self.radix.evictable_size == len(self.cached) - len(prot)


RadixMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestRadixMachine = RadixMachine.TestCase
