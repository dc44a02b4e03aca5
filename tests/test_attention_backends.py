"""layers/attention: which backend `select_backend` builds, how each routes spans, and that they agree.

Routing and selection run without the native kernels (availability and the CPU probe are monkeypatched);
the numeric comparisons need them built.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from deltaserve.kernels import cpu_probe
from deltaserve.kernels import paged_attention as native
from deltaserve.kv.quant import resolve
from deltaserve.layers.attention import (
    NativeCpuBackend,
    SdpaBackend,
    SeqSpan,
    select_backend,
)
from deltaserve.layers.attention.native import (
    TILED_MIN_ROWS,
    TILED_MIN_ROWS_FP32,
    TILED_MIN_ROWS_PAIRS,
)
from deltaserve.layers.attention.sdpa import SHORT_QUERY


def _spans(q_lens: list[int], ctx: int = 40) -> tuple[list[SeqSpan], torch.Tensor]:
    """Spans of `ctx` context tokens before their q_len new ones, on disjoint slots; and the step's slot_mapping."""
    spans, write, q0, base = [], [], 0, 0
    for n in q_lens:
        slots = torch.arange(base, base + ctx + n)
        spans.append(SeqSpan(q0, n, slots))
        write.append(slots[ctx:])
        q0, base = q0 + n, base + ctx + n
    return spans, torch.cat(write)


def _native(H: int, Hkv: int, short: bool = True, tiled: bool = True, min_rows: int = TILED_MIN_ROWS):
    return NativeCpuBackend(H, Hkv, short=short, tiled=tiled, tiled_min_rows=min_rows, pairs=True, p_bf16=True,
                            bf16_dot=True)


def _routed(meta) -> dict[str, list[int]]:
    """q_len of the spans each route got, in batch order."""
    q_lens = lambda ks: [] if ks is None else ks.seqs[:, 1].tolist()  # noqa: E731
    return {"short": q_lens(meta.short), "tiled": q_lens(meta.tiled), "sdpa": [s.q_len for s in meta.long]}


@pytest.mark.parametrize("H,Hkv,min_rows,q_lens,want", [
    # GQA group 3 (SmolLM2): q_len x 3 < 16 rows -> short kernel, i.e. up to 5 tokens (15 rows)
    (9, 3, 16, [1, 5, 6, 16, 17, 40], {"short": [1, 5], "tiled": [6, 16, 17, 40], "sdpa": []}),
    # no GQA and an fp32 cache (or slow bf16 pairs): from 12 rows
    (4, 4, 12, [1, 11, 12, 16], {"short": [1, 11], "tiled": [12, 16], "sdpa": []}),
    # group 7 (Qwen2.5-0.5B): 2 tokens are 14 rows, 3 are 21
    (14, 2, 16, [3, 1, 2], {"short": [1, 2], "tiled": [3], "sdpa": []}),
])
def test_native_routes_by_query_rows(H, Hkv, min_rows, q_lens, want):
    spans, sm = _spans(q_lens)
    meta = _native(H, Hkv, min_rows=min_rows).prepare(spans, sm)
    assert _routed(meta) == want
    assert meta.slot_mapping is sm


def test_native_without_tiled_kernel_routes_by_query_tokens():
    """Short kernel up to SHORT_QUERY tokens whatever the GQA group, SDPA one sequence at a time beyond."""
    spans, sm = _spans([1, 5, SHORT_QUERY, SHORT_QUERY + 1, 300])
    for H, Hkv in ((9, 3), (4, 4), (14, 2)):
        meta = _native(H, Hkv, tiled=False).prepare(spans, sm)
        assert _routed(meta) == {"short": [1, 5, SHORT_QUERY], "tiled": [], "sdpa": [SHORT_QUERY + 1, 300]}
        assert [m.shape for m in (s.mask for s in meta.long)] == [(17, 57), (300, 340)]  # context before the queries


def test_native_without_short_kernel_tiles_everything():
    spans, sm = _spans([1, 5, 17])
    meta = _native(9, 3, short=False, min_rows=0).prepare(spans, sm)
    assert _routed(meta) == {"short": [], "tiled": [1, 5, 17], "sdpa": []}


