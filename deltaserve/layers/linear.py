"""Linear layers that pick, per call, the weight form the batch size runs fastest in.

On CPU, `F.linear` on bf16 weights is far from the hardware for the shapes a
small model has (K = 576..1536): a decode step (1-24 rows) pays oneDNN's
per-call weight reordering. So a bf16 model on CPU keeps:

- `packed`: the bf16 weight reordered once into oneDNN's blocked layout
  (`torch.ops.mkldnn._reorder_linear_weight`, what inductor's freezing pass
  uses); small batches stream half the bytes of fp32 with no reorder per call;
- `tiles`, with AMX: the weight in `kernels/amx_gemm.c`'s tile order, for
  batches up to `AMX_GEMM_ROWS` rows: each thread streams its part front to
  back, ~1.7x the rate oneDNN's packed form reads weights from memory at;
- `w32`, only where it is faster: an fp32 copy for large batches (prefill
  chunks of hundreds of rows). Which form wins there depends on the CPU: on one
  2-core Xeon the bf16 brgemm ran at ~140 GFLOP/s and MKL's fp32 sgemm at ~250;
  on a 2-core AMD EPYC with AVX512-BF16 bf16 runs at ~850 and fp32 at ~180; on
  a 2-core Xeon (family 6 model 207) that has AVX512-BF16 but issues its pair
  products at a quarter of the FMA rate, bf16 ran at 106 and fp32 at 268. So
  `large_batch_form()` picks bf16 with AMX; with AVX512-BF16 it asks
  `kernels/cpu_probe.py` whether the pair products outrun fp32 FMA (a
  register-only instruction-rate probe, far steadier under load than timing
  GEMMs); else it measures both GEMMs once per process (~0.1 s);
  `DELTASERVE_LARGE_BATCH_LINEAR=bf16|fp32` fixes it
  (`python -m deltaserve.layers.linear` prints both).

A bf16 model on a CPU where oneDNN's bf16 GEMM is slow (`bf16_gemm_fast()`
false: no bf16 kernel at all without AVX-512, as on AMD Zen 3; or AVX512-BF16
pair products slower than fp32 FMA) keeps instead
- `panels`: the bf16 weight in `kernels/small_gemm.c`'s layout, for batches up
  to `SMALL_BATCH_ROWS_UNPACKED` rows (each weight streamed once, in bf16,
  products in fp32 FMA). On the Xeon above, [rows, 576] x [576, 3072]: 4 rows
  96 vs 192 us for oneDNN's packed bf16, 20 rows 405 vs 565 us;
- `w32`, above that (bf16 `F.linear` runs a generic loop on Zen 3, 6x slower
  than fp32 sgemm at prefill sizes).

Everything else (fp32 models, CUDA) runs `F.linear` on the weight as loaded, so
fp32 outputs stay bit-identical to the reference.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from deltaserve import env
from deltaserve.kernels import amx_gemm, cpu_probe, small_gemm

SMALL_BATCH_ROWS = 24  # rows up to this use the packed bf16 weight; crossover measured on a 2-core Xeon
# Without oneDNN's bf16 kernels (a CPU with neither AVX-512 nor AVX-NE-CONVERT, e.g. AMD Zen 3) F.linear on bf16
# weights converts in a slow generic loop: [rows, 576] x [576, 3072] on 2 Zen 3 cores, bf16 vs fp32 weight:
# 1 row 430 vs 784 us, 16 rows 4.4 vs 3.4 ms, 512 rows 131 vs 20 ms. So there small_gemm (bf16, streamed once)
# serves rows up to this and the fp32 copy the rest; split from `scripts/step_times.py --ab small-gemm-rows`
# (verify 1 x 16 @100: 117 ms with fp32 from 9 rows vs 64 ms with small_gemm to 24).
# CPUs whose AVX512-BF16 is slow (module docstring) use the same bound, not re-measured there; on that Xeon
# small_gemm beat oneDNN's packed bf16 at every size from 1 to 32 rows.
SMALL_BATCH_ROWS_UNPACKED = 24
# Batch-invariant mode runs every row through GEMMs of exactly this many rows (the last block zero-padded). The GEMM
# libraries pick kernels by the row count: on a Zen 4, MKL's sgemm gave a row other bits alone or among 2, 3, 5-7,
# 9-11 rows ([rows, 576] x [576, 1536], ~1e-6 relative) and the same from 12 rows on; on an AMX Xeon (family 6 model
# 207) the same product also differs for 57-192 rows from 16-56 and 193+ (bit-compared against a 2,100-row GEMM),
# which broke 35-turn int8 / fp8 sessions there. With one row count for every call a row's bits depend on nothing
# else (checked there by shifting rows across block positions: identical). 32 rows: decode batches cost what 16 did
# (the weights stream once either way), prefill-sized ones ~2.2x a single GEMM in this mode (2,048 rows x [576,
# 3072] then [1536, 576], fp32: 112 vs 50 ms; blocks of 16: 169 ms).
INVARIANT_ROWS = 32
# The batch-size hint oneDNN reorders a bf16 weight for (`_reorder_linear_weight(w, hint)`). Any hint above 1 gave
# the same blocked layout on an AMX Xeon (family 6 model 207; 16, 64, 128, 512 and 1,024 timed alike), faster than
# hint 1's from ~36 to ~400 rows, the rows of an agent turn's steps: whole SmolLM2 bf16 steps, interleaved A/B,
# verify 4 x 9 @1.5k 35.4 -> 32.4 ms, a 150-token delta + 3 verifies 77.4 -> 71.1, a 300-token delta @4k 215.6 ->
# 192.9, a 2,048-token prefill 505 -> 444; but a 512- or 1,024-token prefill 100 -> 111 and 208 -> 235 (hint 1 is
# faster there for the [*, 1536] x [1536, 576] and [*, 576] x [576, 960] products). Elsewhere hint 1, as measured
# before (no AMX CPU timed with 16). `docs/perf/2026-12-05-xeon-amx-linears.md`.
PACK_HINT_AMX = 16
# With AMX, batches up to this many rows run `kernels/amx_gemm.c` on a tile-ordered copy of the weight: between
# decode steps the weights come from memory, and oneDNN's packed GEMM read them there at 8-12 GB/s (SmolLM2's four
# shapes, 90 layers' worth, 636 MB): 1-16 rows 30-31 ms vs 51-52 (hint 16), 20-32 rows 41-42 vs 74-82, 33-48 rows
# 51-52 vs 53-59, 64 rows 45 vs 50; 128 rows 77 vs 73. `docs/perf/2026-12-05-xeon-amx-linears.md`.
AMX_GEMM_ROWS = 64


def _mkldnn_linear_works(dtype: torch.dtype, bias: bool) -> bool:
    """oneDNN's reordered-weight linear gives the right answer here for `dtype` (a build can list the ops and still
    lack the kernel)."""
    ops = torch.ops.mkldnn
    if not (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise")):
        return False
    try:
        w = ops._reorder_linear_weight(torch.ones(8, 16, dtype=dtype), 1)
        b = torch.ones(8, dtype=dtype) if bias else None
        y = ops._linear_pointwise(torch.ones(2, 16, dtype=dtype), w, b, "none", [], "")
        return bool(torch.allclose(y.float(), torch.full((2, 8), 17.0 if bias else 16.0)))
    except (RuntimeError, AttributeError):
        return False


_PACKED_OK: bool | None = None  # bf16 weights, probed once
_PACKED32_OK: bool | None = None  # fp32 weights, probed once
_LARGE_FORM: str | None = None


def packed_supported() -> bool:
    global _PACKED_OK
    if _PACKED_OK is None:
        _PACKED_OK = _mkldnn_linear_works(torch.bfloat16, bias=False)
    return _PACKED_OK


def fp32_packed_supported() -> bool:
    global _PACKED32_OK
    if _PACKED32_OK is None:
        _PACKED32_OK = _mkldnn_linear_works(torch.float32, bias=True)
    return _PACKED32_OK


def large_batch_form() -> str:
    """'bf16' or 'fp32': the faster form for large batches here (env override, else measured once)."""
    global _LARGE_FORM
    if _LARGE_FORM is None:
        fixed = env.large_batch_linear()
        if fixed is not None:
            _LARGE_FORM = fixed
        elif not packed_supported():
            _LARGE_FORM = "fp32"
        elif bf16_gemm_fast():
            _LARGE_FORM = "bf16"
        elif _avx512_bf16():  # present but slow (on some Xeons half fp32's rate): no need to time GEMMs
            _LARGE_FORM = "fp32"
        else:
            _LARGE_FORM = _measure_large_batch_form()
    return _LARGE_FORM


def bf16_gemm_fast() -> bool:
    """oneDNN's bf16 GEMM runs at least at fp32's rate here: AMX, or AVX512-BF16 whose pair products outrun
    fp32 FMA (`kernels/cpu_probe.py`)."""
    return _amx() or (_avx512_bf16() and cpu_probe.bf16_dot_fast())


def _cpu_has(check: str) -> bool:
    return bool(getattr(getattr(torch, "cpu", None), check, lambda: False)())


def _amx() -> bool:
    return _cpu_has("_is_amx_tile_supported")


def _avx512_bf16() -> bool:
    return _cpu_has("_is_avx512_bf16_supported")


def _measure_large_batch_form(rows: int = 256, shape: tuple[int, int] = (1536, 576), reps: int = 4) -> str:
    """Time a prefill-sized matmul in both forms (best of `reps`), return the faster."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(*shape, generator=g).to(torch.bfloat16)
    x = torch.randn(rows, shape[1], generator=g).to(torch.bfloat16)
    w32 = w.float()
    if not packed_supported():
        return "fp32"
    packed = torch.ops.mkldnn._reorder_linear_weight(w, rows)
    forms = {"bf16": lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""),
             "fp32": lambda: F.linear(x.float(), w32).to(torch.bfloat16)}
    best = {}
    for name, f in forms.items():
        f()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
        best[name] = min(ts)
    return min(best, key=best.get)


