"""ctypes bindings of the native attention kernels, which read K/V straight from the slot pool.

- `paged_attention.c`: short queries (decode, speculative verify), split-K over key chunks;
- `tiled_attention.c`: long query spans (prefill chunks), register-tiled flash attention;
- `amx_attention.c`: long query spans of a bf16 cache as AMX tile products (Intel Xeons with AMX only);
- `amx_short.c`: decode and verify spans (up to AMX_SHORT_MAX_ROWS rows a sequence) of a bf16 cache on AMX tiles, K
  rows used as the pool stores them (S^T = K.Q^T);
- `amx_short_int8.c`: the same spans of an int8 cache on AMX-INT8 tiles, in exact integer products.

The short and tiled kernels read a cache of any `kv.quant` format: fp32 / bf16 rows of D elements, or int8 / fp8 e4m3
rows of D bytes and their fp32 scale (a uint8 cache [num_slots, Hkv, D + 4]), dequantized a key chunk at a time
(`kernels/kv_rows.h`); the AMX kernels read bf16 caches only, but `amx_short_int8.c` int8 ones.
"""

from __future__ import annotations

import ctypes

import torch

from deltaserve.kernels import load

_LIBS: dict[str, ctypes.CDLL | None] = {}
SHORT_MAX_Q = 64  # queries a sequence the short kernel takes (paged_attention.c)
AMX_SHORT_MAX_ROWS = 64  # rows (q_len x GQA group) a sequence the AMX short kernel takes (amx_short.c)


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


def amx_available() -> bool:
    """The AMX span kernel was built here (AMX-BF16 at compile time) and the kernel granted the tile state."""
    return _bind("amx_attention", "paged_attention_amx", [ctypes.c_int], "paged_attention_amx_available") is not None


def amx_short_available() -> bool:
    """The AMX short-span kernel was built here and the kernel granted the tile state."""
    return _bind("amx_short", "paged_attention_amx_short", [ctypes.c_int],
                 "paged_attention_amx_short_available") is not None


def amx_short_int8_available() -> bool:
    """The AMX short-span kernel for int8 caches was built here (AMX-INT8) and the kernel granted the tile state."""
    return _bind("amx_short_int8", "paged_attention_amx_short_int8", [ctypes.c_int],
                 "paged_attention_amx_short_int8_available") is not None


def supports_amx_short_int8(head_dim: int, num_kv_heads: int) -> bool:
    """The int8 AMX short kernel takes this head shape (head_dim a multiple of 64 up to 256, up to 64 kv heads) and is
    built here."""
    return head_dim % 64 == 0 and head_dim <= 256 and num_kv_heads <= 64 and amx_short_int8_available()


def supports_amx(device: torch.device, kv_dtype: torch.dtype, head_dim: int) -> bool:
    """The AMX span kernel takes a KV cache of this kind (bf16, or uint8: int8 / fp8 rows; head_dim a multiple of 32
    up to 256) here."""
    return device.type == "cpu" and kv_dtype in (torch.bfloat16, torch.uint8) and head_dim % 32 == 0 \
        and head_dim <= 256 and amx_available()


def _lib_argtypes() -> list:
    return [ctypes.c_void_p] * 3 + [ctypes.c_int] + [ctypes.c_void_p] * 2 + [ctypes.c_int] * 4 + [
        ctypes.c_float, ctypes.c_void_p]


# the kernels' kind codes (kv.quant.KVFormat.kind) a cache dtype implies; a uint8 cache (int8 or fp8 rows) names its own
_KIND_OF_DTYPE = {torch.float32: 0, torch.bfloat16: 1}
_QUANT_KINDS = (2, 3)


def _cpu_cache(device: torch.device, kv_dtype: torch.dtype) -> bool:
    return device.type == "cpu" and kv_dtype in (torch.bfloat16, torch.float32, torch.uint8)