def test_kernel_layout_concatenates_slot_lists():
    spans, sm = _spans([1, 3], ctx=4)
    meta = _native(4, 4, min_rows=2).prepare(spans, sm)
    assert meta.short.seqs.tolist() == [[0, 1, 0, 5]] and meta.short.slots.tolist() == [0, 1, 2, 3, 4]
    assert meta.tiled.seqs.tolist() == [[1, 3, 0, 7]] and meta.tiled.slots.tolist() == list(range(5, 12))


def test_sdpa_routes_by_query_tokens():
    spans, sm = _spans([1, SHORT_QUERY, SHORT_QUERY + 1, 60], ctx=0)
    meta = SdpaBackend("cpu", 9, 3).prepare(spans, sm)
    assert (meta.batch.B, meta.batch.Lq) == (2, SHORT_QUERY) and meta.batch.gather.shape == (2, SHORT_QUERY)
    assert not meta.batch.identity_q and meta.batch.mask.shape == (2, 1, SHORT_QUERY, SHORT_QUERY)
    assert [(s.q_len, s.mask) for s in meta.long] == [(SHORT_QUERY + 1, None), (60, None)]  # whole prompts: causal
    # a pure decode step over equal contexts: queries are views, no mask
    spans, sm = _spans([1, 1, 1])
    meta = SdpaBackend("cpu", 9, 3).prepare(spans, sm)
    assert meta.batch.identity_q and meta.batch.mask is None and meta.long == ()


class _Probe:
    """Stands in for the kernels' availability and the CPU probe; counts probe questions."""

    def __init__(self, monkeypatch, short=True, tiled=True, speed=2.0, fast=True):
        self.asked = 0
        monkeypatch.setattr(native, "available", lambda: short)
        monkeypatch.setattr(native, "tiled_available", lambda: tiled)
        monkeypatch.setattr(cpu_probe, "bf16_dot_speed", self._count(lambda: speed))
        monkeypatch.setattr(cpu_probe, "bf16_dot_fast", self._count(lambda: fast))
        monkeypatch.setenv("DELTASERVE_SPAN_ATTN", "kernel")  # the span probe's answer (`test_span_attention.py`)

    def _count(self, f):
        def g():
            self.asked += 1
            return f()
        return g


# (device, kv dtype, head_dim, short built, tiled built, probe speed, probe fast) ->
#   None (SDPA) or (short, tiled, tiled_min_rows, pairs, bf16_dot)
SELECTIONS = [
    ("cpu", torch.bfloat16, 64, True, True, 2.0, True, (True, True, TILED_MIN_ROWS_PAIRS, True, True)),  # Zen 4
    ("cpu", torch.bfloat16, 64, True, True, 0.5, False, (True, True, TILED_MIN_ROWS_FP32, True, False)),  # slow pairs
    ("cpu", torch.bfloat16, 64, True, True, 0.0, False, (True, True, TILED_MIN_ROWS, True, False)),  # no AVX512-BF16
    ("cpu", torch.float32, 64, True, True, 2.0, True, (True, True, TILED_MIN_ROWS_FP32, False, True)),
    ("cpu", torch.bfloat16, 42, True, True, 2.0, True, (True, False, 0, True, False)),  # head_dim % 4: no tiled
    ("cpu", torch.bfloat16, 64, True, False, 2.0, True, (True, False, 0, True, False)),  # no AVX2 + FMA
    ("cpu", torch.bfloat16, 64, False, True, 2.0, True, (False, True, 0, True, True)),
    ("cpu", torch.bfloat16, 64, False, False, 2.0, True, None),  # no compiler, DELTASERVE_NATIVE=off
    ("cpu", torch.float16, 64, True, True, 2.0, True, None),
    ("cuda", torch.bfloat16, 64, True, True, 2.0, True, None),
]


