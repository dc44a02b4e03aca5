"""`deltaserve cluster` on a local Ray instance: 2 engine replicas of a tiny random llama (fp32, CPU) behind the ingress.

One Serve application for the module (starting Ray and two engines is the expensive part). Each test reads the
replica that served a request from the ingress's table (`GET /admin/replicas` counts, `deltaserve_cluster_*`
metrics) and from the sessions each replica lists, never from timing. Greedy decoding with `ignore_eos`, so a
reply's tokens are a function of the prompt alone and a recomputed turn must equal a single server's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time

import httpx
import pytest
import torch

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

ADMIN = "admin-secret"
MAX_TOKENS = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model_dir(smollm_dir, out):
    """A 2-layer random llama with SmolLM2's tokenizer and chat template: loads in a second, decodes fast."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (smollm_dir / f).exists():
            shutil.copy(smollm_dir / f, out / f)
    cfg = json.loads((smollm_dir / "config.json").read_text())
    cfg.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
    (out / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)
    h, i, v = 64, 128, cfg["vocab_size"]
    state = {"model.embed_tokens.weight": torch.randn(v, h, generator=g) * 0.5, "model.norm.weight": torch.ones(h)}
    for layer in range(2):
        p = f"model.layers.{layer}."
        for name, shape in (("self_attn.q_proj", (64, h)), ("self_attn.k_proj", (32, h)),
                            ("self_attn.v_proj", (32, h)), ("self_attn.o_proj", (h, 64)),
                            ("mlp.gate_proj", (i, h)), ("mlp.up_proj", (i, h)), ("mlp.down_proj", (h, i))):
            state[p + name + ".weight"] = torch.randn(*shape, generator=g) * 0.2
        state[p + "input_layernorm.weight"] = torch.ones(h)
        state[p + "post_attention_layernorm.weight"] = torch.ones(h)
    save_file(state, str(out / "model.safetensors"))
    return out


SERVE_FLAGS = ["--dtype", "float32", "--kv-cache-gb", "0.03125", "--speculation", "off", "--stats-interval", "0",
               "--max-context", "2048", "--log-level", "warning", "--session-ttl", "600", "--served-model-name", "m",
               "--max-request-bytes", "16384"]  # below a session's export: a drain's import must not be bounded


@pytest.fixture(scope="module")
def model(smollm_dir, tmp_path_factory):
    return tiny_model_dir(smollm_dir, tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def cluster(model):
    from deltaserve.cluster.app import parse_cluster_args
    from deltaserve.cluster import build_app

    port = _free_port()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.environ.get("PYTHONPATH", "")}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        args = parse_cluster_args(["--model", str(model), "--replicas", "2", "--admin-key", ADMIN, *SERVE_FLAGS])
        serve.run(build_app(args), name="deltaserve", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while httpx.get(url + "/health", timeout=30).status_code != 200 or len(replicas(url)) < 2:
            assert time.monotonic() < deadline, "the cluster did not come up"
            time.sleep(0.5)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def single(model):
    """One `deltaserve serve` app in-process on the same model and flags: the reference outputs."""
    from deltaserve.engine.args import build_engine
    from deltaserve.engine.async_engine import AsyncEngine
    from deltaserve.server.app import add_serve_arguments, create_app
    from deltaserve.server.testing import ServerThread
    import argparse

    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    args = p.parse_args(["--model", str(model), *SERVE_FLAGS])
    engine = AsyncEngine.build(lambda: build_engine(args))
    with ServerThread(create_app(engine, "m")) as s:
        yield s.base_url


def replicas(url) -> list[dict]:
    r = httpx.get(url + "/admin/replicas", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)
    r.raise_for_status()
    return [x for x in r.json()["data"] if x["state"] != "dead"]


def counters(url) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=30).text
    out = {}
    for m in re.finditer(r'^deltaserve_cluster_(route_decisions_total\{kind="(\w+)"\}|sessions_(\w+)_total) (\S+)$',
                         text, re.M):
        out[m.group(2) or m.group(3)] = float(m.group(4))
    return out


