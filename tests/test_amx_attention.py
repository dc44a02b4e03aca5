"""kernels/amx_attention.c: long spans of a bf16 cache on AMX tiles, against fp32 SDPA on the same bf16 values.

At the tolerances of the kernels' bf16 modes (atol 5e-3, rtol 1e-2): q and P are rounded to bf16 as in the tiled
kernel's p_bf16 mode. Shapes cross the kernel's edges: key chunks of 512 (contexts of 511/512/513 and more),
work items of up to 512 rows (fewer where that leaves a thread idle: a span of 300 tokens with GQA 3 is 2-4
items), 32-row blocks, odd lengths, empty and one-token spans, spans on scattered pages. Verifies of one or two
sequences give the kernel too few work items for its threads: it splits their keys into parts and merges them.
The kernel tests skip where the CPU has no AMX (the tiled kernel and the matmul path serve those CPUs, and CI where
it lacks AMX); the routing tests run everywhere.
"""

from __future__ import annotations

import pytest
import torch

from deltaserve.kernels import paged_attention as native
from deltaserve.kv.quant import FORMATS, dequantize_rows, quantize_rows
from deltaserve.layers.attention import NativeCpuBackend, SeqSpan
from deltaserve.layers.attention.native import SPAN_AMX_MIN_Q, TILED_MIN_ROWS
from test_span_attention import _pages, _reference, forward_each, stateful_equals_stateless

needs_amx = pytest.mark.skipif(not native.supports_amx(torch.device("cpu"), torch.bfloat16, 64),
                               reason="no AMX here (Intel Xeon 4th gen or newer, with the tile state granted)")

# (context length, q_len) per span, several spans to a call
SHAPES = [
    [(1, 1)],  # the very first token
    [(37, 37)],  # a whole odd-length prompt, one chunk
    [(300, 5)],  # a short span over a history that crosses a chunk edge
    [(512, 40), (513, 41), (511, 1)],  # contexts on, past and before the 512-key chunk edge
    [(700, 100), (1, 1), (600, 255)],  # spans of two items and more; one-token span between them
    [(1100, 300)],  # a turn's delta over five chunks
    [(40, 0), (33, 33)],  # an empty span beside a whole prompt
    [(5000, 9)],  # a verify of one sequence: too few items, its keys split into parts and merged
    [(3000, 2), (2600, 5)],  # split parts of two sequences, the last part short of a chunk
]


def _case(g, H, Hkv, D, shape, page):
    S = 2 * sum(L for L, _ in shape) + 4 * page
    kc = torch.randn(S, Hkv, D, generator=g).to(torch.bfloat16)
    vc = torch.randn(S, Hkv, D, generator=g).to(torch.bfloat16)
    sl = _pages(g, S, sum(L for L, _ in shape), page)
    spans, rows, q0, off = [], [], 0, 0
    for L, n in shape:
        spans.append((q0, n, sl[off : off + L]))
        rows.append((q0, n, off, L))
        q0, off = q0 + n, off + L
    q = (2 * torch.randn(q0 + 3, H, D, generator=g)).to(torch.bfloat16).float()  # 3 rows in no span
    return q, kc, vc, sl, torch.tensor(rows, dtype=torch.int64), spans


def check_against_reference(kernel, H, Hkv, D, shape, page):
    """`kernel` (an AMX kernel's binding: q and P in bf16) on a case against fp32 SDPA; rows of no listed span are
    left untouched. Shared by this file and test_amx_short.py."""
    g = torch.Generator().manual_seed(hash((H, D, page, len(shape))) % 2**31)
    q, kc, vc, sl, seqs, spans = _case(g, H, Hkv, D, shape, page)
    out = torch.full_like(q, float("nan"))
    kernel(q, kc, vc, sl, seqs, D**-0.5, out)
    n = int(seqs[:, 1].sum())
    ref = _reference(q, kc, vc, spans, D**-0.5)
    assert torch.allclose(out[:n], ref[:n], atol=5e-3, rtol=1e-2), (out[:n] - ref[:n]).abs().max()
    assert out[n:].isnan().all()  # rows of no listed span are untouched


