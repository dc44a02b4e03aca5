"""One HTTP generation: submit to the engine, turn tokens into text, account for it.

Shared by chat and text completions, streaming or not. `Generation.start` submits a `GenerateRequest` (the
engine opens the session if needed, atomically with the submission), so every input error (prompt too long,
session busy or unknown) is raised before a response has started and becomes a proper 4xx. `deltas()` yields
released text; leaving it early (client disconnect, cancellation) aborts the request. After a stop-string match
the request is aborted and the stream is drained to its final output, so `final` is set whenever `deltas()`
has returned.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import StreamingResponse

from deltaserve.engine.api import Constraint, GenerateRequest, RequestOutput, SamplingParams
from deltaserve.engine.async_engine import RequestStream
from deltaserve.engine.textstream import TextStream
from deltaserve.server.context import cache_namespace, ServerContext
from deltaserve.server.errors import APIError, bad_request, engine_errors, shutting_down
from deltaserve.server.protocol import (CacheInfo, CompletionTokensDetails, DeltaserveInfo, PromptTokensDetails,
                                        Usage, SamplingFields)

request_log = logging.getLogger("deltaserve.requests")


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(obj: Any) -> str:
    """One server-sent event carrying `obj` as compact JSON."""
    return "data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n\n"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def sampling_params(body: SamplingFields, max_tokens: int | None, ctx: ServerContext) -> SamplingParams:
    if body.n not in (None, 1):
        raise bad_request("only n=1 is supported", "n", "unsupported")
    if body.logprobs:
        raise bad_request("logprobs are not supported", "logprobs", "unsupported")
    # request > the model's generation_config.json (ctx.sampling_defaults) > the OpenAI defaults
    d = ctx.sampling_defaults
    temperature = body.temperature if body.temperature is not None else getattr(d, "temperature", None)
    top_p = body.top_p if body.top_p is not None else getattr(d, "top_p", None)
    top_k = body.top_k if body.top_k is not None else getattr(d, "top_k", None)
    top_k = 0 if top_k in (None, -1) else top_k
    for t in body.stop_token_ids or []:
        if not 0 <= t < ctx.vocab_size:
            raise bad_request(f"stop_token_ids has an id outside the vocabulary: {t}", "stop_token_ids")
    return SamplingParams(
        max_tokens=max_tokens or ctx.max_context,  # the engine clamps to what the context leaves
        temperature=1.0 if temperature is None else temperature,
        top_p=1.0 if top_p is None else top_p,
        top_k=top_k,
        seed=body.seed,
        stop=body.stop_list(),
        stop_token_ids=list(body.stop_token_ids or []),
        ignore_eos=body.ignore_eos,
    )


class Generation:
    def __init__(self, ctx: ServerContext, route: str, stream: RequestStream, params: SamplingParams,
                 session_id: str | None, render_mode: str, t0: float):
        self.ctx, self.route, self.stream = ctx, route, stream
        self.session_id, self.render_mode = session_id, render_mode
        self.text = TextStream(ctx.tokenizer, params.stop)
        self.t0 = t0
        self.ttft: float | None = None
        self._last: float | None = None  # when the previous tokens arrived (inter-token latency)
        self.done = False
        self.prompt_ids: list[int] | None = None

    @classmethod
    async def start(cls, ctx: ServerContext, route: str, prompt: list[int], params: SamplingParams, *,
                    owner: str | None, session_id: str | None = None, session_ttl: float | None = None,
                    open_session: bool = True, constraint: Constraint | None = None,
                    render_mode: str = "full", cache_salt: str | None = None) -> "Generation":
        t0 = time.perf_counter()
        req = GenerateRequest(prompt, params, owner, session_id, open_session=open_session and session_id is not None,
                              session_ttl=session_ttl, constraint=constraint,
                              cache_namespace=cache_namespace(owner, cache_salt))  # every route: tenant-scoped KV
        with engine_errors(session_id):
            stream = await ctx.driver.submit(req)
        gen = cls(ctx, route, stream, params, session_id, render_mode, t0)
        gen.prompt_ids = prompt if ctx.log_requests else None  # kept only to be logged
        return gen

    @property
    def final(self) -> RequestOutput:
        """The request's last output (set once `deltas()` / `collect()` has returned)."""
        assert self.stream.final is not None
        return self.stream.final

    @property
    def output_ids(self) -> list[int]:
        return self.stream.output_ids

    async def deltas(self) -> AsyncIterator[str]:
        try:
            async for out in self.stream:
                if out.new_token_ids:
                    now = time.perf_counter()
                    if self.ttft is None:
                        self.ttft = now - self.t0
                    else:
                        self.ctx.metrics.observe_tokens(self.route, now - self._last, len(out.new_token_ids))
                    self._last = now
                d = self.text.push(list(out.new_token_ids))
                if d:
                    yield d
                if self.text.stopped:
                    self.stream.abort()
                    async for _ in self.stream:  # drain to the final output (at most one more step)
                        pass
                    break
            self.done = True
            if self.aborted:
                return
            tail = self.text.finish()
            if tail:
                yield tail
            self._observe()
        finally:
            if not self.done:
                self.stream.abort()

    @property
    def aborted(self) -> bool:
        """Cancelled from outside (client disconnect, shutdown) rather than finished."""
        f = self.stream.final
        return f is not None and f.finish_reason == "abort" and not self.text.stopped

    async def collect(self, request: Request | None = None) -> str:
        """Run to the end (non-streaming); a client disconnect aborts the request (then: APIError 499), and so
        does a server shutdown past its --shutdown-timeout (then: 503, `server_aborted()`)."""
        watcher = asyncio.create_task(_abort_on_disconnect(request, self.stream)) if request is not None else None
        try:
            async for _ in self.deltas():
                pass
        finally:
            if watcher is not None:
                watcher.cancel()
        if self.aborted:
            if watcher is not None and watcher.done() and not watcher.cancelled() and watcher.result():
                raise APIError(499, "client closed the request", code="client_closed_request")
            raise server_aborted()
        return self.text.text

    # ------------------------------------------------------------ results
    @property
    def finish_reason(self) -> str:
        if self.text.stopped:
            return "stop"
        r = self.final.finish_reason
        if r == "timeout":  # --request-timeout: cut like max_tokens would, flagged in the usage extension
            return "length"
        return r if r in ("stop", "length") else "stop"

    def info(self) -> DeltaserveInfo:
        st = self.final.stats
        ex = st.explanation
        cache = CacheInfo(
            reason=ex.reason.value if ex is not None else None,
            cached_tokens=st.cached_tokens,
            prefilled_tokens=st.prefilled_tokens,
            diverged_at=ex.diverged_at if ex is not None else None,
            detail=ex.detail if ex is not None else None,
            restored_tokens=ex.restored_tokens if ex is not None else 0,
        )
        timed_out = self.final.finish_reason == "timeout"
        return DeltaserveInfo(session_id=self.session_id, cache=cache, render_mode=self.render_mode,
                              timed_out=timed_out)

    def usage(self) -> Usage:
        st = self.final.stats
        prompt, completion = st.prompt_tokens, st.output_tokens
        return Usage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=st.cached_tokens),
            completion_tokens_details=CompletionTokensDetails(
                accepted_prediction_tokens=st.accepted_tokens,
                rejected_prediction_tokens=max(0, st.drafted_tokens - st.accepted_tokens),
            ),
            deltaserve=self.info(),
        )

    def _observe(self) -> None:
        st = self.final.stats
        self.ctx.metrics.observe_generation(self.route, time.perf_counter() - self.t0, self.ttft, st.prompt_tokens,
                                            st.cached_tokens, st.output_tokens, st.queue_s)
        if self.prompt_ids is not None:  # --log-requests only: prompts and outputs are user data
            request_log.info("%s session=%s prompt_tokens=%d cached=%d output_tokens=%d finish=%s prompt=%r output=%r",
                             self.route, self.session_id, st.prompt_tokens, st.cached_tokens, st.output_tokens,
                             self.finish_reason, self.ctx.tokenizer.decode(self.prompt_ids), self.text.text)


