"""AsyncEngine: the engine's front door for asyncio callers, driving the synchronous LLMEngine from one thread.

`LLMEngine.step()` is blocking compute (tens to hundreds of ms) and the engine is not thread-safe, so exactly
one thread -- the engine thread -- ever touches it. Callers use named methods (`submit`/`generate`, the session
verbs, `stats`) whose work runs on that thread between two steps; what comes back is immutable (`engine/api.py`:
`RequestOutput`, `SessionInfo`). While there is no work and no command the thread sleeps on a condition variable.

Each request gets a `RequestStream`, an async iterator of `RequestOutput` snapshots fed from the engine thread
with `loop.call_soon_threadsafe` into an `asyncio.Queue`, the last one with `finished=True`; the stream also
accumulates the output token ids. Abandoning a stream (client gone, stop string matched) calls `abort()`, which
cancels the request between steps; the engine's abort keeps the KV computed so far in the cache, so a session
stays consistent and its next turn still reuses it.

Three methods need no trip to the engine thread: `last_turn`, `record_turn` and `response` read or replace one
immutable `TurnRecord` under a lock (`engine/sessions.py`), so a front end renders the next turn from the last
one without waiting for a step to end.

Several FastAPI apps may serve one engine (tests do); `AsyncEngine.of(engine)` returns the one driver per
engine, started and stopped by reference count.

`AsyncEngine.build(factory)` loads the model on the thread that will later run the engine loop, and
`deltaserve serve` starts that way, so one OS thread does all of the server's torch work. The reason is
libgomp: every thread that opens an OpenMP parallel region gets a team of its own, and once libgomp manages
more threads than there are cores its workers stop spinning between regions (its "throttled" spin count) and
each region pays a futex wake. A model loaded on the main thread and run on another made a 1-token SmolLM2
decode step take 40 ms instead of 19.5 on 2 cores.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import ctypes
import logging
import sys
import queue
import threading
import weakref
from collections import deque
from typing import Any, AsyncIterator, Callable

import torch

from deltaserve.engine.api import EngineInfo, GenerateRequest, IntegrityReport, RequestOutput, SessionInfo, TurnRecord
from deltaserve.engine.engine import LLMEngine
from deltaserve.engine.sequence import Sequence, SeqStatus

log = logging.getLogger("deltaserve.engine")


def _glibc_malloc_trim() -> Callable[[], int] | None:
    """glibc's `malloc_trim(0)`, or None off glibc. Step temporaries (activations, logits: up to tens of MB, under
    glibc's 32 MB mmap threshold) live in per-thread malloc arenas, and glibc keeps freed arena pages: after a
    burst the server's RSS stays at the burst's high-water mark (measured: +12% over the warm-up level after
    `deltaserve bench load`, the peak never given back). malloc_trim returns those free pages to the system."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # musl and other libcs have no malloc_trim
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: fn(0)


_MALLOC_TRIM = _glibc_malloc_trim()


class RequestStream:
    """One request's outputs, in order; iterate with `async for`, stop early with `abort()`.

    `output_ids` holds every token id received so far and `final` the last output once finished. A failed
    engine step ends the stream with RuntimeError("engine failure: ...").
    """

    def __init__(self, driver: "AsyncEngine", loop: asyncio.AbstractEventLoop):
        self._driver = driver
        self._loop = loop
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.request_id: int | None = None  # set on the engine thread at submission
        self.output_ids: list[int] = []
        self.final: RequestOutput | None = None
        self.finished = False
        self._abort_sent = False

    def _push(self, item: RequestOutput | BaseException) -> None:  # engine thread
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # event loop closed: nobody is listening any more
            pass

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise RuntimeError(f"engine failure: {item!r}") from item
        self.output_ids.extend(item.new_token_ids)
        if item.finished:
            self.finished, self.final = True, item
        return item

    def abort(self) -> None:
        """Cancel the request (idempotent; a no-op once it finished)."""
        if self.finished or self._abort_sent:
            return
        self._abort_sent = True
        self._driver._submit(lambda engine: self._driver._abort(self))