def check_late_key(kernel, key):
    """A row keeps its softmax reference while no later chunk's score passes it by more than 2^8; key `key`'s score
    passes it by far (~2^180), so `kernel` must fall back to the chunk's true maximum and rescale the row."""
    g = torch.Generator().manual_seed(key)
    shape = [(1500, 3)]
    q, kc, vc, sl, seqs, spans = _case(g, 9, 3, 64, shape, 16)
    # the span's last token (it sees every key), head 0 (kv head 0): score |q|^2 / 2 ~ 128
    kc[sl[key], 0] = (4 * q[2, 0]).to(torch.bfloat16)
    out = torch.full_like(q, float("nan"))
    kernel(q, kc, vc, sl, seqs, 64**-0.5, out)
    ref = _reference(q, kc, vc, spans, 64**-0.5)
    assert torch.allclose(out[:3], ref[:3], atol=5e-3, rtol=1e-2), (out[:3] - ref[:3]).abs().max()
    assert torch.allclose(out[2, 0], vc[sl[key], 0].float(), atol=2e-2)  # that key takes all of the row's weight


@needs_amx
@pytest.mark.parametrize("H,Hkv,D", [(9, 3, 64), (14, 2, 64), (4, 4, 32), (8, 2, 128)])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("page", [1, 16])
def test_matches_fp32_reference(H, Hkv, D, shape, page):
    check_against_reference(native.paged_attention_amx, H, Hkv, D, shape, page)


@needs_amx
@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3"])
@pytest.mark.parametrize("H,Hkv,D", [(9, 3, 64), (8, 2, 128), (4, 4, 32)])
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3], SHAPES[5], SHAPES[8]])
def test_quantized_rows_match_reference(fmt, H, Hkv, D, shape):
    """int8 / fp8 rows (a bf16 model's quantized cache) against fp32 SDPA over the dequantized rows: K as its bytes'
    exact values with the rows' scales applied to the scores, V dequantized and rounded to bf16 as a chunk is packed
    (as a bf16 cache of those values would hold it: 2^-9 of each value, up to ~4 here), so atol 1e-2 where the bf16
    cache's rows, exact in the reference, take 5e-3 (worst seen over 12 seeds: 5.9e-3 past rtol, bf16 rows 3.1e-3)."""
    g = torch.Generator().manual_seed(hash((FORMATS[fmt].kind, H, D, len(shape))) % 2**31)
    q, kc, vc, sl, seqs, spans = _case(g, H, Hkv, D, shape, 16)
    f = FORMATS[fmt]
    kq, vq = quantize_rows(kc.float(), f), quantize_rows(vc.float(), f)  # [S, Hkv, D + 4] uint8
    out = torch.full_like(q, float("nan"))
    native.paged_attention_amx(q, kq, vq, sl, seqs, D**-0.5, out, kind=f.kind)
    n = int(seqs[:, 1].sum())
    ref = _reference(q, dequantize_rows(kq, f), dequantize_rows(vq, f), spans, D**-0.5)
    assert torch.allclose(out[:n], ref[:n], atol=1e-2, rtol=1e-2), (out[:n] - ref[:n]).abs().max()
    assert out[n:].isnan().all()


@needs_amx
@pytest.mark.parametrize("key", [700, 1499])  # in the second chunk; the last key, in the last chunk
def test_a_late_key_far_above_the_running_max(key):
    check_late_key(native.paged_attention_amx, key)


@needs_amx
def test_rejects_what_it_does_not_take():
    g = torch.Generator().manual_seed(0)
    q, kc, vc, sl, seqs, _ = _case(g, 6, 2, 40, [(50, 10)], 1)  # head_dim 40: not a multiple of 32
    with pytest.raises(RuntimeError, match="unsupported shape"):
        native.paged_attention_amx(q, kc, vc, sl, seqs, 40**-0.5, torch.empty_like(q))
    with pytest.raises(AssertionError, match="bf16, int8 and fp8 caches only"):
        native.paged_attention_amx(q, kc.float(), vc.float(), sl, seqs, 40**-0.5, torch.empty_like(q))
    assert not native.supports_amx(torch.device("cpu"), torch.bfloat16, 40)
    assert not native.supports_amx(torch.device("cpu"), torch.float32, 64)


