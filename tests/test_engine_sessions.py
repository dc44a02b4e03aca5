"""Stateful core on real weights (SmolLM2-135M, fp32): sessions equal recompute, prefill only the delta."""

from __future__ import annotations

import random

import pytest

from conftest import load_engine
from deltaserve.cache.session import MatchReason
from deltaserve.engine.kv_manager import CacheMode
from deltaserve.engine.sampling import SamplingParams


GREEDY = SamplingParams(max_tokens=6)


def _delta(rng: random.Random, tok, lo=5, hi=25) -> list[int]:
    words = "tool result status ok error file line value name id city price total count list next done".split()
    return tok.encode(" " + " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi))))[:hi]


def run_conversations(engine, turns: int, sessions: int, seed: int, edit_at: int | None = None):
    """Interleaved sessions; each turn's prompt = session state + a random delta. Returns outputs and stats."""
    rng = random.Random(seed)
    tok = engine.tokenizer
    sys_prompt = tok.apply_chat([{"role": "system", "content": "You are a tool-using agent. Tools: search, read, write."}],
                                add_generation_prompt=False)
    history = {f"s{i}": list(sys_prompt) for i in range(sessions)}
    for sid in history:
        engine.open_session(sid)
    outs, stats = [], []
    for t in range(turns):
        seqs = []
        for sid in history:
            prompt = history[sid] + _delta(rng, tok)
            if edit_at is not None and t == edit_at:
                prompt[len(sys_prompt) + 3] = tok.encode(" edited")[0]  # rewrite history inside turn 0
            seqs.append((sid, prompt, engine.add_request(prompt, GREEDY, session_id=sid)))
        engine.run_until_done([s for _, _, s in seqs])
        for sid, prompt, seq in seqs:
            history[sid] = prompt + seq.output_ids
            outs.append(seq.output_ids)
            stats.append((sid, t, len(prompt), seq.stats.cached_tokens, seq.stats.prefilled_tokens, seq.explanation))
    return outs, stats


@pytest.fixture(scope="module")
def engines(smollm_dir):
    return {m: load_engine(smollm_dir, cache_mode=m, speculation=False) for m in CacheMode}


def test_35_turns_identical_across_cache_modes(engines):
    results = {m: run_conversations(e, turns=35, sessions=2, seed=11) for m, e in engines.items()}
    ref = results[CacheMode.STATELESS][0]
    assert results[CacheMode.STATEFUL][0] == ref
    assert results[CacheMode.PREFIX][0] == ref
    # stateless recomputes everything; stateful computes only the delta of each turn
    st = results[CacheMode.STATEFUL][1]
    sl = results[CacheMode.STATELESS][1]
    assert sum(s[4] for s in st) * 5 < sum(s[4] for s in sl)
    assert all(s[3] == 0 for s in sl)


def test_append_only_turns_prefill_exactly_the_new_tokens(engines):
    eng = engines[CacheMode.STATEFUL]
    rng = random.Random(3)
    tok = eng.tokenizer
    eng.open_session("exact")
    tokens = tok.apply_chat([{"role": "user", "content": "Plan a trip."}])
    for turn in range(8):
        session = eng.get_session("exact")
        state = list(session.tokens)
        seq = eng.add_request(tokens, GREEDY, session_id="exact")
        eng.run_until_done([seq])
        assert tokens[: len(state)] == state
        if turn == 0:
            assert seq.explanation.reason == MatchReason.NEW_SESSION
        else:
            assert seq.explanation.reason == MatchReason.EXTENDED
            assert seq.stats.prefilled_tokens == len(tokens) - len(state)
        # generated tokens entered the session's KV: state = prompt + output minus the last sampled token
        assert eng.get_session("exact").tokens == seq.tokens[:-1]
        tokens = seq.tokens + _delta(rng, tok)


def test_divergence_cuts_back_and_matches_recompute(engines):
    outs = {}
    for m in (CacheMode.STATEFUL, CacheMode.STATELESS):
        eng = engines[m]
        for sid in ("s0", "s1"):
            if eng.get_session(sid):
                eng.close_session(sid)
        outs[m] = run_conversations(eng, turns=4, sessions=2, seed=5, edit_at=2)
    assert outs[CacheMode.STATEFUL][0] == outs[CacheMode.STATELESS][0]
    diverged = [s for s in outs[CacheMode.STATEFUL][1] if s[1] == 2]
    for s in diverged:
        assert s[5].reason == MatchReason.DIVERGED
        assert s[5].diverged_at is not None and s[5].cached_tokens <= s[5].diverged_at


def test_forks_continue_independently_and_equal_recompute(engines):
    eng, ref = engines[CacheMode.STATEFUL], engines[CacheMode.STATELESS]
    tok = eng.tokenizer
    eng.open_session("trunk")
    first = eng.add_request(tok.apply_chat([{"role": "user", "content": "Fork this plan."}]), GREEDY, session_id="trunk")
    eng.run_until_done([first])
    eng.sessions.fork("trunk", "branch", None)
    for sid, words in (("trunk", " go north"), ("branch", " go south, then east")):
        prompt = first.tokens + tok.encode(words)
        seq = eng.add_request(prompt, GREEDY, session_id=sid)
        eng.run_until_done([seq])
        # the fork starts at the trunk's state: everything but the last sampled token is cached already
        assert seq.explanation.reason == MatchReason.EXTENDED
        assert seq.stats.cached_tokens >= len(first.tokens) - 1
        assert seq.output_ids == ref.generate([prompt], GREEDY)[0]
    assert eng.get_session("trunk").tokens != eng.get_session("branch").tokens


def test_fork_at_a_turn_and_rollback_equal_recompute(engines):
    """Two forks from turn 1 continue independently; a rollback to turn 2 then a new turn: each equals a fresh
    recompute of its history, and each prefills only its new tokens (the shared state is reused, not copied)."""
    eng, ref = engines[CacheMode.STATEFUL], engines[CacheMode.STATELESS]
    tok = eng.tokenizer
    eng.open_session("rb")
    history, ends = tok.apply_chat([{"role": "user", "content": "List three steps to debug a crash."}]), []
    for words in (" first step", " second step", " third step"):
        seq = eng.add_request(history, GREEDY, session_id="rb")
        eng.run_until_done([seq])
        ends.append(len(seq.tokens) - 1)  # the state holds all but the last sampled token
        history = seq.tokens + tok.encode(words)
    assert [t.end for t in eng.sessions.info("rb", None).history] == ends
    at_turn = {k + 1: eng.get_session("rb").tokens[:e] for k, e in enumerate(ends)}
    for sid, words in (("fa", " try gdb"), ("fb", " read the core dump, then the logs")):
        eng.sessions.fork("rb", sid, None, turn=1)
        prompt = at_turn[1] + tok.encode(words)
        seq = eng.add_request(prompt, GREEDY, session_id=sid)
        eng.run_until_done([seq])
        assert (seq.explanation.reason, seq.stats.cached_tokens) == (MatchReason.EXTENDED, ends[0])
        assert seq.output_ids == ref.generate([prompt], GREEDY)[0]
    info = eng.sessions.rollback("rb", None, 2)
    assert (info.tokens, len(info.history)) == (ends[1], 2)
    prompt = at_turn[2] + tok.encode(" instead, bisect")
    seq = eng.add_request(prompt, GREEDY, session_id="rb")
    eng.run_until_done([seq])
    assert (seq.explanation.reason, seq.stats.prefilled_tokens) == (MatchReason.EXTENDED, len(prompt) - ends[1])
    assert seq.output_ids == ref.generate([prompt], GREEDY)[0]
    with pytest.raises(ValueError):
        eng.sessions.rollback("rb", None, 9)


def test_pool_full_of_pins_never_deadlocks(smollm_dir):
    """A pool that holds about half of them serves 6 pinned sessions: LRU pins are demoted, outputs stay exact."""
    small = load_engine(smollm_dir, cache_mode=CacheMode.STATEFUL, speculation=False,
                        kv_cache_bytes=46080 * 400)  # 400 token slots (SmolLM2 fp32: 46,080 bytes a token)
    ref = load_engine(smollm_dir, cache_mode=CacheMode.STATELESS, speculation=False)
    a, _ = run_conversations(small, turns=5, sessions=6, seed=9)
    b, _ = run_conversations(ref, turns=5, sessions=6, seed=9)
    assert a == b
    st = small.stats()
    assert st["demoted_sessions"] > 0 and st["evicted_tokens"] > 0
