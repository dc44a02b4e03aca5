"""`select_backend`: the one place that decides, once per model, which attention backend runs and how."""

from __future__ import annotations

import logging

import torch

from deltaserve import env
from deltaserve.kernels import cpu_probe
from deltaserve.kv.quant import KVFormat, resolve
from deltaserve.kernels import paged_attention as native
from deltaserve.layers.attention import span_probe
from deltaserve.layers.attention.base import AttentionBackend
from deltaserve.layers.attention.native import NativeCpuBackend, tiled_min_rows
from deltaserve.layers.attention.sdpa import SdpaBackend

log = logging.getLogger(__name__)


def select_backend(device: torch.device | str, kv_dtype: torch.dtype, head_dim: int, num_heads: int,
                   num_kv_heads: int, *, short: bool = True, tiled: bool = True,
                   kv_format: KVFormat | None = None, batch_invariant: bool = False) -> AttentionBackend:
    """The attention backend for a model: the native CPU kernels where they build and take this cache (CPU, bf16,
    fp32, int8 or fp8 rows; the tiled one also needs head_dim % 4 == 0 and AVX2 + FMA or AVX-512), else PyTorch SDPA.
    kv_dtype: the model's dtype (K/V as computed); kv_format: how the pool stores them (None: as computed).
    Quantized rows are read as stored: dequantized a key chunk at a time for fp32 products in the tiled kernel; in
    the short one, for a bf16 model, fp8 as exact bf16 pairs and int8 in integer products. Where AMX runs, a bf16
    model's quantized rows take the AMX span kernel for long spans and, int8, the AMX-INT8 short kernel for steps
    of decodes and verifies.

    Asks the CPU probe here, once (the short/tiled split and the tiled kernel's product form), and with a bf16
    cache the span probe (long spans as bf16 matrix products or in the tiled kernel; ~0.2 s for SmolLM2's heads
    on first use of a head shape, more for wider ones); building the kernels' libraries on first use too.
    short=False / tiled=False leave that kernel out (tests, comparisons). batch_invariant: every span in the tiled
    kernel, which gives a query row the same bits whatever else it runs with (each row on its own lane, keys in
    fixed blocks from the first); the short kernel splits keys per call and the matmul path chunks per span, so
    both stay out. Without the tiled kernel there is no such backend: the usual one, with a warning.
    """
    device = torch.device(device)
    fmt = kv_format or resolve("auto", kv_dtype)
    has_tiled = tiled and native.supports_tiled(device, fmt.storage, head_dim)
    if batch_invariant and not has_tiled:
        log.warning("batch-invariant attention needs the tiled kernel (CPU, AVX2 + FMA, head_dim %% 4 == 0): "
                    "outputs may depend on the batch")
    has_short = short and not (batch_invariant and has_tiled) and native.supports(device, fmt.storage)
    if not (has_short or has_tiled):
        return SdpaBackend(device, num_heads, num_kv_heads, fmt)
    kv_bf16 = fmt.storage == torch.bfloat16
    # the bf16 product modes round q (and P) to bf16: exact for a bf16 model's q, an extra error for an fp32 model's
    # (an fp32 model over a bf16 cache keeps fp32 products)
    bf16_q = kv_dtype == torch.bfloat16 or fmt.storage == torch.float32
    bf16_dot = cpu_probe.bf16_dot_fast() if has_tiled and bf16_q else False
    # the short kernel's reduced-precision products for a bf16 model, whose q is bf16 already: bf16 pairs on a bf16
    # cache or fp8 rows (exact in bf16), integer products on int8 rows (kernel alone, 8 x 8k decode, 1 thread,
    # Zen 4: int8 pairs 4.75 ms, fp32 6.96 ms, before the integer form)
    pairs = (kv_bf16 or fmt.quantized) and kv_dtype == torch.bfloat16
    span_path = (span_probe.span_path(num_heads, num_kv_heads, head_dim, bf16_dot)
                 if has_tiled and kv_bf16 and kv_dtype == torch.bfloat16 and not batch_invariant else "kernel")
    if has_tiled and fmt.quantized and kv_dtype == torch.bfloat16 and not batch_invariant \
            and env.span_attn() in (None, "amx") and native.supports_amx(device, fmt.storage, head_dim):
        # a bf16 model's int8 / fp8 rows on AMX tiles (K as its bytes with the scales on the scores, V rounded to
        # bf16 as packed), where the tiled kernel would take them in fp32 products. Whole SmolLM2 steps, 2-core AMX
        # Xeon (`scripts/step_times.py --ab span-path --kv-cache-dtype int8|fp8`), tiled vs AMX: int8 delta 300
        # @6k 522 vs 234 ms, delta 300 + 3 verify9 @6k 558 vs 262, prefill 2048 973 vs 606; fp8 520 vs 222, 563 vs
        # 261, 897 vs 561; decodes and verifies alike (docs/perf/2026-12-05-xeon-amx-int8.md)
        span_path = "amx"
    return NativeCpuBackend(
        num_heads, num_kv_heads, short=has_short, tiled=has_tiled,
        # without the short kernel every span takes the tiled one: from 0 rows. The tiled kernel takes quantized
        # rows in fp32 products.
        tiled_min_rows=tiled_min_rows(not pairs, amx=span_path == "amx") if has_short and has_tiled else 0,
        pairs=pairs,
        p_bf16=kv_bf16 and kv_dtype == torch.bfloat16,
        bf16_dot=bf16_dot, kv_format=fmt, span_path=span_path,
        # decode and verify spans on AMX tiles too: 0.78x the short kernel's pairs for a decode of 4 x 4k, 0.83x the
        # AMX span kernel for a verify of 4 x 9 at 6k (kernel alone, docs/perf/2026-12-05-xeon-amx-short.md)
        amx_short=env.amx_short() and (span_path == "amx" and kv_bf16 and native.amx_short_available()
                                       or not batch_invariant and _int8_amx_short(fmt, kv_dtype, head_dim,
                                                                                  num_kv_heads)
                                       or not batch_invariant and _fp8_amx_short(fmt, kv_dtype, head_dim)))


