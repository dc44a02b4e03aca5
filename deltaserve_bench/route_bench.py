"""`deltaserve bench route`: session-affine + prefix-aware routing vs round-robin and least-loaded, simulated.

For every point of the grid (`--replicas` x `--agents`) one seeded workload is generated and replayed under each
policy by the discrete-event simulation in `route_sim` (no model, no engine: seconds of CPU):
  affine        `deltaserve.cluster.routing.Router`: a session's turns go to the replica holding it; a new
                session to the replica caching the longest prefix of its system prompt, within the load bound;
  round_robin   request i to replica i mod R;
  least_loaded  the replica with the fewest queued + running requests (ties rotate).
Reported per policy: prompt-cache hit rate, recomputed prompt tokens, p50/p99 turn latency, simulated makespan,
mean engine busy fraction, and the router's decisions. The goals are checked at 64 replicas x 1,000 agents (or
the largest point of the grid, said so).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

from deltaserve_bench.common import invoked_command, load_note, md_table, pyplot, report_head
from deltaserve_bench.route_sim import MEASURED_PREFILL, POLICIES, SimConfig, make_workload, simulate
from deltaserve_bench.sections import IMG_HELP, add_write_argument, plot_dir, rel_link, section_path, write_section

QUICK = {"replicas": "4,8", "agents": "16,64"}
GOAL_POINT = (64, 1000)
_D = SimConfig()


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def _curve(s: str) -> tuple:
    """"512:3509,2048:1677" -> ((512, 3509.0), (2048, 1677.0))."""
    try:
        return tuple((int(a), float(b)) for a, b in (x.split(":") for x in s.split(",") if x.strip()))
    except ValueError:
        raise SystemExit(f"--prefill-curve {s!r}: expected CONTEXT:TOK_PER_S,... e.g. 512:3509,2048:1677")


def add_parser(sub) -> None:
    p = sub.add_parser("route", help="simulated routing across replicas: session-affine + prefix vs round-robin "
                                     "and least-loaded (cache hits, recomputed tokens, p99 turn latency)")
    p.add_argument("--replicas", default="8,16,64", help="comma-separated replica counts")
    p.add_argument("--agents", default="100,1000", help="comma-separated agent counts")
    p.add_argument("--quick", action="store_true",
                   help=f"small grid for tests (replicas {QUICK['replicas']}, agents {QUICK['agents']})")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--turns", type=int, default=_D.turns)
    p.add_argument("--roles", type=int, default=_D.roles, help="roles; agents of a role share one system prompt")
    p.add_argument("--system-tokens", default=f"{_D.system_min}-{_D.system_max}", help="system prompt + tools, MIN-MAX")
    p.add_argument("--tool-median", type=float, default=_D.tool_median, help="tool result tokens, lognormal median")
    p.add_argument("--think-s", type=float, default=_D.think_s, help="think/tool pause between turns, lognormal median")
    p.add_argument("--stagger-s", type=float, default=_D.stagger_s, help="agents start uniformly over this window")
    p.add_argument("--kv-tokens", type=int, default=_D.kv_tokens, help="KV budget per replica, tokens")
    p.add_argument("--max-running", type=int, default=_D.max_running)
    p.add_argument("--prefill-curve", default=",".join(f"{a}:{b:g}" for a, b in MEASURED_PREFILL),
                   help="measured prefill tok/s by prompt length, CONTEXT:RATE,... (default: this machine)")
    p.add_argument("--prefill-rate", type=float, default=None, help="a flat prefill tok/s instead of the curve")
    p.add_argument("--decode-rate", type=float, default=_D.decode_rate, help="single-stream decode tok/s")
    p.add_argument("--decode-batch-slope", type=float, default=_D.decode_batch_slope,
                   help="decode step of a batch of B costs (1 + slope * (B - 1)) single-stream steps")
    p.add_argument("--epsilon", type=float, default=_D.epsilon, help="the router's bounded-load slack")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench_out/route", help="folder for the PNG plot and raw JSON")
    p.add_argument("--img-dir", default=None, help=IMG_HELP)
    add_write_argument(p, "route")
    p.set_defaults(func=run)


def config(args) -> SimConfig:
    lo, _, hi = args.system_tokens.partition("-")
    return SimConfig(turns=args.turns, roles=args.roles, system_min=int(lo), system_max=int(hi or lo),
                     tool_median=args.tool_median, think_s=args.think_s, stagger_s=args.stagger_s,
                     kv_tokens=args.kv_tokens, max_running=args.max_running,
                     prefill_curve=_curve(args.prefill_curve), prefill_rate=args.prefill_rate,
                     decode_rate=args.decode_rate, decode_batch_slope=args.decode_batch_slope,
                     epsilon=args.epsilon, seed=args.seed)


def run_grid(args) -> tuple[SimConfig, list[dict]]:
    """Every (replicas, agents) point of the grid under every policy, one workload per point."""
    base = config(args)
    reps = _ints(QUICK["replicas"] if args.quick else args.replicas)
    agents = _ints(QUICK["agents"] if args.quick else args.agents)
    policies = [p for p in args.policies.split(",") if p]
    results = []
    for a in agents:
        for r in reps:
            c = replace(base, replicas=r, agents=a)
            w = make_workload(c)
            results += [simulate(c, w, p) for p in policies]
    return base, results


def goals(results: list[dict]) -> tuple[list[str], bool]:
    """The issue's goals, checked against round-robin at 64 x 1,000 (else the largest point); (lines, all met)."""
    points = sorted({(r["replicas"], r["agents"]) for r in results}, key=lambda p: (p[0] * p[1], p))
    point = GOAL_POINT if GOAL_POINT in points else points[-1]
    at = {r["policy"]: r for r in results if (r["replicas"], r["agents"]) == point}
    if "affine" not in at or "round_robin" not in at:
        return ["- goals need the affine and round_robin policies"], False
    aff, rr = at["affine"], at["round_robin"]
    where = f"{point[0]} replicas x {point[1]:,} agents" + ("" if point == GOAL_POINT else
                                                           f" (the grid's largest point; the goals name "
                                                           f"{GOAL_POINT[0]} x {GOAL_POINT[1]:,})")
    rec = aff["recomputed_tokens"] / max(1, rr["recomputed_tokens"])
    p99 = aff["p99_s"] / rr["p99_s"]
    ok1, ok2 = rec <= 0.1, p99 <= 1 / 3
    return [f"Goals at {where}, affine vs round-robin:",
            f"- recomputed prompt tokens ≤ 1/10: **{'met' if ok1 else 'NOT met'}** ({rec:.3f}: "
            f"{aff['recomputed_tokens']:,} vs {rr['recomputed_tokens']:,})",
            f"- p99 turn latency ≤ 1/3: **{'met' if ok2 else 'NOT met'}** ({p99:.3f}: {aff['p99_s']:.2f} s vs "
            f"{rr['p99_s']:.2f} s)"], ok1 and ok2


