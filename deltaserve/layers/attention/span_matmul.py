"""Span attention at the matrix rate: Q.K^T and P.V as bf16 matrix products over K/V gathered chunk by chunk.

A span is one sequence's query tokens (a prefill chunk, a whole prompt, a long verify) attending causally over its
context in the slot pool, its own tokens last. The tiled C kernel computes those products with vector FMAs (bf16
pairs or fp32); here each chunk of keys goes through PyTorch's CPU flash-attention op, whose products are oneDNN
bf16 GEMMs with fp32 accumulation (AMX tiles on Intel Xeons that have them, avx512_core_bf16 on Zen 4) and whose
softmax is fused. Whether that beats the kernel is a property of the CPU, so `span_probe.py` measures it once;
`NativeCpuBackend` routes spans here only where it did (bf16 KV caches only).

Why that op and not `torch.bmm` on bf16 tensors: bmm returns bf16, so every score would be rounded to bf16 before
the softmax (absolute error |s| * 2^-9: 1.1e-2 on random heads, over the 5e-3 + 1e-2 |ref| the bf16 paths are held
to); the op keeps scores in fp32 and returns each chunk's output (bf16) with its log-sum-exp (fp32).

Per span: queries run in blocks of at most Q_BLOCK tokens; each block reads its history CHUNK slots at a time into
one reusable buffer (never a copy of the whole history), unmasked, then its own keys as one last chunk, the only
one with a causal mask (in which every row sees at least its own key: no row is ever fully masked). Chunks merge
through their log-sum-exps into a running fp32 output (online softmax, as flash decoding). GQA: the group's query
heads of one kv head are stacked into the rows of one matrix, so each K/V chunk is read once per kv head.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

CHUNK = 1024  # keys a gather: [CHUNK, n_kv_heads, head_dim] bf16 per buffer (SmolLM2: 384 KiB each)
# A span's queries in blocks of this many tokens, each over the context up to its own last token: a whole prompt
# skips the upper triangle's products, and the block's own keys fit one chunk (Q_BLOCK <= CHUNK).
Q_BLOCK = 256
_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def available() -> bool:
    """PyTorch has its CPU flash-attention op (a private op: a release without it leaves spans to the kernel)."""
    return _FLASH is not None


class MatmulSpan(NamedTuple):
    """One span this path runs: its queries' rows in the flat batch and its whole context's slots."""

    q_start: int
    q_len: int
    kv_slots: torch.Tensor  # [ctx_len] int64, the span's own tokens last


class Buffers(NamedTuple):
    """Gather buffers reused by every chunk of every span of one `attend_spans` call (written, never returned)."""

    k: torch.Tensor  # [CHUNK, n_kv_heads, head_dim], the cache's dtype
    v: torch.Tensor


def _chunk(qh: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, buf: Buffers,
           scale: float, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(output [Hkv, R, D] bf16, normalised over this chunk; log-sum-exp [Hkv, R, 1] fp32) of qh [1, Hkv, R, D]
    over the keys of `slots` (at most CHUNK), gathered into buf."""
    c = slots.shape[0]
    kc = torch.index_select(k_cache, 0, slots, out=buf.k[:c]).transpose(0, 1)[None]  # [1, Hkv, c, D]
    vc = torch.index_select(v_cache, 0, slots, out=buf.v[:c]).transpose(0, 1)[None]  # [1, Hkv, c, D]
    o, lse = _FLASH(qh, kc, vc, attn_mask=mask, scale=scale)  # [1, Hkv, R, D] bf16, [1, Hkv, R] fp32
    return o[0], lse[0].unsqueeze(-1)


def attend_block(
    q: torch.Tensor,  # [T, H, D] fp32 (holding bf16 values) or bf16: the step's flat queries
    k_cache: torch.Tensor,  # [num_slots, Hkv, D] bf16
    v_cache: torch.Tensor,
    kv_slots: torch.Tensor,  # [L] int64: the block's context, its own q_len tokens last
    q_start: int,
    q_len: int,  # at most CHUNK
    scale: float,
    out: torch.Tensor,  # [T, H, D] fp32: rows q_start .. q_start + q_len are written, nothing else
    buf: Buffers,  # overwritten
) -> None:
    """Causal attention of one block of a span's queries over its context (K/V already in the pool)."""
    n, L = q_len, kv_slots.shape[0]
    assert n <= CHUNK, "a block's own keys are one chunk of the gather buffer (Q_BLOCK <= CHUNK)"
    H, D = q.shape[1], q.shape[2]
    Hkv = k_cache.shape[1]
    G = H // Hkv
    R = G * n  # rows per kv head: row g * n + i is query token i of head kv * G + g
    first = L - n  # context position of the block's first token; keys before it are seen by every row
    qs = q[q_start : q_start + n]  # [n, H, D]
    qh = qs.reshape(n, Hkv, G, D).permute(1, 2, 0, 3).reshape(1, Hkv, R, D)  # [1, Hkv, G*n, D]
    qh = qh.to(k_cache.dtype)  # exact when q holds a bf16 model's values
    # the own-keys chunk's causal mask, additive in q's dtype (as the op wants): row g*n+i sees own keys 0..i
    i = torch.arange(n)
    hidden = (i[None, :] > i[:, None]).repeat(G, 1)  # [G*n, n] True = key after the row's token
    mask = torch.zeros(R, n, dtype=qh.dtype).masked_fill_(hidden, float("-inf"))  # [G*n, n]
    acc, lse = _chunk(qh, k_cache, v_cache, kv_slots[first:], buf, scale, mask)  # [Hkv, G*n, D], [Hkv, G*n, 1]
    acc = acc.float()
    for c0 in range(0, first, CHUNK):
        o_c, lse_c = _chunk(qh, k_cache, v_cache, kv_slots[c0 : min(first, c0 + CHUNK)], buf, scale, None)
        new = torch.logaddexp(lse, lse_c)  # [Hkv, G*n, 1] fp32: the running log of the softmax denominator
        acc.mul_(torch.exp(lse - new)).add_(o_c * torch.exp(lse_c - new))  # [Hkv, G*n, D]
        lse = new
    out[q_start : q_start + n] = acc.reshape(Hkv, G, n, D).permute(2, 0, 1, 3).reshape(n, H, D)  # [n, H, D]


def attend_spans(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, spans: tuple[MatmulSpan, ...],
                 scale: float, out: torch.Tensor) -> None:
    """Each span of `spans`, block by block (query i's context is the first
    L - q_len + i + 1 slots whichever block it is in), sharing one pair of gather buffers; writes only those
    spans' rows of out [T, H, D] fp32."""
    shape = (CHUNK, *k_cache.shape[1:])
    buf = Buffers(torch.empty(shape, dtype=k_cache.dtype), torch.empty(shape, dtype=k_cache.dtype))
    for q_start, q_len, kv_slots in spans:
        first = kv_slots.shape[0] - q_len
        for i0 in range(0, q_len, Q_BLOCK):
            i1 = min(q_len, i0 + Q_BLOCK)
            attend_block(q, k_cache, v_cache, kv_slots[: first + i1], q_start + i0, i1 - i0, scale, out, buf)
