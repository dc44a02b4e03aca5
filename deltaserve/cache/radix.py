"""Radix tree prefix cache over token-granular KV slots (after SGLang's radix_cache).

Each non-root node holds a non-empty run of tokens (`key`) and the slot ids of
their K/V (`value`, same length). A node's children are keyed by the first
token of their key, so two children never share a first token and the tree is
a compressed trie: the cached sequences are exactly the root→node paths
(and their prefixes).

Invariants (checked by `check_integrity`):
  * `node.ref` == locks taken on `node` itself + sum of its children's `ref`
    (a lock references the whole path up to the root), so a parent's ref is
    never below a child's and an unreferenced node has only unreferenced
    descendants. That is what lets eviction remove unreferenced *leaves* only.
  * `evictable_size` / `protected_size` are the token sums over nodes with
    ref == 0 / ref > 0; they are kept incrementally.
  * All tokens of a node share one `last_access`: a touch covers whole nodes,
    because a match that ends inside a node first splits it.
  * Node identity denotes a path *end*: splitting keeps the original object as
    the lower piece, so a handle the engine holds (or locked) still ends where
    it did, and its lock count stays with it.
"""

from __future__ import annotations

import heapq
import itertools
import time
from typing import Callable, Sequence

import torch

from deltaserve.cache.base import InsertResult, MatchResult, PrefixCache
from deltaserve.kv.allocator import SlotAllocator
from deltaserve.tokens import common_prefix_len

_EMPTY = torch.empty(0, dtype=torch.int64)


class RadixNode:
    """One compressed run of tokens in the tree. `parent is None` ⇔ root, or evicted (`detached`)."""

    __slots__ = ("id", "key", "value", "children", "parent", "ref", "own_locks", "last_access", "detached")

    def __init__(self, node_id: int, key: tuple[int, ...], value: torch.Tensor, parent: RadixNode | None, now: float):
        self.id = node_id  # creation order; breaks LRU ties deterministically
        self.key = key
        self.value = value  # [len(key)] int64 slot ids
        self.children: dict[int, RadixNode] = {}
        self.parent = parent
        self.ref = 0  # locks through this node (own + descendants')
        self.own_locks = 0  # locks taken on this node itself
        self.last_access = now
        self.detached = False  # set when evicted: the handle must not be locked again

    def __len__(self) -> int:
        return len(self.key)

    def __lt__(self, other: RadixNode) -> bool:  # heap order: oldest first, then creation order
        return (self.last_access, self.id) < (other.last_access, other.id)

    def __repr__(self) -> str:
        return f"RadixNode(id={self.id}, key={list(self.key)}, slots={self.value.tolist()}, ref={self.ref})"


def _as_key(tokens: Sequence[int] | torch.Tensor) -> tuple[int, ...]:
    return tuple(tokens.tolist()) if isinstance(tokens, torch.Tensor) else tuple(int(t) for t in tokens)


