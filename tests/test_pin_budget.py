"""KVManager's pin budget on a tiny pool: exact pins, evictions and hits when sessions take turns in a cycle."""

from __future__ import annotations

import torch

from deltaserve.engine.kv_manager import CacheMode, KVManager
from deltaserve.engine.sampling import SamplingParams
from deltaserve.engine.sequence import Sequence
from deltaserve.kv.pool import KVLayout, KVPool


def _pool(slots: int) -> KVPool:
    return KVPool(KVLayout(1, 1, 2, torch.float32), slots)


def _turn(kv: KVManager, sid: str, tokens: list[int], running: bool = False) -> Sequence:
    """Admit, 'compute' the whole prompt, finish: what the engine does for a 0-token turn."""
    if sid not in kv.sessions:
        kv.sessions.open(sid)
    seq = Sequence(tokens, SamplingParams(max_tokens=1), session_id=sid)
    assert kv.can_admit(seq, [], demote_pins=not running)
    kv.admit(seq)
    assert kv.reserve(seq, len(tokens) - seq.num_computed)
    seq.num_computed = len(tokens)
    kv.release(seq)
    kv.check_integrity([])
    return seq


def _cycle(mode: CacheMode, fraction: float) -> tuple[KVManager, list[int]]:
    # 4 sessions taking turns in a cycle in a 128-slot pool; each turn adds 5 tokens to a 20-token start,
    # and each admission needs its uncached tokens + 16 headroom, so all four never fit together
    kv = KVManager(_pool(128), mode, max_pinned_fraction=fraction)
    hits = []
    hist = {f"s{i}": [100 * i + t for t in range(20)] for i in range(4)}
    for r in range(4):
        for sid, toks in hist.items():
            toks += [1000 * int(sid[1:]) + 20 + 5 * r + t for t in range(5)]
            hits.append(_turn(kv, sid, toks).stats.cached_tokens)
    return kv, hits


def test_pin_budget_keeps_sessions_that_lru_evicts():
    lru, lru_hits = _cycle(CacheMode.PREFIX, 0.5)
    pinned, pin_hits = _cycle(CacheMode.STATEFUL, 0.5)
    # rounds 2-3 fit in the pool either way; in round 4 LRU has evicted each session before it comes back
    assert lru_hits == [0, 0, 0, 0, 25, 25, 25, 25, 30, 30, 25, 0, 0, 0, 0, 0]
    # with a 64-slot pin budget: s0+s1 are pinned until they outgrow it (round 4: s0 35 + s1 30 > 64,
    # so s0 is left unpinned); s1 stays pinned and still hits all 35 tokens of its last turn
    assert pin_hits == [0, 0, 0, 0, 25, 25, 25, 25, 30, 30, 25, 0, 0, 35, 0, 0]
    assert [pinned.sessions.get(f"s{i}").pinned for i in range(4)] == [False, True, False, False]
    assert pinned.unpinned_over_budget == 10 and pinned.demoted_sessions == 0
    assert pinned.radix.protected_size <= pinned.pin_budget


def test_admission_waits_instead_of_demoting_while_others_run():
    kv = KVManager(_pool(64), CacheMode.STATEFUL, max_pinned_fraction=1.0)
    _turn(kv, "a", list(range(30)))
    assert kv.sessions.get("a").pinned
    kv.sessions.open("b")
    seq = Sequence(list(range(1000, 1020)), SamplingParams(max_tokens=1), session_id="b")
    assert not kv.can_admit(seq, [], demote_pins=False)  # others run: would need a's pinned slots, so it waits
    assert kv.sessions.get("a").pinned and kv.demoted_sessions == 0
    assert kv.can_admit(seq, [], demote_pins=True)  # nothing runs: the pin goes (never a deadlock)
    kv.admit(seq)
    assert not kv.sessions.get("a").pinned and kv.demoted_sessions == 1
