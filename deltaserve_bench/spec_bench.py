"""`deltaserve bench spec`: speculation on tool-calling agent loops, on vs off, and vs HF prompt lookup.

Each agent runs a loop with the model's own chat template and tools
(`tokenizer.render_chat(messages, tools)`, turns extended by `render_turn`):
generate, parse the reply with `parse_tool_calls`, append a synthetic tool
result, continue. The loop runs first with speculation off, then with it on
(greedy, same prompts); the outputs must be identical and the run fails if
they are not. Decode time of a request = finish - first token (prefill
excluded). Each request carries its tools as `SamplingParams.tool_drafts`,
as the server sets them for every request with tools, so speculation is
history lookup + schema drafts, what a served request gets
(`--no-tool-drafts`: history lookup only, to compare). HF transformers runs
the same prompts with plain `generate` and with
`generate(prompt_lookup_num_tokens=K)`; its decode time is the generate
time minus a 1-token generate of the same prompt.
"""

from __future__ import annotations

import gc
import json
import sys
import time

import torch

from deltaserve_bench.common import invoked_command, load_note, md_table, report_head
from deltaserve_bench.sections import add_write_argument, publish

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "city name"},
                                                        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                       "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "read_file", "description": "Read a file of the repository.",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}},
    {"type": "function", "function": {
        "name": "write_file", "description": "Write a file of the repository.",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}, "content": {"type": "string"}},
                       "required": ["path", "content"]}}},
]
TOOL_NAMES = {t["function"]["name"] for t in TOOLS}
TASKS = [
    "Read src/app/config.py, then write src/app/config.py with DEBUG set to False. Use the tools.",
    "Get the weather in Paris, Berlin and Madrid in celsius, one call each. Use the tools.",
    "Read README.md and tests/test_app.py, then write tests/test_app.py with one more test. Use the tools.",
    "Read src/app/models.py and write src/app/models.py with a new User class. Use the tools.",
]


def add_parser(sub) -> None:
    p = sub.add_parser("spec", help="prompt-lookup speculation on tool-calling loops: on vs off, vs HF prompt lookup")
    p.add_argument("--model", default="qwen2.5-coder-0.5b")
    p.add_argument("--agents", type=int, default=2)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--k", type=int, default=8, help="HF prompt_lookup_num_tokens (deltaserve drafts up to 8, adaptive)")
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--no-tool-drafts", action="store_true",
                   help="agents: requests without SamplingParams.tool_drafts (history lookup only, no schema drafts; "
                        "--write puts it in section spec-MODEL-no-tool-drafts)")
    p.add_argument("--workload", choices=("agents", "first-call"), default="agents",
                   help="agents: multi-turn agent loops (below); first-call: single-turn requests whose first tool "
                        "call copies a JSON record, off vs history lookup vs + schema drafts (spec_first_call.py)")
    p.add_argument("--reps", type=int, default=2, help="first-call: repetitions of the interleaved requests")
    add_write_argument(p, "spec-MODEL")
    p.set_defaults(func=run)


def _tool_result(name: str, args: str, n: int) -> str:
    try:
        a = json.loads(args)
    except ValueError:
        a = {}
    if name == "get_weather":
        return json.dumps({"city": a.get("city", "Paris"), "temp": 11 + n, "unit": a.get("unit", "celsius"), "sky": "rain"})
    if name == "read_file":
        path = a.get("path", "src/app/config.py")
        return json.dumps({"path": path, "content": f"# {path}\nDEBUG = True\nNAME = 'app'\n\ndef load():\n    return NAME\n"})
    return json.dumps({"path": a.get("path", ""), "written": True})


def _agent_loop(eng, agent: int, turns: int, max_tokens: int, tool_counter: list[int], tool_drafts: bool = True):
    """-> list of per-turn dicts: prompt, output, decode_s, decode_tokens, drafted, accepted, steps.

    `tool_drafts`: each request carries the tools as `SamplingParams.tool_drafts`, as the server's do."""
    from deltaserve.engine.chat import Transcript, render_turn, reply_message
    from deltaserve.engine.sampling import SamplingParams
    from deltaserve.server.tool_parser import parse_tool_calls
    from deltaserve.spec.schema_drafts import ToolDrafts

    drafts = ToolDrafts.from_tools(TOOLS) if tool_drafts else None

    tok = eng.tokenizer
    sid = f"agent{agent}"
    eng.open_session(sid)
    messages = [{"role": "system", "content": "You are a coding agent. Act only through tool calls."},
                {"role": "user", "content": TASKS[agent % len(TASKS)]}]
    prior = None
    res = []
    for turn in range(turns):
        prompt = render_turn(tok, messages, TOOLS, prior).tokens
        seq = eng.add_request(prompt, SamplingParams(max_tokens=max_tokens, tool_drafts=drafts), session_id=sid)
        eng.run_until_done([seq])
        out = seq.output_ids
        s = seq.stats
        parsed = parse_tool_calls(tok.decode(out), TOOL_NAMES)
        res.append({"prompt": prompt, "output": out, "decode_s": s.finish_time - s.first_token_time,
                    "decode_tokens": len(out) - 1, "drafted": s.drafted_tokens, "accepted": s.accepted_tokens,
                    "verify_steps": s.verify_steps, "calls": len(parsed.tool_calls)})
        calls = [{"id": f"call_{agent}_{turn}_{i}", "type": "function",
                  "function": {"name": c.name, "arguments": c.arguments}} for i, c in enumerate(parsed.tool_calls)]
        messages.append(reply_message(parsed.content, calls or None))
        prior = Transcript(messages=[dict(m) for m in messages], tools=TOOLS, tokens=prompt + out)
        for c in calls:
            tool_counter[0] += 1
            messages.append({"role": "tool", "tool_call_id": c["id"], "name": c["function"]["name"],
                             "content": _tool_result(c["function"]["name"], c["function"]["arguments"], tool_counter[0])})
        if not calls:
            messages.append({"role": "user", "content": "Continue with the next tool call."})
    return res


