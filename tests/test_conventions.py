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
from deltaserve.models.generation_config import SamplingDefaults, load_sampling_defaults
from deltaserve.models.tokenizer import Tokenizer
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
        _parse(["qwen2.5-coder-0.5b", "--model", "smollm2-135m"])  # --model given as the default's value
    assert _parse([]).model == "smollm2-135m"  # the default


def test_strict_tools_are_enforced_unless_turned_off():
    assert _parse([]).enforce_strict_tools is True
    assert _parse(["--no-enforce-strict-tools"]).enforce_strict_tools is False


def test_max_num_seqs_must_be_positive():
    with pytest.raises(SystemExit, match="max-num-seqs"):
        engine_config(_parse(["--max-num-seqs", "0"]))


def test_num_speculative_tokens_sets_the_draft_cap(smollm_model, smollm_dir):
    assert engine_config(_parse([])).num_speculative_tokens == 8
    cfg = engine_config(_parse(["--num-speculative-tokens", "3", "--dtype", "float32", "--kv-cache-gb", "0.0625"]))
    assert cfg.num_speculative_tokens == 3
    for bad in ("0", "33"):
        with pytest.raises(SystemExit, match="num-speculative-tokens"):
            engine_config(_parse(["--num-speculative-tokens", bad]))
    model, _ = smollm_model
    eng = LLMEngine(model, Tokenizer(smollm_dir), cfg)
    assert eng.speculator.k_max == 3  # the draft-length controller's cap, and the lookup index's


# ------------------------------------------------------------------ HTTP
# SmolLM2's template plus one variable, so chat_template_kwargs has an observable effect
THINK = "{% if enable_thinking is defined and not enable_thinking %}/no_think{% endif %}"
DEFAULTS = SamplingDefaults(temperature=0.0, top_p=0.5, top_k=7)


@pytest.fixture(scope="module")
def engine(smollm_model, smollm_dir):
    model, _ = smollm_model
    tok = Tokenizer(smollm_dir)  # its own copy: the shared one's template stays untouched
    tok.hf.chat_template = tok.hf.chat_template.replace("{% for message", THINK + "{% for message", 1)
    return LLMEngine(model, tok, EngineConfig(dtype=torch.float32, kv_cache_bytes=64 << 20),
                     sampling_defaults=DEFAULTS)


@pytest.fixture(scope="module")
def server(engine):
    with ServerThread(create_app(engine, MODEL, stats_interval=0.1)) as srv:
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


def test_chat_template_kwargs_reach_the_template(server, http):
    plain = http.post("/tokenize", json={"messages": MESSAGES}).json()
    off = http.post("/tokenize", json={"messages": MESSAGES, "chat_template_kwargs": {"enable_thinking": False}})
    assert off.status_code == 200, off.text
    text = http.post("/detokenize", json={"tokens": off.json()["tokens"]}).json()["prompt"]
    assert text.startswith("/no_think") and off.json()["count"] > plain["count"]
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1,
                                          extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert chat.usage.prompt_tokens == off.json()["count"]
    reserved = http.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "max_tokens": 1,
                                                       "chat_template_kwargs": {"add_generation_prompt": False}})
    assert reserved.status_code == 400 and reserved.json()["error"]["param"] == "chat_template_kwargs"


def test_generation_config_defaults_apply_when_omitted(engine):
    from types import SimpleNamespace

    from deltaserve.server.generation import sampling_params
    from deltaserve.server.protocol import CompletionRequest

    ctx = SimpleNamespace(sampling_defaults=engine.info.sampling_defaults, vocab_size=100, max_context=64)
    omitted = sampling_params(CompletionRequest(model=MODEL, prompt="x"), 4, ctx)
    assert (omitted.temperature, omitted.top_p, omitted.top_k) == (0.0, 0.5, 7)
    given = sampling_params(CompletionRequest(model=MODEL, prompt="x", temperature=0.8, top_p=0.9, top_k=-1), 4, ctx)
    assert (given.temperature, given.top_p, given.top_k) == (0.8, 0.9, 0)
    ctx.sampling_defaults = None  # --generation-config vllm / no file: the OpenAI defaults
    plain = sampling_params(CompletionRequest(model=MODEL, prompt="x"), 4, ctx)
    assert (plain.temperature, plain.top_p, plain.top_k) == (1.0, 1.0, 0)


