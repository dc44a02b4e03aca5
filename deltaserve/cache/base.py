"""Interface of the prefix cache: what the engine may ask of it, and what each call mutates.

The cache maps token sequences to the KV slot ids holding their K/V. It owns
those slots: a slot id reported by `owned_slots()` belongs to the cache until
the cache itself gives it back to the allocator (on `evict`, `reset`, or when
`insert` discards a duplicate). The engine holds a *node handle* for a prefix
it is using and `lock`s it so that prefix cannot be evicted under it.

Shapes: every slot tensor is a 1-D int64 tensor, one slot id per token.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Generic, NamedTuple, Sequence, TypeVar

import torch

NodeT = TypeVar("NodeT")


class MatchResult(NamedTuple):
    """Longest cached prefix of a query.

    `node`'s path from the root is exactly the matched prefix, so locking
    `node` protects precisely the `num_matched` tokens in `slots`. Nothing
    matched: `node` is the root, `slots` is empty.
    """

    slots: torch.Tensor  # [num_matched] int64 slot ids, in token order
    node: Any  # the cache's node handle (RadixNode for RadixCache)
    num_matched: int


class InsertResult(NamedTuple):
    """Outcome of an insert: how much was already cached, and the node ending the inserted path."""

    num_existing: int  # leading tokens that were already in the cache
    node: Any  # node whose path from the root is exactly the inserted tokens


class PrefixCache(ABC, Generic[NodeT]):
    """A token-prefix → KV-slot cache with reference-counted protection and LRU eviction."""

    @abstractmethod
    def match_prefix(self, tokens: Sequence[int], namespace: str = "") -> MatchResult:
        """Longest cached token-exact prefix of `tokens` within `namespace`.

        Namespaces (tenant + cache_salt) never share nodes: a prefix inserted
        in one namespace is never matched from another; "" is the default.

        Mutates: refreshes the LRU time of every node on the matched path, and
        may split a node so that a node ends exactly at the match. Splitting
        changes neither the cached tokens, the slots, nor any size.
        """

    @abstractmethod
    def insert(self, tokens: Sequence[int], slots: torch.Tensor, namespace: str = "") -> int:
        """Cache `tokens` with their slots `[len(tokens)]`; return how many leading tokens were already cached.

        Ownership: the cache takes ALL of `slots`. For the leading part that
        was already cached the cache keeps its own slots; every passed slot id
        that differs from the cached one there is a duplicate and is freed to
        the allocator. Passing back the cache's own ids (from `match_prefix`)
        for that part is the normal case and frees nothing.
        Mutates: the tree, sizes, the allocator's free list, LRU times on the path.
        """

    @abstractmethod
    def insert_with_node(self, tokens: Sequence[int], slots: torch.Tensor, namespace: str = "") -> InsertResult:
        """As `insert`, but also return the node ending the inserted path (to lock / pin it)."""

    @abstractmethod
    def path_slots(self, node: NodeT) -> torch.Tensor:
        """Slots of the path root→`node` `[num_tokens]`, in token order; mutates nothing (not even LRU times)."""

    @abstractmethod
    def lock(self, node: NodeT) -> None:
        """Protect the path root→`node` from eviction (one more reference on each node of it)."""

    @abstractmethod
    def unlock(self, node: NodeT) -> None:
        """Drop one reference taken by `lock(node)`; raises if `node` holds none."""

    @abstractmethod
    def evict(self, num_tokens: int) -> int:
        """Free at least `num_tokens` slots if possible, least recently used first; return the number freed.

        Only unreferenced nodes are removed, whole nodes at a time, so the
        result may exceed `num_tokens`, or fall short when too little is evictable.
        """

    @property
    @abstractmethod
    def evictable_size(self) -> int:
        """Tokens cached in unreferenced nodes (what `evict` could free)."""

    @property
    @abstractmethod
    def protected_size(self) -> int:
        """Tokens cached in referenced (locked) nodes."""

    @property
    def total_size(self) -> int:
        """All tokens cached."""
        return self.evictable_size + self.protected_size

    @abstractmethod
    def owned_slots(self) -> torch.Tensor:
        """Every slot id the cache holds, `[total_size]` int64 (order unspecified)."""

    @abstractmethod
    def check_integrity(self, extra_owned: torch.Tensor | None = None) -> None:
        """Assert the internal invariants and that free ∪ cache ∪ `extra_owned` is the whole pool.

        `extra_owned`: slots held outside the cache (running sequences' private tails).
        """

    @abstractmethod
    def reset(self) -> None:
        """Free every cached slot and empty the cache; raises if anything is locked."""
