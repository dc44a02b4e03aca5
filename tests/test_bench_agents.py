"""Smoke run of `deltaserve bench agents` against deltaserve's own stateful and stateless modes.

Peers (vLLM, llama.cpp) are never started here. Two agents, three turns,
4 generated tokens, small tool results; both servers are real subprocesses
driven over HTTP exactly as in the full benchmark.
"""

from __future__ import annotations

import json
from types import SimpleNamespace


def test_workload_is_seeded_and_bounded(smollm_dir):
    from deltaserve_bench.agents_workload import generate

    tok = str(smollm_dir / "tokenizer.json")
    a = generate(35, 3, seed=7, max_tokens=32, tokenizer_json=tok, context_limit=8192)
    b = generate(35, 3, seed=7, max_tokens=32, tokenizer_json=tok, context_limit=8192)
    c = generate(35, 3, seed=8, max_tokens=32, tokenizer_json=tok, context_limit=8192)
    assert [t.content for t in a.agents[0].turns] == [t.content for t in b.agents[0].turns]
    assert [t.content for t in a.agents[0].turns] != [t.content for t in c.agents[0].turns]
    roles = {}
    for ag in a.agents:  # agents of a role share its system prompt and tools
        assert roles.setdefault(ag.role, ag.system) == ag.system
        assert all(t["type"] == "function" for t in ag.tools)
        assert len(ag.turns) == 35 and all(0.05 <= t.latency_s <= 0.3 for t in ag.turns)
        total = sum(t.result_tokens + 32 + 24 for t in ag.turns)
        assert total < 8192 - 1200
    sizes = [t.result_tokens for ag in a.agents for t in ag.turns]
    assert min(sizes) >= 10 and max(sizes) <= 1500 and len(set(sizes)) > 10


def test_smoke_stateful_vs_stateless(tmp_path, smollm_dir):
    from deltaserve_bench import agents_bench

    args = SimpleNamespace(workflow=3, agents=2, model="smollm2-135m",
                           targets="deltaserve-stateful,deltaserve-stateless,no-such-peer",
                           out=str(tmp_path), max_tokens=4, ignore_eos=True, seed=1, kv_budget_tokens=None,
                           result_median=40.0, tools_per_role=1, threads=2, max_batch_tokens=2048,
                           max_prefill_with_decode=256, timeout=120.0, img_dir=str(tmp_path / "img"),
                           write=tmp_path / "sections", section="", no_progress=True, merge=False)
    assert agents_bench.run(args) == 0
    rep = json.loads((tmp_path / "report.json").read_text())
    assert (tmp_path / "report.md").exists() and (tmp_path / "latency.png").exists()
    assert "no-such-peer" in rep["skipped"]
    sf, sl = rep["targets"]["deltaserve-stateful"], rep["targets"]["deltaserve-stateless"]
    for r in (sf, sl):
        assert len(r["per_turn"]) == 3 and len(r["records"]) == 6
        for row in r["per_turn"]:
            assert row["latency_median"] > 0 and row["latency_p90"] >= row["latency_median"]
            assert 0 < row["ttft_median"] <= row["latency_median"]
            assert row["completion_tokens_median"] == 4  # ignore_eos: every turn generates max_tokens
        assert r["wall_s"] > 0 and r["prompt_tokens"] > 0
    # the same workload reaches both; identical prompt sizes at turn 1 (replies may differ afterwards)
    assert sf["per_turn"][0]["prompt_tokens_sum"] == sl["per_turn"][0]["prompt_tokens_sum"]
    assert sl["cached_tokens"] == 0
    assert sf["prefilled_tokens"] < sl["prefilled_tokens"]
    assert sf["per_turn"][-1]["cached_tokens_median"] > 0
    assert "extended" in sf["reasons"]
    sp = rep["speedup_of_stateful"]["deltaserve-stateless"]
    assert len(sp["per_turn"]) == 3 and sp["e2e_ratio"] > 0
    # the profile comes from the server's own counters, over the timed run only (warm-up excluded)
    for r in (sf, sl):
        p = r["profile"]
        busy = p["forward_prefill_s"] + p["forward_decode_s"] + p["schedule_s"] + p["sample_s"]
        assert p["forward_prefill_s"] > 0 and p["prefill_steps"] >= 1 and p["steps"] >= p["prefill_steps"]
        assert 0 < busy <= p["wall_s"] and p["render_s"] > 0
    # stateless recomputes every prompt: more time in prefill steps than stateful
    assert sl["profile"]["forward_prefill_s"] > sf["profile"]["forward_prefill_s"]
    assert "Where the time goes" in (tmp_path / "report.md").read_text()
    # --write: the section in DIR/KEY.md, its plots copied to --img-dir and linked relative to the section file
    section = tmp_path / "sections" / "agents-w3.md"
    links = [line[line.index("](") + 2:-1] for line in section.read_text().splitlines() if line.startswith("![")]
    assert links == ["../img/agents-w3-latency.png", "../img/agents-w3-prefill_decode.png"]
    assert all((section.parent / link).is_file() for link in links)


def test_vllm_targets_command_lines(smollm_dir):
    """The vLLM targets' command lines (nothing is started): bf16 by default, fp32 for vllm-fp32, whose KV budget
    (VLLM_CPU_KVCACHE_SPACE, whole GiB) is sized for fp32's 4 bytes an element; unknown names are refused."""
    from deltaserve_bench import agents_targets as tg

    budget = 60000  # SmolLM2 bf16 KV: 23,040 bytes a token -> 1.29 GiB in bf16, 2.57 GiB in fp32
    cmds = {n: tg.build(n, "smollm2-135m", 4, budget, 2) for n in ("vllm", "vllm-ngram", "vllm-fp32")}
    dtype = {n: t.cmd[t.cmd.index("--dtype") + 1] for n, t in cmds.items()}
    assert dtype == {"vllm": "bfloat16", "vllm-ngram": "bfloat16", "vllm-fp32": "float32"}
    assert [cmds[n].env["VLLM_CPU_KVCACHE_SPACE"] for n in ("vllm", "vllm-fp32")] == ["2", "3"]
    assert "--speculative-config" in cmds["vllm-ngram"].cmd and "--speculative-config" not in cmds["vllm-fp32"].cmd
    assert "vllm-fp32" not in tg.ALL_TARGETS and "vllm-fp32" in tg.KNOWN_TARGETS  # not in the default list
    assert "unknown target" in tg.missing_reason("vllm-fp16", "smollm2-135m")