def _int8_amx_short(fmt: KVFormat, kv_dtype: torch.dtype, head_dim: int, num_kv_heads: int) -> bool:
    """A bf16 model's int8 cache takes the int8 AMX short kernel where it builds (AMX-INT8) and takes the heads: in the
    short kernel's integer rounding (an fp32 model's int8 rows keep fp32 products). Whole SmolLM2 steps on a 2-core
    AMX Xeon, the short kernel's integer path vs it (`scripts/step_times.py --ab amx-short --kv-cache-dtype int8`):
    decode 4 @6k 33.9 vs 30.4 ms, verify 4x5 @6k 83.2 vs 41.2, 4x9 @6k 92.7 vs 57.4, 4x9 @1.5k 40.9 vs 31.0, decode
    1 @1.5k 13.4 vs 13.6 (docs/perf/2026-12-05-xeon-amx-int8.md)."""
    return fmt.name == "int8" and kv_dtype == torch.bfloat16 and native.supports_amx_short_int8(head_dim, num_kv_heads)


def _fp8_amx_short(fmt: KVFormat, kv_dtype: torch.dtype, head_dim: int) -> bool:
    """A bf16 model's fp8 cache takes the AMX short kernel (`amx_short.c`, fp8 rows as their exact bf16 values) where
    it runs, in the short kernel's pair rounding. Kernel alone on a 2-core AMX Xeon, 30 layers of SmolLM2's heads
    (`scripts/kernel_times.py`), the pairs vs it: verify 4 x 9 @4k 105.9 vs 39.2 ms, decode 8 x 8k 129.3 vs 107.5,
    4 x 4k 28.6 vs 25.0, where the bf16 cache's AMX short kernel took 35.2 / 103.3 / 25.0
    (docs/perf/2026-12-06-xeon-amx-span-pipeline.md)."""
    return fmt.name == "fp8_e4m3" and kv_dtype == torch.bfloat16 and head_dim % 32 == 0 and head_dim <= 256 \
        and native.amx_short_available()
