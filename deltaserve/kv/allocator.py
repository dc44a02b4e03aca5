"""Token-slot allocator for the paged KV pool.

The KV pool is paged with a page size of one token: every token's K and V
live in one *slot* (row) of each layer's cache tensor. A token-granular page
lets the radix cache share, truncate and roll back at any token boundary
without copy-on-write, at the price of a gather per attention call.

Invariant: every slot id in [0, num_slots) is either on the free list or owned
by exactly one holder (a radix node, or a running sequence's private tail);
`check_integrity(owned)` verifies that with the ids the holders report.
"""

from __future__ import annotations

from collections import deque

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
        """Give slot ids `[n]` back to the pool."""
        self._free.extend(int(s) for s in slots.tolist())

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
        assert len(set(owned_l)) == len(owned_l), "slot owned twice"
        assert not (set(owned_l) & set(free)), "slot both owned and free"
        assert len(owned_l) + len(free) == self.num_slots, (
            f"leak: {self.num_slots - len(owned_l) - len(free)} slots neither free nor owned"
        )
