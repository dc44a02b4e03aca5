"""kernels/amx_short.c: decode and verify spans of a bf16 cache on AMX tiles (S^T = K.Q^T), against fp32 SDPA; and of
an fp8 e4m3 cache (rows as their exact bf16 values, K scales on S^T, V scales on P) against fp32 SDPA over the
dequantized rows, as exact as the short kernel's pair path on the same rows.

Tolerances as the AMX span kernel's (q and P rounded to bf16). Shapes cross the kernel's edges: key chunks of 128
(contexts of 127/128/129 and more), 16-key tile blocks taken straight from the pool where their slots run (page 16)
and copied where they do not (page 1; page 5 mixes both), rows a sequence from 1 to 64 (one to four 16-row column
tiles; the four Q^T tiles held in tile registers for head_dim 64 up to 32 rows), the kv heads of a decode sharing a
column tile's lanes (2 to 16 heads a tile, a partial last tile), a sequence's keys split into parts and merged where
the threads lack items, empty spans. The kernel tests skip where the CPU has no AMX; the routing
tests run everywhere.
"""

from __future__ import annotations

import pytest
import torch

from deltaserve.kernels import paged_attention as native
from deltaserve.kv.quant import FORMATS, dequantize_rows, quantize_rows
from deltaserve.layers.attention import NativeCpuBackend, SeqSpan
from deltaserve.layers.attention.native import TILED_MIN_ROWS_AMX
from test_amx_attention import _case, check_against_reference, check_late_key
from test_kv_quant_kernels import _every_byte_rows
from test_span_attention import _reference
from test_span_attention import forward_each, stateful_equals_stateless

needs_amx_short = pytest.mark.skipif(not (native.supports_amx(torch.device("cpu"), torch.bfloat16, 64)
                                          and native.amx_short_available()),
                                     reason="no AMX here (Intel Xeon 4th gen or newer, with the tile state granted)")

# (context length, q_len) per span, several spans to a call
SHAPES = [
    [(1, 1)],  # the very first token
    [(127, 1), (128, 1), (129, 1)],  # contexts before, on and past the 128-key chunk edge
    [(300, 5), (17, 3), (40, 0)],  # a verify over a history that crosses a chunk edge; a short one; an empty span
    [(5000, 1)],  # one sequence's decode: too few items, its keys split into parts and merged
    [(4000, 9), (3000, 2), (2600, 4), (700, 1)],  # a verify step of four agents
    [(1100, 7), (7, 7)],  # a whole 7-token prompt (every key masked for some rows, in one chunk)
    [(6000, 21)],  # a long verify: 63 rows with GQA 3, four column tiles
]


HEADS = [(9, 3, 64), (14, 2, 64), (4, 4, 32), (8, 2, 128), (6, 1, 64)]  # (H, Hkv, D)
# every shape whose spans all fit the kernel (q_len x H / Hkv <= AMX_SHORT_MAX_ROWS) with every head layout
CASES = [(H, Hkv, D, shape) for H, Hkv, D in HEADS for shape in SHAPES
         if all(n * (H // Hkv) <= native.AMX_SHORT_MAX_ROWS for _, n in shape)]


@needs_amx_short
@pytest.mark.parametrize("H,Hkv,D,shape", CASES)
@pytest.mark.parametrize("page", [1, 5, 16])
def test_matches_fp32_reference(H, Hkv, D, shape, page):
    check_against_reference(native.paged_attention_amx_short, H, Hkv, D, shape, page)


@needs_amx_short
@pytest.mark.parametrize("H,Hkv,D", [(20, 20, 64), (40, 20, 64), (15, 5, 64)])
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3], [(900, 1), (901, 2), (902, 3)]])
def test_many_heads_share_column_tiles(H, Hkv, D, shape):
    # a decode of 20 kv heads a row each fills one tile of 16 heads and leaves 4 for a second; 2 rows a head: 8 heads
    # a tile; GQA 3 with 5 kv heads: 5 heads a tile at q_len 1, 2 at q_len 2, one at q_len 3 (9 rows)
    check_against_reference(native.paged_attention_amx_short, H, Hkv, D, shape, 5)


@needs_amx_short
@pytest.mark.parametrize("key", [130, 1499])  # in the second chunk; the last key, in the last chunk
def test_a_late_key_far_above_the_running_max(key):
    """As for the span kernel (`check_late_key`), with this kernel's 128-key chunks."""
    check_late_key(native.paged_attention_amx_short, key)


FP8 = FORMATS["fp8_e4m3"]


