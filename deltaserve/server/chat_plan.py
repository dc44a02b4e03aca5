"""From a chat request to a prompt: history, tools, session/previous-response state, grammar.

Where the history comes from:
* `/v1/chat/completions`: the client sends the whole conversation;
* `/v1/sessions/{id}/chat/completions` (delta route): only the new
  messages, appended to the session's transcript (needs a prior turn);
* `previous_response_id`: only the new messages, appended to the
  transcript at the end of that response. If that response belongs to a
  session that has not moved on since, the turn continues the session;
  otherwise it forks: a session-less request rendered from that transcript,
  whose shared prefix the radix cache still reuses.

Rendering goes through `engine.chat.render_turn` with the stored transcript
as `prior`, so a turn that appends to the last one extends its exact token
state ("extended") instead of re-rendering the history ("full").

Tools: with `tool_choice` "none" the tools are neither rendered nor parsed;
"auto" renders them and parses calls out of the text; "required" or a
named function also constrains decoding with a tool-call grammar.
`response_format` json_object / json_schema constrains it to JSON.
Omitted `tools` in a delta / previous-response turn are inherited.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

from deltaserve.engine.api import SessionNotFound, TurnRecord
from deltaserve.engine.chat import Transcript, extends, render_turn
from deltaserve.server.context import ServerContext
from deltaserve.server.errors import APIError, bad_request, session_not_found
from deltaserve.server.limits import check_schema, check_tools
from deltaserve.server.protocol import (AssistantMessage, ChatCompletionRequest, NamedToolChoice, ResponseFormat,
                                        ToolMessage)
from deltaserve.spec.schema_drafts import ToolDrafts


@dataclass
class ChatPlan:
    messages: list[dict[str, Any]]  # full history as rendered (template form)
    prompt: list[int]
    mode: str  # render mode: "extended" | "full"
    session_id: str | None
    delta: bool  # delta route: the session must already exist
    request_tools: list[dict[str, Any]] | None  # tools of this request (inherited by later delta turns)
    template_tools: list[dict[str, Any]] | None  # tools shown to the model (None when tool_choice="none")
    tool_names: set[str] | None  # parse tool calls out of the output when not None
    grammar: Any = None
    max_calls: int | None = None  # parallel_tool_calls false: at most one call is returned

    def tool_drafts(self) -> ToolDrafts | None:
        """The tools shown to the model as `SamplingParams.tool_drafts`: speculative drafts of its calls."""
        return ToolDrafts.from_tools(self.template_tools)


def _text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    out = []
    for part in content:
        if part.type != "text" or part.text is None:
            raise bad_request(f"{where}: content parts of type {part.type!r} are not supported (text only)",
                              "messages", "unsupported")
        out.append(part.text)
    return "".join(out)


def _arguments(args: Any) -> Any:
    """Tool-call arguments as templates want them: an object, not a JSON string (they `tojson` it)."""
    if isinstance(args, str):
        try:
            obj = json.loads(args)
        except ValueError:
            return args
        return obj if isinstance(obj, dict) else args
    return args


def template_message(m: Any, i: int) -> dict[str, Any]:
    role = "system" if m.role == "developer" else m.role
    d: dict[str, Any] = {"role": role, "content": _text(m.content, f"messages[{i}]")}
    if isinstance(m, AssistantMessage) and m.tool_calls:
        d["tool_calls"] = [
            {"id": tc.id, "type": "function", "function": {"name": tc.function.name,
                                                           "arguments": _arguments(tc.function.arguments)}}
            for tc in m.tool_calls
        ]
    if isinstance(m, ToolMessage):
        d["tool_call_id"] = m.tool_call_id
    if getattr(m, "name", None):
        d["name"] = m.name
    return d


def _for_template(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stored replies carry JSON-string arguments (as returned to the client); templates want objects."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            m = {**m, "tool_calls": [{**c, "function": {**c["function"],
                                                       "arguments": _arguments(c["function"].get("arguments"))}}
                                     for c in m["tool_calls"]]}
        out.append(m)
    return out


# the variables the server itself passes to the chat template (chat_template_kwargs may not override them)
_RESERVED_TEMPLATE_VARS = frozenset({"messages", "conversation", "tools", "documents", "add_generation_prompt",
                                     "tokenize", "return_dict", "chat_template", "continue_final_message"})


async def plan_chat(ctx: ServerContext, body: ChatCompletionRequest, owner: str | None,
                    header_session: str | None = None, delta_session: str | None = None) -> ChatPlan:
    delta = delta_session is not None
    session_id = delta_session or body.session_id or header_session
    base: list[dict[str, Any]] = []
    prior: Transcript | None = None
    inherited_tools: list[dict[str, Any]] | None = None
    inherit = False

    if delta:
        if body.previous_response_id:
            raise bad_request("previous_response_id cannot be used with the session delta route",
                              "previous_response_id")
        try:
            last = ctx.driver.last_turn(session_id, owner)  # type: ignore[arg-type]
        except SessionNotFound:
            raise session_not_found(session_id)  # type: ignore[arg-type]
        if last is None:
            raise bad_request(f"session {session_id!r} has no completed turn yet; send the first turn (full "
                              "messages) to /v1/chat/completions with this session_id", "messages",
                              "no_previous_turn")
        prior, base, inherited_tools, inherit = last.transcript, last.transcript.messages, last.request_tools, True
    elif body.previous_response_id:
        prev = ctx.driver.response(body.previous_response_id, owner)
        if prev is None:
            raise APIError(404, f"response {body.previous_response_id!r} not found (unknown or expired)",
                           "previous_response_id", "response_not_found")
        prior, base, inherited_tools, inherit = prev.transcript, prev.transcript.messages, prev.request_tools, True
        if session_id is None and prev.session_id is not None and is_last_turn(ctx, prev, owner):
            session_id = prev.session_id  # the session is still where that response left it

    new = [template_message(m, i) for i, m in enumerate(body.messages)]
    if not new:
        raise bad_request("messages must contain at least one message", "messages")
    if session_id is not None and not delta and not body.previous_response_id:
        try:
            records = ctx.driver.turn_records(session_id, owner)
        except SessionNotFound:  # unknown: this turn opens it (another key's: the submission says 404)
            records = []
        # the newest turn the history extends: the last one, or an older one when the client retries a turn
        # whose reply it never got (a crash, a timeout) or edits the latest exchange
        prior = next((r.transcript for r in records if extends(r.transcript, new)),
                     records[0].transcript if records else None)
    if body.tools is not None:
        request_tools = [t.model_dump(exclude_none=True) for t in body.tools] or None
    else:
        request_tools = inherited_tools if inherit else None
    return await plan_history(ctx, list(base) + new, prior, request_tools, body.tool_choice, body.response_format,
                              body.parallel_tool_calls, session_id, delta,
                              template_kwargs=getattr(body, "chat_template_kwargs", None))


async def plan_history(ctx: ServerContext, messages: list[dict[str, Any]], prior: Transcript | None,
                       request_tools: list[dict[str, Any]] | None, tool_choice: Any, fmt: ResponseFormat | None,
                       parallel: bool | None, session_id: str | None = None, delta: bool = False,
                       template_kwargs: dict[str, Any] | None = None) -> ChatPlan:
    """Render a full history (template-form `messages`, extending `prior` when it is a prefix) with its tools
    (chat shape) and output grammar. Shared by chat completions and the Responses API."""
    check_tools(request_tools)  # bounded before rendering or grammar compiling (server/limits.py)
    choice = tool_choice if tool_choice is not None else ("auto" if request_tools else "none")
    if choice != "none" and choice != "auto" and not request_tools:
        raise bad_request("tool_choice requires tools", "tool_choice")
    template_tools = request_tools if choice != "none" else None
    names = {t["function"]["name"] for t in template_tools} if template_tools else None

    reserved = sorted(set(template_kwargs or ()) & _RESERVED_TEMPLATE_VARS)
    if reserved:
        raise bad_request(f"chat_template_kwargs cannot set {', '.join(reserved)}", "chat_template_kwargs")
    t0 = time.perf_counter()
    try:
        rendered = render_turn(ctx.tokenizer, _for_template(messages), template_tools, prior, template_kwargs)
    except Exception as e:  # jinja's raise_exception, a template without tool support, ...
        if isinstance(e, (APIError, MemoryError)):
            raise
        raise bad_request(f"the chat template cannot render these messages: {e}", "messages") from e
    ctx.metrics.render_seconds.labels("chat").inc(time.perf_counter() - t0)

    plan = ChatPlan(messages, rendered.tokens, rendered.mode, session_id, delta, request_tools, template_tools,
                    names, max_calls=1 if parallel is False else None)
    plan.grammar = await _grammar(ctx, choice, template_tools, fmt, parallel)
    return plan


def is_last_turn(ctx: ServerContext, record: TurnRecord, owner: str | None) -> bool:
    """Whether `record` is still its session's last turn (the session has not moved on since)."""
    try:
        last = ctx.driver.last_turn(record.session_id, owner)  # type: ignore[arg-type]
    except SessionNotFound:
        return False
    return last is not None and last.response_id == record.response_id


