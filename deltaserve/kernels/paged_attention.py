"""ctypes bindings of the native attention kernels, which read K/V straight from the slot pool.

- `paged_attention.c`: short queries (decode, speculative verify), split-K over key chunks;
- `tiled_attention.c`: long query spans (prefill chunks), register-tiled flash attention.
"""

from __future__ import annotations

import ctypes

import torch

from deltaserve.kernels import load

_LIBS: dict[str, ctypes.CDLL | None] = {}


def _bind(name: str, fn: str, extra_args: list, probe: str | None = None) -> ctypes.CDLL | None:
    """Load kernels/<name>.c once and declare `fn`; `probe()` (if given) must return 1 for the build to count."""
    if name not in _LIBS:
        lib = load(name)
        if lib is not None:
            getattr(lib, fn).restype = ctypes.c_int
            getattr(lib, fn).argtypes = _lib_argtypes() + extra_args
            if probe is not None:
                getattr(lib, probe).restype = ctypes.c_int
                if getattr(lib, probe)() != 1:
                    lib = None
        _LIBS[name] = lib
    return _LIBS[name]


def available() -> bool:
    return _bind("paged_attention", "paged_attention_short", [ctypes.c_int]) is not None


def tiled_available() -> bool:
    """The tiled kernel was built here with AVX-512 or AVX2 + FMA (else long spans keep the SDPA path)."""
    return _bind("tiled_attention", "paged_attention_tiled", [ctypes.c_int], "paged_attention_tiled_available") is not None


def _lib_argtypes() -> list:
    return [ctypes.c_void_p] * 3 + [ctypes.c_int] + [ctypes.c_void_p] * 2 + [ctypes.c_int] * 4 + [
        ctypes.c_float, ctypes.c_void_p]


def _cpu_cache(device: torch.device, kv_dtype: torch.dtype) -> bool:
    return device.type == "cpu" and kv_dtype in (torch.bfloat16, torch.float32)


def supports_tiled(device: torch.device, kv_dtype: torch.dtype, head_dim: int) -> bool:
    """The tiled kernel takes a KV cache of this kind and is built here."""
    return _cpu_cache(device, kv_dtype) and head_dim % 4 == 0 and tiled_available()


def supports(device: torch.device, kv_dtype: torch.dtype) -> bool:
    """The short-query kernel takes a KV cache of this kind and is built here."""
    return _cpu_cache(device, kv_dtype) and available()


def _args(q, k_cache, v_cache, slots, seqs, scale, out) -> tuple:
    """Check the shared contract of both kernels; their common C arguments, in order."""
    T, H, D = q.shape
    Hkv = k_cache.shape[1]
    assert q.dtype == torch.float32 and out.dtype == torch.float32 and q.is_contiguous() and out.is_contiguous()
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and slots.dtype == seqs.dtype == torch.int64
    assert H % Hkv == 0 and k_cache.shape[2] == D
    return (q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), int(k_cache.dtype == torch.bfloat16),
            slots.data_ptr(), seqs.data_ptr(), seqs.shape[0], H, Hkv, D, float(scale), out.data_ptr())


def paged_attention_short(
    q: torch.Tensor,  # [T, H, D] float32, contiguous
    k_cache: torch.Tensor,  # [num_slots, Hkv, D] bf16 or fp32, contiguous
    v_cache: torch.Tensor,
    slots: torch.Tensor,  # [sum kv_len] int64: the sequences' slot lists concatenated
    seqs: torch.Tensor,  # [n_seqs, 4] int64: q_start, q_len, kv_offset, kv_len
    scale: float,
    out: torch.Tensor,  # [T, H, D] float32; rows of the listed sequences' queries are written
    pairs: bool = False,
) -> None:
    """pairs: with a bf16 cache (and AVX512-BF16, D a multiple of 32), both products as bf16 pair dot products
    with keys on lanes: q and the softmax numerators rounded to bf16, as the tiled kernel's p_bf16 mode
    (~2^-9 relative error); K/V rows are used as stored instead of being converted to fp32 first."""
    assert seqs.shape[0] == 0 or int(seqs[:, 1].max()) <= 64, "at most 64 queries a sequence"
    rc = _LIBS["paged_attention"].paged_attention_short(*_args(q, k_cache, v_cache, slots, seqs, scale, out),
                                                         int(pairs))
    if rc != 0:
        raise MemoryError("paged_attention_short: out of memory for its work buffers")


