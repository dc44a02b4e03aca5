"""The routing policy (`deltaserve.cluster.routing`) on a three-replica cluster, and the `deltaserve bench route`
simulation on a small grid. Pure Python: no model, no engine."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest

from deltaserve.cluster.routing import (ReplicaState, RequestInfo, RouteDecision, Router, RouterConfig, block_hashes,
                                        matched_blocks, prefix_summary)
from deltaserve_bench import route_bench
from deltaserve_bench.route_sim import POLICIES, SimConfig, make_workload, prefill_time_fn, simulate

CFG = RouterConfig(block_tokens=4, summary_blocks=8)
SYSTEM = list(range(100, 112))  # three full blocks of 4 tokens
PROMPT = SYSTEM + [7, 8, 9]  # a partial fourth block, never hashed


def cluster(loads=(0, 0, 0), summaries=None) -> dict[str, ReplicaState]:
    """Replica b caches the whole system prompt, a only its first block, c nothing."""
    if summaries is None:
        summaries = {"a": prefix_summary([SYSTEM[:4] + [1, 2, 3, 4]], CFG),
                     "b": prefix_summary([SYSTEM + [5, 5, 5, 5]], CFG),
                     "c": set()}
    return {r: ReplicaState(load, summaries[r]) for r, load in zip("abc", loads)}


def req(replicas, **kw) -> RequestInfo:
    return RequestInfo(replicas, **kw)


# ------------------------------------------------------------------ hashes
def test_block_hashes_chain_and_skip_the_partial_block():
    h = block_hashes(PROMPT, 4)
    assert len(h) == 3 and h == block_hashes(SYSTEM, 4)
    assert block_hashes(SYSTEM[:8], 4) == h[:2]  # a prefix's hashes are a prefix of the hashes
    assert block_hashes(PROMPT, 4, max_blocks=2) == h[:2]
    # the same block content behind a different parent is a different block
    assert block_hashes(SYSTEM[4:8], 4)[0] != h[1]
    assert block_hashes([0] * 4 + SYSTEM[4:8], 4)[1] != h[1]
    assert h == block_hashes(list(SYSTEM), 4)  # deterministic, not Python's salted hash
    assert matched_blocks(h, prefix_summary([SYSTEM[:8]], CFG)) == 2


def test_config_is_frozen_and_checked():
    with pytest.raises(dataclasses.FrozenInstanceError):
        CFG.epsilon = 1.0
    with pytest.raises(ValueError):
        RouterConfig(epsilon=-0.1)
    with pytest.raises(ValueError):
        Router().route(req({}))


# ------------------------------------------------------------------ decisions
def test_new_session_goes_to_the_longest_chained_match():
    r = Router(CFG)
    assert r.route(req(cluster(), session_id="s1", prompt_token_ids=PROMPT)) == RouteDecision("b", "prefix", 3)
    # the same, given the block hashes instead of the tokens
    assert r.route(req(cluster(), block_hashes=block_hashes(PROMPT, 4))) == ("b", "prefix", 3)
    # a replica holding block 2's content without block 1 before it matches nothing
    sums = {"a": set(), "b": set(block_hashes(SYSTEM[4:8], 4)), "c": prefix_summary([SYSTEM[:4]], CFG)}
    assert r.route(req(cluster(summaries=sums), prompt_token_ids=PROMPT)) == ("c", "prefix", 1)


def test_affinity_after_record_even_on_a_busy_replica():
    r = Router(CFG)
    r.record("s1", "c")
    busy = cluster(loads=(0, 0, 9))
    assert r.route(req(busy, session_id="s1", prompt_token_ids=PROMPT)) == ("c", "affine", 0)
    r.record("resp_2", "a")
    # previous_response_id is looked up first
    assert r.route(req(busy, session_id="s1", previous_response_id="resp_2")) == ("a", "affine", 0)
    # a session whose replica is not a candidate (unhealthy) is placed as a new one
    assert r.route(req({k: v for k, v in busy.items() if k != "c"}, session_id="s1",
                       prompt_token_ids=PROMPT)) == ("b", "prefix", 3)


def test_bounded_load_pushes_a_prefix_away_from_an_overloaded_replica():
    r = Router(CFG)
    # b: load 5 > 1.25 * mean (5/3) + 1 = 3.08, so the next best match, a (one block)
    assert r.route(req(cluster(loads=(0, 5, 0)), prompt_token_ids=PROMPT)) == ("a", "prefix", 1)
    # load 2 is within the bound of 1.25 * 4/3 + 1 = 2.67
    assert r.route(req(cluster(loads=(1, 2, 1)), prompt_token_ids=PROMPT)) == ("b", "prefix", 3)
    # both holders over the bound: the least loaded, as a fallback
    assert r.route(req(cluster(loads=(9, 9, 0)), prompt_token_ids=PROMPT)) == ("c", "fallback", 0)  # cap 8.5
    # the bound applies to homed sessions too: b homes 3 of 3 (cap 1.25 * 1 + 1), so a
    for s in ("x", "y", "z"):
        r.record(s, "b")
    assert r.route(req(cluster(), prompt_token_ids=PROMPT)) == ("a", "prefix", 1)
    assert r.route(req(cluster(), prompt_token_ids=PROMPT, extra={"ignored": 1})).replica == "a"


def test_least_loaded_then_fewest_sessions_then_id():
    r = Router(CFG)
    assert r.route(req(cluster(loads=(2, 1, 1)))) == ("b", "least_loaded", 0)
    r.record("s", "b")
    assert r.route(req(cluster(loads=(2, 1, 1)))) == ("c", "least_loaded", 0)
    # a prompt nobody caches, and a new session id, are no preference either
    assert r.route(req(cluster(loads=(0, 1, 1)), session_id="new", prompt_token_ids=[9] * 12)) == \
        ("a", "least_loaded", 0)
    # an unknown previous_response_id is: its state is gone
    assert r.route(req(cluster(loads=(0, 1, 1)), previous_response_id="resp_gone")) == ("a", "fallback", 0)


def test_counters_count_each_decision_kind():
    r = Router(CFG)
    r.record("s", "a")
    r.route(req(cluster(), session_id="s"))
    r.route(req(cluster(), session_id="s"))
    r.route(req(cluster(), prompt_token_ids=PROMPT))
    r.route(req(cluster(loads=(9, 9, 0)), prompt_token_ids=PROMPT))
    r.route(req(cluster()))
    assert r.counters() == {"affine": 2, "prefix": 1, "least_loaded": 1, "fallback": 1}
    r.counters()["affine"] = 0  # a copy
    assert r.counters()["affine"] == 2


def test_remove_replica_returns_its_sessions_to_rehome():
    r = Router(CFG)
    for key, rep in (("s1", "b"), ("s2", "a"), ("s3", "b")):
        r.record(key, rep)
    assert r.homed("b") == 2
    assert r.remove_replica("b") == ["s1", "s3"]
    assert r.replica_of("s1") is None and r.replica_of("s2") == "a" and r.homed("b") == 0
    assert r.route(req(cluster(), session_id="s1")).kind == "least_loaded"
    assert r.remove_replica("b") == []


def test_record_moves_forgets_replaces_and_bounds_the_table():
    r = Router(RouterConfig(max_sessions=2))
    r.record("resp_1", "a")
    r.record("resp_2", "a", replaces="resp_1")  # a Responses chain keeps one entry
    assert r.replica_of("resp_1") is None and r.homed("a") == 1
    r.record("resp_2", "b")
    assert (r.homed("a"), r.homed("b")) == (0, 1)
    r.record("s", "c")
    r.route(req(cluster(), session_id="resp_2"))  # touched: "s" is now the least recently used
    r.record("t", "c")
    assert r.replica_of("s") is None and r.replica_of("resp_2") == "b" and r.homed("c") == 1
    r.forget("t")
    r.forget("unknown")
    assert r.homed("c") == 0


# ------------------------------------------------------------------ simulation
def test_prefill_time_interpolates_the_measured_rates():
    T = prefill_time_fn(SimConfig())  # 512: 3,509, 2,048: 1,677, 6,144: 922 tok/s
    assert T(0) == 0 and T(2048) == pytest.approx(2048 / 1677) and T(6144) == pytest.approx(6144 / 922)
    assert T(1280) == pytest.approx((512 / 3509 + 2048 / 1677) / 2)
    slope = (6144 / 922 - 2048 / 1677) / 4096  # beyond the last point, the last segment's slope
    assert T(8192) - T(6144) == pytest.approx(2048 * slope)
    assert prefill_time_fn(SimConfig(prefill_rate=1700.0))(3400) == pytest.approx(2.0)


def test_one_agent_turn_costs_follow_the_cost_model():
    c = SimConfig(replicas=1, agents=1, turns=2, roles=1, prefill_rate=1000.0, decode_rate=50.0, think_s=0.0)
    w = make_workload(c)
    p1, o1 = w.first[0], w.outs[0][0]
    p2, o2 = p1 + o1 + w.tools[0][1], w.outs[0][1]
    for policy in POLICIES:
        res = simulate(c, w, policy)
        assert res["prompt_tokens"] == p1 + p2
        assert res["hit_tokens"] == p1 + o1  # turn 2 finds turn 1's whole context
        assert res["makespan_s"] == pytest.approx(w.start[0] + p1 / 1000 + (o1 - 1) / 50
                                                  + (p2 - p1 - o1) / 1000 + (o2 - 1) / 50)


def test_affine_recomputes_less_than_round_robin_with_shared_prefixes():
    c = SimConfig(replicas=4, agents=24, turns=12, roles=3)
    w = make_workload(c)
    res = {p: simulate(c, w, p) for p in POLICIES}
    for r in res.values():
        assert r["turns_done"] == 24 * 12 and 0 <= r["hit_tokens"] <= r["prompt_tokens"]
        assert sum(x["requests"] for x in r["per_replica"]) == 24 * 12
    aff, rr = res["affine"], res["round_robin"]
    assert aff["recomputed_tokens"] < rr["recomputed_tokens"] / 2
    d = aff["decisions"]
    assert sum(d.values()) == 24 * 12 and d["affine"] == 24 * 11  # every later turn finds its session
    assert d["prefix"] > 0  # agents of a role follow its system prompt


def test_quick_report(tmp_path, capsys):
    p = argparse.ArgumentParser()
    route_bench.add_parser(p.add_subparsers(dest="bench"))
    args = p.parse_args(["route", "--quick", "--out", str(tmp_path / "out"), "--write", str(tmp_path / "docs"),
                         "--img-dir", str(tmp_path / "img")])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "| replicas | agents | policy | cache hit % |" in text
    assert "Goals at 8 replicas x 64 agents (the grid's largest point" in text
    assert text.count("recomputed prompt tokens ≤ 1/10: **") == 1 and "p99 turn latency ≤ 1/3: **" in text
    data = json.loads((tmp_path / "out" / "route.json").read_text())
    points = {(r["replicas"], r["agents"], r["policy"]) for r in data["results"]}
    assert points == {(r, a, p) for r in (4, 8) for a in (16, 64) for p in POLICIES}
    assert (tmp_path / "img" / "route.png").stat().st_size > 0
    section = (tmp_path / "docs" / "route.md").read_text()
    assert section.startswith("<!-- bench:route") and "../img/route.png" in section
    lines, met = route_bench.goals(data["results"])
    assert met == all("**met**" in line for line in lines[1:])
