"""Request-size bound (server/limits.py): a toy app behind a real uvicorn server; no model needed."""

import httpx
import pytest
from fastapi import FastAPI, Request

from deltaserve.server.limits import BodySizeLimitMiddleware
from deltaserve.server.testing import ServerThread

LIMIT = 1000


@pytest.fixture(scope="module")
def base_url():
    app = FastAPI()
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=LIMIT)

    @app.post("/echo")
    async def echo(request: Request):
        return {"n": len(await request.body())}

    with ServerThread(app) as srv:
        yield srv.base_url


def test_body_within_limit_passes(base_url):
    r = httpx.post(base_url + "/echo", content=b"x" * LIMIT)
    assert r.status_code == 200 and r.json() == {"n": LIMIT}


def test_declared_oversized_body_is_413_openai_format(base_url):
    r = httpx.post(base_url + "/echo", content=b"x" * (LIMIT + 1))
    assert r.status_code == 413
    err = r.json()["error"]
    assert err["code"] == "request_too_large" and str(LIMIT) in err["message"]
    assert set(err) == {"message", "type", "param", "code"}


def test_chunked_oversized_body_is_413(base_url):
    def chunks():  # no Content-Length: the middleware must count the streamed bytes
        for _ in range(5):
            yield b"y" * 400

    r = httpx.post(base_url + "/echo", content=chunks())
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def _tool(name: str, pad: int = 0) -> dict:
    return {"type": "function", "function": {"name": name, "description": "d" * pad,
                                             "parameters": {"type": "object", "properties": {}}}}


def test_tool_count_and_schema_size_bounds():
    from deltaserve.server.errors import APIError
    from deltaserve.server.limits import MAX_SCHEMA_BYTES, MAX_TOOLS, check_schema, check_tools

    check_tools([_tool(f"t{i}") for i in range(MAX_TOOLS)])  # at the limit: accepted
    with pytest.raises(APIError) as e:
        check_tools([_tool(f"t{i}") for i in range(MAX_TOOLS + 1)])
    assert e.value.status == 400 and e.value.code == "too_many_tools"
    with pytest.raises(APIError) as e:
        check_tools([_tool("a"), _tool("big", MAX_SCHEMA_BYTES)])
    assert e.value.code == "schema_too_large" and e.value.param == "tools[1]"
    with pytest.raises(APIError) as e:
        check_schema({"description": "x" * MAX_SCHEMA_BYTES}, "response_format")
    assert e.value.status == 400 and e.value.param == "response_format"


# --------------------------------------------------------------------------- live: the real app, smollm
@pytest.fixture(scope="module")
def live(smollm_model):
    import openai
    import torch

    from deltaserve.engine.engine import EngineConfig, LLMEngine
    from deltaserve.server.app import create_app

    model, tok = smollm_model
    engine = LLMEngine(model, tok, EngineConfig(dtype=torch.float32, kv_cache_bytes=64 << 20))
    with ServerThread(create_app(engine, "m", max_request_bytes=16 * 1024)) as srv:
        yield openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0)


def test_live_oversized_body_413_and_too_many_tools_400(live):
    import openai

    from deltaserve.server.limits import MAX_TOOLS

    msgs = [{"role": "user", "content": "hi"}]
    ok = live.chat.completions.create(model="m", messages=msgs, max_tokens=2)
    assert ok.choices[0].message is not None
    with pytest.raises(openai.APIStatusError) as e:
        live.chat.completions.create(model="m", messages=[{"role": "user", "content": "x" * 20000}], max_tokens=2)
    assert e.value.status_code == 413 and e.value.body["code"] == "request_too_large"
    with pytest.raises(openai.BadRequestError) as e:
        live.chat.completions.create(model="m", messages=msgs, max_tokens=2,
                                     tools=[_tool(f"t{i}") for i in range(MAX_TOOLS + 1)])
    assert e.value.body["code"] == "too_many_tools"


# --------------------------------------------------------------------------- waiting-queue bound
def test_max_waiting_refuses_with_overloaded_then_429(smollm_model):
    """Deterministic: requests are queued without stepping, so the waiting queue only grows."""
    import torch

    from deltaserve.engine.api import Overloaded
    from deltaserve.engine.engine import EngineConfig, LLMEngine
    from deltaserve.engine.sampling import SamplingParams
    from deltaserve.server.errors import from_engine_error

    model, tok = smollm_model
    e = LLMEngine(model, tok, EngineConfig(dtype=torch.float32, kv_cache_bytes=32 << 20, max_waiting=1,
                                           speculation=False))
    e.add_request([1, 2, 3], SamplingParams(max_tokens=2))
    with pytest.raises(Overloaded) as ex:
        e.add_request([1, 2, 3], SamplingParams(max_tokens=2), session_id="s", open_session=True)
    assert ex.value.waiting == 1 and ex.value.limit == 1
    assert e.sessions.list(None) == []  # refused before the session was opened
    err = from_engine_error(ex.value)
    assert err.status == 429 and err.code == "server_overloaded" and "Retry-After" in err.response().headers


