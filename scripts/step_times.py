"""Time whole-model forward steps of typical shapes (SmolLM2 bf16 by default), best of 5 after 2 warm-ups.

    OMP_NUM_THREADS=2 python scripts/step_times.py [--model M] [--profile CASE] [--ab VARIANTS]

Each case is a list of (context before, new tokens) per sequence: decodes, verify steps (k+1 tokens), a turn's
delta over a long context, a whole prompt. K/V slots are contiguous and their contents arbitrary: only the
timing means anything. --profile CASE prints torch's operator table for that case (the native attention
kernels run through ctypes and show up as the gap between the table's total and the step time).
--ab times two variants of each case alternately in this one process (the machine's drift cancels): `min-rows`
routes spans to the tiled kernel from 12 vs 16 rows (`NativeCpuBackend.tiled_min_rows`) (`min-rows-avx2`: 8 vs 16;
`min-rows-wide`: 16 vs 28, adding W35's 6k cases),
`pairs` runs the short kernel in fp32 vs bf16 pairs, `span-path` runs long spans in the tiled kernel vs bf16
matrix products vs the AMX kernel (those built here, `NativeCpuBackend.span_path`; with W35's 6k cases),
`small-gemm-rows` moves `layers.linear.SMALL_BATCH_ROWS_UNPACKED` (CPUs without oneDNN bf16) to 8 vs 24
(`small-gemm-rows-wide`: 24 vs 48, adding W35's 6k cases). Each variant is a copy of the model's attention backend
(`dataclasses.replace`), so the model runs the one whose metadata the step was prepared with.
--ab pack-hint times bf16 linears with the weights reordered for oneDNN batch-size hint 1 vs 16
(`layers.linear.PACK_HINT_AMX`), on agent-turn and prefill cases; `amx-gemm` small batches in oneDNN's packed form
vs `kernels/amx_gemm.c` (`layers.linear.AMX_GEMM_ROWS` 0 vs its value); `amx-short` decode and verify spans in the
short kernel's pairs / the AMX span kernel vs `kernels/amx_short.c` (`NativeCpuBackend.amx_short` off vs on; with
--kv-cache-dtype int8 the short kernel's integer path vs `kernels/amx_short_int8.c`).
--ab-tiled OLD.so times another build of the tiled kernel against this tree's, alternately in this one process, e.g.
    git show REV:deltaserve/kernels/tiled_attention.c > /tmp/t/tiled_attention.c   (and the headers it includes)
    cc -O3 -march=native -fno-math-errno -fopenmp -shared -fPIC /tmp/t/tiled_attention.c -o /tmp/old.so -lm
--ab-short OLD.so does the same for the short (decode/verify) kernel, paged_attention.c, and --ab-amx OLD.so for the
AMX span kernel, amx_attention.c (its build includes amx_tiles.h, prefetch.h and transpose16.h).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from deltaserve.engine.engine import EngineConfig, LLMEngine
from deltaserve.engine.kv_manager import CacheMode
from deltaserve.kernels import paged_attention as pa
from deltaserve.layers.attention import NativeCpuBackend, SeqSpan, span_probe
from deltaserve.layers.attention.native import tiled_min_rows

CASES = {
    "decode 4 @4k": [(4000, 1)] * 4, "verify 4x5 @4k": [(4000, 5)] * 4, "verify 4x8 @4k": [(4000, 8)] * 4,
    "verify 1x5 @4k": [(4000, 5)], "delta 300 @4k": [(4000, 300)], "delta 300 + 3 verify @4k": [(4000, 300)] + [(4000, 5)] * 3,
    "prefill 2048": [(0, 2048)], "decode 1 @100": [(100, 1)], "verify 1x5 @100": [(100, 5)], "verify 1x16 @100": [(100, 16)],
}
# W35's late turns (~6k context): a turn's delta, 4 agents' verify spans (k = 8), and both in one step
CASES_6K = {"delta 300 @6k": [(6000, 300)], "verify 4x9 @6k": [(6000, 9)] * 4,
            "delta 300 + 3 verify9 @6k": [(6000, 300)] + [(6000, 9)] * 3}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--profile", default="", choices=[""] + list(CASES))
    ap.add_argument("--ab", default="", choices=["", "min-rows", "min-rows-avx2", "min-rows-wide", "pairs",
                                                  "span-path", "small-gemm-rows", "small-gemm-rows-wide",
                                                  "pack-hint", "amx-gemm", "amx-short"])
    ap.add_argument("--kv-cache-dtype", default="auto", help="the pool's format (int8: --ab amx-short times "
                    "kernels/amx_short_int8.c against the short kernel's integer path)")
    ap.add_argument("--ab-tiled", default="", metavar="OLD.so")
    ap.add_argument("--ab-short", default="", metavar="OLD.so")
    ap.add_argument("--ab-amx", default="", metavar="OLD.so")
    args = ap.parse_args()
    global KV_CACHE_DTYPE
    KV_CACHE_DTYPE = args.kv_cache_dtype
    if args.ab_tiled:
        return ab_tiled(args)
    if args.ab_short:
        return ab_short(args)
    if args.ab_amx:
        return ab_lib(args.model, "amx_attention", "paged_attention_amx", args.ab_amx,
                      {k: v for k, v in CASES_TURN.items() if not k.startswith("decode")} | CASES_6K)
    if args.ab == "pack-hint":
        return ab_pack_hint(args)
    if args.ab == "amx-gemm":
        return ab_amx_gemm(args)
    if args.ab == "amx-short":
        return ab_amx_short(args)
    if args.ab:
        return ab(args)
    r = _engine(args.model).runner
    step = _stepper(r)
    with torch.inference_mode():
        for name, spec in CASES.items():
            f = step(spec)
            for _ in range(2):
                f()
            ts = []
            for _ in range(5):
                t = time.perf_counter()
                f()
                ts.append(time.perf_counter() - t)
            print(f"{name:26s} {min(ts) * 1e3:8.1f} ms")
        if args.profile:
            from torch.profiler import profile

            f = step(CASES[args.profile])
            with profile() as p:
                for _ in range(3):
                    f()
            print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


# the pool's `--kv-cache-dtype` (main sets it from --kv-cache-dtype)
KV_CACHE_DTYPE = "auto"


def _engine(model: str) -> LLMEngine:
    return LLMEngine.from_model(model, EngineConfig(dtype=torch.bfloat16, cache_mode=CacheMode.STATELESS,
                                                    speculation=False, kv_cache_bytes=1 << 30, max_batch_tokens=8192,
                                                    kv_cache_dtype=KV_CACHE_DTYPE))


def ab(args) -> None:
    import deltaserve.layers.linear as lin

    r = _filled_runner(args.model)
    base = r.model.attn
    native = isinstance(base, NativeCpuBackend) and base.short and base.tiled
    assert native or args.ab.startswith("small-gemm-rows"), \
        f"--ab {args.ab} needs both native attention kernels: {base}"
    # label -> (rows from which spans take the tiled kernel, short kernel in pairs mode,
    # linear.SMALL_BATCH_ROWS_UNPACKED, where long spans go)
    rows, pairs = (base.tiled_min_rows, base.pairs) if native else (0, False)  # ignored without the native kernels
    small = lin.SMALL_BATCH_ROWS_UNPACKED
    sp = base.span_path if native else "kernel"
    paths = span_probe.built_paths(r.model.cfg.head_dim)
    if native and base.kv_format.quantized:  # no matrix-product path for int8 / fp8 rows
        paths = [p for p in paths if p != "matmul"]
    variants = {"min-rows": {"12": (12, pairs, small, sp), "16": (16, pairs, small, sp)},
                "min-rows-avx2": {"8": (8, pairs, small, sp), "16": (16, pairs, small, sp)},
                "min-rows-wide": {"16": (16, pairs, small, sp), "28": (28, pairs, small, sp)},
                "pairs": {"fp32": (rows, False, small, sp), "pairs": (rows, pairs, small, sp)},
                "span-path": {p: (rows, pairs, small, p) for p in paths},
                "small-gemm-rows": {"8": (rows, pairs, 8, sp), "24": (rows, pairs, 24, sp)},
                "small-gemm-rows-wide": {"24": (rows, pairs, 24, sp), "48": (rows, pairs, 48, sp)}}[args.ab]
    step = _stepper(r)
    with torch.inference_mode():
        wide = args.ab.endswith("-wide") or args.ab == "span-path"
        for name, spec in (CASES | CASES_6K if wide else CASES).items():
            fs = {}
            for label, (min_rows, pairs_, small_rows, path) in variants.items():
                if args.ab == "span-path":  # each path with the split the selector gives it
                    min_rows = tiled_min_rows(not pairs_, amx=path == "amx")
                attn = dataclasses.replace(base, tiled_min_rows=min_rows, pairs=pairs_, span_path=path) \
                    if native else base
                fs[label] = (step(spec, attn), small_rows)

            def use(small_rows):
                lin.SMALL_BATCH_ROWS_UNPACKED = small_rows  # read by every Linear call

            best = _best_alternating({k: (f, lambda s=small_rows: use(s)) for k, (f, small_rows) in fs.items()})
            lin.SMALL_BATCH_ROWS_UNPACKED = small
            r.model.attn = base
            print(f"{name:26s} " + "  ".join(f"{k} {v * 1e3:8.1f} ms" for k, v in best.items()))


# an agent turn's steps (4 agents' decodes and verifies, a tool result's delta beside verifies) and prefills
CASES_TURN = {"decode 4 @1500": [(1500, 1)] * 4, "verify 4x9 @1500": [(1500, 9)] * 4,
              "delta 150 + 3x9 @1500": [(1500, 150)] + [(1500, 9)] * 3, "delta 300 @1500": [(1500, 300)],
              "delta 300 @4000": [(4000, 300)], "prefill 512": [(0, 512)], "prefill 1024": [(0, 1024)],
              "prefill 2048": [(0, 2048)], "2x prefill 1000": [(0, 1000)] * 2}


def ab_pack_hint(args) -> None:
    r = _filled_runner(args.model)
    lins = [lin for layer in r.model.layers for lin in (layer.qkv, layer.o, layer.gate_up, layer.down)]
    assert all(lin.packed is not None for lin in lins), "--ab pack-hint needs oneDNN's packed bf16 weights here"
    forms = {h: [torch.ops.mkldnn._reorder_linear_weight(lin.weight, h) for lin in lins] for h in (1, 16)}
    kept = [lin.packed for lin in lins]

    def use(h):
        for lin, p in zip(lins, forms[h]):
            lin.packed = p  # read by every Linear call

    step = _stepper(r)
    with torch.inference_mode():
        for name, spec in CASES_TURN.items():
            f = step(spec)
            best = _best_alternating({h: (f, lambda h=h: use(h)) for h in forms}, rounds=5)
            print(f"{name:24s} hint1 {best[1] * 1e3:7.1f} ms  hint16 {best[16] * 1e3:7.1f} ms"
                  f"  ({best[16] / best[1]:.3f})", flush=True)
    for lin, p in zip(lins, kept):
        lin.packed = p


def ab_amx_gemm(args) -> None:
    import deltaserve.layers.linear as lin

    r = _filled_runner(args.model)
    assert r.model.layers[0].qkv.tiles is not None, "--ab amx-gemm needs amx_gemm's weights (AMX, a bf16 model)"
    rows = lin.AMX_GEMM_ROWS
    step = _stepper(r)
    with torch.inference_mode():
        for name, spec in (CASES_TURN | CASES_6K).items():
            f = step(spec)
            best = _best_alternating({k: (f, lambda k=k: setattr(lin, "AMX_GEMM_ROWS", k)) for k in (0, rows)})
            print(f"{name:24s} oneDNN {best[0] * 1e3:7.1f} ms  amx_gemm {best[rows] * 1e3:7.1f} ms"
                  f"  ({best[rows] / best[0]:.3f})", flush=True)
    lin.AMX_GEMM_ROWS = rows


def ab_amx_short(args) -> None:
    r = _filled_runner(args.model)
    base = r.model.attn
    assert isinstance(base, NativeCpuBackend) and base.amx_short, \
        f"--ab amx-short needs the AMX short kernel (AMX, a bf16 model, a bf16 or int8 cache): {base}"
    variants = {k: dataclasses.replace(base, amx_short=k == "on") for k in ("off", "on")}
    cases = {"decode 1 @1500": [(1500, 1)], "verify 1x9 @1500": [(1500, 9)]} | CASES_TURN | CASES_6K \
        | {"decode 4 @6k": [(6000, 1)] * 4, "verify 4x5 @6k": [(6000, 5)] * 4}
    step = _stepper(r)
    with torch.inference_mode():
        for name, spec in cases.items():
            if all(q * base.num_heads // base.num_kv_heads > pa.AMX_SHORT_MAX_ROWS for _, q in spec):
                continue  # no step the AMX short kernel would take: both variants route it alike
            best = _best_alternating({k: (step(spec, attn), lambda: None) for k, attn in variants.items()})
            r.model.attn = base
            print(f"{name:26s} off {best['off'] * 1e3:8.1f} ms  on {best['on'] * 1e3:8.1f} ms"
                  f"  ({best['on'] / best['off']:.3f})", flush=True)


def ab_tiled(args) -> None:
    cases = {k: CASES[k] for k in ("verify 4x5 @4k", "delta 300 @4k", "prefill 2048")} | CASES_6K
    ab_lib(args.model, "tiled_attention", "paged_attention_tiled", args.ab_tiled, cases)


def ab_short(args) -> None:
    cases = {k: CASES[k] for k in ("decode 4 @4k", "verify 4x5 @4k", "verify 1x5 @4k", "decode 1 @100")}
    ab_lib(args.model, "paged_attention", "paged_attention_short", args.ab_short, cases)


def ab_lib(model: str, lib: str, fn: str, old_path: str, cases: dict) -> None:
    """Whole steps with another build (old_path) of kernel library `lib` against this tree's, alternately."""
    import ctypes

    r = _filled_runner(model)
    assert pa.tiled_available() and pa.available() and (lib != "amx_attention" or pa.amx_available()), \
        "the attention kernels are not built here"
    libs = {"old": ctypes.CDLL(old_path), "new": pa._LIBS[lib]}
    getattr(libs["old"], fn).restype = ctypes.c_int
    getattr(libs["old"], fn).argtypes = pa._lib_argtypes() + [ctypes.c_int]
    step = _stepper(r)
    with torch.inference_mode():
        for name, spec in cases.items():
            f = step(spec)
            # pa._LIBS is read by every kernel call
            best = _best_alternating({k: (f, lambda lb=lb: pa._LIBS.__setitem__(lib, lb)) for k, lb in libs.items()})
            pa._LIBS[lib] = libs["new"]
            print(f"{name:28s} old {best['old'] * 1e3:8.1f} ms  new {best['new'] * 1e3:8.1f} ms"
                  f"  ({best['new'] / best['old']:.3f})", flush=True)


