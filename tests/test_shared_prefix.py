"""--shared-prefix: declared prefixes are stored once and shared across tenants; nothing else crosses."""

from __future__ import annotations

import json

import pytest
import torch

from deltaserve.cache.shared_prefix import SHARED_NAMESPACE, SharedPrefixError, declared_prefix, load_shared_prefixes
from deltaserve.engine.kv_manager import CacheMode, KVManager
from deltaserve.engine.sampling import SamplingParams
from deltaserve.engine.sequence import Sequence
from deltaserve.kv.allocator import SlotAllocator
from deltaserve.kv.pool import KVLayout, KVPool

SYSTEM = tuple(range(100, 120))  # the declared prefix: 20 tokens


def _kv(slots: int = 128) -> KVManager:
    kv = KVManager(KVPool(KVLayout(1, 1, 4, torch.float32), slots), CacheMode.PREFIX)
    kv.shared_prefixes = [SYSTEM]
    return kv


def _run(kv: KVManager, prompt: list[int], namespace: str) -> Sequence:
    """Admit, compute (each token's K row = its id), finish."""
    seq = Sequence(prompt, SamplingParams(max_tokens=1))
    seq.cache_namespace = namespace
    assert kv.can_admit(seq, [], True)
    kv.admit(seq)
    cached = seq.num_computed
    assert kv.reserve(seq, len(prompt) - cached)
    kv.pool.write_rows(seq.slots[cached:], torch.tensor(prompt[cached:], dtype=torch.float32)
                       .view(1, 1, -1, 1, 1).expand(1, 2, -1, 1, 4).contiguous())
    seq.num_computed = len(prompt)
    kv.share_prompt(seq)
    kv.release(seq)
    kv.check_integrity([])
    return seq


def test_declared_prefix_is_stored_once_and_grafted_by_other_tenants():
    kv = _kv()
    a = _run(kv, list(SYSTEM) + [1, 2, 3], "tenant-a")
    assert a.stats.cached_tokens == 0
    shared = kv.radix.match_prefix(list(SYSTEM), SHARED_NAMESPACE)
    assert shared.num_matched == 20 and kv.allocator.num_shared == 20  # published: same slots, two holders
    used = kv.allocator.num_used
    b = _run(kv, list(SYSTEM) + [1, 2, 9], "tenant-b")
    assert b.stats.cached_tokens == 20  # the declared prefix only: tenant a's [1, 2] is never shared
    assert kv.allocator.num_used == used + 3  # b's own 3 tokens; the prefix was not stored again
    mb = kv.radix.match_prefix(list(SYSTEM), "tenant-b")
    assert mb.slots.tolist() == shared.slots.tolist()
    assert kv.pool.k_cache[0][mb.slots, 0, 0].tolist() == [float(t) for t in SYSTEM]
    c = _run(kv, [100, 101, 102, 7, 8], "tenant-c")  # starts like the prefix but is not it: nothing shared
    assert c.stats.cached_tokens == 0 and kv.grafted_tokens == 20


def test_shared_slots_return_with_their_last_holder():
    kv = _kv(slots=64)
    _run(kv, list(SYSTEM) + [1], "tenant-a")
    _run(kv, list(SYSTEM) + [2], "tenant-b")
    assert kv.allocator.num_shared == 20
    kv.radix.evict(64)
    assert kv.allocator.num_free == 64 and kv.allocator.num_shared == 0  # nothing leaked, nothing freed twice
    kv.check_integrity([])


def test_allocator_counts_holders():
    al = SlotAllocator(4)
    s = al.allocate(2)
    al.share(s[:1])
    al.check_integrity(torch.tensor([s[0], s[0], s[1]]))
    with pytest.raises(AssertionError):
        al.check_integrity(torch.tensor([s[0], s[1]]))  # one holder short of the count
    al.free(s[:1])
    assert al.num_free == 2  # a holder left; the slot stays
    al.free(s)
    assert al.num_free == 4


def test_load_and_match(tmp_path):
    class Tok:
        def encode(self, text):
            return [ord(c) for c in text]

        def apply_chat(self, messages, tools=None, add_generation_prompt=True):
            return self.encode("".join(m["content"] for m in messages) + ("|t" if tools else ""))

    f = tmp_path / "shared.json"
    f.write_text(json.dumps([{"messages": [{"role": "system", "content": "abc"}], "tools": [{}]},
                             {"text": "ab"}, {"tokens": [1, 2, 3]}]))
    got = load_shared_prefixes(f, Tok())
    assert got[0] == tuple(map(ord, "abc|t")) and len(got) == 3
    assert declared_prefix(got, list(map(ord, "abc|t!"))) == 5 and declared_prefix(got, list(map(ord, "ab"))) == 0
    for bad in ("{}", "[]", "[1]", '[{"x": 1}]', '[{"tokens": [-1, 2]}]', "not json"):
        f.write_text(bad)
        with pytest.raises(SharedPrefixError):
            load_shared_prefixes(f, Tok())
