"""The native paged-attention kernels (short-query and tiled) against SDPA on gathered K/V."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deltaserve.kernels import paged_attention as native

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler: the PyTorch path is used instead")
KERNELS = {"short": native.paged_attention_short, "tiled": native.paged_attention_tiled}
needs_tiled = pytest.mark.skipif(not native.tiled_available(), reason="tiled kernel needs AVX2 + FMA or AVX-512")


def _reference(q, kc, vc, seqs, slots, scale):
    out = torch.zeros_like(q)
    for (q0, ql, _, L), sl in zip(seqs, slots):
        k = kc[sl].float().transpose(0, 1)[None]  # [1, Hkv, L, D]
        v = vc[sl].float().transpose(0, 1)[None]
        qq = q[q0 : q0 + ql].transpose(0, 1)[None]  # [1, H, ql, D]
        mask = torch.arange(L)[None, :] <= (torch.arange(ql) + L - ql)[:, None]
        out[q0 : q0 + ql] = F.scaled_dot_product_attention(qq, k, v, attn_mask=mask, scale=scale,
                                                           enable_gqa=True)[0].transpose(0, 1)
    return out


def scattered_spans(g: torch.Generator, S: int, shape: list[tuple[int, int]]):
    """Kernel rows (q_start, q_len, kv_offset, kv_len) and slot lists for spans of (context length, q_len) over a
    pool of S slots, and the total query count. Slots are drawn at random: the kernels must follow the slot list,
    not assume order."""
    seqs, slots, q0, off = [], [], 0, 0
    for L, ql in shape:
        slots.append(torch.randperm(S, generator=g)[:L])
        seqs.append((q0, ql, off, L))
        q0, off = q0 + ql, off + L
    return seqs, slots, q0


@pytest.mark.parametrize("kernel", ["short", pytest.param("tiled", marks=needs_tiled)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H,Hkv,D", [(9, 3, 64), (14, 2, 64), (4, 4, 128), (6, 2, 40)])
@pytest.mark.parametrize("shape", [[(1, 1)], [(5, 1), (300, 1), (257, 1)], [(256, 9), (511, 16), (9, 9)],
                                   [(1000, 1), (20, 3)], [(17, 2), (33, 3), (272, 2)]])
def test_matches_sdpa(kernel, dtype, H, Hkv, D, shape):
    g = torch.Generator().manual_seed(hash((H, D, len(shape))) % 1000)
    S = 3000
    kc = torch.randn(S, Hkv, D, generator=g).to(dtype)
    vc = torch.randn(S, Hkv, D, generator=g).to(dtype)
    seqs, slots, q0 = scattered_spans(g, S, shape)
    # a bf16 model's queries are bf16 values (the tiled kernel rounds q to bf16 with a bf16 cache)
    q = torch.randn(q0, H, D, generator=g).to(dtype).float()
    out = torch.full((q0, H, D), float("nan"))
    scale = D**-0.5
    KERNELS[kernel](q, kc, vc, torch.cat(slots), torch.tensor(seqs), scale, out)
    ref = _reference(q, kc, vc, seqs, slots, scale)
    assert torch.allclose(out, ref, atol=2e-6, rtol=1e-5), (out - ref).abs().max()
    if kernel == "short" and dtype == torch.bfloat16:
        # both products in bf16 pairs, keys on lanes (D a multiple of 32; D=40 takes the fp32 path instead)
        out2 = torch.full((q0, H, D), float("nan"))
        native.paged_attention_short(q, kc, vc, torch.cat(slots), torch.tensor(seqs), scale, out2, pairs=True)
        assert torch.allclose(out2, ref, atol=5e-3, rtol=1e-2), (out2 - ref).abs().max()
        if D % 32:
            assert torch.allclose(out2, ref, atol=2e-6, rtol=1e-5)
    if kernel == "tiled" and dtype == torch.bfloat16:
        # P.V in bf16 pairs too: within bf16 rounding of the output (2^-8 relative)
        out2 = torch.full((q0, H, D), float("nan"))
        native.paged_attention_tiled(q, kc, vc, torch.cat(slots), torch.tensor(seqs), scale, out2, p_bf16=True)
        assert torch.allclose(out2, ref, atol=5e-3, rtol=1e-2), (out2 - ref).abs().max()
        # fp32 products from a bf16 cache: the path of CPUs without AVX512-BF16
        out3 = torch.full((q0, H, D), float("nan"))
        native.paged_attention_tiled(q, kc, vc, torch.cat(slots), torch.tensor(seqs), scale, out3, bf16_dot=False)
        assert torch.allclose(out3, ref, atol=2e-6, rtol=1e-5), (out3 - ref).abs().max()


@needs_tiled
@pytest.mark.parametrize("shape", [[(2048, 2048)], [(700, 130), (64, 64), (65, 17), (3001, 300)],
                                   [(129, 43), (4000, 1), (250, 5)]])
def test_tiled_long_spans(shape):
    """Prefill-sized spans: whole prompts (q_len == kv_len), deltas that cross key-chunk and query-block
    edges (64 keys, 128 query rows), and spans mixed with decodes in one call."""
    H, Hkv, D = 9, 3, 64
    g = torch.Generator().manual_seed(len(shape))
    S = 8000
    kc = torch.randn(S, Hkv, D, generator=g).to(torch.bfloat16)
    vc = torch.randn(S, Hkv, D, generator=g).to(torch.bfloat16)
    seqs, slots, q0, off = [], [], 0, 0
    for L, ql in shape:
        sl = torch.randperm(S, generator=g)[:L]
        seqs.append((q0, ql, off, L))
        slots.append(sl)
        q0, off = q0 + ql, off + L
    q = torch.randn(q0, H, D, generator=g).to(torch.bfloat16).float()
    ref = _reference(q, kc, vc, seqs, slots, D**-0.5)
    for p_bf16, atol, rtol in ((False, 2e-6, 1e-5), (True, 5e-3, 1e-2)):
        out = torch.full((q0, H, D), float("nan"))
        native.paged_attention_tiled(q, kc, vc, torch.cat(slots), torch.tensor(seqs), D**-0.5, out, p_bf16=p_bf16)
        assert torch.allclose(out, ref, atol=atol, rtol=rtol), (p_bf16, (out - ref).abs().max())


@pytest.mark.parametrize("kernel", ["short", pytest.param("tiled", marks=needs_tiled)])
def test_untouched_rows_and_empty_batch(kernel):
    kc = torch.randn(16, 1, 16)
    q = torch.randn(3, 2, 16)
    out = torch.full((3, 2, 16), 7.0)
    # only row 1 belongs to a sequence; rows 0 and 2 must stay as they were
    KERNELS[kernel](q, kc, kc, torch.tensor([3, 4, 5]), torch.tensor([[1, 1, 0, 3]]), 0.25, out)
    assert torch.all(out[0] == 7.0) and torch.all(out[2] == 7.0) and not torch.all(out[1] == 7.0)
    KERNELS[kernel](q, kc, kc, torch.zeros(0, dtype=torch.int64), torch.zeros(0, 4, dtype=torch.int64), 0.25, out)
    assert torch.all(out[0] == 7.0) and torch.all(out[2] == 7.0)
