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
           "sessions": 9, "pinned": 0, "busy": 0, "pinned_gauge": 0.0, "undocumented": {},
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
    assert res["pinned"] == 0 and res["busy"] == 0 and res["pinned_gauge"] == 0
    assert res["requests"] == {"agent": 4 * 3 - 1, "race": 2, "one-shot": 10, "disconnect": 6}
    assert sum(res["ok"].values()) >= sum(res["requests"].values()) - 1  # at most the race's loser is not 200
    assert sum(res["races"].values()) == 1 and res["output_tokens"] > 0
    assert rc == 0
    md = (tmp_path / "load.md").read_text()
    for c in CLASSES:
        assert f"| {c} |" in md
    assert "integrity of pool, tiers and radix after the run: **met**" in md