class GenerationResponse(StreamingResponse):
    """SSE response that aborts its generation when it ends for any reason.

    On a client disconnect Starlette cancels the sending task while our body
    generator sits suspended at a `yield`; without this it would only be
    closed (and the sequence aborted) whenever it gets garbage-collected.
    """

    def __init__(self, content: AsyncIterator[str], gen: "Generation"):
        super().__init__(content, media_type="text/event-stream", headers=SSE_HEADERS)
        self._gen = gen

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._gen.stream.abort()  # no-op once finished


async def _abort_on_disconnect(request: Request, stream: RequestStream) -> bool:
    """Wait for the client to go away, then abort and return True. The body has been read, so the next message
    is the disconnect."""
    try:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                stream.abort()
                return True
    except (asyncio.CancelledError, RuntimeError):
        return False


def server_aborted() -> APIError:
    """The error of a request the server aborted: only a shutdown does (`shutdown.py`); a client disconnect
    also aborts, but then nobody is left to tell."""
    return shutting_down("The server is shutting down and aborted this request before it finished; retry it")


def engine_failure(e: Exception) -> APIError:
    return APIError(500, f"generation failed: {e}", code="engine_error")


SSE_DONE = "data: [DONE]\n\n"


@dataclass(frozen=True)
class ChunkFormat:
    """How one route frames its stream chunks (`object` type, extra top-level fields, the usage chunk)."""

    id: str
    created: int
    model: str
    object: str
    include_usage: bool
    extra: dict[str, Any] = field(default_factory=dict)

    def chunk(self, choice: dict[str, Any], **top: Any) -> str:
        obj: dict[str, Any] = {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                               **self.extra, "choices": [{"index": 0, **choice}]}
        if self.include_usage:
            obj["usage"] = None  # OpenAI sends usage: null on every chunk but the usage chunk
        obj.update(top)
        return sse(obj)

    def usage_chunk(self, usage: Usage) -> str:
        return sse({"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                    **self.extra, "choices": [], "usage": usage.model_dump()})


async def sse_events(gen: Generation, fmt: ChunkFormat, opening: list[str],
                     on_text: Callable[[str], list[str]], closing: Callable[[Usage], list[str]]) -> AsyncIterator[str]:
    """A route's SSE body: `opening` chunks, `on_text(delta)` per released text, then (unless the client went
    away) `closing(usage)` -- the finishing chunk(s) -- the usage chunk if asked for, and `[DONE]`. An engine
    failure mid-stream is reported in-band (the status line is gone by then)."""
    for c in opening:
        yield c
    try:
        async for text in gen.deltas():
            for c in on_text(text):
                yield c
    except RuntimeError as e:
        yield sse(engine_failure(e).body())
        yield SSE_DONE
        return
    if gen.aborted:  # by the server: a client disconnect cancels this generator at its `yield` instead
        yield sse(server_aborted().body())
        yield SSE_DONE
        return
    usage = gen.usage()
    for c in closing(usage):
        yield c
    if fmt.include_usage:
        yield fmt.usage_chunk(usage)
    yield SSE_DONE