class Linear:
    """y = x @ weight.T (+ bias). weight: [out, in]; x: [rows, in] -> [rows, out] in x's dtype.

    Built once at load; holds no mutable state, so one instance serves every step. `batch_invariant` (set by
    `LlamaModel.set_batch_invariant`) makes a row's output independent of the batch it runs in: the weight as loaded,
    in GEMMs of exactly INVARIANT_ROWS rows.
    """

    batch_invariant = False

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *, fast_cpu: bool = True,
                 large_batch_fp32: bool | None = None):
        """large_batch_fp32: keep an fp32 copy for large batches; None = where it is faster (`large_batch_form`)."""
        self.weight = weight
        self.bias = bias
        self.out_features, self.in_features = weight.shape
        self.packed: torch.Tensor | None = None
        self.w32: torch.Tensor | None = None
        self.b32: torch.Tensor | None = None
        self.panels: torch.Tensor | None = None  # small_gemm's layout, where oneDNN's bf16 GEMM is slow
        self.tiles: torch.Tensor | None = None  # amx_gemm's layout, for small batches where the CPU has AMX
        self.w32_packed = False  # w32 is in oneDNN's fp32 layout (for _linear_pointwise, not F.linear)
        if fast_cpu and weight.device.type == "cpu" and weight.dtype == torch.bfloat16:
            # small batches: oneDNN's packed bf16 where its bf16 GEMM is fast, else small_gemm's panels (None
            # for shapes it does not take: then the packed form after all)
            if not (packed_supported() and bf16_gemm_fast()):
                self.panels = small_gemm.pack(weight)
            if self.panels is None and packed_supported():
                self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_HINT_AMX if _amx() else 1)
            if _amx():
                self.tiles = amx_gemm.pack(weight)  # None where not built or granted, or for shapes it does not take
            if large_batch_fp32 is None:
                large_batch_fp32 = large_batch_form() == "fp32"
            if large_batch_fp32:
                self.w32 = weight.float()
                self.b32 = bias.float() if bias is not None else None
                if fp32_packed_supported():
                    # oneDNN's own blocked fp32 layout: 15-20% faster than F.linear's sgemm at prefill sizes on
                    # 2 Zen 3 cores ([2048, 576] x [576, 3072]: 51 vs 59 ms; a layer's 4 linears at 300 rows
                    # 18.1 vs 22.4 ms); the batch-size hint 512 was the best of 1, 64, 512 there
                    self.w32 = torch.ops.mkldnn._reorder_linear_weight(self.w32, 512)
                    self.w32_packed = True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch_invariant:
            n = x.shape[0]
            pad = -n % INVARIANT_ROWS
            if pad:
                x = torch.cat([x, x.new_zeros(pad, x.shape[1])])  # [n + pad, in]
            return torch.cat([F.linear(b, self.weight, self.bias) for b in x.split(INVARIANT_ROWS)])[:n]
        if self.tiles is not None and 0 < x.shape[0] <= AMX_GEMM_ROWS and x.dtype == torch.bfloat16:
            return amx_gemm.linear(x, self.tiles, self.bias)
        small = SMALL_BATCH_ROWS if self.packed is not None else SMALL_BATCH_ROWS_UNPACKED
        if self.w32 is not None and x.shape[0] > small:
            if self.w32_packed:
                return torch.ops.mkldnn._linear_pointwise(x.float(), self.w32, self.b32, "none", [], "").to(x.dtype)
            return F.linear(x.float(), self.w32, self.b32).to(x.dtype)
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        if self.panels is not None:
            return small_gemm.linear(x, self.panels, self.bias)
        return F.linear(x, self.weight, self.bias)

    def nbytes(self) -> int:
        """Bytes held by all forms of this weight."""
        ts = [self.weight, self.bias, self.w32, self.b32]
        n = sum(t.numel() * t.element_size() for t in ts if t is not None)
        return n + sum(t.numel() * 2 for t in (self.packed, self.panels, self.tiles) if t is not None)


def _bench(rows=(1, 4, 16, 24, 32, 64, 512), shape=(3072, 576), reps=20) -> None:
    """Print microseconds per call of each form, to re-measure SMALL_BATCH_ROWS on a new machine."""
    w = torch.randn(*shape, dtype=torch.bfloat16)
    lin = Linear(w)
    w32 = w.float()
    forms = {"F.linear bf16": lambda x: F.linear(x, w), "fp32": lambda x: F.linear(x.float(), w32)}
    if lin.packed is not None:
        forms["packed bf16"] = lambda x: torch.ops.mkldnn._linear_pointwise(x, lin.packed, None, "none", [], "")
    for m in rows:
        x = torch.randn(m, shape[1], dtype=torch.bfloat16)
        cells = []
        for name, f in forms.items():
            for _ in range(3):
                f(x)
            t = time.perf_counter()
            for _ in range(reps):
                f(x)
            cells.append(f"{name} {(time.perf_counter() - t) / reps * 1e6:7.0f} us")
        print(f"rows {m:4d}: " + " | ".join(cells))


if __name__ == "__main__":
    _bench()
    print("large-batch form measured here:", _measure_large_batch_form())