def _ours(args, speculation: bool) -> tuple[list[dict], tuple[int, int]]:
    """-> (per-turn results of all agents, (schema drafted, schema accepted) tokens)."""
    from deltaserve.engine.engine import EngineConfig, LLMEngine
    from deltaserve.engine.sampling import SamplingParams

    eng = LLMEngine.from_model(args.model, EngineConfig(dtype=getattr(torch, args.dtype), speculation=speculation,
                                                         kv_cache_bytes=1 << 30, max_batch_tokens=2048))
    eng.generate([list(range(1000, 1032))], SamplingParams(max_tokens=4))  # warm-up
    counter = [0]
    runs = [_agent_loop(eng, a, args.turns, args.max_tokens, counter, not args.no_tool_drafts)
            for a in range(args.agents)]
    sp = eng.speculator
    schema = (sp.schema_drafted, sp.schema_accepted) if sp is not None else (0, 0)
    del eng
    gc.collect()
    return [r for agent in runs for r in agent], schema


FREE_TEXT = ["Write a short poem about autumn rain in a small harbour town.",
             "Describe, in your own words, how a bicycle gear works.",
             "Tell a brief bedtime story about a curious fox."]


def _free_text(args, speculation: bool) -> float:
    """Decode tok/s on prose that rarely copies from its context (where speculation must not cost >5%)."""
    from deltaserve.engine.engine import EngineConfig, LLMEngine
    from deltaserve.engine.kv_manager import CacheMode
    from deltaserve.engine.sampling import SamplingParams

    eng = LLMEngine.from_model(args.model, EngineConfig(dtype=getattr(torch, args.dtype), speculation=speculation,
                                                         cache_mode=CacheMode.STATELESS, kv_cache_bytes=1 << 30))
    eng.generate([list(range(1000, 1032))], SamplingParams(max_tokens=4))  # warm-up
    tokens, secs = 0, 0.0
    for q in FREE_TEXT:
        seq = eng.add_request(eng.tokenizer.apply_chat([{"role": "user", "content": q}]),
                              SamplingParams(max_tokens=args.max_tokens, ignore_eos=True))
        eng.step()  # prefill + first token
        t = time.perf_counter()
        eng.run_until_done([seq])
        secs += time.perf_counter() - t
        tokens += seq.num_output - 1
    del eng
    gc.collect()
    return tokens / secs


def _hf(args, prompts: list[list[int]], new_tokens: list[int]):
    from transformers import AutoModelForCausalLM

    from deltaserve.models.loader import model_dir

    m = AutoModelForCausalLM.from_pretrained(str(model_dir(args.model)), dtype=getattr(torch, args.dtype)).eval()
    kw = dict(do_sample=False, pad_token_id=0)
    res = {"plain": [0.0, 0], "lookup": [0.0, 0], "match": 0}
    with torch.inference_mode():
        m.generate(torch.tensor([prompts[0][:32]]), max_new_tokens=2, **kw)  # warm-up
        for p, n in zip(prompts, new_tokens):
            x = torch.tensor([p])
            t = time.perf_counter()
            m.generate(x, max_new_tokens=1, **kw)
            t_first = time.perf_counter() - t
            outs = {}
            for name, extra in (("plain", {}), ("lookup", {"prompt_lookup_num_tokens": args.k})):
                t = time.perf_counter()
                o = m.generate(x, max_new_tokens=n, min_new_tokens=n, **extra, **kw)
                dt = time.perf_counter() - t - t_first
                outs[name] = o[0, len(p):].tolist()
                res[name][0] += max(dt, 1e-6)
                res[name][1] += len(outs[name]) - 1
            res["match"] += outs["plain"] == outs["lookup"]
    del m
    gc.collect()
    return res


