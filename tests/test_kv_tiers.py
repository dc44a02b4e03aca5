"""The host-memory KV tier: evicted KV is copied out and restored by copy, exactly (then on real weights)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from conftest import load_engine
from deltaserve.cache.host_tier import HostTier
from deltaserve.cache.session import MatchReason
from deltaserve.engine.kv_manager import CacheMode, KVManager
from deltaserve.engine.sequence import Sequence
from deltaserve.engine.sampling import SamplingParams
from deltaserve.kv.pool import KVLayout, KVPool


def rows(n: int, fill: float = 0.0, layers: int = 2) -> torch.Tensor:
    return torch.full((layers, 2, n, 1, 4), fill)  # [L, 2, n, H, D]


def test_tier_keys_by_exact_prefix_and_bounds_bytes_lru():
    one = rows(1).numel() * 4  # bytes of one token's rows
    t = HostTier(budget_bytes=5 * one)
    assert t.put("", [1, 2], [3, 4], rows(2, 1.0)) and t.put("", [9], [3], rows(1, 2.0))
    assert t.find("", [1, 2, 5], 2) is None  # same prefix, other next token
    assert t.find("b", [1, 2, 3], 2) is None  # other namespace
    assert t.find("", [7, 2, 3], 2) is None  # other prefix
    hit = t.find("", [1, 2, 3, 9], 2)
    assert hit.num_tokens == 1 and hit.entry.run == (3, 4)
    t.put("", [5], [6, 6, 6], rows(3))  # 6 tokens > 5: the LRU entry goes ([9] → [3]; [1,2] was just found)
    assert t.find("", [9, 3], 1) is None and t.find("", [1, 2, 3], 2) is not None
    assert (t.nbytes, t.dropped_tokens, t.offloaded_tokens) == (5 * one, 1, 6)
    assert not t.put("", [], [1] * 6, rows(6))  # larger than the whole budget: refused
    got = t.take(t.find("", [1, 2, 3, 4], 2))
    assert got.shape == (2, 2, 2, 1, 4) and float(got.mean()) == 1.0 and t.restored_tokens == 2
    assert t.put("", [0], [1], rows(1), staged=True) and t.nbytes == 3 * one  # staged: outside the budget
    t.check_integrity()


def _manager(slots: int, offload_tokens: int, mode: CacheMode = CacheMode.PREFIX) -> KVManager:
    pool = KVPool(KVLayout(2, 1, 4, torch.float32), slots)
    return KVManager(pool, mode, offload_bytes=offload_tokens * pool.layout.bytes_per_token)


def _run(kv: KVManager, prompt: list[int], gen: list[int], session_id: str | None = None) -> Sequence:
    """Admit, "compute" (write each token's id into its K/V rows), finish: the KV records which token made it."""
    seq = Sequence(prompt, SamplingParams(max_tokens=len(gen) + 1), session_id)
    assert kv.can_admit(seq, [], True)
    kv.admit(seq)
    assert kv.reserve(seq, len(prompt) - seq.num_computed)
    new = seq.slots[seq.num_computed :]
    kv.pool.write_rows(new, torch.tensor(prompt[seq.num_computed :], dtype=torch.float32)
                       .view(1, 1, -1, 1, 1).expand(2, 2, -1, 1, 4).contiguous())
    seq.num_computed = len(prompt)
    seq.tokens += gen[:-1]  # the last generated token is never computed
    if gen[:-1]:
        assert kv.reserve(seq, len(gen) - 1)
        kv.pool.write_rows(seq.slots[seq.num_computed :], torch.tensor(gen[:-1], dtype=torch.float32)
                           .view(1, 1, -1, 1, 1).expand(2, 2, -1, 1, 4).contiguous())
        seq.num_computed += len(gen) - 1
    kv.release(seq)
    kv.check_integrity([])
    return seq


def _kv_spells(kv: KVManager, tokens: list[int]) -> bool:
    m = kv.radix.match_prefix(tokens)
    k = kv.pool.k_cache[0][m.slots, 0, 0]
    return m.num_matched == len(tokens) and k.tolist() == [float(t) for t in tokens]


def test_evicted_chain_comes_back_by_copy_exactly():
    kv = _manager(slots=64, offload_tokens=64)
    a = _run(kv, list(range(100, 120)), [1])  # 20 tokens cached
    b = _run(kv, list(range(100, 110)) + list(range(200, 215)), [2])  # shares 10, adds 15: 35 slots used
    c = _run(kv, list(range(300, 340)), [3])  # 40 more: a's tail, then b's, are evicted into the tier (LRU)
    assert kv.host_tier.offloaded_tokens == 25 and not _kv_spells(kv, a.tokens[:20])
    again = Sequence(a.tokens[:20] + [7], SamplingParams())
    assert kv.can_admit(again, [], True)
    kv.admit(again)
    assert (again.stats.cached_tokens, again.stats.restored_tokens) == (20, 10)  # 10 still in the pool, 10 back
    assert (again.explanation.reason, again.explanation.restored_tokens) == (MatchReason.RESTORED, 10)
    assert _kv_spells(kv, a.tokens[:20])  # every restored row holds its own token's K/V
    kv.preempt(again)
    kv.check_integrity([])
    del b, c


def test_no_tier_means_evicted_kv_is_recomputed():
    kv = _manager(slots=64, offload_tokens=0)
    assert kv.host_tier is None and kv.radix.on_evict is None
    a = _run(kv, list(range(100, 120)), [1])
    _run(kv, list(range(300, 345)), [3])
    again = Sequence(a.tokens[:20] + [7], SamplingParams())
    assert kv.can_admit(again, [], True)
    kv.admit(again)
    assert again.stats.cached_tokens == 0


# ------------------------------------------------------------------ real weights
@pytest.fixture(scope="module")
def ref(smollm_dir):
    return load_engine(smollm_dir, cache_mode=CacheMode.STATELESS, speculation=False)


def test_offload_tier_under_pressure_equals_recompute(smollm_dir, ref):
    """A pool for about half of 6 sessions: with the tier, evicted turns come back by copy (exact outputs, fewer
    prefilled tokens than without it)."""
    from test_engine_sessions import run_conversations

    budget = 46080 * 400  # 400 token slots (SmolLM2 fp32: 46,080 bytes a token)
    runs = {}
    for offload in (0, 64 << 20):
        eng = load_engine(smollm_dir, cache_mode=CacheMode.STATEFUL, speculation=False, kv_cache_bytes=budget,
                          kv_offload_bytes=offload)
        runs[offload] = (run_conversations(eng, turns=5, sessions=6, seed=9), eng.stats())
    expected, _ = run_conversations(ref, turns=5, sessions=6, seed=9)
    (plain, _), (tiered, tier_stats) = runs[0], runs[64 << 20]
    assert plain[0] == expected and tiered[0] == expected
    prefilled = {k: sum(s[4] for s in r[0][1]) for k, r in runs.items()}
    assert tier_stats["restored_tokens"] > 0 and prefilled[64 << 20] < prefilled[0]
    restored = [s[5] for s in tiered[1] if s[5].restored_tokens]
    assert restored and all(e.reason in (MatchReason.RESTORED, MatchReason.DIVERGED) for e in restored)
    assert "restored from host memory" in restored[0].detail


# ------------------------------------------------------------------ stateful check
SIDS = st.sampled_from(["a", "b", "c"])
NEW = st.lists(st.integers(1, 6), min_size=1, max_size=5)


class TierMachine(RuleBasedStateMachine):
    """Random turns / evictions (into the tier) / demotions / forks / rollbacks / closes over a 48-slot pool and a
    40-token tier. After every step: pool + tier + radix integrity, and every cached token's K/V row is the one its
    own token wrote (so a restore never puts rows in the wrong slots or under the wrong prefix)."""

    @initialize()
    def setup(self):
        self.kv = _manager(slots=48, offload_tokens=40, mode=CacheMode.STATEFUL)

    @rule(sid=SIDS, new=NEW, gen=NEW, fresh=st.booleans())
    def turn(self, sid, new, gen, fresh):
        s = self.kv.sessions.get(sid) or self.kv.sessions.open(sid)
        prompt = new if fresh or len(s.tokens) + len(new) + len(gen) > 24 else s.tokens + new
        before = self.kv.host_tier.restored_tokens
        seq = _run(self.kv, prompt, gen, sid)
        assert seq.stats.restored_tokens == self.kv.host_tier.restored_tokens - before
        event(f"turn restored {'some' if seq.stats.restored_tokens else 'nothing'}")
        assert s.tokens == prompt + gen[:-1]  # pinned, or left unpinned by the pin budget

    @rule(k=st.integers(1, 48))
    def evict(self, k):
        self.kv.radix.evict(k)

    @rule()
    def demote(self):
        self.kv.sessions.demote_lru(48)

    @rule(sid=SIDS, new=SIDS, turn=st.integers(1, 3))
    def fork(self, sid, new, turn):
        src = self.kv.sessions.get(sid)
        if src is not None and new not in self.kv.sessions and turn <= len(src.history):
            self.kv.sessions.fork(src, new, turn=turn)

    @rule(sid=SIDS, turn=st.integers(1, 3))
    def rollback(self, sid, turn):
        s = self.kv.sessions.get(sid)
        if s is not None and turn <= len(s.history):
            self.kv.sessions.rollback(s, turn)

    @rule(sid=SIDS)
    def close(self, sid):
        if sid in self.kv.sessions:
            self.kv.sessions.close(sid)

    @invariant()
    def consistent(self):
        self.kv.check_integrity([])
        k0 = self.kv.pool.k_cache[0]
        for node in self.kv.radix._iter_nodes():
            if node.key:
                assert k0[node.value, 0, 0].tolist() == [float(t) for t in node.key], "a slot holds another token's KV"
        tier = self.kv.host_tier
        for e in list(tier._entries.values()) + list(tier._staged.values()):
            assert e.rows[0, 0, :, 0, 0].tolist() == [float(t) for t in e.run]


TierMachine.TestCase.settings = settings(max_examples=80, stateful_step_count=40, deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow])
TestTierMachine = TierMachine.TestCase
