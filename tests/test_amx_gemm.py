"""kernels/amx_gemm.c: small-batch bf16 linears on AMX tiles, against F.linear in fp32 on the same bf16 values.

Rows cross the kernel's edges (16-row A tiles, 32-row passes, rows past a pass), features come in pairs of
16-feature blocks and as an odd last block; with and without bias. The kernel tests skip where the CPU has no AMX
(oneDNN's packed form serves those CPUs); the routing tests run everywhere.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import deltaserve.layers.linear as linear
from deltaserve.kernels import amx_gemm
from deltaserve.layers.linear import Linear

needs_amx = pytest.mark.skipif(not amx_gemm.available(), reason="no AMX here (Intel Xeon 4th gen or newer)")


@needs_amx
@pytest.mark.parametrize("rows", [1, 5, 16, 17, 31, 32, 33, 48, 49, 64, 70])
@pytest.mark.parametrize("n,k", [(16, 32), (48, 96), (96, 576), (576, 1536)])
def test_matches_fp32_reference(rows, n, k):
    g = torch.Generator().manual_seed(rows * 1000 + n + k)
    w = (torch.randn(n, k, generator=g) * 0.1).to(torch.bfloat16)
    b = torch.randn(n, generator=g).to(torch.bfloat16)
    x = torch.randn(rows, k, generator=g).to(torch.bfloat16)
    wp = amx_gemm.pack(w)
    # B tiles: wp[nb, t, r, 2c + e] = w[16 nb + c, 32 t + 2 r + e]
    nb, t, r, c, e = n // 16 - 1, k // 32 - 1, 7, 5, 1
    assert wp.shape == (n // 16, k // 32, 16, 32) and wp[nb, t, r, 2 * c + e] == w[16 * nb + c, 32 * t + 2 * r + e]
    for bias in (None, b):
        y = amx_gemm.linear(x, wp, bias)
        assert y.dtype == torch.bfloat16 and y.shape == (rows, n)
        ref = F.linear(x.float(), w.float(), bias.float() if bias is not None else None)
        # fp32 accumulation, one bf16 rounding of the output: within half a bf16 ulp (+ summation order)
        torch.testing.assert_close(y.float(), ref, rtol=8e-3, atol=1e-4)


@needs_amx
def test_refuses_what_it_cannot_pack():
    assert amx_gemm.pack(torch.randn(24, 32).to(torch.bfloat16)) is None  # N % 16
    assert amx_gemm.pack(torch.randn(32, 48).to(torch.bfloat16)) is None  # K % 32
    assert amx_gemm.pack(torch.randn(32, 64)) is None  # fp32 weights stay on F.linear


@pytest.mark.parametrize("rows", [0, 1, 9, linear.AMX_GEMM_ROWS, linear.AMX_GEMM_ROWS + 1, 200])
def test_linear_routes_small_batches_to_the_tiles(rows, monkeypatch):
    g = torch.Generator().manual_seed(rows)
    w = (torch.randn(96, 128, generator=g) * 0.1).to(torch.bfloat16)
    b = torch.randn(96, generator=g).to(torch.bfloat16)
    lin = Linear(w, b)
    assert (lin.tiles is not None) == (amx_gemm.available() and linear._amx())
    calls = []
    real = amx_gemm.linear
    monkeypatch.setattr(amx_gemm, "linear", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(rows, 128, generator=g).to(torch.bfloat16)
    y = lin(x)
    assert len(calls) == (lin.tiles is not None and 0 < rows <= linear.AMX_GEMM_ROWS)
    torch.testing.assert_close(y.float(), F.linear(x.float(), w.float(), b.float()), rtol=1e-2, atol=1e-2)
    assert lin.nbytes() >= w.numel() * 2 * (1 + (lin.packed is not None) + (lin.tiles is not None))
