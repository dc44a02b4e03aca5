"""ctypes bindings of `elementwise.c`: fused RMSNorm, SiLU-mul and RoPE for bf16 activations on CPU.

Each function checks the contract the C code relies on (dtype, device, contiguity) and writes into
tensors it allocates; callers use them only when `available()` and fall back to PyTorch otherwise.
"""

from __future__ import annotations

import ctypes

import torch

from deltaserve.kernels import load

_LIB: list = []


def _lib() -> ctypes.CDLL | None:
    if not _LIB:
        lib = load("elementwise")
        if lib is not None:
            p, i64, i, f = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
            lib.rms_norm_bf16.argtypes = [p, i64, p, p, i64, i, f]
            lib.silu_mul_bf16.argtypes = [p, p, i64, i]
            lib.add_rms_norm_bf16.argtypes = [p, p, p, p, i64, i, f]
            lib.rope_qk_bf16.argtypes = [p, i64, p, p, p, p, p, i64, i, i, i, p, p, p, i64]
            lib.rope_qk_bf16.restype = i
            lib.store_quant_rows.argtypes = [p, i, i64, i64, i, i, p, p, i]
            for fn in (lib.rms_norm_bf16, lib.add_rms_norm_bf16, lib.silu_mul_bf16, lib.store_quant_rows):
                fn.restype = None
            lib.elementwise_max_head_dim.restype = i
        _LIB.append(lib)
    return _LIB[0]


def available() -> bool:
    return _lib() is not None


def supports(x: torch.Tensor) -> bool:
    """The fused ops run on this tensor's kind: bf16 on CPU, with the library built."""
    return x.device.type == "cpu" and x.dtype == torch.bfloat16 and available()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, N] bf16 (rows may be strided, elements contiguous), weight [N] bf16 -> [T, N] bf16."""
    T, N = x.shape
    assert x.stride(1) == 1 and weight.is_contiguous() and weight.dtype == x.dtype == torch.bfloat16
    out = torch.empty(T, N, dtype=torch.bfloat16)
    _lib().rms_norm_bf16(x.data_ptr(), x.stride(0), weight.data_ptr(), out.data_ptr(), T, N, float(eps))
    return out


def add_rms_norm(x: torch.Tensor, d: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x, d [T, N] bf16 contiguous, weight [N] bf16. Mutates x to x + d (bf16, as torch's add rounds); returns
    rms_norm(x + d) [T, N] bf16."""
    T, N = x.shape
    assert x.is_contiguous() and d.is_contiguous() and d.shape == x.shape and weight.is_contiguous()
    assert x.dtype == d.dtype == weight.dtype == torch.bfloat16
    out = torch.empty(T, N, dtype=torch.bfloat16)
    _lib().add_rms_norm_bf16(x.data_ptr(), d.data_ptr(), weight.data_ptr(), out.data_ptr(), T, N, float(eps))
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I] bf16 contiguous (gate | up) -> silu(gate) * up [T, I] bf16."""
    T, I2 = gate_up.shape
    assert gate_up.is_contiguous() and gate_up.dtype == torch.bfloat16 and I2 % 2 == 0
    out = torch.empty(T, I2 // 2, dtype=torch.bfloat16)
    _lib().silu_mul_bf16(gate_up.data_ptr(), out.data_ptr(), T, I2 // 2)
    return out


def rope_qk(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, H: int, Hkv: int,
            D: int, store: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """qkv [T, W] bf16 contiguous, q heads then k heads first; cos, sin [max_pos, D] bf16; positions [T] int64.
    -> (q [T, H, D] float32, k [T, Hkv, D] bf16), both rotated.
    store: (k_cache, v_cache, slots [T]). Where `takes_store` holds for them, k rotated and v (qkv's Hkv heads after
    k's) are written into the caches' rows at slots instead (the bits index_copy_ would write) and k comes back None;
    elsewhere k comes back for the caller to store. Mutates those rows only. Raises IndexError, writing nothing, if a
    slot is outside the caches."""
    T, W = qkv.shape
    assert qkv.is_contiguous() and qkv.dtype == cos.dtype == sin.dtype == torch.bfloat16 and W >= (H + Hkv) * D
    assert cos.is_contiguous() and sin.is_contiguous() and cos.shape[1] == D and positions.dtype == torch.int64
    assert D % 2 == 0 and D <= _lib().elementwise_max_head_dim()
    positions = positions.contiguous()
    q32 = torch.empty(T, H, D, dtype=torch.float32)
    if store is not None and takes_store(*store, Hkv, D):
        k_cache, v_cache, slots = store
        assert W >= (H + 2 * Hkv) * D and slots.shape == (T,)
        k, k_ptr = None, None
        cache_args = (k_cache.data_ptr(), v_cache.data_ptr(), slots.data_ptr(), k_cache.shape[0])
    else:
        k = torch.empty(T, Hkv, D, dtype=torch.bfloat16)
        k_ptr, cache_args = k.data_ptr(), (None, None, None, 0)
    rc = _lib().rope_qk_bf16(qkv.data_ptr(), W, cos.data_ptr(), sin.data_ptr(), positions.data_ptr(),
                             q32.data_ptr(), k_ptr, T, H, Hkv, D, *cache_args)
    if rc != 0:
        raise IndexError(f"rope_qk: a slot of {store[2].tolist()} is outside the KV caches' {cache_args[3]} rows")
    return q32, k


def takes_store(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, Hkv: int, D: int) -> bool:
    """`rope_qk` can write a step's K/V straight into these caches: bf16 [num_slots, Hkv, D] contiguous on CPU,
    slots int64 contiguous, and the library built."""
    return (available() and k_cache.dtype == v_cache.dtype == torch.bfloat16 and k_cache.device.type == "cpu"
            and k_cache.shape == v_cache.shape and k_cache.shape[1:] == (Hkv, D) and k_cache.is_contiguous()
            and v_cache.is_contiguous() and slots.dtype == torch.int64 and slots.is_contiguous())


def takes_quant_rows(x: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor) -> bool:
    """`store_quant_rows` takes these: x [T, Hkv, D] fp32 or bf16 on CPU (heads and dims contiguous, tokens
    strided), cache [num_slots, Hkv, D + 4] uint8 contiguous, slots [T] int64, and the library is built."""
    T, Hkv, D = x.shape
    return (available() and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and D <= 512
            and x.stride(2) == 1 and x.stride(1) == D and cache.dtype == torch.uint8 and cache.is_contiguous()
            and tuple(cache.shape[1:]) == (Hkv, D + 4) and slots.dtype == torch.int64 and slots.shape == (T,))


def store_quant_rows(x: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor, kind: int) -> None:
    """Quantize x [T, Hkv, D] into the int8 (kind 2) or fp8 e4m3 (kind 3) cache at `slots`, bit for bit as
    `kv.quant.quantize_rows` then `index_copy_` (see `takes_quant_rows` for what it takes). Mutates those cache
    rows only."""
    assert kind in (2, 3) and takes_quant_rows(x, cache, slots)
    T, Hkv, D = x.shape
    slots = slots.contiguous()
    _lib().store_quant_rows(x.data_ptr(), int(x.dtype == torch.bfloat16), x.stride(0), T, Hkv, D, cache.data_ptr(),
                            slots.data_ptr(), kind)