def _fp8_case(H, Hkv, D, shape, page):
    """`_case` with its K/V as fp8 rows (V spread over scales 0-4): q, fp8 K, fp8 V, slots, seqs, spans, and fp32
    SDPA over the rows dequantize_rows reads back."""
    g = torch.Generator().manual_seed(100_000 * H + 1000 * D + 10 * page + len(shape))
    q, kc, vc, sl, seqs, spans = _case(g, H, Hkv, D, shape, page)
    kq = quantize_rows(kc.float(), FP8)  # [S, Hkv, D + 4] uint8
    vq = quantize_rows(vc.float() * torch.rand(vc.shape[0], Hkv, 1, generator=g) * 4, FP8)
    ref = _reference(q, dequantize_rows(kq, FP8), dequantize_rows(vq, FP8), spans, D**-0.5)
    return q, kq, vq, sl, seqs, spans, ref


FP8_CASES = [c for c in CASES if c[3] is not SHAPES[-1]]  # every head layout and shape but the 6k verify


def _fp8_errors(H, Hkv, D, shape, page):
    """|out - reference| of the AMX short kernel and of the short kernel's pair path on one fp8 case ([n, H, D]
    each, n the span rows), after checking the rows of no listed span are left untouched."""
    q, kq, vq, sl, seqs, _, ref = _fp8_case(H, Hkv, D, shape, page)
    n = int(seqs[:, 1].sum())
    out, pairs = torch.full_like(q, float("nan")), torch.full_like(q, float("nan"))
    native.paged_attention_amx_short(q, kq, vq, sl, seqs, D**-0.5, out, kind=FP8.kind)
    native.paged_attention_short(q, kq, vq, sl, seqs, D**-0.5, pairs, True, kind=FP8.kind)
    assert out[n:].isnan().all()
    return (out[:n] - ref[:n]).abs(), (pairs[:n] - ref[:n]).abs(), ref[:n]


@needs_amx_short
@pytest.mark.parametrize("H,Hkv,D,shape", FP8_CASES)
@pytest.mark.parametrize("page", [1, 16])
def test_fp8_rows_match_reference(H, Hkv, D, shape, page):
    """fp8 rows against fp32 SDPA over their dequantized values, at the bf16 modes' tolerance scaled to V."""
    err, _, ref = _fp8_errors(H, Hkv, D, shape, page)
    big = max(1.0, float(ref.abs().max()))
    assert (err <= 5e-3 * big + 1e-2 * ref.abs()).all(), err.max()


@needs_amx_short
def test_fp8_rows_as_exact_as_the_pair_path():
    """Over every fp8 case, the kernel's mean error is the short kernel's pair path's (the same rounding: q and
    P x v_scale in bf16), within 10%: 9.1e-4 against 9.1e-4 when written. A single case's mean moves by more (a
    decode of 4 heads x 32 dims has 128 outputs), so the sum over all of them is compared."""
    total, total_pairs = 0.0, 0.0
    for H, Hkv, D, shape in FP8_CASES:
        for page in (1, 16):
            err, err_pairs, _ = _fp8_errors(H, Hkv, D, shape, page)
            total, total_pairs = total + float(err.mean()), total_pairs + float(err_pairs.mean())
    assert total <= 1.1 * total_pairs, (total, total_pairs)


@needs_amx_short
@pytest.mark.parametrize("D", [32, 64])
def test_fp8_one_token_context_is_the_v_row(D):
    """With one key the output is the dequantized V row, up to P x v_scale's bf16 rounding (2^-8 relative): every fp8
    byte value through the integer conversion, subnormals and the sign included, with scales of several magnitudes."""
    Hkv, G = 2, 3
    vc, vd = _every_byte_rows("fp8", D, Hkv)
    n = vc.shape[0]
    kc = quantize_rows(torch.randn(n, Hkv, D), FP8)
    q = torch.randn(n, Hkv * G, D).to(torch.bfloat16).float()
    out = torch.full(q.shape, float("nan"))
    seqs = torch.tensor([[i, 1, i, 1] for i in range(n)])  # n sequences of one token, in one call
    native.paged_attention_amx_short(q, kc, vc, torch.arange(n).flip(0), seqs, D**-0.5, out, kind=FP8.kind)
    want = vd.flip(0).repeat_interleave(G, dim=1)  # [n, H, D]: sequence i reads slot n - 1 - i
    assert torch.allclose(out, want, atol=0, rtol=2**-8), (out - want).abs().max()


@needs_amx_short
def test_rejects_what_it_does_not_take():
    g = torch.Generator().manual_seed(0)
    q, kc, vc, sl, seqs, _ = _case(g, 9, 3, 64, [(500, 22)], 1)  # 66 rows
    with pytest.raises(RuntimeError, match="at most 64 rows"):
        native.paged_attention_amx_short(q, kc, vc, sl, seqs, 0.125, torch.empty_like(q))
    q, kc, vc, sl, seqs, _ = _case(g, 6, 2, 40, [(50, 2)], 1)  # head_dim 40: not a multiple of 32
    with pytest.raises(RuntimeError, match="unsupported shape"):
        native.paged_attention_amx_short(q, kc, vc, sl, seqs, 40**-0.5, torch.empty_like(q))
    with pytest.raises(AssertionError, match="bf16 and fp8 caches only"):
        native.paged_attention_amx_short(q, kc.float(), vc.float(), sl, seqs, 40**-0.5, torch.empty_like(q))
    kq = quantize_rows(kc.float(), FORMATS["int8"])  # int8 rows: amx_short_int8.c's
    with pytest.raises(AssertionError, match="bf16 and fp8 caches only"):
        native.paged_attention_amx_short(q, kq, kq, sl, seqs, 40**-0.5, torch.empty_like(q), kind=2)


