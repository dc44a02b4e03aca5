"""vLLM conventions: CLI aliases, /tokenize /detokenize /version, strict JSON bodies, opt-in CORS.

One small SmolLM2 engine and one live server per module; requests are greedy with a few tokens.
"""

from __future__ import annotations

import argparse

import httpx
import openai
import pytest
import torch

from deltaserve.engine.args import engine_config
from deltaserve.engine.engine import EngineConfig, LLMEngine
from deltaserve.server.app import add_serve_arguments, create_app, resolve_model
from deltaserve.server.testing import ServerThread

MODEL = "smollm2-135m"


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    args = p.parse_args(argv)
    resolve_model(args)
    return args


# ------------------------------------------------------------------ CLI
def test_vllm_aliases_map_to_the_same_config():
    ours = _parse(["--model", "qwen2.5-coder-0.5b", "--max-context", "1024", "--max-batch-tokens", "256",
                   "--max-running", "8", "--dtype", "bfloat16"])
    vllm = _parse(["qwen2.5-coder-0.5b", "--max-model-len", "1024", "--max-num-batched-tokens", "256",
                   "--max-num-seqs", "8", "--dtype", "auto", "--enable-prefix-caching",
                   "--enable-auto-tool-choice", "--tool-call-parser", "hermes"])
    assert vllm.model == ours.model == "qwen2.5-coder-0.5b"
    a, b = engine_config(ours), engine_config(vllm)
    assert a == b
    assert (b.max_context, b.max_batch_tokens, b.max_running, b.dtype) == (1024, 256, 8, torch.bfloat16)


def test_positional_and_flag_model_must_agree():
    assert _parse(["smollm2-135m", "--model", "smollm2-135m"]).model == "smollm2-135m"
    with pytest.raises(SystemExit, match="differs"):
        _parse(["smollm2-135m", "--model", "qwen2.5-coder-0.5b"])


def test_max_num_seqs_must_be_positive():
    with pytest.raises(SystemExit, match="max-num-seqs"):
        engine_config(_parse(["--max-num-seqs", "0"]))


# ------------------------------------------------------------------ HTTP
@pytest.fixture(scope="module")
def engine(smollm_model):
    model, tok = smollm_model
    return LLMEngine(model, tok, EngineConfig(dtype=torch.float32, kv_cache_bytes=64 << 20))


@pytest.fixture(scope="module")
def server(engine):
    with ServerThread(create_app(engine, MODEL)) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=60) as c:
        yield c


MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]


def test_tokenize_counts_match_chat_prompt_tokens(server, http):
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, temperature=0)
    r = http.post("/tokenize", json={"model": MODEL, "messages": MESSAGES})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["count"] == len(body["tokens"]) == chat.usage.prompt_tokens
    assert body["max_model_len"] > 0


def test_tokenize_detokenize_round_trip(http):
    text = "Hello, world: 3 + 4 = 7."
    toks = http.post("/tokenize", json={"model": MODEL, "prompt": text}).json()
    assert toks["count"] == len(toks["tokens"]) > 0
    back = http.post("/detokenize", json={"model": MODEL, "tokens": toks["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": text}


def test_tokenize_errors_are_openai_format(http):
    both = http.post("/tokenize", json={"prompt": "x", "messages": MESSAGES})
    assert both.status_code == 400 and both.json()["error"]["param"] == "prompt"
    wrong = http.post("/tokenize", json={"model": "nope", "prompt": "x"})
    assert wrong.status_code == 404 and wrong.json()["error"]["code"] == "model_not_found"
    out_of_range = http.post("/detokenize", json={"tokens": [10**9]})
    assert out_of_range.status_code == 400 and out_of_range.json()["error"]["param"] == "tokens"


def test_version(http):
    r = http.get("/version")
    assert r.status_code == 200 and isinstance(r.json()["version"], str) and r.json()["version"]


def test_non_json_body_is_rejected_in_openai_format(http):
    body = '{"model": "%s", "prompt": "Hi", "max_tokens": 1}' % MODEL
    r = http.post("/v1/completions", content=body, headers={"Content-Type": "text/plain"})
    assert r.status_code in (400, 415), r.text
    assert set(r.json()["error"]) >= {"message", "type", "param", "code"}
    ok = http.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert ok.status_code == 200, ok.text


def test_cors_only_when_allowed(engine, http):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in http.options("/v1/completions", headers=preflight).headers
    assert "access-control-allow-origin" not in http.get("/version", headers={"Origin": "https://app.example"}).headers
    with ServerThread(create_app(engine, MODEL, allowed_origins=["https://app.example"])) as srv:
        with httpx.Client(base_url=srv.base_url, timeout=60) as c:
            r = c.get("/version", headers={"Origin": "https://app.example"})
            assert r.headers.get("access-control-allow-origin") == "https://app.example"
            other = c.get("/version", headers={"Origin": "https://evil.example"})
            assert "access-control-allow-origin" not in other.headers
