"""ctypes binding of `small_gemm.c`: bf16 x bf16 -> bf16 linear for a few rows, weights streamed once in bf16.

Used by `layers.linear.Linear` on CPUs where oneDNN has no bf16 kernel (see the C file for why).
"""

from __future__ import annotations

import ctypes

import torch

from deltaserve.kernels import load

MAX_M = 8  # rows one pass over the weights serves (small_gemm.c); more rows take a pass per group of 8
_LIB: list = []


def _lib():
    if not _LIB:
        lib = load("small_gemm")
        if lib is not None:
            lib.small_gemm_available.restype = ctypes.c_int
            if lib.small_gemm_available() != 1:
                lib = None
        if lib is not None:
            lib.small_gemm_pack.restype = lib.small_gemm.restype = ctypes.c_int
            lib.small_gemm_pack.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
            lib.small_gemm.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 3 + [ctypes.c_void_p]
        _LIB.append(lib)
    return _LIB[0]


def available() -> bool:
    """Built here with AVX2 + FMA."""
    return _lib() is not None


def pack(w: torch.Tensor) -> torch.Tensor | None:
    """w [N, K] bf16 -> panels [N // 8, K, 8] bf16 (None when N % 8 != 0 or the kernel is not built here)."""
    N, K = w.shape
    if N % 8 or w.dtype != torch.bfloat16 or w.device.type != "cpu" or not available():
        return None
    w = w.contiguous()
    wp = torch.empty(N // 8, K, 8, dtype=torch.bfloat16)
    if _lib().small_gemm_pack(w.data_ptr(), N, K, wp.data_ptr()) != 0:
        return None
    return wp


def linear(x: torch.Tensor, wp: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] bf16 @ W.T (+ bias) -> [M, N] bf16, W given as `pack(W)`."""
    M, K = x.shape
    N = wp.shape[0] * 8
    assert M >= 1 and wp.shape[1] == K and x.dtype == torch.bfloat16
    x = x.contiguous()
    y = torch.empty(M, N, dtype=torch.bfloat16)
    b = bias.contiguous() if bias is not None else None
    rc = _lib().small_gemm(x.data_ptr(), wp.data_ptr(), b.data_ptr() if b is not None else None, M, N, K,
                           y.data_ptr())
    if rc == 1:
        raise MemoryError("small_gemm: out of memory")
    if rc != 0:
        raise RuntimeError(f"small_gemm: unsupported shape x {tuple(x.shape)}, w {tuple(wp.shape)}")
    return y
