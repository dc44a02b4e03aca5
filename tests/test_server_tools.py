"""Tool calling through the server with Qwen2.5-Coder-0.5B (the default model does not make tool calls).

Slow (a 0.5B model on CPU): a two-turn tool loop in a session, streaming
tool-call deltas, forced calls (tool_choice "required" / named) under a
grammar, and `strict` tools under "auto", whose grammar leaves valid output alone.
"""

from __future__ import annotations

import asyncio
import json
import uuid

import openai
import pytest
import torch

from deltaserve.engine.engine import EngineConfig, LLMEngine
from deltaserve.server.app import create_app
from deltaserve.server.testing import ServerThread


MODEL = "qwen2.5-coder-0.5b"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Get the current time in a timezone",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string", "enum": ["UTC", "CET"]}},
                   "required": ["tz"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def served(qwen_dir):  # conftest: pulled on first use
    engine = LLMEngine.from_model(str(qwen_dir), EngineConfig(dtype=torch.float32, kv_cache_bytes=256 << 20))
    app = create_app(engine, MODEL)
    with ServerThread(app) as srv:
        yield openai.OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0), app.state.ctx


@pytest.fixture(scope="module")
def client(served):
    return served[0]


def create(client, messages, **kw):
    return client.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                          max_tokens=kw.pop("max_tokens", 48), **kw)


def test_tool_loop_in_session(client):
    s = "tools-" + uuid.uuid4().hex[:8]
    r1 = create(client, ASK, tools=[WEATHER], extra_body={"session_id": s})
    msg = r1.choices[0].message
    assert r1.choices[0].finish_reason == "tool_calls", msg
    call = msg.tool_calls[0]
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    assert "paris" in json.loads(call.function.arguments)["city"].lower()

    history = ASK + [{"role": "assistant", "content": msg.content,
                      "tool_calls": [tc.model_dump(exclude_none=True) for tc in msg.tool_calls]},
                     {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21, "sky": "sunny"}'}]
    r2 = create(client, history, tools=[WEATHER], max_tokens=24, extra_body={"session_id": s})
    info = r2.model_extra["deltaserve"]
    assert info["render_mode"] == "extended" and info["cache"]["reason"] == "extended"
    assert r2.usage.prompt_tokens_details.cached_tokens >= r1.usage.prompt_tokens + r1.usage.completion_tokens - 1
    assert r2.choices[0].message.content and not r2.choices[0].message.tool_calls

    # streaming gives the same call as deltas
    chunks = list(create(client, ASK, tools=[WEATHER], stream=True))
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].id and deltas[0].function.name == "get_weather"
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_forced_tool_calls(client):
    hello = [{"role": "user", "content": "Hello! How are you?"}]
    r = create(client, hello, tools=[WEATHER, TIME],
               tool_choice={"type": "function", "function": {"name": "get_time"}})
    calls = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and len(calls) == 1
    assert calls[0].function.name == "get_time"
    assert json.loads(calls[0].function.arguments)["tz"] in ("UTC", "CET")

    r = create(client, hello, tools=[WEATHER, TIME], tool_choice="required")
    calls = r.choices[0].message.tool_calls
    assert calls and calls[0].function.name in ("get_weather", "get_time")
    assert isinstance(json.loads(calls[0].function.arguments), dict)

    r = create(client, ASK, tools=[WEATHER], tool_choice="none", max_tokens=8)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError):
        create(client, hello, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}})


def agents_tool(name: str, what: str) -> dict:
    """A function tool as the OpenAI Agents SDK sends it: strict, every property required, a titled schema."""
    return {"type": "function", "function": {
        "name": name, "description": f"Get the {what} in a city.", "strict": True,
        "parameters": {"properties": {"city": {"title": "City", "type": "string"}}, "required": ["city"],
                       "title": f"{name}_args", "type": "object", "additionalProperties": False}}}


AGENT_TOOLS = [agents_tool("get_weather", "current weather"), agents_tool("get_time", "local time")]
CALLED = [{"role": "system", "content": "Answer with the tools, then reply in one short sentence."},
          {"role": "user", "content": "What is the weather and the local time in Paris?"},
          {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
              "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
          {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]


def test_strict_tools_enforced_output_equals_valid_unconstrained_output(served):
    """Enforcement is on by default, and for every request whose unconstrained greedy output is valid under the
    strict grammar, the enforced greedy output is token for token the same. The first two requests are turns
    of the OpenAI Agents SDK loops (tests/test_frameworks.py): Qwen writes its calls, then non-call JSON (the
    schema's title, `{"name": "get_weather_args", ...}`); a grammar that forbade that text turned it into
    more calls, and the loops never ended."""
    client, ctx = served
    assert ctx.enforce_strict_tools  # the default
    weather = [{"role": "system", "content": "You answer weather questions using tools."},
               {"role": "user", "content": "What is the weather in Paris?"}]
    cases = [  # messages, tools, max_tokens, whether the unconstrained output must be valid
        (CALLED, AGENT_TOOLS, 80, True),
        (weather, AGENT_TOOLS[:1], 60, True),
        ([{"role": "user", "content": "Say hello in three words."}], AGENT_TOOLS, 24, True),
        (ASK, [{**t, "function": {**t["function"], "strict": True}} for t in (WEATHER, TIME)], 48, False),
    ]
    valid_runs = 0
    try:
        for messages, tools, max_tokens, must_be_valid in cases:
            ids = {}
            for enforce in (False, True):
                ctx.enforce_strict_tools = enforce
                r = client.chat.completions.create(model=MODEL, messages=messages, tools=tools, temperature=0,
                                                   max_tokens=max_tokens, extra_body={"return_token_ids": True})
                ids[enforce] = r.choices[0].model_extra["token_ids"]
            matcher = asyncio.run(ctx.grammar_compiler()).for_text_or_tool_call(tools)
            valid = matcher.accept_many(ids[False]) == len(ids[False])  # EOS included: accepted only when complete
            assert valid or not must_be_valid, (messages[-1], ids[False])
            if valid:
                valid_runs += 1
                assert ids[True] == ids[False], (messages[-1], ids)
    finally:
        ctx.enforce_strict_tools = True
    assert valid_runs >= 3
