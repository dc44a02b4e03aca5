"""`deltaserve bench load`: a load-and-faults run against a real `deltaserve serve` (127.0.0.1), then its health.

The server is a subprocess on a free port, with a random `--admin-key` (for `GET /v1/debug/integrity`), a short
`--session-ttl` and a `--max-waiting` cap (so overload is answered 429 + Retry-After). One asyncio httpx client
drives, at the same time:
  agent       `--agents` agents x `--turns` turns: chat completions with 3 function tools and a session_id, the
              full history resent each turn, then a simulated tool result (a `tool` message answering the call when
              the model made one, else a user message; 70-180 tokens); every 3rd turn forces a call
              (tool_choice "required"). A quarter of the agents sleep past the TTL once, mid-workflow.
  one-shot    `--bursts` bursts of `--burst-size` session-less requests at once, spread over the run.
  disconnect  `--disconnects` streaming clients (sessions of their own) that read a random number of chunks and
              close the connection, spread over the run.
  race        `--races` agent turns sent twice at once on the agent's session: one answer may be 409
              session_busy, or both 200 when the first finished before the second was admitted.
Documented statuses: 200; 409 in a race; 429 with Retry-After (waited, then retried; the latency of a request
includes its retries). Anything else, a transport error included, is an error. After the load the client waits
out the TTLs and checks: no session pinned or busy, `deltaserve_pinned_sessions` 0, the integrity check of pool,
tiers and radix ok, and the server's RSS (VmRSS from /proc) against its level after the warm-up. Exit status 1
when a status was undocumented, integrity failed or a pin outlived its TTL (RSS is reported, not enforced).
The client's jobs and counters are in `load_client`; here: the command, the server, the report.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
import tempfile
from pathlib import Path
from typing import Any

from deltaserve_bench.agents_targets import Target, free_port, hf_dir
from deltaserve_bench.common import invoked_command, load_note, md_table, report_head, require
from deltaserve_bench.load_client import CLASSES, Load, after_ttl, pct, rss_mib, warm_up
from deltaserve_bench.sections import add_write_argument, publish

# the full configuration; --quick's is small enough for a test (about a minute on 2 cores)
FULL = dict(agents=32, turns=35, bursts=3, burst_size=200, disconnects=100, races=None, session_ttl=20.0,
            max_waiting=128)
QUICK = dict(agents=4, turns=3, bursts=1, burst_size=10, disconnects=6, races=1, session_ttl=3.0, max_waiting=4)


def add_parser(sub) -> None:
    p = sub.add_parser("load", help="agents, bursts, disconnects and races at once against a served model; then "
                                    "integrity, pins and RSS")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--quick", action="store_true", help="the small preset of the tests (explicit flags still win)")
    for name, kind, what in (("agents", int, "concurrent agents"), ("turns", int, "turns per agent"),
                             ("bursts", int, "bursts of one-shot requests"), ("burst-size", int, "requests a burst"),
                             ("disconnects", int, "streaming clients that disconnect mid-stream"),
                             ("races", int, "agent turns sent twice at once"),
                             ("session-ttl", float, "the server's --session-ttl in seconds"),
                             ("max-waiting", int, "the server's --max-waiting (beyond it: 429)")):
        key = name.replace("-", "_")
        p.add_argument(f"--{name}", type=kind, default=None,
                       help=f"{what} (default {FULL[key] or 'agents x (turns // 7)'}, --quick {QUICK[key]})")
    p.add_argument("--max-tokens", type=int, default=24, help="output tokens of an agent turn")
    p.add_argument("--kv-cache-gb", type=float, default=None, help="the server's pool (default: the server's)")
    p.add_argument("--kv-offload-gb", type=float, default=0.0, help="the server's host-memory KV tier")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the server")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take, its retries included")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-dir", default=None, help="the server's log (default: a temporary directory)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the raw results here")
    add_write_argument(p, "load")
    p.set_defaults(func=run)


def resolve(args) -> None:
    """Fill the preset's values into the options left unset (mutates `args`)."""
    preset = QUICK if args.quick else FULL
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.races is None:
        args.races = args.agents * (args.turns // 7)


def measure(args) -> dict[str, Any]:
    """Start the server, warm it up, run the load, wait out the TTLs, check; the raw results."""
    import httpx
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(hf_dir(args.model) / "tokenizer.json"))
    admin = secrets.token_hex(16)
    port = free_port()
    cmd = [sys.executable, "-m", "deltaserve.cli", "serve", "--model", args.model, "--dtype", args.dtype,
           "--host", "127.0.0.1", "--port", str(port), "--admin-key", admin, "--session-ttl", str(args.session_ttl),
           "--max-waiting", str(args.max_waiting), "--kv-offload-gb", str(args.kv_offload_gb),
           "--log-level", "warning", "--stats-interval", "0"]
    if args.kv_cache_gb is not None:
        cmd += ["--kv-cache-gb", str(args.kv_cache_gb)]
    # no API key (an empty $DELTASERVE_API_KEY counts as unset): sessions are per key, and one owner must see all
    env = {"OMP_NUM_THREADS": str(args.threads), "DELTASERVE_API_KEY": ""}
    server = Target("deltaserve", cmd, env=env, port=port, model_id=args.model)
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="deltaserve-load-"))
    print(f"[load] starting the server (log {log_dir / 'deltaserve.log'})", file=sys.stderr, flush=True)
    server.start(log_dir, timeout=300)
    try:
        print(f"[load] healthy after {server.start_s:.1f} s; warming up", file=sys.stderr, flush=True)
        url, pid = server.base_url, server.proc.pid

        async def main() -> tuple[dict[str, Any], Load]:
            async with httpx.AsyncClient(timeout=args.timeout) as http:
                context = (await http.get(url + "/v1/models")).json()["data"][0]["max_model_len"]
                await warm_up(http, url, args.model)
                before = rss_mib(pid)
                print(f"[load] load: {args.agents} agents x {args.turns} turns ({args.races} raced), "
                      f"{args.bursts} x {args.burst_size} one-shot, {args.disconnects} disconnects",
                      file=sys.stderr, flush=True)
                load = Load(args, url, context, tok)
                res = await load.drive(pid)
                print(f"[load] load done in {res['wall_s']:.1f} s; waiting out the TTL ({args.session_ttl:g} s + 2)",
                      file=sys.stderr, flush=True)
                await asyncio.sleep(args.session_ttl + 2)
                after = await after_ttl(http, url, admin, args.model)
                res.update(after, context=context, rss_before_mib=before, rss_after_mib=rss_mib(pid))
                return res, load

        res, load = asyncio.run(main())
    except BaseException:
        print(server.tail(), file=sys.stderr)
        raise
    finally:
        server.stop()
    st = load.stats
    res.update(server_command=" ".join(c if c != admin else "KEY" for c in cmd), startup_s=server.start_s,
               requests=dict(st.requests), ok=dict(st.ok), codes={k: dict(v) for k, v in st.codes.items()},
               latency_ms={c: {"p50": pct(v, .5) * 1e3, "p99": pct(v, .99) * 1e3} for c, v in st.latency.items()},
               output_tokens=st.tokens, tool_call_turns=st.tool_calls, errors=st.errors,
               undocumented=st.undocumented(), races=dict(load.race_outcomes))
    return res


