"""Grammar-constrained decoding composes with speculation and sessions (Qwen2.5-Coder, fp32)."""

from __future__ import annotations

import json

import pytest

from conftest import load_engine
from deltaserve.engine.kv_manager import CacheMode
from deltaserve.engine.sampling import SamplingParams
from deltaserve.server.grammar import GrammarCompiler


SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
          "required": ["city", "days"], "additionalProperties": False}


@pytest.fixture(scope="module")
def engines(qwen_dir):
    spec = load_engine(qwen_dir, speculation=True, cache_mode=CacheMode.STATEFUL)
    plain = load_engine(qwen_dir, speculation=False, cache_mode=CacheMode.STATELESS)
    comp = GrammarCompiler(spec.tokenizer.hf, spec.cfg.vocab_size, sorted(spec.tokenizer.stop_token_ids))
    return spec, plain, comp


def _run(engine, comp, prompt, session_id=None, draft_hook=None):
    seq = engine.add_request(prompt, SamplingParams(max_tokens=40), session_id=session_id,
                             constraint=comp.for_json_schema(SCHEMA))
    engine.run_until_done([seq])
    return seq


def test_constrained_output_identical_with_speculation(engines):
    spec, plain, comp = engines
    tok = spec.tokenizer
    # The context repeats the JSON we want, so lookup drafts are long and mostly right.
    msgs = [{"role": "user", "content": 'Earlier answer: {"city": "Paris", "days": 3}. '
                                        'Answer again as JSON with city Paris and days 3.'}]
    prompt = tok.apply_chat(msgs)
    spec.open_session("g")
    a = _run(spec, comp, prompt, session_id="g")
    b = _run(plain, comp, prompt)
    assert a.output_ids == b.output_ids
    assert a.stats.drafted_tokens > 0
    obj = json.loads(tok.decode(a.output_ids))
    assert set(obj) == {"city", "days"} and isinstance(obj["days"], int)
    # the session advanced past the constrained turn and the next turn still equals recompute
    nxt = a.tokens + tok.encode("\n<|im_start|>user\nAnd for Rome, 5 days?<|im_end|>\n<|im_start|>assistant\n")
    c = _run(spec, comp, nxt, session_id="g")
    d = _run(plain, comp, nxt)
    assert c.output_ids == d.output_ids and c.stats.cached_tokens >= len(a.tokens) - 1


def test_forbidden_drafts_are_rejected(engines, monkeypatch):
    """Drafts that break the grammar (plain prose tokens) are rejected; output stays valid and identical."""
    spec, plain, comp = engines
    tok = spec.tokenizer
    prose = tok.encode(" hello world this is not json at all")
    monkeypatch.setattr(spec.speculator, "propose", lambda seq: list(prose[:4]))
    prompt = tok.apply_chat([{"role": "user", "content": "Give JSON for a 2 day trip to Oslo."}])
    a = _run(spec, comp, prompt)
    b = _run(plain, comp, prompt)
    assert a.output_ids == b.output_ids
    assert a.stats.drafted_tokens > 0 and a.stats.accepted_tokens == 0
    json.loads(tok.decode(a.output_ids))
