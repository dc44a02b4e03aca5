"""KV cache storage: one K and one V tensor per layer, indexed by slot id."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deltaserve.kv.allocator import SlotAllocator


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        """layers × 2 (K and V) × kv_heads × head_dim × dtype size."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * elem


class KVPool:
    """Paged KV storage (page size one token) plus its slot allocator.

    `k_cache[layer]` and `v_cache[layer]` are `[num_slots, num_kv_heads, head_dim]`.
    The model writes a token's K/V into the slot the engine assigned it
    (`slot_mapping`) and reads a sequence's context by gathering its slots.
    """

    def __init__(self, layout: KVLayout, num_slots: int, device: torch.device | str = "cpu"):
        self.layout = layout
        self.num_slots = num_slots
        self.device = torch.device(device)
        shape = (num_slots, layout.num_kv_heads, layout.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=layout.dtype, device=self.device) for _ in range(layout.num_layers)]
        self.v_cache = [torch.zeros(shape, dtype=layout.dtype, device=self.device) for _ in range(layout.num_layers)]
        self.allocator = SlotAllocator(num_slots)

    @classmethod
    def from_budget(cls, layout: KVLayout, kv_cache_bytes: int, device="cpu") -> "KVPool":
        num_slots = max(16, kv_cache_bytes // layout.bytes_per_token)
        return cls(layout, int(num_slots), device)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k_cache + self.v_cache)
