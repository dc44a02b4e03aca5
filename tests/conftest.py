"""Shared fixtures: real models (pulled on first use), engines, prompts."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Where the real-weight engines run: `DELTASERVE_TEST_DEVICE=cuda` runs the same exactness tests on a GPU (the
# HF references stay on the CPU in fp32). CI has no GPU and runs them on the CPU.
TEST_DEVICE = os.environ.get("DELTASERVE_TEST_DEVICE", "cpu")


def _model_dir(name: str):
    from deltaserve.models.loader import model_dir
    from deltaserve.models.registry import model_path, pull

    if not model_path(name).exists():
        pull(name, progress=False)
    return model_dir(name)


@pytest.fixture(scope="session")
def smollm_dir():
    return _model_dir("smollm2-135m")


@pytest.fixture(scope="session")
def qwen_dir():
    return _model_dir("qwen2.5-coder-0.5b")


def load_engine(directory, **cfg):
    from deltaserve.engine.engine import EngineConfig, LLMEngine
    from deltaserve.models.llama import LlamaModel
    from deltaserve.models.loader import load_config, load_state_dict
    from deltaserve.models.tokenizer import Tokenizer

    cfg.setdefault("dtype", torch.float32)
    cfg.setdefault("kv_cache_bytes", 256 << 20)
    cfg.setdefault("check_integrity", True)
    cfg.setdefault("device", TEST_DEVICE)
    model = LlamaModel.from_state_dict(load_config(directory), load_state_dict(directory), cfg["dtype"], cfg["device"])
    return LLMEngine(model, Tokenizer(directory), EngineConfig(**cfg))


@pytest.fixture(scope="session")
def smollm_model(smollm_dir):
    from deltaserve.models.llama import LlamaModel
    from deltaserve.models.loader import load_config, load_state_dict
    from deltaserve.models.tokenizer import Tokenizer

    return (LlamaModel.from_state_dict(load_config(smollm_dir), load_state_dict(smollm_dir), torch.float32, TEST_DEVICE),
            Tokenizer(smollm_dir))


# prompts of varied English-like text, shared with the benchmarks that measure on the suites' prompts
from deltaserve_bench.common import chat_prompt_of_tokens as text_of_tokens  # noqa: E402,F401


def hf_greedy(ref, prompt: list[int], max_new: int) -> list[int]:
    """Plain greedy with HF's own KV cache, never stopping early and never masking EOS.

    (`generate(min_new_tokens=...)` would forbid EOS, while the engine under test with
    `ignore_eos` may emit it and go on: the reference must be argmax, nothing else.)
    """
    out: list[int] = []
    with torch.inference_mode():
        r = ref(torch.tensor([prompt]), use_cache=True)
        for _ in range(max_new):
            t = int(r.logits[0, -1].argmax())
            out.append(t)
            r = ref(torch.tensor([[t]]), past_key_values=r.past_key_values, use_cache=True)
    return out
