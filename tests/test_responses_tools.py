"""Responses API tool calls with Qwen2.5-Coder-0.5B (slow: few model calls).

A 5-turn `previous_response_id` chain through a function_call / function_call_output round trip where every
turn extends the previous token state; `parallel_tool_calls: false` returns at most one call; with tools and
a JSON-schema output under `tool_choice: "auto"` one grammar lets the model either call a tool or answer in
the schema.
"""

from __future__ import annotations

import json

import openai
import pytest
import torch

from deltaserve.engine.engine import EngineConfig, LLMEngine
from deltaserve.server.app import create_app
from deltaserve.server.testing import ServerThread

MODEL = "qwen2.5-coder-0.5b"
WEATHER = {"type": "function", "name": "get_weather", "description": "Get the current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
ANSWER = {"type": "json_schema", "name": "answer", "strict": True,
          "schema": {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"],
                     "additionalProperties": False}}


@pytest.fixture(scope="module")
def client(qwen_dir):
    engine = LLMEngine.from_model(str(qwen_dir), EngineConfig(dtype=torch.float32, kv_cache_bytes=256 << 20))
    with ServerThread(create_app(engine, MODEL)) as srv:
        yield openai.OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0)


def _calls(r):
    return [it for it in r.output if it.type == "function_call"]


def test_tool_chain_extends_state_and_one_call(client):
    kw = dict(model=MODEL, input="What is the weather in Paris and in London?", tools=[WEATHER],
              parallel_tool_calls=False, temperature=0, max_output_tokens=64)
    r = client.responses.create(**kw)
    calls = _calls(r)
    assert len(calls) == 1, r.output  # parallel_tool_calls false: at most one (and this prompt needs one)
    assert calls[0].name == "get_weather" and "city" in json.loads(calls[0].arguments)
    with client.responses.stream(store=False, **kw) as s:  # the streamed call equals the non-streamed one
        types = [ev.type for ev in s]
        streamed = s.get_final_response()
    assert [(c.name, c.arguments) for c in _calls(streamed)] == [(calls[0].name, calls[0].arguments)]
    assert streamed.output_text == r.output_text
    assert "response.function_call_arguments.done" in types and types[-1] == "response.completed"
    state = r.usage.input_tokens + r.usage.output_tokens
    turns = [[{"type": "function_call_output", "call_id": calls[0].call_id, "output": '{"temp_c": 21}'}],
             "Thanks. Is that warm?", "One word: yes or no?", "Bye."]
    prev = r.id
    for i, inp in enumerate(turns):
        r = client.responses.create(model=MODEL, input=inp, previous_response_id=prev, temperature=0,
                                    max_output_tokens=12)  # tools inherited from the chain
        info = r.model_extra["deltaserve"]
        assert info["render_mode"] == "extended", (i, info)
        assert r.usage.input_tokens_details.cached_tokens >= state - 1, (i, info)
        prev, state = r.id, r.usage.input_tokens + r.usage.output_tokens


def test_tools_with_json_schema_auto(client):
    kw = dict(model=MODEL, tools=[WEATHER], tool_choice="auto", text={"format": ANSWER}, temperature=0,
              max_output_tokens=48)
    called = client.responses.create(input="What is the weather in Paris?", **kw)
    assert [c.name for c in _calls(called)] == ["get_weather"], called.output
    answered = client.responses.create(input='Reply with {"answer": 5}', **kw)
    assert not _calls(answered), answered.output
    assert json.loads(answered.output_text) == {"answer": 5}
    # the same grammar on chat completions (tools + response_format json_schema, tool_choice auto)
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the weather in Paris?"}], temperature=0,
        max_tokens=48, tools=[{"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}],
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER["schema"]}})
    assert chat.choices[0].finish_reason == "tool_calls", chat.choices[0].message
    assert [c.function.name for c in chat.choices[0].message.tool_calls] == ["get_weather"]
