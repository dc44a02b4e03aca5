"""kernels/amx_short_int8.c: decode and verify spans of an int8 cache on AMX-INT8 tiles, against float64 attention
over the rows `kv.quant.dequantize_rows` reads back, at the short kernel's integer-path tolerance (q in int16 steps of
its row's largest value, P x v_scale in 16-bit steps: `test_kv_quant_kernels.py`).

Shapes cross the kernel's edges: 128-key chunks and 64-key P tiles (contexts of 63/64/65/127/128/129 and more),
16-key K tiles read straight from the pool where their slots run (page 16) and copied where they do not (page 1;
page 5 mixes both), rows a sequence from 1 to 64, decodes whose kv heads share the softmax lanes (GQA groups of 1 to
8: 16 / R heads a column tile) and wider spans one head a tile, a sequence's keys split into parts and merged, empty
spans, V scales six orders of magnitude apart. The kernel tests skip where the CPU has no AMX; the selector's and the
backend's routing tests run everywhere.
"""

from __future__ import annotations

import pytest
import torch

from deltaserve.kernels import paged_attention as native
from deltaserve.kv.quant import FORMATS, dequantize_rows, quantize_rows
from deltaserve.layers.attention import NativeCpuBackend, SeqSpan, select_backend
from deltaserve.layers.attention.native import TILED_MIN_ROWS_AMX
from test_kv_quant_kernels import _every_byte_rows, _reference
from test_span_attention import _pages

INT8 = FORMATS["int8"]
needs_amx_int8 = pytest.mark.skipif(not native.supports_amx_short_int8(64, 3),
                                    reason="no AMX here (Intel Xeon 4th gen or newer, with the tile state granted)")

