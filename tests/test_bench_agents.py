"""Smoke run of `deltaserve bench agents` against deltaserve's own stateful and stateless modes.

Peers (vLLM, llama.cpp) are never started here. Two agents, three turns,
4 generated tokens, small tool results; both servers are real subprocesses
driven over HTTP exactly as in the full benchmark.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest


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
    assert sf["restored_tokens"] == 0  # read from each response's cache block (None would mean not parsed)
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
    # a gauge, read at the end (not a difference): stateless pins nothing, so no window is out of a run
    assert sl["profile"]["slot_run_fraction"] == 1.0 and 0 < sf["profile"]["slot_run_fraction"] <= 1
    assert "pinned KV in 16-slot runs" in (tmp_path / "report.md").read_text()
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


def test_llamacpp_targets_gguf_per_dtype(smollm_dir, monkeypatch, tmp_path):
    """llamacpp runs the bf16 GGUF, llamacpp-f16 / -f32 the f16 / f32 ones (the same slots, cache_prompt and
    speculation otherwise); a missing GGUF is reported by its own path with the setup step that writes it."""
    from deltaserve_bench import agents_targets as tg

    monkeypatch.setattr(tg, "PEERS", tmp_path)
    monkeypatch.setattr(tg, "LLAMA_SERVER", smollm_dir / "config.json")  # any existing file: "built"
    monkeypatch.setattr(tg, "_help", lambda *a: "")
    cmds = {n: tg.build(n, "smollm2-135m", 4, None, 2) for n in ("llamacpp", "llamacpp-f16", "llamacpp-f32")}
    models = {n: t.cmd[t.cmd.index("-m") + 1] for n, t in cmds.items()}
    assert models == {n: str(tmp_path / "gguf" / f"smollm2-135m-{d}.gguf")
                      for n, d in (("llamacpp", "bf16"), ("llamacpp-f16", "f16"), ("llamacpp-f32", "f32"))}
    strip = lambda c: [a for a in c if a not in models.values() and not a.isdigit()]  # noqa: E731 (ports differ)
    assert strip(cmds["llamacpp"].cmd) == strip(cmds["llamacpp-f32"].cmd) == strip(cmds["llamacpp-f16"].cmd)
    assert all(cmds[n].extra_body == {"cache_prompt": True} for n in cmds)
    assert "llamacpp-f32" not in tg.ALL_TARGETS and "llamacpp-f32" in tg.KNOWN_TARGETS
    (tmp_path / "gguf").mkdir()
    (tmp_path / "gguf" / "smollm2-135m-bf16.gguf").write_bytes(b"GGUF")
    assert tg.missing_reason("llamacpp", "smollm2-135m") is None
    why = tg.missing_reason("llamacpp-f32", "smollm2-135m")
    assert why.startswith(f"llamacpp-f32: {tmp_path / 'gguf' / 'smollm2-135m-f32.gguf'} not found")
    assert "scripts/setup_peers.sh gguf smollm2-135m" in why
    from deltaserve_bench import agents_report

    assert {"llamacpp-f16", "llamacpp-f32"} <= set(agents_report.EXTERNAL_PEERS)  # candidates for the fastest peer


def test_offload_targets_and_budget_command_lines(smollm_dir, monkeypatch, tmp_path):
    """deltaserve-offload is stateful + --kv-offload-gb (whole-workload size unless --offload-gb); vLLM honours the
    KV budget by block count; vllm-offload adds vLLM's native CPU offloading, or reports itself unavailable when
    the installed vLLM's --help lacks the flags or its offloading refuses the CPU platform."""
    from deltaserve_bench import agents_targets as tg

    bpt = tg.kv_bytes_per_token("smollm2-135m")
    t = tg.build("deltaserve-offload", "smollm2-135m", 4, 3000, 2, context=8192)
    arg = lambda t, flag: t.cmd[t.cmd.index(flag) + 1]  # noqa: E731
    assert arg(t, "--cache-mode") == "stateful" and t.session
    assert float(arg(t, "--kv-cache-gb")) * 2**30 == pytest.approx(3000 * bpt, rel=1e-4)
    assert float(arg(t, "--kv-offload-gb")) * 2**30 == pytest.approx(4 * 8192 * bpt, rel=1e-4)
    t = tg.build("deltaserve-offload", "smollm2-135m", 4, 3000, 2, offload=0.5)
    assert float(arg(t, "--kv-offload-gb")) == 0.5
    assert "--kv-offload-gb" not in tg.build("deltaserve-stateful", "smollm2-135m", 4, 3000, 2).cmd
    assert "--kv-cache-dtype" not in tg.build("deltaserve-stateful", "smollm2-135m", 4, 3000, 2).cmd
    t = tg.build("deltaserve-stateful", "smollm2-135m", 4, 3000, 2, kv_cache_dtype="int8")
    assert arg(t, "--kv-cache-dtype") == "int8" and "--kv-cache-dtype int8" in t.notes[0]
    for name in ("vllm", "vllm-offload"):
        v = tg.build(name, "smollm2-135m", 4, 3000, 2, offload=1.5)
        assert arg(v, "--num-gpu-blocks-override") == "24" and arg(v, "--block-size") == "128"  # 24*128 >= 3000
        assert arg(v, "--max-model-len") == "2944"  # 23 blocks besides the null one: else vLLM refuses to start
    assert "--kv-offloading-size" not in tg.build("vllm", "smollm2-135m", 4, 3000, 2).cmd
    v = tg.build("vllm-offload", "smollm2-135m", 4, 3000, 2, offload=1.5)
    assert arg(v, "--kv-offloading-backend") == "native" and float(arg(v, "--kv-offloading-size")) == 1.5
    assert {"deltaserve-offload", "vllm-offload"} <= set(tg.KNOWN_TARGETS) - set(tg.ALL_TARGETS)
    monkeypatch.setattr(tg, "VLLM_BIN", smollm_dir / "config.json")  # any existing file: "installed"
    monkeypatch.setattr(tg, "vllm_help", lambda: "usage: [--kv-offloading-backend {native}] [--dtype DTYPE]")
    assert "--kv-offloading-size" in tg.missing_reason("vllm-offload", "smollm2-135m")
    assert tg.missing_reason("vllm", "smollm2-135m") is None
    monkeypatch.setattr(tg, "vllm_help", lambda: "[--kv-offloading-size S] [--kv-offloading-backend {native}]")
    monkeypatch.setattr(tg, "PEERS", tmp_path)
    assert tg.missing_reason("vllm-offload", "smollm2-135m") is None
    spec = tmp_path / "vllm/lib/python3.11/site-packages/vllm/v1/kv_offload/cpu/spec.py"
    spec.parent.mkdir(parents=True)
    spec.write_text('raise Exception("CPU Offloading is currently only supported on CUDA-alike and XPU GPUs")')
    assert "refuses a CPU platform" in tg.missing_reason("vllm-offload", "smollm2-135m")


