"""Trace-driven discrete-event simulation of agents on replicas, for `deltaserve bench route`.

Workload (seeded, identical for every policy): `agents` agents, each with a role whose system prompt + tools
(`system_min`..`system_max` tokens) every agent of that role shares, run a `turns`-turn workflow: turn 1 is the
system prompt plus a task of its own; every later turn appends the previous output and a tool result (lognormal,
median `tool_median`), and generates `out_min`..`out_max` tokens; a think/tool pause (lognormal, median `think_s`)
separates turns; agents start uniformly over `stagger_s` seconds. Each agent waits for its turn's answer (closed
loop), so an overloaded cluster slows its agents down instead of queueing without bound.

A replica: a KV budget of `kv_tokens` tokens holding role prefixes and sessions (the context after a turn's
output) as whole LRU entries, a role prefix always touched after its sessions so that, as in a radix tree, it is
evicted only after them; an entry in use by a running request is pinned. A request's cache hit is its role prefix
(when cached) plus the longest cached context of its own session (round-robin can find an older, shorter one
there), taken when its prefill starts. One engine with continuous batching: an iteration is either one
request's whole prefill plus one decode step of the running batch, or decode steps of the batch until the first
running request finishes or a request arrives. Costs, from this machine's measurements:
  prefill of tokens hit..P: T(P) - T(hit), T piecewise linear through (L, L / rate(L)) of the measured prefill
                rates (attention makes later tokens dearer), or (P - hit) / rate with a flat rate;
  decode step of a batch of B: (1 + decode_batch_slope * (B - 1)) / decode_rate.
Turn latency = the request reaching the router to its last token.
"""

from __future__ import annotations

import heapq
import math
import random
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

from deltaserve.cluster.routing import ReplicaState, RequestInfo, Router, RouterConfig, block_hashes

POLICIES = ("affine", "round_robin", "least_loaded")
# `deltaserve bench engine` on this machine, SmolLM2-135M bf16: prefill tok/s at 512/2048/6144-token prompts
MEASURED_PREFILL = ((512, 3509.0), (2048, 1677.0), (6144, 922.0))


@dataclass(frozen=True)
class SimConfig:
    replicas: int = 8
    agents: int = 100
    turns: int = 35
    roles: int = 8
    system_min: int = 1000
    system_max: int = 1500
    task_min: int = 50
    task_max: int = 200
    tool_median: float = 110.0
    tool_sigma: float = 0.25  # 5-95 % of tool results: ~73-166 tokens
    out_min: int = 24
    out_max: int = 32
    think_s: float = 2.0
    think_sigma: float = 0.8
    stagger_s: float = 60.0
    kv_tokens: int = 131072  # per replica; SmolLM2-135M: 23,040 B/token, so ~3 GB
    max_running: int = 64
    prefill_curve: tuple = MEASURED_PREFILL
    prefill_rate: float | None = None  # flat prefill tok/s instead of the curve
    decode_rate: float = 50.0
    decode_batch_slope: float = 0.1
    block_tokens: int = 64
    epsilon: float = 0.25
    seed: int = 0


@dataclass
class Workload:
    role: list
    start: list
    system: list  # tokens of each role's system prompt
    role_hashes: list  # chained block hashes of each role's system prompt (first summary blocks)
    first: list  # prompt tokens of each agent's first turn
    tools: list  # tools[a][t]: tokens appended before turn t (t >= 1)
    outs: list
    thinks: list


def make_workload(c: SimConfig) -> Workload:
    rng = random.Random(c.seed)
    system = [rng.randint(c.system_min, c.system_max) for _ in range(c.roles)]
    rc = RouterConfig(block_tokens=c.block_tokens)
    role_hashes = [block_hashes([rng.randrange(1 << 16) for _ in range(n)], rc.block_tokens, rc.summary_blocks)
                   for n in system]
    role = [rng.randrange(c.roles) for _ in range(c.agents)]
    start = [rng.uniform(0, c.stagger_s) for _ in range(c.agents)]
    first = [system[role[a]] + rng.randint(c.task_min, c.task_max) for a in range(c.agents)]
    mu = math.log(c.tool_median)
    tools = [[0] + [max(1, round(rng.lognormvariate(mu, c.tool_sigma))) for _ in range(c.turns - 1)]
             for _ in range(c.agents)]
    outs = [[rng.randint(c.out_min, c.out_max) for _ in range(c.turns)] for _ in range(c.agents)]
    tm = math.log(c.think_s) if c.think_s > 0 else 0.0
    thinks = [[rng.lognormvariate(tm, c.think_sigma) if c.think_s > 0 else 0.0 for _ in range(c.turns)]
              for _ in range(c.agents)]
    return Workload(role, start, system, role_hashes, first, tools, outs, thinks)


