"""layers/attention/span_matmul.py and span_probe.py: long spans as bf16 matrix products over chunked gathers.

Against SDPA in fp32 on the same bf16 values, at the tolerances of the kernels' bf16 modes
(`test_attention_backends.py`: atol 5e-3, rtol 1e-2), with small CHUNK / Q_BLOCK so that a few hundred keys
cross many chunk and block edges; then the backend's routing, the probe's override and cache, and an engine
whose long spans all take the matmul path (SmolLM2, bf16: the only dtype the path serves).
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from deltaserve.kernels import paged_attention as native
from deltaserve.layers.attention import NativeCpuBackend, SeqSpan, select_backend, span_matmul, span_probe
from deltaserve.layers.attention.native import SPAN_MATMUL_MIN_Q, TILED_MIN_ROWS

needs_tiled = pytest.mark.skipif(not native.available() or not native.tiled_available(),
                                 reason="native attention kernels not built here")


def _reference(q, kc, vc, spans, scale):
    """fp32 SDPA per span over its gathered context; q [T, H, D], caches [S, Hkv, D]."""
    out = torch.zeros(q.shape, dtype=torch.float32)
    for q0, n, sl in spans:
        L = len(sl)
        k = kc[sl].float().transpose(0, 1)[None]  # [1, Hkv, L, D]
        v = vc[sl].float().transpose(0, 1)[None]
        mask = torch.arange(L)[None, :] <= (torch.arange(n) + L - n)[:, None]  # [n, L]
        qq = q[q0 : q0 + n].float().transpose(0, 1)[None]  # [1, H, n, D]
        out[q0 : q0 + n] = F.scaled_dot_product_attention(qq, k, v, attn_mask=mask, scale=scale,
                                                          enable_gqa=True)[0].transpose(0, 1)
    return out


def _pages(g, S: int, L: int, page: int) -> torch.Tensor:
    """L slots as a page table would give them: runs of `page` consecutive slots, pages in scattered order."""
    pages = torch.randperm(S // page, generator=g)[: -(-L // page)]
    return (pages[:, None] * page + torch.arange(page)[None, :]).reshape(-1)[:L]


# (context length, q_len) per span; with CHUNK=64, Q_BLOCK=48 below
SPAN_SHAPES = [
    [(37, 37)],  # empty history: a whole odd-length prompt, one chunk
    [(300, 300)],  # empty history over several chunks and query blocks
    [(200, 1)],  # one-token span over a long history
    [(1, 1)],  # the very first token
    [(64 + 9, 9)],  # history exactly one chunk: the span starts on a chunk edge
    [(130, 5), (97, 60)],  # spans that straddle chunk edges, two in one call
    [(255, 129), (64, 64), (65, 1)],  # a span over three query blocks; exact-chunk whole prompt
]


@pytest.mark.parametrize("H,Hkv,D", [(9, 3, 64), (14, 2, 64), (4, 4, 32), (6, 2, 40)])
@pytest.mark.parametrize("shape", SPAN_SHAPES)
@pytest.mark.parametrize("page", [1, 16])
def test_matches_fp32_reference(monkeypatch, H, Hkv, D, shape, page):
    monkeypatch.setattr(span_matmul, "CHUNK", 64)
    monkeypatch.setattr(span_matmul, "Q_BLOCK", 48)  # <= CHUNK, as the module requires
    g = torch.Generator().manual_seed(H * D + len(shape) + page)
    S = 1024
    kc = torch.randn(S, Hkv, D, generator=g).to(torch.bfloat16)
    vc = torch.randn(S, Hkv, D, generator=g).to(torch.bfloat16)
    spans, q0 = [], 0
    for L, n in shape:
        spans.append((q0, n, _pages(g, S, L, page)))
        q0 += n
    T = q0 + 3  # rows that belong to no span stay untouched
    q = torch.randn(T, H, D, generator=g).to(torch.bfloat16).float()  # a bf16 model's queries, in fp32
    out = torch.full((T, H, D), float("nan"))
    span_matmul.attend_spans(q, kc, vc, tuple(spans), D**-0.5, out)
    ref = _reference(q, kc, vc, spans, D**-0.5)
    assert torch.isnan(out[q0:]).all()
    assert torch.allclose(out[:q0], ref[:q0], atol=5e-3, rtol=1e-2), (out[:q0] - ref[:q0]).abs().max()


def test_default_chunks_match_the_reference():
    """The shipped CHUNK / Q_BLOCK: a verify-sized span over history that crosses two chunk edges."""
    g = torch.Generator().manual_seed(5)
    H, Hkv, D, S = 9, 3, 64, 4096
    kc = torch.randn(S, Hkv, D, generator=g).to(torch.bfloat16)
    vc = torch.randn(S, Hkv, D, generator=g).to(torch.bfloat16)
    spans = ((0, 300, torch.randperm(S, generator=g)[: 2 * span_matmul.CHUNK + 100]),)
    q = torch.randn(300, H, D, generator=g).to(torch.bfloat16).float()
    out = torch.empty(q.shape)
    span_matmul.attend_spans(q, kc, vc, spans, D**-0.5, out)
    ref = _reference(q, kc, vc, spans, D**-0.5)
    assert torch.allclose(out, ref, atol=5e-3, rtol=1e-2), (out - ref).abs().max()


def _backend(span_matmul_on: bool) -> NativeCpuBackend:
    return NativeCpuBackend(9, 3, short=True, tiled=True, tiled_min_rows=TILED_MIN_ROWS, pairs=True, p_bf16=True,
                            bf16_dot=True, span_path="matmul" if span_matmul_on else "kernel")


def test_backend_routes_long_spans_to_matmul():
    q_lens = [1, 5, 6, SPAN_MATMUL_MIN_Q - 1, SPAN_MATMUL_MIN_Q, 200]
    spans, q0, base = [], 0, 0
    for n in q_lens:
        spans.append(SeqSpan(q0, n, torch.arange(base, base + 40 + n)))
        q0, base = q0 + n, base + 40 + n
    sm = torch.arange(q0)
    meta = _backend(True).prepare(spans, sm)
    assert meta.short.seqs[:, 1].tolist() == [1, 5] and meta.tiled.seqs[:, 1].tolist() == [6, SPAN_MATMUL_MIN_Q - 1]
    assert [(a, n) for a, n, _ in meta.matmul] == [(q0 - 200 - SPAN_MATMUL_MIN_Q, SPAN_MATMUL_MIN_Q), (q0 - 200, 200)]
    assert torch.equal(meta.matmul[1][2], spans[-1].kv_slots)
    off = _backend(False).prepare(spans, sm)
    assert off.matmul == () and off.tiled.seqs[:, 1].tolist() == [6, SPAN_MATMUL_MIN_Q - 1, SPAN_MATMUL_MIN_Q, 200]
    with pytest.raises(AssertionError):
        NativeCpuBackend(9, 3, short=True, tiled=False, tiled_min_rows=0, pairs=True, p_bf16=True, bf16_dot=False,
                         span_path="matmul")


def forward_each(backends, shapes, seed: int, S: int) -> tuple[list, list]:
    """One mixed step, (context length, q_len) per span on scattered slots of an S-slot pool, run by each backend on
    its own copy of the pool: each output within bf16 tolerance of the fp32 reference, K/V written to their slots.
    Returns the outputs and each backend's metadata."""
    g = torch.Generator().manual_seed(seed)
    H, Hkv, D = 9, 3, 64
    kc = torch.randn(S, Hkv, D, generator=g).to(torch.bfloat16)
    vc = torch.randn(S, Hkv, D, generator=g).to(torch.bfloat16)
    perm, spans, write, q0, off = torch.randperm(S, generator=g), [], [], 0, 0
    for L, n in shapes:
        sl = perm[off : off + L]
        spans.append(SeqSpan(q0, n, sl))
        write.append(sl[L - n :])
        q0, off = q0 + n, off + L
    sm = torch.cat(write)
    q = torch.randn(q0, H, D, generator=g).to(torch.bfloat16)
    k = torch.randn(q0, Hkv, D, generator=g).to(torch.bfloat16)
    v = torch.randn(q0, Hkv, D, generator=g).to(torch.bfloat16)
    outs, metas = [], []
    for b in backends:
        kc2, vc2 = kc.clone(), vc.clone()
        metas.append(b.prepare(spans, sm))
        outs.append(b.forward(q.float(), k, v, kc2, vc2, metas[-1], D**-0.5))
        assert torch.equal(kc2[sm], k) and torch.equal(vc2[sm], v)
    ref = _reference(q, kc2, vc2, [(s.q_start, s.q_len, s.kv_slots) for s in spans], D**-0.5)
    for out in outs:
        assert out.dtype == torch.bfloat16
        assert torch.allclose(out.float(), ref, atol=5e-3, rtol=1e-2), (out.float() - ref).abs().max()
    return outs, metas