def supports_tiled(device: torch.device, kv_dtype: torch.dtype, head_dim: int) -> bool:
    """The tiled kernel takes a KV cache of this kind and is built here."""
    return _cpu_cache(device, kv_dtype) and head_dim % 4 == 0 and tiled_available()


def supports(device: torch.device, kv_dtype: torch.dtype) -> bool:
    """The short-query kernel takes a KV cache of this kind and is built here."""
    return _cpu_cache(device, kv_dtype) and available()


def _kind(k_cache: torch.Tensor, kind: int | None) -> int:
    """The cache's kind code: what its dtype says (fp32 0, bf16 1); a uint8 cache must name 2 (int8) or 3 (fp8)."""
    if k_cache.dtype == torch.uint8:
        assert kind in _QUANT_KINDS, f"a uint8 KV cache needs kind 2 (int8) or 3 (fp8 e4m3), got {kind}"
        return kind
    assert k_cache.dtype in _KIND_OF_DTYPE, k_cache.dtype
    assert kind is None or kind == _KIND_OF_DTYPE[k_cache.dtype], (k_cache.dtype, kind)
    return _KIND_OF_DTYPE[k_cache.dtype]


def _args(q, k_cache, v_cache, slots, seqs, scale, out, kind) -> tuple:
    """Check the shared contract of both kernels; their common C arguments, in order."""
    T, H, D = q.shape
    Hkv = k_cache.shape[1]
    kind = _kind(k_cache, kind)
    assert q.dtype == torch.float32 and out.dtype == torch.float32 and q.is_contiguous() and out.is_contiguous()
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and slots.dtype == seqs.dtype == torch.int64
    assert v_cache.dtype == k_cache.dtype and v_cache.shape[1:] == k_cache.shape[1:]
    # a quantized row is D value bytes and the 4 bytes of its fp32 scale
    assert H % Hkv == 0 and k_cache.shape[2] == (D + 4 if kind in _QUANT_KINDS else D), (k_cache.shape, D, kind)
    return (q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), kind,
            slots.data_ptr(), seqs.data_ptr(), seqs.shape[0], H, Hkv, D, float(scale), out.data_ptr())


def _check(rc: int, fn: str, q: torch.Tensor, k_cache: torch.Tensor, limits: str = "") -> None:
    """A kernel's return code as the caller's error: 1 out of memory, 2 a shape or kind it does not take."""
    if rc == 1:
        raise MemoryError(f"{fn}: out of memory for its work buffers")
    if rc != 0:
        raise RuntimeError(f"{fn}: unsupported shape (q {tuple(q.shape)}, k {tuple(k_cache.shape)}{limits})")


def paged_attention_short(
    q: torch.Tensor,  # [T, H, D] float32, contiguous
    k_cache: torch.Tensor,  # [num_slots, Hkv, D] bf16 or fp32, or [num_slots, Hkv, D + 4] uint8; contiguous
    v_cache: torch.Tensor,
    slots: torch.Tensor,  # [sum kv_len] int64: the sequences' slot lists concatenated
    seqs: torch.Tensor,  # [n_seqs, 4] int64: q_start, q_len, kv_offset, kv_len
    scale: float,
    out: torch.Tensor,  # [T, H, D] float32; rows of the listed sequences' queries are written
    pairs: bool = False,
    kind: int | None = None,
) -> None:
    """pairs: with a bf16 cache (and AVX512-BF16, D a multiple of 32), both products as bf16 pair dot products
    with keys on lanes: q and the softmax numerators rounded to bf16, as the tiled kernel's p_bf16 mode
    (~2^-9 relative error); K/V rows are used as stored instead of being converted to fp32 first.
    kind: the cache's `kv.quant` kind code; None: its dtype's (fp32 0, bf16 1). A uint8 cache holds int8 (2) or
    fp8 e4m3 (3) rows, dequantized as read for fp32 products. With pairs, fp8 rows are read as their exact bf16
    values (the K scale applied to the scores, the V scale to P before its bf16 rounding), and int8 rows (any
    AVX-512 CPU) take integer products: q and P * v_scale in int16 steps of their largest value, exact int32 sums,
    ~70x closer to float64 than the bf16 pairs. pairs rounds q: for bf16 models. Figures:
    `python -m deltaserve.kernels.paged_attention kv` and docs/perf/2026-12-05-zen4-short-kernel.md."""
    rc = _LIBS["paged_attention"].paged_attention_short(*_args(q, k_cache, v_cache, slots, seqs, scale, out, kind),
                                                         int(pairs))
    if rc == 3:  # checked in C: a torch max and .item() here cost ~10 us a layer
        raise ValueError(f"paged_attention_short: at most {SHORT_MAX_Q} queries a sequence, got {seqs[:, 1].tolist()}")
    if rc != 0:
        raise MemoryError("paged_attention_short: out of memory for its work buffers")


