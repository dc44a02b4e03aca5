"""The PyTorch attention backend: `F.scaled_dot_product_attention` over K/V gathered from the pool.

It runs wherever the native kernels do not (CUDA, no C compiler, `DELTASERVE_NATIVE=off`, a KV dtype they do not
take). Short queries (decode, speculative verify: q_len <= SHORT_QUERY) run as one padded SDPA batch over
gathered K/V; longer spans (prefill chunks, whole prompts) one sequence at a time, so a 512-token chunk never pads
seven decodes to 512 rows. The per-sequence half (`prepare_long`, `attend_long`) also serves the native backend
for long spans where the tiled kernel is not built.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from deltaserve.kernels import elementwise
from deltaserve.kv.quant import KVFormat, load_rows, store_rows
from deltaserve.layers.attention.base import AttentionBackend, SeqSpan

SHORT_QUERY = 16  # queries up to this length join the padded batch (or the short kernel, without the tiled one)


class PaddedBatch(NamedTuple):
    """Short spans padded to [B, Lq] queries over [B, Lk] keys, gathered from the pool with slot 0 as padding."""

    B: int
    Lq: int  # longest q_len of the batch
    gather: torch.Tensor  # [B, Lk] slot ids, padded with slot 0
    mask: torch.Tensor | None  # [B, 1, Lq, Lk] bool, True = may attend; None: every query sees every key
    q_flat: torch.Tensor  # [B*Lq] flat token index of each padded query (padding: token 0)
    q_dst: torch.Tensor  # [n_valid] flat token index of each real batch query
    q_src: torch.Tensor  # [n_valid] its row in the flattened [B*Lq] batch output
    # True when the batch is exactly tokens 0..B-1, one query each (a pure decode step):
    # queries and outputs are then views, no gather or scatter.
    identity_q: bool


class LongSpan(NamedTuple):
    """A span run on its own: its queries, its context's slots and its causal mask."""

    q_start: int
    q_len: int
    kv_slots: torch.Tensor  # [L] slot ids of the whole context
    mask: torch.Tensor | None  # [q_len, L] bool, True = may attend; None: L == q_len, SDPA's is_causal path


class SdpaMetadata(NamedTuple):
    slot_mapping: torch.Tensor  # [T] slot each flat token's K/V is written to
    batch: PaddedBatch | None  # spans with q_len <= SHORT_QUERY, if any
    long: tuple[LongSpan, ...]  # the others, in flat-batch order


def prepare_padded(spans: list[SeqSpan], device: torch.device) -> PaddedBatch:
    """The padded batch of `spans` (at least one): gathers, masks and query scatter indices, built on CPU."""
    B = len(spans)
    Lq = max(s.q_len for s in spans)
    Lk = max(len(s.kv_slots) for s in spans)
    gather = torch.zeros(B, Lk, dtype=torch.int64)
    q_index = torch.zeros(B, Lq, dtype=torch.int64)
    q_valid = torch.zeros(B, Lq, dtype=torch.bool)
    mask = torch.zeros(B, 1, Lq, Lk, dtype=torch.bool)
    kpos = torch.arange(Lk)
    for b, s in enumerate(spans):
        L = len(s.kv_slots)
        gather[b, :L] = s.kv_slots
        q_index[b, : s.q_len] = torch.arange(s.q_start, s.q_start + s.q_len)
        q_valid[b, : s.q_len] = True
        # query i sits at context position L - q_len + i and sees keys <= it
        qpos = torch.arange(Lq) + (L - s.q_len)
        mask[b, 0] = kpos[None, :] <= qpos[:, None]
    identity_q = Lq == 1 and all(s.q_start == b for b, s in enumerate(spans))
    if Lk == min(len(s.kv_slots) for s in spans) and Lq == 1:
        mask = None  # single queries over equal-length contexts see every key: no mask needed
    q_flat = q_index.reshape(-1)  # [B*Lq]
    valid_rows = q_valid.reshape(-1).nonzero().squeeze(1)  # [n_valid]
    return PaddedBatch(B, Lq, gather.to(device), mask.to(device) if mask is not None else None, q_flat.to(device),
                       q_flat[valid_rows].to(device), valid_rows.to(device), identity_q)


def prepare_long(spans: list[SeqSpan], device: torch.device) -> tuple[LongSpan, ...]:
    out = []
    for s in spans:
        L = len(s.kv_slots)
        if L == s.q_len:
            mask = None  # plain causal, SDPA's is_causal path
        else:
            qpos = torch.arange(s.q_len) + (L - s.q_len)  # [q_len] context positions of the queries
            mask = (torch.arange(L)[None, :] <= qpos[:, None]).to(device)  # [q_len, L]
        out.append(LongSpan(s.q_start, s.q_len, s.kv_slots.to(device), mask))
    return tuple(out)


def gather(cache: torch.Tensor, slots: torch.Tensor, fmt: KVFormat | None, dtype: torch.dtype) -> torch.Tensor:
    """The values of `slots`' rows ([n] int64) of a layer's cache as [n, Hkv, D] in `dtype` (quantized rows
    dequantized: only the gathered ones). index_select, not advanced indexing: ~6x faster gathers of rows on CPU."""
    rows = cache.index_select(0, slots)  # [n, Hkv, row_width]
    return rows.to(dtype) if fmt is None else load_rows(rows, fmt, dtype)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, fmt: KVFormat | None) -> None:
    """Write a step's K/V ([T, Hkv, D], model dtype) into the layer's cache at `slot_mapping` ([T]), converted to
    the cache's format where it differs from the model dtype (int8/fp8 rows, or another float dtype). Mutates the
    caches' rows at those slots only."""
    if (fmt is not None and fmt.quantized and elementwise.takes_quant_rows(k, k_cache, slot_mapping)
            and elementwise.takes_quant_rows(v, v_cache, slot_mapping)):
        elementwise.store_quant_rows(k, k_cache, slot_mapping, fmt.kind)  # quantized into the rows, one pass each
        elementwise.store_quant_rows(v, v_cache, slot_mapping, fmt.kind)
        return
    if fmt is not None and k.dtype != k_cache.dtype:
        k, v = store_rows(k, fmt), store_rows(v, fmt)  # [T, Hkv, row_width]
    k_cache.index_copy_(0, slot_mapping, k)
    v_cache.index_copy_(0, slot_mapping, v)