def prefill_time_fn(c: SimConfig):
    """T(L): seconds to prefill an L-token prompt from nothing; a prefill of hit..P costs T(P) - T(hit)."""
    if c.prefill_rate:
        rate = c.prefill_rate
        return lambda n: n / rate
    pts = [(0, 0.0)] + [(L, L / r) for L, r in sorted(c.prefill_curve)]
    if len(pts) < 3:
        (_, _), (L, t) = pts
        return lambda n: n * t / L

    def T(n: int) -> float:
        for (l0, t0), (l1, t1) in zip(pts, pts[1:]):
            if n <= l1:
                return t0 + (n - l0) * (t1 - t0) / (l1 - l0)
        (l0, t0), (l1, t1) = pts[-2], pts[-1]
        return t1 + (n - l1) * (t1 - t0) / (l1 - l0)
    return T


class _Replica:
    __slots__ = ("rid", "state", "cache", "total", "pinned", "queue", "running", "seg", "version", "busy_s",
                 "served", "recomputed", "pinned_tok")

    def __init__(self, rid: str):
        self.rid = rid
        self.state = ReplicaState(0, set())  # load and prefix summary, read by the router
        self.cache: OrderedDict[int, int] = OrderedDict()  # key -> tokens; agent a: a, role r: -(r + 1)
        self.total = 0
        self.pinned: set[int] = set()
        self.queue: deque = deque()
        self.running: list = []  # [remaining tokens, request]
        self.seg = None  # ("p", start, req) or ("d", start, step_s, steps); None: idle
        self.version = 0
        self.busy_s = 0.0
        self.served = self.recomputed = 0
        self.pinned_tok = 0  # KV reserved by running requests (prompt + output)