def run(args) -> int:
    if args.workload == "first-call":
        from deltaserve_bench.spec_first_call import run_first_call

        return run_first_call(args)
    off, _ = _ours(args, speculation=False)
    on, (schema_drafted, schema_accepted) = _ours(args, speculation=True)
    same = all(a["output"] == b["output"] and a["prompt"] == b["prompt"] for a, b in zip(off, on)) and len(off) == len(on)
    if not same:
        print("ERROR: speculative outputs differ from the non-speculative ones", file=sys.stderr)
    assert same, "greedy outputs with speculation must equal those without"

    def tps(rs):
        return sum(r["decode_tokens"] for r in rs) / sum(r["decode_s"] for r in rs)

    drafted = sum(r["drafted"] for r in on)
    accepted = sum(r["accepted"] for r in on)
    steps = sum(r["verify_steps"] for r in on)
    dec_tokens = sum(r["decode_tokens"] for r in on)
    calls = sum(r["calls"] for r in on)
    tps_off, tps_on = tps(off), tps(on)
    mode = "history lookup (--no-tool-drafts)" if args.no_tool_drafts else "history lookup + schema drafts"
    rows = [["deltaserve", "speculation off", tps_off, "1.00x"],
            ["deltaserve", f"speculation: {mode}", tps_on, f"{tps_on / tps_off:.2f}x"]]
    hf_note = ""
    if not args.no_hf:
        hf = _hf(args, [r["prompt"] for r in off], [len(r["output"]) for r in off])
        hp, hl = hf["plain"][1] / hf["plain"][0], hf["lookup"][1] / hf["lookup"][0]
        rows += [["HF transformers", "generate", hp, f"{hp / tps_off:.2f}x"],
                 ["HF transformers", f"generate(prompt_lookup_num_tokens={args.k})", hl, f"{hl / tps_off:.2f}x"]]
        hf_note = (f"HF prompt lookup vs plain HF: {hl / hp:.2f}x; HF lookup output equal to plain HF on "
                   f"{hf['match']}/{len(off)} requests. HF recomputes each prompt (no session cache); its decode time "
                   "is generate time minus a 1-token generate of the same prompt, so it is noisier than ours.\n")
    free_off, free_on = _free_text(args, False), _free_text(args, True)
    free_ratio = free_on / free_off
    table = md_table(["engine", "mode", "decode tok/s", "vs deltaserve off"], rows)
    speedup = tps_on / tps_off
    cmd = invoked_command("spec", f"deltaserve bench spec --model {args.model}"
                                  f"{' --no-tool-drafts' if args.no_tool_drafts else ''}")
    body = (
        report_head(f"Speculation: {mode} on tool-calling agent loops ({args.model}, {args.dtype})", cmd) +
        f"{args.agents} agents x {args.turns} turns, tools rendered by the model's chat template, replies parsed with "
        f"`parse_tool_calls` ({calls} tool calls in {len(on)} replies), synthetic tool results appended; greedy, "
        f"max_tokens {args.max_tokens}, sessions (stateful). Same prompts with speculation off and on: "
        f"**outputs identical: {'yes' if same else 'NO'}** ({len(on)} replies, {dec_tokens} decode tokens).\n\n"
        + table + "\n\n"
        f"- acceptance rate: **{accepted / drafted if drafted else 0:.0%}** ({accepted} of {drafted} drafted tokens; "
        f"schema drafts: {schema_accepted} of {schema_drafted}"
        f"{' = ' + format(schema_accepted / schema_drafted, '.0%') if schema_drafted else ''}"
        f"{', off: --no-tool-drafts' if args.no_tool_drafts else ''})\n"
        f"- accepted tokens per verify step: **{accepted / steps if steps else 0:.2f}** ({steps} verify steps; "
        f"tokens per decode step incl. the bonus token: {dec_tokens / max(1, dec_tokens - accepted):.2f})\n"
        f"- decode speedup from speculation: **{speedup:.2f}x** (target ≥ 2x: **{'met' if speedup >= 2 else 'NOT met'}**)\n"
        f"- prose that rarely copies from its context ({len(FREE_TEXT)} prompts, {args.max_tokens} tokens, ignore_eos): "
        f"{free_off:.2f} tok/s off, {free_on:.2f} tok/s on = **{free_ratio:.2f}x** (target ≥ 0.95x, at most 5% cost: "
        f"**{'met' if free_ratio >= 0.95 else 'NOT met'}**)\n\n"
        + hf_note +
        "Decode time = finish - first token of each request (prefill excluded), summed over requests. "
        + load_note() + "\n"
    )
    # A history-only run is a comparison: its own section, never the default one's.
    publish(args.write, f"spec-{args.model}" + ("-no-tool-drafts" if args.no_tool_drafts else ""), body)
    return 0
