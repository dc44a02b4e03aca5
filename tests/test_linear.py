"""layers/linear.py: every weight form gives F.linear's answer (within bf16 rounding), on both sides of the switch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deltaserve.kernels import small_gemm
from deltaserve.layers.linear import SMALL_BATCH_ROWS, Linear, bf16_gemm_fast, large_batch_form, packed_supported


@pytest.mark.parametrize("rows", [1, 3, SMALL_BATCH_ROWS, SMALL_BATCH_ROWS + 1, 97])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("large_fp32", [True, False, None], ids=["fp32-large", "bf16-large", "measured"])
def test_bf16_forms_match_fp32_reference(rows, bias, large_fp32):
    g = torch.Generator().manual_seed(rows)
    w = (torch.randn(48, 80, generator=g) * 0.1).to(torch.bfloat16)
    b = torch.randn(48, generator=g).to(torch.bfloat16) if bias else None
    x = torch.randn(rows, 80, generator=g).to(torch.bfloat16)
    lin = Linear(w, b, large_batch_fp32=large_fp32)
    # small batches: oneDNN's packed bf16 where its bf16 GEMM is fast, else small_gemm's panels (48 rows pack at
    # 8 and 16 features a panel)
    panels = small_gemm.available() and not (packed_supported() and bf16_gemm_fast())
    assert (lin.panels is not None) == panels
    assert (lin.packed is not None) == (packed_supported() and not panels)
    want_w32 = large_fp32 if large_fp32 is not None else large_batch_form() == "fp32"
    assert (lin.w32 is not None) == want_w32
    y = lin(x)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, 48)
    ref = F.linear(x.float(), w.float(), b.float() if bias else None)
    # bf16 output rounding (~2^-8 relative) is the only difference allowed
    torch.testing.assert_close(y.float(), ref, rtol=1e-2, atol=1e-2)


def test_fp32_weights_are_used_as_loaded():
    w = torch.randn(8, 16)
    lin = Linear(w)
    assert lin.packed is None and lin.w32 is None
    x = torch.randn(5, 16)
    assert torch.equal(lin(x), F.linear(x, w))  # bit-identical: the fp32 reference path is untouched


def test_lm_head_form_without_fp32_copy():
    w = torch.randn(32, 16).to(torch.bfloat16)
    lin = Linear(w, large_batch_fp32=False)
    assert lin.w32 is None
    x = torch.randn(100, 16).to(torch.bfloat16)
    torch.testing.assert_close(lin(x).float(), F.linear(x.float(), w.float()), rtol=1e-2, atol=5e-2)


def test_without_onednn_bf16_large_batches_take_the_fp32_copy(monkeypatch):
    import deltaserve.layers.linear as L

    monkeypatch.setattr(L, "_PACKED_OK", False)  # as on a CPU with neither AVX-512 nor AVX-NE-CONVERT
    monkeypatch.setattr(L, "_LARGE_FORM", None)
    w = torch.randn(24, 40).to(torch.bfloat16)
    lin = Linear(w)
    assert lin.packed is None and lin.w32 is not None
    for rows in (1, L.SMALL_BATCH_ROWS_UNPACKED, L.SMALL_BATCH_ROWS_UNPACKED + 1, 64):
        x = torch.randn(rows, 40).to(torch.bfloat16)
        y = lin(x)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), F.linear(x.float(), w.float()), rtol=1e-2, atol=2e-2)
    # and which form ran: the bf16 weight up to the switch, the fp32 copy above it
    x = torch.randn(L.SMALL_BATCH_ROWS_UNPACKED + 1, 40).to(torch.bfloat16)
    if lin.w32_packed:  # oneDNN's fp32 layout
        want = torch.ops.mkldnn._linear_pointwise(x.float(), lin.w32, None, "none", [], "")
    else:
        want = F.linear(x.float(), w.float())
    assert torch.equal(lin(x), want.to(torch.bfloat16))
    x = torch.randn(2, 40).to(torch.bfloat16)
    if lin.panels is not None:  # AVX2 here: the small-batch kernel
        assert torch.equal(lin(x), small_gemm.linear(x, lin.panels, None))
    else:
        assert torch.equal(lin(x), F.linear(x, w))


@pytest.mark.skipif(not small_gemm.available(), reason="small_gemm needs AVX2 + FMA")
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8, 9, 17, 24])
@pytest.mark.parametrize("n_panels,k", [(1, 16), (3, 40), (5, 576), (12, 96)])
def test_small_gemm_matches_fp32_reference(rows, n_panels, k):
    pw = small_gemm.panel_width()  # 16 with AVX-512, 8 with AVX2
    n = n_panels * pw
    g = torch.Generator().manual_seed(rows * 1000 + n)
    w = (torch.randn(n, k, generator=g) * 0.1).to(torch.bfloat16)
    b = torch.randn(n, generator=g).to(torch.bfloat16)
    x = torch.randn(rows, k, generator=g).to(torch.bfloat16)
    wp = small_gemm.pack(w)
    last = n_panels - 1  # panel p holds output features pw*p .. pw*p + pw-1, k-major
    assert wp.shape == (n_panels, k, pw) and torch.equal(wp[last, 3], w[pw * last : pw * last + pw, 3])
    for bias in (None, b):
        y = small_gemm.linear(x, wp, bias)
        ref = F.linear(x.float(), w.float(), bias.float() if bias is not None else None)
        # fp32 accumulation, one bf16 rounding of the output: within half a bf16 ulp (+ summation order)
        torch.testing.assert_close(y.float(), ref, rtol=8e-3, atol=1e-4)


def test_small_gemm_refuses_what_it_cannot_pack():
    assert small_gemm.pack(torch.randn(12, 16).to(torch.bfloat16)) is None  # N % 8 (and % 16)
    assert small_gemm.pack(torch.randn(16, 16)) is None  # fp32 weights stay on F.linear


def test_large_batch_form_is_one_of_both():
    assert large_batch_form() in ("bf16", "fp32")
    assert large_batch_form() == large_batch_form()  # measured once, then fixed for the process


def test_bf16_gemm_fast_follows_the_probe(monkeypatch):
    import deltaserve.layers.linear as L

    monkeypatch.setattr(L, "_amx", lambda: False)
    monkeypatch.setattr(L, "_avx512_bf16", lambda: True)
    # a CPU without AVX-512 (Zen 3) has no oneDNN bf16 linear at all, and large_batch_form() then answers fp32
    # before it asks the probe: pretend the kernel is there, the probe's answer is what is under test
    monkeypatch.setattr(L, "packed_supported", lambda: True)
    for env, want in (("on", True), ("off", False)):
        monkeypatch.setenv("DELTASERVE_BF16_DOT", env)
        monkeypatch.setattr(L, "_LARGE_FORM", None)
        assert L.bf16_gemm_fast() is want
        assert L.large_batch_form() == ("bf16" if want else "fp32")
    monkeypatch.setattr(L, "_avx512_bf16", lambda: False)
    assert L.bf16_gemm_fast() is False  # "on" cannot make bf16 fast without the instructions


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_invariant_rows_do_not_depend_on_the_batch(dtype):
    """Batch-invariant mode: a row's output has the same bits alone, among a few rows, among 57-192 rows (where an
    AMX Xeon's sgemm took another kernel than for 16-56 or 193+ rows) and at any position in a long batch."""
    g = torch.Generator().manual_seed(5)
    lin = Linear(torch.randn(576, 1536, generator=g).to(dtype), fast_cpu=False)
    x = torch.randn(400, 1536, generator=g).to(dtype)
    try:
        Linear.batch_invariant = True
        ref = lin(x)
        for n in (1, 3, 11, 16, 40, 57, 64, 100, 128, 192, 193, 300):
            assert torch.equal(lin(x[:n]), ref[:n]), n
        for shift in (1, 13, 31, 100):
            assert torch.equal(lin(x[shift:]), ref[shift:]), shift
    finally:
        Linear.batch_invariant = False
