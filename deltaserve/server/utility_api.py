"""vLLM's utility routes: POST /tokenize, POST /detokenize, GET /version (shapes as vLLM's, see docs/API.md).

Read-only: they use the server's tokenizer and chat template and never reach the engine thread.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from deltaserve.server.chat_plan import plan_history, template_message
from deltaserve.server.context import get_ctx, get_owner
from deltaserve.server.errors import bad_request
from deltaserve.server.protocol import Int, Message, Tool, openapi_responses

router = APIRouter()
_ERRORS = openapi_responses(400, 401, 404)


class TokenizeRequest(BaseModel):
    """`prompt` (raw text, no special tokens added) or `messages` (through the chat template, as chat completions
    renders them, so `count` equals that route's prompt_tokens for the same messages and tools)."""
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    tools: list[Tool] | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    tokens: list[Int] = Field(default_factory=list)


class DetokenizeResponse(BaseModel):
    prompt: str


@router.post("/tokenize", response_model=TokenizeResponse, responses=_ERRORS, summary="Tokenize (vLLM)")
async def tokenize(body: TokenizeRequest, request: Request, owner: str | None = Depends(get_owner)):
    ctx = get_ctx(request)
    ctx.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise bad_request("give exactly one of prompt or messages", "prompt")
    if body.prompt is not None:
        tokens = ctx.tokenizer.encode(body.prompt)
    else:
        messages: list[dict[str, Any]] = [template_message(m, i) for i, m in enumerate(body.messages or [])]
        if not messages:
            raise bad_request("messages must contain at least one message", "messages")
        tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
        plan = await plan_history(ctx, messages, None, tools, None, None, None,
                                  template_kwargs=body.chat_template_kwargs)
        tokens = list(plan.prompt)
    return TokenizeResponse(count=len(tokens), max_model_len=ctx.max_context, tokens=tokens)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=_ERRORS, summary="Detokenize (vLLM)")
async def detokenize(body: DetokenizeRequest, request: Request, owner: str | None = Depends(get_owner)):
    ctx = get_ctx(request)
    ctx.check_model(body.model)
    vocab = len(ctx.tokenizer)
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise bad_request(f"token ids out of range [0, {vocab}): {bad[:5]}", "tokens")
    return DetokenizeResponse(prompt=ctx.tokenizer.decode(body.tokens, skip_special_tokens=False))


@router.get("/version", summary="Server version (vLLM)")
async def version() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return {"version": dist_version("deltaserve")}
    except PackageNotFoundError:  # run from a source tree without an install
        return {"version": "unknown"}
