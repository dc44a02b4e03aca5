"""Graceful shutdown of `deltaserve serve`: on SIGTERM or SIGINT, drain, then stop the engine and exit 0.

The states, in order:

1. serving.
2. draining (from the first signal): the listening socket stays open, and every new request to /v1/* or
   /health is answered 503 (OpenAI error format; /health says "draining") with `Retry-After` and
   `Connection: close`, so a load balancer takes the replica out and clients retry elsewhere instead of
   seeing "connection refused" (`errors.shutting_down`). Requests already in flight, streaming or not, run to
   completion.
3. aborting (after `--shutdown-timeout` seconds, or at once on a second signal): every request still in the
   engine is aborted (`AsyncEngine.abort_all`: the KV computed so far stays cached, sessions stay consistent;
   a stream ends with an in-band `server_shutting_down` error then `[DONE]`, a non-streaming request gets that
   503: `generation.server_aborted`), and the handlers get ABORT_GRACE_S to send their last bytes.
4. uvicorn's own shutdown: the socket closes, idle keep-alive connections close, the app's lifespan ends, which
   calls `driver.stop()` exactly once -- after the in-flight work has ended, so whatever the engine flushes
   there sees every finished turn. The process then exits 0.

A third signal sets uvicorn's `force_exit`: it stops waiting for connections and skips the lifespan's end
(no `driver.stop()`, nothing flushed).

Mutates: the `Drain` object's counters and flags only (from the middleware, the signal handler and the drain
loop, all on the event loop's thread).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import Callable

import uvicorn
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from deltaserve.server.errors import shutting_down

log = logging.getLogger("deltaserve.server")

__all__ = ["Drain", "DrainMiddleware", "DrainingServer", "serve", "DEFAULT_SHUTDOWN_TIMEOUT"]

DEFAULT_SHUTDOWN_TIMEOUT = 30.0
#: Seconds the handlers get, after the abort, to send their last bytes before uvicorn cancels them.
ABORT_GRACE_S = 5.0


class Drain:
    """The shutdown state of one server, shared by its middleware and its uvicorn Server."""

    def __init__(self, timeout: float = DEFAULT_SHUTDOWN_TIMEOUT):
        self.timeout = timeout
        self.draining = False  # set by the first signal; from then on new requests get 503
        self.aborting = False  # set once the deadline passed and what still ran was aborted
        self.in_flight = 0  # HTTP requests admitted and not yet finished (streams until their last byte)
        self._deadline = float("inf")
        self._wake = asyncio.Event()  # set when in_flight drops to 0, or by hurry()

    def begin(self) -> None:
        """Stop admitting and start the clock (idempotent). Safe in a signal handler: it only sets attributes."""
        if not self.draining:
            self.draining = True
            self._deadline = time.monotonic() + self.timeout

    def hurry(self) -> None:
        """Abort what still runs now instead of at the deadline (a second signal). Event loop thread only."""
        self.begin()
        self._deadline = time.monotonic()
        self._wake.set()

    def _finished(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._wake.set()

    async def _wait_idle(self, until: Callable[[], float]) -> None:
        """Until nothing is in flight or `until()` (re-read on every wake) has passed."""
        while self.in_flight:
            left = until() - time.monotonic()
            if left <= 0:
                return
            self._wake.clear()  # no await since in_flight was read: a finish cannot be missed
            try:
                async with asyncio.timeout(left):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def run(self, abort_all: Callable[[], object]) -> None:
        """Wait for the requests in flight until the deadline, then abort the rest (`abort_all`, repeated so a
        handler that submits after one round is caught by the next) and give them ABORT_GRACE_S to end."""
        self.begin()
        if self.in_flight:
            log.info("draining: %d request(s) in flight, new requests get 503; waiting up to %.0f s "
                     "(--shutdown-timeout)", self.in_flight, max(0.0, self._deadline - time.monotonic()))
            await self._wait_idle(lambda: self._deadline)
        if not self.in_flight:
            return
        self.aborting = True
        log.warning("shutdown: aborting %d request(s) still in flight", self.in_flight)
        end = time.monotonic() + ABORT_GRACE_S
        while self.in_flight and time.monotonic() < end:
            abort_all()
            await self._wait_idle(lambda: min(end, time.monotonic() + 0.5))


class DrainMiddleware:
    """Counts the HTTP requests in flight; while draining, answers new /v1/* and /health requests 503.

    Other paths (/metrics, /tokenize, /detokenize, /version, /docs, /openapi.json) are still served while
    draining: they touch no engine state and end at once.
    """

    def __init__(self, app: ASGIApp, drain: Drain, model_name: str):
        self.app, self.drain, self.model_name = app, drain, model_name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if self.drain.draining and (path == "/health" or path == "/v1" or path.startswith("/v1/")):
            error = shutting_down("The server is shutting down and accepts no new requests; retry (another "
                                  "replica, or this one once restarted)")
            if path == "/health":
                response = JSONResponse({"status": "draining", "model": self.model_name}, status_code=503,
                                        headers=error.headers)
            else:
                response = error.response()
            await response(scope, receive, send)
            return
        self.drain.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain._finished()


class DrainingServer(uvicorn.Server):
    """uvicorn's Server, with `Drain.run` between the signal and uvicorn's own shutdown.

    uvicorn's main loop notices `should_exit` within 0.1 s and calls `shutdown()`, which here drains while the
    listening socket is still open, then does uvicorn's shutdown (close the socket, wait for connections, end
    the lifespan: `driver.stop()`).
    """

    def __init__(self, config: uvicorn.Config, drain: Drain, abort_all: Callable[[], object]):
        super().__init__(config)
        self.drain, self.abort_all = drain, abort_all
        self._loop: asyncio.AbstractEventLoop | None = None
        self._signals = 0

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)

    def handle_exit(self, sig: int, frame) -> None:
        # Unlike uvicorn's, the signal is not recorded: uvicorn re-raises recorded signals after its shutdown,
        # and the process would then die by SIGTERM (exit status 143) instead of exiting 0 once drained.
        self._signals += 1
        if self._signals == 1:
            self.drain.begin()
            self.should_exit = True
        elif self._signals == 2:
            if self._loop is not None:  # the drain loop's Event is not signal-safe; the loop's self-pipe is
                self._loop.call_soon_threadsafe(self.drain.hurry)
        else:
            self.force_exit = True

    async def shutdown(self, sockets=None) -> None:
        await self.drain.run(self.abort_all)
        await super().shutdown(sockets=sockets)


def serve(app, drain: Drain, abort_all: Callable[[], object], **config) -> int:
    """Serve `app` (uvicorn.Config keywords in `config`) until a signal, drain, and return 0; exit 3 (uvicorn's
    STARTUP_FAILURE) when the server never started (port in use, lifespan failed)."""
    server = DrainingServer(uvicorn.Config(app, **config), drain, abort_all)
    server.run()
    if not server.started:
        sys.exit(3)
    return 0
