"""Multi-turn tool-calling chats on both real models: each turn reuses ≥ 99% of the previous turn's tokens.

Chat templates re-render earlier assistant turns and need not reproduce the
generated tokens; `render_turn` extends the session's token state instead.
"""

from __future__ import annotations

import pytest

from conftest import load_engine
from deltaserve.cache.session import MatchReason
from deltaserve.engine.chat import Transcript, render_turn, reply_message
from deltaserve.engine.sampling import SamplingParams
from deltaserve.server.tool_parser import new_call_id, parse_tool_calls


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


@pytest.mark.parametrize("which", ["smollm_dir", "qwen_dir"])
def test_each_turn_extends_the_last(which, request):
    engine = load_engine(request.getfixturevalue(which), speculation=True)
    tok = engine.tokenizer
    messages = [{"role": "system", "content": "You are a weather agent. Call get_weather for every city asked."},
                {"role": "user", "content": "What's the weather in Paris? Then Berlin, then Rome."}]
    engine.open_session("drift")
    prior: Transcript | None = None
    drift_seen = 0
    for turn in range(5):
        r = render_turn(tok, messages, TOOLS, prior)
        seq = engine.add_request(r.tokens, SamplingParams(max_tokens=40), session_id="drift")
        engine.run_until_done([seq])
        if prior is not None:
            assert r.mode == "extended"
            assert r.tokens[: len(prior.tokens)] == prior.tokens
            # 100% of the previous token state is reused; in KV terms everything the last turn computed
            # (all but its final sampled token, which no engine has computed before the next turn).
            assert r.reused_tokens == len(prior.tokens)
            assert seq.stats.cached_tokens == len(prior.tokens) - 1, f"turn {turn}"
            assert seq.explanation.reason == MatchReason.EXTENDED
            # What a plain re-render would have given: count where it leaves the generated tokens.
            naive = tok.apply_chat(messages, TOOLS)
            drift_seen += naive[: len(prior.tokens)] != prior.tokens
        text = tok.decode(seq.output_ids)
        parsed = parse_tool_calls(text, {"get_weather"})
        calls = [{"id": new_call_id(), "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                 for c in parsed.tool_calls]
        messages.append(reply_message(parsed.content if calls else text, calls or None))
        prior = Transcript(messages=[dict(m) for m in messages], tools=TOOLS, tokens=list(seq.tokens))
        for c in calls:
            messages.append({"role": "tool", "tool_call_id": c["id"], "content": '{"temp_c": 18, "sky": "clear"}'})
        if not calls:
            messages.append({"role": "user", "content": "Next city, please."})
    print(f"{which}: a full re-render would have diverged from the session state on {drift_seen} of 4 turns")
