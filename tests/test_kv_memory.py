"""KV bytes per cached token, measured: pool tensors plus the radix tree's own bookkeeping."""

from __future__ import annotations

import random
import tracemalloc

import torch

from deltaserve.cache.radix import RadixCache
from deltaserve.kv.pool import KVLayout, KVPool


def test_bytes_per_cached_token_within_10_percent():
    # SmolLM2-135M's layout in bf16: 30 layers × 2 × 3 kv heads × 64 × 2 bytes = 23,040 bytes a token.
    layout = KVLayout(num_layers=30, num_kv_heads=3, head_dim=64, dtype=torch.bfloat16)
    theory = 30 * 2 * 3 * 64 * 2
    num_slots = 20_000
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    pool = KVPool(layout, num_slots)
    radix = RadixCache(pool.allocator)
    rng = random.Random(0)
    shared = [rng.randrange(50_000) for _ in range(2_000)]  # a system prompt + tools shared by all agents
    cached = len(shared)
    radix.insert(shared, pool.allocator.allocate(len(shared)))
    while pool.allocator.num_free > 1_000:  # 16 agents' private histories branching off the shared prefix
        tail = [rng.randrange(50_000) for _ in range(1_000)]
        m = radix.match_prefix(shared)
        radix.insert(shared + tail, torch.cat([m.slots, pool.allocator.allocate(len(tail))]))
        cached += len(tail)
    radix.check_integrity()
    python_bytes = tracemalloc.get_traced_memory()[0] - before  # radix nodes, keys, slot tensors' headers
    tracemalloc.stop()
    assert radix.total_size == cached
    per_token = (pool.nbytes / num_slots) + python_bytes / cached
    # tensor storage is allocated outside tracemalloc's view, so count it from the pool itself
    assert pool.nbytes / num_slots == theory
    print(f"KV bytes per cached token: {per_token:.0f} (theory {theory}; python bookkeeping {python_bytes / cached:.1f})")
    assert per_token <= 1.10 * theory, f"{per_token:.0f} bytes per cached token vs {theory} theoretical"
