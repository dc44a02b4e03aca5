"""OpenAI-format errors: `{"error": {"message", "type", "param", "code"}}` for every failure.

Clients (the openai SDK above all) map status codes to exception classes and
read `error.message`, so bad input must never surface as FastAPI's 422 or as
a bare 500: validation errors become 400 (what OpenAI returns), engine input
errors get their own codes, and only genuine bugs are 500s.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from deltaserve.engine.api import EngineError, Overloaded, SessionQuotaExceeded, PromptTooLong, SessionBusy, SessionExists, SessionNotFound

log = logging.getLogger("deltaserve.server")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error",
          429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.headers = headers
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def shutting_down(message: str) -> APIError:
    """503 for a request refused while the server drains, or aborted by its shutdown (`shutdown.py`).
    Retryable: `Retry-After` (the openai SDK honours it), and `Connection: close` so the retry opens a new
    connection, which a load balancer sends to another replica."""
    return APIError(503, message, None, "server_shutting_down", headers={"Retry-After": "1", "Connection": "close"})


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


def session_not_found(session_id: str) -> APIError:
    return APIError(404, f"session {session_id!r} not found", "session_id", "session_not_found")


def from_engine_error(exc: Exception, session_id: str | None = None) -> APIError:
    """Map an engine-side exception raised for one request to its HTTP error."""
    if isinstance(exc, PromptTooLong):
        return APIError(400, f"This model's maximum context length is {exc.limit} tokens, but the prompt is "
                             f"{exc.prompt_tokens} tokens (prompt_tokens={exc.prompt_tokens}, "
                             f"max_context={exc.limit}); at least one token must be left for the completion.",
                        "messages", "context_length_exceeded")
    if isinstance(exc, SessionBusy):
        return APIError(409, f"session {session_id!r} already has a turn in progress; "
                             "wait for it to finish (one turn per session at a time)", "session_id", "session_busy")
    if isinstance(exc, SessionNotFound):
        return session_not_found(session_id or str(exc))
    if isinstance(exc, Overloaded):
        return APIError(429, str(exc), None, "server_overloaded", headers={"Retry-After": "1"})
    if isinstance(exc, SessionQuotaExceeded):
        return APIError(429, str(exc), "session_id", "session_quota_exceeded")
    if isinstance(exc, SessionExists):
        return APIError(409, f"session {session_id!r} already exists", "session_id", "session_exists")
    if isinstance(exc, (EngineError, ValueError)):
        return bad_request(str(exc))
    raise exc


@contextmanager
def engine_errors(session_id: str | None = None) -> Iterator[None]:
    """Inside: engine input errors become their HTTP errors (anything else propagates as it is)."""
    try:
        yield
    except (EngineError, ValueError) as e:
        raise from_engine_error(e, session_id) from e


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errs = exc.errors()
    if not errs:
        return "invalid request body", None
    parts = []
    for e in errs[:5]:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        where = ".".join(loc) or "body"
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    first = [str(x) for x in errs[0].get("loc", ()) if x != "body"]
    return "invalid request: " + "; ".join(parts), (first[0] if first else None)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        msg, param = _validation_message(exc)
        return APIError(400, msg, param, "invalid_request").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(allowed_methods(request))
        return JSONResponse(APIError(exc.status_code, detail, code=code).body(), status_code=exc.status_code,
                            headers=headers or None)

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception):
        log.exception("internal error", exc_info=exc)
        return APIError(500, f"internal server error: {type(exc).__name__}", code="internal_error").response()


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this request's path (Starlette's 405 names only the first route's)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches({**request.scope, "method": "\x00"})  # no method matches: FULL only by path
        if match != Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return sorted(methods)
