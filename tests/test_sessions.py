"""Sessions: pins with TTL, LRU demotion, miss explanations; then a stateful check with a fake clock."""

from __future__ import annotations

from typing import Sequence

import pytest
import torch
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from deltaserve.cache.radix import RadixCache
from deltaserve.cache.session import MatchExplanation, MatchReason, Session, SessionManager, explain_match
from deltaserve.kv.allocator import SlotAllocator


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Env:
    """A pool, a radix cache and a session manager sharing one fake clock."""

    def __init__(self, num_slots: int = 16, ttl: float = 10.0, pin: bool = True):
        self.clock = FakeClock()
        self.alloc = SlotAllocator(num_slots)
        self.radix = RadixCache(self.alloc, clock=self.clock)
        self.mgr = SessionManager(self.radix, default_ttl=ttl, clock=self.clock, pin=pin)

    def turn(self, session: Session | None, prompt: Sequence[int], gen: Sequence[int] = ()) -> MatchExplanation:
        """One engine turn, following the protocol in session.py's docstring."""
        radix, alloc = self.radix, self.alloc
        was_pinned = session.pinned if session is not None else False
        m = radix.match_prefix(prompt)
        radix.lock(m.node)
        why = explain_match(session, prompt, m.num_matched, was_pinned)
        full = list(prompt) + list(gen)
        need = len(full) - m.num_matched
        if need > alloc.num_free:
            radix.evict(need - alloc.num_free)
        if need > alloc.num_free:
            self.mgr.demote_lru(need - alloc.num_free)
            radix.evict(need - alloc.num_free)
        own = alloc.allocate(need)  # OutOfSlots here would be a deadlock
        r = radix.insert_with_node(full, torch.cat([m.slots, own]))
        if session is not None:
            self.mgr.repin(session, r.node, full)
            self.mgr.record_turn(session, why)
        radix.unlock(m.node)
        return why


def cached_len(radix: RadixCache, tokens: Sequence[int]) -> int:
    """Longest cached prefix of `tokens`, without touching LRU times or splitting."""
    node, i = radix.root, 0
    while i < len(tokens) and (child := node.children.get(tokens[i])) is not None:
        k = 0
        while k < len(child.key) and i + k < len(tokens) and child.key[k] == tokens[i + k]:
            k += 1
        i += k
        if k < len(child.key):
            break
        node = child
    return i


# ---------------------------------------------------------------------- registry


def test_open_get_close_registry():
    env = Env()
    a = env.mgr.open("a", owner="alice")
    b = env.mgr.open("b", ttl=3.0)
    with pytest.raises(KeyError):
        env.mgr.open("a")
    assert env.mgr.get("a") is a and env.mgr.get("zz") is None
    assert "b" in env.mgr and "zz" not in env.mgr and len(env.mgr) == 2
    assert [s.session_id for s in env.mgr.list()] == ["a", "b"]
    assert (a.owner, a.ttl, b.ttl, a.pinned, a.tokens, a.node) == ("alice", 10.0, 3.0, False, [], None)
    env.mgr.close("a")
    assert "a" not in env.mgr and len(env.mgr) == 1
    with pytest.raises(KeyError):
        env.mgr.close("a")


def test_pinned_session_survives_eviction_and_next_turn_extends():
    env = Env(16)
    s = env.mgr.open("s")
    why = env.turn(s, [1, 2, 3], gen=[4])
    assert (why.reason, why.cached_tokens, why.prefilled_tokens) == (MatchReason.NEW_SESSION, 0, 3)
    assert s.pinned and s.tokens == [1, 2, 3, 4] and env.mgr.num_pinned == 1
    env.turn(None, [7, 7, 7])  # stateless traffic: plain evictable cache
    assert (env.radix.protected_size, env.radix.evictable_size) == (4, 3)
    assert env.radix.evict(100) == 3
    why = env.turn(s, [1, 2, 3, 4, 5], gen=[6])
    assert (why.reason, why.cached_tokens, why.prefilled_tokens, why.session_tokens) == (MatchReason.EXTENDED, 4, 1, 4)
    assert (s.turns, s.prompt_tokens, s.cached_tokens, s.prefilled_tokens) == (2, 8, 4, 4)
    assert s.last_match == why
    env.radix.check_integrity()


