"""Server pieces without a model: the engine-thread driver (with a fake engine), stop strings, stores.

Fast: the only real asset is SmolLM2's tokenizer (for the text stream).
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from deltaserve.engine.chat import Transcript
from deltaserve.engine.engine import PromptTooLong, SeqOutput
from deltaserve.engine.sampling import SamplingParams
from deltaserve.engine.sequence import Sequence, SeqStatus
from deltaserve.server.async_engine import AsyncEngine
from deltaserve.server.state import ResponseEntry, ResponseStore, SessionStore, compact_tokens


class FakeEngine:
    """One token per step per running sequence; records which thread touched it."""

    def __init__(self):
        self.running: list[Sequence] = []
        self.aborted: list[Sequence] = []
        self.fail_next_step = False
        self.threads: set[str] = set()

    def _touch(self):
        self.threads.add(threading.current_thread().name)

    def add_request(self, prompt, params, session_id=None, owner=None):
        self._touch()
        if len(prompt) > 100:
            raise PromptTooLong(len(prompt), 100)
        params.validate()
        seq = Sequence(prompt, params, session_id, owner)
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)
        return seq

    def has_work(self):
        return bool(self.running)

    def step(self):
        self._touch()
        time.sleep(0.01)
        if self.fail_next_step:
            self.fail_next_step = False
            raise ValueError("boom")
        outs = []
        for seq in list(self.running):
            seq.tokens.append(100 + seq.num_output)
            done = seq.num_output >= seq.params.max_tokens
            if done:
                seq.status, seq.finish_reason = SeqStatus.FINISHED, "length"
                self.running.remove(seq)
            outs.append(SeqOutput(seq, [seq.tokens[-1]], done))
        return outs

    def abort(self, seq):
        self._touch()
        if seq in self.running:
            self.running.remove(seq)
        seq.status, seq.finish_reason = SeqStatus.FINISHED, "abort"
        self.aborted.append(seq)


@pytest.fixture
def driver():
    d = AsyncEngine(FakeEngine())
    d.start()
    yield d
    d.stop()
    assert not d.running


def test_generate_streams_tokens_on_the_engine_thread(driver):
    async def collect(n):
        return [i async for i in driver.generate([1, 2], SamplingParams(max_tokens=n))]

    async def main():
        return await asyncio.gather(collect(3), collect(5))

    a, b = asyncio.run(main())
    assert [t for i in a for t in i.new_tokens] == [100, 101, 102] and a[-1].finished
    assert [t for i in b for t in i.new_tokens] == [100, 101, 102, 103, 104]
    assert driver.engine.threads == {"deltaserve-engine"}


def test_build_makes_the_engine_on_the_thread_that_later_steps_it():
    # one OS thread does all torch work of `deltaserve serve` (its OpenMP team is the only one)
    made_on = []

    def factory():
        made_on.append(threading.get_ident())
        return FakeEngine()

    engine = AsyncEngine.build(factory)
    d = AsyncEngine.of(engine)
    d.start()
    try:
        idents = set(d.call_sync(lambda e: threading.get_ident()) for _ in range(3))

        async def collect():
            return [i async for i in d.generate([1], SamplingParams(max_tokens=2))]

        asyncio.run(collect())
    finally:
        d.stop()
    assert not d.running
    assert idents == set(made_on) and made_on[0] != threading.get_ident()
    assert engine.threads == {"deltaserve-engine"}
    d.start()  # a restart runs the loop on the same thread again
    try:
        assert d.call_sync(lambda e: threading.get_ident()) == made_on[0]
    finally:
        d.stop()


def test_build_raises_what_the_factory_raises():
    def factory():
        raise SystemExit("error: no such model")

    with pytest.raises(SystemExit, match="no such model"):
        AsyncEngine.build(factory)


def test_errors_raise_at_submit(driver):
    async def main():
        with pytest.raises(PromptTooLong):
            await driver.submit(list(range(101)), SamplingParams())
        with pytest.raises(ValueError):
            await driver.submit([1], SamplingParams(max_tokens=0))

    asyncio.run(main())


def test_abort_and_cancel(driver):
    async def main():
        s = await driver.submit([1], SamplingParams(max_tokens=10_000))
        first = await s.__anext__()
        s.abort()
        rest = [i async for i in s]
        assert rest and rest[-1].finished and s.seq.finish_reason == "abort"
        assert first.new_tokens

        async def consume():
            async for _ in driver.generate([1], SamplingParams(max_tokens=10_000)):
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):
            if len(driver.engine.aborted) == 2:
                break
            await asyncio.sleep(0.02)
        assert len(driver.engine.aborted) == 2 and not driver.engine.running

    asyncio.run(main())


def test_failed_step_fails_requests_but_not_the_thread(driver):
    async def main():
        s = await driver.submit([1], SamplingParams(max_tokens=10_000))
        driver.engine.fail_next_step = True
        with pytest.raises(RuntimeError, match="boom"):
            async for _ in s:
                pass
        return [i.new_tokens async for i in driver.generate([1], SamplingParams(max_tokens=2))]

    assert asyncio.run(main()) == [[100], [101]]
    assert driver.running


def test_call_runs_commands_between_steps(driver):
    assert driver.call_sync(lambda e: threading.current_thread().name) == "deltaserve-engine"
    with pytest.raises(KeyError):
        driver.call_sync(lambda e: {}["x"])


# --------------------------------------------------------------------------- text stream
@pytest.fixture(scope="module")
def tok():
    from deltaserve.models.loader import model_dir
    from deltaserve.models.tokenizer import Tokenizer

    return Tokenizer(model_dir("smollm2-135m"))


def _run(tok, text, stop):
    from deltaserve.server.textstream import TextStream

    ts = TextStream(tok, stop)
    out = []
    for t in tok.encode(text):
        out.append(ts.push([t]))
        if ts.stopped:
            break
    out.append(ts.finish())
    return ts, out


def test_stop_strings(tok):
    ts, out = _run(tok, "Hello world, this is a test.", ["is a"])
    assert "".join(out) == ts.text == "Hello world, this " and ts.stopped and ts.matched_stop == "is a"
    ts, _ = _run(tok, "abc def ghi", ["ghi", "c d"])  # the earliest match wins
    assert ts.text == "ab"
    ts, out = _run(tok, "Bonjour, ça va? Très bien.", [])
    assert "".join(out) == "Bonjour, ça va? Très bien." and not ts.stopped
    ts, out = _run(tok, "ends with is", ["is a"])  # a held prefix is released at the end
    assert "".join(out) == "ends with is" and not ts.stopped


def test_stop_prefix_is_held_back(tok):
    from deltaserve.server.textstream import TextStream

    ts = TextStream(tok, ["STOP"])
    ids = tok.encode("go ST")
    assert "ST" not in "".join(ts.push([t]) for t in ids)
    assert ts.finish().endswith("ST")


# --------------------------------------------------------------------------- stores
def _entry(rid, owner, n, session=None):
    return ResponseEntry(rid, owner, Transcript([], None, compact_tokens(list(range(n)))), None, session)


def test_response_store_bounds_and_owner():
    st = ResponseStore(max_entries=3, max_tokens=100)
    for i in range(4):
        st.put(_entry(f"r{i}", "a", 10))
    assert st.get("r0", "a") is None and st.get("r1", "a") is not None and len(st) == 3
    assert st.get("r1", "b") is None
    st.put(_entry("big", "a", 90))
    assert st.get("big", "a") is not None and st.get("r1", "a") is not None  # r1 was used most recently
    assert st.get("r2", "a") is None and st.get("r3", "a") is None and len(st) == 2


def test_session_store_owner():
    st = SessionStore()
    e = st.ensure("s", "a")
    assert st.ensure("s", "a") is e
    st.record_turn("s", "a", Transcript(), None, "r1")
    assert st.get("s").last_response_id == "r1"
    assert st.ensure("s", "b") is not e  # re-created by another owner: the old transcript is gone
    st.drop("s")
    assert st.get("s") is None