def paged_attention_tiled(
    q: torch.Tensor,  # [T, H, D] float32, contiguous
    k_cache: torch.Tensor,  # [num_slots, Hkv, D] bf16 or fp32, contiguous
    v_cache: torch.Tensor,
    slots: torch.Tensor,  # [sum kv_len] int64: the sequences' slot lists concatenated
    seqs: torch.Tensor,  # [n_seqs, 4] int64: q_start, q_len, kv_offset, kv_len
    scale: float,
    out: torch.Tensor,  # [T, H, D] float32; rows of the listed sequences' queries are written
    p_bf16: bool = False,
    bf16_dot: bool = True,
) -> None:
    """Same contract as `paged_attention_short`, for query spans of any length (tiled flash attention).

    With a bf16 cache, Q.K runs as bf16 pair products (q rounded to bf16: exact when q came from a bf16
    model); p_bf16 rounds the softmax numerators to bf16 for P.V too (twice as fast, ~2^-9 relative error).
    bf16_dot=False forces fp32 products, as on a CPU without AVX512-BF16 (for tests)."""
    rc = _LIBS["tiled_attention"].paged_attention_tiled(*_args(q, k_cache, v_cache, slots, seqs, scale, out),
                                                         int(p_bf16) | (0 if bf16_dot else 2))
    if rc == 1:
        raise MemoryError("paged_attention_tiled: out of memory for its work buffers")
    if rc != 0:
        raise RuntimeError(f"paged_attention_tiled: unsupported shape (q {tuple(q.shape)}, k {tuple(k_cache.shape)})")


def _bench(reps: int = 10) -> None:
    """Print ms per call of the short and tiled kernels and of SDPA on gathered K/V (SmolLM2 heads, bf16 KV),
    to re-measure `layers.attention.native.TILED_MIN_ROWS` on a new machine:
    python -m deltaserve.kernels.paged_attention"""
    import time

    import torch.nn.functional as F

    H, Hkv, D = 9, 3, 64

    def ms(f) -> float:
        f()
        t = time.perf_counter()
        for _ in range(reps):
            f()
        return (time.perf_counter() - t) / reps * 1e3

    for B, n, L in [(1, 1, 5000), (4, 1, 5000), (4, 5, 5000), (1, 100, 5000), (1, 500, 5000), (1, 2048, 2048)]:
        kc = torch.randn(B * L, Hkv, D).to(torch.bfloat16)
        vc = torch.randn(B * L, Hkv, D).to(torch.bfloat16)
        slots = torch.arange(B * L)  # a session's slots are mostly runs of consecutive ids
        q = torch.randn(B * n, H, D)
        out = torch.empty_like(q)
        seqs = torch.tensor([[b * n, n, b * L, L] for b in range(B)])
        mask = torch.arange(L)[None, :] <= (torch.arange(n) + L - n)[:, None]

        def sdpa():
            for b in range(B):
                sl = slots[b * L : (b + 1) * L]
                k = kc.index_select(0, sl).float().transpose(0, 1)[None]  # [1, Hkv, L, D]
                v = vc.index_select(0, sl).float().transpose(0, 1)[None]
                F.scaled_dot_product_attention(q[b * n : (b + 1) * n].transpose(0, 1)[None], k, v, attn_mask=mask,
                                               scale=D**-0.5, enable_gqa=True)

        cells = [f"sdpa {ms(sdpa):8.2f}"]
        qb = q.to(torch.bfloat16).float()  # a bf16 model's queries, as the engine passes them to the bf16 modes
        if n <= 64 and available():
            cells.append(f"short {ms(lambda: paged_attention_short(q, kc, vc, slots, seqs, D**-0.5, out)):8.2f}")
            cells.append(f"pairs {ms(lambda: paged_attention_short(qb, kc, vc, slots, seqs, D**-0.5, out, True)):8.2f}")
        if tiled_available():
            # as the engine calls it for a bf16 model: P.V in bf16 pairs
            cells.append(f"tiled {ms(lambda: paged_attention_tiled(qb, kc, vc, slots, seqs, D**-0.5, out, True)):8.2f}")
        print(f"{B} seqs x {n:4d} queries x {L} keys ({n * H // Hkv} rows a kv head), ms: " + " | ".join(cells))


if __name__ == "__main__":
    _bench()