def _records(restored, latency):
    return [{"turn": t, "agent": f"a{a}", "latency": latency * t, "ttft": latency / 2, "prompt_tokens": 100 * t,
             "cached_tokens": 50 * t, "completion_tokens": 4, "accepted": None, "rejected": None,
             "cache_reason": "restored" if restored else None, "restored_tokens": restored}
            for a in range(2) for t in (1, 2, 3)]


def test_pressure_report_recomputed_restored_and_goals(tmp_path):
    """Per target the report sums restored tokens (None for peers), shows recomputed vs restored and p90 turn, and
    under a budget puts the roomy run beside it with the two memory-pressure goals."""
    from deltaserve_bench import agents_bench as ab
    from deltaserve_bench.agents_report import render_md

    res = {"deltaserve-stateful": ab._agg(_records(0, 0.1), 3), "deltaserve-offload": ab._agg(_records(30, 0.1), 3),
           "deltaserve-prefix": ab._agg(_records(0, 0.3), 3), "vllm": ab._agg(_records(None, 0.2), 3)}
    off = res["deltaserve-offload"]
    assert off["restored_tokens"] == 180 and res["vllm"]["restored_tokens"] is None
    assert off["prefilled_tokens"] == 600 and off["latency_p90_all"] == pytest.approx(0.3)
    for r in res.values():
        r.update(wall_s=2.0, profile=None, startup_s=1.0, command="x", label="l", notes=[], env={})
    wf = {"agents": 2, "turns": 3, "max_tokens": 4, "seed": 0, "roles": ["r"], "tool_result_tokens": "1-2"}
    roomy_rep = {"workflow": wf, "command": "roomy-cmd", "kv_budget_tokens": None,
                 "targets": {"deltaserve-stateful": dict(res["deltaserve-stateful"], latency_median_all=0.16)}}
    (tmp_path / "report.json").write_text(json.dumps(roomy_rep))
    report = {"workflow": wf, "targets": res, "speedup_of_stateful": {}, "skipped": {}, "model": "m",
              "command": "c", "machine": "m", "git": "g", "system_tokens": "1", "ignore_eos": True,
              "kv_budget_tokens": 3000, "roomy": ab._roomy(tmp_path, wf)}
    md = render_md(report, [])
    assert "recomputed (prefilled) tok" in md and "restored tok" in md and "p90 turn ms" in md
    assert "Memory pressure: KV budget 3000 tokens" in md and "roomy-cmd" in md
    goals = {line.split("|")[1].strip(): line.split("|")[4].strip() for line in md.splitlines() if "goal" not in
             line and "median turn / " in line}
    # offload median 0.2 s vs roomy stateful 0.16 s: 1.25x <= 1.3x; prefix 0.6 s / 0.2 s = 3x >= 2x
    assert list(goals.values()) == ["yes", "yes"], md
    with pytest.raises(SystemExit, match="different workload"):
        ab._roomy(tmp_path, dict(wf, agents=3))


