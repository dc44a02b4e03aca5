"""deltaserve HTTP API: OpenAI-compatible, plus sessions whose KV cache survives between turns.

Endpoints
---------
GET  /health                         liveness: {"status": "ok", "model": ...} (no auth)
GET  /metrics                        Prometheus text (no auth); see `metrics.py` for the names
GET  /v1/models                      the one served model
POST /v1/chat/completions            chat; `stream: true` gives SSE chunks ending in `data: [DONE]`
POST /v1/completions                 text / token-id prompts
POST /v1/sessions                    create a session: {"session_id"?: str, "ttl"?: seconds}
GET  /v1/sessions                    list this key's sessions
GET  /v1/sessions/{id}               state, token count, pin, ttl_remaining, counters, last_match
PATCH /v1/sessions/{id}              {"ttl": seconds} (also POST /v1/sessions/{id}/ttl)
DELETE /v1/sessions/{id}             close; the KV becomes ordinary evictable prefix cache
POST /v1/sessions/{id}/chat/completions   delta turn: `messages` = only the NEW messages

OpenAI request fields supported: messages (system/developer/user/assistant
with tool_calls/tool with tool_call_id; text content parts), tools,
tool_choice ("auto" | "none" | "required" | {"type": "function", "function":
{"name": ...}}), parallel_tool_calls (only with "required": allows several
calls), temperature (default 1.0), top_p, seed, stop (str | list),
max_tokens / max_completion_tokens (default: what the context leaves), n=1,
stream, stream_options.include_usage, response_format (text | json_object |
json_schema, enforced by grammar-constrained decoding). vLLM extensions:
top_k, ignore_eos, stop_token_ids. Accepted but ignored: presence_penalty,
frequency_penalty, user. Rejected with 400: n>1, logprobs, image parts,
suffix, batched completion prompts.

deltaserve extensions
---------------------
* `session_id` (body) or `X-Session-Id` (header): the turn belongs to that
  session; an unseen id opens it (owned by the calling API key). The client
  sends the full history as usual; because the server keeps the session's
  transcript, the new prompt is rendered as an exact extension of the last
  turn's tokens (prompt + reply), so only the new messages are prefilled.
  `session_ttl` (seconds) sets how long the KV stays pinned after a turn.
  One turn per session at a time (a second concurrent one gets 409).
* `previous_response_id`: continue from the state at the end of any
  earlier chat completion (its `id`, kept in a bounded LRU); send only the
  new messages. Omitted `tools` are inherited. If that response was a
  session turn and the session has not moved on, the session continues;
  otherwise the conversation forks (the shared prefix still comes from the
  prefix cache).
* The delta route `POST /v1/sessions/{id}/chat/completions` appends the
  body's messages to the session's transcript (needs a completed turn).
* Every completion carries `deltaserve` (top level, and inside `usage`):
  {"session_id": str|null, "render_mode": "extended"|"full"|"tokens",
   "cache": {"reason": "no_session"|"new_session"|"extended"|"diverged"|
             "evicted"|"expired"|"demoted", "cached_tokens": int,
             "prefilled_tokens": int, "diverged_at": int|null, "detail": str}}
  In a stream it is on the chunk with `finish_reason` and in the usage chunk.
* usage: prompt_tokens_details.cached_tokens (prompt tokens served from the
  KV cache), completion_tokens_details.accepted_prediction_tokens /
  rejected_prediction_tokens (prompt-lookup speculation: drafted tokens the
  model accepted / rejected).

Errors are always `{"error": {"message", "type", "param", "code"}}`: 400 bad
input (including body validation and prompt too long, whose message gives
the prompt's token count and the context limit), 401 missing/wrong API key
(when keys are configured), 404 unknown model / session / response id (a
session of another key is "not found"), 409 session busy or already exists,
500 internal errors only. A client that disconnects cancels its generation;
the KV computed so far stays in the session, and the next turn is correct.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from deltaserve.engine.engine import LLMEngine
from deltaserve.server import chat_api, completions_api, sessions_api
from deltaserve.server.async_engine import AsyncEngine
from deltaserve.server.context import ServerContext, get_ctx, get_owner
from deltaserve.server.errors import install_error_handlers
from deltaserve.server.metrics import CONTENT_TYPE, RequestCounterMiddleware
from deltaserve.server.protocol import ModelCard, ModelList

log = logging.getLogger("deltaserve.server")

__all__ = ["create_app", "add_serve_arguments", "run_server", "serve"]


def create_app(engine: LLMEngine, model_name: str, api_keys: list[str] | None = None,
               max_responses: int = 1024) -> FastAPI:
    """The FastAPI app serving `engine` under `model_name`; the engine thread runs while the app's lifespan does.

    `api_keys`: if non-empty, /v1 routes need `Authorization: Bearer <key>`.
    `max_responses`: how many responses `previous_response_id` can refer to.
    """
    ctx = ServerContext(engine, model_name, api_keys, max_responses=max_responses)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        ctx.driver.start()
        try:
            yield
        finally:
            ctx.driver.stop()

    # strict_content_type off: `curl -d '{...}'` (form content type) is still read as JSON.
    app = FastAPI(title="deltaserve", version="0.1.0", lifespan=lifespan, strict_content_type=False,
                  description="OpenAI-compatible inference server that keeps agent sessions' KV cache between "
                              "turns. See the module docstring of deltaserve.server.app for the extensions.")
    app.state.ctx = ctx
    install_error_handlers(app)
    app.add_middleware(RequestCounterMiddleware, metrics=ctx.metrics)
    app.include_router(chat_api.router)
    app.include_router(completions_api.router)
    app.include_router(sessions_api.router)

    @app.get("/health", summary="Liveness")
    async def health(request: Request):
        c = get_ctx(request)
        ok = c.driver.running
        return JSONResponse({"status": "ok" if ok else "stopped", "model": c.model_name},
                            status_code=200 if ok else 503)

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics(request: Request):
        c = get_ctx(request)
        stats = await c.driver.call(lambda e: e.stats())
        return Response(c.metrics.render(stats), media_type=CONTENT_TYPE)

    @app.get("/v1/models", response_model=ModelList, summary="List models")
    async def models(request: Request, owner: str | None = Depends(get_owner)):
        c = get_ctx(request)
        return ModelList(data=[ModelCard(id=c.model_name, created=c.created, max_model_len=c.max_context)])

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, summary="Retrieve a model")
    async def model(model_id: str, request: Request, owner: str | None = Depends(get_owner)):
        c = get_ctx(request)
        c.check_model(model_id)
        return ModelCard(id=c.model_name, created=c.created, max_model_len=c.max_context)

    return app


# --------------------------------------------------------------------------- CLI
def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `deltaserve serve`."""
    from deltaserve.models.registry import DEFAULT_MODEL, KNOWN_MODELS

    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"known name ({', '.join(KNOWN_MODELS)}), HF directory or .gguf file")
    p.add_argument("--served-model-name", default=None, help="model id clients use (default: --model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--kv-cache-gb", type=float, default=2.0, help="KV pool size in GiB")
    p.add_argument("--cache-mode", choices=("stateful", "prefix", "stateless"), default="stateful",
                   help="stateful: pinned sessions + prefix cache; prefix: LRU prefix cache only; stateless: none")
    p.add_argument("--speculation", choices=("lookup", "off"), default="lookup",
                   help="prompt-lookup speculative decoding")
    p.add_argument("--session-ttl", type=float, default=300.0, help="default seconds a session stays pinned")
    p.add_argument("--max-pinned-fraction", type=float, default=0.7,
                   help="share of the KV pool pinned sessions may hold; the rest is working space (stateful mode)")
    p.add_argument("--max-context", type=int, default=None, help="cap on prompt + completion tokens")
    p.add_argument("--max-batch-tokens", type=int, default=512, help="tokens a forward step may carry")
    p.add_argument("--max-prefill-with-decode", type=int, default=None,
                   help="prefill tokens a step that also carries decodes may take (default: no cap below "
                        "--max-batch-tokens); lower keeps decoding agents' tokens coming during long prefills")
    p.add_argument("--api-key", action="append", default=None,
                   help="accepted API key (repeatable); also $DELTASERVE_API_KEY. None: no auth")
    p.add_argument("--log-level", default="info")


