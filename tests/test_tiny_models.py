"""Our forward pass vs HF transformers on tiny random llama and qwen2 configs (fp32)."""

from __future__ import annotations

import pytest
import torch

from conftest import hf_greedy
from deltaserve.config import ModelConfig
from deltaserve.engine.engine import EngineConfig, LLMEngine
from deltaserve.engine.kv_manager import CacheMode
from deltaserve.engine.sampling import SamplingParams
from deltaserve.kv.pool import KVLayout, KVPool
from deltaserve.layers.attention import SdpaBackend, SeqSpan, select_backend
from deltaserve.models.llama import LlamaModel


def tiny_config(arch: str, tie: bool) -> ModelConfig:
    return ModelConfig(arch=arch, vocab_size=257, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4,
                       num_kv_heads=2, head_dim=16, rope_theta=10000.0 if arch == "llama" else 1e6, rms_norm_eps=1e-6,
                       max_position=512, tie_word_embeddings=tie, qkv_bias=arch == "qwen2")


def hf_model(cfg: ModelConfig, seed: int):
    import transformers

    torch.manual_seed(seed)
    hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf())
    m = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # random biases and norms too, so a mapping mistake cannot hide behind zeros/ones
        for name, p in m.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.5)
    return m


CASES = [("llama", True), ("llama", False), ("qwen2", False), ("qwen2", True)]


@pytest.mark.parametrize("backend", ["sdpa", "selected"])
@pytest.mark.parametrize("arch,tie", CASES)
def test_logits_match_hf(arch, tie, backend):
    """One 37-token prompt through PyTorch SDPA and through the backend selected here (the native kernels
    where they build)."""
    cfg = tiny_config(arch, tie)
    ref = hf_model(cfg, seed=1)
    ours = LlamaModel.from_state_dict(cfg, ref.state_dict(), torch.float32)
    if backend == "sdpa":
        ours.attn = SdpaBackend("cpu", cfg.num_heads, cfg.num_kv_heads)
    ids = torch.randint(0, cfg.vocab_size, (37,), generator=torch.Generator().manual_seed(2))
    kv = KVPool(KVLayout(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, torch.float32), 64)
    slots = kv.allocator.allocate(len(ids))
    meta = ours.attn.prepare([SeqSpan(0, len(ids), slots)], slots)
    got = ours.logits(ours(ids, torch.arange(len(ids)), kv, meta))
    with torch.no_grad():
        want = ref(ids[None]).logits[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("native", ["tiled", "short", "sdpa"],
                         ids=["tiled+short-attention", "short+sdpa-attention", "sdpa-attention"])
@pytest.mark.parametrize("chunk", [7, 64])
@pytest.mark.parametrize("arch,tie", CASES[:3])
def test_chunked_batched_greedy_matches_hf(arch, tie, native, chunk):
    """Several prompts, prefill chunked at `chunk` tokens a step, decoded in one batch: same tokens as HF.

    Every attention path: the native kernels (tiled for spans with many query rows, short-query for the
    rest, when they build here), the short-query kernel with SDPA for long spans, and SDPA alone."""
    cfg = tiny_config(arch, tie)
    ref = hf_model(cfg, seed=3)
    model = LlamaModel.from_state_dict(cfg, ref.state_dict(), torch.float32)
    eng = LLMEngine(model, None, EngineConfig(dtype=torch.float32, kv_cache_bytes=1 << 22, max_batch_tokens=chunk,
                                              cache_mode=CacheMode.STATEFUL, speculation=False, check_integrity=True))
    # each kernel where it builds here, as select_backend finds it; "sdpa" leaves both out
    model.attn = select_backend("cpu", torch.float32, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads,
                                short=native != "sdpa", tiled=native == "tiled")
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (5, 19, 33, 2)]
    outs = eng.generate(prompts, SamplingParams(max_tokens=12, ignore_eos=True))
    for p, o in zip(prompts, outs):
        assert o == hf_greedy(ref, p, 12)


def test_kv_bytes_per_token_is_exact():
    """The pool stores layers × 2 × kv_heads × head_dim × dtype size per token, nothing more."""
    for dtype, size in ((torch.float32, 4), (torch.bfloat16, 2)):
        layout = KVLayout(num_layers=30, num_kv_heads=3, head_dim=64, dtype=dtype)
        pool = KVPool(layout, 1000)
        assert layout.bytes_per_token == 30 * 2 * 3 * 64 * size
        assert pool.nbytes == 1000 * layout.bytes_per_token


@pytest.mark.parametrize("mode", [CacheMode.STATEFUL, CacheMode.PREFIX, CacheMode.STATELESS])
def test_concurrent_prompts_share_a_prefill_in_flight(mode):
    """Three requests with one 100-token prefix arrive together (agents of one role starting): the first
    prefills it, the others wait for that prefill and reuse its KV (prefilling only their own 5 tokens);
    outputs equal HF's. Stateless mode shares nothing."""
    cfg = tiny_config("llama", True)
    ref = hf_model(cfg, seed=5)
    model = LlamaModel.from_state_dict(cfg, ref.state_dict(), torch.float32)
    eng = LLMEngine(model, None, EngineConfig(dtype=torch.float32, kv_cache_bytes=1 << 22, max_batch_tokens=64,
                                              cache_mode=mode, speculation=False, check_integrity=True))
    g = torch.Generator().manual_seed(6)
    prefix = torch.randint(0, cfg.vocab_size, (100,), generator=g).tolist()
    prompts = [prefix + torch.randint(0, cfg.vocab_size, (5,), generator=g).tolist() for _ in range(3)]
    seqs = [eng.add_request(p, SamplingParams(max_tokens=6, ignore_eos=True)) for p in prompts]
    eng.run_until_done(seqs)
    for p, s in zip(prompts, seqs):
        assert s.output_ids == hf_greedy(ref, p, 6)
    if mode == CacheMode.STATELESS:
        assert [s.stats.cached_tokens for s in seqs] == [0, 0, 0]
    else:
        assert [s.stats.cached_tokens for s in seqs] == [0, 100, 100]
        assert [s.stats.prefilled_tokens for s in seqs] == [105, 5, 5]
