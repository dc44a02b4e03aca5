"""The second KV tier: KV that left the pool, kept in host memory until a prompt needs it again.

When the radix cache evicts a leaf, its tokens' K/V rows are copied here first instead of being dropped
(`--kv-offload-gb`); a later request whose prompt continues the same prefix gets them back by copy instead of
prefill. The session store's reads land here too (as *staged* entries) before admission restores them.

An entry is one run of tokens with its rows, keyed by the exact token prefix it continues: (namespace,
blake2b(prefix)) and the run's first token. A prompt asks at the length its radix match ended: an entry there
whose run agrees with the prompt's next tokens restores that common part; the restored path then ends where the
next entry (an evicted child) is keyed, so chains of evicted nodes come back one after another.

Bounds: non-staged entries hold at most `budget_bytes`, least recently used out first. Staged entries (disk reads
waiting for the turn that asked for them) are outside the budget and leave when taken, or after `staged_ttl`.

Shapes: `rows` is `[num_layers, 2, n, kv_heads, head_dim]` (K then V), as `KVPool.read_rows` gives.
"""

from __future__ import annotations

import hashlib
import time
from array import array
from collections import OrderedDict
from typing import Callable, NamedTuple, Sequence

import torch

from deltaserve.tokens import common_prefix_len


def prefix_key(namespace: str, prefix: Sequence[int]) -> bytes:
    """Collision-safe key of an exact token prefix within a namespace."""
    h = hashlib.blake2b(digest_size=16)
    h.update(namespace.encode())
    h.update(b"\x00")
    h.update(array("i", prefix).tobytes())
    return h.digest()


class TierEntry:
    __slots__ = ("key", "run", "rows", "staged", "born")

    def __init__(self, key: tuple[bytes, int], run: tuple[int, ...], rows: torch.Tensor, staged: bool, born: float):
        self.key, self.run, self.rows, self.staged, self.born = key, run, rows, staged, born

    @property
    def nbytes(self) -> int:
        return self.rows.numel() * self.rows.element_size()


class TierHit(NamedTuple):
    entry: TierEntry
    num_tokens: int  # leading tokens of the entry's run that agree with the prompt


class HostTier:
    def __init__(self, budget_bytes: int, staged_ttl: float = 600.0, clock: Callable[[], float] = time.monotonic):
        self.budget_bytes = budget_bytes
        self.staged_ttl = staged_ttl
        self.clock = clock
        self._entries: OrderedDict[tuple[bytes, int], TierEntry] = OrderedDict()  # LRU order, oldest first
        self._staged: dict[tuple[bytes, int], TierEntry] = {}  # outside the budget and the LRU
        self.nbytes = 0  # non-staged entries' bytes (what the budget bounds)
        self.offloaded_tokens = 0  # counters: tokens put (not staged), restored, dropped by the bound
        self.restored_tokens = 0
        self.dropped_tokens = 0

    def __len__(self) -> int:
        return len(self._entries) + len(self._staged)

    @property
    def staged_bytes(self) -> int:
        return sum(e.nbytes for e in self._staged.values())

    def put(self, namespace: str, prefix: Sequence[int], run: Sequence[int], rows: torch.Tensor,
            staged: bool = False) -> bool:
        """Keep `run`'s rows as continuing `prefix`; False (nothing kept) when a non-staged run alone exceeds the
        budget. Replaces an entry with the same prefix and first token. Mutates: may drop LRU entries and staged
        entries older than `staged_ttl`."""
        run = tuple(run)
        if not run or rows.dim() != 5 or rows.shape[2] != len(run):
            raise ValueError(f"need rows for {len(run)} tokens, got shape {tuple(rows.shape)}")
        entry = TierEntry((prefix_key(namespace, prefix), run[0]), run, rows, staged, self.clock())
        if not staged and entry.nbytes > self.budget_bytes:
            self.dropped_tokens += len(run)
            return False
        self._remove(self._entries.get(entry.key))
        self._remove(self._staged.get(entry.key))
        if staged:
            self._staged[entry.key] = entry
        else:
            self._entries[entry.key] = entry
            self.nbytes += entry.nbytes
            self.offloaded_tokens += len(run)
        self._bound()
        return True

    def find(self, namespace: str, tokens: Sequence[int], start: int) -> TierHit | None:
        """The entry continuing `tokens[:start]` whose run agrees with `tokens[start:]` (at least one token);
        a staged one first. Mutates: the LRU order."""
        if start >= len(tokens) or not (self._entries or self._staged):
            return None
        key = (prefix_key(namespace, tokens[:start]), tokens[start])
        e = self._staged.get(key) or self._entries.get(key)
        if e is None:
            return None
        if not e.staged:
            self._entries.move_to_end(key)
        return TierHit(e, common_prefix_len(e.run, tuple(tokens[start : start + len(e.run)])))

    def take(self, hit: TierHit, num_tokens: int | None = None) -> torch.Tensor:
        """Remove the hit's entry and return the rows of its first `num_tokens` (default: its agreeing part)
        `[L, 2, n, H, D]`; the rest of the entry is dropped."""
        n = hit.num_tokens if num_tokens is None else min(num_tokens, hit.num_tokens)
        self._remove(hit.entry)
        self.restored_tokens += n
        return hit.entry.rows[:, :, :n]

    def _remove(self, e: TierEntry | None) -> None:
        if e is None:
            return
        if e.staged:
            del self._staged[e.key]
        else:
            del self._entries[e.key]
            self.nbytes -= e.nbytes

    def _bound(self) -> None:
        while self.nbytes > self.budget_bytes:
            _, e = next(iter(self._entries.items()))
            self._remove(e)
            self.dropped_tokens += len(e.run)
        old = self.clock() - self.staged_ttl
        for e in [e for e in self._staged.values() if e.born < old]:
            self._remove(e)
            self.dropped_tokens += len(e.run)

    def check_integrity(self) -> None:
        assert sum(e.nbytes for e in self._entries.values()) == self.nbytes, "tier byte counter drifted"
        assert self.nbytes <= self.budget_bytes, f"tier over budget: {self.nbytes} > {self.budget_bytes}"
        for table, staged in ((self._entries, False), (self._staged, True)):
            for key, e in table.items():
                assert key == e.key and e.staged == staged and e.run and key[1] == e.run[0]
                assert e.rows.shape[2] == len(e.run), f"entry of {len(e.run)} tokens holds {e.rows.shape[2]} rows"
