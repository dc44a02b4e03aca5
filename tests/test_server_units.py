"""Server pieces without a model: the engine-thread driver (with a fake engine), stop strings, turn records.

Fast: the only real asset is SmolLM2's tokenizer (for the text stream).
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from deltaserve.cache.radix import RadixCache
from deltaserve.cache.session import SessionManager
from deltaserve.engine.api import GenerateRequest, PromptTooLong, RequestOutput, RequestStats, SessionNotFound, TurnRecord
from deltaserve.engine.async_engine import AsyncEngine
from deltaserve.engine.chat import Transcript, compact_tokens
from deltaserve.engine.responses import ResponseStore
from deltaserve.engine.sampling import SamplingParams
from deltaserve.engine.sequence import Sequence, SeqStatus
from deltaserve.engine.sessions import EngineSessions
from deltaserve.kv.allocator import SlotAllocator


def _out(seq: Sequence, new: list[int], finished: bool) -> RequestOutput:
    return RequestOutput(seq.seq_id, tuple(new), finished, seq.finish_reason,
                         RequestStats(seq.prompt_len, seq.num_output, 0, seq.prompt_len, 0, 0, None))


class _FakeSessions:
    def info(self, session_id, owner):
        raise SessionNotFound(f"session {session_id!r} not found")


class FakeEngine:
    """One token per step per running sequence; records which thread touched it."""

    def __init__(self):
        self.running: list[Sequence] = []
        self.aborted: list[Sequence] = []
        self.fail_next_step = False
        self.threads: set[str] = set()
        self.sessions = _FakeSessions()

    def _touch(self):
        self.threads.add(threading.current_thread().name)

    def add_request(self, prompt, params, session_id=None, owner=None, **_):
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
            outs.append(_out(seq, [seq.tokens[-1]], done))
        return outs

    def abort(self, seq):
        self._touch()
        if seq.status == SeqStatus.FINISHED:
            return None
        if seq in self.running:
            self.running.remove(seq)
        seq.status, seq.finish_reason = SeqStatus.FINISHED, "abort"
        self.aborted.append(seq)
        return _out(seq, [], True)

    def stats(self):
        self._touch()
        return {"thread": threading.get_ident()}


def _req(prompt, max_tokens=10_000):
    return GenerateRequest(list(prompt), SamplingParams(max_tokens=max_tokens))


@pytest.fixture
def driver():
    d = AsyncEngine(FakeEngine())
    d.start()
    yield d
    d.stop()
    assert not d.running


def test_generate_streams_tokens_on_the_engine_thread(driver):
    async def collect(n):
        return [i async for i in driver.generate(_req([1, 2], n))]

    async def main():
        return await asyncio.gather(collect(3), collect(5))

    a, b = asyncio.run(main())
    assert [t for i in a for t in i.new_token_ids] == [100, 101, 102] and a[-1].finished
    assert [t for i in b for t in i.new_token_ids] == [100, 101, 102, 103, 104]
    assert driver.engine.threads == {"deltaserve-engine"}


def test_heap_is_trimmed_once_each_time_the_engine_goes_idle(driver, monkeypatch):
    import deltaserve.engine.async_engine as ae

    calls = []
    monkeypatch.setattr(ae, "_MALLOC_TRIM", lambda: calls.append(threading.current_thread().name))

    async def burst():
        await _drain(driver.generate(_req([1, 2], 4)))  # one request: one busy period, whatever the timing
        await driver.stats()  # a command, not a step: no trim of its own
        for _ in range(200):  # the engine thread trims just after the last step's outputs went out
            if driver.idle_trims >= 1:
                break
            await asyncio.sleep(0.005)

    asyncio.run(burst())
    assert driver.idle_trims == 1 and calls == ["deltaserve-engine"]
    asyncio.run(burst())  # a second busy period, a second trim
    assert driver.idle_trims == 2 and len(calls) == 2
    if ae._glibc_malloc_trim() is not None:  # the real one runs on this libc
        assert ae._glibc_malloc_trim()() in (0, 1)


async def _drain(stream):
    return [o async for o in stream]


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
        async def main():
            idents = {(await d.stats())["thread"] for _ in range(3)}
            _ = [i async for i in d.generate(_req([1], 2))]
            return idents

        idents = asyncio.run(main())
    finally:
        d.stop()
    assert not d.running
    assert idents == set(made_on) and made_on[0] != threading.get_ident()
    assert engine.threads == {"deltaserve-engine"}
    d.start()  # a restart runs the loop on the same thread again
    try:
        assert asyncio.run(d.stats())["thread"] == made_on[0]
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
            await driver.submit(_req(range(101)))
        with pytest.raises(ValueError):
            await driver.submit(_req([1], 0))

    asyncio.run(main())


def test_abort_and_cancel(driver):
    async def main():
        s = await driver.submit(_req([1]))
        first = await s.__anext__()
        s.abort()
        rest = [i async for i in s]
        assert rest and rest[-1].finished and s.final.finish_reason == "abort"
        assert first.new_token_ids and s.output_ids[0] == 100

        async def consume():
            async for _ in driver.generate(_req([1])):
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
        s = await driver.submit(_req([1]))
        driver.engine.fail_next_step = True
        with pytest.raises(RuntimeError, match="boom"):
            async for _ in s:
                pass
        return [i.new_token_ids async for i in driver.generate(_req([1], 2))]

    assert asyncio.run(main()) == [(100,), (101,)]
    assert driver.running


def test_commands_run_on_the_engine_thread_and_raise_to_the_caller(driver):
    async def main():
        assert (await driver.stats())["thread"] != threading.get_ident()
        with pytest.raises(SessionNotFound):
            await driver.get_session("x", None)

    asyncio.run(main())
    assert driver.engine.threads == {"deltaserve-engine"}


# --------------------------------------------------------------------------- text stream
@pytest.fixture(scope="module")
def tok():
    from deltaserve.models.loader import model_dir
    from deltaserve.models.tokenizer import Tokenizer

    return Tokenizer(model_dir("smollm2-135m"))


def _run(tok, text, stop):
    from deltaserve.engine.textstream import TextStream

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
    from deltaserve.engine.textstream import TextStream

    ts = TextStream(tok, ["STOP"])
    ids = tok.encode("go ST")
    assert "ST" not in "".join(ts.push([t]) for t in ids)
    assert ts.finish().endswith("ST")


# --------------------------------------------------------------------------- turn records
def _record(rid, owner, n, session=None):
    return TurnRecord(rid, owner, session, Transcript([], None, compact_tokens(list(range(n)))), None)


def test_response_store_bounds_and_owner():
    st = ResponseStore(max_entries=3, max_tokens=100)
    for i in range(4):
        st.put(_record(f"r{i}", "a", 10))
    assert st.get("r0", "a") is None and st.get("r1", "a") is not None and len(st) == 3
    assert st.get("r1", "b") is None
    st.put(_record("big", "a", 90))
    assert st.get("big", "a") is not None and st.get("r1", "a") is not None  # r1 was used most recently
    assert st.get("r2", "a") is None and st.get("r3", "a") is None and len(st) == 2


def test_response_store_per_key_bound_evicts_only_that_keys_lru():
    from deltaserve.engine.owners import OwnerDigest, owner_digest

    st = ResponseStore(max_entries=100, max_per_owner=2)
    st.put(_record("b0", "b", 1))
    for i in range(4):
        st.put(_record(f"a{i}", "a", 1))
    assert [st.get(f"a{i}", "a") is not None for i in range(4)] == [False, False, True, True]
    assert st.get("b0", "b") is not None and (st.held_by("a"), st.held_by("b")) == (2, 1)
    # a record restored from disk (owned by a digest) counts against the same key
    st.put(_record("a9", OwnerDigest(owner_digest("a")), 1))
    assert st.held_by("a") == 2 and st.get("a2", "a") is None and st.get("a9", "a") is not None
    assert st.delete("a9", "a") and st.held_by("a") == 1


def test_session_owns_its_last_turn():
    sessions = EngineSessions(SessionManager(RadixCache(SlotAllocator(8))), ResponseStore())
    sessions.open("s", "a")
    assert sessions.last_turn("s", "a") is None and not sessions.info("s", "a").has_transcript
    with pytest.raises(SessionNotFound):
        sessions.last_turn("s", "b")  # another owner's session does not exist for you
    with pytest.raises(SessionNotFound):
        sessions.last_turn("nope", "a")
    r1 = _record("r1", "a", 3, session="s")
    sessions.record_turn(r1)
    assert sessions.last_turn("s", "a") is r1 and sessions.response("r1", "a") is r1
    assert sessions.info("s", "a").has_transcript
    sessions.record_turn(_record("rb", "b", 3, session="s"))  # another owner cannot write into it
    assert sessions.last_turn("s", "a") is r1 and sessions.response("rb", "b") is not None
    sessions.close("s", "a")
    sessions.open("s", "b")  # re-created by another owner: the old turn is gone with the old session
    assert sessions.last_turn("s", "b") is None
    assert sessions.response("r1", "a") is r1  # the response outlives its session
