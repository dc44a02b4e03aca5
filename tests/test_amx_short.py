"""kernels/amx_short.c: decode and verify spans of a bf16 cache on AMX tiles (S^T = K.Q^T), against fp32 SDPA.

Tolerances as the AMX span kernel's (q and P rounded to bf16). Shapes cross the kernel's edges: key chunks of 128
(contexts of 127/128/129 and more), 16-key tile blocks taken straight from the pool where their slots run (page 16)
and copied where they do not (page 1; page 5 mixes both), rows a sequence from 1 to 64 (one to four 16-row column
tiles; the four Q^T tiles held in tile registers for head_dim 64 up to 32 rows), a sequence's keys split into parts
and merged where the threads lack items, empty spans. The kernel tests skip where the CPU has no AMX; the routing
tests run everywhere.
"""

from __future__ import annotations

import pytest
import torch

from deltaserve.kernels import paged_attention as native
from deltaserve.layers.attention import NativeCpuBackend, SeqSpan
from deltaserve.layers.attention.native import TILED_MIN_ROWS_AMX
from test_amx_attention import _case, check_against_reference, check_late_key
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
@pytest.mark.parametrize("key", [130, 1499])  # in the second chunk; the last key, in the last chunk
def test_a_late_key_far_above_the_running_max(key):
    """As for the span kernel (`check_late_key`), with this kernel's 128-key chunks."""
    check_late_key(native.paged_attention_amx_short, key)


@needs_amx_short
def test_rejects_what_it_does_not_take():
    g = torch.Generator().manual_seed(0)
    q, kc, vc, sl, seqs, _ = _case(g, 9, 3, 64, [(500, 22)], 1)  # 66 rows
    with pytest.raises(RuntimeError, match="at most 64 rows"):
        native.paged_attention_amx_short(q, kc, vc, sl, seqs, 0.125, torch.empty_like(q))
    q, kc, vc, sl, seqs, _ = _case(g, 6, 2, 40, [(50, 2)], 1)  # head_dim 40: not a multiple of 32
    with pytest.raises(RuntimeError, match="unsupported shape"):
        native.paged_attention_amx_short(q, kc, vc, sl, seqs, 40**-0.5, torch.empty_like(q))
    with pytest.raises(AssertionError, match="bf16 caches only"):
        native.paged_attention_amx_short(q, kc.float(), vc.float(), sl, seqs, 40**-0.5, torch.empty_like(q))


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