def simulate(c: SimConfig, w: Workload, policy: str) -> dict:
    """Run one policy over workload `w`; returns totals, latencies and (affine) the router's decision counts."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose from {', '.join(POLICIES)}")
    wall0 = time.perf_counter()
    T = prefill_time_fn(c)
    step0, slope = 1.0 / c.decode_rate, c.decode_batch_slope
    reps = [_Replica(f"r{i:02d}") for i in range(c.replicas)]
    states = {r.rid: r.state for r in reps}
    router = Router(RouterConfig(block_tokens=c.block_tokens, epsilon=c.epsilon))
    R = len(reps)
    events: list = []
    seq = 0
    rr = 0
    ctx = [0] * c.agents  # context after the agent's last turn (prompt + output)
    lat: list[float] = []
    prompt_tok = hit_tok = 0
    end_t = 0.0

    def push(t, kind, obj, ver=0):
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind, obj, ver))

    def evict(rep: _Replica):
        cache, guard = rep.cache, len(rep.cache)
        while rep.total > c.kv_tokens and cache and guard > 0:
            key = next(iter(cache))
            if key in rep.pinned:  # running: move it (and its role, which must outlive it) out of the way
                guard -= 1
                cache.move_to_end(key)
                if -(w.role[key] + 1) in cache:
                    cache.move_to_end(-(w.role[key] + 1))
                continue
            rep.total -= cache.pop(key)
            if key < 0:
                rep.state.prefixes.difference_update(w.role_hashes[-key - 1])

    def admit(rep: _Replica, req) -> int:
        """The request's prefill starts: its cache hit now, and its session and role entries touched and pinned."""
        a, _, _, P, _ = req
        r = w.role[a]
        S, rk, cache = w.system[r], -(r + 1), rep.cache
        old = cache.pop(a, None)
        if old is not None:
            rep.total -= old
        hit = (S + (old or 0)) if rk in cache else 0
        cache[a] = P - S
        rep.total += P - S
        if rk in cache:
            cache.move_to_end(rk)
        else:
            cache[rk] = S
            rep.total += S
            rep.state.prefixes.update(w.role_hashes[r])
        rep.pinned.add(a)
        evict(rep)
        return hit

    def start(rep: _Replica, now: float):
        nonlocal prompt_tok, hit_tok
        rep.version += 1
        B = len(rep.running)
        head = rep.queue[0] if rep.queue else None
        # admission as in vLLM: a batch slot and KV room for the whole request beside the running ones
        if head and B < c.max_running and (not B or rep.pinned_tok + head[3] + head[4] <= c.kv_tokens):
            req = rep.queue.popleft()
            rep.pinned_tok += req[3] + req[4]
            hit = admit(rep, req)
            P = req[3]
            prompt_tok += P
            hit_tok += hit
            rep.served += 1
            rep.recomputed += P - hit
            dt = T(P) - T(hit) + (step0 * (1 + slope * (B - 1)) if B else 0.0)
            rep.seg = ("p", now, req)
            push(now + dt, 1, rep, rep.version)
        elif B:
            st = step0 * (1 + slope * (B - 1))
            k = min(x[0] for x in rep.running)
            rep.seg = ("d", now, st, k)
            push(now + k * st, 1, rep, rep.version)
        else:
            rep.seg = None

    def finish(rep: _Replica, req, now: float):
        nonlocal end_t
        a, t, arrived, P, out = req
        lat.append(now - arrived)
        end_t = max(end_t, now)
        rep.state.load -= 1
        rep.pinned.discard(a)
        rep.pinned_tok -= P + out
        S = w.system[w.role[a]]
        ctx[a] = P + out
        if a in rep.cache:  # the output joins the session's cached context
            rep.total += P + out - S - rep.cache[a]
            rep.cache[a] = P + out - S
            evict(rep)
        if policy == "affine":
            router.record(str(a), rep.rid)
        if t + 1 < c.turns:
            push(now + w.thinks[a][t], 0, (a, t + 1))
        elif policy == "affine":
            router.forget(str(a))

    def arrive(a: int, t: int, now: float):
        nonlocal rr
        P = w.first[a] if t == 0 else ctx[a] + w.tools[a][t]
        if policy == "affine":
            d = router.route(RequestInfo(states, session_id=str(a), block_hashes=w.role_hashes[w.role[a]]))
            rep = reps[int(d.replica[1:])]
        elif policy == "round_robin":
            rep = reps[rr % R]
            rr += 1
        else:
            rr += 1
            rep = reps[min(range(R), key=lambda i: (reps[i].state.load, (i - rr) % R))]
        rep.state.load += 1
        rep.queue.append((a, t, now, P, w.outs[a][t]))
        if rep.seg is None:
            start(rep, now)
        elif rep.seg[0] == "d" and len(rep.queue) == 1 and len(rep.running) < c.max_running:
            _, s0, st, k = rep.seg  # cut the decode run at the end of the step in progress
            done = int((now - s0) / st) + 1
            if done < k:
                rep.version += 1
                rep.seg = ("d", s0, st, done)
                push(s0 + done * st, 1, rep, rep.version)

    for a in range(c.agents):
        push(w.start[a], 0, (a, 0))
    while events:
        now, _, kind, obj, ver = heapq.heappop(events)
        if kind == 0:
            arrive(obj[0], obj[1], now)
            continue
        rep = obj
        if ver != rep.version:
            continue  # a decode run cut short by an arrival
        seg = rep.seg
        rep.busy_s += now - seg[1]
        steps = 1 if seg[0] == "p" else seg[3]
        for x in rep.running:  # in a prefill iteration the batch (without the new request) takes one step
            x[0] -= steps
        if seg[0] == "p":
            req = seg[2]
            rep.running.append([req[4] - 1, req])  # the prefill step also yields the first output token
        done = [x for x in rep.running if x[0] <= 0]
        if done:
            rep.running = [x for x in rep.running if x[0] > 0]
            for x in done:
                finish(rep, x[1], now)
        start(rep, now)

    lat.sort()
    n = len(lat)
    pct = (lambda q: lat[min(n - 1, max(0, math.ceil(q * n) - 1))]) if n else (lambda q: float("nan"))
    return {"policy": policy, "replicas": c.replicas, "agents": c.agents, "turns_done": n,
            "prompt_tokens": prompt_tok, "hit_tokens": hit_tok, "recomputed_tokens": prompt_tok - hit_tok,
            "hit_rate": hit_tok / prompt_tok if prompt_tok else 0.0, "p50_s": pct(0.50), "p99_s": pct(0.99),
            "makespan_s": end_t, "busy": sum(r.busy_s for r in reps) / (R * end_t) if end_t else 0.0,
            "decisions": router.counters() if policy == "affine" else {},
            "per_replica": [{"requests": r.served, "recomputed_tokens": r.recomputed, "busy_s": round(r.busy_s, 3)}
                            for r in reps],
            "sim_wall_s": time.perf_counter() - wall0}
