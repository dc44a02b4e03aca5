"""`deltaserve bench agents`: multi-agent tool-calling workflows against deltaserve and peer servers.

    deltaserve bench agents --workflow 6|35 --agents A --model M --targets LIST --out DIR
        [--max-tokens N] [--ignore-eos] [--seed S] [--kv-budget-tokens N [--offload-gb G] [--roomy REPORT]]
        [--section KEY] [--write [DIR]]

The workload (`agents_workload`) is generated once from the seed. Every target
(`agents_targets`) is started as a subprocess, health-polled, warmed up, then
driven by the same client: A asyncio tasks (one per agent) that each send the
FULL history every turn over the OpenAI chat API (httpx, streaming, so TTFT is
measured), append the reply as returned, sleep a simulated tool latency and
append the next tool result. Targets run one after the other, never together.

Per target and turn index: latency (request sent -> last byte) median and p90
across agents, TTFT (first content chunk; ~prefill + queueing), prompt and
cached tokens (usage.prompt_tokens_details.cached_tokens, or llama.cpp's
timings.cache_n), tokens restored from a host KV tier (deltaserve's cache.restored_tokens), speculation acceptance
(usage.completion_tokens_details.accepted_prediction_tokens), end-to-end wall
time. Output: report.json, report.md, PNG plots in --out; with --write the
section `agents-w{T}[-kv{N}]` (or `--section KEY`) in docs/benchmarks/KEY.md and the plots under docs/img/.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import shutil
import sys
import time
from pathlib import Path
from statistics import median
from typing import Any

from deltaserve_bench import agents_targets as tg
from deltaserve_bench.agents_workload import Workflow, generate, system_tokens
from deltaserve_bench.agents_report import plots as _plots
from deltaserve_bench.agents_report import render_md
from deltaserve_bench.common import git_rev, machine, require
from deltaserve_bench.sections import IMG_HELP, add_write_argument, plot_dir, rel_link, section_path, write_section

def add_parser(sub) -> None:
    p = sub.add_parser("agents", help="multi-agent tool-calling workflows vs vLLM / llama.cpp / SGLang")
    p.add_argument("--workflow", type=int, default=6, help="turns per agent (the paper's workflows: 6 and 35)")
    p.add_argument("--agents", type=int, default=4)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--targets", default=",".join(tg.ALL_TARGETS),
                   help=f"comma-separated, of {', '.join(tg.KNOWN_TARGETS)} (default: all but vllm-fp32, "
                        "llamacpp-f16/-f32 and the offload ones; on CPUs without fast bf16 add vllm-fp32 and "
                        "llamacpp-f32; a peer not set up is skipped with the reason)")
    p.add_argument("--out", default="bench_out/agents")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--ignore-eos", action=argparse_bool(), default=True,
                   help="every target generates exactly --max-tokens (default on; --no-ignore-eos to disable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kv-budget-tokens", type=int, default=None,
                   help="memory-pressure scenario: the same KV budget (tokens) for every target")
    p.add_argument("--offload-gb", type=float, default=None,
                   help="deltaserve-offload / vllm-offload: GiB of the host-memory KV tier (default: enough for "
                        "every agent's whole context, agents x model context x KV bytes a token)")
    p.add_argument("--roomy", default=None, metavar="REPORT",
                   help="an earlier run's report.json (or its --out) of the same workload without the KV budget: "
                        "the memory-pressure table shows its medians beside these and checks the goals against it")
    p.add_argument("--result-median", type=float, default=180.0,
                   help="median tool-result size in tokens (lognormal, sigma 1, clipped to 20..1500)")
    p.add_argument("--tools-per-role", type=int, default=None, help="fewer tools: shorter system prompts (tests)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads per server")
    p.add_argument("--max-batch-tokens", type=int, default=2048)
    p.add_argument("--num-speculative-tokens", type=int, default=None, metavar="K",
                   help="deltaserve-stateful's draft cap (default: the server's)")
    p.add_argument("--kv-cache-dtype", default=None,
                   help="deltaserve targets' --kv-cache-dtype (default: the server's, the model dtype)")
    p.add_argument("--max-prefill-with-decode", type=int, default=None,
                   help="deltaserve targets: prefill tokens a step that also decodes may carry (default: no cap)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--img-dir", default=None, help=IMG_HELP)
    p.add_argument("--section", default="", metavar="KEY",
                   help="the section --write replaces, and the plots' prefix (default agents-w{T}[-kv{N}]; "
                        "another key keeps a run on other hardware beside the default one)")
    add_write_argument(p, "KEY")
    p.add_argument("--merge", action="store_true",
                   help="keep the other targets' results from an earlier run's --out/report.json (same workload)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def argparse_bool():
    import argparse

    return argparse.BooleanOptionalAction


# ------------------------------------------------------------------ client
async def _turn(client, target: tg.Target, messages: list[dict], max_tokens: int, ignore_eos: bool,
                agent_id: str) -> dict[str, Any]:
    body: dict[str, Any] = {"model": target.model_id, "messages": messages, "max_tokens": max_tokens,
                            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True},
                            **target.extra_body}
    if ignore_eos:
        body["ignore_eos"] = True
    if target.session:
        body["session_id"] = agent_id
    text, calls, usage, extra = [], {}, None, {}
    t0 = time.perf_counter()
    ttft = None
    async with client.stream("POST", target.base_url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{target.name}: HTTP {r.status_code}: {(await r.aread())[:500]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if chunk.get("usage"):
                usage = chunk["usage"]
            for k in ("timings", "deltaserve"):
                if chunk.get(k):
                    extra[k] = chunk[k]
            for ch in chunk.get("choices") or []:
                d = ch.get("delta") or {}
                if d.get("content"):
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    text.append(d["content"])
                for tc in d.get("tool_calls") or []:
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    c = calls.setdefault(tc.get("index", 0), {"id": "", "type": "function",
                                                              "function": {"name": "", "arguments": ""}})
                    c["id"] = tc.get("id") or c["id"]
                    f = tc.get("function") or {}
                    c["function"]["name"] += f.get("name") or ""
                    c["function"]["arguments"] += f.get("arguments") or ""
    latency = time.perf_counter() - t0
    usage = usage or {}
    timings = extra.get("timings") or {}
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    if cached is None and "cache_n" in timings:
        cached = timings["cache_n"]
    ctd = dict(usage.get("completion_tokens_details") or {})
    if ctd.get("accepted_prediction_tokens") is None and timings.get("draft_n") is not None:  # llama.cpp
        ctd["accepted_prediction_tokens"] = timings.get("draft_n_accepted", 0)
        ctd["rejected_prediction_tokens"] = timings["draft_n"] - ctd["accepted_prediction_tokens"]
    # deltaserve's cache explanation: the finishing chunk's top-level `deltaserve`, or the usage block's
    cache = ((extra.get("deltaserve") or usage.get("deltaserve") or {}).get("cache") or {})
    reply: dict[str, Any] = {"role": "assistant", "content": "".join(text)}
    if calls:
        reply["tool_calls"] = [calls[i] for i in sorted(calls)]
    return {"latency": latency, "ttft": ttft if ttft is not None else latency,
            "prompt_tokens": usage.get("prompt_tokens"), "cached_tokens": cached,
            "completion_tokens": usage.get("completion_tokens"),
            "accepted": ctd.get("accepted_prediction_tokens"), "rejected": ctd.get("rejected_prediction_tokens"),
            "cache_reason": cache.get("reason"), "restored_tokens": cache.get("restored_tokens"), "reply": reply}


async def _agent(client, target, agent, wf: Workflow, ignore_eos: bool, records: list, bar) -> None:
    messages: list[dict] = [{"role": "system", "content": agent.system}]
    for i, turn in enumerate(agent.turns):
        await asyncio.sleep(turn.latency_s)  # the tool "runs"
        last = messages[-1]
        if last.get("tool_calls"):
            for j, c in enumerate(last["tool_calls"]):
                messages.append({"role": "tool", "tool_call_id": c["id"] or f"call_{j}",
                                 "content": turn.content if j == 0 else "ok"})
        else:
            messages.append({"role": "user", "content": turn.content})
        rec = await _turn(client, target, messages, wf.max_tokens, ignore_eos, agent.agent_id)
        messages.append(rec.pop("reply"))
        rec.update(agent=agent.agent_id, turn=i + 1, t_end=time.perf_counter())
        records.append(rec)
        if bar is not None:
            bar.update(1)


async def _drive(target: tg.Target, wf: Workflow, ignore_eos: bool, timeout: float, progress: bool) -> dict:
    import httpx

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(wf.agents) * wf.n_turns, desc=target.name, unit="turn", file=sys.stderr)
    limits = httpx.Limits(max_connections=len(wf.agents) + 4)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        # warm-up: two short unrelated prompts (lazy init, compilation), not timed
        for k in range(2):
            warm = tg.Target(target.name, [], extra_body=target.extra_body, model_id=target.model_id, port=target.port)
            await _turn(client, warm, [{"role": "user", "content": f"Warm-up {k}: say hello."}], 4, True, f"warm-{k}")
        records: list[dict] = []
        prof0 = await _server_profile(client, target)
        t0 = time.perf_counter()
        await asyncio.gather(*(_agent(client, target, a, wf, ignore_eos, records, bar) for a in wf.agents))
        wall = time.perf_counter() - t0
        prof1 = await _server_profile(client, target)
        spec = await _server_spec_counters(client, target)
    if bar is not None:
        bar.close()
    profile = None
    if prof0 is not None and prof1 is not None:
        profile = {k: prof1[k] if k in PROFILE_GAUGES else prof1[k] - prof0.get(k, 0.0) for k in prof1}
        profile["wall_s"] = wall
    return {"wall_s": wall, "records": records, "server_spec": spec, "profile": profile}


PROFILE_METRICS = {  # deltaserve's Prometheus counters -> profile keys (seconds unless named *_steps)
    "deltaserve_engine_forward_prefill_seconds_total": "forward_prefill_s",
    "deltaserve_engine_forward_decode_seconds_total": "forward_decode_s",
    "deltaserve_engine_schedule_seconds_total": "schedule_s",
    "deltaserve_engine_sample_seconds_total": "sample_s",
    "deltaserve_prompt_render_seconds_total": "render_s",
    "deltaserve_engine_steps_total": "steps",
    "deltaserve_engine_prefill_steps_total": "prefill_steps",
    "deltaserve_kv_evicted_tokens_total": "evicted_tokens",  # pool evictions (into the host tier, when it is on)
    "deltaserve_kv_slot_run_fraction": "slot_run_fraction",  # a gauge: its value at the end, not a difference
}
PROFILE_GAUGES = {"slot_run_fraction"}


async def _server_profile(client, target) -> dict[str, float] | None:
    """deltaserve's engine time counters (summed over label sets), or None for peers / older servers."""
    if not target.name.startswith("deltaserve"):
        return None
    out = await _scrape(client, target, PROFILE_METRICS)
    return out if "forward_prefill_s" in out else None