def _max_busy(r: dict) -> float:
    return max(x["busy_s"] for x in r["per_replica"]) / r["makespan_s"] if r["makespan_s"] else 0.0


def _plot(results: list[dict], png: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"affine": "tab:green", "round_robin": "tab:red", "least_loaded": "tab:blue"}
    styles = ["-", "--", ":", "-."]
    agents = sorted({r["agents"] for r in results})
    for ax, key, label in ((axes[0], "p99_s", "p99 turn latency (s)"),
                           (axes[1], "recomputed_tokens", "recomputed prompt tokens")):
        for pol in dict.fromkeys(r["policy"] for r in results):
            for i, a in enumerate(agents):
                pts = sorted((r["replicas"], r[key]) for r in results if r["policy"] == pol and r["agents"] == a)
                ax.plot([x for x, _ in pts], [y for _, y in pts], styles[i % len(styles)], marker="o",
                        color=colors.get(pol), label=f"{pol}, {a:,} agents")
        ax.set_xscale("log", base=2)
        xs = sorted({r["replicas"] for r in results})
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.tick_params(axis="x", which="minor", bottom=False, labelbottom=False)
        ax.set_yscale("log")
        ax.set_xlabel("replicas")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7, handlelength=3.5)
    fig.suptitle("Simulated routing: session-affine + prefix vs round-robin and least-loaded")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def run(args) -> int:
    t0 = time.perf_counter()
    base, results = run_grid(args)
    wall = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "route.json").write_text(json.dumps({"config": asdict(base), "results": results}, indent=1))
    png = out / "route.png"
    _plot(results, png)
    section = section_path(args.write, "route") if args.write else None
    link = png
    img = plot_dir(args.write, args.img_dir) if section else None
    if img is not None:
        link = img / png.name
        link.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, link)

    rows = []
    for r in results:
        d = r["decisions"]
        rows.append([r["replicas"], f"{r['agents']:,}", r["policy"], f"{100 * r['hit_rate']:.1f}",
                     f"{r['recomputed_tokens']:,}", f"{r['p50_s']:.2f}", f"{r['p99_s']:.2f}",
                     f"{r['makespan_s']:,.0f}", f"{100 * r['busy']:.0f} / {100 * _max_busy(r):.0f}",
                     "/".join(str(d[k]) for k in ("affine", "prefix", "least_loaded", "fallback")) if d else "-"])
    table = md_table(["replicas", "agents", "policy", "cache hit %", "recomputed prompt tok", "p50 turn s",
                      "p99 turn s", "wall (makespan) s", "busy % mean / max",
                      "affine/prefix/least-loaded/fallback"], rows)
    goal_lines, _ = goals(results)
    c = base
    curve = (f"a flat {c.prefill_rate:,.0f} tok/s" if c.prefill_rate else
             "T(P) - T(hit), T piecewise linear through (L, L / rate(L)) at " +
             ", ".join(f"{L:,}: {r:,.0f} tok/s" for L, r in c.prefill_curve))
    measured = (c.prefill_curve == MEASURED_PREFILL and not c.prefill_rate and c.decode_rate == _D.decode_rate)
    cmd = invoked_command("route", "deltaserve bench route" + (" --quick" if args.quick else ""))
    body = (
        report_head("Routing across replicas (simulated): session-affine + prefix vs round-robin and least-loaded",
                    cmd)
        + f"Workload (seed {c.seed}): {c.roles} roles, each with a shared system prompt + tools of "
        f"{c.system_min:,}-{c.system_max:,} tokens; every agent runs {c.turns} turns (turn 1: the system prompt "
        f"and a task of {c.task_min}-{c.task_max} tokens; then the previous output plus a tool result, lognormal "
        f"median {c.tool_median:.0f} tokens), generating {c.out_min}-{c.out_max} tokens a turn, with a think/tool "
        f"pause (lognormal median {c.think_s:g} s) between turns; agents start over {c.stagger_s:g} s and wait for "
        f"each answer (closed loop). Replica: KV budget {c.kv_tokens:,} tokens (LRU of whole sessions and role "
        f"prefixes), continuous batching up to {c.max_running} requests, one whole prefill per iteration.\n\n"
        + f"Cost model: prefill {curve}; decode {c.decode_rate:g} tok/s single-stream, a batch of B costing "
        f"(1 + {c.decode_batch_slope:g} (B - 1)) steps. "
        + ("The prefill rates and the decode rate are `deltaserve bench engine` on this machine, SmolLM2-135M "
           "bf16 (prefill 3,509 / 1,677 / 922 tok/s at 512 / 2,048 / 6,144 tokens, decode ~52 tok/s, rounded "
           "down to 50; `--prefill-rate 1700` gives a flat prefill model instead); the batch slope is an "
           "assumption, not a measurement. " if measured else
           "These rates were set on the command line. ")
        + "Recomputed = prompt tokens not found in the replica's cache when the prefill starts; latency = the "
        "request reaching the router to its last token; makespan = the simulated time until the last agent is "
        "done; busy = the fraction of that time an engine was working, mean and busiest replica (a replica that falls "
        "behind under round-robin stays behind: its queue outlives its cache, so it recomputes more; per-replica "
        "numbers are in route.json).\n\n"
        + table + "\n\n" + "\n".join(goal_lines) + "\n\n"
        + f"![p99 turn latency and recomputed tokens vs replicas]"
          f"({rel_link(link, section) if section else link.as_posix()})\n\n"
        + f"Simulated in {wall:.1f} s of CPU time (pure Python). " + load_note() + "\n"
    )
    if section:
        write_section(section, "route", body)
    print(body)
    return 0