def _unpinned(res: dict[str, Any]) -> bool:
    return res["pinned"] == 0 and res["busy"] == 0 and res["pinned_gauge"] == 0 and res["step_status"] == 200


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def render(args, res: dict[str, Any]) -> str:
    rows = []
    for c in CLASSES:
        codes = res["codes"][c]
        other = sum(v for k, v in codes.items() if k not in ("200", "409", "429"))
        rows.append([c, res["requests"].get(c, 0), res["ok"].get(c, 0), codes.get("409", 0), codes.get("429", 0),
                     other, f"{res['latency_ms'][c]['p50']:.0f}", f"{res['latency_ms'][c]['p99']:.0f}"])
    served = sum(res["ok"].values())
    before, after, peak = res["rss_before_mib"], res["rss_after_mib"], res["rss_peak_mib"]
    integ = res["integrity"]
    cmd = invoked_command("load", f"deltaserve bench load --model {args.model}" + (" --quick" if args.quick else ""))
    body = report_head(f"Load and faults: {args.model} {args.dtype}, {args.agents} agents x {args.turns} turns", cmd)
    body += (f"Server: `--session-ttl {args.session_ttl:g} --max-waiting {args.max_waiting}"
             f"{f' --kv-cache-gb {args.kv_cache_gb:g}' if args.kv_cache_gb is not None else ''}"
             f" --kv-offload-gb {args.kv_offload_gb:g}`, OMP_NUM_THREADS={args.threads}, context {res['context']}. "
             f"Concurrently: {args.agents} agents x {args.turns} turns (3 tools, max_tokens {args.max_tokens}, "
             f"{args.agents // 4} sleeping past the TTL once; {res['tool_call_turns']} turns answered with a tool "
             f"call), {args.bursts} bursts of {args.burst_size} one-shot requests, {args.disconnects} streams "
             f"dropped mid-stream, {args.races} raced turns. Latency: sent to answered, 429 waits and retries "
             f"included (disconnect: sent to dropped); ok = requests that ended 200; 409 and 429 count "
             f"responses.\n\n")
    body += md_table(["class", "requests", "ok", "409", "429", "other errors", "p50 ms", "p99 ms"], rows) + "\n\n"
    body += (f"Throughput: {served / res['wall_s']:.2f} requests/s, {res['output_tokens'] / res['wall_s']:.1f} "
             f"output tokens/s ({served} requests, {res['output_tokens']} output tokens, disconnects' not counted) "
             f"over {res['wall_s']:.1f} s. RSS of the server: {before:.0f} MiB after the warm-up, peak "
             f"{peak:.0f} MiB under load, {after:.0f} MiB after the TTLs.\n\n")
    race = res["races"]
    checks = [
        f"- only documented statuses (200, 409 session_busy in races, 429 with Retry-After): "
        f"**{_verdict(not res['undocumented'])}**" + (f" ({res['undocumented']})" if res["undocumented"] else ""),
        f"- races: {sum(race.values())}: {race.get('one 409', 0)} answered 409 session_busy, "
        f"{race.get('both 200', 0)} served twice (the first had finished), {race.get('failed', 0)} failed",
        f"- integrity of pool, tiers and radix after the run: **{_verdict(integ.get('ok') is True)}**"
        + (f" ({integ.get('error')})" if not integ.get("ok") else "")
        + f"; running {integ.get('running')}, waiting {integ.get('waiting')}",
        f"- no session pinned or busy after the TTLs: **{_verdict(_unpinned(res))}** "
        f"({res['pinned']} pinned, {res['busy']} busy of {res['sessions']} sessions in GET /v1/sessions; "
        f"deltaserve_pinned_sessions {res['pinned_gauge_idle']:g} while idle, {res['pinned_gauge']:g} after one "
        f"more step: pins expire lazily, at the engine's next step)",
        f"- RSS after within 10% of before: **{_verdict(after <= 1.1 * before)}** "
        f"({(after / before - 1) * 100:+.1f}%)"]
    body += "\n".join(checks) + "\n"
    if res["errors"]:
        body += "\nFirst errors:\n\n" + "\n".join(f"- `{e}`" for e in res["errors"][:5]) + "\n"
    return body + "\n" + load_note() + "\n"


def run(args) -> int:
    require("httpx", "tokenizers", what="deltaserve bench load")
    resolve(args)
    res = measure(args)
    publish(args.write, "load", render(args, res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    passed = not res["undocumented"] and res["integrity"].get("ok") is True and _unpinned(res)
    return 0 if passed else 1
