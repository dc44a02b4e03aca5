"""ctypes binding of `paged_attention.c`: short-query attention read straight from the slot pool."""

from __future__ import annotations

import ctypes

import torch

from deltaserve.kernels import load

_lib = None
_tried = False


def available() -> bool:
    global _lib, _tried
    if not _tried:
        _tried = True
        _lib = load("paged_attention")
        if _lib is not None:
            _lib.paged_attention_short.restype = ctypes.c_int
            _lib.paged_attention_short.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] + [ctypes.c_void_p] * 2 + [
                ctypes.c_int] * 4 + [ctypes.c_float, ctypes.c_void_p]
    return _lib is not None


def supports(k_cache: torch.Tensor) -> bool:
    return k_cache.device.type == "cpu" and k_cache.dtype in (torch.bfloat16, torch.float32) and available()


def paged_attention_short(
    q: torch.Tensor,  # [T, H, D] float32, contiguous
    k_cache: torch.Tensor,  # [num_slots, Hkv, D] bf16 or fp32, contiguous
    v_cache: torch.Tensor,
    slots: torch.Tensor,  # [sum kv_len] int64: the sequences' slot lists concatenated
    seqs: torch.Tensor,  # [n_seqs, 4] int64: q_start, q_len, kv_offset, kv_len
    scale: float,
    out: torch.Tensor,  # [T, H, D] float32; rows of the listed sequences' queries are written
) -> None:
    T, H, D = q.shape
    Hkv = k_cache.shape[1]
    assert q.dtype == torch.float32 and out.dtype == torch.float32 and q.is_contiguous() and out.is_contiguous()
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and slots.dtype == seqs.dtype == torch.int64
    assert H % Hkv == 0 and k_cache.shape[2] == D
    assert seqs.shape[0] == 0 or int(seqs[:, 1].max()) <= 64, "at most 64 queries a sequence"
    rc = _lib.paged_attention_short(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), int(k_cache.dtype == torch.bfloat16),
        slots.data_ptr(), seqs.data_ptr(), seqs.shape[0], H, Hkv, D, float(scale), out.data_ptr(),
    )
    if rc != 0:
        raise MemoryError("paged_attention_short: out of memory for its work buffers")
