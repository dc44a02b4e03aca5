"""Paged attention over the token-slot KV pool.

One forward step carries tokens of several sequences flattened into `[T, ...]`.
Each sequence contributes `q_len` query tokens whose K/V are written into their
slots first; its context is then read from the pool through `kv_slots`.

On CPU with the native kernels (`deltaserve/kernels/`), every span reads K/V
straight from the pool: spans with few query rows (decode: 1 token times the
GQA group) go to the split-K short-query kernel, all others (speculative verify,
prefill chunks, whole prompts) to the tiled flash-attention kernel.
Without them (CUDA, no compiler, `DELTASERVE_NATIVE=0`) the PyTorch path runs:
short queries as one padded SDPA batch over gathered K/V, long prefill chunks
one sequence at a time, so a 512-token chunk never pads seven decodes to 512 rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from deltaserve.kernels import cpu_probe
from deltaserve.kernels import paged_attention as native

SHORT_QUERY = 16  # PyTorch path: queries up to this length join the padded batch
# Native path: spans with fewer query rows (q_len x GQA group) than this use the short-query kernel, the
# rest the tiled one. The tiled kernel computes 16 rows a vector, so it wastes lanes below 16 rows, and it splits
# work by (sequence, kv head, query block) only, so a single sequence's verify gives 2 cores 3 items; the short
# kernel splits keys, but its cost grows with every row. Whole SmolLM2 bf16 steps at 4k context, 2 cores, in one
# process (short kernel's pair mode vs tiled): verify 4 x 4 tokens (12 rows) 80 vs 93 ms, 4 x 5 (15 rows) 107 vs
# 112 ms, 1 x 5 32 vs 45 ms; 4 x 8 (24 rows) 136 vs 126 ms in the tiled kernel's favour. With an fp32 cache the
# short kernel converts rows to fp32 and reduces each q.k horizontally: there the tiled one wins from ~12 rows
# (kernel alone, 4 x 5000 keys: 12 rows 3.4 vs 2.7 ms, 15 rows 3.9 vs 2.2 ms). On AVX2 only (Zen 3; 8-row
# vectors, no pair products) a split at 8 rows measured the same as 16 (`scripts/step_times.py --ab min-rows-avx2`:
# verify 4 x 5 @4k 227 vs 219 ms, 1 x 5 69 vs 62 ms, within the noise), so one value serves both.
# Where AVX512-BF16 pair products are slower than fp32 FMA (`kernels/cpu_probe.py`), the tiled kernel widens to fp32
# while the short one keeps its pairs; there the tiled one wins from 12 rows too (2-core Xeon, family 6 model 207,
# `--ab min-rows`, two runs: verify 4 x 5 @4k 89 vs 103 and 116 vs 126 ms, 1 x 5 39 vs 42 and 45 vs 45 ms).
TILED_MIN_ROWS = 16
TILED_MIN_ROWS_FP32 = 12


def tiled_min_rows(kv_fp32: bool) -> int:
    """Query rows from which a span takes the tiled kernel (see above)."""
    slow_pairs = cpu_probe.bf16_dot_speed() > 0 and not cpu_probe.bf16_dot_fast()
    return TILED_MIN_ROWS_FP32 if kv_fp32 or slow_pairs else TILED_MIN_ROWS


@dataclass
class SeqSpan:
    q_start: int  # offset of this sequence's first query token in the flat batch
    q_len: int
    kv_slots: torch.Tensor  # [ctx_len] slot ids of the whole context, new tokens included


@dataclass
class AttentionMetadata:
    """Per-step attention layout, built once by the engine and shared by all layers."""

    slot_mapping: torch.Tensor  # [T] slot each flat token's K/V is written to
    spans: list[SeqSpan]
    # Derived once in `prepare()`:
    batch_idx: list[int] = field(default_factory=list)  # spans in the padded short-query batch
    long_idx: list[int] = field(default_factory=list)  # spans run one by one
    gather: torch.Tensor | None = None  # [B, Lk] slot ids, padded with slot 0
    q_index: torch.Tensor | None = None  # [B, Lq] flat token index, padded with 0
    q_valid: torch.Tensor | None = None  # [B, Lq] bool, real query positions
    mask: torch.Tensor | None = None  # [B, 1, Lq, Lk] bool, True = may attend
    q_flat: torch.Tensor | None = None  # [B*Lq] q_index flattened (the gather of batch queries)
    q_dst: torch.Tensor | None = None  # [n_valid] flat token index of each real batch query
    q_src: torch.Tensor | None = None  # [n_valid] its row in the flattened [B*Lq] batch output
    # True when the batch is exactly tokens 0..B-1, one query each (a pure decode step):
    # queries and outputs are then views, no gather or scatter.
    identity_q: bool = False
    # For the native CPU kernel (deltaserve/kernels/paged_attention.c), when it is used:
    native_slots: torch.Tensor | None = None  # [sum kv_len] int64, batch spans' slot lists concatenated
    native_seqs: torch.Tensor | None = None  # [n_batch_spans, 4] int64: q_start, q_len, kv_offset, kv_len
    tiled_slots: torch.Tensor | None = None  # the same two for the spans of the tiled kernel
    tiled_seqs: torch.Tensor | None = None
    long_masks: dict[int, torch.Tensor | None] = field(default_factory=dict)

    @property
    def native(self) -> bool:
        return self.native_seqs is not None or self.tiled_seqs is not None

    def prepare(self, device: torch.device, use_native: bool = False, use_tiled: bool = False,
                gqa_group: int = 1, kv_fp32: bool = False) -> "AttentionMetadata":
        """use_native / use_tiled: the caller checked `native.supports(k_cache)` / `native.supports_tiled(k_cache)`;
        spans then read K/V from the pool with no gathers. gqa_group: query heads per KV head. kv_fp32: the
        cache is fp32 (the split between the two kernels moves)."""
        if use_tiled:
            min_rows = tiled_min_rows(kv_fp32)
            tiled = [s for s in self.spans if s.q_len * gqa_group >= min_rows or not use_native]
            short = [s for s in self.spans if s.q_len * gqa_group < min_rows and use_native]
            if tiled:
                self.tiled_slots, self.tiled_seqs = _native_layout(tiled)
            if short:
                self.native_slots, self.native_seqs = _native_layout(short)
            return self
        self.batch_idx = [i for i, s in enumerate(self.spans) if s.q_len <= SHORT_QUERY]
        self.long_idx = [i for i, s in enumerate(self.spans) if s.q_len > SHORT_QUERY]
        if self.batch_idx and use_native:
            self.native_slots, self.native_seqs = _native_layout([self.spans[i] for i in self.batch_idx])
        elif self.batch_idx:
            spans = [self.spans[i] for i in self.batch_idx]
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
            self.identity_q = Lq == 1 and all(s.q_start == b for b, s in enumerate(spans))
            if Lk == min(len(s.kv_slots) for s in spans) and Lq == 1:
                mask = None  # single queries over equal-length contexts see every key: no mask needed
            valid_rows = q_valid.reshape(-1).nonzero().squeeze(1)  # [n_valid]
            self.q_flat, self.q_dst, self.q_src = (
                q_index.reshape(-1).to(device), q_index.reshape(-1)[valid_rows].to(device), valid_rows.to(device),
            )
            self.gather, self.q_index, self.q_valid = gather.to(device), q_index.to(device), q_valid.to(device)
            self.mask = mask.to(device) if mask is not None else None
        for i in self.long_idx:
            s = self.spans[i]
            L = len(s.kv_slots)
            if L == s.q_len:
                self.long_masks[i] = None  # plain causal, SDPA's is_causal path
            else:
                qpos = torch.arange(s.q_len) + (L - s.q_len)
                self.long_masks[i] = (torch.arange(L)[None, :] <= qpos[:, None]).to(device)
        return self


def _native_layout(spans: list[SeqSpan]) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' inputs: slot lists concatenated [sum kv_len], and [n, 4] rows q_start, q_len, kv_offset, kv_len."""
    rows, off = [], 0
    for s in spans:
        rows.append((s.q_start, s.q_len, off, len(s.kv_slots)))
        off += len(s.kv_slots)
    return torch.cat([s.kv_slots for s in spans]).to(torch.int64).contiguous(), torch.tensor(rows, dtype=torch.int64)