# (context length, q_len) per span, several spans to a call
SHAPES = [
    [(1, 1)],  # the very first token
    [(63, 1), (64, 1), (65, 1), (127, 1), (128, 1), (129, 1)],  # decodes around the P tile's and the chunk's edges
    [(300, 5), (17, 3), (40, 0)],  # a verify over a history that crosses a chunk edge; a short one; an empty span
    [(5000, 1)],  # one sequence's decode: too few items, its keys split into parts and merged
    [(4000, 9), (3000, 2), (2600, 4), (700, 1)],  # a verify step of four agents
    [(1100, 7), (7, 7)],  # a whole 7-token prompt (every key masked for some rows, in one chunk)
]
HEADS = [(9, 3, 64), (14, 2, 64), (8, 2, 128), (6, 1, 64), (16, 16, 64), (32, 4, 64)]  # (H, Hkv, D)
CASES = [(H, Hkv, D, shape) for H, Hkv, D in HEADS for shape in SHAPES
         if all(n * (H // Hkv) <= native.AMX_SHORT_MAX_ROWS for _, n in shape)]


def _case(g, H, Hkv, D, shape, page):
    S = 2 * sum(L for L, _ in shape) + 4 * page
    kc = quantize_rows(torch.randn(S, Hkv, D, generator=g), INT8)  # [S, Hkv, D + 4] uint8
    vc = quantize_rows(torch.randn(S, Hkv, D, generator=g) * torch.rand(S, Hkv, 1, generator=g) * 4, INT8)
    sl = _pages(g, S, sum(L for L, _ in shape), page)
    seqs, slots, q0, off = [], [], 0, 0
    for L, n in shape:
        seqs.append((q0, n, off, L))
        slots.append(sl[off : off + L])
        q0, off = q0 + n, off + L
    q = (2 * torch.randn(q0 + 3, H, D, generator=g)).to(torch.bfloat16).float()  # a bf16 model's; 3 rows in no span
    return q, kc, vc, sl, seqs, slots


def _check(q, kc, vc, sl, seqs, slots, D):
    out = torch.full_like(q, float("nan"))
    native.paged_attention_amx_short_int8(q, kc, vc, sl, torch.tensor(seqs, dtype=torch.int64), D**-0.5, out)
    n = sum(s[1] for s in seqs)
    ref = _reference(q, dequantize_rows(kc, INT8), dequantize_rows(vc, INT8), seqs, slots, D**-0.5)
    # the integer path's tolerance for V values of about 1, scaled to these (V rows' scales spread over 0-4)
    atol = 3e-4 * max(1.0, float(ref[:n].abs().max()))
    assert torch.allclose(out[:n], ref[:n], atol=atol, rtol=1e-3), (out[:n] - ref[:n]).abs().max()
    assert out[n:].isnan().all()  # rows of no listed span are untouched
    return out


@needs_amx_int8
@pytest.mark.parametrize("H,Hkv,D,shape", CASES)
@pytest.mark.parametrize("page", [1, 5, 16])
def test_matches_reference(H, Hkv, D, shape, page):
    g = torch.Generator().manual_seed(hash((H, Hkv, D, page, len(shape))) % 2**31)
    _check(*_case(g, H, Hkv, D, shape, page), D)


@needs_amx_int8
@pytest.mark.parametrize("H,Hkv,D", [(9, 3, 64), (14, 2, 64)])
def test_no_less_exact_than_the_short_kernels_integer_path(H, Hkv, D):
    """The kernel it replaces rounds q the same way and P x v_scale to 16-bit steps of the row's largest in its chunk;
    this one's steps follow a bound at most twice the lane's largest. Its mean error is no larger (seen: 1.4e-5
    against 2.3e-5 on these cases)."""
    g = torch.Generator().manual_seed(3)
    q, kc, vc, sl, seqs, slots = _case(g, H, Hkv, D, SHAPES[4], 16)
    ref = _reference(q, dequantize_rows(kc, INT8), dequantize_rows(vc, INT8), seqs, slots, D**-0.5)
    out = _check(q, kc, vc, sl, seqs, slots, D)
    short = torch.full_like(q, float("nan"))
    native.paged_attention_short(q, kc, vc, sl, torch.tensor(seqs), D**-0.5, short, pairs=True, kind=INT8.kind)
    n = sum(s[1] for s in seqs)
    assert (out - ref)[:n].abs().mean() <= (short - ref)[:n].abs().mean()


@needs_amx_int8
@pytest.mark.parametrize("key", [130, 1499])  # in the second chunk; the last key, in the last chunk
def test_a_late_key_far_above_the_running_max(key):
    """A lane keeps its softmax reference while no later chunk's score passes it by more than 2^8; key `key`'s score
    passes it by far, so the kernel must take the chunk's maximum and rescale the lane."""
    g = torch.Generator().manual_seed(key)
    q, kc, vc, sl, seqs, slots = _case(g, 9, 3, 64, [(1500, 3)], 16)
    kc[sl[key], 0] = quantize_rows(4 * q[2, 0].view(1, 1, 64), INT8)[0, 0]  # the last token's head 0: score ~ 128
    out = _check(q, kc, vc, sl, seqs, slots, 64)
    assert torch.allclose(out[2, 0], dequantize_rows(vc[sl[key], 0], INT8), atol=2e-2)  # it takes the row's weight


@needs_amx_int8
@pytest.mark.parametrize("H,Hkv,D", [(6, 2, 64), (4, 2, 128)])
def test_one_token_context_is_the_v_row(H, Hkv, D):
    """With one key the softmax weight is 1: the output is the dequantized V row, every byte value through the
    loads, with V scales six orders of magnitude apart in one chunk (each lane's P steps follow its own largest
    P x v_scale), within P's 16-bit step."""
    vc, vd = _every_byte_rows("int8", D, Hkv)
    n = vc.shape[0]
    kc = quantize_rows(torch.randn(n, Hkv, D), INT8)
    q = torch.randn(n, H, D)
    out = torch.full(q.shape, float("nan"))
    seqs = torch.tensor([[i, 1, i, 1] for i in range(n)])  # n sequences of one token, in one call
    native.paged_attention_amx_short_int8(q, kc, vc, torch.arange(n).flip(0), seqs, D**-0.5, out)
    want = vd.flip(0).repeat_interleave(H // Hkv, dim=1)  # [n, H, D]: sequence i reads slot n - 1 - i
    assert torch.allclose(out, want, atol=0, rtol=2**-15), (out - want).abs().max()


@needs_amx_int8
def test_rejects_what_it_does_not_take():
    g = torch.Generator().manual_seed(0)
    q, kc, vc, sl, seqs, _ = _case(g, 9, 3, 64, [(500, 22)], 1)  # 66 rows
    with pytest.raises(RuntimeError, match="at most 64 rows"):
        native.paged_attention_amx_short_int8(q, kc, vc, sl, torch.tensor(seqs), 0.125, torch.empty_like(q))
    q, kc, vc, sl, seqs, _ = _case(g, 6, 2, 32, [(50, 2)], 1)  # head_dim 32: not a multiple of 64
    with pytest.raises(RuntimeError, match="unsupported shape"):
        native.paged_attention_amx_short_int8(q, kc, vc, sl, torch.tensor(seqs), 32**-0.5, torch.empty_like(q))
    with pytest.raises(AssertionError, match="int8 rows"):
        native.paged_attention_amx_short_int8(q, kc.float(), vc.float(), sl, torch.tensor(seqs), 1.0, q.clone())
    assert not native.supports_amx_short_int8(32, 2) and not native.supports_amx_short_int8(64, 65)


def _backend(amx_short: bool, fmt=INT8) -> NativeCpuBackend:
    return NativeCpuBackend(9, 3, short=True, tiled=True, tiled_min_rows=TILED_MIN_ROWS_AMX, pairs=True,
                            p_bf16=False, bf16_dot=True, kv_format=fmt, amx_short=amx_short)


@pytest.mark.parametrize("name", ["int8", "fp8_e4m3"])
def test_backend_forward_agrees_without_amx_short(name):
    """A decode and verify step of five agents over an int8 pool with and without the kernel (the short kernel's
    integer path), and over an fp8 pool with and without amx_short.c's fp8 rows (the short kernel's pairs): each
    within the bf16 output's tolerance of the reference, K/V stored alike."""
    if not (native.supports_amx_short_int8(64, 3) if name == "int8" else native.amx_short_available()):
        pytest.skip("no AMX here (Intel Xeon 4th gen or newer, with the tile state granted)")
    fmt = FORMATS[name]
    g = torch.Generator().manual_seed(5)
    S, H, Hkv, D = 9000, 9, 3, 64
    kc = quantize_rows(torch.randn(S, Hkv, D, generator=g), fmt)
    vc = quantize_rows(torch.randn(S, Hkv, D, generator=g), fmt)
    perm, spans, write, q0, off = torch.randperm(S, generator=g), [], [], 0, 0
    for L, n in [(1500, 1), (900, 2), (3000, 9), (2600, 21), (77, 5)]:
        spans.append(SeqSpan(q0, n, perm[off : off + L]))
        write.append(perm[off + L - n : off + L])
        q0, off = q0 + n, off + L
    q = torch.randn(q0, H, D, generator=g).to(torch.bfloat16)
    k = torch.randn(q0, Hkv, D, generator=g).to(torch.bfloat16)
    v = torch.randn(q0, Hkv, D, generator=g).to(torch.bfloat16)
    outs = []
    for b in (_backend(False, fmt), _backend(True, fmt)):
        kc2, vc2 = kc.clone(), vc.clone()
        meta = b.prepare(spans, torch.cat(write))
        assert (meta.amx_short is not None) == b.amx_short and (meta.short is None) == b.amx_short
        outs.append(b.forward(q.float(), k, v, kc2, vc2, meta, D**-0.5).float())
    ref = _reference(q.float(), dequantize_rows(kc2, fmt), dequantize_rows(vc2, fmt),
                     [(s.q_start, s.q_len, 0, len(s.kv_slots)) for s in spans], [s.kv_slots for s in spans], D**-0.5)
    for out in outs:
        assert torch.allclose(out, ref, atol=5e-3, rtol=1e-2), (out - ref).abs().max()  # bf16 output rounding
    assert (outs[0] - outs[1]).abs().max() < 1e-2


def test_selector_takes_it_for_a_bf16_models_int8_cache(monkeypatch):
    """Runs everywhere: where the kernel builds a bf16 model's int8 cache gets it (and an fp8 one the AMX short
    kernel's fp8 rows, where AMX runs); fp32 models (fp32 products), batch-invariant mode (every span in the tiled
    kernel) and DELTASERVE_AMX_SHORT=off do not. And a bf16 model's quantized rows take long spans on the AMX span
    kernel where it runs, unless DELTASERVE_SPAN_ATTN fixes another path."""
    def amx_short(dtype, name, D=64):
        return select_backend("cpu", dtype, D, 9, 3, kv_format=FORMATS[name]).amx_short

    here = native.supports_amx_short_int8(64, 3)
    assert amx_short(torch.bfloat16, "int8") is here
    assert not amx_short(torch.bfloat16, "int8", D=32)  # head_dim 32: the short kernel's integer path
    assert amx_short(torch.bfloat16, "fp8_e4m3") is native.amx_short_available()
    assert not amx_short(torch.float32, "int8") and not amx_short(torch.float32, "fp8_e4m3")
    for name in ("int8", "fp8_e4m3"):
        assert not select_backend("cpu", torch.bfloat16, 64, 9, 3, kv_format=FORMATS[name],
                                  batch_invariant=True).amx_short
    amx_spans = native.supports_amx(torch.device("cpu"), torch.uint8, 64)
    for name in ("int8", "fp8_e4m3"):  # long spans of quantized rows: the AMX span kernel, unless fixed otherwise
        assert (select_backend("cpu", torch.bfloat16, 64, 9, 3, kv_format=FORMATS[name]).span_path == "amx") \
            is amx_spans
        monkeypatch.setenv("DELTASERVE_SPAN_ATTN", "kernel")
        assert select_backend("cpu", torch.bfloat16, 64, 9, 3, kv_format=FORMATS[name]).span_path == "kernel"
        monkeypatch.delenv("DELTASERVE_SPAN_ATTN")
    monkeypatch.setenv("DELTASERVE_AMX_SHORT", "off")
    assert not amx_short(torch.bfloat16, "int8") and not amx_short(torch.bfloat16, "fp8_e4m3")


def _decode_logprobs(model, attn, ids: list[int], prefix: int, fmt_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`ids[:prefix]` as one span, then each later token as a decode step (teacher-forced) through backend `attn`
    over a fresh pool of `fmt_name`: the log-prob of each true next token and each step's argmax."""
    from deltaserve.kv.pool import KVLayout, KVPool

    cfg = model.cfg
    pool = KVPool(KVLayout(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, model.dtype, fmt_name), len(ids) + 1)
    model.use_kv_format(pool.layout.fmt)
    model.attn = attn
    slots, tokens, lps, preds = torch.arange(len(ids)), torch.tensor(ids), [], []
    with torch.inference_mode():
        model.logits(model(tokens[:prefix], slots[:prefix], pool, attn.prepare([SeqSpan(0, prefix, slots[:prefix])],
                                                                                  slots[:prefix])))
        for e in range(prefix + 1, len(ids)):
            meta = attn.prepare([SeqSpan(0, 1, slots[:e])], slots[e - 1 : e])
            assert (meta.amx_short is not None) == attn.amx_short
            logits = model.logits(model(tokens[e - 1 : e], slots[e - 1 : e], pool, meta))[-1].float()
            lps.append(torch.log_softmax(logits, -1)[ids[e]])
            preds.append(int(logits.argmax()))
    return torch.stack(lps), torch.tensor(preds)


@needs_amx_int8
def test_decode_on_real_weights_is_as_close_as_the_short_kernels_integer_path(smollm_dir):
    """bf16 SmolLM2 over an int8 cache, 80 decode steps after a 400-token prefix, teacher-forced, against the same
    steps in the short kernel's fp32 products (the reference): with this kernel the log-probs of the true next tokens
    and the argmax are as close to it as with the short kernel's integer path, what a bf16 model's int8 decode took
    before. (A bf16 model's hidden states round every difference to bf16 steps: the two paths each differ from the
    reference by a mean |delta log-prob| of ~0.053 and agree on ~93% of argmaxes. Not bit for bit: a bf16 model's
    int8 sessions are exact only in batch-invariant mode, which takes neither, `test_kv_quant.py`.)"""
    import dataclasses

    from conftest import text_of_tokens
    from deltaserve.models.llama import LlamaModel
    from deltaserve.models.loader import load_config, load_state_dict
    from deltaserve.models.tokenizer import Tokenizer

    model = LlamaModel.from_state_dict(load_config(smollm_dir), load_state_dict(smollm_dir), torch.bfloat16, "cpu")
    ids = text_of_tokens(Tokenizer(smollm_dir), 480, seed=5)[:480]
    model.use_kv_format(INT8)
    on = model.attn
    assert on.amx_short
    lp_ref, pred_ref = _decode_logprobs(model, dataclasses.replace(on, amx_short=False, pairs=False), ids, 400, "int8")
    lp_amx, pred_amx = _decode_logprobs(model, on, ids, 400, "int8")
    lp_int, pred_int = _decode_logprobs(model, dataclasses.replace(on, amx_short=False), ids, 400, "int8")
    assert (lp_amx - lp_ref).abs().mean() < 1.2 * (lp_int - lp_ref).abs().mean() + 0.005
    assert (pred_amx == pred_ref).float().mean() >= (pred_int == pred_ref).float().mean() - 0.05