@pytest.mark.parametrize("device,dtype,D,short,tiled,speed,fast,want", SELECTIONS)
def test_select_backend(monkeypatch, device, dtype, D, short, tiled, speed, fast, want):
    _Probe(monkeypatch, short, tiled, speed, fast)
    b = select_backend(device, dtype, D, 9, 3)
    if want is None:
        assert isinstance(b, SdpaBackend) and not b.fp32_q and b.device == torch.device(device)
        return
    assert isinstance(b, NativeCpuBackend) and b.fp32_q
    assert (b.short, b.tiled, b.tiled_min_rows, b.pairs, b.bf16_dot) == want
    assert b.p_bf16 == (dtype == torch.bfloat16)


@pytest.mark.parametrize("dtype,kv,want_rows,want_pairs", [
    (torch.bfloat16, "int8", TILED_MIN_ROWS_PAIRS, True),  # integer products in the short kernel
    (torch.bfloat16, "fp8", TILED_MIN_ROWS_PAIRS, True),  # bf16 pairs
    (torch.float32, "int8", TILED_MIN_ROWS_FP32, False),  # an fp32 model's q stays fp32: fp32 products
])
def test_select_backend_on_a_quantized_cache(monkeypatch, dtype, kv, want_rows, want_pairs):
    _Probe(monkeypatch, speed=2.0, fast=True)
    b = select_backend("cpu", dtype, 64, 9, 3, kv_format=resolve(kv, dtype))
    assert isinstance(b, NativeCpuBackend) and (b.tiled_min_rows, b.pairs) == (want_rows, want_pairs)


def test_select_backend_leaves_kernels_out_on_request(monkeypatch):
    _Probe(monkeypatch)
    b = select_backend("cpu", torch.bfloat16, 64, 9, 3, tiled=False)
    assert isinstance(b, NativeCpuBackend) and (b.short, b.tiled) == (True, False)
    b = select_backend("cpu", torch.bfloat16, 64, 9, 3, short=False)
    assert isinstance(b, NativeCpuBackend) and (b.short, b.tiled, b.tiled_min_rows) == (False, True, 0)
    assert isinstance(select_backend("cpu", torch.bfloat16, 64, 9, 3, short=False, tiled=False), SdpaBackend)


def test_backend_keeps_its_probe_answer(monkeypatch):
    """The probe is asked at build only: a later answer (or DELTASERVE_BF16_DOT) changes neither the split nor
    the tiled kernel's product form of a built backend."""
    probe = _Probe(monkeypatch, speed=0.5, fast=False)
    b = select_backend("cpu", torch.bfloat16, 64, 9, 3)
    assert (b.tiled_min_rows, b.bf16_dot) == (TILED_MIN_ROWS_FP32, False) and probe.asked > 0
    later = _Probe(monkeypatch, speed=2.0, fast=True)
    monkeypatch.setenv("DELTASERVE_BF16_DOT", "on")
    calls = []
    monkeypatch.setattr(native, "paged_attention_short", lambda *a, **kw: calls.append(("short", kw)))
    monkeypatch.setattr(native, "paged_attention_tiled", lambda *a, **kw: calls.append(("tiled", kw)))
    spans, sm = _spans([1, 4, 5])  # 12 rows: tiled from the Xeon split, short on Zen 4's
    meta = b.prepare(spans, sm)
    assert _routed(meta) == {"short": [1], "tiled": [4, 5], "sdpa": []}
    T = 10
    cache = torch.zeros(200, 3, 64, dtype=torch.bfloat16)
    kv = torch.zeros(T, 3, 64, dtype=torch.bfloat16)
    for _ in range(2):  # two layers
        b.forward(torch.zeros(T, 9, 64), kv, kv, cache, cache.clone(), meta, 0.125)
    assert calls == [("short", {"pairs": True}), ("tiled", {"p_bf16": True, "bf16_dot": False})] * 2
    assert later.asked == 0  # neither prepare nor forward asks the probe


needs_kernels = pytest.mark.skipif(not native.available() or not native.tiled_available(),
                                   reason="native attention kernels not built here")
SHAPES = [[(100, 1), (37, 1), (64, 5), (80, 16), (50, 17), (90, 90), (200, 40)], [(300, 1)] * 3, [(20, 20)]]


