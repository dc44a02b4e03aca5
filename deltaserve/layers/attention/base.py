"""The attention backend interface: what the runner hands a backend each step, and what each layer asks of it.

A backend is chosen once, at model build (`selector.select_backend`), and held by the model. Each step the
runner describes the batch as `SeqSpan`s; the backend turns them into its own metadata once (`prepare`), and
every layer passes that metadata back to `forward`. All per-step decisions (which kernel takes which span, the
gathers and masks a span needs) are made in `prepare`; all per-process ones (which kernels exist here, the CPU
probe's answers) when the backend is built. `forward` decides nothing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class SeqSpan:
    """One sequence's part of a step: its query tokens in the flat batch and its whole context in the pool."""

    q_start: int  # offset of this sequence's first query token in the flat batch
    q_len: int
    kv_slots: torch.Tensor  # [ctx_len] slot ids of the whole context, new tokens included (the last q_len)


class AttentionBackend(ABC):
    """Paged attention over the token-slot KV pool, for one model (its head counts and KV dtype fixed).

    The flat batch holds `T` query tokens of several sequences; sequence i's queries are rows
    `q_start .. q_start + q_len` and it attends causally over `kv_slots` (its new tokens are the last `q_len`).
    """

    @property
    @abstractmethod
    def fp32_q(self) -> bool:
        """Whether `forward` wants q in fp32 whatever the model dtype (the native kernels compute in fp32:
        the rotary kernel then writes q straight into fp32, saving a cast a layer). Fixed for the backend's life."""

    @property
    def takes_stored_kv(self) -> bool:
        """Whether `forward` also takes k = v = None, meaning the caller already wrote the step's K/V into the
        caches at the step's slot_mapping (the fused rotary kernel does, into a cache of the model dtype). A backend
        that says so keeps that slot_mapping as `meta.slot_mapping`. Fixed for the backend's life."""
        return False

    @abstractmethod
    def prepare(self, spans: list[SeqSpan], slot_mapping: torch.Tensor) -> Any:
        """Once per step, before the forward pass: this backend's metadata for the step, shared by all layers.

        spans: the step's sequences, in flat-batch order, covering every query row. slot_mapping: [T] int64 on the
        model's device, the slot each flat token's K/V is written to. Mutates nothing (the metadata is a new object).
        """

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [T, n_heads, head_dim], fp32 when `fp32_q`, else the model dtype
        k: torch.Tensor | None,  # [T, n_kv_heads, head_dim], model dtype; None: already stored (`takes_stored_kv`)
        v: torch.Tensor | None,  # [T, n_kv_heads, head_dim], model dtype; None with k
        k_cache: torch.Tensor,  # [num_slots, n_kv_heads, head_dim], model dtype: this layer's pool
        v_cache: torch.Tensor,
        meta: Any,  # what this backend's `prepare` returned for this step
        scale: float,
    ) -> torch.Tensor:  # [T, n_heads, head_dim] in the model dtype (v's; the caches' when v is None)
        """Once per layer: writes k, v into `k_cache`, `v_cache` at `meta`'s slot_mapping (the only mutation; none
        when they come as None), then attends each span's queries over its context, new tokens included."""
