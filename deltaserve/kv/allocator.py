"""Token-slot allocator for the paged KV pool.

The KV pool is paged with a page size of one token: every token's K and V
live in one *slot* (row) of each layer's cache tensor. A token-granular page
lets the radix cache share, truncate and roll back at any token boundary
without copy-on-write, at the price of a gather per attention call.

Invariant: every slot id in [0, num_slots) is either on the free list or owned
by its holders (radix nodes, or a running sequence's private tail): one holder,
except a slot `share`d across cache namespaces (`--shared-prefix`), which has
exactly as many holders as its reference count and returns to the free list
when the last one frees it. `check_integrity(owned)` verifies that with the ids
the holders report.
"""

from __future__ import annotations

from collections import Counter, deque

import torch


class OutOfSlots(RuntimeError):
    """Raised by `allocate` when fewer than the requested slots are free."""


class SlotAllocator:
    """Free list of KV slot ids. Allocation order is FIFO so tests can assert ids.

    Mutates: `allocate` pops ids from the front of the free list, `free`
    appends them to the back.
    """

    def __init__(self, num_slots: int):
        if num_slots <= 0:
            raise ValueError(f"num_slots must be positive, got {num_slots}")
        self.num_slots = num_slots
        self._free: deque[int] = deque(range(num_slots))
        self._refs: dict[int, int] = {}  # holders of shared slots (> 1); a slot absent here has one holder

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_slots - len(self._free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> torch.Tensor:
        """Return `n` slot ids as an int64 tensor `[n]`; raises OutOfSlots."""
        if n > len(self._free):
            raise OutOfSlots(f"asked for {n} KV slots, {len(self._free)} free")
        ids = [self._free.popleft() for _ in range(n)]
        return torch.tensor(ids, dtype=torch.int64)

    def free(self, slots: torch.Tensor) -> None:
        """Give slot ids `[n]` back to the pool (a shared slot: drop one holder; the last one frees it)."""
        if not self._refs:
            self._free.extend(int(s) for s in slots.tolist())
            return
        for s in slots.tolist():
            r = self._refs.get(s)
            if r is None:
                self._free.append(s)
            elif r == 2:
                del self._refs[s]
            else:
                self._refs[s] = r - 1

    def share(self, slots: torch.Tensor) -> None:
        """One more holder for each of `slots` `[n]` (owned, not free): the same KV cached under two namespaces."""
        for s in slots.tolist():
            self._refs[s] = self._refs.get(s, 1) + 1

    @property
    def num_shared(self) -> int:
        return len(self._refs)

    def check_integrity(self, owned: torch.Tensor | None = None) -> None:
        """Assert free ∪ owned == all slots, with no id twice.

        `owned` is the concatenation of every slot id held outside the free
        list (radix nodes plus running sequences), or None to check the free
        list alone.
        """
        free = list(self._free)
        assert len(set(free)) == len(free), "slot on the free list twice"
        assert all(0 <= s < self.num_slots for s in free), "free slot id out of range"
        if owned is None:
            return
        owned_l = owned.tolist()
        held = Counter(owned_l)
        wrong = [s for s, n in held.items() if n != self._refs.get(s, 1)]
        assert not wrong, f"slot {wrong[0]} has {held[wrong[0]]} holders, reference count {self._refs.get(wrong[0], 1)}"
        assert set(self._refs) <= set(held), "a shared slot nobody holds"
        assert not (set(held) & set(free)), "slot both owned and free"
        assert len(held) + len(free) == self.num_slots, (
            f"leak: {self.num_slots - len(held) - len(free)} slots neither free nor owned"
        )