def test_fork_shares_the_pinned_path_and_diverges_independently():
    env = Env(16)
    s = env.mgr.open("s", owner="o")
    env.turn(s, [1, 2, 3], gen=[4])
    s.last_turn = "turn-1"  # opaque to the manager
    f = env.mgr.fork(s, "f", owner="o")
    assert (f.tokens, f.node, f.pinned, f.last_turn, f.turns) == ([1, 2, 3, 4], s.node, True, "turn-1", 0)
    assert s.node.own_locks == 2 and env.radix.protected_size == 4  # one path, two pins, counted once
    with pytest.raises(KeyError):
        env.mgr.fork(s, "f")
    a = env.turn(s, [1, 2, 3, 4, 5], gen=[6])
    b = env.turn(f, [1, 2, 3, 4, 9], gen=[9])
    assert (a.reason, a.cached_tokens) == (b.reason, b.cached_tokens) == (MatchReason.EXTENDED, 4)
    assert s.tokens == [1, 2, 3, 4, 5, 6] and f.tokens == [1, 2, 3, 4, 9, 9]
    assert env.radix.protected_size == 8  # the shared 4 + two private tails of 2
    env.mgr.close("s")
    env.mgr.close("f")
    assert env.radix.protected_size == 0
    env.radix.check_integrity()
    g = env.mgr.fork(env.mgr.open("u"), "g")  # an empty (unpinned) session forks into an empty one
    assert (g.tokens, g.pinned, g.node) == ([], False, None)


def test_repin_locks_new_before_unlocking_old():
    env = Env(16)
    s = env.mgr.open("s")
    env.turn(s, [1, 2, 3])
    old = s.node
    calls = []
    lock, unlock = env.radix.lock, env.radix.unlock

    def spy_lock(node):
        calls.append(("lock", node, old.ref))
        lock(node)

    def spy_unlock(node):
        calls.append(("unlock", node, old.ref))
        unlock(node)

    env.radix.lock, env.radix.unlock = spy_lock, spy_unlock
    r = env.radix.insert_with_node([1, 2, 3, 4], torch.cat([env.radix.match_prefix([1, 2, 3]).slots, env.alloc.allocate(1)]))
    env.mgr.repin(s, r.node, [1, 2, 3, 4])
    assert [c[:2] for c in calls] == [("lock", r.node), ("unlock", old)]
    assert calls[1][2] == 2  # the shared prefix held both pins at the moment of the unlock
    assert (old.ref, r.node.ref, s.node is r.node) == (1, 1, True)
    env.radix.check_integrity()


def test_repin_rejects_node_not_spelling_tokens():
    env = Env(16)
    s = env.mgr.open("s")
    env.turn(s, [1, 2, 3])
    with pytest.raises(ValueError):
        env.mgr.repin(s, s.node, [1, 2, 9])
    assert s.tokens == [1, 2, 3] and s.node.own_locks == 1


def test_ttl_expiry_with_fake_clock_unpins_without_freeing():
    env = Env(16, ttl=5.0)
    s = env.mgr.open("s")
    env.turn(s, [1, 2, 3, 4])
    assert s.pin_expires_at == 5.0
    env.clock.now = 4.9
    assert env.mgr.expire() == []
    env.clock.now = 5.0
    owned, free = sorted(env.radix.owned_slots().tolist()), env.alloc.num_free
    assert env.mgr.expire() == ["s"]
    assert not s.pinned and s.unpin_reason is MatchReason.EXPIRED and "s" in env.mgr
    assert sorted(env.radix.owned_slots().tolist()) == owned and env.alloc.num_free == free  # nothing freed
    assert (env.radix.evictable_size, env.radix.protected_size) == (4, 0)
    assert env.mgr.expire() == []  # once only
    # a late turn still hits while memory allows, and re-pins
    why = env.turn(s, [1, 2, 3, 4, 5])
    assert (why.reason, why.cached_tokens) == (MatchReason.EXTENDED, 4)
    assert s.pinned and s.unpin_reason is None and s.pin_expires_at == 10.0
    # expire again, lose it to eviction: the miss is explained as EXPIRED
    env.clock.now = 10.0
    env.mgr.expire()
    env.radix.evict(100)
    why = env.turn(s, [1, 2, 3, 4, 5, 6])
    assert (why.reason, why.cached_tokens, why.prefilled_tokens) == (MatchReason.EXPIRED, 0, 6)
    env.radix.check_integrity()


