"""The Responses API (`/v1/responses`) with SmolLM2 through the official `openai` SDK.

Streaming equals non-streaming token for token (greedy), a `previous_response_id` chain extends the exact
token state, stored responses can be read, listed and deleted by their owner only, and fields we cannot
honour are refused. Tool calls (which need a model that makes them) are in test_responses_tools.py.
"""

from __future__ import annotations

import openai
import pytest
import torch

from deltaserve.engine.engine import EngineConfig, LLMEngine
from deltaserve.server.app import create_app
from deltaserve.server.context import key_fingerprint
from deltaserve.server.testing import ServerThread

MODEL = "smollm2-135m"
INSTR = "You are a terse assistant."


@pytest.fixture(scope="module")
def clients(smollm_dir):
    """(client of key-a, client of key-b, the app under test)."""
    engine = LLMEngine.from_model(str(smollm_dir), EngineConfig(dtype=torch.float32, kv_cache_bytes=128 << 20))
    app = create_app(engine, MODEL, api_keys=["key-a", "key-b"])
    with ServerThread(app) as srv:
        a, b = (openai.OpenAI(base_url=srv.base_url + "/v1", api_key=k, max_retries=0) for k in ("key-a", "key-b"))
        yield a, b, app


def test_stream_equals_non_stream(clients):
    a, _, _ = clients
    kw = dict(model=MODEL, instructions=INSTR, input="Name three colours.", temperature=0, max_output_tokens=24)
    r = a.responses.create(**kw)
    types, seqs, deltas = [], [], []
    with a.responses.stream(**kw) as s:
        for ev in s:
            types.append(ev.type)
            seqs.append(ev.sequence_number)
            if ev.type == "response.output_text.delta":
                deltas.append(ev.delta)
        final = s.get_final_response() if types[-1] == "response.completed" else None
    assert seqs == list(range(len(seqs)))
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert types[-1] == ("response.completed" if r.status == "completed" else "response.incomplete")
    assert "".join(deltas) == r.output_text and r.output_text
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    if final is not None:
        assert final.output_text == r.output_text and final.usage.output_tokens == r.usage.output_tokens


def test_chain_extends_exact_state(clients):
    a, _, _ = clients
    prev, state = None, 0
    for i, text in enumerate(["Hi, I am Ann.", "I like tea.", "And cake.", "What do I like?", "Thanks."]):
        r = a.responses.create(model=MODEL, instructions=INSTR, input=text, previous_response_id=prev,
                               temperature=0, max_output_tokens=8)
        info = r.model_extra["deltaserve"]
        if prev is not None:
            assert info["render_mode"] == "extended", info
            assert r.usage.input_tokens_details.cached_tokens >= state - 1, (i, info)
        assert r.previous_response_id == prev
        prev, state = r.id, r.usage.input_tokens + r.usage.output_tokens
    # input_items lists a response's own input, not the chain's
    items = a.responses.input_items.list(prev, order="asc")
    assert [it.content[0].text for it in items.data] == ["Thanks."]


def test_a_stored_response_is_the_engines_turn_record(clients):
    """One store: the Response shown is the view on the engine's TurnRecord for that id, so what the engine
    forgets (bounded store, DELETE) is gone from every route; a chat completion's id is not a Response."""
    a, _, app = clients
    driver, owner = app.state.ctx.driver, key_fingerprint("key-a")
    r1 = a.responses.create(model=MODEL, instructions=INSTR, input="Count to three.", temperature=0,
                            max_output_tokens=10)
    record = driver.response(r1.id, owner)
    assert record.view.response["output"][0]["content"][0]["text"] == r1.output_text
    assert record.transcript.tokens  # the exact token state a continuation extends
    chat = a.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert driver.response(chat.id, owner) is not None
    with pytest.raises(openai.NotFoundError):
        a.responses.retrieve(chat.id)
    assert driver.forget_response(r1.id, owner)
    for call in (lambda: a.responses.retrieve(r1.id), lambda: a.responses.input_items.list(r1.id),
                 lambda: a.responses.create(model=MODEL, input="Again.", previous_response_id=r1.id,
                                            max_output_tokens=2)):
        with pytest.raises(openai.NotFoundError):
            call()


