"""Token-slot allocator for the paged KV pool.

The KV pool is paged with a page size of one token: every token's K and V
live in one *slot* (row) of each layer's cache tensor. A token-granular page
lets the radix cache share, truncate and roll back at any token boundary
without copy-on-write, at the price of a gather per attention call.

Where the slots go still matters to the attention kernels: 16 consecutive
slots holding 16 consecutive tokens of a sequence are one strided tile load
(`run16` in kernels/amx_short_plan.h); scattered ones are copied row by row, a
decode's attention ~30% slower (docs/perf/2026-12-06-xeon-amx-slot-runs.md).
So slots are handed out in *runs*: the slot ids are grouped in aligned pages
of PAGE, a sequence's token at position p goes to offset p % PAGE of a page,
and a sequence's next tokens continue its last slot while that page (or the
next, entirely free one) has room. A page that is entirely free is taken for
one sequence; its slots before the offset it starts at stay free for anyone.
With no entirely free page left, free slots are taken wherever they are
(next fit from a cursor), so the whole pool stays usable.

Invariant: every slot id in [0, num_slots) is either free or owned by its
holders (radix nodes, or a running sequence's private tail): one holder,
except a slot `share`d across cache namespaces (`--shared-prefix`), which has
exactly as many holders as its reference count and is free again when the
last one frees it. `check_integrity(owned)` verifies that with the ids the
holders report, and the page bookkeeping with the free map.
"""

from __future__ import annotations

from collections import Counter, deque

import torch

PAGE = 16  # the kernels' tile rows: a run of PAGE slots is one strided tile load


class OutOfSlots(RuntimeError):
    """Raised by `allocate` when fewer than the requested slots are free."""


