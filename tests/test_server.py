"""The HTTP server end to end: the official openai SDK against a live uvicorn with SmolLM2-135M.

One engine and one server per module (plus a second app with API keys on the
same engine); every request is greedy with a handful of tokens. Outputs are
checked token for token against a *stateless* reference engine that shares
the weights (no cache, no speculation): that is "recompute", so a match
shows the cached / session / delta / disconnected paths change nothing.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid

import httpx
import openai
import pytest
import torch

from deltaserve.engine.engine import EngineConfig, LLMEngine
from deltaserve.engine.kv_manager import CacheMode
from deltaserve.engine.sampling import SamplingParams
from deltaserve.server.app import create_app
from deltaserve.server.testing import ServerThread

MODEL = "smollm2-135m"
KEYS = ["key-one", "key-two"]
N = 6  # max_tokens for most requests


@pytest.fixture(scope="module")
def engine(smollm_model):  # conftest: weights shared with other modules (the model itself is stateless)
    model, tok = smollm_model
    return LLMEngine(model, tok, EngineConfig(dtype=torch.float32, kv_cache_bytes=256 << 20, check_integrity=True))


@pytest.fixture(scope="module")
def ref(engine):
    """Stateless recompute on the same weights, used only from the test thread while the server idles."""
    cfg = EngineConfig(dtype=torch.float32, kv_cache_bytes=32 << 20, cache_mode=CacheMode.STATELESS,
                       speculation=False)
    e = LLMEngine(engine.model, engine.tokenizer, cfg)

    def generate(prompt_ids: list[int], max_tokens: int = N) -> list[int]:
        return e.generate([list(prompt_ids)], SamplingParams(max_tokens=max_tokens))[0]

    return generate


@pytest.fixture(scope="module")
def server(engine):
    with ServerThread(create_app(engine, MODEL)) as srv:
        yield srv


@pytest.fixture(scope="module")
def keyed(engine, server):  # a second app on the same engine (one engine thread, shared by refcount)
    with ServerThread(create_app(engine, MODEL, api_keys=KEYS)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=120) as c:
        yield c


def chat(client, messages, **kw):
    extra = kw.pop("extra_body", {})
    return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=kw.pop("max_tokens", N),
                                          temperature=0, extra_body={"return_token_ids": True, **extra}, **kw)


def ext(resp) -> dict:
    return resp.model_extra["deltaserve"]


def sid() -> str:
    return "s-" + uuid.uuid4().hex[:12]


USER = [{"role": "user", "content": "Name three colors."}]


# --------------------------------------------------------------------------- basics
def test_models_health_openapi(client, http):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert http.get("/health").json()["status"] == "ok"
    paths = http.get("/openapi.json").json()["paths"]
    doc = http.get("/openapi.json").json()
    links = doc["paths"]["/v1/responses"]["post"]["responses"]["200"]["links"]
    ops = {op["operationId"] for path in doc["paths"].values() for op in path.values()}
    assert len(links) == 3 and all(k in ops and v["parameters"] == {"response_id": "$response.body#/id"}
                                   for k, v in links.items())
    assert len(doc["paths"]["/v1/sessions"]["post"]["responses"]["200"]["links"]) == 6
    for p in ("/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/sessions", "/v1/sessions/{session_id}",
              "/v1/sessions/{session_id}/chat/completions", "/v1/sessions/{session_id}/fork", "/health", "/metrics"):
        assert p in paths, p


def test_chat_equals_engine_and_usage(client, ref, engine):
    r = chat(client, USER)
    prompt = r.model_extra["prompt_token_ids"]
    assert prompt == engine.tokenizer.apply_chat(USER)
    out = r.choices[0].model_extra["token_ids"]
    assert out == ref(prompt)
    assert r.choices[0].message.content == engine.tokenizer.decode(out)
    u = r.usage
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (len(prompt), len(out), len(prompt) + len(out))
    assert u.prompt_tokens_details.cached_tokens >= 0
    d = u.completion_tokens_details
    assert d.accepted_prediction_tokens >= 0 and d.rejected_prediction_tokens >= 0
    assert ext(r)["render_mode"] == "full" and ext(r)["cache"]["reason"] == "no_session"
    assert u.model_extra["deltaserve"] == ext(r)
    # the same prefix again comes from the radix cache
    r2 = chat(client, USER)
    assert r2.usage.prompt_tokens_details.cached_tokens >= len(prompt) - 1
    assert r2.choices[0].message.content == r.choices[0].message.content


def test_stream_equals_nonstream(client):
    r = chat(client, USER, max_tokens=8)
    stream = chat(client, USER, max_tokens=8, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == r.choices[0].finish_reason
    assert finals[0].model_extra["deltaserve"]["cache"]["cached_tokens"] > 0
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_completions(client, engine, ref):
    prompt = "The capital of France is"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=N, temperature=0)
    ids = engine.tokenizer.encode(prompt)
    assert r.choices[0].text == engine.tokenizer.decode(ref(ids))
    assert r.usage.prompt_tokens == len(ids)
    r2 = client.completions.create(model=MODEL, prompt=ids, max_tokens=N, temperature=0)
    assert r2.choices[0].text == r.choices[0].text
    assert r2.usage.prompt_tokens_details.cached_tokens >= len(ids) - 1
    s = client.completions.create(model=MODEL, prompt=prompt, max_tokens=N, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in s if c.choices) == r.choices[0].text


def test_stop_string(client):
    base = chat(client, USER, max_tokens=10).choices[0].message.content
    assert len(base) >= 12, base
    stop = base[len(base) // 2 : len(base) // 2 + 3]  # may span token boundaries
    want = base[: base.index(stop)]
    r = chat(client, USER, max_tokens=10, stop=[stop])
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (want, "stop")
    s = chat(client, USER, max_tokens=10, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in s if c.choices) == want


def test_json_schema_response_format(client):
    schema = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
              "required": ["answer"], "additionalProperties": False}
    r = chat(client, [{"role": "user", "content": "Is the sky blue? Answer in JSON."}], max_tokens=24,
             response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
    import json

    assert json.loads(r.choices[0].message.content)["answer"] in ("yes", "no")
    assert r.choices[0].finish_reason == "stop"


# --------------------------------------------------------------------------- sessions
def _turn2(r1, user2="And three animals?"):
    return USER + [{"role": "assistant", "content": r1.choices[0].message.content},
                   {"role": "user", "content": user2}]


def test_session_turns_extend(client, ref):
    s = sid()
    r1 = chat(client, USER, extra_body={"session_id": s})
    assert ext(r1)["session_id"] == s and ext(r1)["cache"]["reason"] == "new_session"
    r2 = chat(client, _turn2(r1), extra_body={"session_id": s})
    info = ext(r2)
    assert info["render_mode"] == "extended" and info["cache"]["reason"] == "extended"
    assert r2.usage.prompt_tokens_details.cached_tokens >= r1.usage.prompt_tokens + r1.usage.completion_tokens - 1
    prompt2 = r2.model_extra["prompt_token_ids"]
    assert prompt2[: len(r1.model_extra["prompt_token_ids"])] == r1.model_extra["prompt_token_ids"]
    assert r2.choices[0].model_extra["token_ids"] == ref(prompt2)
    # the header form names the same session
    r3 = chat(client, _turn2(r2, "Thanks."), extra_headers={"X-Session-Id": s})
    assert ext(r3)["session_id"] == s


def test_delta_route(server, client, http, ref):
    s = sid()
    delta = openai.OpenAI(base_url=f"{server.base_url}/v1/sessions/{s}", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        chat(delta, [{"role": "user", "content": "hi"}])
    assert http.post("/v1/sessions", json={"session_id": s}).status_code == 200
    with pytest.raises(openai.BadRequestError, match="no completed turn"):
        chat(delta, [{"role": "user", "content": "hi"}])
    r1 = chat(client, USER, extra_body={"session_id": s})
    r2 = chat(delta, [{"role": "user", "content": "And three animals?"}])
    assert ext(r2)["render_mode"] == "extended" and ext(r2)["session_id"] == s
    assert r2.usage.prompt_tokens_details.cached_tokens >= r1.usage.prompt_tokens + r1.usage.completion_tokens - 1
    full = chat(client, _turn2(r1))  # the same turn, full history, no session
    assert r2.choices[0].message.content == full.choices[0].message.content
    assert r2.choices[0].model_extra["token_ids"] == ref(r2.model_extra["prompt_token_ids"])


def test_previous_response_id(client, ref):
    r1 = chat(client, USER)
    new = [{"role": "user", "content": "And three animals?"}]
    r2 = chat(client, new, extra_body={"previous_response_id": r1.id})
    assert r2.usage.prompt_tokens_details.cached_tokens >= r1.usage.prompt_tokens + r1.usage.completion_tokens - 1
    assert r2.choices[0].model_extra["token_ids"] == ref(r2.model_extra["prompt_token_ids"])
    assert r2.choices[0].message.content == chat(client, _turn2(r1)).choices[0].message.content
    # in a session: continue while the session is at that response, fork once it moved on
    s = sid()
    a = chat(client, USER, extra_body={"session_id": s})
    b = chat(client, new, extra_body={"previous_response_id": a.id})
    assert ext(b)["session_id"] == s and ext(b)["cache"]["reason"] == "extended"
    fork = chat(client, [{"role": "user", "content": "Something else."}], extra_body={"previous_response_id": a.id})
    assert ext(fork)["session_id"] is None
    assert fork.usage.prompt_tokens_details.cached_tokens >= a.usage.prompt_tokens
    with pytest.raises(openai.NotFoundError):
        chat(client, new, extra_body={"previous_response_id": "chatcmpl-nope"})


def test_fork_route(server, client, http, ref):
    s = sid()
    r1 = chat(client, USER, extra_body={"session_id": s})
    f = http.post(f"/v1/sessions/{s}/fork", json={"session_id": s + "-f"})
    assert f.status_code == 200
    info = f.json()
    assert (info["id"], info["state"], info["pinned"], info["has_transcript"], info["turns"]) == (
        s + "-f", "pinned", True, True, 0)
    assert info["tokens"] == http.get(f"/v1/sessions/{s}").json()["tokens"]
    assert http.post(f"/v1/sessions/{s}/fork", json={"session_id": s + "-f"}).status_code == 409
    assert http.post("/v1/sessions/nope/fork", json={}).status_code == 404
    # both continue from the same state with different messages (delta route): each equals recompute and
    # reuses all of the shared state
    outs = []
    for which, question in ((s, "And three animals?"), (s + "-f", "And three fruits?")):
        delta = openai.OpenAI(base_url=f"{server.base_url}/v1/sessions/{which}", api_key="unused", max_retries=0)
        r = chat(delta, [{"role": "user", "content": question}])
        assert ext(r)["render_mode"] == "extended" and ext(r)["cache"]["reason"] == "extended"
        assert r.usage.prompt_tokens_details.cached_tokens >= r1.usage.prompt_tokens + r1.usage.completion_tokens - 1
        assert r.choices[0].model_extra["token_ids"] == ref(r.model_extra["prompt_token_ids"])
        outs.append(r.model_extra["prompt_token_ids"])
    assert outs[0] != outs[1]
    auto = http.post(f"/v1/sessions/{s}/fork").json()["id"]  # an id is made up when none is given
    assert auto.startswith("sess_") and http.delete(f"/v1/sessions/{auto}").status_code == 200


def test_fork_at_turn_and_rollback_routes(server, client, http, ref):
    s = sid()
    r1 = chat(client, USER, extra_body={"session_id": s})
    chat(client, _turn2(r1), extra_body={"session_id": s})
    hist = http.get(f"/v1/sessions/{s}").json()["history"]
    assert [t["turn"] for t in hist] == [1, 2] and all(t["has_transcript"] for t in hist)
    assert hist[0]["end"] == r1.usage.prompt_tokens + r1.usage.completion_tokens - 1
    f = http.post(f"/v1/sessions/{s}/fork", json={"session_id": s + "-t1", "turn": 1}).json()
    assert (f["tokens"], len(f["history"]), f["pinned"]) == (hist[0]["end"], 1, True)
    outs = []
    for which in (s + "-t1", s):
        if which == s:
            rb = http.post(f"/v1/sessions/{s}/rollback", json={"turn": 1})
            assert rb.status_code == 200 and rb.json()["tokens"] == hist[0]["end"] and len(rb.json()["history"]) == 1
        delta = openai.OpenAI(base_url=f"{server.base_url}/v1/sessions/{which}", api_key="unused", max_retries=0)
        r = chat(delta, [{"role": "user", "content": "And three rivers?"}])  # extends turn 1's messages exactly
        assert ext(r)["render_mode"] == "extended" and ext(r)["cache"]["reason"] == "extended"
        assert ext(r)["cache"]["cached_tokens"] >= hist[0]["end"]  # the fork and the rollback reuse turn 1
        assert r.choices[0].model_extra["token_ids"] == ref(r.model_extra["prompt_token_ids"])
        outs.append(r.choices[0].model_extra["token_ids"])
    assert outs[0] == outs[1]
    for bad in ({"turn": 9}, {"turn": 0}, {}):
        r = http.post(f"/v1/sessions/{s}/rollback", json=bad)
        assert r.status_code == 400 and "error" in r.json(), bad
    assert http.post(f"/v1/sessions/{s}/fork", json={"turn": 9}).status_code == 400
    assert http.post("/v1/sessions/nope/rollback", json={"turn": 1}).status_code == 404


def test_retried_turn_extends_the_turn_the_client_got(client, ref):
    """A client whose turn 2 reply never arrived (a crash, a timeout) retries it: the history extends turn 1's
    recorded messages, so the prompt is still rendered as an exact extension (not in full)."""
    s = sid()
    r1 = chat(client, USER, extra_body={"session_id": s})
    chat(client, _turn2(r1), extra_body={"session_id": s})  # the reply the client "lost"
    retry = chat(client, _turn2(r1, "And three birds?"), extra_body={"session_id": s})
    assert ext(retry)["render_mode"] == "extended" and ext(retry)["cache"]["reason"] == "diverged"
    assert retry.model_extra["prompt_token_ids"][: len(r1.model_extra["prompt_token_ids"])] == \
        r1.model_extra["prompt_token_ids"]
    assert retry.choices[0].model_extra["token_ids"] == ref(retry.model_extra["prompt_token_ids"])


def test_export_import_state_routes(client, http, ref):
    s = sid()
    r1 = chat(client, USER, extra_body={"session_id": s})
    exported = http.get(f"/v1/sessions/{s}/state")
    assert exported.status_code == 200 and exported.headers["content-type"] == "application/octet-stream"
    put = http.put(f"/v1/sessions/{s}-copy/state", content=exported.content,
                   headers={"Content-Type": "application/octet-stream"})
    assert put.status_code == 200, put.text
    info = put.json()
    assert (info["state"], info["tokens"], len(info["history"])) == ("stored", r1.usage.prompt_tokens +
                                                                      r1.usage.completion_tokens - 1, 1)
    r2 = chat(client, _turn2(r1), extra_body={"session_id": s + "-copy"})
    assert ext(r2)["render_mode"] == "extended"  # the import carried turn 1's messages
    assert r2.usage.prompt_tokens_details.cached_tokens >= info["tokens"]
    assert r2.choices[0].model_extra["token_ids"] == ref(r2.model_extra["prompt_token_ids"])
    again = http.put(f"/v1/sessions/{s}-copy/state", content=exported.content)
    assert again.status_code == 409
    bad = http.put(f"/v1/sessions/{s}-bad/state", content=exported.content[:-9])
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_session_state"
    assert http.get(f"/v1/sessions/{s}-bad").status_code == 404  # a refused import makes nothing
    assert http.get("/v1/sessions/nope/state").status_code == 404


def test_session_routes(http):
    s = sid()
    r = http.post("/v1/sessions", json={"session_id": s, "ttl": 42})
    assert r.status_code == 200 and r.json()["id"] == s and r.json()["ttl"] == 42
    assert http.post("/v1/sessions", json={"session_id": s}).status_code == 409
    assert http.get(f"/v1/sessions/{s}").json()["state"] == "new"
    assert s in [x["id"] for x in http.get("/v1/sessions").json()["data"]]
    assert http.patch(f"/v1/sessions/{s}", json={"ttl": 7}).json()["ttl"] == 7
    assert http.post(f"/v1/sessions/{s}/ttl", json={"ttl": 8}).json()["ttl"] == 8
    http.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, "max_tokens": 2, "session_id": s})
    info = http.get(f"/v1/sessions/{s}").json()
    assert info["pinned"] and info["turns"] == 1 and info["tokens"] > 0 and 0 < info["ttl_remaining"] <= 8
    assert info["last_match"]["reason"] == "new_session" and info["has_transcript"]
    auto = http.post("/v1/sessions").json()["id"]
    assert http.delete(f"/v1/sessions/{auto}").json()["deleted"]
    assert http.delete(f"/v1/sessions/{s}").json() == {"id": s, "object": "session.deleted", "deleted": True}
    for resp in (http.get(f"/v1/sessions/{s}"), http.delete(f"/v1/sessions/{s}")):
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "session_not_found"


# --------------------------------------------------------------------------- errors
def test_bad_bodies_are_400(http):
    bad = [
        {"model": MODEL},
        {"model": MODEL, "messages": "hi"},
        {"model": MODEL, "messages": [{"role": "bogus", "content": "x"}]},
        {"model": MODEL, "messages": USER, "temperature": 5},
        {"model": MODEL, "messages": USER, "n": 2},
        {"model": MODEL, "messages": USER, "tool_choice": "required"},
        {"model": MODEL, "messages": [{"role": "tool", "content": "x"}]},
    ]
    for body in bad:
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    r = http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": ["a", "b"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert http.get("/v1/nope").json()["error"]["code"] == "not_found"


def test_unknown_model_and_too_long(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=USER, max_tokens=1)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, [{"role": "user", "content": "hello " * 9000}], max_tokens=1)
    assert e.value.body["code"] == "context_length_exceeded"
    m = re.search(r"prompt_tokens=(\d+), max_context=(\d+)", e.value.body["message"])
    assert m and int(m.group(1)) > int(m.group(2)) == 8192


def test_concurrent_turn_409_and_disconnect_then_recompute(server, client, http, ref):
    s = sid()
    r1 = chat(client, USER, extra_body={"session_id": s})
    tokens_before = http.get(f"/v1/sessions/{s}").json()["tokens"]
    messages = _turn2(r1)

    async def scenario():
        ac = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)
        stream = await ac.chat.completions.create(model=MODEL, messages=messages, max_tokens=200, temperature=0,
                                                  stream=True, extra_body={"session_id": s, "ignore_eos": True})
        got = 0
        async for c in stream:
            got += bool(c.choices and c.choices[0].delta.content)
            if got >= 2:
                break
        with pytest.raises(openai.ConflictError) as e:
            await ac.chat.completions.create(model=MODEL, messages=messages, max_tokens=2,
                                             extra_body={"session_id": s})
        assert e.value.body["code"] == "session_busy"
        await stream.close()  # drop the connection mid-generation
        await ac.close()

    asyncio.run(scenario())
    deadline = time.monotonic() + 30
    while (info := http.get(f"/v1/sessions/{s}").json())["busy"]:
        assert time.monotonic() < deadline, "the aborted turn never finished"
        time.sleep(0.1)
    assert info["turns"] == 2 and tokens_before < info["tokens"] < tokens_before + 150  # partial KV kept
    r2 = chat(client, messages, extra_body={"session_id": s})
    assert r2.choices[0].model_extra["token_ids"] == ref(r2.model_extra["prompt_token_ids"])
    assert r2.usage.prompt_tokens_details.cached_tokens >= r1.usage.prompt_tokens + r1.usage.completion_tokens - 1


def test_metrics(http, client):
    chat(client, USER, max_tokens=2)
    text = http.get("/metrics").text
    assert re.search(r'deltaserve_http_requests_total\{method="POST",route="/v1/chat/completions",status="200"\} '
                     r'[1-9]', text)
    for name in ("deltaserve_request_latency_seconds_bucket", "deltaserve_time_to_first_token_seconds_bucket",
                 "deltaserve_prompt_tokens_total", "deltaserve_cached_tokens_total",
                 "deltaserve_prefilled_tokens_total", "deltaserve_cache_hit_ratio", "deltaserve_pinned_sessions",
                 "deltaserve_kv_usage_ratio", "deltaserve_kv_evicted_tokens_total",
                 "deltaserve_spec_drafted_tokens_total", "deltaserve_spec_accepted_tokens_total"):
        assert name in text, name
    assert 'route="/v1/sessions/{session_id}"' in text  # templates, not raw ids


# --------------------------------------------------------------------------- API keys
def test_api_keys_and_ownership(keyed):
    url = keyed.base_url + "/v1"
    one, two = (openai.OpenAI(base_url=url, api_key=k, max_retries=0) for k in KEYS)
    for bad in (openai.OpenAI(base_url=url, api_key="wrong", max_retries=0),):
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    assert httpx.get(url + "/models").status_code == 401
    assert httpx.get(keyed.base_url + "/health").status_code == 200
    s = sid()
    r = chat(one, USER, max_tokens=2, extra_body={"session_id": s})
    h1, h2 = ({"Authorization": f"Bearer {k}"} for k in KEYS)
    assert httpx.get(f"{url}/sessions/{s}", headers=h1).status_code == 200
    assert httpx.get(f"{url}/sessions/{s}", headers=h2).status_code == 404
    assert httpx.delete(f"{url}/sessions/{s}", headers=h2).status_code == 404
    assert httpx.post(f"{url}/sessions/{s}/fork", headers=h2, json={}).status_code == 404
    with pytest.raises(openai.NotFoundError):
        chat(two, USER, max_tokens=2, extra_body={"session_id": s})
    with pytest.raises(openai.NotFoundError):
        chat(two, USER, max_tokens=2, extra_body={"previous_response_id": r.id})
    assert s not in [x["id"] for x in httpx.get(f"{url}/sessions", headers=h2).json()["data"]]


def test_nonstream_disconnect_aborts(server, http):
    s = sid()
    body = {"model": MODEL, "messages": USER, "max_tokens": 300, "temperature": 0, "ignore_eos": True,
            "session_id": s}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(60, read=1.5))
    t0 = time.monotonic()
    while (info := http.get(f"/v1/sessions/{s}").json())["busy"]:
        assert time.monotonic() - t0 < 8, "generation kept running after the client left"
        time.sleep(0.1)
    assert 0 < info["tokens"] < info["prompt_tokens"] + 150
    assert info["has_transcript"] is False  # an abandoned turn is not a turn the client saw


def _cached(c, prompt: str, **extra) -> tuple[int, str]:
    r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, extra_body=extra or None)
    return r.usage.prompt_tokens_details.cached_tokens, r.choices[0].text


def test_cache_is_isolated_between_api_keys(keyed):
    """Key B sending key A's exact prompt reuses none of A's KV; A resending hits; outputs equal."""
    url = keyed.base_url + "/v1"
    one, two = (openai.OpenAI(base_url=url, api_key=k, max_retries=0) for k in KEYS)
    prompt = f"Tenant isolation probe {sid()}: " + "the quick brown fox jumps over the lazy dog. " * 12
    first, out_a = _cached(one, prompt)
    assert first == 0
    b, out_b = _cached(two, prompt)
    assert b == 0, "another key's prompt was served from the cache"
    a, out_a2 = _cached(one, prompt)
    assert a > 0
    b2, _ = _cached(two, prompt)
    assert b2 > 0  # B's own earlier request is now cached in B's namespace
    assert out_a == out_b == out_a2  # greedy output does not depend on the tenant


def test_cache_salt_scopes_reuse(server):
    c = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)
    prompt = f"Salt probe {sid()}: " + "lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 10
    assert _cached(c, prompt, cache_salt="s1")[0] == 0
    assert _cached(c, prompt, cache_salt="s2")[0] == 0  # different salt: no sharing
    assert _cached(c, prompt)[0] == 0  # no salt: its own namespace too
    assert _cached(c, prompt, cache_salt="s1")[0] > 0  # same salt shares
    bad = httpx.post(server.base_url + "/v1/completions", json={"model": MODEL, "prompt": "x", "cache_salt": ""})
    assert bad.status_code == 400


def test_tenant_header_isolates_cache(engine, server):
    with ServerThread(create_app(engine, MODEL, tenant_header="X-Tenant")) as srv:
        url = srv.base_url + "/v1/completions"
        prompt = f"Gateway tenant probe {sid()}: " + "pack my box with five dozen liquor jugs. " * 12
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 2, "temperature": 0}

        def cached(headers):
            r = httpx.post(url, json=body, headers=headers, timeout=120)
            assert r.status_code == 200, r.text
            return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

        assert cached({"X-Tenant": "acme"}) == 0
        assert cached({"X-Tenant": "globex"}) == 0
        assert cached({}) == 0  # no header: the anonymous tenant, its own namespace
        assert cached({"X-Tenant": "acme"}) > 0
        assert cached({}) > 0


def test_shared_prefix_is_shared_across_keys_and_nothing_else(engine, keyed):
    """--shared-prefix: key B reuses the declared prefix key A computed, and only it (A's own text stays A's)."""
    from deltaserve.cache.shared_prefix import declared_prefix

    url = keyed.base_url + "/v1"
    one, two = (openai.OpenAI(base_url=url, api_key=k, max_retries=0) for k in KEYS)
    system = f"Shared system prompt {sid()}: you are a careful agent with tools search and read.\n" * 3
    declared = tuple(engine.tokenizer.encode(system))
    own = "Private notes of tenant A: the launch code is 1234. " * 6
    assert declared_prefix([declared], engine.tokenizer.encode(system + own)) == len(declared)  # token-exact
    before = list(engine.kv.shared_prefixes)
    engine.kv.shared_prefixes = [declared]
    try:
        a, out_a = _cached(one, system + own)
        assert a == 0
        b, out_b = _cached(two, system + own)
        assert b == len(declared), "B must reuse exactly the declared prefix, never A's own text"
        assert out_a == out_b
    finally:
        engine.kv.shared_prefixes = before


def test_responses_api_cache_is_isolated_between_api_keys(keyed):
    h1, h2 = ({"Authorization": f"Bearer {k}"} for k in KEYS)
    body = {"model": MODEL, "input": f"Responses probe {sid()}: " + "sphinx of black quartz, judge my vow. " * 12,
            "max_output_tokens": 2, "temperature": 0}

    def cached(h):
        r = httpx.post(keyed.base_url + "/v1/responses", json=body, headers=h, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["usage"]["input_tokens_details"]["cached_tokens"]

    cached(h1)
    b, a = cached(h2), cached(h1)  # each key may hit its own earlier chat-template prefix, nothing more for B
    assert a >= b + 60, f"key two reused {b} tokens, key one {a}: the 100-token input leaked across keys"
