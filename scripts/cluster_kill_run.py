#!/usr/bin/env python3
"""A 2-replica `deltaserve cluster` run: affine hit rate, and the cost of a replica kill mid-workflow.

    scripts/cluster_kill_run.py URL   # a running `deltaserve cluster ... --admin-key k` on this machine's Ray

8 sessions (2 client threads) run KILL_AFTER turns; the replica holding most of them is then killed (its process
exits, as in a crash) and every session goes on to TURNS turns. Env: TURNS, KILL_AFTER, TOOLS (system prompt
size), TAG (session id prefix). Prints JSON: routing decisions before and after the kill, mean turn latency and
cached fraction per phase, client errors.
"""
import json
import os
import re
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
import httpx

U = sys.argv[1]
ADMIN = {"Authorization": "Bearer k"}
N, TURNS, KILL_AFTER = 8, int(os.environ.get("TURNS", 6)), int(os.environ.get("KILL_AFTER", 3))
TAG = os.environ.get("TAG", "perf")
TOOLS = int(os.environ.get("TOOLS", 25))
SYSTEM = "You are a coding agent. Tools: " + " ".join(f"tool_{i}(path) reads file {i} and reports its size;" for i in range(TOOLS))

def metrics():
    t = httpx.get(U + "/metrics").text
    return {m.group(1) or m.group(2): float(m.group(3)) for m in re.finditer(
        r'^deltaserve_cluster_(?:route_decisions_total\{kind="(\w+)"\}|sessions_(\w+)_total) (\S+)$', t, re.M)}

def turn(sid, messages):
    t0 = time.perf_counter()
    r = httpx.post(U + "/v1/chat/completions", json={"model": "smollm2-135m", "messages": messages, "max_tokens": 24,
                   "temperature": 0}, headers={"X-Session-Id": sid}, timeout=600)
    dt = time.perf_counter() - t0
    r.raise_for_status()
    j = r.json()
    return j["choices"][0]["message"]["content"], j["usage"], dt, r.headers["x-deltaserve-replica"]

def run_session(i, turns, log, convs):
    sid = f"{TAG}-{i}"
    msgs = convs.setdefault(sid, [{"role": "system", "content": SYSTEM}])
    for t in turns:
        msgs.append({"role": "user", "content": f"Task {i}, step {t}: read file {t} and tell me its size."})
        text, usage, dt, rep = turn(sid, msgs)
        msgs.append({"role": "assistant", "content": text})
        log.append({"sid": sid, "turn": t, "dt": dt, "prompt": usage["prompt_tokens"],
                    "cached": usage["prompt_tokens_details"]["cached_tokens"], "replica": rep})

log, convs = [], {}
m0 = metrics()
with ThreadPoolExecutor(2) as ex:
    list(ex.map(lambda i: run_session(i, range(KILL_AFTER), log, convs), range(N)))
m1 = metrics()
home = {}
for e in log:
    home[e["sid"]] = e["replica"]
victim = max(set(home.values()), key=lambda r: sum(v == r for v in home.values()))
import ray
from ray import serve
ray.init(address="auto", log_to_driver=False)
h = serve.get_deployment_handle("EngineReplica", app_name="deltaserve")
t_kill = time.perf_counter()
try:  # raises (the actor died under the call) or returns (Serve re-sent it elsewhere, which declines)
    h.die.remote(replica=victim).result(timeout_s=60)
except Exception as e:
    print("kill:", type(e).__name__)
post = []
errors = 0
with ThreadPoolExecutor(2) as ex:
    try:
        list(ex.map(lambda i: run_session(i, range(KILL_AFTER, TURNS), post, convs), range(N)))
    except Exception as e:
        errors += 1; print("ERROR", e)
m2 = metrics()
pre_aff = [e for e in log if e["turn"] > 0]
def summ(es):
    return {"turns": len(es), "mean_s": round(statistics.mean(e["dt"] for e in es), 3),
            "cached_frac": round(sum(e["cached"] for e in es) / sum(e["prompt"] for e in es), 3)}
first_after = [e for e in post if e["turn"] == KILL_AFTER]
out = {
    "before_kill_decisions": {k: m1[k] - m0[k] for k in m1},
    "after_kill_decisions": {k: m2[k] - m1[k] for k in m2},
    "victim": victim, "sessions_on_victim": sum(v == victim for v in home.values()),
    "first_turns": summ([e for e in log if e["turn"] == 0]),
    "later_turns_before_kill": summ(pre_aff),
    "first_turn_after_kill_moved": summ([e for e in first_after if home[e["sid"]] == victim]),
    "first_turn_after_kill_stayed": summ([e for e in first_after if home[e["sid"]] != victim]),
    "later_turns_after_kill": summ([e for e in post if e["turn"] > KILL_AFTER]),
    "client_errors": errors,
    "replica_changes_without_kill": sum(1 for e in log + post if home.get(e["sid"]) != victim and e["replica"] != home[e["sid"]]),
}
print(json.dumps(out, indent=1))
