"""One HTTP generation: submit to the engine thread, turn tokens into text, account for it.

Shared by chat and text completions, streaming or not. `Generation.start`
opens the session if needed and submits atomically on the engine thread, so
every input error (prompt too long, session busy or unknown) is raised before
a response has started and becomes a proper 4xx. `deltas()` yields released
text; leaving it early (client disconnect, cancellation) aborts the
sequence. After a stop-string match the sequence is aborted and the stream is
drained to its final item, so `seq` is finished -- and no longer touched by
the engine thread -- whenever `deltas()` has returned.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from deltaserve.engine.engine import LLMEngine, SessionNotFound
from deltaserve.engine.sampling import SamplingParams
from deltaserve.engine.sequence import Sequence
from deltaserve.server.async_engine import RequestStream
from deltaserve.server.context import ServerContext
from deltaserve.server.errors import APIError, bad_request, from_engine_error
from deltaserve.server.protocol import (CacheInfo, CompletionTokensDetails, DeltaserveInfo, PromptTokensDetails,
                                        Usage, SamplingFields)
from deltaserve.server.textstream import TextStream


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
    top_k = body.top_k if body.top_k not in (None, -1) else 0
    for t in body.stop_token_ids or []:
        if not 0 <= t < ctx.engine.cfg.vocab_size:
            raise bad_request(f"stop_token_ids has an id outside the vocabulary: {t}", "stop_token_ids")
    return SamplingParams(
        max_tokens=max_tokens or ctx.max_context,  # the engine clamps to what the context leaves
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
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
        self.done = False

    @classmethod
    async def start(cls, ctx: ServerContext, route: str, prompt: list[int], params: SamplingParams, *,
                    owner: str | None, session_id: str | None = None, session_ttl: float | None = None,
                    create_session: bool = True, grammar: Any = None, render_mode: str = "full") -> "Generation":
        t0 = time.perf_counter()

        def setup(engine: LLMEngine) -> None:
            if session_id is None:
                return
            s = engine.get_session(session_id)
            if s is None:
                if not create_session:
                    raise SessionNotFound(session_id)
                engine.open_session(session_id, owner, session_ttl)
            elif s.owner != owner:
                raise SessionNotFound(session_id)
            elif session_ttl is not None:
                engine.set_session_ttl(session_id, session_ttl)

        try:
            stream = await ctx.driver.submit(prompt, params, session_id, owner, setup=setup, grammar=grammar)
        except Exception as e:
            raise from_engine_error(e, session_id) from e
        if session_id is not None:
            ctx.sessions.ensure(session_id, owner)
        return cls(ctx, route, stream, params, session_id, render_mode, t0)

    @property
    def seq(self) -> Sequence:
        assert self.stream.seq is not None
        return self.stream.seq

    async def deltas(self) -> AsyncIterator[str]:
        try:
            async for item in self.stream:
                if self.ttft is None and item.new_tokens:
                    self.ttft = time.perf_counter() - self.t0
                d = self.text.push(item.new_tokens)
                if d:
                    yield d
                if self.text.stopped:
                    self.stream.abort()
                    async for _ in self.stream:  # drain to the final item (at most one more step)
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
        seq = self.stream.seq
        return seq is not None and seq.finish_reason == "abort" and not self.text.stopped

    async def collect(self, request: Request | None = None) -> str:
        """Run to the end (non-streaming); a client disconnect aborts the sequence (then: APIError 499)."""
        watcher = asyncio.create_task(_abort_on_disconnect(request, self.stream)) if request is not None else None
        try:
            async for _ in self.deltas():
                pass
        finally:
            if watcher is not None:
                watcher.cancel()
        if self.aborted:
            raise APIError(499, "client closed the request", code="client_closed_request")
        return self.text.text

    # ------------------------------------------------------------ results
    @property
    def finish_reason(self) -> str:
        if self.text.stopped:
            return "stop"
        r = self.seq.finish_reason
        return r if r in ("stop", "length") else "stop"

    @property
    def ended_cleanly(self) -> bool:
        """The reply ended with an end-of-turn token the engine stopped on (see Transcript)."""
        seq = self.seq
        return (seq.finish_reason == "stop" and not self.text.stopped and seq.num_output > 0
                and seq.tokens[-1] in self.ctx.stop_ids)

    def info(self) -> DeltaserveInfo:
        seq, ex = self.seq, self.seq.explanation
        cache = CacheInfo(
            reason=ex.reason.value if ex is not None else None,
            cached_tokens=seq.stats.cached_tokens,
            prefilled_tokens=seq.stats.prefilled_tokens,
            diverged_at=ex.diverged_at if ex is not None else None,
            detail=ex.detail if ex is not None else None,
        )
        return DeltaserveInfo(session_id=self.session_id, cache=cache, render_mode=self.render_mode)

    def usage(self) -> Usage:
        st = self.seq.stats
        prompt, completion = self.seq.prompt_len, self.seq.num_output
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
        seq = self.seq
        self.ctx.metrics.observe_generation(self.route, time.perf_counter() - self.t0, self.ttft, seq.prompt_len,
                                            seq.stats.cached_tokens, seq.num_output)


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


async def _abort_on_disconnect(request: Request, stream: RequestStream) -> None:
    """Wait for the client to go away, then abort. The body has been read, so the next message is the disconnect."""
    try:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                stream.abort()
                return
    except (asyncio.CancelledError, RuntimeError):
        return


def engine_failure(e: Exception) -> APIError:
    return APIError(500, f"generation failed: {e}", code="engine_error")
