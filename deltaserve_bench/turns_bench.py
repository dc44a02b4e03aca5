"""`deltaserve bench turns`: per-turn latency of multi-turn agents under the three cache modes.

A seeded workload: `--agents` agents share one system prompt with tool
definitions (~`--system-tokens` tokens). Every turn each agent appends a tool
result of `--delta-min`..`--delta-max` tokens and generates `--gen-tokens`
tokens (ignore_eos), so its context grows turn after turn. Agents take their
turns round-robin (agent 0 turn t, agent 1 turn t, ..., agent 0 turn t+1), so
their sessions interleave in the cache.

The same workload runs once per cache mode, one engine per mode, one after
the other: `stateful` (session KV pinned between turns), `prefix` (radix LRU
cache only) and `stateless` (every turn recomputes the whole context).
Speculation is off, so only the cache mode differs. Latency of a turn =
add_request to last token; per turn index the median over agents is reported.
"""

from __future__ import annotations

import gc
import json
import random
import shutil
import sys
import time
from pathlib import Path
from statistics import median

import torch

from deltaserve_bench.common import invoked_command, load_note, md_table, pyplot, report_head, require
from deltaserve_bench.sections import IMG_HELP, add_write_argument, plot_dir, rel_link, section_path, write_section

MODES = ("stateful", "prefix", "stateless")
SELECTED_TURNS = (1, 5, 10, 20, 35)

_WORDS = (
    "file path line value status ok error warning result item id name price total count city date "
    "user order invoice ticket report query index table row column commit branch test passed failed "
    "latency bytes request response cache session token model agent step plan retry timeout done"
).split()


def add_parser(sub) -> None:
    p = sub.add_parser("turns", help="per-turn latency of multi-turn agents: stateful vs prefix vs stateless")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--turns", type=int, default=35)
    p.add_argument("--agents", type=int, default=2)
    p.add_argument("--system-tokens", type=int, default=1500, help="shared system prompt + tool definitions")
    p.add_argument("--delta-min", type=int, default=50, help="smallest tool result (tokens)")
    p.add_argument("--delta-max", type=int, default=250, help="largest tool result (tokens)")
    p.add_argument("--gen-tokens", type=int, default=8)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--max-batch-tokens", type=int, default=2048)
    p.add_argument("--kv-cache-mb", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--stateless-turns", choices=["selected", "all"], default="selected",
                   help="stateless keeps nothing between turns, so by default it is timed only at the reported turns "
                        "(1,5,10,20,last) on the contexts the first mode produced; 'all' times every turn")
    p.add_argument("--out", default="bench_out/turns", help="folder for the PNG plot and raw JSON")
    p.add_argument("--img-dir", default=None, help=IMG_HELP)
    add_write_argument(p, "turns-MODEL")
    p.set_defaults(func=run)


