"""Which path runs long query spans of a bf16 cache fastest: the tiled C kernel, bf16 matrix products
(`span_matmul.py`) or the AMX tile kernel (`kernels/amx_attention.c`, Xeons with AMX only).

That depends on the CPU, not its flags: oneDNN's bf16 GEMM uses AMX tiles on Intel Xeons that have them (several
times the vector rate: the tiled kernel's fp32 or bf16-pair FMAs lose), but only AVX512-BF16 vectors on AMD Zen 4,
where the tiled kernel's fused loop runs the products at about the GEMM's rate and skips its separate softmax
passes. So `span_path` times each path built here once per process and head shape, on a representative span
(128 queries over 4,096 keys of history, random bf16 K/V on scattered slots), at model build
(`selector.select_backend`). `DELTASERVE_SPAN_ATTN=matmul|kernel|amx` fixes the answer (tests, A/B runs).
"""

from __future__ import annotations

import logging
import time

import torch

from deltaserve import env
from deltaserve.kernels import paged_attention as native
from deltaserve.layers.attention import span_matmul

log = logging.getLogger(__name__)

PROBE_Q, PROBE_HISTORY = 128, 4096
MARGIN = 0.9  # another path must be 10% faster than the tiled kernel: a tie keeps it (exact fp32 scores, no gathers)
_CHOICE: dict[tuple, str] = {}


def best_ms(f, reps: int) -> float:
    """The fastest of `reps` calls of f, in ms: on a shared machine the least disturbed one (the benches use it too)."""
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def measure(num_heads: int, num_kv_heads: int, head_dim: int, bf16_dot: bool, reps: int = 3) -> dict[str, float]:
    """ms of one probe span by each path built here ("kernel", "matmul" where PyTorch has its flash op, "amx" where
    the AMX kernel runs); best of `reps`, the paths interleaved so that a burst of load from other processes hits
    all alike. Needs the tiled kernel built."""
    if not native.tiled_available():  # also binds the library
        raise RuntimeError("span probe: the tiled kernel is not built here")
    g = torch.Generator().manual_seed(0)
    n, L = PROBE_Q, PROBE_HISTORY + PROBE_Q
    S = 2 * L
    kc = torch.randn(S, num_kv_heads, head_dim, generator=g).to(torch.bfloat16)
    vc = torch.randn(S, num_kv_heads, head_dim, generator=g).to(torch.bfloat16)
    slots = torch.randperm(S, generator=g)[:L]  # scattered, as a pool's slots are after some churn
    q = torch.randn(n, num_heads, head_dim, generator=g).to(torch.bfloat16).float()  # [n, H, D]
    out = torch.empty_like(q)
    seqs = torch.tensor([[0, n, 0, L]])
    scale = head_dim**-0.5

    run = {"kernel": lambda: native.paged_attention_tiled(q, kc, vc, slots, seqs, scale, out, p_bf16=True,
                                                          bf16_dot=bf16_dot),
           "matmul": lambda: span_matmul.attend_spans(q, kc, vc, ((0, n, slots),), scale, out),
           "amx": lambda: native.paged_attention_amx(q, kc, vc, slots, seqs, scale, out)}
    paths = {p: run[p] for p in built_paths(head_dim)}
    for f in paths.values():
        f()  # warm-up: first-call costs (oneDNN's kernel generation, page faults)
    ms = dict.fromkeys(paths, float("inf"))
    for _ in range(reps):
        for name, f in paths.items():
            ms[name] = min(ms[name], best_ms(f, 1))
    return ms


def built_paths(head_dim: int) -> list[str]:
    """The span paths built here for a bf16 cache of this head_dim, the tiled kernel first."""
    return ["kernel"] + (["matmul"] if span_matmul.available() else []) + (
        ["amx"] if native.supports_amx(torch.device("cpu"), torch.bfloat16, head_dim) else [])


def pick(ms: dict[str, float]) -> str:
    """The fastest path of a `measure` result; the tiled kernel unless another beats it by the margin."""
    best = min(ms, key=ms.get)
    return best if ms[best] < MARGIN * ms["kernel"] else "kernel"


def span_path(num_heads: int, num_kv_heads: int, head_dim: int, bf16_dot: bool) -> str:
    """The path long spans of a bf16 cache take ("kernel", "matmul" or "amx"): the env override, else measured
    once per head shape in this process. Call at model build only. A forced path not built here (no AMX, no flash
    op, head_dim the AMX kernel does not take) is measured instead, with a warning."""
    fixed = env.span_attn()
    if fixed is not None:
        if fixed in built_paths(head_dim):
            return fixed
        log.warning("DELTASERVE_SPAN_ATTN=%s: that path is not available here; measuring instead", fixed)
    key = (num_heads, num_kv_heads, head_dim, bf16_dot)
    if key not in _CHOICE:
        ms = measure(*key)
        _CHOICE[key] = pick(ms)
        log.info("span attention probe (%d queries over %d keys, heads %d/%d x %d): %s -> %s", PROBE_Q,
                 PROBE_HISTORY, num_heads, num_kv_heads, head_dim,
                 ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items()), _CHOICE[key])
    return _CHOICE[key]


if __name__ == "__main__":
    for shape in ((9, 3, 64), (14, 2, 64)):
        ms = measure(*shape, bf16_dot=True, reps=5)
        print(f"heads {shape} ({PROBE_Q} queries over {PROBE_HISTORY} keys): "
              + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items()) + f" -> {pick(ms)}")
