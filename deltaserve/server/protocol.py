"""Request and response bodies of the OpenAI-compatible API (pydantic v2).

Requests accept and ignore unknown fields (clients send things like `user`,
`store` or `metadata`); fields we know but cannot honour are rejected in the
handlers with a 400 that names them, so nothing is silently misread.
Responses are plain models whose `None` fields are serialized as `null`, as
OpenAI does (`content: null` next to `tool_calls`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, Strict

# Request numbers and flags are strict: JSON `false` is not a TTL of 0 and "3" is not a token count (pydantic's
# lax mode would coerce both). An integer is still a valid number (`"ttl": 30`).
Num = Annotated[float, Strict()]
Int = Annotated[int, Strict()]
Bool = Annotated[bool, Strict()]


class _Req(BaseModel):
    model_config = ConfigDict(extra="ignore")


# --------------------------------------------------------------------------- messages
class ContentPart(_Req):
    type: str
    text: str | None = None


Content = Union[str, list[ContentPart]]


class FunctionCall(_Req):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCall(_Req):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class SystemMessage(_Req):
    role: Literal["system", "developer"]
    content: Content
    name: str | None = None


class UserMessage(_Req):
    role: Literal["user"]
    content: Content
    name: str | None = None


class AssistantMessage(_Req):
    role: Literal["assistant"]
    content: Content | None = None
    tool_calls: list[ToolCall] | None = None
    name: str | None = None


class ToolMessage(_Req):
    role: Literal["tool"]
    content: Content
    tool_call_id: str


Message = Annotated[Union[SystemMessage, UserMessage, AssistantMessage, ToolMessage], Field(discriminator="role")]


# --------------------------------------------------------------------------- tools / formats
class FunctionDef(_Req):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: Bool | None = None


class Tool(_Req):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(_Req):
    name: str


class NamedToolChoice(_Req):
    type: Literal["function"] = "function"
    function: NamedFunction


ToolChoice = Union[Literal["none", "auto", "required"], NamedToolChoice]


class JsonSchemaSpec(_Req):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: Bool | None = None


class ResponseFormat(_Req):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class StreamOptions(_Req):
    include_usage: Bool = False


# --------------------------------------------------------------------------- shared sampling fields
class SamplingFields(_Req):
    model: str
    temperature: Num | None = Field(default=None, ge=0, le=2)
    top_p: Num | None = Field(default=None, gt=0, le=1)
    max_tokens: Int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: Int | None = None
    n: Int | None = 1
    stream: Bool = False
    stream_options: StreamOptions | None = None
    logprobs: Bool | Int | None = None
    presence_penalty: Num | None = None  # accepted, ignored (not implemented)
    frequency_penalty: Num | None = None  # accepted, ignored (not implemented)
    user: str | None = None
    # vLLM extensions
    top_k: Int | None = Field(default=None, ge=-1)
    ignore_eos: Bool = False
    stop_token_ids: list[Int] | None = None
    return_token_ids: Bool = False  # vLLM: prompt_token_ids in the response, token_ids in the choice
    cache_salt: str | None = Field(default=None, min_length=1, max_length=256)  # vLLM: only equal salts share KV
    # deltaserve extensions
    session_id: str | None = Field(default=None, min_length=1, max_length=256)
    session_ttl: Num | None = Field(default=None, ge=0)

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: Bool | None = None
    max_completion_tokens: Int | None = Field(default=None, ge=1)
    response_format: ResponseFormat | None = None
    top_logprobs: Int | None = None
    previous_response_id: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM: extra chat template variables


class DeltaChatRequest(ChatCompletionRequest):
    """Body of POST /v1/sessions/{id}/chat/completions: `messages` are only the new ones."""

    model: str | None = None  # type: ignore[assignment]  # defaults to the served model


class CompletionRequest(SamplingFields):
    prompt: Annotated[str | list[Int] | list[str] | list[list[Int]], Field(min_length=1)]
    max_tokens: Int | None = Field(default=16, ge=1)
    echo: Bool = False
    suffix: str | None = None
    best_of: Int | None = None


class SessionCreateRequest(_Req):
    session_id: str | None = Field(default=None, min_length=1, max_length=256)
    ttl: Num | None = Field(default=None, ge=0)


class SessionForkRequest(_Req):
    session_id: str | None = Field(default=None, min_length=1, max_length=256)  # the new session's id
    ttl: Num | None = Field(default=None, ge=0)  # default: the source session's
    turn: int | None = Field(default=None, ge=1)  # fork at the end of this turn (1-based); default: the current end


class SessionRollbackRequest(_Req):
    turn: int = Field(ge=1)  # keep turns 1..turn


class SessionUpdateRequest(_Req):
    ttl: Num = Field(ge=0)


# --------------------------------------------------------------------------- responses
class _Resp(BaseModel):
    model_config = ConfigDict(extra="allow")


class PromptTokensDetails(_Resp):
    cached_tokens: int = 0


class CompletionTokensDetails(_Resp):
    accepted_prediction_tokens: int = 0
    rejected_prediction_tokens: int = 0


class CacheInfo(_Resp):
    reason: str | None = None
    cached_tokens: int = 0
    prefilled_tokens: int = 0
    diverged_at: int | None = None
    detail: str | None = None
    restored_tokens: int = 0  # of cached_tokens, copied back from the host tier or the session store


class DeltaserveInfo(_Resp):
    """Extension block: how much of the prompt came from the KV cache, and why."""

    session_id: str | None = None
    cache: CacheInfo
    render_mode: str
    timed_out: bool = False  # --request-timeout ended the request (its finish_reason is "length")


class Usage(_Resp):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    completion_tokens_details: CompletionTokensDetails
    deltaserve: DeltaserveInfo | None = None


class ResponseFunctionCall(_Resp):
    name: str
    arguments: str


class ResponseToolCall(_Resp):
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunctionCall


class ResponseMessage(_Resp):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ResponseToolCall] | None = None


class ChatChoice(_Resp):
    index: int = 0
    message: ResponseMessage
    finish_reason: str
    logprobs: None = None


class ChatCompletionResponse(_Resp):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None
    deltaserve: DeltaserveInfo | None = None


class CompletionChoice(_Resp):
    index: int = 0
    text: str
    finish_reason: str
    logprobs: None = None


class CompletionResponse(_Resp):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    deltaserve: DeltaserveInfo | None = None


class ModelCard(_Resp):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "deltaserve"
    max_model_len: int | None = None


class ModelList(_Resp):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class SessionTurn(_Resp):
    turn: int  # 1-based
    end: int  # token offset where the turn ends (its reply included)
    has_transcript: bool  # its messages are known: the next turn after a fork or rollback to it extends them


class SessionInfo(_Resp):
    id: str
    object: Literal["session"] = "session"
    state: str  # "pinned" | "unpinned" | "expired" | "demoted" | "new"
    busy: bool
    pinned: bool
    tokens: int
    ttl: float
    ttl_remaining: float | None
    turns: int
    prompt_tokens: int
    cached_tokens: int
    prefilled_tokens: int
    has_transcript: bool
    last_match: CacheInfo | None = None
    history: list[SessionTurn] = []  # the turns the state holds, oldest first


class DeletedSession(_Resp):
    id: str
    object: Literal["session.deleted"] = "session.deleted"
    deleted: bool = True


class ErrorBody(_Resp):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Resp):
    error: ErrorBody


# OpenAPI `responses` of a route. A generating route answers JSON, or with `stream: true` server-sent events.
_SSE_200 = {200: {"description": "the completion, or with `stream: true` server-sent events (`data: {...}` chunks "
                                 "ending with `data: [DONE]`)",
                  "content": {"text/event-stream": {"schema": {  # one event
                      "type": "object", "required": ["data"],
                      "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}}}}}


def openapi_responses(*codes: int, streaming: bool = False) -> dict[int | str, dict[str, Any]]:
    """A route's documented error statuses (OpenAI error format), plus SSE on 200 for a streaming route."""
    return {**(_SSE_200 if streaming else {}), **{c: {"model": ErrorResponse} for c in codes}}