@needs_tiled
def test_backend_forward_agrees_with_and_without_matmul():
    """A mixed step (decode, short verify, prefill chunk over history, whole prompt) both ways (`forward_each`)."""
    outs, metas = forward_each([_backend(False), _backend(True)], [(1500, 1), (900, 4), (2500, 200), (77, 77)], 7,
                               6000)
    assert [len(m.matmul) for m in metas] == [0, 2]
    # the spans left to the kernels come out the same either way
    assert torch.equal(outs[0][:5], outs[1][:5])


def test_probe_override_and_cache(monkeypatch):
    calls = []
    monkeypatch.setattr(span_probe, "_CHOICE", {})
    monkeypatch.setattr(span_probe, "measure", lambda *a: calls.append(a) or {"kernel": 10.0, "matmul": 5.0})
    monkeypatch.setenv("DELTASERVE_SPAN_ATTN", "kernel")
    assert span_probe.span_path(9, 3, 64, True) == "kernel"
    if span_matmul.available():
        monkeypatch.setenv("DELTASERVE_SPAN_ATTN", "matmul")
        assert span_probe.span_path(9, 3, 64, True) == "matmul"
    assert calls == []  # fixed answers measure nothing
    monkeypatch.setenv("DELTASERVE_SPAN_ATTN", "auto")
    assert span_probe.span_path(9, 3, 64, True) == "matmul" and span_probe.span_path(9, 3, 64, True) == "matmul"
    assert calls == [(9, 3, 64, True)]  # once per head shape and product form
    # within the margin the tiled kernel stays; otherwise the fastest path wins
    monkeypatch.setattr(span_probe, "measure", lambda *a: calls.append(a) or {"kernel": 10.0, "matmul": 9.5})
    assert span_probe.span_path(14, 2, 64, True) == "kernel"
    assert len(calls) == 2
    assert span_probe.pick({"kernel": 10.0, "matmul": 5.0, "amx": 2.0}) == "amx"
    assert span_probe.pick({"kernel": 10.0, "matmul": 5.0, "amx": 6.0}) == "matmul"