def sessions_by_replica(url) -> dict[str, int]:
    return {r["id"]: r["sessions"] for r in replicas(url)}


def chat(url, messages, session_id=None, stream=False, **extra):
    body = {"model": "m", "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
            **extra}
    headers = {"X-Session-Id": session_id} if session_id else {}
    if not stream:
        r = httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()
    text, usage = "", None
    with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True,
                      "stream_options": {"include_usage": True}}, headers=headers, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                ev = json.loads(line[6:])
                if ev.get("choices"):
                    text += ev["choices"][0]["delta"].get("content") or ""
                usage = ev.get("usage") or usage
    return {"choices": [{"message": {"role": "assistant", "content": text}}], "usage": usage}


def conversation(url, sid, turns, seed, stream=False):
    """`turns` turns of one session; returns (replies, cached_tokens per turn)."""
    messages = [{"role": "system", "content": f"You are agent {seed}. " + "Be brief. " * 20}]
    replies, cached = [], []
    for t in range(turns):
        messages.append({"role": "user", "content": f"step {t} of task {seed}: list the files"})
        r = chat(url, messages, sid, stream=stream)
        reply = r["choices"][0]["message"]["content"]
        messages.append({"role": "assistant", "content": reply})
        replies.append(reply)
        cached.append(r["usage"]["prompt_tokens_details"]["cached_tokens"])
    return replies, cached, messages


def test_session_turns_stay_on_their_replica(cluster):
    """8 sessions x 5 turns (half streamed): every turn after the first is an affine decision (exactly), the
    sessions spread over both replicas, and each replica lists exactly the sessions the table homes there."""
    before = counters(cluster)
    n, turns = 8, 5
    for s in range(n):
        _, cached, _ = conversation(cluster, f"aff-{s}", turns, seed=100 + s, stream=s % 2 == 1)
        assert all(c > 0 for c in cached[1:]), cached  # the session's KV was there: the same replica
    after = counters(cluster)
    assert after["affine"] - before["affine"] == n * (turns - 1)
    homed = sessions_by_replica(cluster)
    assert sum(homed.values()) >= n and min(homed.values()) >= 1, homed
    listed = httpx.get(cluster + "/v1/sessions", timeout=30).json()["data"]  # merged from both replicas
    assert {f"aff-{s}" for s in range(n)} <= {x["id"] for x in listed}


def test_response_chains_stay_on_their_replica(cluster):
    """Responses API chains (`previous_response_id`, streamed and not): each continuation is affine, and every
    turn is answered by the replica that holds the chain."""
    before = counters(cluster)
    for c in range(4):
        prev, homes = None, set()
        for t in range(3):
            body = {"model": "m", "input": f"chain {c} turn {t}: go on", "max_output_tokens": MAX_TOKENS,
                    "temperature": 0, **({"previous_response_id": prev} if prev else {})}
            if t == 1:  # the stream's first event carries the id the ingress records
                with httpx.stream("POST", cluster + "/v1/responses", json={**body, "stream": True}, timeout=120) as r:
                    assert r.status_code == 200
                    events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
                prev = events[-1]["response"]["id"]
            else:
                r = httpx.post(cluster + "/v1/responses", json=body, timeout=120)
                assert r.status_code == 200, r.text
                prev = r.json()["id"]
            homes.add(r.headers["x-deltaserve-replica"])
        assert len(homes) == 1
    assert counters(cluster)["affine"] - before["affine"] == 4 * 2


