"""POST /v1/completions: raw text or token-id prompts (no chat template).

A prompt is a string, a list of token ids, or a one-element list of either
(batched prompts are rejected: one request, one sequence). `session_id`
works here too: a session's next prompt that extends its token state only
prefills the new tokens.
"""

from __future__ import annotations

import time
from typing import Any, AsyncIterator

from fastapi import APIRouter, Depends, Header, Request

from deltaserve.server.context import ServerContext, get_ctx, get_owner
from deltaserve.server.errors import bad_request
from deltaserve.server.generation import (ChunkFormat, Generation, GenerationResponse, engine_failure, new_id,
                                          sampling_params, sse_events)
from deltaserve.server.protocol import CompletionChoice, CompletionRequest, CompletionResponse, openapi_responses

router = APIRouter()
ROUTE = "/v1/completions"


def prompt_tokens(ctx: ServerContext, prompt: Any) -> tuple[list[int], str | None]:
    """(token ids, prompt text if given as text)."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise bad_request("batched prompts are not supported; send one prompt per request", "prompt",
                              "unsupported")
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise bad_request("prompt is empty", "prompt")
        return ctx.tokenizer.encode(prompt), prompt
    if not prompt:
        raise bad_request("prompt is empty", "prompt")
    vocab = ctx.vocab_size
    if any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt):
        raise bad_request(f"prompt token ids must be integers in [0, {vocab})", "prompt")
    return list(prompt), None


@router.post(ROUTE, response_model=CompletionResponse,
             responses=openapi_responses(400, 401, 404, 409, 500, streaming=True),
             summary="Text completion (OpenAI legacy API); deltaserve extension: session_id")
async def completions(body: CompletionRequest, request: Request, x_session_id: str | None = Header(default=None),
                      owner: str | None = Depends(get_owner)):
    ctx = get_ctx(request)
    ctx.check_model(body.model)
    if body.suffix:
        raise bad_request("suffix is not supported", "suffix", "unsupported")
    if body.best_of not in (None, 1):
        raise bad_request("only best_of=1 is supported", "best_of", "unsupported")
    ids_in, text = prompt_tokens(ctx, body.prompt)
    params = sampling_params(body, body.max_tokens, ctx)
    session_id = body.session_id or x_session_id
    gen = await Generation.start(ctx, ROUTE, ids_in, params, owner=owner, session_id=session_id,
                                 session_ttl=body.session_ttl, render_mode="tokens",
                                 cache_salt=body.cache_salt)
    echo = (text if text is not None else ctx.tokenizer.decode(ids_in)) if body.echo else ""
    resp_id, created = new_id("cmpl"), int(time.time())
    if body.stream:
        fmt = ChunkFormat(resp_id, created, ctx.model_name, "text_completion",
                          bool(body.stream_options and body.stream_options.include_usage))
        return GenerationResponse(_stream(gen, fmt, echo), gen)
    try:
        out = await gen.collect(request)
    except RuntimeError as e:
        raise engine_failure(e) from e
    usage = gen.usage()
    ids: dict[str, Any] = {"token_ids": gen.output_ids} if body.return_token_ids else {}
    top: dict[str, Any] = {"prompt_token_ids": ids_in} if body.return_token_ids else {}
    return CompletionResponse(id=resp_id, created=created, model=ctx.model_name, usage=usage,
                              choices=[CompletionChoice(text=echo + out, finish_reason=gen.finish_reason, **ids)],
                              deltaserve=usage.deltaserve, **top)


def _stream(gen: Generation, fmt: ChunkFormat, echo: str) -> AsyncIterator[str]:
    def choice(text: str, finish: str | None = None) -> dict[str, Any]:
        return {"text": text, "logprobs": None, "finish_reason": finish}

    def closing(usage) -> list[str]:
        return [fmt.chunk(choice("", gen.finish_reason),
                          deltaserve=usage.deltaserve.model_dump() if usage.deltaserve else None)]

    return sse_events(gen, fmt, [fmt.chunk(choice(echo))] if echo else [], lambda text: [fmt.chunk(choice(text))],
                      closing)
