"""The Responses API (`/v1/responses`): a response id names an exact token state.

`POST /v1/responses` converts the input items to chat-template messages (`responses_items`) and plans the
turn with chat's `plan_history` (tools, tool_choice, `text.format` grammar, parallel_tool_calls). With
`previous_response_id` the conversation is that response's stored history + the new items, rendered as an
extension of the engine's `TurnRecord` for that id (its prompt + generated tokens, kept exactly): only the
new items are prefilled and the radix cache matches the rest (KV evicted since is recomputed by the same path).
Instructions apply to their own request only (as OpenAI): the same instructions again keep the extension
exact, different ones re-render.

Pinned chains (deltaserve extension `session_ttl`): the response opens a session `chain-<id>` that keeps the
chain's KV pinned `session_ttl` seconds after each turn; a continuation from the session's last response
continues the session (a continuation from an older one forks: a new session when `session_ttl` is given).

Stored responses (`store`, default true) are the engine's `TurnRecord`s (token state, owner, and the Response
object with its items as the record's `view`): owned by their API key, bounded by the engine's store of finished
turns, and served by `GET /v1/responses/{id}`, `GET /v1/responses/{id}/input_items` and
`DELETE /v1/responses/{id}`. The server keeps no store of its own.

Streaming emits the Responses event sequence (`responses_stream.py`); its output equals the non-streamed
output for greedy decoding (the same `Generation` text and tool-call scanner).
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from deltaserve.engine.api import EngineError, TurnRecord
from deltaserve.engine.chat import Transcript, compact_tokens, reply_message
from deltaserve.engine.sampling import SamplingParams
from deltaserve.server.chat_api import limit_calls
from deltaserve.server.chat_plan import ChatPlan, is_last_turn, plan_history
from deltaserve.server.context import ServerContext, get_ctx, get_owner
from deltaserve.server.errors import APIError
from deltaserve.server.generation import Generation, GenerationResponse, Usage, engine_failure
from deltaserve.server.protocol import openapi_responses
from deltaserve.server.responses_items import StoredView, item_id, normalize_input, output_items, to_messages
from deltaserve.server.responses_protocol import (ResponsesRequest, chat_format, chat_tool_choice, chat_tools,
                                                  check_supported, format_echo)
from deltaserve.server.tool_parser import new_call_id, parse_tool_calls

router = APIRouter()


def stored(ctx: ServerContext, rid: str, owner: str | None, param: str | None = None) -> tuple[TurnRecord, StoredView]:
    """The stored response `rid` of `owner` (a chat completion's id is not one: it has no view); else 404."""
    record = ctx.driver.response(rid, owner)
    view = None if record is None else StoredView.from_any(record.view)  # a dict after a restart
    if view is None:
        raise _not_found(rid, param)
    return record, view


def _not_found(rid: str, param: str | None = None) -> APIError:
    return APIError(404, f"response {rid!r} not found (unknown, deleted or expired)", param, "response_not_found")


class Turn:
    """One planned Responses turn: what to generate, and how to answer and remember it."""

    def __init__(self, ctx: ServerContext, body: ResponsesRequest, owner: str | None, plan: ChatPlan,
                 items: list[dict[str, Any]], history: list[dict[str, Any]], rid: str):
        self.ctx, self.body, self.owner, self.plan = ctx, body, owner, plan
        self.items, self.history = items, history  # history: no instructions, no reply yet
        self.id = rid
        self.created = int(time.time())

    def response(self, status: str, output: list[dict[str, Any]], usage: Usage | None,
                 incomplete: str | None = None) -> dict[str, Any]:
        """The Response object (`openai.types.responses.Response` shape) plus our `deltaserve` block."""
        b = self.body
        obj: dict[str, Any] = {
            "id": self.id, "object": "response", "created_at": self.created, "status": status, "error": None,
            "incomplete_details": {"reason": incomplete} if incomplete else None,
            "instructions": b.instructions, "max_output_tokens": b.max_output_tokens, "model": self.ctx.model_name,
            "output": output, "parallel_tool_calls": b.parallel_tool_calls is not False,
            "previous_response_id": b.previous_response_id, "reasoning": None, "store": b.store,
            "temperature": 1.0 if b.temperature is None else b.temperature, "text": format_echo(b),
            "tool_choice": _choice_echo(b.tool_choice),
            "tools": [{"type": "function", **t["function"]} for t in self.plan.request_tools or []],  # incl. inherited
            "top_p": 1.0 if b.top_p is None else b.top_p, "truncation": "disabled", "usage": None,
            "user": b.user, "metadata": b.metadata or {},
        }
        if usage is not None:
            info = usage.deltaserve.model_dump() if usage.deltaserve is not None else None
            obj["usage"] = {
                "input_tokens": usage.prompt_tokens,
                "input_tokens_details": {"cached_tokens": usage.prompt_tokens_details.cached_tokens},
                "output_tokens": usage.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": usage.total_tokens,
                "deltaserve": info,
            }
            obj["deltaserve"] = info
        return obj

    def finish(self, gen: Generation, content: str | None, calls: list[dict[str, Any]], exact: bool,
               output: list[dict[str, Any]]) -> dict[str, Any]:
        """The completed Response; stored (token state + items) before it is returned when `store`."""
        length = gen.finish_reason == "length"
        obj = self.response("incomplete" if length else "completed", output, gen.usage(),
                            "max_output_tokens" if length else None)
        if self.body.store:
            reply = reply_message(content, calls or None)
            # with dropped calls (parallel_tool_calls false) the reply no longer spells the tokens: no state
            tokens = self.plan.prompt + gen.output_ids if exact else []
            transcript = Transcript(messages=self.plan.messages + [reply], tools=self.plan.template_tools,
                                    tokens=compact_tokens(tokens))
            view = StoredView(obj, self.items, self.history + [reply])
            self.ctx.driver.record_turn(TurnRecord(self.id, self.owner, self.plan.session_id, transcript,
                                                   self.plan.request_tools, view))
        return obj


def _choice_echo(choice: Any) -> Any:
    if choice is None:
        return "auto"
    return choice if isinstance(choice, str) else {"type": "function", "name": choice.name}


async def plan_turn(ctx: ServerContext, body: ResponsesRequest, owner: str | None) -> Turn:
    check_supported(body)
    if body.session_ttl is not None and not body.store:
        raise APIError(400, "session_ttl pins a stored chain: it needs store true", "session_ttl")
    items = normalize_input(body.input)
    tools = chat_tools(body)
    base: list[dict[str, Any]] = []
    prior: Transcript | None = None
    inherited = None
    session_id = None
    record = None
    if body.previous_response_id:
        record, view = stored(ctx, body.previous_response_id, owner, "previous_response_id")
        base, inherited, prior = view.history, record.request_tools, record.transcript
        if record.session_id is not None and is_last_turn(ctx, record, owner):
            session_id = record.session_id  # a pinned chain whose session is still at that response
    turn_id = item_id("resp")
    if session_id is None and body.session_ttl is not None:
        session_id = "chain-" + turn_id  # this response starts (or forks) a pinned chain
        if record is not None and record.session_id is not None:
            # an older response of a pinned chain: fork the chain at that turn (shared KV, pinned, no prefill),
            # as POST /v1/sessions/{id}/fork with "turn" does
            k = ctx.driver.turn_of_response(record.session_id, owner, record.response_id)
            if k is not None:
                try:
                    await ctx.driver.fork_session(record.session_id, session_id, owner, body.session_ttl, k)
                except EngineError:  # the chain closed meanwhile: the new chain starts from the prefix cache
                    pass
    history = list(base) + to_messages(items)
    head = [{"role": "system", "content": body.instructions}] if body.instructions else []
    plan = await plan_history(ctx, head + history, prior, tools if body.tools is not None else inherited,
                              chat_tool_choice(body.tool_choice), chat_format(body), body.parallel_tool_calls,
                              session_id)
    return Turn(ctx, body, owner, plan, items, history, turn_id)


@router.post("/v1/responses", responses=openapi_responses(400, 401, 404, 409, 500, streaming=True),
             summary="Create a response (OpenAI Responses API; ids name exact KV states)")
async def create_response(body: ResponsesRequest, request: Request, owner: str | None = Depends(get_owner)):
    ctx = get_ctx(request)
    ctx.check_model(body.model)
    turn = await plan_turn(ctx, body, owner)
    params = SamplingParams(max_tokens=body.max_output_tokens or ctx.max_context,
                            temperature=1.0 if body.temperature is None else body.temperature,
                            top_p=1.0 if body.top_p is None else body.top_p,
                            tool_drafts=turn.plan.tool_drafts())
    gen = await Generation.start(ctx, "/v1/responses", turn.plan.prompt, params, owner=owner,
                                 session_id=turn.plan.session_id, session_ttl=body.session_ttl,
                                 constraint=turn.plan.grammar, render_mode=turn.plan.mode)
    if body.stream:
        from deltaserve.server.responses_stream import stream_events

        return GenerationResponse(stream_events(turn, gen), gen)
    try:
        text = await gen.collect(request)
    except RuntimeError as e:
        raise engine_failure(e) from e
    if turn.plan.tool_names is not None:
        parsed = parse_tool_calls(text, turn.plan.tool_names)
        content = parsed.content
        calls = [{"id": new_call_id(), "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                 for c in parsed.tool_calls]
    else:
        content, calls = text, []
    calls, exact = limit_calls(calls, turn.plan.max_calls)
    return JSONResponse(turn.finish(gen, content, calls, exact, output_items(content, calls)))


@router.get("/v1/responses/{response_id}", responses=openapi_responses(401, 404), summary="Retrieve a stored response")
async def get_response(response_id: str, request: Request, owner: str | None = Depends(get_owner)):
    _, view = stored(get_ctx(request), response_id, owner)
    return JSONResponse(view.response)


@router.get("/v1/responses/{response_id}/input_items", responses=openapi_responses(400, 401, 404),
            summary="The input items of a stored response")
async def input_items(response_id: str, request: Request, owner: str | None = Depends(get_owner),
                      limit: int = Query(default=20, ge=1, le=100), order: str = Query(default="desc"),
                      after: str | None = None):
    _, view = stored(get_ctx(request), response_id, owner)
    if order not in ("asc", "desc"):
        raise APIError(400, "order must be 'asc' or 'desc'", "order", "invalid_value")
    items = list(view.input_items) if order == "asc" else list(reversed(view.input_items))
    if after is not None:
        ids = [it["id"] for it in items]
        if after not in ids:
            raise APIError(400, f"after: no input item {after!r} in this response", "after", "invalid_value")
        items = items[ids.index(after) + 1:]
    page = items[:limit]
    return JSONResponse({"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                         "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit})


@router.delete("/v1/responses/{response_id}", responses=openapi_responses(401, 404),
               summary="Delete a stored response (and its token state)")
async def delete_response(response_id: str, request: Request, owner: str | None = Depends(get_owner)):
    ctx = get_ctx(request)
    stored(ctx, response_id, owner)  # 404 unless it is a stored response of this owner
    ctx.driver.forget_response(response_id, owner)
    return JSONResponse({"id": response_id, "object": "response", "deleted": True})
