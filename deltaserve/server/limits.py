"""Request-size bound: bodies over `max_bytes` are refused with 413 in OpenAI error format.

A pure ASGI middleware so the bound holds before any JSON parsing or validation runs: a declared
Content-Length over the limit is refused before the body is read; a chunked body is counted as it
streams and refused once the count passes the limit (nothing past the limit is buffered).
Mutates nothing but the request's own receive stream.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deltaserve.server.errors import APIError

DEFAULT_MAX_REQUEST_BYTES = 8 * 1024 * 1024


class _TooLarge(Exception):
    pass


def _error(limit: int) -> APIError:
    return APIError(413, f"Request body is larger than the server's limit of {limit} bytes "
                         "(--max-request-bytes)", None, "request_too_large", type="invalid_request_error")


class BodySizeLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int = DEFAULT_MAX_REQUEST_BYTES):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.max_bytes <= 0:
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.max_bytes:
                    await _error(self.max_bytes).response()(scope, receive, send)
                    return
        seen = 0
        started = False

        async def counted() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge
            return msg

        async def tracked_send(msg: Message) -> None:
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, counted, tracked_send)
        except _TooLarge:
            if started:  # the app already answered; nothing valid can follow
                raise
            await _error(self.max_bytes).response()(scope, receive, send)


# --------------------------------------------------------------------------- tools and schemas
#: At most this many tools per request; more is a 400 (a tool list is rendered into every prompt and compiled
#: into a grammar, so an unbounded one costs the whole server).
MAX_TOOLS = 128
#: At most this many bytes of JSON per tool definition or `response_format` schema (compact encoding).
MAX_SCHEMA_BYTES = 64 * 1024


def check_tools(tools: list[dict] | None, param: str = "tools") -> None:
    """Raise a 400 APIError when `tools` has more than MAX_TOOLS entries or one over MAX_SCHEMA_BYTES."""
    if not tools:
        return
    if len(tools) > MAX_TOOLS:
        raise APIError(400, f"{len(tools)} tools given; at most {MAX_TOOLS} are accepted", param, "too_many_tools")
    for i, tool in enumerate(tools):
        check_schema(tool, f"{param}[{i}]")


def check_schema(schema: object, param: str) -> None:
    """Raise a 400 APIError when `schema`'s compact JSON is over MAX_SCHEMA_BYTES."""
    size = len(json.dumps(schema, separators=(",", ":")).encode())
    if size > MAX_SCHEMA_BYTES:
        raise APIError(400, f"{param} is {size} bytes of JSON; at most {MAX_SCHEMA_BYTES} are accepted", param,
                       "schema_too_large")
