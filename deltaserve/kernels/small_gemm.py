"""ctypes binding of `small_gemm.c`: bf16 x bf16 -> bf16 linear for a few rows, weights streamed once in bf16.

Used by `layers.linear.Linear` on CPUs where oneDNN's bf16 GEMM is slow for a few rows: no bf16 kernel at all
(no AVX-512), or bf16 pair products slower than fp32 FMA (see the C file for why).
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
            lib.small_gemm_pack.restype = lib.small_gemm.restype = lib.small_gemm_panel_width.restype = ctypes.c_int
            lib.small_gemm_pack.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
            lib.small_gemm.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 3 + [ctypes.c_void_p]
        _LIB.append(lib)
    return _LIB[0]


def available() -> bool:
    """Built here with AVX2 + FMA."""
    return _lib() is not None


def panel_width() -> int:
    """Output features a panel: 16 with AVX-512, 8 with AVX2 (0: not built here)."""
    return int(_lib().small_gemm_panel_width()) if available() else 0


def pack(w: torch.Tensor) -> torch.Tensor | None:
    """w [N, K] bf16 -> panels [N // PW, K, PW] bf16, PW = `panel_width()` (None when N % PW != 0 or the kernel
    is not built here)."""
    N, K = w.shape
    if not available() or w.dtype != torch.bfloat16 or w.device.type != "cpu" or N % panel_width():
        return None
    pw = panel_width()
    w = w.contiguous()
    wp = torch.empty(N // pw, K, pw, dtype=torch.bfloat16)
    if _lib().small_gemm_pack(w.data_ptr(), N, K, wp.data_ptr()) != 0:
        return None
    return wp


def linear(x: torch.Tensor, wp: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] bf16 @ W.T (+ bias) -> [M, N] bf16, W given as `pack(W)`."""
    M, K = x.shape
    N = wp.shape[0] * wp.shape[2]
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
