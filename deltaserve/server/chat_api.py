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

import dataclasses
import json
import time
from typing import Any, AsyncIterator

from fastapi import APIRouter, Depends, Header, Request

from deltaserve.engine.chat import Transcript, reply_message
from deltaserve.server.chat_plan import ChatPlan, plan_chat
from deltaserve.server.context import ServerContext, get_ctx, get_owner
from deltaserve.server.generation import (Generation, GenerationResponse, engine_failure, new_id, sampling_params,
                                          sse)
from deltaserve.server.protocol import (ChatChoice, ChatCompletionRequest, ChatCompletionResponse,
                                        DeltaChatRequest, ErrorResponse, ResponseFunctionCall, ResponseMessage,
                                        ResponseToolCall)
from deltaserve.server.state import ResponseEntry, compact_tokens
from deltaserve.server.tool_parser import StreamingToolParser, new_call_id, parse_tool_calls

router = APIRouter()
_TRANSCRIPT_FIELDS = {f.name for f in dataclasses.fields(Transcript)}
_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 409, 500)}


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
    gen = await Generation.start(ctx, route, plan.prompt, params, owner=owner, session_id=plan.session_id,
                                 session_ttl=body.session_ttl, create_session=not plan.delta,
                                 grammar=plan.grammar, render_mode=plan.mode)
    resp_id, created = new_id("chatcmpl"), int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return GenerationResponse(_stream(ctx, gen, plan, owner, resp_id, created, include_usage,
                                          body.return_token_ids), gen)
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
    finish = _finish_reason(gen, calls)
    _remember(ctx, gen, plan, owner, resp_id, content, calls)
    usage = gen.usage()
    message = ResponseMessage(content=content, tool_calls=[ResponseToolCall(
        id=c["id"], function=ResponseFunctionCall(**c["function"])) for c in calls] or None)
    ids: dict[str, Any] = {"token_ids": gen.seq.output_ids} if body.return_token_ids else {}
    top: dict[str, Any] = {"prompt_token_ids": plan.prompt} if body.return_token_ids else {}
    return ChatCompletionResponse(id=resp_id, created=created, model=ctx.model_name, usage=usage,
                                  choices=[ChatChoice(message=message, finish_reason=finish, **ids)],
                                  system_fingerprint="deltaserve", deltaserve=usage.deltaserve, **top)


def _call_dict(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _finish_reason(gen: Generation, calls: list) -> str:
    reason = gen.finish_reason
    return "tool_calls" if calls and reason == "stop" else reason


def _remember(ctx: ServerContext, gen: Generation, plan: ChatPlan, owner: str | None, resp_id: str,
              content: str | None, calls: list[dict[str, Any]]) -> None:
    # A reply cut by a stop string spells more tokens than the returned text: no token state to
    # extend then (empty tokens), the next turn is rendered in full and the radix cache finds the prefix.
    tokens = [] if gen.text.stopped else gen.seq.tokens
    kw: dict[str, Any] = {}
    if "ended_cleanly" in _TRANSCRIPT_FIELDS:  # older Transcript versions
        kw["ended_cleanly"] = gen.ended_cleanly
    transcript = Transcript(messages=plan.messages + [reply_message(content, calls or None)],
                            tools=plan.template_tools, tokens=compact_tokens(tokens), **kw)  # type: ignore[arg-type]
    ctx.responses.put(ResponseEntry(resp_id, owner, transcript, plan.request_tools, plan.session_id))
    if plan.session_id is not None:
        ctx.sessions.record_turn(plan.session_id, owner, transcript, plan.request_tools, resp_id)


async def _stream(ctx: ServerContext, gen: Generation, plan: ChatPlan, owner: str | None, resp_id: str,
                  created: int, include_usage: bool, token_ids: bool = False) -> AsyncIterator[str]:
    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        obj: dict[str, Any] = {"id": resp_id, "object": "chat.completion.chunk", "created": created,
                               "model": ctx.model_name, "system_fingerprint": "deltaserve",
                               "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        if include_usage:
            obj["usage"] = None
        obj.update(extra)
        return sse(obj)

    parser = StreamingToolParser(plan.tool_names) if plan.tool_names is not None else None
    content: list[str] = []

    def events(evs: list) -> list[str]:
        out = []
        for ev in evs:
            d = ev.to_openai()
            if "content" in d:
                content.append(d["content"])
            out.append(chunk(d))
        return out

    yield chunk({"role": "assistant", "content": ""}, **({"prompt_token_ids": plan.prompt} if token_ids else {}))
    try:
        async for text in gen.deltas():
            if parser is None:
                content.append(text)
                yield chunk({"content": text})
            else:
                for c in events(parser.feed(text)):
                    yield c
    except RuntimeError as e:  # the engine failed mid-generation: the status line is gone, report in-band
        yield sse(engine_failure(e).body())
        yield "data: [DONE]\n\n"
        return
    if gen.aborted:
        return
    if parser is not None:
        for c in events(parser.finish()):
            yield c
        calls = [_call_dict(cid, c.name, c.arguments) for cid, c in zip(parser.call_ids, parser.tool_calls)]
    else:
        calls = []
    text = "".join(content)
    _remember(ctx, gen, plan, owner, resp_id, text if (text or parser is None) else None, calls)
    usage = gen.usage()
    info = usage.deltaserve.model_dump() if usage.deltaserve else None
    final = chunk({}, _finish_reason(gen, calls), deltaserve=info)
    if token_ids:  # all generated ids on the finishing chunk's choice
        obj = json.loads(final[len("data: "):])
        obj["choices"][0]["token_ids"] = gen.seq.output_ids
        final = sse(obj)
    yield final
    if include_usage:
        yield sse({"id": resp_id, "object": "chat.completion.chunk", "created": created, "model": ctx.model_name,
                   "system_fingerprint": "deltaserve", "choices": [], "usage": usage.model_dump()})
    yield "data: [DONE]\n\n"