async def _compile(ctx: ServerContext, param: str, fn: Any, *args: Any) -> Any:
    """Compile a grammar off the event loop, within `ctx.grammar_timeout` seconds (else 400). A compile that runs
    over keeps its worker thread until it ends (threads cannot be killed); the size limits (`limits.py`) keep
    schemas small enough that this is rare."""
    try:
        return await asyncio.wait_for(asyncio.to_thread(fn, *args), ctx.grammar_timeout)
    except TimeoutError:
        raise bad_request(f"the output grammar did not compile within {ctx.grammar_timeout:g} s; simplify the "
                          "schema", param, "grammar_too_complex") from None


async def _grammar(ctx: ServerContext, choice: Any, tools: list[dict[str, Any]] | None,
                   fmt: ResponseFormat | None, parallel: bool | None) -> Any:
    """The output grammar: a forced tool call; JSON (a schema / any object); with tools offered under
    tool_choice "auto" and a JSON format, either a tool call or the JSON answer (one grammar for both); with
    `strict` tools under "auto" and no format, text or calls whose arguments follow their schemas."""
    from deltaserve.server.grammar import GrammarError, has_strict_tools

    forced = choice == "required" or isinstance(choice, NamedToolChoice)
    if not forced and (fmt is None or fmt.type == "text"):
        if choice == "auto" and ctx.enforce_strict_tools and has_strict_tools(tools):  # text, or valid calls
            compiler = await ctx.grammar_compiler()
            try:
                return await _compile(ctx, "tools", compiler.for_text_or_tool_call, tools, parallel is not False)
            except GrammarError as e:
                raise bad_request(f"cannot compile the strict tools' grammar: {e}", "tools", "invalid_grammar") from e
        return None
    compiler = await ctx.grammar_compiler()

    try:
        if forced:
            name = choice.function.name if isinstance(choice, NamedToolChoice) else None
            if name is not None and name not in {t["function"]["name"] for t in tools or []}:
                raise bad_request(f"tool_choice names function {name!r}, which is not in tools", "tool_choice")
            many = parallel is True and name is None
            return await _compile(ctx, "tool_choice", compiler.for_tool_call, tools, name, "hermes", many)
        if fmt.type == "json_object":
            schema: dict[str, Any] = {"type": "object"}
        elif fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise bad_request("response_format json_schema needs json_schema.schema", "response_format")
        else:
            schema = fmt.json_schema.schema_
            check_schema(schema, "response_format")
        if tools:  # tool_choice "auto": a call or the answer
            return await _compile(ctx, "response_format", compiler.for_tool_call_or_json, tools, schema,
                                  parallel is not False)
        return await _compile(ctx, "response_format", compiler.for_json_schema, schema)
    except GrammarError as e:
        raise bad_request(f"cannot compile the output grammar: {e}", "tool_choice" if forced else "response_format",
                          "invalid_grammar") from e
