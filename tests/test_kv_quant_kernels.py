"""The native attention kernels on int8 / fp8 e4m3 KV caches (`kv/quant.py` rows: D bytes then an fp32 scale).

Against attention computed in torch (float64) from the rows `kv.quant.dequantize_rows` reads back, at the
tolerances of the kernels' fp32 paths (`test_native_attention.py`): the kernels dequantize to the same fp32 values,
so only the products' rounding differs. One-token contexts return the V row itself, which checks the dequantization
bit for bit over every byte value. Each test runs on the build `-march=native` picks and again without AVX-512's VNNI
and BF16 (Skylake-SP's), on an AVX2-only build (`-mno-avx512f`, Zen 3's path) and an SSE-only one (`-mno-avx`: the
scalar loops; no tiled kernel there).
"""

from __future__ import annotations

import pytest
import torch

import deltaserve.kernels as kernels
from deltaserve.kernels import paged_attention as native
from deltaserve.kv.quant import FORMATS, dequantize_rows, quantize_rows
from test_native_attention import scattered_spans

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler: the PyTorch path is used instead")
FMTS = {"int8": FORMATS["int8"], "fp8": FORMATS["fp8_e4m3"]}
# -march=native less some ISA: what the kernels build to on a CPU without it (a subset of this one, so it runs here)
# ("avx512-base": AVX-512 without VNNI or BF16, as on Skylake-SP: the int8 path's vpmaddwd form, no bf16 pairs)
BUILDS = {"native": [], "avx512-base": ["-mno-avx512vnni", "-mno-avx512bf16"], "avx2": ["-mno-avx512f"],
          "sse": ["-mno-avx"]}


@pytest.fixture(params=list(BUILDS))
def build(request, monkeypatch):
    """The kernels rebuilt with BUILDS[name] after -march=native (cached on disk like any build), for this test."""
    extra = BUILDS[request.param]
    if extra:
        flags = list(kernels.FLAGS)
        i = flags.index("-march=native") + 1
        monkeypatch.setattr(kernels, "FLAGS", flags[:i] + extra + flags[i:])
        monkeypatch.setattr(kernels, "_LOADED", {})
        monkeypatch.setattr(native, "_LIBS", {})
        assert native.available(), f"the {request.param} build of the short kernel failed"
    return request.param


def _run(kernel: str, build: str, *args, **kw) -> None:
    if kernel == "tiled":
        if not native.tiled_available():  # the SSE build, or a CPU without AVX2 + FMA
            pytest.skip(f"tiled kernel needs AVX2 + FMA or AVX-512 ({build} build)")
        native.paged_attention_tiled(*args, **kw)
    else:
        native.paged_attention_short(*args, **kw)


