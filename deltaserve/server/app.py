"""The FastAPI app of `deltaserve serve` and its command-line wiring.

The HTTP API (routes, OpenAI fields supported, deltaserve's extensions, errors) is documented once, in
docs/API.md.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from deltaserve import env
from deltaserve.engine.async_engine import AsyncEngine
from deltaserve.engine.engine import LLMEngine
from deltaserve.server import admin_api, chat_api, completions_api, responses_api, sessions_api, utility_api
from deltaserve.server.context import ServerContext, get_ctx, get_owner
from deltaserve.server.errors import install_error_handlers
from deltaserve.server.limits import DEFAULT_MAX_REQUEST_BYTES, BodySizeLimitMiddleware
from deltaserve.server.metrics import CONTENT_TYPE, RequestCounterMiddleware
from deltaserve.server.protocol import ModelCard, ModelList, openapi_responses
from deltaserve.server.shutdown import DEFAULT_SHUTDOWN_TIMEOUT, Drain, DrainMiddleware

log = logging.getLogger("deltaserve.server")

__all__ = ["create_app", "add_serve_arguments", "run_server"]


def create_app(engine: LLMEngine, model_name: str, api_keys: list[str] | None = None,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, admin_key: str | None = None,
               allowed_origins: list[str] | None = None, stats_interval: float | None = None,
               tenant_header: str | None = None, log_requests: bool = False, enforce_strict_tools: bool = True,
               shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT) -> FastAPI:
    """The FastAPI app serving `engine` under `model_name`; the engine thread runs while the app's lifespan does.

    `api_keys`: if non-empty, /v1 routes need `Authorization: Bearer <key>`.
    `max_request_bytes`: larger bodies get 413 (0: unbounded). `admin_key`: enables /v1/debug/* (admin_api).
    `stats_interval`: seconds between throughput log lines while there is work (None: no lines).
    `allowed_origins`: browser origins allowed cross-site (CORS); None: no CORS headers (browsers block).
    `tenant_header`: HTTP header naming the tenant whose radix namespace a request's KV reuse stays in.
    `log_requests`: log each request's prompt and output text (logger `deltaserve.requests`; off: never).
    `enforce_strict_tools`: `strict` function tools under tool_choice auto are grammar-enforced (grammar.py).
    `shutdown_timeout`: seconds a drain (`shutdown.py`, `app.state.drain`) waits for requests in flight.
    """
    ctx = ServerContext(AsyncEngine.of(engine), model_name, api_keys)
    ctx.tenant_header = tenant_header
    ctx.log_requests = log_requests
    ctx.enforce_strict_tools = enforce_strict_tools

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        ctx.driver.start()
        ticker = None
        if stats_interval:
            from deltaserve.server.stats_log import log_stats_forever

            ticker = asyncio.create_task(log_stats_forever(ctx.driver.stats, stats_interval))
        try:
            yield
        finally:
            if ticker is not None:
                ticker.cancel()
            ctx.driver.stop()

    # FastAPI's strict content type stays on: a body without a JSON content type, including one with no content
    # type at all (which strict_content_type=False read as JSON), is not read as JSON (a 400 here), so a
    # cross-site request that needs no CORS preflight cannot drive the API from a user's browser.
    app = FastAPI(title="deltaserve", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible inference server that keeps agent sessions' KV cache between "
                              "turns. The extensions are documented in docs/API.md.")
    app.state.ctx = ctx
    app.state.admin_key = admin_key
    app.state.drain = Drain(shutdown_timeout)
    _openapi_errors_as_sent(app)
    install_error_handlers(app)
    app.add_middleware(DrainMiddleware, drain=app.state.drain, model_name=model_name)  # inside: 503s are counted
    app.add_middleware(RequestCounterMiddleware, metrics=ctx.metrics)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=max_request_bytes)
    app.include_router(chat_api.router)
    app.include_router(completions_api.router)
    app.include_router(sessions_api.router)
    app.include_router(responses_api.router)
    app.include_router(admin_api.router)
    app.include_router(utility_api.router)
    if allowed_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=allowed_origins, allow_methods=["*"],
                           allow_headers=["*"], allow_credentials=False)

    @app.get("/health", summary="Liveness", responses={503: {"description": "the engine thread is not running, or the "
                                                                   "server is draining (shutting down)"}})
    async def health(request: Request):
        c = get_ctx(request)
        ok = c.driver.running
        return JSONResponse({"status": "ok" if ok else "stopped", "model": c.model_name},
                            status_code=200 if ok else 503)

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    async def metrics(request: Request):
        c = get_ctx(request)
        return Response(c.metrics.render(await c.driver.stats()), media_type=CONTENT_TYPE)

    @app.get("/v1/models", response_model=ModelList, responses=openapi_responses(401), summary="List models")
    async def models(request: Request, owner: str | None = Depends(get_owner)):
        c = get_ctx(request)
        return ModelList(data=[ModelCard(id=c.model_name, created=c.created, max_model_len=c.max_context)])

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, summary="Retrieve a model",
             responses=openapi_responses(401, 404))
    async def model(model_id: str, request: Request, owner: str | None = Depends(get_owner)):
        c = get_ctx(request)
        c.check_model(model_id)
        return ModelCard(id=c.model_name, created=c.created, max_model_len=c.max_context)

    return app


# --------------------------------------------------------------------------- CLI
def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `deltaserve serve`: the engine's (`engine/args.py`) and the server's own."""
    from deltaserve.engine.args import add_engine_args

    add_engine_args(p)
    p.set_defaults(model=None)  # resolve_model tells "not given" from the default (MODEL vs --model)
    p.add_argument("model_positional", nargs="?", default=None, metavar="MODEL",
                   help="the model, as vLLM's `serve MODEL` (same as --model)")
    p.add_argument("--served-model-name", default=None, help="model id clients use (default: --model)")
    p.add_argument("--allowed-origins", action="append", default=None, metavar="ORIGIN",
                   help="browser origin allowed cross-site (CORS; repeatable, * for any). Default: none")
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="accepted for vLLM scripts; a no-op: tool calls are always parsed when tools are offered")
    p.add_argument("--tool-call-parser", choices=("hermes", "auto"), default="auto",
                   help="accepted for vLLM scripts: our parser reads hermes-style <tool_call> JSON and bare JSON "
                        "calls (docs/API.md); both values select it")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", action="append", default=None,
                   help="accepted API key (repeatable); also $DELTASERVE_API_KEY. None: no auth")
    p.add_argument("--tenant-header", default=None, metavar="NAME",
                   help="HTTP header (set by an authenticating gateway) naming the tenant; the prefix cache is "
                        "isolated per tenant (requests without it: the anonymous tenant)")
    p.add_argument("--log-level", default="info")
    p.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                   help="request bodies larger than this get HTTP 413 (0: unbounded; default %(default)s)")
    p.add_argument("--admin-key", default=None, help="enables GET /v1/debug/integrity for this bearer key")
    p.add_argument("--enforce-strict-tools", action=argparse.BooleanOptionalAction, default=True,
                   help="grammar-enforce `strict` function tools under tool_choice auto: any text, and every "
                        "call's arguments follow its schema (default: on; --no-enforce-strict-tools: strict "
                        "tools are parsed, not enforced)")
    p.add_argument("--log-requests", action="store_true",
                   help="log each request's prompt and output text at INFO (default: never logged)")
    p.add_argument("--stats-interval", type=float, default=5.0,
                   help="seconds between throughput/cache INFO lines while there is work (0: none)")
    p.add_argument("--shutdown-timeout", type=float, default=DEFAULT_SHUTDOWN_TIMEOUT, metavar="S",
                   help="on SIGTERM/SIGINT, seconds requests in flight may take to finish before they are "
                        "aborted; new requests get 503 meanwhile (default %(default)s)")


def resolve_model(args: argparse.Namespace) -> None:
    """Fold the positional MODEL into `args.model` (mutates `args`); both given and different: SystemExit."""
    from deltaserve.models.registry import DEFAULT_MODEL

    pos = getattr(args, "model_positional", None)
    if pos is not None and args.model is not None and args.model != pos:
        raise SystemExit(f"error: the model is given twice and differs: MODEL {pos!r} and --model {args.model!r}")
    args.model = pos or args.model or DEFAULT_MODEL


def run_server(args: argparse.Namespace) -> int:
    """`deltaserve serve`: load the model, then serve until SIGTERM/SIGINT, drain (`shutdown.py`), return 0."""
    from deltaserve.engine.args import build_engine

    import logging.config

    from deltaserve.server.stats_log import logging_config

    # before the engine is built: its start-up lines (the KV pool, sessions restored from a store) are shown too
    logging.config.dictConfig(logging_config(args.log_level))
    resolve_model(args)
    keys = list(args.api_key or [])
    if env.api_key():
        keys.append(env.api_key())
    # Built on the engine thread, so that thread is the only one with an OpenMP team (see async_engine).
    engine = AsyncEngine.build(lambda: build_engine(args))
    app = create_app(engine, args.served_model_name or args.model, keys or None,
                     max_request_bytes=args.max_request_bytes, admin_key=args.admin_key,
                     allowed_origins=args.allowed_origins, stats_interval=args.stats_interval or None,
                     tenant_header=args.tenant_header, log_requests=args.log_requests,
                     enforce_strict_tools=args.enforce_strict_tools,
                     shutdown_timeout=args.shutdown_timeout)
    # The model, tokenizer and server objects live as long as the process: move them out of the collector's
    # view, so the full collections that a serving loop's allocations trigger do not walk them each time.
    gc.freeze()
    from deltaserve.server.shutdown import serve

    return serve(app, app.state.drain, app.state.ctx.driver.abort_all, host=args.host, port=args.port,
                 log_level=args.log_level, timeout_graceful_shutdown=5, log_config=logging_config(args.log_level))


def _openapi_errors_as_sent(app: FastAPI) -> None:
    """Document body validation errors as the 400 we send (`errors.py`), not FastAPI's default 422."""
    from fastapi.openapi.utils import get_openapi

    def schema() -> dict:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            error = {"description": "invalid request (OpenAI error format)",
                     "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
            for operations in doc.get("paths", {}).values():
                for op in operations.values():
                    if op.get("responses", {}).pop("422", None) is not None:
                        op["responses"].setdefault("400", error)
            for unused in ("HTTPValidationError", "ValidationError"):
                doc.get("components", {}).get("schemas", {}).pop(unused, None)
            _add_links(doc)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = schema  # type: ignore[method-assign]


# Where the id a creating route returns leads (OpenAPI links: what a client, or a stateful fuzzer, may call next).
_LINKS = {
    ("/v1/responses", "post"): ("response_id", [("/v1/responses/{response_id}", "get"),
                                                ("/v1/responses/{response_id}/input_items", "get"),
                                                ("/v1/responses/{response_id}", "delete")]),
    ("/v1/sessions", "post"): ("session_id", [("/v1/sessions/{session_id}", "get"),
                                              ("/v1/sessions/{session_id}", "patch"),
                                              ("/v1/sessions/{session_id}/fork", "post"),
                                              ("/v1/sessions/{session_id}/rollback", "post"),
                                              ("/v1/sessions/{session_id}/state", "get"),
                                              ("/v1/sessions/{session_id}", "delete")]),
}


def _add_links(doc: dict) -> None:
    """Links from each creating route's 200 to the routes its returned `id` names (mutates `doc`)."""
    paths = doc.get("paths", {})
    for (path, method), (param, targets) in _LINKS.items():
        ok = paths.get(path, {}).get(method, {}).get("responses", {}).get("200")
        if ok is None:
            continue
        links = {}
        for tpath, tmethod in targets:
            op = paths.get(tpath, {}).get(tmethod, {}).get("operationId")
            if op is not None:
                links[op] = {"operationId": op, "parameters": {param: "$response.body#/id"}}
        ok["links"] = links
