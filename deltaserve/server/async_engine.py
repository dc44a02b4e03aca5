"""AsyncEngine: the synchronous LLMEngine driven by one thread, used from asyncio.

`LLMEngine.step()` is blocking compute (tens to hundreds of ms) and the
engine is not thread-safe, so exactly one thread -- the engine thread -- ever
touches it. Everything else (submitting requests, aborts, session
operations, stats for /metrics) is a *command*: a function of the engine put
on a queue and run by that thread between two steps, with its result or
exception delivered through a `concurrent.futures.Future`. While there is no
work and no command the thread sleeps on a condition variable.

Each request gets a `RequestStream`, an async iterator fed from the engine
thread with `loop.call_soon_threadsafe` into an `asyncio.Queue`: one
`StreamItem` per step that produced tokens, the last one with
`finished=True`. Abandoning a stream (client gone, stop string matched)
calls `abort()`, which cancels the sequence between steps; the engine's
abort keeps the KV computed so far in the cache, so a session stays
consistent and its next turn still reuses it.

Several FastAPI apps may serve one engine (tests do); `AsyncEngine.of(engine)`
returns the one driver per engine, started and stopped by reference count.

`AsyncEngine.build(factory)` loads the model on the thread that will later
run the engine loop, and `deltaserve serve` starts that way, so one OS thread
does all of the server's torch work. The reason is libgomp: every thread that
opens an OpenMP parallel region gets a team of its own, and once libgomp
manages more threads than there are cores its workers stop spinning between
regions (its "throttled" spin count) and each region pays a futex wake. A
model loaded on the main thread and run on another made a 1-token SmolLM2
decode step take 40 ms instead of 19.5 on 2 cores.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import logging
import queue
import threading
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

import torch

from deltaserve.engine.engine import LLMEngine
from deltaserve.engine.sampling import SamplingParams
from deltaserve.engine.sequence import Sequence, SeqStatus

log = logging.getLogger("deltaserve.server")


@dataclass
class StreamItem:
    new_tokens: list[int]
    finished: bool
    seq: Sequence
    error: BaseException | None = None


class RequestStream:
    """One request's outputs, in order; iterate with `async for`, stop early with `abort()`."""

    def __init__(self, driver: "AsyncEngine", loop: asyncio.AbstractEventLoop):
        self._driver = driver
        self._loop = loop
        self._queue: asyncio.Queue[StreamItem] = asyncio.Queue()
        self.seq: Sequence | None = None  # set on the engine thread at submission
        self.finished = False
        self._abort_sent = False

    def _push(self, item: StreamItem) -> None:  # engine thread
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # event loop closed: nobody is listening any more
            pass

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> StreamItem:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if item.error is not None:
            self.finished = True
            raise RuntimeError(f"engine failure: {item.error!r}") from item.error
        if item.finished:
            self.finished = True
        return item

    def abort(self) -> None:
        """Cancel the request (idempotent; a no-op once it finished)."""
        if self.finished or self._abort_sent:
            return
        self._abort_sent = True
        self._driver.submit_call(lambda engine: self._driver._abort(self))