def _reference(q, kd, vd, seqs, slots, scale):
    """Causal softmax attention per span in float64 over dequantized K/V kd, vd [S, Hkv, D] (GQA: head h reads kv
    head h // (H / Hkv))."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    G = q.shape[1] // kd.shape[1]
    for (q0, ql, _, L), sl in zip(seqs, slots):
        if ql == 0:
            continue
        k = kd[sl].double().repeat_interleave(G, dim=1).transpose(0, 1)  # [H, L, D]
        v = vd[sl].double().repeat_interleave(G, dim=1).transpose(0, 1)
        qq = q[q0 : q0 + ql].double().transpose(0, 1)  # [H, ql, D]
        s = qq @ k.transpose(1, 2) * scale  # [H, ql, L]
        mask = torch.arange(L)[None, :] <= (torch.arange(ql) + L - ql)[:, None]  # [ql, L]: causal
        p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)
        out[q0 : q0 + ql] = (p @ v).transpose(0, 1)  # [ql, H, D]
    return out.float()


def _case(g, fmt, S, Hkv, D, shape):
    """Random quantized caches [S, Hkv, D + 4] and spans (context length, q_len) on scattered slots."""
    kc = quantize_rows(torch.randn(S, Hkv, D, generator=g), fmt)
    vc = quantize_rows(torch.randn(S, Hkv, D, generator=g), fmt)
    seqs, slots, q0 = scattered_spans(g, S, shape)
    return kc, vc, seqs, slots, q0


# (context length, q_len) per span; the short kernel's key chunks are 256 keys, the tiled kernel's 64 keys and
# 128 / G query positions
SHAPES = [
    [(1, 1)],  # the very first token
    [(5, 1), (300, 1), (257, 1), (256, 1)],  # decodes across and on 256-key chunk edges, several in one call
    [(256, 9), (511, 16), (9, 9)],  # verify spans crossing chunk edges; a whole short prompt
    [(17, 2), (40, 0), (272, 2), (65, 1)],  # an empty query span among others; 64-key block + 1
    [(37, 37), (130, 5), (64, 64)],  # whole prompts (empty history), one exactly a tiled key block
]
TILED_SHAPES = [[(700, 130), (65, 17)], [(129, 43), (1000, 1), (250, 64)]]  # spans over several query blocks


@pytest.mark.parametrize("fmt", list(FMTS))
@pytest.mark.parametrize("kernel", ["short", "tiled"])
@pytest.mark.parametrize("H,Hkv,D", [(9, 3, 64), (4, 2, 128), (6, 2, 36), (14, 2, 64)])  # SmolLM2's, Qwen's GQA
def test_matches_reference(build, kernel, fmt, H, Hkv, D):
    shapes = SHAPES + (TILED_SHAPES if kernel == "tiled" else [])
    for n, shape in enumerate(shapes):
        g = torch.Generator().manual_seed(1000 * D + 10 * H + n)
        kc, vc, seqs, slots, T = _case(g, FMTS[fmt], 1500, Hkv, D, shape)
        q = torch.randn(T + 2, H, D, generator=g)  # the last 2 rows belong to no span: left as they were
        out = torch.full((T + 2, H, D), float("nan"))
        scale = D**-0.5
        _run(kernel, build, q, kc, vc, torch.cat(slots), torch.tensor(seqs), scale, out, kind=FMTS[fmt].kind)
        kd, vd = dequantize_rows(kc, FMTS[fmt]), dequantize_rows(vc, FMTS[fmt])  # [S, Hkv, D]
        ref = _reference(q, kd, vd, seqs, slots, scale)
        assert torch.isnan(out[T:]).all()
        assert torch.allclose(out[:T], ref[:T], atol=2e-6, rtol=1e-5), (shape, (out[:T] - ref[:T]).abs().max())
        if kernel == "short" and max(ql for _, ql in shape) <= 64:
            # the reduced-precision mode (D a multiple of 32). fp8 with AVX512-BF16: bf16 pair products, K/V as their
            # exact bf16 values, q and P * v_scale rounded to bf16, at the tolerance of the bf16 cache's pair mode.
            # int8 with AVX-512: integer products, q and P * v_scale rounded to int16 steps of their largest value
            # (2^-15 of it), ~70x tighter (worst seen 9.4e-5). Elsewhere: the fp32 path.
            qb = q.to(torch.bfloat16).float()  # a bf16 model's queries
            out2 = torch.full((T + 2, H, D), float("nan"))
            native.paged_attention_short(qb, kc, vc, torch.cat(slots), torch.tensor(seqs), scale, out2, pairs=True,
                                         kind=FMTS[fmt].kind)
            ref2 = _reference(qb, kd, vd, seqs, slots, scale)
            assert torch.isnan(out2[T:]).all()
            atol, rtol = (3e-4, 1e-3) if fmt == "int8" else (5e-3, 1e-2)
            assert torch.allclose(out2[:T], ref2[:T], atol=atol, rtol=rtol), (shape, (out2[:T] - ref2[:T]).abs().max())


def _every_byte_rows(fmt_name: str, D: int, Hkv: int):
    """V rows [n, Hkv, D + 4] whose value bytes run through every byte (fp8: but 0x7F / 0xFF, e4m3fn's NaN) with
    scales of several magnitudes, and the values they stand for."""
    vals = torch.arange(256, dtype=torch.uint8)
    if fmt_name == "fp8":
        vals = vals[(vals != 0x7F) & (vals != 0xFF)]
    per = Hkv * D
    n = -(-len(vals) // per)
    body = vals.repeat(n)[: n * per].reshape(n, Hkv, D)  # [n, Hkv, D]
    scales = torch.tensor([0.37, 1.0, 3.1e-5, 250.0, 1e-3, 7.0])[torch.arange(n * Hkv) % 6].reshape(n, Hkv, 1)
    rows = torch.cat([body, scales.contiguous().view(torch.uint8)], dim=-1)  # [n, Hkv, D + 4]
    return rows, dequantize_rows(rows, FMTS[fmt_name])


@pytest.mark.parametrize("fmt", list(FMTS))
@pytest.mark.parametrize("kernel", ["short", "tiled"])
@pytest.mark.parametrize("D", [64, 36, 20])
def test_one_token_context_is_the_v_row(build, kernel, fmt, D):
    """With one key the softmax weight is exactly 1, so the output is the dequantized V row, bit for bit: every
    byte value through the SIMD loads and (D = 36, 20) the scalar tails. In the short kernel's pair mode the weight
    is v_scale rounded to bf16, so the row comes out within bf16 rounding (and exactly where the scale is a bf16)."""
    Hkv, G = 2, 3
    vc, vd = _every_byte_rows(fmt, D, Hkv)
    n = vc.shape[0]
    kc = quantize_rows(torch.randn(n, Hkv, D), FMTS[fmt])
    q = torch.randn(n, Hkv * G, D)
    out = torch.full(q.shape, float("nan"))
    seqs = torch.tensor([[i, 1, i, 1] for i in range(n)])  # n sequences of one token, in one call
    _run(kernel, build, q, kc, vc, torch.arange(n).flip(0), seqs, D**-0.5, out, kind=FMTS[fmt].kind)
    want = vd.flip(0).repeat_interleave(G, dim=1)  # [n, H, D]: sequence i reads slot n - 1 - i
    assert torch.equal(out, want), (out - want).abs().max()
    if kernel == "short":
        out2 = torch.full(q.shape, float("nan"))
        native.paged_attention_short(q, kc, vc, torch.arange(n).flip(0), seqs, D**-0.5, out2, pairs=True,
                                     kind=FMTS[fmt].kind)
        assert torch.allclose(out2, want, atol=0, rtol=2**-8), (out2 - want).abs().max()


def test_kind_is_checked():
    kc = torch.zeros(8, 1, 16 + 4, dtype=torch.uint8)
    q, out = torch.zeros(1, 1, 16), torch.zeros(1, 1, 16)
    args = (q, kc, kc, torch.tensor([0]), torch.tensor([[0, 1, 0, 1]]), 0.25, out)
    with pytest.raises(AssertionError):  # a uint8 cache does not say which format its bytes are
        native.paged_attention_short(*args)
    with pytest.raises(AssertionError):  # D + 4 bytes a row: a row of D bytes is not a quantized cache
        native.paged_attention_short(q, kc[..., :16].contiguous(), kc[..., :16].contiguous(), *args[3:], kind=2)
    with pytest.raises(AssertionError):  # an fp32 cache is kind 0
        native.paged_attention_short(q, torch.zeros(8, 1, 16), torch.zeros(8, 1, 16), *args[3:], kind=1)
    native.paged_attention_short(*args, kind=3)
    assert torch.equal(out, torch.zeros(1, 1, 16))  # all-zero rows (scale 0) read back as zeros
    assert native.supports(torch.device("cpu"), torch.uint8)


@pytest.mark.skipif(not native.tiled_available(), reason="tiled kernel needs AVX2 + FMA or AVX-512")
@pytest.mark.parametrize("fmt", list(FMTS))
@pytest.mark.parametrize("kernels", ["short+tiled", "short+sdpa", "tiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backend_on_a_quantized_pool_agrees_with_sdpa(fmt, kernels, dtype):
    """The native backend `select_backend` builds for a quantized pool names the format to both kernels: its steps
    (decode, verify and prefill spans; the step's rows quantized as written) agree with the SDPA backend's, which
    dequantizes what it gathers."""
    from deltaserve.layers.attention import NativeCpuBackend, SdpaBackend, SeqSpan, select_backend

    H, Hkv, D, S = 9, 3, 64, 2000
    f = FMTS[fmt]
    g = torch.Generator().manual_seed(len(kernels) + f.kind)
    kc = quantize_rows(torch.randn(S, Hkv, D, generator=g), f)  # [S, Hkv, D + 4] uint8
    vc = quantize_rows(torch.randn(S, Hkv, D, generator=g), f)
    perm, spans, write, q0, off = torch.randperm(S, generator=g), [], [], 0, 0
    for L, n in [(100, 1), (37, 1), (64, 5), (80, 16), (50, 17), (300, 90), (200, 40), (1, 1)]:
        sl = perm[off : off + L]
        spans.append(SeqSpan(q0, n, sl))
        write.append(sl[L - n :])
        q0, off = q0 + n, off + L
    sm = torch.cat(write)
    q = torch.randn(q0, H, D, generator=g).to(dtype)
    k = torch.randn(q0, Hkv, D, generator=g).to(dtype)
    v = torch.randn(q0, Hkv, D, generator=g).to(dtype)
    b = select_backend("cpu", dtype, D, H, Hkv, short=kernels != "tiled", tiled=kernels != "short+sdpa", kv_format=f)
    assert isinstance(b, NativeCpuBackend)
    # a bf16 model's quantized rows: the tiled kernel's spans on the AMX kernel where it runs
    assert (b.span_path == "amx") == (dtype == torch.bfloat16 and kernels != "short+sdpa"
                                      and native.supports_amx(torch.device("cpu"), torch.uint8, D))
    outs = []
    for be in (b, SdpaBackend("cpu", H, Hkv, f)):
        kk, vv = kc.clone(), vc.clone()
        outs.append(be.forward(q.float() if be.fp32_q else q, k, v, kk, vv, be.prepare(spans, sm), D**-0.5).float())
        assert torch.equal(kk[sm], quantize_rows(k, f)) and torch.equal(vv[sm], quantize_rows(v, f))
    out, ref = outs
    atol, rtol = (2e-6, 1e-5) if dtype == torch.float32 else (5e-3, 1e-2)  # bf16: outputs rounded to bf16
    assert torch.allclose(out, ref, atol=atol, rtol=rtol), (out - ref).abs().max()


@pytest.mark.parametrize("fmt", list(FMTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_quant_rows_writes_what_quantize_rows_makes(fmt, dtype):
    """The fused int8 / fp8 write (`kernels/elementwise.c`, what the attention backends use to store a step's K/V)
    gives the bytes `quantize_rows` + `index_copy_` give, bit for bit: rows of many magnitudes, an all-zero row, a
    negative zero, exact ties (int8: 0.5 / 1.0 * 127 = 63.5 rounds half to even; fp8: halfway between e4m3 steps,
    normal and subnormal, and values rounding up into the next binade or the smallest normal), and V's layout (a
    strided view of the fused qkv output)."""
    from deltaserve.kernels import elementwise

    if not elementwise.available():
        pytest.skip("no C compiler: the PyTorch path is used instead")
    g = torch.Generator().manual_seed(7)
    T, Hkv, D = 9, 3, 64
    qkv = torch.randn(T, 5 * Hkv * D, generator=g) * torch.logspace(-4, 3, T)[:, None]  # [T, W]
    x = qkv[:, 2 * Hkv * D : 3 * Hkv * D].reshape(T, Hkv, D)  # [T, Hkv, D], token stride W
    x[0, 1] = 0.0
    x[0, 2, 5] = -0.0
    x[1, 0, :4] = torch.tensor([1.0, 0.5, -0.5, 0.25])  # int8 scale 1 / 127: 127, 63.5 -> 64, -63.5 -> -64, 31.75
    x[1, 0, 4:] = x[1, 0, 4:].clamp(-0.9, 0.9)
    # fp8 with the row's scale 1 (amax 448): ties between steps (1.0625 between 1 and 1.125 -> 1; 1.1875 -> 1.25;
    # 2^-6 x 1.0625), subnormal ties (2.5 x 2^-9 -> 2 x 2^-9; 3.5 x 2^-9 -> 4), 7.5 x 2^-9 -> 2^-6 (the smallest
    # normal), 1.9375 -> 2 (the next binade), 440 -> 448 (the largest)
    ties = [448.0, 1.0625, 1.1875, -1.0625, 2**-6 * 1.0625, 2.5 * 2**-9, -3.5 * 2**-9, 7.5 * 2**-9, 1.9375, 440.0,
            1e-7]
    x[2, 1, : len(ties)] = torch.tensor(ties)
    x[2, 1, len(ties) :] = x[2, 1, len(ties) :].clamp(-400, 400)
    x = x.to(dtype)
    slots = torch.randperm(40, generator=g)[:T]
    cache = torch.full((40, Hkv, D + 4), 0xAB, dtype=torch.uint8)
    want = cache.clone().index_copy_(0, slots, quantize_rows(x, FMTS[fmt]))
    assert elementwise.takes_quant_rows(x, cache, slots)
    elementwise.store_quant_rows(x, cache, slots, FMTS[fmt].kind)
    assert torch.equal(cache, want), (cache != want).nonzero()[:5]
    if fmt == "int8":
        assert cache[slots[1], 0, :4].view(torch.int8).tolist() == [127, 64, -64, 32]
    elif dtype == torch.float32:
        got = cache[slots[2], 1, : len(ties)].view(torch.float8_e4m3fn).float().tolist()
        assert got == [448.0, 1.0, 1.25, -1.0, 2**-6, 2 * 2**-9, -4 * 2**-9, 2**-6, 2.0, 448.0, 0.0]
