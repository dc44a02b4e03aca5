"""`deltaserve bench load`: the report and its verdicts from made-up results, the presets, and one `--quick` run
against the real model (a `deltaserve serve` subprocess on 127.0.0.1, OMP_NUM_THREADS=1)."""

from __future__ import annotations

import argparse
import json

from deltaserve_bench import load_bench
from deltaserve_bench.load_client import CLASSES, Stats


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    load_bench.add_parser(p.add_subparsers(dest="bench"))
    args = p.parse_args(["load", *argv])
    load_bench.resolve(args)
    return args


def test_quick_preset_fills_only_what_is_not_given():
    args = _args("--quick", "--agents", "2")
    assert (args.agents, args.turns, args.burst_size, args.races) == (2, 3, 10, 1)
    full = _args()
    assert (full.agents, full.turns, full.bursts, full.burst_size, full.disconnects) == (32, 35, 3, 200, 100)
    assert full.races == 32 * 5  # one every 7 turns of each agent


def test_a_409_is_documented_only_in_a_race():
    st = Stats()
    st.codes["race"].update({"200": 3, "409": 1, "429": 2})
    st.codes["agent"].update({"200": 5, "429": 1})
    assert st.undocumented() == {}
    st.codes["agent"]["409"] += 1
    st.error("one-shot", "500", "boom")
    assert st.undocumented() == {"agent": {"409": 1}, "one-shot": {"500": 1}}


def _result(**kw):
    res = {"context": 8192, "tool_call_turns": 2, "wall_s": 10.0, "output_tokens": 500,
           "requests": {c: 4 for c in CLASSES}, "ok": {c: 4 for c in CLASSES},
           "codes": {c: {"200": 4} for c in CLASSES},
           "latency_ms": {c: {"p50": 100.0, "p99": 300.0} for c in CLASSES},
           "rss_before_mib": 1000.0, "rss_peak_mib": 1500.0, "rss_after_mib": 1050.0,
           "integrity": {"ok": True, "error": None, "running": 0, "waiting": 0},
           "sessions": 9, "pinned": 0, "busy": 0, "pinned_gauge_idle": 3.0, "pinned_gauge": 0.0, "step_status": 200,
           "undocumented": {},
           "races": {"one 409": 1}, "errors": []}
    res.update(kw)
    return res


def test_report_rows_and_verdicts():
    args = _args("--quick")
    md = load_bench.render(args, _result())
    for c in CLASSES:
        assert f"| {c} | 4 | 4 | 0 | 0 | 0 | 100 | 300 |" in md
    assert "1.60 requests/s" in md and "50.0 output tokens/s" in md
    assert "NOT met" not in md and md.count("**met**") == 4
    bad = load_bench.render(args, _result(rss_after_mib=1200.0, pinned=1, undocumented={"agent": {"500": 1}},
                                          integrity={"ok": False, "error": "radix: leaked slot", "running": 0,
                                                     "waiting": 0}, errors=["agent: 500: boom"]))
    assert bad.count("**NOT met**") == 4 and "+20.0%" in bad and "radix: leaked slot" in bad
    assert "agent: 500: boom" in bad


def test_quick_run_against_the_served_model(tmp_path, smollm_dir, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = _args("--quick", "--threads", "1", "--write", str(tmp_path), "--json", str(tmp_path / "load.json"),
                 "--log-dir", str(tmp_path / "logs"))
    rc = load_bench.run(args)
    res = json.loads((tmp_path / "load.json").read_text())
    assert res["undocumented"] == {} and res["errors"] == [], res["errors"]
    assert res["integrity"]["ok"] is True, res["integrity"]
    assert res["pinned"] == 0 and res["busy"] == 0 and res["pinned_gauge"] == 0 and res["step_status"] == 200
    assert res["requests"] == {"agent": 4 * 3 - 1, "race": 2, "one-shot": 10, "disconnect": 6}
    assert sum(res["ok"].values()) >= sum(res["requests"].values()) - 1  # at most the race's loser is not 200
    assert sum(res["races"].values()) == 1 and res["output_tokens"] > 0
    assert rc == 0
    md = (tmp_path / "load.md").read_text()
    for c in CLASSES:
        assert f"| {c} |" in md
    assert "integrity of pool, tiers and radix after the run: **met**" in md


class _Tok:
    """A stand-in tokenizer: one token a word."""

    def encode(self, text):
        return argparse.Namespace(ids=text.split())

    def decode(self, ids):
        return " ".join(ids)


def test_client_counts_retries_races_and_errors_against_a_fake_server():
    """The client's accounting, on a scripted transport: the first one-shot answers are 429 + Retry-After (retried),
    a second turn on a busy session is 409 session_busy, one agent turn is a 500 (an undocumented status)."""
    import asyncio

    import httpx

    from deltaserve_bench.load_client import Load

    busy: set[str] = set()
    seen = {"one-shot": 0}

    async def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        sid = body.get("session_id")
        if body.get("stream"):
            async def chunks():
                for _ in range(40):
                    yield b'data: {"choices": []}\n\n'

            return httpx.Response(200, content=chunks(), headers={"content-type": "text/event-stream"})
        if sid is None:
            seen["one-shot"] += 1
            if seen["one-shot"] <= 3:
                return httpx.Response(429, headers={"Retry-After": "0"}, json={"error": {"code": "server_overloaded"}})
        else:
            if sid in busy:
                return httpx.Response(409, json={"error": {"code": "session_busy"}})
            if sid == "agent-2" and len(body["messages"]) == 4:  # its 2nd turn
                return httpx.Response(500, json={"error": {"code": "server_error"}})
            busy.add(sid)
            await asyncio.sleep(0.01)
            busy.discard(sid)
        return httpx.Response(200, json={"choices": [{"message": {"role": "assistant", "content": "ok"}}],
                                         "usage": {"prompt_tokens": 50, "completion_tokens": 3}})

    args = _args("--quick", "--agents", "3", "--turns", "4", "--races", "2", "--session-ttl", "0",
                 "--bursts", "1", "--burst-size", "5", "--disconnects", "2")
    load = Load(args, "http://fake", 8192, _Tok())
    load.races = {(0, 1), (1, 3)}

    async def main():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
            await asyncio.gather(*[load.agent(http, i) for i in range(3)], load.burst(http, 0),
                                 *[load.disconnect(http, k) for k in range(2)])

    asyncio.run(main())
    st = load.stats
    assert st.codes["one-shot"] == {"429": 3, "200": 5} and st.ok["one-shot"] == 5
    assert st.codes["disconnect"] == {"200": 2}
    assert load.race_outcomes == {"one 409": 2} and st.codes["race"] == {"200": 2, "409": 2}
    assert st.undocumented() == {"agent": {"500": 1}}
    # agent 2 stopped at its 2nd turn; its 2 turns left were released, so the burst's gate (6 of 12) opened
    assert st.requests["agent"] == 3 * 4 - 2 - 2 and load.done == load.total