def _step(H, Hkv, D, dtype, shape, seed):
    """A step's q, k, v and a pool with random contents; shape: (context length, q_len) per span."""
    g = torch.Generator().manual_seed(seed)
    S = 2000
    kc = torch.randn(S, Hkv, D, generator=g).to(dtype)
    vc = torch.randn(S, Hkv, D, generator=g).to(dtype)
    perm, spans, write, q0, off = torch.randperm(S, generator=g), [], [], 0, 0
    for L, n in shape:  # slots at random: backends must follow the slot lists
        sl = perm[off : off + L]
        spans.append(SeqSpan(q0, n, sl))
        write.append(sl[L - n :])
        q0, off = q0 + n, off + L
    q = torch.randn(q0, H, D, generator=g).to(dtype)
    k = torch.randn(q0, Hkv, D, generator=g).to(dtype)
    v = torch.randn(q0, Hkv, D, generator=g).to(dtype)
    return spans, torch.cat(write), q, k, v, kc, vc


def _run(b, spans, sm, q, k, v, kc, vc):
    kc, vc = kc.clone(), vc.clone()
    out = b.forward(q.float() if b.fp32_q else q, k, v, kc, vc, b.prepare(spans, sm), q.shape[-1] ** -0.5)
    assert torch.equal(kc[sm], k) and torch.equal(vc[sm], v)  # the step's K/V written to their slots
    return out


@needs_kernels
@pytest.mark.parametrize("kernels", ["short+tiled", "short+sdpa", "tiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H,Hkv,D", [(9, 3, 64), (14, 2, 64), (4, 4, 32), (6, 2, 40)])
@pytest.mark.parametrize("shape", SHAPES)
def test_native_agrees_with_sdpa(kernels, dtype, H, Hkv, D, shape):
    spans, sm, q, k, v, kc, vc = _step(H, Hkv, D, dtype, shape, seed=H * D + len(shape))
    b = select_backend("cpu", dtype, D, H, Hkv, short=kernels != "tiled", tiled=kernels != "short+sdpa")
    assert isinstance(b, NativeCpuBackend)
    ref_b = SdpaBackend("cpu", H, Hkv)
    out = _run(b, spans, sm, q, k, v, kc, vc)
    assert out.dtype == dtype
    if dtype == torch.float32:
        ref = _run(ref_b, spans, sm, q, k, v, kc, vc)
        assert torch.allclose(out, ref, atol=2e-6, rtol=1e-5), (out - ref).abs().max()
    else:
        # against SDPA in fp32 on the same bf16 values; pair products and bf16 outputs: ~2^-9 relative
        ref = _run(ref_b, spans, sm, q.float(), k.float(), v.float(), kc.float(), vc.float())
        assert torch.allclose(out.float(), ref, atol=5e-3, rtol=1e-2), (out.float() - ref).abs().max()
        # and the bf16 SDPA backend itself within the same bound of it
        sdpa = _run(ref_b, spans, sm, q, k, v, kc, vc)
        assert torch.allclose(sdpa.float(), ref, atol=5e-3, rtol=1e-2), (sdpa.float() - ref).abs().max()
    if kernels == "short+sdpa":
        # long spans run the same SDPA code either way: q in fp32 holding bf16 values is what SDPA upcasts to
        sdpa = _run(ref_b, spans, sm, q, k, v, kc, vc)
        for s in spans:
            if s.q_len > SHORT_QUERY:
                rows = slice(s.q_start, s.q_start + s.q_len)
                assert torch.equal(out[rows], sdpa[rows])


@needs_kernels
def test_min_rows_variant_moves_spans_not_results():
    """A copy with another split (`scripts/step_times.py --ab min-rows`) routes differently, same numbers within
    the kernels' fp32 tolerance."""
    spans, sm, q, k, v, kc, vc = _step(9, 3, 64, torch.float32, SHAPES[0], seed=1)
    b = select_backend("cpu", torch.float32, 64, 9, 3)
    b2 = dataclasses.replace(b, tiled_min_rows=64)
    assert _routed(b2.prepare(spans, sm))["tiled"] == [90, 40] != _routed(b.prepare(spans, sm))["tiled"]
    out, out2 = _run(b, spans, sm, q, k, v, kc, vc), _run(b2, spans, sm, q, k, v, kc, vc)
    assert torch.allclose(out, out2, atol=2e-6, rtol=1e-5)