def paged_attention_tiled(
    q: torch.Tensor,  # [T, H, D] float32, contiguous
    k_cache: torch.Tensor,  # [num_slots, Hkv, D] bf16 or fp32, or [num_slots, Hkv, D + 4] uint8; contiguous
    v_cache: torch.Tensor,
    slots: torch.Tensor,  # [sum kv_len] int64: the sequences' slot lists concatenated
    seqs: torch.Tensor,  # [n_seqs, 4] int64: q_start, q_len, kv_offset, kv_len
    scale: float,
    out: torch.Tensor,  # [T, H, D] float32; rows of the listed sequences' queries are written
    p_bf16: bool = False,
    bf16_dot: bool = True,
    kind: int | None = None,
) -> None:
    """Same contract as `paged_attention_short`, for query spans of any length (tiled flash attention).

    With a bf16 cache, Q.K runs as bf16 pair products (q rounded to bf16: exact when q came from a bf16
    model); p_bf16 rounds the softmax numerators to bf16 for P.V too (twice as fast, ~2^-9 relative error).
    bf16_dot=False forces fp32 products, as on a CPU without AVX512-BF16 (for tests). kind: as for the short
    kernel; int8 / fp8 caches take the fp32 products (p_bf16 and bf16_dot are ignored for them)."""
    rc = _LIBS["tiled_attention"].paged_attention_tiled(*_args(q, k_cache, v_cache, slots, seqs, scale, out, kind),
                                                         int(p_bf16) | (0 if bf16_dot else 2))
    _check(rc, "paged_attention_tiled", q, k_cache)


def paged_attention_amx(
    q: torch.Tensor,  # [T, H, D] float32 holding bf16 values (a bf16 model's), contiguous
    k_cache: torch.Tensor,  # [num_slots, Hkv, D] bf16, contiguous
    v_cache: torch.Tensor,
    slots: torch.Tensor,  # [sum kv_len] int64: the sequences' slot lists concatenated
    seqs: torch.Tensor,  # [n_seqs, 4] int64: q_start, q_len, kv_offset, kv_len
    scale: float,
    out: torch.Tensor,  # [T, H, D] float32; rows of the listed sequences' queries are written
    kind: int | None = None,
) -> None:
    """Same contract as `paged_attention_tiled` with p_bf16 (q rounded to bf16, the softmax numerators too), for a
    bf16 cache: both products on AMX tiles, K/V packed a chunk of 512 keys at a time (`amx_attention.c`). kind: an
    int8 (2) or fp8 (3) cache's rows, dequantized and rounded to bf16 as they are packed."""
    assert k_cache.dtype in (torch.bfloat16, torch.uint8), "the AMX kernel reads bf16, int8 and fp8 caches only"
    rc = _LIBS["amx_attention"].paged_attention_amx(*_args(q, k_cache, v_cache, slots, seqs, scale, out, kind), 0)
    _check(rc, "paged_attention_amx", q, k_cache)