def test_load_sampling_defaults(tmp_path):
    assert load_sampling_defaults(tmp_path) == SamplingDefaults()
    (tmp_path / "generation_config.json").write_text('{"temperature": 0.7, "top_p": 0.8, "top_k": 20, '
                                                     '"repetition_penalty": 1.05}')
    assert load_sampling_defaults(tmp_path) == SamplingDefaults(0.7, 0.8, 20)
    (tmp_path / "generation_config.json").write_text('{"do_sample": false, "temperature": 0.7}')
    assert load_sampling_defaults(tmp_path) == SamplingDefaults(temperature=0.0)
    (tmp_path / "generation_config.json").write_text("{not json")
    assert load_sampling_defaults(tmp_path) == SamplingDefaults()


def test_version(http):
    r = http.get("/version")
    assert r.status_code == 200 and isinstance(r.json()["version"], str) and r.json()["version"]


def test_non_json_body_is_rejected_in_openai_format(http):
    body = '{"model": "%s", "prompt": "Hi", "max_tokens": 1}' % MODEL
    for headers in ({"Content-Type": "text/plain"}, {}):  # {}: no content type at all (a bare fetch/beacon)
        req = http.build_request("POST", "/v1/completions", content=body.encode(), headers=headers)
        if not headers:
            req.headers.pop("Content-Type", None)  # the case is a body without any content type
        assert "content-type" not in req.headers or headers
        r = http.send(req)
        assert r.status_code in (400, 415), (headers, r.text)
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


# ------------------------------------------------------------------ metrics and the stats line
def test_metric_names_and_latency_histograms(http):
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "One two three", "max_tokens": 3,
                                           "ignore_eos": True})
    assert r.status_code == 200, r.text
    text = http.get("/metrics").text
    for name in ("deltaserve_request_queue_time_seconds_count", "deltaserve_inter_token_latency_seconds_count",
                 "deltaserve_time_to_first_token_seconds_count", "deltaserve_kv_slots "):
        assert name in text, name
    gauges = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE") and line.endswith("gauge")}
    assert gauges and not [g for g in gauges if g.endswith("_total")]
    itl = [line for line in text.splitlines()
           if line.startswith('deltaserve_inter_token_latency_seconds_count{route="/v1/completions"}')]
    assert itl and float(itl[0].split()[-1]) >= 2  # 3 tokens: at least 2 gaps after the first


def test_stats_line_is_logged_without_text(http, caplog):
    import logging
    import time

    secret = "Zanzibar-quokka-7731"
    caplog.set_level(logging.INFO, logger="deltaserve.stats")
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": secret, "max_tokens": 8, "ignore_eos": True})
    assert r.status_code == 200
    deadline = time.monotonic() + 30  # a bound on waiting, not a speed check
    while not [x for x in caplog.records if x.name == "deltaserve.stats"] and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = [x.getMessage() for x in caplog.records if x.name == "deltaserve.stats"]
    assert lines and "Avg generation throughput" in lines[-1]
    out = r.json()["choices"][0]["text"]
    assert not [m for m in lines if secret in m or (out.strip() and out.strip() in m)]


def test_stats_logger_line():
    from deltaserve.server.stats_log import StatsLogger

    t = iter([0.0, 2.0, 4.0])
    lg = StatsLogger(clock=lambda: next(t))
    base = {"prompt_tokens": 100, "cached_tokens": 0, "generated_tokens": 10, "running": 0, "waiting": 0,
            "kv_slots_used": 0, "kv_slots_total": 100}
    assert lg.line(base) is None
    busy = {**base, "prompt_tokens": 300, "cached_tokens": 50, "generated_tokens": 50, "running": 2,
            "kv_slots_used": 25}
    line = lg.line(busy)
    assert "prompt throughput: 100.0 tokens/s" in line and "generation throughput: 20.0" in line
    assert "Running: 2 reqs" in line and "KV usage: 25.0%" in line and "hit rate: 25.0%" in line
    assert lg.line({**busy, "running": 0}) is None  # idle, nothing new