def test_pinned_chain_is_a_session(clients):
    """`session_ttl` (deltaserve extension): the chain's KV is a pinned session that each turn continues."""
    a, _, _ = clients
    r1 = a.responses.create(model=MODEL, input="Hi.", temperature=0, max_output_tokens=6,
                            extra_body={"session_ttl": 60})
    sid = r1.model_extra["deltaserve"]["session_id"]
    assert sid and a.get(f"/sessions/{sid}", cast_to=object)["pinned"]
    r2 = a.responses.create(model=MODEL, input="Bye.", temperature=0, max_output_tokens=6, previous_response_id=r1.id)
    info = r2.model_extra["deltaserve"]
    assert info["session_id"] == sid and info["cache"]["reason"] == "extended", info
    assert r2.usage.input_tokens_details.cached_tokens >= r1.usage.input_tokens + r1.usage.output_tokens - 1
    # continuing from r1 again forks: r1 is no longer the session's last turn
    r3 = a.responses.create(model=MODEL, input="Bye.", temperature=0, max_output_tokens=6, previous_response_id=r1.id)
    assert r3.model_extra["deltaserve"]["session_id"] is None and r3.output_text == r2.output_text
    # ... and with session_ttl the fork is a new pinned chain made by forking the session at r1's turn
    r4 = a.responses.create(model=MODEL, input="Bye.", temperature=0, max_output_tokens=6, previous_response_id=r1.id,
                            extra_body={"session_ttl": 60})
    fork = r4.model_extra["deltaserve"]
    assert fork["session_id"] not in (None, sid) and fork["cache"]["reason"] == "extended", fork
    assert r4.output_text == r2.output_text
    info = a.get(f"/sessions/{fork['session_id']}", cast_to=object)
    assert info["pinned"] and [t["turn"] for t in info["history"]] == [1, 2]


def test_changed_instructions_rerender(clients):
    a, _, _ = clients
    r1 = a.responses.create(model=MODEL, instructions=INSTR, input="Hello.", temperature=0, max_output_tokens=4)
    r2 = a.responses.create(model=MODEL, instructions="Answer in French.", input="Bye.", temperature=0,
                            max_output_tokens=4, previous_response_id=r1.id)
    assert r2.model_extra["deltaserve"]["render_mode"] == "full"


def test_get_input_items_delete_and_owner(clients):
    a, b, _ = clients
    r = a.responses.create(model=MODEL, input=[
        {"role": "developer", "content": "Be brief."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]}],
        temperature=0, max_output_tokens=4, metadata={"run": "t1"})
    got = a.responses.retrieve(r.id)
    assert got.id == r.id and got.output_text == r.output_text and got.metadata == {"run": "t1"}
    items = a.responses.input_items.list(r.id, order="asc").data
    assert [(it.role, it.content[0].text) for it in items] == [("developer", "Be brief."), ("user", "Hi")]
    assert [it.id for it in a.responses.input_items.list(r.id).data] == [it.id for it in reversed(items)]
    for call in (lambda: b.responses.retrieve(r.id), lambda: b.responses.delete(r.id),
                 lambda: b.responses.create(model=MODEL, input="x", previous_response_id=r.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    a.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        a.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        a.responses.create(model=MODEL, input="x", previous_response_id=r.id)


def test_store_false_is_not_kept(clients):
    a, _, _ = clients
    r = a.responses.create(model=MODEL, input="Hi", store=False, temperature=0, max_output_tokens=2)
    with pytest.raises(openai.NotFoundError):
        a.responses.retrieve(r.id)


@pytest.mark.parametrize("extra, param", [
    ({"reasoning": {"effort": "low"}}, "reasoning"),
    ({"background": True}, "background"),
    ({"include": ["reasoning.encrypted_content"]}, "include"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"truncation": "auto"}, "truncation"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"tool_choice": {"type": "file_search"}, "tools": [{"type": "function", "name": "f"}]}, "tool_choice"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]},
     "input[0].content[0]"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type"),
])
def test_unsupported_fields_are_refused(clients, extra, param):
    a, _, _ = clients
    body = {"model": MODEL, "input": "Hi", "max_output_tokens": 2, **extra}
    with pytest.raises(openai.BadRequestError) as e:
        a.post("/responses", body=body, cast_to=object)
    assert e.value.body["param"] == param and e.value.status_code == 400


def test_parallel_false_keeps_the_first_call():
    """(The test models never emit two calls for one turn, so the cut is checked here directly.)"""
    from deltaserve.server.chat_api import limit_calls

    calls = [{"id": "a"}, {"id": "b"}]
    assert limit_calls(calls, None) == (calls, True)
    assert limit_calls(calls, 1) == ([{"id": "a"}], False)  # not exact: the tokens spell a dropped call
    assert limit_calls(calls[:1], 1) == (calls[:1], True)