def test_demote_lru_when_pool_is_full_of_pins():
    env = Env(8)
    sessions = [env.mgr.open(f"s{i}") for i in range(4)]
    for i, s in enumerate(sessions):
        env.clock.now = float(i)
        env.turn(s, [10 * i, 10 * i + 1])
    env.clock.now = 10.0
    env.turn(sessions[0], [0, 1])  # s0 becomes the most recently used (same path, no new slots)
    assert (env.alloc.num_free, env.radix.evictable_size, env.mgr.num_pinned) == (0, 0, 4)
    assert env.mgr.demote_lru(0) == []
    assert env.mgr.demote_lru(3) == ["s1", "s2"]  # oldest first, until 4 >= 3 evictable
    assert [s.pinned for s in sessions] == [True, False, False, True]
    assert sessions[1].unpin_reason is MatchReason.DEMOTED
    assert env.alloc.num_free == 0  # demotion frees nothing by itself
    # the engine's path: re-pin s1 (now most recent), then a request needing 3 slots
    # evicts unpinned s2 (2 slots), is still short, demotes s3 (LRU pin) and evicts it
    env.mgr.repin(sessions[1], env.radix.match_prefix([10, 11]).node, [10, 11])
    why = env.turn(None, [5, 6, 7])
    assert why.cached_tokens == 0 and [s.pinned for s in sessions] == [True, True, False, False]
    assert [cached_len(env.radix, [10 * i, 10 * i + 1]) for i in range(4)] == [2, 2, 0, 0]
    why = env.turn(sessions[3], [30, 31, 32])
    assert (why.reason, why.cached_tokens, why.prefilled_tokens) == (MatchReason.DEMOTED, 0, 3)
    env.radix.check_integrity()


def test_demote_lru_runs_out_of_pins_without_hanging():
    env = Env(8)
    for i in range(2):
        env.turn(env.mgr.open(f"s{i}"), [i, i])
    assert env.mgr.demote_lru(100) == ["s0", "s1"] and env.mgr.num_pinned == 0
    assert env.radix.evictable_size == 4


def test_shared_prefix_pins_and_close():
    env = Env(16)
    a, b = env.mgr.open("a"), env.mgr.open("b")
    env.turn(a, [1, 2, 3, 4])
    env.turn(b, [1, 2, 3, 9])  # shares [1,2,3]
    shared = env.radix.match_prefix([1, 2, 3]).node
    assert shared.ref == 2 and env.radix.protected_size == 5
    env.mgr.close("a")
    assert shared.ref == 1 and env.radix.evict(100) == 1  # only a's own tail goes
    assert cached_len(env.radix, [1, 2, 3, 9]) == 4 and env.alloc.num_free == 12
    env.radix.check_integrity()


def test_prefix_mode_never_pins():
    env = Env(16, pin=False)
    s = env.mgr.open("s")
    env.turn(s, [1, 2, 3], gen=[4])
    assert (s.pinned, env.mgr.num_pinned, env.radix.protected_size, s.tokens) == (False, 0, 0, [1, 2, 3, 4])
    why = env.turn(s, [1, 2, 3, 4, 5])
    assert (why.reason, why.cached_tokens) == (MatchReason.EXTENDED, 4)
    env.radix.evict(100)
    why = env.turn(s, [1, 2, 3, 4, 5, 6])
    assert (why.reason, why.cached_tokens) == (MatchReason.EVICTED, 0)
    assert env.mgr.expire() == [] and env.mgr.demote_lru(100) == []
    env.radix.check_integrity()


def test_forget_idle_keeps_pinned_sessions():
    env = Env(16, ttl=5.0)
    a, _ = env.mgr.open("a"), env.mgr.open("b")
    env.turn(a, [1])
    env.clock.now = 3.0
    assert env.mgr.forget_idle(2.0) == ["b"]
    env.clock.now = 100.0
    assert env.mgr.forget_idle(2.0) == []  # a still pinned until expire()
    env.mgr.expire()
    assert env.mgr.forget_idle(2.0) == ["a"] and len(env.mgr) == 0


# ---------------------------------------------------------------------- explanations


def _session(tokens, unpin_reason=None) -> Session:
    return Session("s", None, 10.0, created_at=0.0, last_used=0.0, tokens=list(tokens), unpin_reason=unpin_reason)


def test_explain_no_session_and_new_session():
    e = explain_match(None, [1, 2, 3, 4], 3, False)
    assert e == (MatchReason.NO_SESSION, 4, 3, 1, None, 0, e.detail, 0) and "3/4" in e.detail
    e = explain_match(_session([]), [1, 2], 0, False)
    assert (e.reason, e.prefilled_tokens, e.session_tokens) == (MatchReason.NEW_SESSION, 2, 0)


