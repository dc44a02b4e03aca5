"""RMSNorm, SiLU-and-multiply and rotary embeddings: the decoder's elementwise ops.

For bf16 activations on CPU each runs as one fused pass of `kernels/elementwise.c` (PyTorch spends
several passes, casts and temporaries on each, ~30% of a long prefill). The kernels round to bf16
where the PyTorch code below does, so both paths agree except at rare bf16 rounding ties of exp,
rsqrt or summation order. fp32 (the reference dtype) and CUDA run the PyTorch code, bit for bit
what HF transformers computes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from deltaserve.kernels import elementwise as native


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, N] -> [T, N] in x's dtype."""
    if native.supports(x) and x.dim() == 2:
        return native.rms_norm(x, weight, eps)
    # Same op order as HF LlamaRMSNorm: normalise in fp32, cast back, then scale.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm(x: torch.Tensor, d: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
    """The residual add and the norm after it: x, d [T, N] -> (x + d, rms_norm(x + d)), both [T, N] in x's dtype.
    The native path adds into x in place (the caller's residual stream, which it replaces by the first result)."""
    if native.supports(x) and x.dim() == 2 and x.is_contiguous() and d.is_contiguous() and d.dtype == x.dtype:
        return x, native.add_rms_norm(x, d, weight, eps)
    s = x + d
    return s, rms_norm(s, weight, eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I] (gate | up) -> silu(gate) * up [T, I]."""
    if native.supports(gate_up) and gate_up.is_contiguous():
        return native.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)  # [T, I] each
    return F.silu(gate) * up


class RopeStep(NamedTuple):
    """One step's rotary inputs, shared by all layers: positions [T] and the full tables [max_pos, D]."""

    positions: torch.Tensor
    cos: torch.Tensor  # [T, 1, D], gathered for the step (PyTorch path)
    sin: torch.Tensor
    cos_table: torch.Tensor  # [max_pos, D]
    sin_table: torch.Tensor


class Rotary:
    """Neox-style RoPE (rotate_half), cos/sin tables built once in fp32 and stored in the model dtype."""

    def __init__(self, head_dim: int, theta: float, max_pos: int, dtype, device):
        inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        t = torch.arange(max_pos, dtype=torch.float32)
        freqs = torch.outer(t, inv)  # [max_pos, head_dim/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [max_pos, head_dim]
        self.cos = emb.cos().to(dtype=dtype, device=device)
        self.sin = emb.sin().to(dtype=dtype, device=device)

    def step(self, positions: torch.Tensor) -> RopeStep:
        """The step's tables: gathered once, shared by all layers."""
        return RopeStep(positions, self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1),
                        self.cos, self.sin)

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x: [T, heads, head_dim]
        half = x.shape[-1] // 2
        rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rot * sin

    @staticmethod
    def rotate_qk(qkv: torch.Tensor, rope: RopeStep, H: int, Hkv: int, D: int, fp32_q: bool,
                  store: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """qkv [T, (H + 2 Hkv) D] -> q [T, H, D], k [T, Hkv, D], both rotated. fp32_q: the caller takes q in
        fp32 (the native attention kernels do); then bf16 on CPU runs fused and returns q as fp32.
        store: (k_cache, v_cache, slot_mapping [T]): where the fused kernel can (`elementwise.takes_store`), it
        writes k and v (qkv's last Hkv heads) into the caches' rows at slot_mapping and returns k as None; else
        the caller stores them."""
        T = qkv.shape[0]
        if fp32_q and native.supports(qkv) and qkv.is_contiguous() and rope.cos_table.dtype == torch.bfloat16:
            return native.rope_qk(qkv, rope.cos_table, rope.sin_table, rope.positions, H, Hkv, D, store)
        # q and k rotated in one pass: the same per-element math as rotating each on its own
        qk = Rotary.apply(qkv[:, : (H + Hkv) * D].reshape(T, H + Hkv, D), rope.cos, rope.sin)  # [T, H+Hkv, D]
        q, k = qk.split([H, Hkv], dim=1)  # [T, H, D], [T, Hkv, D]
        return (q.float() if fp32_q else q), k
