"""The native CPU attention backend: the C kernels of `kernels/paged_attention.py` read K/V straight from the pool.

Spans with few query rows (q_len x GQA group: decode, short speculative verify) go to the split-K short-query
kernel, all others (longer verify, prefill chunks, whole prompts) to the tiled flash-attention kernel. Where the
tiled kernel is not built (head_dim % 4 != 0, no AVX2 + FMA), spans up to SHORT_QUERY tokens take the short
kernel and longer ones run SDPA one sequence at a time (`sdpa.attend_long`); where the short one is not,
every span takes the tiled one. Where the span probe found another path faster than the tiled kernel
(`span_probe.py`; bf16 caches: an fp32 model keeps fp32 products; a bf16 model's int8 / fp8 cache takes the AMX
kernel where it runs), spans that would take the tiled kernel go to it: the AMX tile kernel
(`kernels/amx_attention.c`, Xeons with AMX) from SPAN_AMX_MIN_Q tokens, or bf16 matrix products (`span_matmul.py`)
from SPAN_MATMUL_MIN_Q tokens. With the AMX kernel, spans of at most
AMX_SHORT_MAX_ROWS rows (decode, verify) take the AMX short kernel (`kernels/amx_short.c`) in steps that have no
other spans; so do those of a bf16 model's int8 cache where AMX-INT8 is (`kernels/amx_short_int8.c`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from deltaserve.kernels import cpu_probe
from deltaserve.kernels import paged_attention as native
from deltaserve.kv.quant import KVFormat
from deltaserve.layers.attention import span_matmul
from deltaserve.layers.attention.base import AttentionBackend, SeqSpan
from deltaserve.layers.attention.sdpa import SHORT_QUERY, LongSpan, attend_long, prepare_long, store_kv

# Spans with fewer query rows (q_len x GQA group) than this use the short-query kernel, the
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
# Since 12-05 the short kernel fetches a work item's rows while the one before computes (and int8 rows take integer
# products), and with K/V read from DRAM, as in a model (caches rotated over 8 layers; the figures above had caches
# that fit L3), its pair / integer modes win up to 27 rows (GQA 3: verify of 9 tokens). Kernel alone, Zen 4, 2 threads,
# 4 x 6k keys, short vs tiled: bf16 cache 15 rows 2.10 vs 2.83 ms, 18 rows 2.28 vs 3.57, 24 rows 2.89 vs 3.61,
# 27 rows 3.56 vs 3.59; 1 x 6k 24 rows 0.84 vs 1.15; 8 x 6k 24 rows 6.61 vs 7.25, 36 rows 9.32 vs 8.97; int8 and fp8
# caches (the tiled kernel takes those in fp32 products) 27 rows 3.57 / 3.26 vs 3.80 / 3.93, 36 rows 4.61 / 4.73 vs
# 7.25 / 7.33. Then the short kernel's Q.K put keys on lanes for 6+ rows (short_pairs.h, pairs_scores_kt): 4 x 6k,
# bf16, 27 rows 2.32 vs 3.32 ms, 36 rows 3.51 vs 4.39, 48 rows 4.63 vs 4.35; 1 x 6k 48 rows 1.12 vs 1.35, 63 rows
# 1.40 vs 1.59. Whole steps (`scripts/step_times.py --ab min-rows-wide`, split at 16 vs 28): verify 4 x 8 @4k 98.8
# vs 80.1 ms, verify 4 x 9 @6k 129.0 vs 108.8, others within noise. So where pair products are fast the split is
# at 40 rows (GQA 3: verify spans of up to 13 tokens).
TILED_MIN_ROWS = 16
TILED_MIN_ROWS_FP32 = 12
TILED_MIN_ROWS_PAIRS = 40
# Where the AMX kernel takes the tiled kernel's spans (`span_path == "amx"`) it wins from 9 rows (GQA 3: a verify of
# 3 tokens). Whole SmolLM2 bf16 steps on a 2-core AMX Xeon, spans from 6 / 9 / 12 rows on AMX, the rest on the short
# kernel (interleaved, best of 6): verify 4 x 3 @4k 50.4 / 50.2 / 60.5 ms, 4 x 3 @6k 69.0 / 67.6 / 81.6, 1 x 3 @7k
# 35.5 / 34.6 / 38.4, 4 x 2 @4k 65.8 / 50.8 / 51.5; and 12 rows against 28 / 40 (the short kernel up to 9 / 13
# tokens): verify 4 x 9 @6k 82.2 against 160.2 / 160.4 ms, 1 x 9 @7k 43.2 against 58.4 / 57.9.
TILED_MIN_ROWS_AMX = 9
# Spans shorter than this keep the tiled kernel even where the matmul path won the probe: each key chunk costs the
# matmul path a gather and a dozen PyTorch calls whatever the rows, so few rows cannot repay them. Not measured where
# the matmul path wins (on the one AMX Xeon measured the AMX kernel beat both); the probe's span is 128 tokens.
SPAN_MATMUL_MIN_Q = 32
# The AMX kernel takes every span the tiled one would (from tiled_min_rows rows). Whole steps on a 2-core AMX Xeon
# (family 6 model 207), spans from 32 tokens vs from 4: verify 4 x 5 @4k 76.2 vs 52.9 ms, 4 x 8 @4k 84.6 vs 55.6,
# 4 x 9 @6k 118.9 vs 77.6, 1 x 5 @4k 35.2 vs 28.2. Below tiled_min_rows (decode) the short kernel stays: decode
# 4 @4k 45.0 ms against 49.7 with every span on AMX, 4 @6k 54.0 vs 66.2 (it packs a key chunk for 3 rows). These
# splits now hold only in steps with a long span: a step of decodes and verifies alone goes to the AMX short kernel
# (`amx_short`, `prepare`).
SPAN_AMX_MIN_Q = 1


def tiled_min_rows(kv_fp32: bool, amx: bool = False) -> int:
    """Query rows from which a span takes the tiled kernel (see above). kv_fp32: the short kernel runs fp32 products
    (an fp32 cache, or an fp32 model's int8 / fp8 rows); amx: the AMX kernel takes the tiled kernel's spans. Asks the
    CPU probe: call it once, at build."""
    if amx:
        return TILED_MIN_ROWS_AMX
    fast_pairs = cpu_probe.bf16_dot_fast()
    slow_pairs = cpu_probe.bf16_dot_speed() > 0 and not fast_pairs
    if kv_fp32 or slow_pairs:
        return TILED_MIN_ROWS_FP32
    return TILED_MIN_ROWS_PAIRS if fast_pairs else TILED_MIN_ROWS


class KernelSpans(NamedTuple):
    """One kernel's share of a step, in the layout both kernels take."""

    slots: torch.Tensor  # [sum kv_len] int64: the spans' slot lists concatenated
    seqs: torch.Tensor  # [n_spans, 4] int64 rows: q_start, q_len, kv_offset (into slots), kv_len


class NativeMetadata(NamedTuple):
    slot_mapping: torch.Tensor  # [T] slot each flat token's K/V is written to
    short: KernelSpans | None  # spans of the short-query kernel, if any
    tiled: KernelSpans | None  # spans of the tiled kernel, if any
    long: tuple[LongSpan, ...]  # spans run by SDPA one at a time (only without the tiled kernel)
    matmul: tuple[span_matmul.MatmulSpan, ...] = ()  # `span_matmul`'s spans
    amx: KernelSpans | None = None  # spans of the AMX kernel, if any
    amx_short: KernelSpans | None = None  # spans of the AMX short kernel, if any


def kernel_spans(spans: list[SeqSpan]) -> KernelSpans:
    """The kernels' inputs for `spans` (at least one)."""
    rows, off = [], 0
    for s in spans:
        rows.append((s.q_start, s.q_len, off, len(s.kv_slots)))
        off += len(s.kv_slots)
    return KernelSpans(torch.cat([s.kv_slots for s in spans]).to(torch.int64).contiguous(),
                       torch.tensor(rows, dtype=torch.int64))


@dataclass(frozen=True)
class NativeCpuBackend(AttentionBackend):
    """Every decision fixed at build (`selector.select_backend`); `dataclasses.replace` makes a variant (A/B runs).

    short, tiled: which kernels run (at least one). A span with q_len x gqa_group < tiled_min_rows takes the
    short kernel, the others the tiled one; without the tiled kernel, spans up to SHORT_QUERY tokens take the
    short kernel and longer ones SDPA; without the short kernel, every span takes the tiled one.
    pairs: the short kernel's bf16 pair mode; p_bf16: the tiled kernel's P.V in bf16 pairs (both: a bf16 cache —
    a bf16 model rounds its attention output to bf16 anyway). bf16_dot: the tiled kernel's Q.K (and P.V) as bf16
    pair products (the probe's answer: on some Xeons they are slower than fp32 FMA, `kernels/cpu_probe.py`).
    span_path: where spans that would take the tiled kernel go from the path's minimum length on (`span_probe.py`'s
    answer for a bf16 cache; a bf16 model's int8 / fp8 cache takes "amx" where it runs; the tiled kernel only):
    "kernel" (stay), "matmul" (bf16 matrix products, from SPAN_MATMUL_MIN_Q tokens) or "amx" (the AMX tile kernel,
    from SPAN_AMX_MIN_Q tokens).
    kv_format: the pool's row format; a quantized one's kind (2 int8, 3 fp8: uint8 caches, dequantized as read)
    goes to both kernels, which otherwise take the kind the cache's dtype says (fp32 or bf16).
    amx_short: in a step whose spans all have at most AMX_SHORT_MAX_ROWS rows (q_len x group: decode, verify), the
    AMX short kernel takes them all: `amx_short.c` for a bf16 model and cache (the selector sets it with span_path
    "amx"; a variant with another span path keeps it) and for a bf16 model's fp8 cache, `amx_short_int8.c` for a
    bf16 model's int8 cache.
    """

    num_heads: int
    num_kv_heads: int
    short: bool
    tiled: bool
    tiled_min_rows: int
    pairs: bool
    p_bf16: bool
    bf16_dot: bool
    span_path: str = "kernel"
    kv_format: KVFormat | None = None  # how the pool stores K/V (None: as computed); quantized: fp32 products only
    amx_short: bool = False

    def __post_init__(self):
        assert self.short or self.tiled, "no native kernel: use SdpaBackend"
        assert self.span_path in ("kernel", "matmul", "amx"), self.span_path
        assert self.tiled or self.span_path == "kernel", "the span paths replace the tiled kernel's long spans"
        assert self.num_heads % self.num_kv_heads == 0

    @property
    def fp32_q(self) -> bool:
        # the kernels take q in fp32. Spans that fall to SDPA get it too: fp32 holding the bf16 values that q
        # would have had (the fused rotary rounds as the PyTorch one does), which SDPA upcasts to anyway.
        return True

    @property
    def short_max_q_len(self) -> int:
        """The longest span (in query tokens) the short kernel takes; -1 without it. The kernel takes <= 64."""
        if not self.short:
            return -1
        if not self.tiled:
            return SHORT_QUERY
        group = self.num_heads // self.num_kv_heads
        return -(-self.tiled_min_rows // group) - 1  # q_len * group < tiled_min_rows  <=>  q_len < ceil(min / group)

    def prepare(self, spans: list[SeqSpan], slot_mapping: torch.Tensor) -> NativeMetadata:
        # Only where every span fits it: in a step that also has a long span the short ones join that span's AMX
        # kernel call, whose threads take work items from both; two calls would each wait on their slowest thread
        # (a tool result's delta and 3 verifies at 1.5k-4k: 4-7% slower whole steps;
        # docs/perf/2026-12-05-xeon-amx-short.md)
        group = self.num_heads // self.num_kv_heads
        if self.amx_short and spans and all(s.q_len * group <= native.AMX_SHORT_MAX_ROWS for s in spans):
            return NativeMetadata(slot_mapping, None, None, (), amx_short=kernel_spans(spans))
        return self._prepare(spans, slot_mapping)

    def _prepare(self, spans: list[SeqSpan], slot_mapping: torch.Tensor) -> NativeMetadata:
        n = self.short_max_q_len
        short = [s for s in spans if s.q_len <= n]
        rest = [s for s in spans if s.q_len > n]
        if self.tiled:
            min_q = {"matmul": SPAN_MATMUL_MIN_Q, "amx": SPAN_AMX_MIN_Q}.get(self.span_path)
            moved = [s for s in rest if s.q_len >= min_q] if min_q is not None else []
            rest = [s for s in rest if s.q_len < min_q] if moved else rest
            mm = moved if self.span_path == "matmul" else []
            return NativeMetadata(slot_mapping, kernel_spans(short) if short else None,
                                  kernel_spans(rest) if rest else None, (),
                                  tuple(span_matmul.MatmulSpan(s.q_start, s.q_len, s.kv_slots.to(torch.int64))
                                        for s in mm),
                                  kernel_spans(moved) if moved and self.span_path == "amx" else None)
        return NativeMetadata(slot_mapping, kernel_spans(short) if short else None, None,
                              prepare_long(rest, slot_mapping.device))

    @property
    def takes_stored_kv(self) -> bool:
        # the fused rotary kernel writes bf16 rows; a quantized cache is written by store_kv here
        return self.kv_format is None or not self.kv_format.quantized

    def forward(self, q, k, v, k_cache, v_cache, meta: NativeMetadata, scale: float) -> torch.Tensor:
        fmt = self.kv_format if self.kv_format is not None and self.kv_format.quantized else None
        if k is not None:
            store_kv(k, v, k_cache, v_cache, meta.slot_mapping, self.kv_format)
        dtype = v_cache.dtype if v is None else v.dtype  # the model's: only a cache of its dtype comes stored
        if meta.short is None and meta.tiled is None and not meta.matmul and meta.amx is None \
                and meta.amx_short is None:
            out = torch.empty(q.shape, dtype=dtype)  # [T, H, D]; SDPA spans only: no fp32 buffer
        else:
            # fp32 in and out of the kernels; each writes the rows of its own spans only
            q32 = q.float().contiguous()  # [T, H, D]; no copy when q came in fp32 (fp32_q)
            out32 = torch.empty(q.shape, dtype=torch.float32)
            # a uint8 cache's rows say nothing of their format: name it (fp32 / bf16 caches: the kernels read the dtype)
            kind = {"kind": fmt.kind} if fmt is not None else {}
            if meta.short is not None:
                native.paged_attention_short(q32, k_cache, v_cache, meta.short.slots, meta.short.seqs, scale, out32,
                                             pairs=self.pairs, **kind)
            if meta.tiled is not None:
                native.paged_attention_tiled(q32, k_cache, v_cache, meta.tiled.slots, meta.tiled.seqs, scale, out32,
                                             p_bf16=self.p_bf16, bf16_dot=self.bf16_dot, **kind)
            if meta.matmul:
                span_matmul.attend_spans(q32, k_cache, v_cache, meta.matmul, scale, out32)
            if meta.amx is not None:
                native.paged_attention_amx(q32, k_cache, v_cache, meta.amx.slots, meta.amx.seqs, scale, out32, **kind)
            if meta.amx_short is not None:
                if fmt is not None and fmt.name == "int8":
                    native.paged_attention_amx_short_int8(q32, k_cache, v_cache, meta.amx_short.slots,
                                                          meta.amx_short.seqs, scale, out32)
                else:
                    native.paged_attention_amx_short(q32, k_cache, v_cache, meta.amx_short.slots, meta.amx_short.seqs,
                                                     scale, out32, **kind)
            out = out32 if dtype == torch.float32 else out32.to(dtype)
        if meta.long:
            attend_long(q, k_cache, v_cache, meta.long, scale, self.num_heads != self.num_kv_heads, out, fmt)
        return out