class RadixCache(PrefixCache[RadixNode]):
    """Token-exact prefix cache; owns the slots of every cached token. See module docstring."""

    def __init__(self, allocator: SlotAllocator, clock: Callable[[], float] = time.monotonic):
        self.allocator = allocator
        self.clock = clock
        self._ids = itertools.count()
        self._evictable = 0
        self._protected = 0
        # One root per cache namespace (tenant + cache_salt): a match never
        # crosses roots; eviction still walks every root, so LRU stays global.
        self._roots: dict[str, RadixNode] = {}
        self.root = self.namespace_root("")
        # Called with (namespace, prefix tokens, the leaf's tokens, its slots) just before `evict` frees a leaf:
        # the host tier copies the KV out there (kv_manager). None: evicted KV is dropped.
        self.on_evict: Callable[[str, list[int], tuple[int, ...], torch.Tensor], None] | None = None

    def namespace_root(self, namespace: str) -> RadixNode:
        """The root of `namespace`'s subtree (created empty on first use; roots are never evicted)."""
        root = self._roots.get(namespace)
        if root is None:
            root = self._roots[namespace] = self._new_node((), _EMPTY, None)
        return root

    @staticmethod
    def _is_root(node: RadixNode) -> bool:
        return node.parent is None and not node.key

    def _new_node(self, key: tuple[int, ...], value: torch.Tensor, parent: RadixNode | None) -> RadixNode:
        return RadixNode(next(self._ids), key, value, parent, self.clock())

    # ------------------------------------------------------------------ sizes
    @property
    def evictable_size(self) -> int:
        return self._evictable

    @property
    def protected_size(self) -> int:
        return self._protected

    # ------------------------------------------------------------------ lookup
    def match_prefix(self, tokens: Sequence[int], namespace: str = "") -> MatchResult:
        key = _as_key(tokens)
        now = self.clock()
        node, i, pieces = self.namespace_root(namespace), 0, []
        while i < len(key):
            child = node.children.get(key[i])
            if child is None:
                break
            k = common_prefix_len(child.key, key[i : i + len(child.key)])
            if k < len(child):
                child = self._split(child, k)  # the match must end exactly at a node
            child.last_access = now
            pieces.append(child.value)
            node, i = child, i + k  # after a split the next lookup misses: the loop ends
        slots = torch.cat(pieces) if pieces else _EMPTY.clone()
        return MatchResult(slots, node, i)

    def _split(self, node: RadixNode, k: int) -> RadixNode:
        """Cut `node` after its first `k` tokens (0 < k < len); return the new upper piece.

        The upper piece is new and inherits `node`'s ref (every lock through
        `node` passes through it) and last_access; sizes are unchanged since
        both pieces keep the same ref. `node` stays the lower piece with its
        own locks, so outstanding handles keep meaning the same path end.
        """
        assert 0 < k < len(node)
        parent = node.parent
        assert parent is not None
        upper = RadixNode(next(self._ids), node.key[:k], node.value[:k].clone(), parent, node.last_access)
        upper.ref = node.ref
        node.key, node.value = node.key[k:], node.value[k:].clone()
        node.parent = upper
        upper.children[node.key[0]] = node
        parent.children[upper.key[0]] = upper
        return upper

    # ------------------------------------------------------------------ insert
    def insert(self, tokens: Sequence[int], slots: torch.Tensor, namespace: str = "") -> int:
        return self.insert_with_node(tokens, slots, namespace).num_existing

    def insert_with_node(self, tokens: Sequence[int], slots: torch.Tensor, namespace: str = "") -> InsertResult:
        key = _as_key(tokens)
        if slots.dim() != 1 or slots.numel() != len(key):
            raise ValueError(f"need one slot per token: {len(key)} tokens, slots shape {tuple(slots.shape)}")
        slots = slots.to(torch.int64)
        now = self.clock()
        node, i = self.namespace_root(namespace), 0
        while i < len(key):
            child = node.children.get(key[i])
            if child is None:
                # New suffix: a fresh unreferenced leaf (clone: never alias the caller's tensor).
                leaf = self._new_node(key[i:], slots[i:].clone(), node)
                leaf.last_access = now
                node.children[key[i]] = leaf
                self._evictable += len(leaf)
                return InsertResult(i, leaf)
            k = common_prefix_len(child.key, key[i : i + len(child.key)])
            if k < len(child):
                child = self._split(child, k)
            # Already cached: the tree keeps its slots; passed ids that differ are duplicates.
            passed = slots[i : i + k]
            dup = passed[passed != child.value]
            if dup.numel():
                self.allocator.free(dup)
            child.last_access = now
            node, i = child, i + k
        return InsertResult(i, node)

    def prefix_node(self, node: RadixNode, num_tokens: int) -> RadixNode:
        """The node whose root path is exactly the first `num_tokens` tokens of `node`'s (splitting one if the
        cut falls inside it); the namespace root for 0. `node` must be in the tree (not evicted).

        Mutates: may split a node (sizes, slots and locks unchanged, as a split in `match_prefix`)."""
        if node.detached:
            raise ValueError(f"node {node.id} was evicted")
        depth = sum(len(n) for n in self._ancestors(node))
        if not 0 <= num_tokens <= depth:
            raise ValueError(f"prefix of {num_tokens} tokens on a path of {depth}")
        while not self._is_root(node):
            start = depth - len(node)
            if num_tokens >= depth:
                return node
            if num_tokens > start:
                return self._split(node, num_tokens - start)
            depth, node = start, node.parent  # type: ignore[assignment]
        return node

    def _ancestors(self, node: RadixNode):
        while not self._is_root(node):
            yield node
            node = node.parent  # type: ignore[assignment]

    def path_tokens(self, node: RadixNode) -> list[int]:
        """Tokens of the path root→`node`; mutates nothing."""
        keys = [n.key for n in self._ancestors(node)]
        return [t for key in reversed(keys) for t in key]

    def _namespace_of(self, node: RadixNode) -> str:
        while not self._is_root(node):
            node = node.parent  # type: ignore[assignment]
        return next(ns for ns, root in self._roots.items() if root is node)

    def path_slots(self, node: RadixNode) -> torch.Tensor:
        pieces = []
        while not self._is_root(node):
            pieces.append(node.value)
            node = node.parent
        return torch.cat(pieces[::-1]) if pieces else _EMPTY.clone()

    # ------------------------------------------------------------------ locks
    def lock(self, node: RadixNode) -> None:
        if node.detached:
            raise ValueError(f"cannot lock evicted node {node.id}")
        if self._is_root(node):
            return  # the empty prefix needs no protection
        node.own_locks += 1
        while not self._is_root(node):
            if node.ref == 0:
                self._evictable -= len(node)
                self._protected += len(node)
            node.ref += 1
            node = node.parent  # type: ignore[assignment]  # non-root nodes have a parent

    def unlock(self, node: RadixNode) -> None:
        if self._is_root(node):
            return
        # own_locks > 0 implies ref > 0 all the way up (a parent's ref ≥ its child's),
        # so checking it first leaves the tree untouched on error.
        if node.own_locks <= 0:
            raise ValueError(f"unlock of node {node.id} that holds no lock")
        node.own_locks -= 1
        while not self._is_root(node):
            node.ref -= 1
            if node.ref == 0:
                self._protected -= len(node)
                self._evictable += len(node)
            node = node.parent  # type: ignore[assignment]

    # ------------------------------------------------------------------ eviction
    def evict(self, num_tokens: int) -> int:
        """Remove unreferenced leaves, oldest `last_access` first (ties: older node id first), until `num_tokens`
        slots are back on the allocator's free list (a shared slot returns only with its last holder).

        A parent left as an unreferenced leaf joins the candidates; its
        last_access is ≥ its child's (every touch of the child touched it), so
        the pop order stays non-decreasing in time. Frees whole nodes.
        """
        if num_tokens <= 0:
            return 0
        heap = [n for n in self._iter_nodes() if not n.children and n.ref == 0 and not self._is_root(n)]
        heapq.heapify(heap)
        start = self.allocator.num_free
        freed = 0  # slots back on the free list: a slot another namespace also holds (shared) is not freed here
        while freed < num_tokens and heap:
            leaf = heapq.heappop(heap)
            parent = leaf.parent
            assert parent is not None
            if self.on_evict is not None:
                self.on_evict(self._namespace_of(parent), self.path_tokens(parent), leaf.key, leaf.value)
            self._remove_leaf(leaf)
            freed = self.allocator.num_free - start
            if not self._is_root(parent) and not parent.children and parent.ref == 0:
                heapq.heappush(heap, parent)
        return freed

    def _remove_leaf(self, leaf: RadixNode) -> None:
        assert not leaf.children and leaf.ref == 0
        parent = leaf.parent
        assert parent is not None
        del parent.children[leaf.key[0]]
        self.allocator.free(leaf.value)
        self._evictable -= len(leaf)
        leaf.parent, leaf.detached = None, True

    # ------------------------------------------------------------------ whole-tree
    def _iter_nodes(self):
        stack = list(self._roots.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def owned_slots(self) -> torch.Tensor:
        values = [n.value for n in self._iter_nodes() if not self._is_root(n)]
        return torch.cat(values) if values else _EMPTY.clone()

    def reset(self) -> None:
        if self._protected:
            raise RuntimeError(f"reset with {self._protected} tokens still locked")
        owned = self.owned_slots()
        for node in self._iter_nodes():
            if not self._is_root(node):
                node.parent, node.detached = None, True
        for root in self._roots.values():
            root.children = {}
        self.allocator.free(owned)
        self._evictable = 0

    def check_integrity(self, extra_owned: torch.Tensor | None = None) -> None:
        evictable = protected = 0
        roots = set(map(id, self._roots.values()))
        for root in self._roots.values():
            assert root.parent is None and root.ref == 0 and root.own_locks == 0 and not root.key
        for node in self._iter_nodes():
            child_refs = 0
            for first, child in node.children.items():
                assert child.parent is node, f"node {child.id} has a wrong parent"
                assert not child.detached, f"evicted node {child.id} still in the tree"
                assert len(child) > 0 and child.key[0] == first, f"node {child.id} keyed by {first}, key {child.key}"
                child_refs += child.ref
            if id(node) in roots:
                continue
            assert node.value.dtype == torch.int64 and node.value.dim() == 1
            assert node.value.numel() == len(node), f"node {node.id}: {len(node)} tokens, {node.value.numel()} slots"
            assert node.ref == node.own_locks + child_refs, f"node {node.id}: ref {node.ref} != locks through it"
            assert node.own_locks >= 0
            if node.ref:
                protected += len(node)
            else:
                evictable += len(node)
        assert (evictable, protected) == (self._evictable, self._protected), (
            f"sizes drifted: tree has {evictable}/{protected}, counters {self._evictable}/{self._protected}"
        )
        owned = self.owned_slots()
        if extra_owned is not None and extra_owned.numel():
            owned = torch.cat([owned, extra_owned.to(torch.int64).flatten()])
        self.allocator.check_integrity(owned)

    def pretty(self) -> str:
        """Indented dump of the tree, for debugging and test failure messages."""
        lines: list[str] = []

        def walk(node: RadixNode, depth: int) -> None:
            for first in sorted(node.children):
                child = node.children[first]
                lines.append("  " * depth + repr(child))
                walk(child, depth + 1)

        for ns in sorted(self._roots):
            if self._roots[ns].children and ns:
                lines.append(f"[namespace {ns!r}]")
            walk(self._roots[ns], 1 if ns else 0)
        return "\n".join(lines) or "(empty)"