async def _scrape(client, target, names: dict[str, str]) -> dict[str, float]:
    """Prometheus counters `names` (metric name -> our key) from the target's /metrics, summed over label sets;
    {} when the scrape fails."""
    try:
        text = (await client.get(target.base_url + "/metrics")).text
    except Exception:  # noqa: BLE001
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in names:
            out[names[name]] = out.get(names[name], 0.0) + float(line.rsplit(" ", 1)[1])
    return out


async def _server_spec_counters(client, target) -> dict[str, float] | None:
    """vLLM does not put speculation counts in `usage`; read its Prometheus counters instead."""
    if not target.name.startswith("vllm"):
        return None
    keys = ("spec_decode_num_accepted_tokens_total", "spec_decode_num_draft_tokens_total")
    return await _scrape(client, target, {"vllm:" + k: k for k in keys}) or None


# ------------------------------------------------------------------ aggregation
def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _agg(records: list[dict], n_turns: int) -> dict[str, Any]:
    per_turn = []
    for t in range(1, n_turns + 1):
        rs = [r for r in records if r["turn"] == t]
        lat = [r["latency"] for r in rs]
        ttft = [r["ttft"] for r in rs]
        row = {"turn": t, "latency_median": median(lat), "latency_p90": _pct(lat, 0.9),
               "ttft_median": median(ttft), "ttft_p90": _pct(ttft, 0.9),
               "decode_median": median(r["latency"] - r["ttft"] for r in rs)}
        for k in ("prompt_tokens", "cached_tokens", "completion_tokens", "accepted", "rejected", "restored_tokens"):
            vals = [r.get(k) for r in rs if r.get(k) is not None]
            row[k + "_median"] = median(vals) if vals else None
            row[k + "_sum"] = sum(vals) if vals else None
        per_turn.append(row)
    prompt = sum(r["prompt_tokens"] or 0 for r in records)
    have_cached = any(r["cached_tokens"] is not None for r in records)
    cached = sum(r["cached_tokens"] or 0 for r in records) if have_cached else None
    acc = [r["accepted"] for r in records if r["accepted"] is not None]
    rej = [r["rejected"] for r in records if r["rejected"] is not None]
    # restored: of the cached tokens, those copied back from a host tier (deltaserve reports it per response;
    # None for peers, whose cached_tokens cannot tell the two apart)
    restored = [r.get("restored_tokens") for r in records if r.get("restored_tokens") is not None]
    return {"per_turn": per_turn, "prompt_tokens": prompt, "cached_tokens": cached,
            "prefilled_tokens": prompt - cached if cached is not None else None,
            "restored_tokens": sum(restored) if restored else None,
            "completion_tokens": sum(r["completion_tokens"] or 0 for r in records),
            "accepted_tokens": sum(acc) if acc else None, "rejected_tokens": sum(rej) if rej else None,
            "acceptance": sum(acc) / (sum(acc) + sum(rej)) if acc and rej and sum(acc) + sum(rej) else None,
            "latency_median_all": median(r["latency"] for r in records),
            "latency_p90_all": _pct([r["latency"] for r in records], 0.9),
            "ttft_median_all": median(r["ttft"] for r in records),
            "reasons": sorted({r["cache_reason"] for r in records if r["cache_reason"]})}