def _paper_rows(md: str) -> dict[tuple[str, str], str]:
    """The paper table of a report: (claim, against) -> ours."""
    lines = md[md.index("Paper vs ours"):].splitlines()
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in lines[2:] if line.startswith("|")]
    assert rows[0][:2] == ["claim", "against (fastest on this metric)"]
    return {(r[0], r[1]): r[3] for r in rows[2:]}


def test_paper_claims_use_the_fastest_peer_per_metric():
    """Each claim names the peer configuration fastest on its own metric: vllm-ngram has the fastest turns,
    llamacpp the shortest wall, and vllm-fp32 (second on both) wins neither; when the SGLang-style prefix emulation
    has the fastest turns, the turn claims are repeated against the fastest external peer."""
    from deltaserve_bench import agents_bench as ab
    from deltaserve_bench.agents_report import fastest_peers, render_md

    # name -> (turn latency scale, wall s); stateful: 0.1 s a turn-index, 1 s wall
    runs = {"deltaserve-stateful": (0.1, 1.0), "deltaserve-stateless": (0.5, 5.0), "vllm": (0.4, 4.0),
            "vllm-ngram": (0.2, 3.0), "vllm-fp32": (0.25, 2.5), "llamacpp": (0.3, 2.0)}
    wf = {"agents": 2, "turns": 3, "max_tokens": 4, "seed": 0, "roles": ["r"], "tool_result_tokens": "1-2"}

    def report(runs):
        res = {}
        for name, (lat, wall) in runs.items():
            res[name] = ab._agg(_records(None, lat), 3)
            res[name].update(wall_s=wall, profile=None, startup_s=1.0, command="x", label="l", notes=[], env={})
        return {"workflow": wf, "targets": res, "speedup_of_stateful": ab._speedups(res, "deltaserve-stateful", 3),
                "skipped": {}, "model": "m", "command": "c", "machine": "m", "git": "g", "system_tokens": "1",
                "ignore_eos": True, "kv_budget_tokens": None}

    rep = report(runs)
    peers = ["vllm", "vllm-ngram", "vllm-fp32", "llamacpp"]
    assert fastest_peers(rep["speedup_of_stateful"], peers) == {"median turn": "vllm-ngram",
                                                                  "end-to-end wall": "llamacpp"}
    md = render_md(rep, [])
    assert "Fastest on each metric: median turn: `vllm-ngram`; end-to-end wall: `llamacpp`." in md
    assert _paper_rows(md) == {  # turns 2.0x slower than stateful; walls 1 s / 2 s
        ("per-turn speedup (median over turns)", "`vllm-ngram`"): "2.00x",
        ("median-turn speedup", "`vllm-ngram`"): "2.00x (at turn 2: 2.00x)",
        ("end-to-end wall time ratio", "`llamacpp`"): "0.50x",
        ("speedup vs stateless at turn 3", "`deltaserve-stateless`"): "5.00x"}

    md = render_md(report(dict(runs, **{"deltaserve-prefix": (0.15, 6.0)})), [])
    assert "median turn: `deltaserve-prefix`; end-to-end wall: `llamacpp`" in md
    assert "Fastest external peer: median turn: `vllm-ngram`." in md
    rows = _paper_rows(md)
    assert rows[("per-turn speedup (median over turns)", "`deltaserve-prefix`")] == "1.50x"
    assert rows[("per-turn speedup (median over turns)", "`vllm-ngram` (fastest external)")] == "2.00x"
    assert rows[("end-to-end wall time ratio", "`llamacpp`")] == "0.50x"
    assert len(rows) == 6  # the wall claim is not repeated: its winner is already external


