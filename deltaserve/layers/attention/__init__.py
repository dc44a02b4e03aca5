"""Paged attention over the token-slot KV pool, behind one backend chosen at model build.

One forward step carries tokens of several sequences flattened into `[T, ...]`. Each sequence contributes
`q_len` query tokens whose K/V are written into their slots first; its context is then read from the pool
through `kv_slots` (a `SeqSpan`).

- `base.py`: `SeqSpan` and the `AttentionBackend` interface (prepare once a step, forward once a layer);
- `selector.py`: `select_backend`, the one place that picks a backend, its kernels and the CPU probe's answers;
- `native.py`: the native CPU kernels (short-query + tiled, or short-query + SDPA for long spans);
- `span_matmul.py`: long spans as bf16 matrix products over chunked K/V gathers (where `span_probe.py` measured
  them faster than the tiled kernel: AMX Xeons);
- `sdpa.py`: PyTorch SDPA (CUDA, no compiler, `DELTASERVE_NATIVE=off`).
"""

from deltaserve.layers.attention import span_matmul, span_probe
from deltaserve.layers.attention.base import AttentionBackend, SeqSpan
from deltaserve.layers.attention.native import NativeCpuBackend, NativeMetadata
from deltaserve.layers.attention.sdpa import SdpaBackend, SdpaMetadata
from deltaserve.layers.attention.selector import select_backend

__all__ = ["AttentionBackend", "NativeCpuBackend", "NativeMetadata", "SdpaBackend", "SdpaMetadata", "SeqSpan",
           "select_backend", "span_matmul", "span_probe"]