def test_explain_diverged_and_truncated():
    e = explain_match(_session([1, 2, 3, 4]), [1, 2, 9, 4, 5], 2, True)
    assert (e.reason, e.diverged_at, e.cached_tokens, e.prefilled_tokens) == (MatchReason.DIVERGED, 2, 2, 3)
    assert "token index 2" in e.detail
    e = explain_match(_session([1, 2, 3, 4]), [1, 2], 2, True)
    assert (e.reason, e.diverged_at) == (MatchReason.DIVERGED, 2) and "truncat" in e.detail


def test_explain_extended_evicted_expired_demoted():
    prompt = [1, 2, 3, 4, 5]
    e = explain_match(_session([1, 2, 3]), prompt, 3, True)
    assert (e.reason, e.cached_tokens, e.prefilled_tokens, e.session_tokens) == (MatchReason.EXTENDED, 3, 2, 3)
    e = explain_match(_session([1, 2, 3]), prompt, 4, True)  # cache knew more than the session
    assert e.reason is MatchReason.EXTENDED
    assert explain_match(_session([1, 2, 3]), prompt, 1, False).reason is MatchReason.EVICTED
    e = explain_match(_session([1, 2, 3], MatchReason.EXPIRED), prompt, 1, False)
    assert e.reason is MatchReason.EXPIRED and "2 of the session's 3" in e.detail
    assert explain_match(_session([1, 2, 3], MatchReason.DEMOTED), prompt, 0, False).reason is MatchReason.DEMOTED


# ---------------------------------------------------------------------- stateful check

POOL, MAX_CTX, TTL = 24, 12, 10.0
SIDS = st.sampled_from(["s0", "s1", "s2", "s3"])
NEW = st.lists(st.integers(0, 3), min_size=1, max_size=4)


