"""The cluster ingress's bookkeeping (`deltaserve/cluster/placement.py`), without Ray: keys, prefix hashes, the
session table learnt from answers, dead replicas and the recovered / migrated counters."""

from __future__ import annotations

from deltaserve.cluster.placement import Keys, Placement, prompt_hashes, prompt_text, request_keys

LIVE = frozenset({"a", "b"})


def test_request_keys_read_header_body_and_paths():
    k = request_keys("POST", "/v1/chat/completions", {"x-session-id": "s1"}, {"session_id": "ignored"})
    assert (k.session_id, k.previous_response_id, k.generation, k.session_route) == ("s1", None, True, False)
    k = request_keys("POST", "/v1/responses", {}, {"previous_response_id": "resp_1", "input": "hi"})
    assert (k.session_id, k.previous_response_id, k.generation) == (None, "resp_1", True)
    k = request_keys("POST", "/v1/sessions/s2/chat/completions", {}, {})
    assert (k.session_id, k.generation, k.session_route) == ("s2", True, True)
    k = request_keys("GET", "/v1/responses/resp_9/input_items", {}, None)
    assert (k.previous_response_id, k.generation) == ("resp_9", False)
    assert request_keys("POST", "/v1/sessions", {}, {}).session_route


def test_prompt_hashes_share_leading_blocks_of_an_extended_conversation():
    system = {"role": "system", "content": "manual " * 200}
    short = {"messages": [system, {"role": "user", "content": "a"}]}
    longer = {"messages": [system, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    hs, hl = prompt_hashes(short), prompt_hashes(longer)
    assert len(hs) >= 4 and hl[: len(hs) - 1] == hs[:-1]  # all but the block the new message changes
    assert prompt_hashes({"messages": [{"role": "system", "content": "other " * 200}]})[0] != hs[0]
    assert prompt_text({"prompt": "x"}) == b'"x"\n'


def test_table_learns_from_answers_and_a_dead_replica_counts_recovered():
    p = Placement()
    p.sync(LIVE)
    keys = Keys(session_id="s", generation=True)
    d = p.choose(keys, [], LIVE)
    assert d.kind == "least_loaded"
    p.placed(d.replica, "POST", keys, [1, 2], None, "chatcmpl-1")
    assert p.choose(keys, [], LIVE) == (d.replica, "affine", 0)
    chained = Keys(previous_response_id="chatcmpl-1", generation=True)
    assert p.choose(chained, [], LIVE).replica == d.replica  # the response id is homed too
    other = next(r for r in LIVE if r != d.replica)
    assert p.choose(Keys(generation=True), [1, 2, 3], LIVE) == (d.replica, "prefix", 2)
    p.sync(frozenset({other}))  # d.replica died
    again = p.choose(keys, [], frozenset({other}))
    assert again.replica == other and p.counts["recovered"] == 1
    p.choose(keys, [], frozenset({other}))
    assert p.counts["recovered"] == 1  # once per lost session


def test_dead_and_draining_replicas_are_not_chosen():
    now = [0.0]
    p = Placement(clock=lambda: now[0])
    p.sync(LIVE)
    p.drop("a")
    assert p.candidates(LIVE) == ["b"]
    p.sync(LIVE)
    assert p.candidates(LIVE) == ["b"]  # still listed by Serve, still dead here
    now[0] = 61.0
    p.sync(LIVE)
    assert p.candidates(LIVE) == ["a", "b"]  # a failure long ago, still listed: tried again
    p.sync(frozenset({"b", "c"}))
    p.draining.add("b")
    assert p.candidates(frozenset({"b", "c"})) == ["c"]
    p.draining.add("c")
    assert p.candidates(frozenset({"b", "c"})) == ["b", "c"]  # all draining: keep serving


def test_deleted_session_is_forgotten_and_moved_counts():
    p = Placement()
    p.sync(LIVE)
    k = Keys(session_id="s", session_route=True)
    p.placed("a", "POST", k, [], "Bearer x", "s")
    assert p.homed_sessions("a") == ["s"] and p.sessions["s"] == "Bearer x"
    p.moved("s", "b")
    assert p.homed_sessions("b") == ["s"] and p.counts["migrated"] == 1
    p.placed("b", "DELETE", k, [], None, None)
    assert p.router.replica_of("s") is None and "s" not in p.sessions
    assert 'deltaserve_cluster_sessions_migrated_total 1' in p.metrics(LIVE)


def test_ray_stays_optional():
    """The CLI, `deltaserve serve` and the cluster's Ray-free modules import without Ray (`[cluster]` extra)."""
    import subprocess
    import sys

    code = ("import sys, deltaserve.cli, deltaserve.server.app, deltaserve.cluster, deltaserve.cluster.app, "
            "deltaserve.cluster.placement, deltaserve.cluster.routing; "
            "sys.exit('ray imported' if 'ray' in sys.modules else 0)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_autoscaling_flags_become_serves_config():
    from deltaserve.cluster.app import _autoscaling, parse_cluster_args

    assert _autoscaling(parse_cluster_args(["--replicas", "3"])) is None
    cfg = _autoscaling(parse_cluster_args(["--min-replicas", "1", "--max-replicas", "4", "--replicas", "2",
                                           "--target-ongoing-requests", "2"]))
    assert cfg == {"min_replicas": 1, "max_replicas": 4, "initial_replicas": 2, "target_ongoing_requests": 2.0}
    import pytest

    with pytest.raises(SystemExit):
        _autoscaling(parse_cluster_args(["--min-replicas", "0", "--max-replicas", "2"]))
