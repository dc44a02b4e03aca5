"""Speculation in the engine on real weights (fp32): lossless, session-consistent, deterministic.

Multi-turn tool-calling conversations with sessions on Qwen2.5-Coder-0.5B
(tools rendered by its chat template, replies parsed with parse_tool_calls,
synthetic tool results appended, turns rendered by `render_turn` so each
extends the session's token state), run with speculation off and on:

* greedy outputs are identical token for token, every turn;
* the session's token state after each run is identical (so the KV the
  speculative turns left behind serves the next turn exactly like the plain
  one: the next turn's output is compared too);
* drafts rejected at every position (a drafter that proposes garbage) and
  drafts that run into stop tokens / max_tokens (an oracle drafter that
  proposes the true continuation followed by junk) change nothing;
* sampling with a seed is reproducible with speculation on.

A quick SmolLM2 variant runs interleaved sessions through the batcher.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from deltaserve.engine.chat import Transcript, render_turn, reply_message
from deltaserve.engine.engine import EngineConfig, LLMEngine
from deltaserve.engine.sampling import SamplingParams
from deltaserve.engine.speculator import Speculator
from deltaserve.server.tool_parser import parse_tool_calls


TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "read_file", "description": "Read a file of the repository.",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}},
]
TOOL_NAMES = {t["function"]["name"] for t in TOOLS}
MAX_TOKENS = [32, 12, 32]  # the middle turn is cut by max_tokens


# ----------------------------------------------------------------- engines
@pytest.fixture(scope="module")
def qwen(qwen_dir):
    from deltaserve.models.llama import LlamaModel
    from deltaserve.models.loader import load_config, load_state_dict
    from deltaserve.models.tokenizer import Tokenizer

    return LlamaModel.from_state_dict(load_config(qwen_dir), load_state_dict(qwen_dir), torch.float32), Tokenizer(qwen_dir)


@pytest.fixture(scope="module")
def smollm(smollm_model):
    return smollm_model


def _engine(model_tok, speculation: bool, **kw) -> LLMEngine:
    model, tok = model_tok
    cfg = dict(dtype=torch.float32, kv_cache_bytes=128 << 20, check_integrity=True, speculation=speculation)
    cfg.update(kw)
    return LLMEngine(model, tok, EngineConfig(**cfg))


# ------------------------------------------------------------ conversations
def _tool_result(name: str, args: str, turn: int) -> str:
    try:
        a = json.loads(args)
    except ValueError:
        a = {}
    if name == "get_weather":
        return json.dumps({"city": a.get("city", "Paris"), "temp_c": 14 + turn, "sky": "cloudy"})
    return json.dumps({"path": a.get("path", "main.py"), "content": "def main():\n    return get_weather('Paris')\n"})


def run_tool_conversation(engine: LLMEngine, session_id: str, max_tokens=MAX_TOKENS, temperature=0.0, seed=None,
                          tool_drafts=None):
    """Agent loop: generate, parse tool calls, append synthetic results, next turn. -> (outputs, finish reasons).

    `tool_drafts`: set on every turn's request, as the server does for a request with tools."""
    tok = engine.tokenizer
    engine.open_session(session_id)
    messages = [
        {"role": "system", "content": "You are a coding agent. Use the tools; answer with tool calls."},
        {"role": "user", "content": "What is the weather in Paris, and what does main.py do? Call the tools."},
    ]
    prior: Transcript | None = None
    outs, reasons = [], []
    for turn, mt in enumerate(max_tokens):
        prompt = render_turn(tok, messages, TOOLS, prior).tokens
        params = SamplingParams(max_tokens=mt, temperature=temperature, seed=seed, tool_drafts=tool_drafts)
        seq = engine.add_request(prompt, params, session_id=session_id)
        engine.run_until_done([seq])
        out = seq.output_ids
        outs.append(out)
        reasons.append(seq.finish_reason)
        parsed = parse_tool_calls(tok.decode(out), TOOL_NAMES)
        calls = [{"id": f"call_{turn}_{i}", "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                 for i, c in enumerate(parsed.tool_calls)]
        messages.append(reply_message(parsed.content, calls or None))
        prior = Transcript(messages=[dict(m) for m in messages], tools=TOOLS, tokens=prompt + out)
        if calls:
            for c in calls:
                f = c["function"]
                messages.append({"role": "tool", "tool_call_id": c["id"], "name": f["name"],
                                 "content": _tool_result(f["name"], f["arguments"], turn)})
        else:
            messages.append({"role": "user", "content": "Call read_file on main.py now."})
    return outs, reasons


def _session_tokens(engine: LLMEngine, session_id: str) -> list[int]:
    return list(engine.get_session(session_id).tokens)


@pytest.fixture(scope="module")
def plain_run(qwen):
    eng = _engine(qwen, speculation=False)
    outs, reasons = run_tool_conversation(eng, "s")
    return outs, reasons, _session_tokens(eng, "s")


# --------------------------------------------------------------------- tests
def test_greedy_identical_with_speculation_multi_turn_tools(qwen, plain_run):
    ref_outs, ref_reasons, ref_state = plain_run
    eng = _engine(qwen, speculation=True)
    outs, reasons = run_tool_conversation(eng, "s")
    assert outs == ref_outs
    assert reasons == ref_reasons
    assert "length" in reasons  # the middle turn hits max_tokens
    # The session state (and so the KV the next turn reuses) is the non-speculative one.
    assert _session_tokens(eng, "s") == ref_state
    st = eng.stats()
    assert st["drafted_tokens"] > 0, "tool-call output should give the prompt-lookup drafter something to propose"
    assert st["accepted_tokens"] <= st["drafted_tokens"]


def test_greedy_identical_multi_turn_with_tool_drafts(qwen, plain_run):
    """Every turn carries the tools as schema drafts (what a served request with tools gets): same outputs
    and session state as without speculation, and the schema drafts took part."""
    from deltaserve.spec.schema_drafts import ToolDrafts

    ref_outs, ref_reasons, ref_state = plain_run
    eng = _engine(qwen, speculation=True)
    outs, reasons = run_tool_conversation(eng, "s", tool_drafts=ToolDrafts.from_tools(TOOLS))
    assert outs == ref_outs and reasons == ref_reasons
    assert _session_tokens(eng, "s") == ref_state
    assert eng.speculator.schema_drafted > 0
    assert eng.speculator.schema_accepted <= eng.speculator.schema_drafted


def _patch_propose(monkeypatch, eng: LLMEngine, draft_fn):
    """Replace the engine's drafts with `draft_fn(seq, k)`; the real index still advances."""
    spec = eng.speculator
    orig = Speculator.propose.__get__(spec)

    def propose(seq):
        orig(seq)  # keep the session's lookup index in sync exactly as in real runs
        k = min(4, seq.params.max_tokens - seq.num_output - 1)
        return draft_fn(seq, k) if k > 0 else []

    monkeypatch.setattr(spec, "propose", propose)


def test_drafts_rejected_at_every_position(qwen, plain_run, monkeypatch):
    ref_outs, ref_reasons, ref_state = plain_run
    eng = _engine(qwen, speculation=True)
    garbage = eng.cfg.vocab_size - 1  # a padding row of the embedding: never the argmax
    _patch_propose(monkeypatch, eng, lambda seq, k: [garbage] * k)
    outs, reasons = run_tool_conversation(eng, "s")
    assert outs == ref_outs and reasons == ref_reasons
    assert _session_tokens(eng, "s") == ref_state
    st = eng.stats()
    assert st["drafted_tokens"] > 0 and st["accepted_tokens"] == 0


def test_drafts_running_into_stop_and_max_tokens(qwen, plain_run, monkeypatch):
    """An oracle drafter: the true continuation, then the stop token / junk past it, up to max_tokens."""
    ref_outs, ref_reasons, ref_state = plain_run
    eng = _engine(qwen, speculation=True)
    junk = eng.cfg.vocab_size - 1
    stop = min(eng.stop_ids)
    turn_of: dict[int, int] = {}

    def oracle(seq, k):
        t = turn_of.setdefault(seq.seq_id, len(turn_of))
        ref = ref_outs[t] + [stop, junk, junk, junk, junk]  # runs past the reply's own stop token
        return ref[seq.num_output : seq.num_output + k]

    _patch_propose(monkeypatch, eng, oracle)
    outs, reasons = run_tool_conversation(eng, "s")
    assert outs == ref_outs and reasons == ref_reasons
    assert _session_tokens(eng, "s") == ref_state
    st = eng.stats()
    assert st["accepted_tokens"] > 0
    # Every reply of at least 2 tokens was drafted (the first token comes from prefill).
    assert st["drafted_tokens"] >= sum(len(o) - 1 for o in ref_outs) // 4


def test_seeded_sampling_deterministic_with_speculation(qwen):
    runs = []
    for _ in range(2):
        eng = _engine(qwen, speculation=True)
        runs.append(run_tool_conversation(eng, "s", max_tokens=[24, 24], temperature=0.8, seed=1234))
    assert runs[0] == runs[1]


def test_smollm_interleaved_sessions_spec_identical(smollm):
    """SmolLM2: two sessions in one batch, repetitive tool-ish deltas (drafts accepted and rejected)."""
    model, tok = smollm

    def run(speculation: bool):
        eng = _engine(smollm, speculation=speculation)
        rng = random.Random(5)
        sys_ids = tok.apply_chat([{"role": "system", "content": "You are an agent. Reply with a JSON tool call."}],
                                 add_generation_prompt=False)
        hist = {sid: list(sys_ids) for sid in ("a", "b")}
        for sid in hist:
            eng.open_session(sid)
        outs = []
        for turn in range(3):
            seqs = []
            for sid in hist:
                res = json.dumps({"tool": "search", "result": [rng.choice(["ok", "error", "retry"]) for _ in range(6)]})
                prompt = hist[sid] + tok.encode(f"<|im_start|>user\nResult: {res}. Repeat it exactly.<|im_end|>\n"
                                                "<|im_start|>assistant\n")
                seqs.append((sid, prompt, eng.add_request(prompt, SamplingParams(max_tokens=20 + 4 * turn), session_id=sid)))
            eng.run_until_done([s for _, _, s in seqs])
            for sid, prompt, seq in seqs:
                hist[sid] = prompt + seq.output_ids
                outs.append(seq.output_ids)
        return outs, {sid: _session_tokens(eng, sid) for sid in hist}, eng.stats()

    ref_outs, ref_state, _ = run(False)
    outs, state, st = run(True)
    assert outs == ref_outs
    assert state == ref_state
    assert st["drafted_tokens"] > 0
    # Verifies of the two sessions alternate, and rejected drafts go back, yet each session's KV stays in runs of 16
    # slots (kv/allocator.py): 25 of 26 windows here, where the FIFO free list before it gave 11.
    assert st["kv_slot_run_fraction"] >= 0.85, st["kv_slot_run_fraction"]