def build_engine(args: argparse.Namespace) -> LLMEngine:
    import torch

    from deltaserve.engine.engine import EngineConfig
    from deltaserve.engine.kv_manager import CacheMode

    from deltaserve.cli import ensure_pulled

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda given but no CUDA device is available")
    if not 0.0 < args.max_pinned_fraction <= 1.0:
        raise SystemExit(f"error: --max-pinned-fraction must be in (0, 1], got {args.max_pinned_fraction}")
    if args.max_batch_tokens < 1 or (args.max_prefill_with_decode is not None and args.max_prefill_with_decode < 1):
        raise SystemExit("error: --max-batch-tokens and --max-prefill-with-decode must be at least 1")
    ensure_pulled(args.model)
    cfg = EngineConfig(dtype=getattr(torch, args.dtype), device=args.device,
                       kv_cache_bytes=int(args.kv_cache_gb * (1 << 30)), cache_mode=CacheMode(args.cache_mode),
                       speculation=args.speculation == "lookup", session_ttl=args.session_ttl,
                       max_pinned_fraction=args.max_pinned_fraction,
                       max_context=args.max_context, max_batch_tokens=args.max_batch_tokens,
                       max_prefill_with_decode=args.max_prefill_with_decode)
    return LLMEngine.from_model(args.model, cfg)


def run_server(args: argparse.Namespace) -> int:
    """`deltaserve serve`: load the model, then serve until interrupted."""
    import uvicorn

    keys = list(args.api_key or [])
    if os.environ.get("DELTASERVE_API_KEY"):
        keys.append(os.environ["DELTASERVE_API_KEY"])
    # Built on the engine thread, so that thread is the only one with an OpenMP team (see async_engine).
    engine = AsyncEngine.build(lambda: build_engine(args))
    app = create_app(engine, args.served_model_name or args.model, keys or None)
    # The model, tokenizer and server objects live as long as the process: move them out of the collector's
    # view, so the full collections that a serving loop's allocations trigger do not walk them each time.
    gc.freeze()
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0


serve = run_server
