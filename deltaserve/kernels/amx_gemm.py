"""ctypes binding of `amx_gemm.c`: bf16 x bf16 -> bf16 linear for a few dozen rows on AMX tiles, the weights
streamed once, in order.

Used by `layers.linear.Linear` on CPUs with AMX for batches up to `linear.AMX_GEMM_ROWS` rows (decode and verify
steps), where oneDNN's packed bf16 GEMM reads weights coming from memory at a fraction of the machine's bandwidth
(see the C file).
"""

from __future__ import annotations

import ctypes

import torch

from deltaserve.kernels import load

_LIB: list = []


def _lib():
    if not _LIB:
        lib = load("amx_gemm")
        if lib is not None:
            lib.amx_gemm_available.restype = ctypes.c_int
            if lib.amx_gemm_available() != 1:
                lib = None
        if lib is not None:
            lib.amx_gemm_pack.restype = lib.amx_gemm.restype = ctypes.c_int
            lib.amx_gemm_pack.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
            lib.amx_gemm.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 3 + [ctypes.c_void_p]
        _LIB.append(lib)
    return _LIB[0]


def available() -> bool:
    """Built here with AMX-BF16 and granted the tile state."""
    return _lib() is not None


def pack(w: torch.Tensor) -> torch.Tensor | None:
    """w [N, K] bf16 -> its B tiles [N // 16, K // 32, 16, 32] bf16 (None when N % 16, K % 32, or the kernel is not
    available here)."""
    N, K = w.shape
    if not available() or w.dtype != torch.bfloat16 or w.device.type != "cpu" or N % 16 or K % 32:
        return None
    w = w.contiguous()
    wp = torch.empty(N // 16, K // 32, 16, 32, dtype=torch.bfloat16)
    if _lib().amx_gemm_pack(w.data_ptr(), N, K, wp.data_ptr()) != 0:
        return None
    return wp


def linear(x: torch.Tensor, wp: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] bf16 @ W.T (+ bias) -> [M, N] bf16, W given as `pack(W)`."""
    M, K = x.shape
    N = wp.shape[0] * 16
    assert M >= 1 and wp.shape[1] * 32 == K and x.dtype == torch.bfloat16
    x = x.contiguous()
    y = torch.empty(M, N, dtype=torch.bfloat16)
    b = bias.contiguous() if bias is not None else None
    rc = _lib().amx_gemm(x.data_ptr(), wp.data_ptr(), b.data_ptr() if b is not None else None, M, N, K, y.data_ptr())
    if rc == 1:
        raise MemoryError("amx_gemm: out of memory")
    if rc != 0:
        raise RuntimeError(f"amx_gemm: unsupported shape x {tuple(x.shape)}, w {tuple(wp.shape)}")
    return y
