"""Whether long query spans run faster as bf16 matrix products (`span_matmul.py`) than in the tiled C kernel.

That depends on the CPU, not its flags: oneDNN's bf16 GEMM uses AMX tiles on Intel Xeons that have them (several
times the vector rate: the kernel's fp32 or bf16-pair FMAs lose), but only AVX512-BF16 vectors on AMD Zen 4, where
the kernel's fused loop runs the products at about the GEMM's rate and skips its separate softmax passes. So
`matmul_spans` times both once per process and head shape, on a representative span (128 queries over 4,096
keys of history, random bf16 K/V on scattered slots), at model build (`selector.select_backend`).
`DELTASERVE_SPAN_ATTN=matmul|kernel` fixes the answer (tests, A/B runs).
"""

from __future__ import annotations

import logging
import time

import torch

from deltaserve import env

log = logging.getLogger(__name__)

PROBE_Q, PROBE_HISTORY = 128, 4096
MARGIN = 0.9  # the matmul path must be 10% faster: a tie keeps the kernel (exact fp32 scores, no gathers)
_CHOICE: dict[tuple, bool] = {}


def best_ms(f, reps: int) -> float:
    """The fastest of `reps` calls of f, in ms: on a shared machine the least disturbed one (the benches use it too)."""
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def measure(num_heads: int, num_kv_heads: int, head_dim: int, bf16_dot: bool, reps: int = 3) -> tuple[float, float]:
    """(tiled kernel ms, matmul path ms) of one probe span; best of `reps`, the two interleaved so that a burst
    of load from other processes hits both alike. Needs the tiled kernel built."""
    from deltaserve.kernels import paged_attention as native
    from deltaserve.layers.attention import span_matmul

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

    def kernel():
        native.paged_attention_tiled(q, kc, vc, slots, seqs, scale, out, p_bf16=True, bf16_dot=bf16_dot)

    def matmul():
        span_matmul.attend_spans(q, kc, vc, ((0, n, slots),), scale, out)

    kernel(), matmul()  # warm-up: first-call costs (oneDNN's kernel generation, page faults)
    k_ms = m_ms = float("inf")
    for _ in range(reps):
        k_ms = min(k_ms, best_ms(kernel, 1))
        m_ms = min(m_ms, best_ms(matmul, 1))
    return k_ms, m_ms


def matmul_spans(num_heads: int, num_kv_heads: int, head_dim: int, bf16_dot: bool) -> bool:
    """Run long spans of a bf16 cache as matrix products (True) or in the tiled kernel (False): the env override,
    else measured once per head shape in this process. Call at model build only."""
    fixed = env.span_attn()
    if fixed is not None:
        return fixed == "matmul"
    key = (num_heads, num_kv_heads, head_dim, bf16_dot)
    if key not in _CHOICE:
        k_ms, m_ms = measure(*key)
        _CHOICE[key] = m_ms < MARGIN * k_ms
        log.info("span attention probe (%d queries over %d keys, heads %d/%d x %d): kernel %.2f ms, matmul %.2f ms"
                 " -> %s", PROBE_Q, PROBE_HISTORY, num_heads, num_kv_heads, head_dim, k_ms, m_ms,
                 "matmul" if _CHOICE[key] else "kernel")
    return _CHOICE[key]


if __name__ == "__main__":
    for shape in ((9, 3, 64), (14, 2, 64)):
        k_ms, m_ms = measure(*shape, bf16_dot=True, reps=5)
        print(f"heads {shape}: tiled kernel {k_ms:.2f} ms, matmul {m_ms:.2f} ms ({PROBE_Q} queries over "
              f"{PROBE_HISTORY} keys) -> {'matmul' if m_ms < MARGIN * k_ms else 'kernel'}")
