"""The fused bf16 elementwise kernels (RMSNorm, SiLU-mul, RoPE) against the PyTorch code they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deltaserve.kernels import elementwise as native
from deltaserve.layers import elementwise as ew

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler: the PyTorch path is used instead")


def _torch_rms(x, w, eps):
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.view(torch.int16).int() - b.view(torch.int16).int()).abs()


@pytest.mark.parametrize("T,N", [(1, 576), (7, 64), (300, 896), (2048, 40)])
def test_rms_norm_matches_torch(T, N):
    g = torch.Generator().manual_seed(T + N)
    wide = (torch.randn(T, N + 24, generator=g) * 3).to(torch.bfloat16)
    x = wide[:, 5 : 5 + N]  # strided rows, as a slice of a wider activation
    w = (torch.rand(N, generator=g) + 0.5).to(torch.bfloat16)
    out, ref = native.rms_norm(x, w, 1e-5), _torch_rms(x, w, 1e-5)
    # another rsqrt and summation order may cross a bf16 rounding edge: one ulp, rarely
    assert _ulps(out, ref).max() <= 1 and (out != ref).float().mean() < 1e-3
    assert torch.equal(ew.rms_norm(x.float(), w.float(), 1e-5), _torch_rms(x.float(), w.float(), 1e-5))  # fp32: torch


@pytest.mark.parametrize("T,I", [(1, 1536), (5, 24), (33, 4864 // 2 + 3)])
def test_silu_mul_matches_torch(T, I):
    g = torch.Generator().manual_seed(T * I)
    gu = (torch.randn(T, 2 * I, generator=g) * 4).to(torch.bfloat16)
    gu[0, :9] = torch.tensor([-100.0, -88.875, -88.5, 88.5, 100.0, 0.0, -0.0, 1e-30, -1e-30])  # exp overflow, zeros
    gate, up = gu.chunk(2, dim=-1)
    out, ref = native.silu_mul(gu), F.silu(gate) * up
    assert torch.equal(out, ref), (out != ref).nonzero()[:5]
    g32, u32 = gu.float().chunk(2, dim=-1)  # fp32: the PyTorch code itself
    assert torch.equal(ew.silu_mul(gu.float()), F.silu(g32) * u32)


@pytest.mark.parametrize("H,Hkv,D", [(9, 3, 64), (14, 2, 64), (4, 4, 40)])
def test_rope_matches_torch(H, Hkv, D):
    g = torch.Generator().manual_seed(H * D)
    T = 37
    rope = ew.Rotary(D, 10000.0, 4096, torch.bfloat16, "cpu")
    qkv = torch.randn(T, (H + 2 * Hkv) * D, generator=g).to(torch.bfloat16)
    step = rope.step(torch.randint(0, 4096, (T,), generator=g))
    q, k = ew.Rotary.rotate_qk(qkv, step, H, Hkv, D, fp32_q=True)  # fused
    assert q.dtype == torch.float32 and k.dtype == torch.bfloat16
    qk = ew.Rotary.apply(qkv[:, : (H + Hkv) * D].reshape(T, H + Hkv, D), step.cos, step.sin)
    assert torch.equal(q, qk[:, :H].float()) and torch.equal(k, qk[:, H:])
    q2, k2 = ew.Rotary.rotate_qk(qkv, step, H, Hkv, D, fp32_q=False)  # the PyTorch path keeps q in bf16
    assert q2.dtype == torch.bfloat16 and torch.equal(q2.float(), q) and torch.equal(k2, k)


@pytest.mark.parametrize("T,N", [(1, 576), (7, 64), (300, 896)])
def test_add_rms_norm_matches_add_then_norm(T, N):
    g = torch.Generator().manual_seed(7 * T + N)
    x = (torch.randn(T, N, generator=g) * 3).to(torch.bfloat16)
    d = (torch.randn(T, N, generator=g) * 3).to(torch.bfloat16)
    w = (torch.rand(N, generator=g) + 0.5).to(torch.bfloat16)
    want_s = x + d  # torch's bf16 add: fp32 sum, one rounding
    want_h = native.rms_norm(want_s, w, 1e-5)
    x_in = x.clone()
    s, h = ew.add_rms_norm(x_in, d, w, 1e-5)
    assert s.data_ptr() == x_in.data_ptr()  # added in place: the residual stream is the caller's to replace
    assert torch.equal(s, want_s) and torch.equal(h, want_h)
    s32, h32 = ew.add_rms_norm(x.float(), d.float(), w.float(), 1e-5)  # fp32: the PyTorch code, a fresh sum
    assert torch.equal(s32, x.float() + d.float()) and torch.equal(h32, _torch_rms(s32, w.float(), 1e-5))


@pytest.mark.parametrize("H,Hkv,D", [(9, 3, 64), (14, 2, 64), (4, 4, 40)])
def test_rope_stores_k_and_v_into_the_caches(H, Hkv, D):
    g = torch.Generator().manual_seed(H * D + 1)
    T, num_slots = 11, 50
    rope = ew.Rotary(D, 10000.0, 4096, torch.bfloat16, "cpu")
    qkv = torch.randn(T, (H + 2 * Hkv) * D, generator=g).to(torch.bfloat16)
    step = rope.step(torch.randint(0, 4096, (T,), generator=g))
    slots = torch.randperm(num_slots, generator=g)[:T]
    q_ref, k_ref = ew.Rotary.rotate_qk(qkv, step, H, Hkv, D, fp32_q=True)
    v_ref = qkv[:, (H + Hkv) * D :].reshape(T, Hkv, D)
    kc = torch.randn(num_slots, Hkv, D, generator=g).to(torch.bfloat16)
    vc = torch.randn(num_slots, Hkv, D, generator=g).to(torch.bfloat16)
    want_k, want_v = kc.clone().index_copy_(0, slots, k_ref), vc.clone().index_copy_(0, slots, v_ref)
    q, k = ew.Rotary.rotate_qk(qkv, step, H, Hkv, D, fp32_q=True, store=(kc, vc, slots))
    assert k is None and torch.equal(q, q_ref)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)  # the stored rows and every other row as it was
    # a slot outside the caches: refused before anything is written
    bad = slots.clone()
    bad[-1] = num_slots
    before_k, before_v = kc.clone(), vc.clone()
    with pytest.raises(IndexError):
        native.rope_qk(qkv, step.cos_table, step.sin_table, step.positions, H, Hkv, D, (kc, vc, bad))
    assert torch.equal(kc, before_k) and torch.equal(vc, before_v)
    # a cache the kernel cannot write (fp32): k comes back for the caller to store, the cache untouched
    kc32 = torch.zeros(num_slots, Hkv, D)
    q2, k2 = ew.Rotary.rotate_qk(qkv, step, H, Hkv, D, fp32_q=True, store=(kc32, kc32.clone(), slots))
    assert torch.equal(k2, k_ref) and torch.equal(q2, q_ref) and not kc32.any()
