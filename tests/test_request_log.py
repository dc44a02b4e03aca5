"""Prompts and outputs reach the log only with `--log-requests` (logger `deltaserve.requests`)."""

from __future__ import annotations

import logging

import httpx
import torch

from deltaserve.engine.engine import EngineConfig, LLMEngine
from deltaserve.server.app import create_app
from deltaserve.server.testing import ServerThread

MODEL = "smollm2-135m"
SECRET = "the launch code is tangerine-42"


def _logged_text(engine, caplog, **app_kw) -> str:
    caplog.clear()
    with caplog.at_level(logging.DEBUG), ServerThread(create_app(engine, MODEL, **app_kw)) as srv:
        r = httpx.post(srv.base_url + "/v1/chat/completions", timeout=60,
                       json={"model": MODEL, "messages": [{"role": "user", "content": SECRET}], "max_tokens": 3})
        assert r.status_code == 200, r.text
    return "\n".join(rec.getMessage() for rec in caplog.records)


def test_prompts_are_logged_only_with_log_requests(smollm_model, caplog):
    model, tok = smollm_model
    engine = LLMEngine(model, tok, EngineConfig(dtype=torch.float32, kv_cache_bytes=32 << 20))
    assert SECRET not in _logged_text(engine, caplog, stats_interval=0.05)  # not even the stats line has it
    logged = _logged_text(engine, caplog, log_requests=True)
    assert SECRET in logged and "/v1/chat/completions" in logged and "output_tokens=3" in logged