def _backend(amx_short: bool, H: int = 9, Hkv: int = 3) -> NativeCpuBackend:
    return NativeCpuBackend(H, Hkv, short=True, tiled=True, tiled_min_rows=TILED_MIN_ROWS_AMX, pairs=True,
                            p_bf16=True, bf16_dot=True, span_path="amx", amx_short=amx_short)


@pytest.mark.parametrize("H,Hkv", [(9, 3), (14, 2)])
def test_backend_routes_short_steps_to_amx_short(H, Hkv):
    """Runs everywhere (prepare only): a step whose spans all have at most AMX_SHORT_MAX_ROWS rows goes to the AMX
    short kernel whole; a step with a longer span is routed as without it (its short spans join the AMX span
    kernel's call or the short kernel's)."""
    G = H // Hkv
    q_lens = [1, 2, 3, native.AMX_SHORT_MAX_ROWS // G, native.AMX_SHORT_MAX_ROWS // G + 1, 300]
    spans, q0, base = [], 0, 0
    for n in q_lens:
        spans.append(SeqSpan(q0, n, torch.arange(base, base + 40 + n)))
        q0, base = q0 + n, base + 40 + n
    short = _backend(True, H, Hkv).prepare(spans[:4], torch.arange(q0))
    assert short.amx_short.seqs[:, 1].tolist() == q_lens[:4]
    assert short.amx_short.seqs[:, 0].tolist() == [s.q_start for s in spans[:4]]  # rows in the flat batch
    assert torch.equal(short.amx_short.slots, torch.cat([s.kv_slots for s in spans[:4]]))
    assert short.short is None and short.tiled is None and short.amx is None
    for meta in (_backend(True, H, Hkv).prepare(spans, torch.arange(q0)),
                 _backend(False, H, Hkv).prepare(spans, torch.arange(q0))):
        assert meta.amx_short is None
        assert meta.short.seqs[:, 1].tolist() == [n for n in q_lens if n * G < TILED_MIN_ROWS_AMX]
        assert meta.amx.seqs[:, 1].tolist() == [n for n in q_lens if n * G >= TILED_MIN_ROWS_AMX]
    assert _backend(True, H, Hkv).prepare([], torch.arange(0)).amx_short is None


@needs_amx_short
def test_backend_forward_agrees_without_amx_short():
    """A decode and verify step of five agents with and without the AMX short kernel: each within the bf16 modes'
    tolerance of the fp32 reference (`forward_each`), and of each other."""
    shape = [(1500, 1), (900, 2), (3000, 9), (2600, 21), (77, 5)]
    outs, metas = forward_each([_backend(False), _backend(True)], shape, 11, 9000)
    assert metas[0].amx_short is None and metas[1].amx_short.seqs[:, 1].tolist() == [1, 2, 9, 21, 5]
    assert torch.allclose(outs[0].float(), outs[1].float(), atol=5e-3, rtol=1e-2)


@needs_amx_short
def test_engine_stateful_equals_stateless_with_amx_short(monkeypatch, smollm_dir):
    """bf16 SmolLM2 with decode steps on the AMX short kernel: a session's turns give the tokens a stateless
    recompute gives (`test_span_attention.stateful_equals_stateless`)."""
    monkeypatch.setenv("DELTASERVE_SPAN_ATTN", "amx")
    calls = []
    run = native.paged_attention_amx_short
    monkeypatch.setattr(native, "paged_attention_amx_short", lambda *a: calls.append(a[4].shape[0]) or run(*a))
    stateful_equals_stateless(smollm_dir, "amx")
    assert len(calls) >= 2 * 5 * 30  # decode steps of every turn, in each of the 30 layers, in both modes


@needs_amx_short
def test_selector_picks_amx_short_with_the_amx_span_path(monkeypatch):
    from deltaserve.layers.attention import select_backend

    monkeypatch.setenv("DELTASERVE_SPAN_ATTN", "amx")
    assert select_backend("cpu", torch.bfloat16, 64, 9, 3).amx_short
    assert not select_backend("cpu", torch.float32, 64, 9, 3).amx_short  # fp32 models keep fp32 products
    monkeypatch.setenv("DELTASERVE_AMX_SHORT", "off")
    assert not select_backend("cpu", torch.bfloat16, 64, 9, 3).amx_short
    monkeypatch.setenv("DELTASERVE_AMX_SHORT", "on")
    monkeypatch.setenv("DELTASERVE_SPAN_ATTN", "kernel")
    assert not select_backend("cpu", torch.bfloat16, 64, 9, 3).amx_short