class AsyncEngine:
    _by_engine: "weakref.WeakKeyDictionary[LLMEngine, AsyncEngine]" = weakref.WeakKeyDictionary()
    _registry_lock = threading.Lock()

    def __init__(self, engine: LLMEngine, worker: "_Worker | None" = None):
        self.engine = engine
        self._cond = threading.Condition()
        self._cmds: deque[tuple[Callable[[LLMEngine], Any], cf.Future]] = deque()
        self._streams: dict[int, RequestStream] = {}  # seq_id -> stream; engine thread only
        self._worker = worker  # the engine thread; made on the first start when `build` did not
        self._loop_done: cf.Future | None = None  # set while the loop runs on the worker
        self._stopping = False
        self._users = 0

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

    # ------------------------------------------------------------ commands
    def submit_call(self, fn: Callable[[LLMEngine], Any]) -> cf.Future:
        """Run `fn(engine)` on the engine thread between steps; thread-safe."""
        fut: cf.Future = cf.Future()
        with self._cond:
            if not self.running or self._stopping:
                fut.set_exception(RuntimeError("engine thread is not running"))
                return fut
            self._cmds.append((fn, fut))
            self._cond.notify()
        return fut

    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """`fn(engine)` on the engine thread, awaited from the event loop."""
        return await asyncio.wrap_future(self.submit_call(fn))

    def call_sync(self, fn: Callable[[LLMEngine], Any], timeout: float | None = None) -> Any:
        """`fn(engine)` on the engine thread, from another (non-event-loop) thread."""
        return self.submit_call(fn).result(timeout)

    # ------------------------------------------------------------ requests
    async def submit(self, prompt: list[int], params: SamplingParams, session_id: str | None = None,
                     owner: Any = None, setup: Callable[[LLMEngine], None] | None = None,
                     grammar: Any = None) -> RequestStream:
        """Add a request; engine errors (PromptTooLong, SessionBusy, ...) raise here, before any output.

        `setup(engine)` runs on the engine thread right before `add_request`
        (e.g. opening the session), so the two are atomic with respect to
        other requests. `grammar` becomes `seq.grammar` before the first step.
        """
        stream = RequestStream(self, asyncio.get_running_loop())

        def start(engine: LLMEngine) -> Sequence:
            if setup is not None:
                setup(engine)
            seq = engine.add_request(prompt, params, session_id=session_id, owner=owner)
            seq.grammar = grammar
            stream.seq = seq
            self._streams[seq.seq_id] = stream
            return seq

        fut = self.submit_call(start)
        try:
            await asyncio.shield(asyncio.wrap_future(fut))
        except asyncio.CancelledError:
            stream.abort()  # queued after `start`, so it finds the sequence if one was made
            raise
        return stream

    async def generate(self, prompt: list[int], params: SamplingParams, session_id: str | None = None,
                       owner: Any = None, **kw: Any) -> AsyncIterator[StreamItem]:
        """Submit and iterate; leaving the loop early (or being cancelled) aborts the sequence."""
        stream = await self.submit(prompt, params, session_id, owner, **kw)
        try:
            async for item in stream:
                yield item
        finally:
            stream.abort()

    # ------------------------------------------------------------ engine thread
    def _abort(self, stream: RequestStream) -> None:
        seq = stream.seq
        if seq is None or seq.status == SeqStatus.FINISHED:
            return
        self.engine.abort(seq)
        self._streams.pop(seq.seq_id, None)
        stream._push(StreamItem([], True, seq))

    def _run(self) -> None:
        # Everything on this thread runs in inference mode: the model returns inference tensors, and
        # in-place work on them outside it (a grammar masking logits in `_sample`) raises.
        with torch.inference_mode():
            self._loop()

    def _loop(self) -> None:
        engine = self.engine
        while True:
            with self._cond:
                while not self._cmds and not self._stopping and not engine.has_work():
                    self._cond.wait()
                cmds = list(self._cmds)
                self._cmds.clear()
                stopping = self._stopping
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
                try:
                    outputs = engine.step()
                except Exception as e:
                    log.exception("engine step failed; failing the requests in flight")
                    self._fail_all(e)
                    continue
                for o in outputs:
                    stream = self._streams.get(o.seq.seq_id)
                    if stream is None:
                        continue
                    if o.finished:
                        del self._streams[o.seq.seq_id]
                    stream._push(StreamItem(list(o.new_tokens), o.finished, o.seq))

    def _fail_all(self, exc: BaseException) -> None:
        for stream in list(self._streams.values()):
            try:
                if stream.seq is not None and stream.seq.status != SeqStatus.FINISHED:
                    self.engine.abort(stream.seq)
            except Exception:  # the engine is already in trouble; keep failing the rest
                log.exception("abort after a failed step")
            stream._push(StreamItem([], True, stream.seq, error=exc))
        self._streams.clear()

    def _shutdown(self) -> None:
        for stream in list(self._streams.values()):
            self._abort(stream)
        self._streams.clear()
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