def test_errors_are_the_servers(cluster):
    """The replica's own errors pass through unchanged; the body bound is the ingress's (OpenAI format)."""
    r = httpx.post(cluster + "/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user",
                   "content": "x"}]}, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(cluster + "/v1/chat/completions", json={"model": "m", "messages": [{"role": "user",
                   "content": "x" * 20000}]}, timeout=30)
    assert r.status_code == 413 and "error" in r.json()
    r = httpx.post(cluster + "/admin/replicas/x/drain", timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_new_sessions_follow_a_cached_prefix(cluster):
    """New sessions sharing a long system prompt go where that prefix was placed (a `prefix` decision) and are
    served from its cached KV; the bounded load still lets a second replica take them once the first holds more."""
    system = {"role": "system", "content": "Shared tool manual. " + " ".join(f"tool{i}: does thing {i}." for i in range(60))}
    before = counters(cluster)
    first = chat(cluster, [system, {"role": "user", "content": "hi 0"}], "pfx-0")
    second = chat(cluster, [system, {"role": "user", "content": "hi 1"}], "pfx-1")
    after = counters(cluster)
    assert after["prefix"] - before["prefix"] >= 1
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= 100  # the system prompt's KV was reused
    assert first["usage"]["prompt_tokens"] > 100


def test_replica_kill_is_transparent(cluster, single):
    """A replica dies between turns: the session's next turns are answered (no error), by the other replica,
    and equal a single server's greedy replies for the same messages."""
    sid = "kill-0"
    replies, _, messages = conversation(cluster, sid, 2, seed=7)
    home = _home(cluster, sid)
    assert home in {r["id"] for r in replicas(cluster)}
    before = counters(cluster)
    # The test hook ends that replica's process (os._exit), as a crash would. The call may raise (the actor
    # died under it) or return (Serve re-sent it to the other replica, which declines): either way `home` died,
    # which the recovered count below checks.
    _kill(home)
    for t in range(2, 4):
        messages.append({"role": "user", "content": f"step {t} of task 7: list the files"})
        r = chat(cluster, messages, sid)
        got = r["choices"][0]["message"]["content"]
        want = chat(single, messages)["choices"][0]["message"]["content"]
        assert got == want
        messages.append({"role": "assistant", "content": got})
    after = counters(cluster)
    assert after["recovered"] - before["recovered"] == 1
    _wait_replaced(cluster, home)


def _kill(home):
    handle = serve.get_deployment_handle("EngineReplica", app_name="deltaserve")
    try:
        assert handle.die.remote(replica=home).result(timeout_s=60) != home
    except ray.exceptions.RayError:
        pass


def _wait_replaced(url, home):
    """Serve replaces the dead replica; the cluster gets back to two."""
    deadline = time.monotonic() + 300
    while len(ids := {r["id"] for r in replicas(url)}) < 2 or home in ids:
        assert time.monotonic() < deadline
        time.sleep(1)


def respond(url, **body):
    r = httpx.post(url + "/v1/responses", json={"model": "m", "max_output_tokens": MAX_TOKENS, "temperature": 0,
                                                 **body}, timeout=120)
    assert r.status_code == 200, r.text
    return r


def _text(response: dict) -> str:
    return "".join(p["text"] for it in response["output"] if it["type"] == "message" for p in it["content"])


def test_response_chain_outlives_its_replica(cluster, single):
    """A 3-turn `previous_response_id` chain (one turn streamed), then its replica dies: the next turn is still
    a 200, answered by the other replica from the ingress's transcript, equal to a single server's greedy reply
    for that transcript; the chain then goes on from the new response id, affine."""
    prev, items, home = None, [], None
    for t in range(3):
        inp = f"lost chain turn {t}: go on"
        body = {"input": inp, **({"instructions": "Answer briefly."} if t == 0 else {}),
                **({"previous_response_id": prev} if prev else {})}
        if t == 1:
            with httpx.stream("POST", cluster + "/v1/responses", json={"model": "m", "max_output_tokens": MAX_TOKENS,
                              "temperature": 0, "stream": True, **body}, timeout=120) as r:
                assert r.status_code == 200
                events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
            out = events[-1]["response"]
        else:
            r = respond(cluster, **body)
            out = r.json()
        items += [{"role": "user", "content": inp}, *out["output"]]
        prev = out["id"]
        assert home in (None, r.headers["x-deltaserve-replica"])
        home = r.headers["x-deltaserve-replica"]
    before = counters(cluster)
    _kill(home)
    r = respond(cluster, previous_response_id=prev, input="lost chain turn 3: go on", instructions="Be brief.")
    assert r.headers["x-deltaserve-replica"] != home
    want = respond(single, input=[*items, {"role": "user", "content": "lost chain turn 3: go on"}],
                   instructions="Be brief.").json()
    assert _text(r.json()) == _text(want) and r.json()["usage"]["input_tokens"] == want["usage"]["input_tokens"]
    mid = counters(cluster)
    assert mid["recovered"] - before["recovered"] == 1
    r2 = respond(cluster, previous_response_id=r.json()["id"], input="lost chain turn 4: go on")
    assert r2.headers["x-deltaserve-replica"] == r.headers["x-deltaserve-replica"]
    assert counters(cluster)["affine"] - mid["affine"] == 1
    _wait_replaced(cluster, home)


def _home(url, sid) -> str | None:
    r = httpx.get(f"{url}/v1/sessions/{sid}", timeout=30)
    return r.headers.get("x-deltaserve-replica")


def test_drain_moves_sessions_with_their_kv(cluster):
    """Draining a replica exports each of its sessions and imports it on the other: the next turn is answered
    there with cached_tokens covering the whole session so far."""
    sids = [f"drain-{i}" for i in range(4)]
    convs = {sid: conversation(cluster, sid, 2, seed=200 + i) for i, sid in enumerate(sids)}
    homes = {sid: _home(cluster, sid) for sid in sids}
    victim = max(set(homes.values()), key=lambda r: sum(h == r for h in homes.values()))
    hdr = {"Authorization": f"Bearer {ADMIN}"}
    r = httpx.post(f"{cluster}/admin/replicas/{victim}/drain", headers=hdr, timeout=120)
    assert r.status_code == 200, r.text
    moved = {m["id"] for m in r.json()["migrated"]}
    assert moved == {sid for sid in sids if homes[sid] == victim} and not r.json()["failed"], r.json()
    _next_turns_use_moved_kv(cluster, convs, moved, victim)
    httpx.post(f"{cluster}/admin/replicas/{victim}/undrain", headers=hdr, timeout=30)


def test_stopping_replica_hands_its_sessions_off(cluster):
    """The hook Serve runs when it stops a replica (`EngineReplica.__del__` -> `hand_off`), called directly on a
    running replica: each session homed there is exported by it and imported on the other through the ingress;
    the next turn is answered there from the moved KV."""
    sids = [f"stop-{i}" for i in range(4)]
    convs = {sid: conversation(cluster, sid, 2, seed=300 + i) for i, sid in enumerate(sids)}
    homes = {sid: _home(cluster, sid) for sid in sids}
    victim = max(set(homes.values()), key=lambda r: sum(h == r for h in homes.values()))
    before = counters(cluster)
    handle = serve.get_deployment_handle("EngineReplica", app_name="deltaserve")
    out = handle.hand_off.remote(replica=victim).result(timeout_s=120)
    moved = {m["id"] for m in out["migrated"]}
    assert moved == {sid for sid in sids if homes[sid] == victim} and not out["failed"], out
    assert counters(cluster)["migrated"] - before["migrated"] == len(moved)
    _next_turns_use_moved_kv(cluster, convs, moved, victim)
    httpx.post(f"{cluster}/admin/replicas/{victim}/undrain", headers={"Authorization": f"Bearer {ADMIN}"},
               timeout=30)


def _next_turns_use_moved_kv(cluster, convs, moved, victim) -> None:
    """Each moved session's next turn is answered off `victim`, from its moved KV (cached covers the session)."""
    for sid in moved:
        _, _, messages = convs[sid]
        session_tokens = httpx.get(f"{cluster}/v1/sessions/{sid}", timeout=30).json()["tokens"]
        messages.append({"role": "user", "content": "one more step"})
        out = chat(cluster, messages, sid)
        assert _home(cluster, sid) != victim
        assert out["usage"]["prompt_tokens_details"]["cached_tokens"] >= session_tokens - 1, out["usage"]["deltaserve"]