class SessionMachine(RuleBasedStateMachine):
    """Random open / turn / clock / expire / demote / close / fork at a turn / rollback over a small pool.

    Invariants: a pinned session's tokens are fully cached and its node holds
    its lock; the tree holds exactly one lock per pinned session between turns;
    expiry frees nothing; a turn never runs out of slots (demotion always makes
    room, because every turn's context fits in the pool).
    """

    PIN = True

    @initialize()
    def setup(self):
        self.env = Env(POOL, ttl=TTL, pin=self.PIN)
        self.mgr = self.env.mgr

    @rule(sid=SIDS)
    def open(self, sid):
        if sid in self.mgr:
            with pytest.raises(KeyError):
                self.mgr.open(sid)
        else:
            self.mgr.open(sid)

    @rule(sid=SIDS, mode=st.sampled_from(["extend", "extend", "extend", "diverge", "fresh", "stateless"]), new=NEW, gen=NEW, cut=st.integers(0, MAX_CTX))
    def turn(self, sid, mode, new, gen, cut):
        self.expire()  # the engine's scheduler loop expires pins before admitting work
        s = self.mgr.get(sid) or self.mgr.open(sid)  # a turn on an unknown id starts it
        if mode == "stateless":
            s, prompt = None, new
        elif mode == "extend":
            prompt = s.tokens + new
        elif mode == "diverge":
            prompt = s.tokens[: min(cut, len(s.tokens))] + new
        else:
            prompt = new
        if len(prompt) + len(gen) > MAX_CTX:
            prompt = new  # start the conversation over rather than outgrow the pool
        state = list(s.tokens) if s is not None else []
        pinned_before = s is not None and s.pinned
        why = self.env.turn(s, prompt, gen)
        event(f"turn: {why.reason.value}")  # --hypothesis-show-statistics shows the mix
        assert why.prefilled_tokens == why.prompt_tokens - why.cached_tokens == len(prompt) - why.cached_tokens
        if s is None:
            assert why.reason is MatchReason.NO_SESSION
            return
        if pinned_before and prompt[: len(state)] == state:
            assert (why.reason, why.cached_tokens >= len(state)) == (MatchReason.EXTENDED, True)
        assert s.tokens == prompt + gen and s.pinned == self.PIN

    @rule(dt=st.sampled_from([0.5, 3.0, TTL]))
    def tick(self, dt):
        self.env.clock.now += dt

    @rule()
    def expire(self):
        owned, free = sorted(self.env.radix.owned_slots().tolist()), self.env.alloc.num_free
        pinned = {s.session_id for s in self.mgr.list() if s.pinned}
        gone = self.mgr.expire()
        assert sorted(self.env.radix.owned_slots().tolist()) == owned and self.env.alloc.num_free == free
        assert set(gone) <= pinned
        now = self.env.clock.now
        for s in self.mgr.list():
            assert s.session_id in self.mgr  # expired sessions stay known
            if s.session_id in gone:
                assert not s.pinned and s.unpin_reason is MatchReason.EXPIRED and s.pin_expires_at <= now
            elif s.pinned:
                assert s.pin_expires_at > now

    @rule(need=st.integers(0, POOL))
    def demote(self, need):
        before = sorted((s for s in self.mgr.list() if s.pinned), key=lambda s: (s.last_used, s.seq))
        enough = self.env.radix.evictable_size >= need
        gone = self.mgr.demote_lru(need)
        event(f"demoted {min(len(gone), 2)}+")
        assert gone == [s.session_id for s in before[: len(gone)]]  # LRU order
        assert self.env.radix.evictable_size >= need or self.mgr.num_pinned == 0  # progress, never stuck
        if enough:
            assert gone == []

    @rule(sid=SIDS)
    def close(self, sid):
        if sid not in self.mgr:
            with pytest.raises(KeyError):
                self.mgr.close(sid)
            return
        free = self.env.alloc.num_free
        self.mgr.close(sid)
        assert sid not in self.mgr and self.env.alloc.num_free == free  # unpinned, not freed

    @rule(k=st.integers(1, POOL))
    def evict(self, k):
        self.env.radix.evict(k)

    @rule(sid=SIDS, new=SIDS, turn=st.integers(1, 4))
    def fork(self, sid, new, turn):
        src = self.mgr.get(sid)
        if src is None or new in self.mgr:
            return
        if turn > len(src.history):
            with pytest.raises(ValueError):
                self.mgr.fork(src, new, turn=turn)
            assert new not in self.mgr
            return
        f = self.mgr.fork(src, new, turn=turn)
        assert f.tokens == src.tokens[: src.history[turn - 1].end] and f.pinned == src.pinned
        assert [m.end for m in f.history] == [m.end for m in src.history[:turn]]

    @rule(sid=SIDS, turn=st.integers(1, 4))
    def rollback(self, sid, turn):
        s = self.mgr.get(sid)
        if s is None:
            return
        before, pinned = list(s.tokens), s.pinned
        if turn > len(s.history):
            with pytest.raises(ValueError):
                self.mgr.rollback(s, turn)
            assert s.tokens == before
            return
        free = self.env.alloc.num_free
        self.mgr.rollback(s, turn)
        assert s.tokens == before[: s.history[-1].end] and len(s.history) == turn and s.pinned == pinned
        assert self.env.alloc.num_free == free  # nothing freed, nothing recomputed

    @invariant()
    def consistent(self):
        radix = self.env.radix
        radix.check_integrity()  # free + cached == pool: nothing runs between turns
        locks = sum(n.own_locks for n in radix._iter_nodes())
        assert locks == self.mgr.num_pinned == sum(1 for s in self.mgr.list() if s.pinned)
        for s in self.mgr.list():
            ends = [m.end for m in s.history]
            assert ends == sorted(set(ends)) and (not ends or ends[-1] == len(s.tokens)), (ends, len(s.tokens))
            if s.pinned:
                assert cached_len(radix, s.tokens) == len(s.tokens), "pinned session lost tokens"
                assert s.node.own_locks >= 1 and not s.node.detached
        if not self.PIN:
            assert self.mgr.num_pinned == 0 and radix.protected_size == 0


class PrefixModeMachine(SessionMachine):
    PIN = False


