"""KV cache storage: one K and one V tensor per layer, indexed by slot id."""

from __future__ import annotations

import ctypes
import sys
from dataclasses import dataclass

import torch

from deltaserve.kv.allocator import SlotAllocator
from deltaserve.kv.quant import KVFormat, resolve

_MADV_HUGEPAGE = 14
_HUGE = 1 << 21


def _madvise_huge(t: torch.Tensor) -> bool:
    """Ask Linux to back t's untouched pages with 2 MiB transparent huge pages (THP in `madvise` mode, the
    common default, gives none otherwise). A decode step walks every session's K/V, hundreds of MB across
    4 KiB pages: each page is a TLB miss and a stop for the hardware prefetchers. Returns whether it took."""
    if not sys.platform.startswith("linux") or t.device.type != "cpu":
        return False
    start = (t.data_ptr() + _HUGE - 1) & ~(_HUGE - 1)
    end = (t.data_ptr() + t.numel() * t.element_size()) & ~(_HUGE - 1)
    if end <= start:
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_HUGEPAGE) == 0
    except (OSError, AttributeError):
        return False


def zeros_huge(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.zeros, with the pages advised as huge before the zero-fill first touches them (CPU)."""
    t = torch.empty(shape, dtype=dtype, device=device)
    _madvise_huge(t)
    return t.zero_()


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype  # what the model computes K/V in
    kv_cache_dtype: str = "auto"  # how the pool stores them (`kv/quant.py`; "auto": as computed)

    @property
    def fmt(self) -> KVFormat:
        return resolve(self.kv_cache_dtype, self.dtype)

    @property
    def row_width(self) -> int:
        """Elements of the storage dtype a (slot, kv head) row takes: head_dim, + 4 scale bytes when quantized."""
        return self.fmt.row_width(self.head_dim)

    @property
    def bytes_per_token(self) -> int:
        """layers × 2 (K and V) × kv_heads × bytes a row."""
        return self.num_layers * 2 * self.num_kv_heads * self.fmt.row_bytes(self.head_dim)


class KVPool:
    """Paged KV storage (page size one token) plus its slot allocator.

    `k_cache[layer]` and `v_cache[layer]` are `[num_slots, num_kv_heads, row_width]` of the format's storage dtype
    (`row_width` = head_dim, or head_dim + 4 bytes for int8/fp8 rows, whose last 4 hold the row's scale).
    The model writes a token's K/V into the slot the engine assigned it
    (`slot_mapping`) and reads a sequence's context by gathering its slots.
    """

    def __init__(self, layout: KVLayout, num_slots: int, device: torch.device | str = "cpu"):
        self.layout = layout
        self.num_slots = num_slots
        self.device = torch.device(device)
        shape = (num_slots, layout.num_kv_heads, layout.row_width)
        storage = layout.fmt.storage
        self.k_cache = [zeros_huge(shape, storage, self.device) for _ in range(layout.num_layers)]
        self.v_cache = [zeros_huge(shape, storage, self.device) for _ in range(layout.num_layers)]
        self.allocator = SlotAllocator(num_slots)

    @classmethod
    def from_budget(cls, layout: KVLayout, kv_cache_bytes: int, device="cpu") -> "KVPool":
        num_slots = max(16, kv_cache_bytes // layout.bytes_per_token)
        return cls(layout, int(num_slots), device)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k_cache + self.v_cache)

    # ------------------------------------------------------------- transfer
    def read_rows(self, slots: torch.Tensor) -> torch.Tensor:
        """A copy of the K/V of `slots` ([n] int64), `[num_layers, 2, n, kv_heads, row_width]` on the CPU (K then V)
        in the storage dtype: what a tier or the session store keeps (quantized rows stay quantized). Mutates nothing."""
        idx = slots.to(self.device)
        rows = torch.stack([torch.stack([k.index_select(0, idx), v.index_select(0, idx)])
                            for k, v in zip(self.k_cache, self.v_cache)])  # [L, 2, n, H, row_width]
        if self.device.type == "cpu":
            return rows
        host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)  # page-locked: the copy back is a DMA
        return host.copy_(rows)

    def write_rows(self, slots: torch.Tensor, rows: torch.Tensor) -> None:
        """Put `rows` (`[num_layers, 2, n, kv_heads, row_width]`, as `read_rows` gives) into `slots` ([n]).
        Mutates those slots' K/V in every layer."""
        L, H, W = self.layout.num_layers, self.layout.num_kv_heads, self.layout.row_width
        storage = self.layout.fmt.storage
        if rows.shape != (L, 2, slots.numel(), H, W) or rows.dtype != storage:
            raise ValueError(f"KV rows {tuple(rows.shape)} {rows.dtype} do not fit this pool's layout "
                             f"({L}, 2, {slots.numel()}, {H}, {W}) {storage}")
        idx = slots.to(self.device)
        rows = rows.to(self.device, non_blocking=True)
        for layer, (k, v) in enumerate(zip(self.k_cache, self.v_cache)):
            k.index_copy_(0, idx, rows[layer, 0])
            v.index_copy_(0, idx, rows[layer, 1])