def attend_padded(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: PaddedBatch, scale: float,
                  gqa: bool, out: torch.Tensor, fmt: KVFormat | None = None) -> None:
    """Writes the batch's query rows of out [T, H, D] (q's dtype); q [T, H, D], caches [num_slots, Hkv, row_width]
    of format `fmt` (None: rows of D values)."""
    B, Lq = batch.B, batch.Lq
    H, D, Hkv = q.shape[1], q.shape[2], k_cache.shape[1]
    if batch.identity_q:
        qb = q[:B].unsqueeze(2)  # [B, H, 1, D]
    else:
        qb = q.index_select(0, batch.q_flat).reshape(B, Lq, H, D).transpose(1, 2)  # [B, H, Lq, D]
    Lk = batch.gather.shape[1]
    flat = batch.gather.reshape(-1)  # [B*Lk]
    kb = gather(k_cache, flat, fmt, q.dtype).reshape(B, Lk, Hkv, D).transpose(1, 2)  # [B, Hkv, Lk, D]
    vb = gather(v_cache, flat, fmt, q.dtype).reshape(B, Lk, Hkv, D).transpose(1, 2)
    ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=batch.mask, scale=scale, enable_gqa=gqa)
    if batch.identity_q:
        out[:B] = ob.squeeze(2)  # [B, H, D]
    else:
        ob = ob.transpose(1, 2).reshape(B * Lq, H, D)  # [B*Lq, H, D]
        out.index_copy_(0, batch.q_dst, ob.index_select(0, batch.q_src))


def attend_long(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, long: tuple[LongSpan, ...],
                scale: float, gqa: bool, out: torch.Tensor, fmt: KVFormat | None = None) -> None:
    """Writes the query rows of each span in `long` into out [T, H, D] (cast to out's dtype); q [T, H, D];
    caches of format `fmt` as in `attend_padded`."""
    # SDPA's CPU flash kernel runs ~25% faster in fp32 than in bf16 (measured 300x1800 and 2048x2048 on
    # 2 cores), so long bf16 spans are upcast for the attention itself; on CUDA they stay as they are.
    # (q may come in fp32 already, holding bf16 values, from a bf16 model under the native backend: the same
    # numbers as upcasting here.)
    wide = torch.float32 if q.dtype == torch.bfloat16 and q.device.type == "cpu" else q.dtype
    for s in long:
        qs = q[s.q_start : s.q_start + s.q_len].transpose(0, 1).unsqueeze(0).to(wide)  # [1, H, n, D]
        ks = gather(k_cache, s.kv_slots, fmt, wide).transpose(0, 1).unsqueeze(0)  # [1, Hkv, L, D]
        vs = gather(v_cache, s.kv_slots, fmt, wide).transpose(0, 1).unsqueeze(0)
        os_ = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=s.mask, is_causal=s.mask is None, scale=scale,
                                             enable_gqa=gqa)  # [1, H, n, D]
        out[s.q_start : s.q_start + s.q_len] = os_[0].transpose(0, 1)  # [n, H, D]


class SdpaBackend(AttentionBackend):
    """Padded SDPA batch for q_len <= SHORT_QUERY, SDPA one sequence at a time for longer spans.
    kv_format: how the pool stores K/V (None: as the model computes them); quantized rows are dequantized as
    gathered (a step's gathered context, never the whole pool)."""

    def __init__(self, device: torch.device | str, num_heads: int, num_kv_heads: int,
                 kv_format: KVFormat | None = None):
        self.device = torch.device(device)
        self.gqa = num_heads != num_kv_heads  # SDPA's enable_gqa: query heads share KV heads
        self.fmt = kv_format  # None: rows as the model computes them

    @property
    def fp32_q(self) -> bool:
        return False  # q stays in the model dtype: SDPA takes it as it is (long spans upcast on CPU themselves)

    def prepare(self, spans: list[SeqSpan], slot_mapping: torch.Tensor) -> SdpaMetadata:
        short = [s for s in spans if s.q_len <= SHORT_QUERY]
        long = [s for s in spans if s.q_len > SHORT_QUERY]
        # spans' slot ids are built on the CPU (the allocator's); the gathers run where the pool is
        return SdpaMetadata(slot_mapping.to(self.device), prepare_padded(short, self.device) if short else None,
                            prepare_long(long, self.device))

    def forward(self, q, k, v, k_cache, v_cache, meta: SdpaMetadata, scale: float) -> torch.Tensor:
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping, self.fmt)
        out = torch.empty_like(q)  # [T, H, D]: every row belongs to one span, written below
        if meta.batch is not None:
            attend_padded(q, k_cache, v_cache, meta.batch, scale, self.gqa, out, self.fmt)
        attend_long(q, k_cache, v_cache, meta.long, scale, self.gqa, out, self.fmt)
        return out

    def __repr__(self) -> str:
        fmt = f", kv={self.fmt.name}" if self.fmt is not None else ""
        return f"SdpaBackend(device={self.device}, gqa={self.gqa}{fmt})"