def _backend(path: str) -> NativeCpuBackend:
    return NativeCpuBackend(9, 3, short=True, tiled=True, tiled_min_rows=TILED_MIN_ROWS, pairs=True, p_bf16=True,
                            bf16_dot=True, span_path=path)


def test_backend_routes_long_spans_to_amx():
    """Runs everywhere (prepare only): spans the tiled kernel would take go to the AMX one from SPAN_AMX_MIN_Q
    tokens."""
    b = _backend("amx")
    q_lens = [1, b.short_max_q_len, b.short_max_q_len + 1, 31, 200]
    spans, q0, base = [], 0, 0
    for n in q_lens:
        spans.append(SeqSpan(q0, n, torch.arange(base, base + 40 + n)))
        q0, base = q0 + n, base + 40 + n
    meta = b.prepare(spans, torch.arange(q0))
    long = [n for n in q_lens if n > b.short_max_q_len]
    assert meta.short.seqs[:, 1].tolist() == [1, b.short_max_q_len]
    assert meta.amx.seqs[:, 1].tolist() == [n for n in long if n >= SPAN_AMX_MIN_Q] and meta.matmul == ()
    assert (meta.tiled is None) == all(n >= SPAN_AMX_MIN_Q for n in long)
    assert meta.amx.seqs[:, 0].tolist()[-1] == q0 - 200  # rows in the flat batch
    assert torch.equal(meta.amx.slots[-240:], spans[-1].kv_slots)
    off = _backend("kernel").prepare(spans, torch.arange(q0))
    assert off.amx is None and off.tiled.seqs[:, 1].tolist() == long
    with pytest.raises(AssertionError):
        NativeCpuBackend(9, 3, short=True, tiled=True, tiled_min_rows=0, pairs=True, p_bf16=True, bf16_dot=True,
                         span_path="gpu")


@needs_amx
def test_backend_forward_amx_agrees_with_the_tiled_kernel():
    """A mixed step (decode, short verify, a turn's delta over history, a whole prompt) with and without the AMX
    kernel (`test_span_attention.forward_each`); the decode and short verify stay on the short kernel either way."""
    outs, metas = forward_each([_backend("kernel"), _backend("amx")], [(1500, 1), (900, 2), (2600, 300), (77, 77)],
                               11, 7000)
    assert metas[0].amx is None and metas[1].amx.seqs[:, 1].tolist() == [300, 77]
    assert torch.equal(outs[0][:3], outs[1][:3])


@needs_amx
def test_engine_stateful_equals_stateless_with_amx_spans(monkeypatch, smollm_dir):
    """bf16 SmolLM2 with spans on the AMX kernel: a session's turns give the tokens a stateless recompute gives
    (`test_span_attention.stateful_equals_stateless`)."""
    monkeypatch.setenv("DELTASERVE_SPAN_ATTN", "amx")
    calls = []
    run = native.paged_attention_amx
    monkeypatch.setattr(native, "paged_attention_amx", lambda *a: calls.append(a[4].shape[0]) or run(*a))
    stateful_equals_stateless(smollm_dir, "amx")
    assert len(calls) >= 2 * 5 * 30  # every turn's prefill, in each of the 30 layers, in both modes


def test_amx_lowers_the_short_kernel_split():
    """Where the AMX kernel takes the tiled kernel's spans, spans leave the short kernel from TILED_MIN_ROWS_AMX
    rows."""
    from deltaserve.layers.attention.native import TILED_MIN_ROWS_AMX, tiled_min_rows

    assert tiled_min_rows(False, amx=True) == tiled_min_rows(True, amx=True) == TILED_MIN_ROWS_AMX


@needs_amx
def test_selector_picks_amx_when_forced(monkeypatch):
    from deltaserve.layers.attention import select_backend
    from deltaserve.layers.attention.native import TILED_MIN_ROWS_AMX

    monkeypatch.setenv("DELTASERVE_SPAN_ATTN", "amx")
    b = select_backend("cpu", torch.bfloat16, 64, 9, 3)
    assert b.span_path == "amx" and b.tiled_min_rows == TILED_MIN_ROWS_AMX and b.short_max_q_len == 2
    assert select_backend("cpu", torch.float32, 64, 9, 3).span_path == "kernel"  # fp32 models keep fp32 products