ROOMY_KEYS = ("latency_median_all", "latency_p90_all", "wall_s", "prefilled_tokens", "restored_tokens")


def _roomy(path: Path, workflow: dict) -> dict[str, Any]:
    """The roomy-pool run beside this one: per target, the `ROOMY_KEYS` of `path` (report.json or the folder
    holding it), with its KV budget and command. Refused (SystemExit) when its workload differs: the ratios would
    compare different prompts."""
    path = path / "report.json" if path.is_dir() else path
    old = json.loads(path.read_text())
    if old.get("workflow") != workflow:
        raise SystemExit(f"--roomy {path}: a different workload (workflow {old.get('workflow')} vs {workflow})")
    return {"path": str(path), "kv_budget_tokens": old.get("kv_budget_tokens"), "command": old.get("command"),
            "targets": {n: {k: r.get(k) for k in ROOMY_KEYS} for n, r in old["targets"].items()}}


def _speedups(results: dict[str, dict], ref: str, n_turns: int) -> dict[str, dict]:
    if ref not in results:
        return {}
    base = results[ref]["per_turn"]
    out = {}
    for name, res in results.items():
        if name == ref:
            continue
        per = [res["per_turn"][i]["latency_median"] / base[i]["latency_median"] for i in range(n_turns)]
        mid = (n_turns + 1) // 2
        out[name] = {"per_turn": per, "median_over_turns": median(per), "turn1": per[0], "last_turn": per[-1],
                     "mid_turn": per[mid - 1], "mean_over_turns": sum(per) / len(per),
                     "e2e_ratio": results[ref]["wall_s"] / res["wall_s"]}
    return out