def paged_attention_amx_short(
    q: torch.Tensor,  # [T, H, D] float32 holding bf16 values (a bf16 model's), contiguous
    k_cache: torch.Tensor,  # [num_slots, Hkv, D] bf16 or [num_slots, Hkv, D + 4] uint8 (fp8 rows), contiguous
    v_cache: torch.Tensor,
    slots: torch.Tensor,  # [sum kv_len] int64: the sequences' slot lists concatenated
    seqs: torch.Tensor,  # [n_seqs, 4] int64: q_start, q_len, kv_offset, kv_len; q_len x H / Hkv <= 64
    scale: float,
    out: torch.Tensor,  # [T, H, D] float32; rows of the listed sequences' queries are written
    kind: int | None = None,
) -> None:
    """Same contract and rounding as `paged_attention_amx` (q and P in bf16, fp32 sums), for spans of at most
    AMX_SHORT_MAX_ROWS rows a sequence (decode, speculative verify): S^T = K.Q^T with K rows as the pool stores
    them, the softmax down the keys, a sequence's keys split into parts where the threads need work
    (`amx_short.c`). kind 3: fp8 e4m3 rows, read as their exact bf16 values with the K scales on the scores and
    the V scales on P before its bf16 rounding (the short kernel's pair rounding). Figures:
    docs/perf/2026-12-05-xeon-amx-short.md, docs/perf/2026-12-06-xeon-amx-span-pipeline.md."""
    assert k_cache.dtype == torch.bfloat16 or kind == 3, "the AMX short kernel reads bf16 and fp8 caches only"
    rc = _LIBS["amx_short"].paged_attention_amx_short(*_args(q, k_cache, v_cache, slots, seqs, scale, out, kind), 0)
    _check(rc, "paged_attention_amx_short", q, k_cache,
           f", q_len {seqs[:, 1].tolist()}: at most {AMX_SHORT_MAX_ROWS} rows a sequence")


def paged_attention_amx_short_int8(
    q: torch.Tensor,  # [T, H, D] float32, contiguous
    k_cache: torch.Tensor,  # [num_slots, Hkv, D + 4] uint8: int8 rows (kv.quant), contiguous
    v_cache: torch.Tensor,
    slots: torch.Tensor,  # [sum kv_len] int64: the sequences' slot lists concatenated
    seqs: torch.Tensor,  # [n_seqs, 4] int64: q_start, q_len, kv_offset, kv_len; q_len x H / Hkv <= 64
    scale: float,
    out: torch.Tensor,  # [T, H, D] float32; rows of the listed sequences' queries are written
) -> None:
    """Decode and verify spans (at most AMX_SHORT_MAX_ROWS rows a sequence) of an int8 cache on AMX-INT8 tiles, in
    the short kernel's integer rounding (q in int16 steps of its row's largest value, P x v_scale in 16-bit steps):
    K rows as the pool stores them, a decode's kv heads sharing softmax lanes (`amx_short_int8.c`). Figures:
    docs/perf/2026-12-05-xeon-amx-int8.md."""
    assert k_cache.dtype == torch.uint8, "the int8 AMX kernel reads int8 rows (a uint8 cache) only"
    rc = _LIBS["amx_short_int8"].paged_attention_amx_short_int8(
        *_args(q, k_cache, v_cache, slots, seqs, scale, out, 2), 0)
    _check(rc, "paged_attention_amx_short_int8", q, k_cache,
           f", q_len {seqs[:, 1].tolist()}: at most {AMX_SHORT_MAX_ROWS} rows a sequence, head_dim a multiple of 64")


def _ms(f, reps: int) -> float:
    """ms per call of f, after one warm-up call."""
    import time

    f()
    t = time.perf_counter()
    for _ in range(reps):
        f()
    return (time.perf_counter() - t) / reps * 1e3