class SlotAllocator:
    """Free slots of the pool, handed out in runs (see the module docstring); deterministic, so tests assert ids.

    Mutates: `allocate` marks ids used (taking the entirely free page freed
    last first; the pool's pages in id order at first), `free` marks them free.
    """

    def __init__(self, num_slots: int):
        if num_slots <= 0:
            raise ValueError(f"num_slots must be positive, got {num_slots}")
        self.num_slots = num_slots
        self._num_pages = num_slots // PAGE  # whole pages; the slots past the last (< PAGE) are taken by next fit only
        self._is_free = bytearray(b"\x01") * num_slots
        self._page_free = [PAGE] * self._num_pages  # free slots in each whole page
        # pages that are entirely free, the one freed last first (at the start the pool's pages by id); an entry
        # whose page was used since it was queued is skipped when reached
        self._whole: deque[int] = deque(range(self._num_pages))
        self._num_free = num_slots
        self._cursor = 0  # where the next-fit search for a free slot starts
        self._refs: dict[int, int] = {}  # holders of shared slots (> 1); a slot absent here has one holder

    @property
    def num_free(self) -> int:
        return self._num_free

    @property
    def num_used(self) -> int:
        return self.num_slots - self._num_free

    def can_allocate(self, n: int) -> bool:
        return n <= self._num_free

    def allocate(self, n: int, pos: int = 0, after: int | None = None) -> torch.Tensor:
        """Slot ids `[n]` (int64) for a sequence's tokens at positions pos .. pos + n - 1, whose token pos - 1 sits in
        slot `after` (None: no such token, or not known); raises OutOfSlots.

        Order of preference for each next token: the slot after the previous one while it is free and in the same
        page, or opens an entirely free page; offset pos % PAGE of an entirely free page; the next free slot from the
        cursor."""
        if n > self._num_free:
            raise OutOfSlots(f"asked for {n} KV slots, {self._num_free} free")
        out: list[int] = []
        prev = after
        while n:
            lo, hi = self._extend(prev, n)
            if lo == hi:
                lo, hi = self._from_whole_page(pos, n)
            if lo == hi:
                lo, hi = self._next_fit(n)
            self._take(lo, hi)
            out.extend(range(lo, hi))
            n -= hi - lo
            pos += hi - lo
            prev = hi - 1
        return torch.tensor(out, dtype=torch.int64)

    def _extend(self, prev: int | None, n: int) -> tuple[int, int]:
        """The free slots right after `prev`, up to n, within its page or into the next page if all of it is free."""
        if prev is None or prev + 1 >= self.num_slots:
            return 0, 0
        lo = prev + 1
        page = lo // PAGE
        if lo % PAGE == 0 and (page >= self._num_pages or self._page_free[page] != PAGE):
            return 0, 0  # the next page is (partly) someone else's: a fresh page keeps this sequence's runs whole
        end = min(lo + n, (page + 1) * PAGE, self.num_slots)
        used = self._is_free.find(0, lo, end)
        return lo, end if used < 0 else used

    def _from_whole_page(self, pos: int, n: int) -> tuple[int, int]:
        while self._whole:
            page = self._whole.popleft()
            if self._page_free[page] == PAGE:
                lo = page * PAGE + pos % PAGE
                return lo, min(lo + n, (page + 1) * PAGE)
        return 0, 0

    def _next_fit(self, n: int) -> tuple[int, int]:
        s = self._is_free.find(1, self._cursor)
        if s < 0:
            s = self._is_free.find(1, 0, self._cursor)
        assert s >= 0, "free count says a slot is free, the free map has none"
        hi = min(s + n, self.num_slots)
        used = self._is_free.find(0, s, hi)
        hi = hi if used < 0 else used
        self._cursor = hi % self.num_slots
        return s, hi

    def _take(self, lo: int, hi: int) -> None:
        self._is_free[lo:hi] = bytes(hi - lo)
        self._num_free -= hi - lo
        for page in range(lo // PAGE, min((hi - 1) // PAGE + 1, self._num_pages)):
            self._page_free[page] -= min(hi, (page + 1) * PAGE) - max(lo, page * PAGE)

    def _release(self, s: int) -> None:
        if self._is_free[s]:
            raise RuntimeError(f"KV slot {s} freed twice")
        self._is_free[s] = 1
        self._num_free += 1
        page = s // PAGE
        if page < self._num_pages:
            self._page_free[page] += 1
            if self._page_free[page] == PAGE:
                self._whole.appendleft(page)  # the page freed last is taken first: its lines may still be cached

    def free(self, slots: torch.Tensor) -> None:
        """Give slot ids `[n]` back to the pool (a shared slot: drop one holder; the last one frees it)."""
        for s in slots.tolist():
            r = self._refs.get(s)
            if r is None:
                self._release(s)
            elif r == 2:
                del self._refs[s]
            else:
                self._refs[s] = r - 1
        if len(self._whole) > 2 * self._num_pages + 64:  # stale entries: keep each entirely free page once, in order
            seen: set[int] = set()
            self._whole = deque(p for p in self._whole
                                if self._page_free[p] == PAGE and not (p in seen or seen.add(p)))

    def share(self, slots: torch.Tensor) -> None:
        """One more holder for each of `slots` `[n]` (owned, not free): the same KV cached under two namespaces."""
        for s in slots.tolist():
            self._refs[s] = self._refs.get(s, 1) + 1

    @property
    def num_shared(self) -> int:
        return len(self._refs)

    def free_slots(self) -> list[int]:
        """The free slot ids, ascending."""
        return [i for i, f in enumerate(self._is_free) if f]

    def check_integrity(self, owned: torch.Tensor | None = None) -> None:
        """Assert free ∪ owned == all slots, with no id twice, and the page bookkeeping.

        `owned` is the concatenation of every slot id held outside the free
        list (radix nodes plus running sequences), or None to check the free
        map alone.
        """
        free = self.free_slots()
        assert len(free) == self._num_free, f"free count {self._num_free}, free map {len(free)}"
        for page in range(self._num_pages):
            n = sum(self._is_free[page * PAGE : (page + 1) * PAGE])
            assert self._page_free[page] == n, f"page {page}: count {self._page_free[page]}, free map {n}"
        whole = {p for p in range(self._num_pages) if self._page_free[p] == PAGE}
        assert whole <= set(self._whole), "an entirely free page missing from the queue of whole pages"
        if owned is None:
            return
        owned_l = owned.tolist()
        held = Counter(owned_l)
        wrong = [s for s, n in held.items() if n != self._refs.get(s, 1)]
        assert not wrong, f"slot {wrong[0]} has {held[wrong[0]]} holders, reference count {self._refs.get(wrong[0], 1)}"
        assert set(self._refs) <= set(held), "a shared slot nobody holds"
        assert not (set(held) & set(free)), "slot both owned and free"
        assert all(0 <= s < self.num_slots for s in held), "owned slot id out of range"
        assert len(held) + len(free) == self.num_slots, (
            f"leak: {self.num_slots - len(held) - len(free)} slots neither free nor owned"
        )