# --------------------------------------------------------------------------- admin endpoint
def test_admin_integrity_needs_admin_key(smollm_model):
    import torch

    from deltaserve.engine.engine import EngineConfig, LLMEngine
    from deltaserve.server.app import create_app

    model, tok = smollm_model
    engine = LLMEngine(model, tok, EngineConfig(dtype=torch.float32, kv_cache_bytes=32 << 20))
    with ServerThread(create_app(engine, "m")) as srv:  # no admin key: the route does not exist
        assert httpx.get(srv.base_url + "/v1/debug/integrity").status_code == 404
    with ServerThread(create_app(engine, "m", admin_key="adm")) as srv:
        url = srv.base_url + "/v1/debug/integrity"
        assert httpx.get(url).status_code == 401
        assert httpx.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
        r = httpx.get(url, headers={"Authorization": "Bearer adm"})
        assert r.status_code == 200
        body = r.json()
        assert body["ok"] is True and body["error"] is None and body["running"] == 0 and body["waiting"] == 0


def test_session_quota_per_key(smollm_model):
    import torch

    from deltaserve.engine.api import SessionQuotaExceeded
    from deltaserve.engine.engine import EngineConfig, LLMEngine
    from deltaserve.server.errors import from_engine_error

    model, tok = smollm_model
    e = LLMEngine(model, tok, EngineConfig(dtype=torch.float32, kv_cache_bytes=32 << 20, max_sessions_per_key=2))
    e.sessions.open("a1", "A")
    e.sessions.open("a2", "A")
    e.sessions.open("b1", "B")  # another key has its own quota
    with pytest.raises(SessionQuotaExceeded):
        e.sessions.open("a3", "A")
    with pytest.raises(SessionQuotaExceeded):
        e.sessions.fork("a1", "a1-fork", "A")
    assert [s.session_id for s in e.sessions.list("A")] == ["a1", "a2"]
    e.sessions.close("a2", "A")  # closing frees a place
    e.sessions.open("a3", "A")
    err = from_engine_error(SessionQuotaExceeded(2, 2))
    assert err.status == 429 and err.code == "session_quota_exceeded"


def test_pinned_token_quota_per_key_in_the_engine(smollm_model):
    """--max-pinned-tokens-per-key: a finished turn that puts its key over the quota unpins that key's least
    recently used sessions, and only that key's."""
    import torch

    from deltaserve.engine.engine import EngineConfig, LLMEngine
    from deltaserve.engine.sampling import SamplingParams

    model, tok = smollm_model
    e = LLMEngine(model, tok, EngineConfig(dtype=torch.float32, kv_cache_bytes=32 << 20, speculation=False,
                                           max_pinned_tokens_per_key=50, check_integrity=True))
    p = SamplingParams(max_tokens=2, ignore_eos=True)

    def turn(sid: str, owner: str, first: int) -> None:
        e.run_until_done([e.add_request(list(range(first, first + 20)), p, sid, owner, open_session=True)])

    turn("b1", "B", 100)  # the oldest pin; B is under its own quota
    turn("a1", "A", 200)  # each A turn pins ~21 tokens: the third puts A over 50
    turn("a2", "A", 300)
    assert e.get_session("a1").pinned and e.get_session("a2").pinned
    turn("a3", "A", 400)
    assert not e.get_session("a1").pinned  # A's least recently used
    assert e.get_session("a2").pinned and e.get_session("a3").pinned and e.get_session("b1").pinned
    assert e.stats()["demoted_sessions"] == 1


def test_grammar_compile_time_is_bounded(smollm_model):
    """A grammar that does not compile within ctx.grammar_timeout is a 400 naming the parameter."""
    import time

    import torch

    from deltaserve.engine.engine import EngineConfig, LLMEngine
    from deltaserve.server.app import create_app

    class SlowCompiler:
        def for_json_schema(self, schema):
            time.sleep(1.0)

    model, tok = smollm_model
    app = create_app(LLMEngine(model, tok, EngineConfig(dtype=torch.float32, kv_cache_bytes=16 << 20)), "m")
    app.state.ctx.grammar_timeout, app.state.ctx._grammar = 0.2, SlowCompiler()
    with ServerThread(app) as srv:
        r = httpx.post(srv.base_url + "/v1/chat/completions", timeout=30, json={
            "model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
            "response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": {"type": "object"}}}})
    assert r.status_code == 400 and r.json()["error"]["code"] == "grammar_too_complex", r.text
    assert r.json()["error"]["param"] == "response_format"
