"""Real weights vs HF transformers (loaded by transformers from the same GGUF), fp32.

This checks our GGUF dequantization, the Q/K un-permutation, the name mapping,
RoPE/RMSNorm/attention and batching/chunked prefill in one go.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import hf_greedy, load_engine, text_of_tokens
from deltaserve.engine.sampling import SamplingParams
from deltaserve.models.registry import model_path


NUM_PROMPTS = {"smollm2-135m": 20, "qwen2.5-coder-0.5b": 10}
MAX_LEN = {"smollm2-135m": 1500, "qwen2.5-coder-0.5b": 1000}


@pytest.fixture(scope="module", params=["smollm2-135m", "qwen2.5-coder-0.5b"])
def pair(request):
    from transformers import AutoModelForCausalLM

    name = request.param
    d = request.getfixturevalue("smollm_dir" if name.startswith("smollm") else "qwen_dir")
    g = model_path(name)
    ref = AutoModelForCausalLM.from_pretrained(str(g.parent), gguf_file=g.name, dtype=torch.float32).eval()
    eng = load_engine(d, speculation=False, max_batch_tokens=512, kv_cache_bytes=1 << 30)
    yield name, ref, eng
    del ref, eng


def test_logits_allclose(pair):
    """A 300-token prompt through PyTorch SDPA and through the engine's own backend (the native kernels where
    they build)."""
    name, ref, eng = pair
    tok = eng.tokenizer
    ids = text_of_tokens(tok, 300, seed=7)
    from deltaserve.layers.attention import SdpaBackend, SeqSpan

    with torch.inference_mode():
        want = ref(torch.tensor([ids])).logits[0].float()
    selected, cfg = eng.model.attn, eng.model.cfg
    dev = eng.model.device
    for attn in (SdpaBackend(dev, cfg.num_heads, cfg.num_kv_heads), selected):
        slots = eng.pool.allocator.allocate(len(ids))
        try:
            eng.model.attn = attn
            meta = attn.prepare([SeqSpan(0, len(ids), slots)], slots)
            got = eng.model.logits(eng.model(torch.tensor(ids, device=dev), torch.arange(len(ids), device=dev),
                                             eng.pool, meta)).cpu()
        finally:
            eng.model.attn = selected
            eng.pool.allocator.free(slots)
        torch.testing.assert_close(got, want, rtol=1e-3, atol=2e-3)
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.999


def test_greedy_matches_reference(pair):
    """20 prompts of 100-1,500 tokens, 64 new tokens each, all decoded together in one batch."""
    name, ref, eng = pair
    tok = eng.tokenizer
    n = NUM_PROMPTS[name]
    lens = [100 + (MAX_LEN[name] - 100) * i // (n - 1) for i in range(n)]
    prompts = [text_of_tokens(tok, L, seed=100 + i) for i, L in enumerate(lens)]
    outs = eng.generate(prompts, SamplingParams(max_tokens=64, ignore_eos=True))
    for p, o in zip(prompts, outs):
        assert len(o) == 64
        assert o == hf_greedy(ref, p, 64), f"prompt of {len(p)} tokens diverged"


def test_golden_cli_answer(smollm_dir):
    out = subprocess.run(
        [sys.executable, "-m", "deltaserve.cli", "generate", "--model", "smollm2-135m", "--chat", "--prompt",
         "What is the capital of France?", "--max-tokens", "16", "--temperature", "0", "--dtype", "float32"],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "The capital of France is Paris.\n"