# ------------------------------------------------------------------ workload
def _tool_defs(rng: random.Random, tok, target_tokens: int) -> tuple[str, int]:
    """Tool definitions (JSON schemas) in a system prompt of about `target_tokens` tokens."""
    intro = ("You are an autonomous agent working in a software repository. Call tools to inspect and change "
             "files, run tests and search. Answer with one tool call per turn.\n\n# Tools\n")
    tools: list[str] = []
    i = 0
    while True:
        params = {
            f"{rng.choice(_WORDS)}_{j}": {"type": rng.choice(["string", "integer", "boolean"]),
                                         "description": " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 12)))}
            for j in range(rng.randint(2, 5))
        }
        fn = {"type": "function", "function": {
            "name": f"{rng.choice(_WORDS)}_{rng.choice(_WORDS)}_{i}",
            "description": " ".join(rng.choice(_WORDS) for _ in range(rng.randint(10, 30))),
            "parameters": {"type": "object", "properties": params, "required": list(params)[:1]}}}
        cand = intro + "\n".join(tools + [json.dumps(fn)])
        if len(tok.encode(cand)) > target_tokens and tools:
            break
        tools.append(json.dumps(fn))
        i += 1
    text = intro + "\n".join(tools)
    return text, len(tools)


def _tool_result(rng: random.Random, tok, n: int) -> list[int]:
    lines = []
    while True:
        lines.append(json.dumps({rng.choice(_WORDS): rng.choice(_WORDS), "id": rng.randint(0, 99999),
                                 "note": " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12)))}))
        ids = tok.encode("\n".join(lines))
        if len(ids) >= n:
            return ids[:n]


def build_workload(tok, agents: int, turns: int, system_tokens: int, dmin: int, dmax: int, seed: int):
    """-> (system prompt ids, per agent per turn delta ids, number of tools). Deterministic in `seed`."""
    rng = random.Random(seed)
    sys_text, ntools = _tool_defs(rng, tok, system_tokens)
    sys_msg = {"role": "system", "content": sys_text}
    head = tok.render_chat([sys_msg], add_generation_prompt=False)
    marker = "\u2063TOOLRESULT\u2063"
    full = tok.render_chat([sys_msg, {"role": "user", "content": marker}], add_generation_prompt=True)
    assert full.startswith(head), "chat template does not extend the system prompt"
    before, after = full[len(head):].split(marker)
    # Token-level turn glue: user header + "Tool result:" ... end-of-turn + assistant header.
    pre, post = tok.encode(before + "Tool result:\n"), tok.encode(after)
    deltas = [[pre + _tool_result(rng, tok, rng.randint(dmin, dmax)) + post for _ in range(turns)]
              for _ in range(agents)]
    return tok.encode(head), deltas, ntools


# ------------------------------------------------------------------ running
def _run_mode(args, mode: str, sys_ids, deltas, ref=None, only_turns=None) -> list[list[dict | None]]:
    """-> per turn, per agent: {latency, ttft, context, cached, prefilled, output} (None where skipped).

    With `ref` (an earlier mode's results) and `only_turns`, other turns are not run: the history
    is extended with the reference outputs instead (valid for stateless, which keeps no state).
    """
    from tqdm import tqdm

    from deltaserve.engine.engine import EngineConfig, LLMEngine
    from deltaserve.engine.kv_manager import CacheMode
    from deltaserve.engine.sampling import SamplingParams

    eng = LLMEngine.from_model(args.model, EngineConfig(
        dtype=getattr(torch, args.dtype), cache_mode=CacheMode(mode), speculation=False,
        kv_cache_bytes=args.kv_cache_mb << 20, max_batch_tokens=args.max_batch_tokens, device=args.device))
    # Warm-up on unrelated tokens (not a prefix of the workload), then start from an empty cache.
    eng.generate([list(range(1000, 1064))], SamplingParams(max_tokens=2, ignore_eos=True))
    params = SamplingParams(max_tokens=args.gen_tokens, ignore_eos=True)
    agents = len(deltas)
    history = [list(sys_ids) for _ in range(agents)]
    for a in range(agents):
        eng.open_session(f"agent{a}")
    res: list[list[dict]] = []
    bar = tqdm(range(args.turns), desc=f"{mode:9s}", unit="turn", file=sys.stderr)
    for t in bar:
        row = []
        for a in range(agents):
            prompt = history[a] + deltas[a][t]
            if only_turns is not None and ref is not None and t + 1 not in only_turns:
                history[a] = prompt + ref[t][a]["output"]
                row.append(None)
                continue
            t0 = time.perf_counter()
            seq = eng.add_request(prompt, params, session_id=f"agent{a}")
            eng.run_until_done([seq])
            t1 = time.perf_counter()
            history[a] = prompt + seq.output_ids
            row.append({"latency": t1 - t0, "ttft": seq.stats.first_token_time - t0, "context": len(history[a]),
                        "cached": seq.stats.cached_tokens, "prefilled": seq.stats.prefilled_tokens,
                        "output": seq.output_ids})
        res.append(row)
        if row[0] is not None:
            bar.set_postfix(ctx=row[0]["context"], lat=f"{median(r['latency'] for r in row):.2f}s")
    bar.close()
    del eng
    gc.collect()
    return res


def _plot(curves: dict[str, list[float]], path: Path, title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for mode, ys in curves.items():
        pts = [(i + 1, y) for i, y in enumerate(ys) if y is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=mode)
    ax.set_yscale("log")
    ax.set_xlabel("turn")
    ax.set_ylabel("turn latency, median over agents (s, log)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def run(args) -> int:
    from deltaserve.models.loader import model_dir
    from deltaserve.models.tokenizer import Tokenizer

    require("matplotlib", what="deltaserve bench turns (its plot)")
    torch.manual_seed(args.seed)
    tok = Tokenizer(model_dir(args.model))
    sys_ids, deltas, ntools = build_workload(tok, args.agents, args.turns, args.system_tokens,
                                             args.delta_min, args.delta_max, args.seed)
    modes = [m for m in args.modes.split(",") if m]
    turns = args.turns
    sel = [t for t in SELECTED_TURNS if t <= turns]
    if turns not in sel:
        sel.append(turns)
    results: dict[str, list] = {}
    for m in modes:
        ref = next((results[x] for x in results if x != "stateless"), None)
        only = set(sel) if m == "stateless" and args.stateless_turns == "selected" and ref is not None else None
        results[m] = _run_mode(args, m, sys_ids, deltas, ref, only)

    def med(m, t, key):
        row = results[m][t]
        return None if row[0] is None else median(r[key] for r in row)

    lat = {m: [med(m, t, "latency") for t in range(turns)] for m in modes}
    ctx = [med(modes[0], t, "context") for t in range(turns)]
    pre = {m: [med(m, t, "prefilled") for t in range(turns)] for m in modes}
    outs_equal = {m: all(results[m][t][a]["output"] == results[modes[0]][t][a]["output"]
                         for t in range(turns) for a in range(args.agents)
                         if results[m][t][a] is not None and results[modes[0]][t][a] is not None) for m in modes}

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "turns.json").write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "func"},
                                                "system_tokens": len(sys_ids), "tools": ntools,
                                                "results": results}, indent=1))
    png = out / f"turns-{args.model}.png"
    _plot(lat, png, f"{args.model} {args.dtype}, {args.agents} agents, +{args.delta_min}-{args.delta_max} tok/turn, "
                    f"{args.gen_tokens} gen tok")
    key = f"turns-{args.model}"
    section = section_path(args.write, key) if args.write else None
    link = png
    img = plot_dir(args.write, args.img_dir) if section else None
    if img is not None:
        link = img / png.name
        link.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, link)

    header = ["turn", "context (tok)"] + [f"{m} (s)" for m in modes]
    if "stateful" in modes and "stateless" in modes:
        header.append("stateless / stateful")
    rows = []
    for t in sel:
        r = [t, int(ctx[t - 1])] + [lat[m][t - 1] for m in modes]
        if "stateful" in modes and "stateless" in modes:
            r.append(f"{lat['stateless'][t - 1] / lat['stateful'][t - 1]:.1f}x")
        rows.append(r)
    table = md_table(header, rows)

    lines = []
    verdict = []
    if "stateful" in modes:
        sf = lat["stateful"]
        ratio = sf[-1] / sf[0]
        lines.append(f"- stateful last/first turn latency: **{ratio:.2f}x** ({sf[-1]:.3f}s at {int(ctx[-1])} tokens "
                     f"vs {sf[0]:.3f}s at {int(ctx[0])} tokens)")
        if turns >= 2:
            lines.append(f"- stateful last/second turn latency: {sf[-1] / sf[1]:.2f}x (turn 1 also prefills the shared "
                         f"system prompt for the first agent; from turn 2 on every agent prefills only its delta)")
        ok1 = ratio <= 1.3 and ctx[-1] >= 6000
        verdict.append(f"stateful last-turn ≤ 1.3x first-turn at ≥ 6k context: **{'met' if ok1 else 'NOT met'}** "
                       f"({ratio:.2f}x at {int(ctx[-1])} tokens; against turn 2, which unlike turn 1 does not "
                       f"prefill the shared system prompt, it is {sf[-1] / sf[min(1, turns - 1)]:.2f}x: stateful turns "
                       f"still grow with context, through decode attention over the whole context)")
        if "stateless" in modes:
            sp = lat["stateless"][-1] / sf[-1]
            lines.append(f"- stateless/stateful at turn {turns}: **{sp:.1f}x**")
            verdict.append(f"stateful ≥ 10x faster than stateless at turn {turns}: **{'met' if sp >= 10 else 'NOT met'}** "
                           f"({sp:.1f}x)")
    for m in modes:
        done = [r for row in results[m] for r in row if r is not None]
        tot = sum(r["latency"] for r in done)
        ptot = sum(r["prefilled"] for r in done)
        lines.append(f"- {m}: {tot:.1f}s total over the {len(done)} turns it ran, {ptot:,} prompt tokens prefilled "
                     f"(median {pre[m][-1]:.0f} at the last turn)")
    same = [m for m in modes[1:] if outs_equal[m]]
    diff = [m for m in modes[1:] if not outs_equal[m]]
    lines.append(f"- generated tokens identical to `{modes[0]}`: {', '.join(same) or '-'}"
                 + (f"; differ (bf16 rounding of a different computation order): {', '.join(diff)}" if diff else ""))

    cmd = invoked_command("turns", f"deltaserve bench turns --model {args.model} --turns {turns} --agents {args.agents}")
    body = (
        report_head(f"Turns: per-turn latency by cache mode ({args.model}, {args.dtype})", cmd) +
        f"Workload (seed {args.seed}): {args.agents} agents share a system prompt with {ntools} tool definitions "
        f"({len(sys_ids)} tokens); each turn appends a tool result of {args.delta_min}-{args.delta_max} tokens "
        f"and generates {args.gen_tokens} tokens (ignore_eos); agents take turns round-robin. One engine per cache "
        f"mode, run one after the other on the same workload; speculation off; KV cache {args.kv_cache_mb} MiB, "
        f"max_batch_tokens {args.max_batch_tokens}. Latency = request in to last token, median over agents.\n\n"
        + table + "\n\n" + "\n".join(lines) + "\n\n"
        + "Targets: " + "; ".join(verdict) + ".\n\n"
        + f"![turn latency by cache mode]({rel_link(link, section) if section else link.as_posix()})\n\n"
        + ("`stateless` keeps nothing between turns, so it was timed only at the turns in the table, on the same "
           "contexts (the other turns' outputs were taken from the first mode); `--stateless-turns all` times every "
           "turn.\n\n" if args.stateless_turns == "selected" else "")
        + "`prefix` keeps every turn in its LRU radix cache here (the cache is large enough for all agents), so it "
        "tracks `stateful`; the two differ only under memory pressure, where `stateful` keeps sessions pinned. "
        + load_note() + "\n"
    )
    if section:
        write_section(section, key, body)
    print(body)
    return 0