_settings = settings(max_examples=200, stateful_step_count=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SessionMachine.TestCase.settings = _settings
PrefixModeMachine.TestCase.settings = settings(_settings, max_examples=60)
TestSessionMachine = SessionMachine.TestCase
TestPrefixModeMachine = PrefixModeMachine.TestCase


def test_owner_pin_quota_demotes_only_that_owners_lru_pins():
    env = Env(num_slots=64)
    a1, a2, a3 = (env.mgr.open(f"a{i}", owner="A") for i in (1, 2, 3))
    b1 = env.mgr.open("b1", owner="B")
    env.clock.now = 1.0
    env.turn(b1, [90, 91, 92, 93, 94, 95])  # B holds 6 pinned tokens, the oldest pin of all
    for t, (s, base) in enumerate(((a1, 10), (a2, 20), (a3, 30)), start=2):
        env.clock.now = float(t)
        env.turn(s, [base, base + 1, base + 2, base + 3])  # 4 tokens each: A holds 12
    assert env.mgr.enforce_owner_quota("A", 8) == ["a1"]  # A's least recently used, not B's older pin
    assert not a1.pinned and a1.unpin_reason == MatchReason.DEMOTED
    assert a2.pinned and a3.pinned and b1.pinned
    assert env.mgr.enforce_owner_quota("A", 8) == []  # 8 held: within the quota
    assert env.mgr.enforce_owner_quota("A", 3) == ["a2", "a3"]  # one session alone over it goes too
    assert b1.pinned
    env.radix.check_integrity()


def test_turn_history_marks_each_turn_and_drops_diverged_ones():
    env = Env(32)
    s = env.mgr.open("s")
    env.turn(s, [1, 2, 3], gen=[4])
    env.turn(s, [1, 2, 3, 4, 5], gen=[6])
    env.turn(s, [1, 2, 3, 4, 5, 6, 7], gen=[8])
    assert [m.end for m in s.history] == [4, 6, 8]
    env.turn(s, [1, 2, 3, 4, 9], gen=[9])  # edits history inside turn 2: turns 2 and 3 leave the state
    assert [m.end for m in s.history] == [4, 6]
    s.last_turn = "t2"
    assert s.history[-1].record == "t2" and s.turn_end(2) == 6
    with pytest.raises(ValueError):
        s.turn_end(3)


def test_rollback_moves_the_pin_and_leaves_later_turns_as_cache():
    env = Env(32)
    s = env.mgr.open("s")
    env.turn(s, [1, 2, 3], gen=[4])
    env.turn(s, [1, 2, 3, 4, 5, 6], gen=[7])
    s.history[0].record = "t1"
    assert env.radix.protected_size == 7
    with pytest.raises(ValueError):
        env.mgr.rollback(s, 3)
    assert s.tokens == [1, 2, 3, 4, 5, 6, 7] and env.radix.protected_size == 7  # refused: nothing changed
    env.mgr.rollback(s, 1)
    assert s.tokens == [1, 2, 3, 4] and s.pinned and s.last_turn == "t1" and [m.end for m in s.history] == [4]
    assert (env.radix.protected_size, env.radix.evictable_size) == (4, 3)  # turn 2's tokens: plain cache
    assert env.radix.evict(100) == 3
    env.radix.check_integrity()
    why = env.turn(s, [1, 2, 3, 4, 8], gen=[9])  # continuing after a rollback extends the truncated state
    assert (why.reason, why.cached_tokens) == (MatchReason.EXTENDED, 4)
    assert [m.end for m in s.history] == [4, 6]


def test_fork_at_a_turn_shares_that_prefix_only():
    env = Env(32)
    s = env.mgr.open("s")
    env.turn(s, [1, 2, 3], gen=[4])
    env.turn(s, [1, 2, 3, 4, 5, 6], gen=[7])
    f = env.mgr.fork(s, "f", turn=1)
    assert (f.tokens, f.pinned, [m.end for m in f.history]) == ([1, 2, 3, 4], True, [4])
    assert env.radix.path_slots(f.node).tolist() == env.radix.path_slots(s.node).tolist()[:4]  # no copy
    assert env.radix.protected_size == 7  # the fork's pin lies inside s's path
    with pytest.raises(ValueError):
        env.mgr.fork(s, "g", turn=0)
    assert "g" not in env.mgr
    a = env.turn(f, [1, 2, 3, 4, 9], gen=[9])
    assert (a.reason, a.cached_tokens) == (MatchReason.EXTENDED, 4)
    assert s.tokens == [1, 2, 3, 4, 5, 6, 7] and f.tokens == [1, 2, 3, 4, 9, 9]
    env.mgr.close("s")
    env.mgr.close("f")
    assert env.radix.protected_size == 0
    env.radix.check_integrity()


def test_rollback_and_fork_of_an_unpinned_state_keep_tokens_only():
    env = Env(32, pin=False)
    s = env.mgr.open("s")
    env.turn(s, [1, 2, 3], gen=[4])
    env.turn(s, [1, 2, 3, 4, 5], gen=[6])
    f = env.mgr.fork(s, "f", turn=1)
    assert (f.tokens, f.pinned, f.node) == ([1, 2, 3, 4], False, None)
    env.mgr.rollback(s, 1)
    assert (s.tokens, s.pinned, s.node) == ([1, 2, 3, 4], False, None)
    assert env.radix.protected_size == 0
    env.radix.check_integrity()
