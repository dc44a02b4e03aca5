"""`deltaserve bench roofline`: the floors' arithmetic on a tiny model (nothing is timed here)."""

from __future__ import annotations

import pytest
import torch

from deltaserve.config import ModelConfig
from deltaserve.kv.pool import KVLayout
from deltaserve.models.llama import LlamaModel
from deltaserve_bench.roofline_bench import Work


def test_work_counts_weights_kv_and_pairs():
    cfg = ModelConfig(arch="llama", vocab_size=100, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8, rope_theta=1e4, rms_norm_eps=1e-6, max_position=64,
                      tie_word_embeddings=True, qkv_bias=False)
    model = LlamaModel(cfg, torch.bfloat16)
    w = Work(model, KVLayout(2, 2, 8, torch.bfloat16).bytes_per_token)
    per_layer = (32 + 2 * 16) * 32 + 32 * 32 + 2 * 48 * 32 + 32 * 48  # qkv, o, gate_up, down
    assert w.layer_weights == 2 * per_layer and w.head_weights == 100 * 32
    assert w.kv_per_token == 2 * 2 * 2 * 8 * 2  # layers x (K, V) x kv heads x head_dim x bf16 bytes
    nbytes, flops = w.of(tokens=3, logit_rows=1, keys_read=10, pairs=20)
    assert nbytes == (2 * per_layer + 3200) * 2 + 10 * w.kv_per_token
    assert flops == 2 * 2 * per_layer * 3 + 2 * 3200 + 4 * 2 * 4 * 8 * 20
    # an int8 cache: 8 bytes + a 4-byte scale a row
    assert Work(model, KVLayout(2, 2, 8, torch.bfloat16, "int8").bytes_per_token).kv_per_token == 2 * 2 * 2 * 12


def test_compute_floor_uses_the_form_the_large_linears_take(monkeypatch):
    import deltaserve.layers.linear as L
    from deltaserve_bench.roofline_bench import matmul_dtype

    # without AVX-512 torch's bf16 matmul is a generic loop: a floor from it would be no floor at all
    monkeypatch.setattr(L, "_LARGE_FORM", "fp32")
    assert matmul_dtype() == torch.float32
    monkeypatch.setattr(L, "_LARGE_FORM", "bf16")
    assert matmul_dtype() == torch.bfloat16


def test_best_interleaved_takes_turns_and_keeps_each_ones_fastest(monkeypatch):
    import deltaserve_bench.roofline_bench as rb

    clock = [0.0]
    calls = []
    costs = {0: [9.0, 4.0, 6.0, 5.0], 1: [9.0, 3.0, 2.0, 7.0]}  # ms of each call: the warm-up, then three rounds

    def make(i):
        def f():
            clock[0] += costs[i][sum(1 for c in calls if c == i)] / 1e3
            calls.append(i)
        return f

    monkeypatch.setattr(rb.time, "perf_counter", lambda: clock[0])
    best = rb.best_interleaved([make(0), make(1)], reps=3)
    assert calls == [0, 1, 0, 1, 1, 0, 0, 1]  # warm-ups, then forward, backward, forward: drift costs each the same
    assert best == pytest.approx([4.0, 2.0])  # the warm-up (9 ms) never counts