def _filled_runner(model: str):
    from deltaserve.kv.quant import quantize_rows

    r = _engine(model).runner
    fmt = r.kv.layout.fmt
    for t in r.kv.k_cache + r.kv.v_cache:
        # real-looking values, so the softmax and exp paths do their usual work (a quantized pool: rows of them)
        if fmt.quantized:
            for i in range(0, t.shape[0], 1 << 16):
                n = min(1 << 16, t.shape[0] - i)
                t[i : i + n] = quantize_rows(torch.randn(n, t.shape[1], r.kv.layout.head_dim), fmt)
        else:
            t.normal_()
    return r


def _best_alternating(variants: dict, rounds: int = 6) -> dict:
    """variants: label -> (step fn, setup fn run before it). Best seconds a step per label, the variants taking turns
    each round (a warm-up call, then the mean of two)."""
    best = {k: 1e9 for k in variants}
    for _ in range(rounds):
        for k, (f, setup) in variants.items():
            setup()
            f()
            t = time.perf_counter()
            f()
            f()
            best[k] = min(best[k], (time.perf_counter() - t) / 2)
    return best


def _stepper(r):
    def step(spec, attn=None):
        """A whole forward step of `spec` with attention backend `attn` (default: the model's)."""
        attn = attn or r.model.attn
        ids, pos, spans, write, base = [], [], [], [], 0
        for ctx, q in spec:
            slots = torch.arange(base, base + ctx + q)
            base += ctx + q + 16
            spans.append(SeqSpan(len(ids), q, slots))
            ids += [100 + i % 1000 for i in range(q)]
            pos += list(range(ctx, ctx + q))
            write.append(slots[ctx:])
        meta = attn.prepare(spans, torch.cat(write))

        def f():
            r.model.attn = attn  # the backend this step's metadata was prepared for
            return r.model(torch.tensor(ids), torch.tensor(pos), r.kv, meta)

        return f

    return step


if __name__ == "__main__":
    main()