# ------------------------------------------------------------------ run
def run(args) -> int:
    require("httpx", "matplotlib", what="deltaserve bench agents")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    tok_json = str(tg.hf_dir(args.model) / "tokenizer.json")
    cfg = json.loads((tg.hf_dir(args.model) / "config.json").read_text())
    context = min(8192, cfg.get("max_position_embeddings", 8192))
    wf = generate(args.workflow, args.agents, seed=args.seed, max_tokens=args.max_tokens, tokenizer_json=tok_json,
                  context_limit=context, median_tokens=args.result_median,
                  tools_per_role=getattr(args, "tools_per_role", None))
    report: dict[str, Any] = {
        "bench": "agents", "workflow": wf.summary(), "system_tokens": system_tokens(wf, tok_json),
        "model": args.model, "dtype": "bfloat16", "ignore_eos": args.ignore_eos,
        "kv_budget_tokens": args.kv_budget_tokens, "kv_bytes_per_token": tg.kv_bytes_per_token(args.model),
        "machine": machine(), "git": git_rev(), "command": "deltaserve bench agents " + shlex.join(sys.argv[3:])
        if sys.argv[1:3] == ["bench", "agents"] else shlex.join(sys.argv), "targets": {}, "skipped": {}}
    if getattr(args, "roomy", None):  # read first: a mismatched workload stops the run before it starts
        report["roomy"] = _roomy(Path(args.roomy), report["workflow"])
    results: dict[str, dict] = {}
    prev = out / "report.json"
    if getattr(args, "merge", False) and prev.exists():
        old = json.loads(prev.read_text())
        if old.get("workflow") == report["workflow"]:
            results = {k: v for k, v in old["targets"].items() if k not in names}
            report["skipped"] = {k: v for k, v in old.get("skipped", {}).items() if k not in names}
            report["git"] = old.get("git", report["git"]) if not names else report["git"]
            if names:
                report["command"] = old["command"] + " ; then " + report["command"]
            else:
                report["command"] = old["command"]
        else:
            print("[agents] --merge: earlier report has a different workload; not merged", file=sys.stderr)
    for name in names:
        why = tg.missing_reason(name, args.model)
        if why:
            print(f"[agents] skipping {why}", file=sys.stderr)
            report["skipped"][name] = why
            continue
        t = tg.build(name, args.model, args.agents, args.kv_budget_tokens, args.threads, args.max_batch_tokens, context,
                     args.max_prefill_with_decode, getattr(args, "offload_gb", None),
                     getattr(args, "num_speculative_tokens", None), getattr(args, "kv_cache_dtype", None))
        print(f"[agents] starting {name}: {shlex.join(t.cmd)}", file=sys.stderr)
        try:
            t.start(out / "logs")
            res = asyncio.run(_drive(t, wf, args.ignore_eos, args.timeout, not args.no_progress))
        except Exception as e:  # noqa: BLE001 - one broken peer must not sink the others
            print(f"[agents] {name} failed: {e}\n{t.tail()}", file=sys.stderr)
            report["skipped"][name] = f"{name}: failed: {str(e)[:300]}"
            continue
        finally:
            t.stop()
        agg = _agg(res["records"], wf.n_turns)
        sc = res.get("server_spec")
        if sc and agg["acceptance"] is None and sc.get("spec_decode_num_draft_tokens_total"):
            agg["accepted_tokens"] = sc.get("spec_decode_num_accepted_tokens_total")  # includes the warm-up
            agg["acceptance"] = agg["accepted_tokens"] / sc["spec_decode_num_draft_tokens_total"]
        agg.update(wall_s=res["wall_s"], profile=res.get("profile"), startup_s=t.start_s, command=shlex.join(t.cmd), label=tg.LABELS[name],
                   notes=t.notes, env={k: v for k, v in t.env.items() if k.startswith(("VLLM", "OMP", "SGLANG", "LD_PRELOAD"))},
                   records=res["records"])
        results[name] = agg
        print(f"[agents] {name}: wall {res['wall_s']:.1f}s, median turn {agg['latency_median_all']:.3f}s, "
              f"prompt {agg['prompt_tokens']} cached {agg['cached_tokens']}", file=sys.stderr)
    order = {n: i for i, n in enumerate(tg.REPORT_ORDER)}
    report["targets"] = results = dict(sorted(results.items(), key=lambda kv: order.get(kv[0], 99)))
    report["speedup_of_stateful"] = _speedups(results, "deltaserve-stateful", wf.n_turns)
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    plots = _plots(report, out)
    md = render_md(report, plots)
    (out / "report.md").write_text(md)
    print(md)
    if args.write:
        key = args.section or f"agents-w{wf.n_turns}" + (f"-kv{args.kv_budget_tokens}" if args.kv_budget_tokens else "")
        section = section_path(args.write, key)
        img = plot_dir(args.write, args.img_dir)
        for p in plots:  # report.md links them beside it; the section links the committed copy (or the --out one)
            src = out / p
            if img is not None:
                src = img / f"{key}-{p}"
                src.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(out / p, src)
            md = md.replace(f"]({p})", f"]({rel_link(src, section)})")
        write_section(section, key, md)
    return 0
