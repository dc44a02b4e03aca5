"""POST /v1/chat/completions and the session delta route: run a planned turn, answer, remember it.

Non-streaming and streaming answers come from the same `Generation` text
and the same tool-call scanner (batch `parse_tool_calls` /
`StreamingToolParser` agree for every chunking), so for greedy decoding a
stream's concatenated content equals the non-streamed content.

After every completed turn the transcript (request history + our reply
exactly as returned, the token state prompt + generated, and whether the
reply ended with an end-of-turn token) is stored under the response id, and
under the session if there is one -- before the last byte is sent, so a
client cannot start the next turn before the server can extend this one.
"""

from __future__ import annotations

import time
from typing import Any, AsyncIterator

from fastapi import APIRouter, Depends, Header, Request

from deltaserve.engine.api import TurnRecord
from deltaserve.engine.chat import Transcript, compact_tokens, reply_message
from deltaserve.server.chat_plan import ChatPlan, plan_chat
from deltaserve.server.context import ServerContext, get_ctx, get_owner
from deltaserve.server.generation import (ChunkFormat, Generation, GenerationResponse, engine_failure, new_id,
                                          sampling_params, sse_events)
from deltaserve.server.protocol import (ChatChoice, ChatCompletionRequest, ChatCompletionResponse,
                                        DeltaChatRequest, ResponseFunctionCall, ResponseMessage,
                                        ResponseToolCall, openapi_responses)
from deltaserve.server.tool_parser import StreamingToolParser, ToolCallDelta, new_call_id, parse_tool_calls

router = APIRouter()
_ERRORS = openapi_responses(400, 401, 404, 409, 500, streaming=True)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_ERRORS,
             summary="Chat completion (OpenAI); deltaserve extensions: session_id, previous_response_id")
async def chat_completions(body: ChatCompletionRequest, request: Request,
                           x_session_id: str | None = Header(default=None),
                           owner: str | None = Depends(get_owner)):
    ctx = get_ctx(request)
    ctx.check_model(body.model)
    plan = await plan_chat(ctx, body, owner, header_session=x_session_id)
    return await run_chat(ctx, request, body, plan, owner, "/v1/chat/completions")


@router.post("/v1/sessions/{session_id}/chat/completions", response_model=ChatCompletionResponse,
             responses=_ERRORS, summary="Delta turn: `messages` are only the new messages of this session")
async def session_chat_completions(session_id: str, body: DeltaChatRequest, request: Request,
                                   owner: str | None = Depends(get_owner)):
    ctx = get_ctx(request)
    ctx.check_model(body.model)
    plan = await plan_chat(ctx, body, owner, delta_session=session_id)
    return await run_chat(ctx, request, body, plan, owner, "/v1/sessions/{session_id}/chat/completions")


async def run_chat(ctx: ServerContext, request: Request, body: ChatCompletionRequest, plan: ChatPlan,
                   owner: str | None, route: str):
    params = sampling_params(body, body.max_completion_tokens or body.max_tokens, ctx)
    params.tool_drafts = plan.tool_drafts()
    gen = await Generation.start(ctx, route, plan.prompt, params, owner=owner, session_id=plan.session_id,
                                 cache_salt=body.cache_salt,
                                 session_ttl=body.session_ttl, open_session=not plan.delta,
                                 constraint=plan.grammar, render_mode=plan.mode)
    resp_id, created = new_id("chatcmpl"), int(time.time())
    if body.stream:
        fmt = ChunkFormat(resp_id, created, ctx.model_name, "chat.completion.chunk",
                          bool(body.stream_options and body.stream_options.include_usage),
                          {"system_fingerprint": "deltaserve"})
        return GenerationResponse(_stream(ctx, gen, plan, owner, fmt, body.return_token_ids), gen)
    try:
        text = await gen.collect(request)
    except RuntimeError as e:
        raise engine_failure(e) from e
    if plan.tool_names is not None:
        parsed = parse_tool_calls(text, plan.tool_names)
        content = parsed.content
        calls = [_call_dict(new_call_id(), c.name, c.arguments) for c in parsed.tool_calls]
    else:
        content, calls = text, []
    calls, exact = limit_calls(calls, plan.max_calls)
    finish = _finish_reason(gen, calls)
    _remember(ctx, gen, plan, owner, resp_id, content, calls, exact)
    usage = gen.usage()
    message = ResponseMessage(content=content, tool_calls=[ResponseToolCall(
        id=c["id"], function=ResponseFunctionCall(**c["function"])) for c in calls] or None)
    ids: dict[str, Any] = {"token_ids": gen.output_ids} if body.return_token_ids else {}
    top: dict[str, Any] = {"prompt_token_ids": plan.prompt} if body.return_token_ids else {}
    return ChatCompletionResponse(id=resp_id, created=created, model=ctx.model_name, usage=usage,
                                  choices=[ChatChoice(message=message, finish_reason=finish, **ids)],
                                  system_fingerprint="deltaserve", deltaserve=usage.deltaserve, **top)