class AsyncEngine:
    _by_engine: "weakref.WeakKeyDictionary[LLMEngine, AsyncEngine]" = weakref.WeakKeyDictionary()
    _registry_lock = threading.Lock()

    def __init__(self, engine: LLMEngine, worker: "_Worker | None" = None):
        self.engine = engine
        self._cond = threading.Condition()
        self._cmds: deque[tuple[Callable[[LLMEngine], Any], cf.Future]] = deque()
        # request id -> (stream, sequence); engine thread only: no sequence ever leaves it
        self._requests: dict[int, tuple[RequestStream, Sequence]] = {}
        self._worker = worker  # the engine thread; made on the first start when `build` did not
        self._loop_done: cf.Future | None = None  # set while the loop runs on the worker
        self._stopping = False
        self._users = 0
        self.idle_trims = 0  # heap trims after a busy period (engine thread writes; tests read)

    @classmethod
    def of(cls, engine: LLMEngine) -> "AsyncEngine":
        """The single driver of `engine` (created on first use)."""
        with cls._registry_lock:
            drv = cls._by_engine.get(engine)
            if drv is None:
                drv = cls._by_engine[engine] = cls(engine)
            return drv

    @classmethod
    def build(cls, factory: Callable[[], LLMEngine]) -> LLMEngine:
        """Run `factory()` on a new engine thread and register that thread as the engine's driver.

        The model's weights are made (and their OpenMP team started) on the thread that steps
        the engine later, instead of on the caller's. Exceptions from `factory` (SystemExit
        included) raise here.
        """
        worker = _Worker("deltaserve-engine")
        engine = worker.submit(factory).result()
        with cls._registry_lock:
            cls._by_engine[engine] = cls(engine, worker)
        return engine

    @property
    def info(self) -> EngineInfo:
        return self.engine.info

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        with self._cond:
            self._users += 1
            if not self.running:
                self._stopping = False
                if self._worker is None:
                    self._worker = _Worker("deltaserve-engine")
                self._loop_done = self._worker.submit(self._run)

    def stop(self, timeout: float = 30.0) -> None:
        """Drop one user; the last one aborts what is still running and waits for the loop to end."""
        with self._cond:
            self._users = max(0, self._users - 1)
            if self._users or self._loop_done is None:
                return
            self._stopping = True
            self._cond.notify_all()
            done = self._loop_done
        cf.wait([done], timeout)
        self._loop_done = None

    @property
    def running(self) -> bool:
        return self._loop_done is not None and not self._loop_done.done()

    # ------------------------------------------------------------ requests
    async def submit(self, req: GenerateRequest) -> RequestStream:
        """Queue a request; its input errors (EngineError, ValueError) raise here, before any output."""
        stream = RequestStream(self, asyncio.get_running_loop())

        def start(engine: LLMEngine) -> None:
            seq = engine.add_request(req.prompt, req.params, req.session_id, req.owner, constraint=req.constraint,
                                     open_session=req.open_session, session_ttl=req.session_ttl,
                                     cache_namespace=req.cache_namespace)
            stream.request_id = seq.seq_id
            self._requests[seq.seq_id] = (stream, seq)

        try:
            await asyncio.shield(asyncio.wrap_future(self._submit(start)))
        except asyncio.CancelledError:
            stream.abort()  # queued after `start`, so it finds the request if one was made
            raise
        return stream

    async def generate(self, req: GenerateRequest) -> AsyncIterator[RequestOutput]:
        """Submit and iterate; leaving the loop early (or being cancelled) aborts the request."""
        stream = await self.submit(req)
        try:
            async for out in stream:
                yield out
        finally:
            stream.abort()

    def abort_all(self) -> cf.Future:
        """Abort every request in flight, as each stream's `abort()` would (KV kept, streams end with
        finish_reason "abort"); the engine keeps running and accepts new requests. A graceful shutdown's
        deadline (`server/shutdown.py`) uses it before `stop()`. Thread-safe; the future resolves on the
        engine thread once the aborts are done (with RuntimeError if the engine is not running)."""
        return self._submit(lambda engine: [self._abort(stream) for stream, _ in list(self._requests.values())])

    # ------------------------------------------------------------ sessions
    async def open_session(self, session_id: str, owner: str | None, ttl: float | None = None) -> SessionInfo:
        """SessionExists if the id is taken."""
        return await self._call(lambda e: e.sessions.open(session_id, owner, ttl))

    async def get_session(self, session_id: str, owner: str | None) -> SessionInfo:
        """SessionNotFound unless it exists and is `owner`'s."""
        return await self._call(lambda e: e.sessions.info(session_id, owner))

    async def list_sessions(self, owner: str | None) -> list[SessionInfo]:
        return await self._call(lambda e: e.sessions.list(owner))

    async def set_session_ttl(self, session_id: str, owner: str | None, ttl: float) -> SessionInfo:
        return await self._call(lambda e: e.sessions.set_ttl(session_id, owner, ttl))

    async def fork_session(self, session_id: str, new_id: str, owner: str | None,
                           ttl: float | None = None, turn: int | None = None) -> SessionInfo:
        """A new session `new_id` at `session_id`'s state through `turn` (default: all; shared KV, no prefill);
        SessionNotFound / SessionExists / ValueError (no such turn)."""
        return await self._call(lambda e: e.sessions.fork(session_id, new_id, owner, ttl, turn))

    async def rollback_session(self, session_id: str, owner: str | None, turn: int) -> SessionInfo:
        """Truncate the session to the end of `turn` (nothing recomputed); SessionNotFound / SessionBusy /
        ValueError (no such turn)."""
        return await self._call(lambda e: e.sessions.rollback(session_id, owner, turn))

    async def export_session(self, session_id: str, owner: str | None) -> bytes:
        """The session's state in the session store's format (GET /v1/sessions/{id}/state)."""
        return await self._call(lambda e: e.sessions.export(session_id, owner))

    async def import_session(self, session_id: str, owner: str | None, data: bytes,
                             ttl: float | None = None) -> SessionInfo:
        """A new session from an export; SessionExists, or StoreError for data this engine cannot use."""
        return await self._call(lambda e: e.sessions.import_state(session_id, owner, data, ttl))

    async def close_session(self, session_id: str, owner: str | None) -> None:
        """SessionBusy while a turn runs; the KV stays as evictable prefix cache."""
        await self._call(lambda e: e.sessions.close(session_id, owner))

    def last_turn(self, session_id: str, owner: str | None) -> TurnRecord | None:
        """Any thread, no wait: the session's last finished turn (None before its first); SessionNotFound."""
        return self.engine.sessions.last_turn(session_id, owner)

    def turn_records(self, session_id: str, owner: str | None) -> list[TurnRecord]:
        """Any thread, no wait: the session's recorded turns, newest first; SessionNotFound."""
        return self.engine.sessions.turn_records(session_id, owner)

    def turn_of_response(self, session_id: str, owner: str | None, response_id: str) -> int | None:
        """Any thread, no wait: which turn of the session's state that response ended (None: none)."""
        return self.engine.sessions.turn_of_response(session_id, owner, response_id)

    def record_turn(self, record: TurnRecord) -> None:
        """Any thread, no wait: keep a finished turn (under its response id, and as its session's last turn)."""
        self.engine.sessions.record_turn(record)

    def response(self, response_id: str, owner: str | None) -> TurnRecord | None:
        """Any thread, no wait: a finished turn by response id, if kept and `owner`'s."""
        return self.engine.sessions.response(response_id, owner)

    def forget_response(self, response_id: str, owner: str | None) -> bool:
        """Any thread, no wait: drop a stored response (DELETE /v1/responses/{id}); whether it was there."""
        return self.engine.sessions.forget_response(response_id, owner)

    async def stats(self) -> dict[str, Any]:
        """The engine's counters and gauges, as one consistent snapshot."""
        return await self._call(lambda e: e.stats())

    async def check_integrity(self) -> IntegrityReport:
        """Run the engine's invariant checks on the engine thread, between steps."""
        return await self._call(lambda e: e.check_integrity())

    # ------------------------------------------------------------ commands
    def _submit(self, fn: Callable[[LLMEngine], Any]) -> cf.Future:
        """Run `fn(engine)` on the engine thread between steps; thread-safe."""
        fut: cf.Future = cf.Future()
        with self._cond:
            if not self.running or self._stopping:
                fut.set_exception(RuntimeError("engine thread is not running"))
                return fut
            self._cmds.append((fn, fut))
            self._cond.notify()
        return fut

    async def _call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        return await asyncio.wrap_future(self._submit(fn))

    # ------------------------------------------------------------ engine thread
    def _abort(self, stream: RequestStream) -> None:
        entry = self._requests.pop(stream.request_id, None) if stream.request_id is not None else None
        if entry is None:
            return  # never started, or already finished
        out = self.engine.abort(entry[1])
        if out is not None:
            stream._push(out)

    def _run(self) -> None:
        # Everything on this thread runs in inference mode: the model returns inference tensors, and
        # in-place work on them outside it (a grammar masking logits in `_sample`) raises.
        with torch.inference_mode():
            self._loop()

    def _loop(self) -> None:
        engine = self.engine
        stepped = False  # a step ran since the engine was last idle
        while True:
            with self._cond:
                idle = not self._cmds and not self._stopping and not engine.has_work()
                if idle and not stepped:
                    while not self._cmds and not self._stopping and not engine.has_work():
                        self._cond.wait()
                cmds = list(self._cmds)
                self._cmds.clear()
                stopping = self._stopping
            if idle and stepped:  # the engine just went idle: trim outside the lock, then wait (or serve what came)
                stepped = False
                self._release_memory()
                continue
            for fn, fut in cmds:
                if not fut.set_running_or_notify_cancel():
                    continue
                try:
                    fut.set_result(fn(engine))
                except BaseException as e:  # delivered to the caller
                    fut.set_exception(e)
            if stopping:
                self._shutdown()
                return
            if engine.has_work():
                stepped = True
                try:
                    outputs = engine.step()
                except Exception as e:
                    log.exception("engine step failed; failing the requests in flight")
                    self._fail_all(e)
                    continue
                for out in outputs:
                    entry = self._requests.get(out.request_id)
                    if entry is None:
                        continue
                    if out.finished:
                        del self._requests[out.request_id]
                    entry[0]._push(out)

    def _release_memory(self) -> None:
        """The engine just went idle: hand the step temporaries' freed heap pages back to the system."""
        if _MALLOC_TRIM is not None:
            _MALLOC_TRIM()
        self.idle_trims += 1

    def _fail_all(self, exc: BaseException) -> None:
        for stream, seq in list(self._requests.values()):
            try:
                if seq.status != SeqStatus.FINISHED:
                    self.engine.abort(seq)
            except Exception:  # the engine is already in trouble; keep failing the rest
                log.exception("abort after a failed step")
            stream._push(exc)
        self._requests.clear()

    def _shutdown(self) -> None:
        for stream, _ in list(self._requests.values()):
            self._abort(stream)
        self._requests.clear()
        if not self.engine.close():  # the session store's queued writes reach the disk
            log.warning("session store writes did not finish before shutdown")
        with self._cond:
            pending = list(self._cmds)
            self._cmds.clear()
        for _, fut in pending:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(RuntimeError("engine thread stopped"))


class _Worker:
    """A daemon thread that runs submitted functions one after another (the engine thread).

    Daemon, unlike a ThreadPoolExecutor's workers: a driver nobody stopped must not hold up
    the interpreter's exit.
    """

    def __init__(self, name: str):
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], cf.Future]] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._work, name=name, daemon=True)
        self.thread.start()

    def submit(self, fn: Callable[[], Any]) -> cf.Future:
        fut: cf.Future = cf.Future()
        self._jobs.put((fn, fut))
        return fut

    def _work(self) -> None:
        while True:
            fn, fut = self._jobs.get()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as e:  # delivered to whoever waits on the future
                fut.set_exception(e)
