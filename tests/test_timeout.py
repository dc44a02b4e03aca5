"""`--request-timeout`: a request older than the limit ends before the next step (finish_reason "timeout" in the
engine, "length" + `deltaserve.timed_out` over HTTP), keeping the KV it computed, so its session stays
consistent: the next turn reuses that KV and equals plain recompute."""

from __future__ import annotations

import time

import httpx
import pytest
import torch

from deltaserve.engine.engine import EngineConfig, LLMEngine
from deltaserve.engine.kv_manager import CacheMode
from deltaserve.engine.sampling import SamplingParams
from deltaserve.server.app import create_app
from deltaserve.server.testing import ServerThread

MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def engine(smollm_model):
    model, tok = smollm_model
    return LLMEngine(model, tok, EngineConfig(dtype=torch.float32, kv_cache_bytes=64 << 20, check_integrity=True,
                                              request_timeout=0.5))


def test_waiting_and_running_requests_time_out_and_free_nothing_twice(engine):
    running = engine.add_request(list(range(10, 40)), SamplingParams(max_tokens=10_000, ignore_eos=True))
    engine.step()  # admitted: it holds KV now
    waiting = engine.add_request(list(range(50, 60)), SamplingParams(max_tokens=4))
    waiting.stats.arrival -= 10.0  # as if it had waited 10 s without being admitted
    running.stats.arrival -= 10.0
    outs = {o.request_id: o for o in engine.step()}
    assert outs[running.seq_id].finish_reason == outs[waiting.seq_id].finish_reason == "timeout"
    assert outs[running.seq_id].finished and not engine.has_work()
    assert 0 < running.num_output < 10_000
    engine.kv.check_integrity([])  # the running one's KV went to the cache, the waiting one held none


def test_timed_out_turn_leaves_its_session_consistent(engine):
    ref = LLMEngine(engine.model, engine.tokenizer, EngineConfig(dtype=torch.float32, kv_cache_bytes=32 << 20,
                                                                 cache_mode=CacheMode.STATELESS, speculation=False))
    messages = [{"role": "user", "content": "Write a very long story about a lighthouse keeper."}]
    with ServerThread(create_app(engine, MODEL)) as srv, httpx.Client(base_url=srv.base_url, timeout=60) as http:
        t0 = time.perf_counter()
        r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 4000,
                                                    "temperature": 0, "ignore_eos": True, "session_id": "slow"})
        assert r.status_code == 200, r.text
        out = r.json()
        assert time.perf_counter() - t0 < 30  # it did not run to 4,000 tokens
        assert out["choices"][0]["finish_reason"] == "length" and out["deltaserve"]["timed_out"] is True
        assert 0 < out["usage"]["completion_tokens"] < 4000
        messages += [{"role": "assistant", "content": out["choices"][0]["message"]["content"]},
                     {"role": "user", "content": "Thanks."}]
        r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 5,
                                                    "temperature": 0, "session_id": "slow", "return_token_ids": True})
        nxt = r.json()
        assert r.status_code == 200 and nxt["deltaserve"]["timed_out"] is False
        assert nxt["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        expect = ref.generate([nxt["prompt_token_ids"]], SamplingParams(max_tokens=5))[0]
        assert nxt["choices"][0]["token_ids"] == expect