def _call_dict(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _finish_reason(gen: Generation, calls: list) -> str:
    reason = gen.finish_reason
    return "tool_calls" if calls and reason == "stop" else reason


def limit_calls(calls: list, max_calls: int | None) -> tuple[list, bool]:
    """`parallel_tool_calls: false`: keep the first call. The second result says whether the returned reply
    still spells the generated tokens (False when calls were dropped)."""
    if max_calls is None or len(calls) <= max_calls:
        return calls, True
    return calls[:max_calls], False


def _remember(ctx: ServerContext, gen: Generation, plan: ChatPlan, owner: str | None, resp_id: str,
              content: str | None, calls: list[dict[str, Any]], exact: bool = True) -> None:
    # A reply cut by a stop string (or with dropped calls) spells more tokens than the returned text: no token
    # state to extend then (empty tokens), the next turn is rendered in full and the radix cache finds the prefix.
    tokens = [] if gen.text.stopped or not exact else plan.prompt + gen.output_ids
    transcript = Transcript(messages=plan.messages + [reply_message(content, calls or None)],
                            tools=plan.template_tools, tokens=compact_tokens(tokens))
    ctx.driver.record_turn(TurnRecord(resp_id, owner, plan.session_id, transcript, plan.request_tools))


def _stream(ctx: ServerContext, gen: Generation, plan: ChatPlan, owner: str | None, fmt: ChunkFormat,
            token_ids: bool) -> AsyncIterator[str]:
    def choice(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
        return {"delta": delta, "logprobs": None, "finish_reason": finish, **extra}

    parser = StreamingToolParser(plan.tool_names) if plan.tool_names is not None else None
    content: list[str] = []

    def events(evs: list) -> list[str]:
        out = []
        for ev in evs:
            if plan.max_calls is not None and isinstance(ev, ToolCallDelta) and ev.index >= plan.max_calls:
                continue  # parallel_tool_calls false: calls after the first are dropped
            d = ev.to_openai()
            if "content" in d:
                content.append(d["content"])
            out.append(fmt.chunk(choice(d)))
        return out

    def on_text(text: str) -> list[str]:
        if parser is None:
            content.append(text)
            return [fmt.chunk(choice({"content": text}))]
        return events(parser.feed(text))

    def closing(usage) -> list[str]:
        out = events(parser.finish()) if parser is not None else []
        calls = ([_call_dict(cid, c.name, c.arguments) for cid, c in zip(parser.call_ids, parser.tool_calls)]
                 if parser is not None else [])
        calls, exact = limit_calls(calls, plan.max_calls)
        text = "".join(content)
        _remember(ctx, gen, plan, owner, fmt.id, text if (text or parser is None) else None, calls, exact)
        ids = {"token_ids": gen.output_ids} if token_ids else {}  # all generated ids on the finishing chunk
        info = usage.deltaserve.model_dump() if usage.deltaserve else None
        out.append(fmt.chunk(choice({}, _finish_reason(gen, calls), **ids), deltaserve=info))
        return out

    opening = [fmt.chunk(choice({"role": "assistant", "content": ""}),
                         **({"prompt_token_ids": plan.prompt} if token_ids else {}))]
    return sse_events(gen, fmt, opening, on_text, closing)