CPUINFO_ZEN4 = "processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu avx512f avx512_bf16 sse4_2\n\n"
CPUINFO_SPR = "processor\t: 0\nmodel name\t: Intel Xeon 8480+\nflags\t\t: fpu avx512f amx_bf16 amx_tile amx_int8\n\n"


def test_sglang_target_and_amx_refusal(smollm_dir, monkeypatch, tmp_path):
    """sglang runs SGLang's CPU server with its prefix cache on (nothing disables it) and cache reports; without
    .peers/sglang it is skipped with the reason, which on a CPU without AMX is the missing AMX."""
    from deltaserve_bench import agents_targets as tg

    zen4, spr = tmp_path / "zen4", tmp_path / "spr"
    zen4.write_text(CPUINFO_ZEN4)
    spr.write_text(CPUINFO_SPR)
    assert tg.amx_refusal(zen4) == ("this CPU (AMD EPYC 9R14) has no AMX (flags lack amx_tile amx_bf16); SGLang's "
                                    "CPU backend (sgl-kernel's CPU extension) needs an Intel Xeon with AMX, "
                                    "4th generation or newer")
    assert tg.amx_refusal(spr) is None
    t = tg.build("sglang", "smollm2-135m", 4, 3000, 2, max_batch_tokens=512)
    arg = lambda flag: t.cmd[t.cmd.index(flag) + 1]  # noqa: E731
    assert t.cmd[1:3] == ["-m", "sglang.launch_server"] and arg("--model-path") == str(smollm_dir)
    assert arg("--device") == "cpu" and arg("--dtype") == "bfloat16" and arg("--served-model-name") == "smollm2-135m"
    assert arg("--max-total-tokens") == "3000" and arg("--context-length") == "3000"  # the budget caps both
    assert arg("--max-running-requests") == "4" and arg("--chunked-prefill-size") == "512"
    assert "--enable-cache-report" in t.cmd and "--disable-radix-cache" not in t.cmd
    assert t.env["SGLANG_USE_CPU_ENGINE"] == "1" and t.env["SGLANG_CPU_OMP_THREADS_BIND"] == "0-1"
    roomy = tg.build("sglang", "smollm2-135m", 4, None, 2)
    assert int(roomy.cmd[roomy.cmd.index("--max-total-tokens") + 1]) == 2 * 2**30 // tg.kv_bytes_per_token(
        "smollm2-135m")  # 2 GiB of KV, as vLLM and deltaserve get
    assert "sglang" in tg.ALL_TARGETS and "sglang" in tg.REPORT_ORDER
    monkeypatch.setattr(tg, "SGLANG_BIN", tmp_path / "absent" / "python")
    why = ["this CPU (X) has no AMX"]
    monkeypatch.setattr(tg, "amx_refusal", lambda: why[0])
    assert tg.missing_reason("sglang", "smollm2-135m") == "sglang: this CPU (X) has no AMX"
    why[0] = None
    assert "absent/python not found; run `scripts/setup_peers.sh sglang`" in tg.missing_reason("sglang", "smollm2-135m")
    monkeypatch.setattr(tg, "SGLANG_BIN", smollm_dir / "config.json")  # any existing file: "installed"
    assert tg.missing_reason("sglang", "smollm2-135m") is None


def test_setup_peers_sglang_refuses_without_amx(tmp_path):
    """`setup_peers.sh sglang` on a CPU without AMX: exit 3 and one line saying why, nothing installed; with AMX
    it goes on to the build (stopped here at the clone, which SGLANG_SRC pointing nowhere makes fail)."""
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "setup_peers.sh"
    zen4, spr = tmp_path / "zen4", tmp_path / "spr"
    zen4.write_text(CPUINFO_ZEN4)
    spr.write_text(CPUINFO_SPR)
    env = {"PATH": "/usr/bin:/bin", "DELTASERVE_PEERS": str(tmp_path / "peers"), "CPUINFO": str(zen4)}
    r = subprocess.run(["bash", str(script), "sglang"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 3 and r.stdout == ""
    assert r.stderr.splitlines() == ["sglang: not set up: this CPU (AMD EPYC 9R14) has no AMX (flags lack amx_tile "
                                     "amx_bf16); SGLang's CPU backend (sgl-kernel's CPU extension) needs an Intel "
                                     "Xeon with AMX, 4th generation or newer"]
    assert not (tmp_path / "peers" / "sglang").exists()
    env.update(CPUINFO=str(spr), SGLANG_SRC=str(tmp_path / "no-checkout"))
    r = subprocess.run(["bash", str(script), "sglang"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "no AMX" not in r.stderr and "no-checkout" in r.stderr