def _bench(reps: int = 10) -> None:
    """Print ms per call of the short and tiled kernels and of SDPA on gathered K/V (SmolLM2 heads, bf16 KV),
    to re-measure `layers.attention.native.TILED_MIN_ROWS` on a new machine:
    python -m deltaserve.kernels.paged_attention"""
    import torch.nn.functional as F

    H, Hkv, D = 9, 3, 64

    def ms(f) -> float:
        return _ms(f, reps)

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
        if n <= SHORT_MAX_Q and available():
            cells.append(f"short {ms(lambda: paged_attention_short(q, kc, vc, slots, seqs, D**-0.5, out)):8.2f}")
            cells.append(f"pairs {ms(lambda: paged_attention_short(qb, kc, vc, slots, seqs, D**-0.5, out, True)):8.2f}")
        if tiled_available():
            # as the engine calls it for a bf16 model: P.V in bf16 pairs
            cells.append(f"tiled {ms(lambda: paged_attention_tiled(qb, kc, vc, slots, seqs, D**-0.5, out, True)):8.2f}")
        print(f"{B} seqs x {n:4d} queries x {L} keys ({n * H // Hkv} rows a kv head), ms: " + " | ".join(cells))


def _bench_kv(reps: int = 24, layers: int = 8) -> None:
    """Decode at 8k context, kernel alone, by cache format (SmolLM2 heads): bf16 against int8 and fp8 e4m3 rows,
    each with fp32 products (rows converted / dequantized to fp32) and in the reduced-precision mode (bf16 pairs;
    integer products for int8). Slots in runs of 16 (pages) in scattered order, as a long-running pool gives them;
    calls rotate over `layers` copies of the caches so that each reads K/V from memory, as a model's layers do (one
    8 x 8k cache fits a 32 MB L3): python -m deltaserve.kernels.paged_attention kv"""
    import itertools

    from deltaserve.kv.quant import FORMATS, quantize_rows

    H, Hkv, D, L = 9, 3, 64, 8192
    assert available(), "the short kernel is not built here"

    def ms(f) -> float:
        return min(_ms(f, reps) for _ in range(3))

    for B in (1, 4, 8):
        g = torch.Generator().manual_seed(B)
        S = B * L
        kf, vf = torch.randn(S, Hkv, D, generator=g), torch.randn(S, Hkv, D, generator=g)
        copies = lambda t: [t.clone() for _ in range(layers)]  # noqa: E731  (one cache a layer)
        caches = {"bf16": (copies(kf.to(torch.bfloat16)), copies(vf.to(torch.bfloat16)), None)}
        for name, fmt in (("int8", FORMATS["int8"]), ("fp8", FORMATS["fp8_e4m3"])):
            caches[name] = (copies(quantize_rows(kf, fmt)), copies(quantize_rows(vf, fmt)), fmt.kind)
        pages = torch.randperm(S // 16, generator=g)
        slots = (pages[:, None] * 16 + torch.arange(16)[None, :]).reshape(-1)  # [S]: B contexts of L slots
        seqs = torch.tensor([[b, 1, b * L, L] for b in range(B)])
        q = torch.randn(B, H, D, generator=g).to(torch.bfloat16).float()
        out = torch.empty_like(q)
        cells = []
        for name, (kc, vc, kind) in caches.items():
            step = itertools.count()

            def call(reduced: bool) -> None:
                i = next(step) % layers
                paged_attention_short(q, kc[i], vc[i], slots, seqs, D**-0.5, out, reduced, kind=kind)

            fp32, reduced = ms(lambda: call(False)), ms(lambda: call(True))
            cells.append(f"{name} {fp32:6.3f} / {reduced:6.3f}")
        print(f"decode {B} seqs x {L} keys, short kernel ms (fp32 products / reduced: bf16 pairs, int8 integers): "
              + " | ".join(cells))


if __name__ == "__main__":
    import sys

    _bench_kv() if sys.argv[1:] == ["kv"] else _bench()
