"""Request body of `POST /v1/responses` (OpenAI Responses API) and the checks of what we cannot honour.

Shapes follow the official `openai` SDK's `types/responses` (flat function tools, `text.format`,
`function_call` / `function_call_output` items). Unknown fields are ignored as everywhere in this API, but
the Responses fields we know and cannot honour (built-in tools, `reasoning`, `background`, `include`,
`conversation`, `prompt`, `truncation: "auto"`, logprobs, `max_tool_calls`) are rejected with a 400 naming
the field -- an agent must not believe a web search or a reasoning effort happened when it did not.
Input items are validated and converted in `responses_items.py`.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from deltaserve.server.errors import bad_request
from deltaserve.server.protocol import (Bool, FunctionDef, Int, JsonSchemaSpec, NamedFunction, NamedToolChoice, Num,
                                        ResponseFormat, Tool)


class _Req(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class FunctionTool(_Req):
    """A Responses function tool: flat (`name` etc. beside `type`), unlike chat's nested `function`."""

    type: str
    name: str | None = Field(default=None, min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: Bool | None = None


class FunctionChoice(_Req):
    type: str
    name: str | None = None


class TextFormat(_Req):
    type: Literal["text", "json_object", "json_schema"]
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: Bool | None = None


class TextConfig(_Req):
    format: TextFormat | None = None
    verbosity: str | None = None


class ResponsesRequest(_Req):
    model: str | None = None
    input: Union[str, list[dict[str, Any]]]
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], FunctionChoice, None] = None
    parallel_tool_calls: Bool | None = None
    max_output_tokens: Int | None = Field(default=None, ge=1)
    temperature: Num | None = Field(default=None, ge=0, le=2)
    top_p: Num | None = Field(default=None, gt=0, le=1)
    text: TextConfig | None = None
    previous_response_id: str | None = None
    store: Bool = True  # OpenAI's default: a response is kept and can be continued
    stream: Bool = False
    metadata: dict[str, str] | None = None
    user: str | None = None
    # deltaserve extension: pin the chain's KV as a session kept `session_ttl` seconds after each turn
    session_ttl: Num | None = Field(default=None, ge=0)
    # known, not supported (checked in `check_supported`)
    reasoning: dict[str, Any] | None = None
    background: Bool | None = None
    include: list[str] | None = None
    conversation: Any = None
    prompt: Any = None
    truncation: str | None = None
    top_logprobs: Int | None = None
    max_tool_calls: Int | None = None


def check_supported(body: ResponsesRequest) -> None:
    """400 naming the first field we cannot honour."""
    unsupported = [
        ("reasoning", body.reasoning is not None, "reasoning options are not supported by this server"),
        ("background", bool(body.background), "background responses are not supported"),
        ("include", bool(body.include), f"include values {body.include!r} are not supported"),
        ("conversation", body.conversation is not None,
         "conversations are not supported; continue with previous_response_id"),
        ("prompt", body.prompt is not None, "prompt templates are not supported"),
        ("truncation", body.truncation not in (None, "disabled"), 'only truncation "disabled" is supported'),
        ("top_logprobs", bool(body.top_logprobs), "logprobs are not supported"),
        ("max_tool_calls", body.max_tool_calls is not None, "max_tool_calls is not supported"),
    ]
    for field, bad, message in unsupported:
        if bad:
            raise bad_request(message, field, "unsupported")


def chat_tools(body: ResponsesRequest) -> list[dict[str, Any]] | None:
    """Flat Responses function tools as chat tools (`{"type": "function", "function": {...}}`)."""
    if body.tools is None:
        return None
    out = []
    for i, t in enumerate(body.tools):
        if t.type != "function":
            raise bad_request(f"tools[{i}]: tool type {t.type!r} is not supported (function tools only)",
                              f"tools[{i}].type", "unsupported")
        if not t.name:
            raise bad_request(f"tools[{i}]: a function tool needs a name", f"tools[{i}].name")
        fn = FunctionDef(name=t.name, description=t.description, parameters=t.parameters, strict=t.strict)
        out.append(Tool(function=fn).model_dump(exclude_none=True))
    return out or None


def chat_tool_choice(choice: Any) -> Any:
    if choice is None or isinstance(choice, str):
        return choice
    if choice.type != "function" or not choice.name:
        raise bad_request(f"tool_choice of type {choice.type!r} is not supported (none, auto, required or "
                          '{"type": "function", "name": ...})', "tool_choice", "unsupported")
    return NamedToolChoice(function=NamedFunction(name=choice.name))


def chat_format(body: ResponsesRequest) -> ResponseFormat | None:
    """`text.format` as chat's `response_format`."""
    fmt = body.text.format if body.text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return ResponseFormat(type="json_object")
    if fmt.schema_ is None:
        raise bad_request("text.format json_schema needs a schema", "text.format.schema")
    return ResponseFormat(type="json_schema", json_schema=JsonSchemaSpec(name=fmt.name, schema=fmt.schema_,
                                                                         strict=fmt.strict))


def format_echo(body: ResponsesRequest) -> dict[str, Any]:
    """The `text` field of a Response object: the requested format (default plain text)."""
    fmt = body.text.format if body.text is not None and body.text.format is not None else None
    if fmt is None:
        return {"format": {"type": "text"}}
    return {"format": fmt.model_dump(by_alias=True, exclude_none=True)}