def paged_attention(
    q: torch.Tensor,  # [T, n_heads, head_dim]
    k: torch.Tensor,  # [T, n_kv_heads, head_dim]
    v: torch.Tensor,  # [T, n_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_slots, n_kv_heads, head_dim]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [T, n_heads, head_dim] in v's dtype (the model's; q may come in fp32 for the native kernels)
    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)
    if meta.native:
        # fp32 in and out of the kernels; each writes the rows of its own spans only
        q32 = q.float().contiguous()
        out32 = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        if meta.native_seqs is not None:
            native.paged_attention_short(q32, k_cache, v_cache, meta.native_slots, meta.native_seqs, scale, out32,
                                         pairs=v.dtype == torch.bfloat16)
        if meta.tiled_seqs is not None:
            # a bf16 model rounds its attention output to bf16 anyway: P.V may run in bf16 pairs too, where this
            # CPU's pair products are faster than fp32 FMA (`kernels/cpu_probe.py`; on some Xeons they are slower)
            native.paged_attention_tiled(q32, k_cache, v_cache, meta.tiled_slots, meta.tiled_seqs, scale, out32,
                                         p_bf16=v.dtype == torch.bfloat16, bf16_dot=cpu_probe.bf16_dot_fast())
        out = out32 if v.dtype == torch.float32 else out32.to(v.dtype)
    else:
        out = torch.empty_like(q)
    gqa = q.shape[1] != k.shape[1]
    if meta.batch_idx and meta.native_seqs is None:
        B, Lq = meta.q_index.shape
        H, D, Hkv = q.shape[1], q.shape[2], k.shape[1]
        if meta.identity_q:
            qb = q[:B].unsqueeze(2)  # [B, H, 1, D]
        else:
            qb = q.index_select(0, meta.q_flat).reshape(B, Lq, H, D).transpose(1, 2)  # [B, H, Lq, D]
        Lk = meta.gather.shape[1]
        # index_select, not advanced indexing: ~6x faster gathers of [Hkv, D] rows on CPU
        flat = meta.gather.reshape(-1)
        kb = k_cache.index_select(0, flat).reshape(B, Lk, Hkv, D).transpose(1, 2)  # [B, Hkv, Lk, D]
        vb = v_cache.index_select(0, flat).reshape(B, Lk, Hkv, D).transpose(1, 2)
        ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=meta.mask, scale=scale, enable_gqa=gqa)
        if meta.identity_q:
            out[:B] = ob.squeeze(2)  # [B, H, D]
        else:
            ob = ob.transpose(1, 2).reshape(B * Lq, H, D)  # [B*Lq, H, D]
            out.index_copy_(0, meta.q_dst, ob.index_select(0, meta.q_src))
    # SDPA's CPU flash kernel runs ~25% faster in fp32 than in bf16 (measured 300x1800 and 2048x2048 on
    # 2 cores), so long bf16 spans are upcast for the attention itself; on CUDA they stay as they are.
    wide = torch.float32 if q.dtype == torch.bfloat16 and q.device.type == "cpu" else q.dtype
    for i in meta.long_idx:
        s = meta.spans[i]
        qs = q[s.q_start : s.q_start + s.q_len].transpose(0, 1).unsqueeze(0).to(wide)  # [1, H, n, D]
        ks = k_cache.index_select(0, s.kv_slots).to(wide).transpose(0, 1).unsqueeze(0)  # [1, Hkv, L, D]
        vs = v_cache.index_select(0, s.kv_slots).to(wide).transpose(0, 1).unsqueeze(0)
        m = meta.long_masks.get(i)
        os_ = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=m, is_causal=m is None, scale=scale, enable_gqa=gqa)
        out[s.q_start : s.q_start + s.q_len] = os_[0].transpose(0, 1)
    return out