def test_probe_forced_path_not_built_is_measured(monkeypatch):
    """DELTASERVE_SPAN_ATTN=amx on a CPU without AMX (or a head_dim it does not take) measures instead."""
    monkeypatch.setattr(span_probe, "_CHOICE", {})
    monkeypatch.setattr(span_probe, "measure", lambda *a: {"kernel": 10.0})
    monkeypatch.setattr(native, "supports_amx", lambda *a: False)
    monkeypatch.setenv("DELTASERVE_SPAN_ATTN", "amx")
    assert span_probe.span_path(9, 3, 64, True) == "kernel"


@needs_tiled
def test_probe_measures_each_path():
    ms = span_probe.measure(9, 3, 64, True, reps=1)
    assert "kernel" in ms and ("matmul" in ms) == span_matmul.available()
    assert ("amx" in ms) == native.supports_amx(torch.device("cpu"), torch.bfloat16, 64)
    assert all(0 < v < 10_000 for v in ms.values())


@needs_tiled
@pytest.mark.parametrize("choice", ["matmul", "kernel"])
def test_selector_asks_the_probe_for_bf16_caches_only(monkeypatch, choice):
    monkeypatch.setenv("DELTASERVE_SPAN_ATTN", choice)
    assert select_backend("cpu", torch.bfloat16, 64, 9, 3).span_path == choice
    assert select_backend("cpu", torch.float32, 64, 9, 3).span_path == "kernel"  # fp32 models keep fp32 products
    assert select_backend("cpu", torch.bfloat16, 64, 9, 3, tiled=False).span_path == "kernel"


def stateful_equals_stateless(smollm_dir, span_path: str, **cfg) -> None:
    """bf16 SmolLM2 with DELTASERVE_SPAN_ATTN=span_path already set: 5 turns of one session (turn deltas of 32-60
    tokens: each a span over the session's history) give the tokens a stateless recompute gives. cfg: more engine
    settings (kv_cache_dtype)."""
    from conftest import load_engine
    from deltaserve.engine.kv_manager import CacheMode
    from deltaserve.engine.sampling import SamplingParams

    engines = {m: load_engine(smollm_dir, cache_mode=m, speculation=False, dtype=torch.bfloat16, **cfg)
               for m in (CacheMode.STATEFUL, CacheMode.STATELESS)}
    assert all(e.model.attn.span_path == span_path for e in engines.values())
    tok = engines[CacheMode.STATEFUL].tokenizer
    words = "tool result status ok error file line value name id city price total count list next done".split()
    outs = {}
    for mode, eng in engines.items():
        rng = random.Random(9)
        eng.open_session("s")
        history = tok.apply_chat([{"role": "system", "content": "You are a tool-using agent."}],
                                 add_generation_prompt=False)
        got = []
        for _ in range(5):
            delta = tok.encode(" " + " ".join(rng.choice(words) for _ in range(60)))[: rng.randint(32, 60)]
            seq = eng.add_request(history + delta, SamplingParams(max_tokens=6), session_id="s")
            eng.run_until_done([seq])
            got.append(seq.output_ids)
            history = history + delta + seq.output_ids
        outs[mode] = got
    assert outs[CacheMode.STATEFUL] == outs[CacheMode.STATELESS]


@needs_tiled
def test_engine_stateful_equals_stateless_with_matmul_spans(monkeypatch, smollm_dir):
    """bf16 SmolLM2 with every span of 32+ tokens forced onto the matmul path (`stateful_equals_stateless`)."""
    monkeypatch.setenv("DELTASERVE_SPAN_ATTN", "matmul")
    calls = []
    run = span_matmul.attend_spans
    monkeypatch.setattr(span_matmul, "attend_spans", lambda *a: calls.append(len(a[3])) or run(*a))
    stateful_equals_stateless(smollm_dir, "matmul")
    assert len(calls) >= 2 * 5 * 30  # every turn's prefill, in each of the 30 layers, in both modes
