"""The client of `deltaserve bench load` (`load_bench`): the jobs it runs at once against the server, what it
counts, and the checks after the run. Mutates nothing but its own counters; all state is on the server."""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections import Counter
from typing import Any

CLASSES = ("agent", "one-shot", "disconnect", "race")
ONE_SHOT_TOKENS, STREAM_TOKENS = 16, 64
_WORDS = ("file path line value status ok error warning result item id name total count date user order ticket "
          "report query index table row column commit branch test passed failed latency bytes request response "
          "cache session token module service queue worker replica metric alert deploy build schema").split()
# 3 function tools with short schemas (SmolLM2 still rambles in a forced call's string arguments: 24 tokens
# cut most calls short, and they come back as text)
TOOLS = [{"type": "function", "function": {"name": name, "description": desc, "parameters": {
    "type": "object", "properties": props, "required": list(props)}}} for name, desc, props in (
    ("read_file", "Read a file of the repository", {"path": {"type": "string"}}),
    ("run_tests", "Run the tests of one target", {"target": {"type": "string"}}),
    ("search_logs", "Search the service logs", {"query": {"type": "string"}, "limit": {"type": "integer"}}))]


def rss_mib(pid: int) -> float:
    """The process's resident set (VmRSS of /proc/PID/status) in MiB; nan when it is gone."""
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


class Stats:
    """What the client saw, per class: logical requests, HTTP statuses (each retry counted), latencies of the
    requests that ended 200, output tokens, and the first few errors verbatim."""

    def __init__(self):
        self.requests: Counter = Counter()
        self.ok: Counter = Counter()
        self.codes: dict[str, Counter] = {c: Counter() for c in CLASSES}
        self.latency: dict[str, list[float]] = {c: [] for c in CLASSES}
        self.tokens = 0
        self.tool_calls = 0
        self.errors: list[str] = []

    def error(self, cls: str, code: str, detail: str) -> None:
        self.codes[cls][code] += 1
        if len(self.errors) < 20:
            self.errors.append(f"{cls}: {code}: {detail[:300]}")

    def undocumented(self) -> dict[str, dict[str, int]]:
        out = {}
        for cls, codes in self.codes.items():
            allowed = {"200", "429"} | ({"409"} if cls == "race" else set())
            bad = {k: v for k, v in codes.items() if k not in allowed}
            if bad:
                out[cls] = bad
        return out


class Load:
    """One run's client: the jobs above on one AsyncClient, gated on the agents' progress (turns done)."""

    def __init__(self, args, url: str, context: int, tokenizer):
        self.args, self.url, self.context, self.tok = args, url, context, tokenizer
        self.stats = Stats()
        self.total = args.agents * args.turns
        self.done = 0
        self.cond = asyncio.Condition()
        self.rng = random.Random(args.seed)
        pairs = [(i, t) for t in range(1, args.turns) for i in range(args.agents)]  # turn 0 creates the session
        self.races = set(self.rng.sample(pairs, min(args.races, len(pairs))))
        self.race_outcomes: Counter = Counter()

    # ---------------------------------------------------------------- requests
    async def post(self, http, cls: str, body: dict, final: list | None = None) -> dict | None:
        """POST a chat completion; 429: wait its Retry-After and retry. The JSON of a 200, else None; the last
        status (or error name) is appended to `final` when given."""
        t0 = time.perf_counter()
        self.stats.requests[cls] += 1
        while True:
            try:
                r = await http.post(self.url + "/v1/chat/completions", json=body)
            except Exception as e:  # noqa: BLE001 - a transport error is an error of the run, not of the client
                self.stats.error(cls, type(e).__name__, str(e))
                return None
            if final is not None:
                final.append(r.status_code)
            if r.status_code == 429:
                wait = self.retry_after(cls, r, t0)
                if wait is None:
                    return None
                await asyncio.sleep(wait)
                continue
            if r.status_code == 200:
                self.stats.codes[cls]["200"] += 1
                self.stats.ok[cls] += 1
                self.stats.latency[cls].append(time.perf_counter() - t0)
                out = r.json()
                self.stats.tokens += (out.get("usage") or {}).get("completion_tokens", 0)
                return out
            if r.status_code == 409 and cls == "race":
                if '"session_busy"' in r.text:
                    self.stats.codes[cls]["409"] += 1  # documented
                else:
                    self.stats.error(cls, "409-not-session_busy", r.text)
                return None
            self.stats.error(cls, str(r.status_code), r.text)
            return None

    def retry_after(self, cls: str, r, t0: float) -> float | None:
        """Count the 429 `r`; the seconds to wait before the retry, or None (counted as an error) when it has no
        Retry-After or the request is past --timeout."""
        wait = r.headers.get("retry-after")
        if wait is None or time.perf_counter() - t0 >= self.args.timeout:
            self.stats.error(cls, "429-without-retry-after" if wait is None else "429-past-timeout", r.text)
            return None
        self.stats.codes[cls]["429"] += 1
        return float(wait)

    async def wait_progress(self, n: float) -> None:
        async with self.cond:
            await self.cond.wait_for(lambda: self.done >= n)

    async def advance(self, k: int = 1) -> None:
        async with self.cond:
            self.done += k
            self.cond.notify_all()
        if self.done * 10 // self.total != (self.done - k) * 10 // self.total:
            print(f"[load]   {self.done}/{self.total} agent turns", file=sys.stderr, flush=True)

    # ---------------------------------------------------------------- jobs
    def result_text(self, rng: random.Random, n: int) -> str:
        """About `n` tokens of tool output (records of words and numbers), cut to exactly n with the tokenizer."""
        words = []
        while len(words) < 2 * n:
            words += [f"{rng.choice(_WORDS)}={rng.randint(0, 9999)}", rng.choice(_WORDS)]
        ids = self.tok.encode(" ".join(words)).ids[:n]
        return self.tok.decode(ids)

    async def agent(self, http, i: int) -> None:
        a, rng = self.args, random.Random(self.args.seed * 1000 + i)
        sid = f"agent-{i}"
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": f"You are agent {i}. Use the tools to inspect the repository, the tests "
                                          "and the logs; answer briefly."},
            {"role": "user", "content": f"Task {i}: find why the nightly build of the {rng.choice(_WORDS)} "
                                        "service failed and propose a fix."}]
        sleepy = i % 4 == 3  # a quarter of the agents outlive their pin once, mid-workflow
        turns_done = 0
        try:
            for t in range(a.turns):
                body = {"model": a.model, "messages": messages, "tools": TOOLS, "session_id": sid,
                        "max_tokens": a.max_tokens, "temperature": 0}
                if t % 3 == 2:
                    body["tool_choice"] = "required"
                if (i, t) in self.races:
                    out = await self.race(http, body)
                else:
                    out = await self.post(http, "agent", body)
                turns_done += 1
                await self.advance()
                if out is None:
                    return  # the error is counted; the rest of this workflow is abandoned
                msg = out["choices"][0]["message"]
                reply: dict[str, Any] = {"role": "assistant", "content": msg.get("content") or ""}
                if msg.get("tool_calls"):
                    reply["tool_calls"] = msg["tool_calls"]
                    self.stats.tool_calls += 1
                messages.append(reply)
                if t == a.turns - 1:
                    break  # the workflow is done: no tool result to add
                # the tool result: 70-180 tokens, fewer where the rest of the workflow would not fit the context
                left = a.turns - t - 1
                room = (self.context - out["usage"]["prompt_tokens"] - 64) // max(left, 1) - a.max_tokens - 24
                n = max(8, min(rng.randint(70, 180), room))
                for j, call in enumerate(reply.get("tool_calls") or []):
                    messages.append({"role": "tool", "tool_call_id": call.get("id") or f"call_{j}",
                                     "content": self.result_text(rng, n) if j == 0 else "ok"})
                if not reply.get("tool_calls"):
                    messages.append({"role": "user", "content": "Result: " + self.result_text(rng, n)})
                await asyncio.sleep(a.session_ttl + 1 if sleepy and t == a.turns // 2 else rng.uniform(0.05, 0.3))
        finally:
            if turns_done < a.turns:
                await self.advance(a.turns - turns_done)  # keep the progress gates of the other jobs moving

    async def race(self, http, body: dict) -> dict | None:
        """The same turn twice at once on one session; the agent goes on with a 200 answer."""
        final: list[int] = []
        outs = await asyncio.gather(self.post(http, "race", body, final), self.post(http, "race", body, final))
        served = [o for o in outs if o is not None]
        self.race_outcomes["both 200" if len(served) == 2 else "one 409" if len(served) == 1 and 409 in final
                           else "failed"] += 1
        return served[0] if served else None

    async def burst(self, http, k: int) -> None:
        await self.wait_progress(self.total * (k + 1) / (self.args.bursts + 1))
        print(f"[load]   burst {k + 1}: {self.args.burst_size} one-shot requests", file=sys.stderr, flush=True)
        rng = random.Random(self.args.seed * 7919 + k)
        await asyncio.gather(*(self.post(http, "one-shot", {
            "model": self.args.model, "max_tokens": ONE_SHOT_TOKENS, "temperature": 0, "messages": [
                {"role": "user", "content": f"Request {k}.{j}: describe a {rng.choice(_WORDS)} in one line."}]})
            for j in range(self.args.burst_size)))

    async def disconnect(self, http, k: int) -> None:
        rng = random.Random(self.args.seed * 104729 + k)
        await self.wait_progress(self.total * (k + rng.random()) / self.args.disconnects)
        body = {"model": self.args.model, "max_tokens": STREAM_TOKENS, "ignore_eos": True, "stream": True,
                "session_id": f"gone-{k}", "messages": [
                    {"role": "user", "content": f"Write a long story number {k} about a {rng.choice(_WORDS)}."}]}
        keep, t0 = rng.randint(1, STREAM_TOKENS // 2), time.perf_counter()
        self.stats.requests["disconnect"] += 1
        while True:
            try:
                async with http.stream("POST", self.url + "/v1/chat/completions", json=body) as r:
                    if r.status_code == 429:
                        await r.aread()
                        wait = self.retry_after("disconnect", r, t0)
                        if wait is None:
                            return
                        await asyncio.sleep(wait)
                        continue
                    if r.status_code != 200:
                        self.stats.error("disconnect", str(r.status_code), (await r.aread()).decode(errors="replace"))
                        return
                    async for line in r.aiter_lines():
                        keep -= line.startswith("data:")
                        if keep <= 0:
                            break  # leaving the block closes the connection mid-stream
            except Exception as e:  # noqa: BLE001
                self.stats.error("disconnect", type(e).__name__, str(e))
                return
            self.stats.codes["disconnect"]["200"] += 1
            self.stats.ok["disconnect"] += 1
            self.stats.latency["disconnect"].append(time.perf_counter() - t0)
            return

    async def drive(self, pid: int) -> dict[str, Any]:
        import httpx

        a = self.args
        peak = [rss_mib(pid)]
        stop = asyncio.Event()

        async def sample():
            while not stop.is_set():
                peak.append(rss_mib(pid))
                try:
                    await asyncio.wait_for(stop.wait(), 0.5)
                except asyncio.TimeoutError:
                    pass

        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        async with httpx.AsyncClient(timeout=a.timeout, limits=limits) as http:
            sampler = asyncio.create_task(sample())
            t0 = time.perf_counter()
            jobs = [self.agent(http, i) for i in range(a.agents)]
            jobs += [self.burst(http, k) for k in range(a.bursts)]
            jobs += [self.disconnect(http, k) for k in range(a.disconnects)]
            await asyncio.gather(*jobs)
            wall = time.perf_counter() - t0
            stop.set()
            await sampler
        return {"wall_s": wall, "rss_peak_mib": max(peak)}


async def warm_up(http, url: str, model: str) -> None:
    """Two requests (a forced tool call and a stream) so lazy initialisation (the grammar compiler among it) is
    not counted as load."""
    r = await http.post(url + "/v1/chat/completions", json={"model": model, "max_tokens": 4, "tools": TOOLS,
                        "tool_choice": "required",
                        "messages": [{"role": "user", "content": "Warm-up: read the README."}]})
    r.raise_for_status()
    body = {"model": model, "max_tokens": 4, "stream": True, "messages": [{"role": "user", "content": "Hello."}]}
    async with http.stream("POST", url + "/v1/chat/completions", json=body) as s:
        s.raise_for_status()
        async for _ in s.aiter_lines():
            pass


async def _pinned_gauge(http, url: str) -> float | None:
    for line in (await http.get(url + "/metrics")).text.splitlines():
        if line.startswith("deltaserve_pinned_sessions "):
            return float(line.split()[1])
    return None


async def after_ttl(http, url: str, admin: str, model: str) -> dict[str, Any]:
    """The server's state once the TTLs have passed: sessions, the pinned-sessions gauge (idle, and after one more
    engine step: pins expire lazily, when a step runs, while the session list hides expired pins at once), the
    integrity report."""
    sessions = (await http.get(url + "/v1/sessions")).json()["data"]
    idle = await _pinned_gauge(http, url)
    r = await http.post(url + "/v1/chat/completions", json={"model": model, "max_tokens": 1,
                                                           "messages": [{"role": "user", "content": "One step."}]})
    stepped = await _pinned_gauge(http, url)
    integrity = (await http.get(url + "/v1/debug/integrity", headers={"Authorization": f"Bearer {admin}"})).json()
    return {"sessions": len(sessions), "pinned": sum(s["pinned"] for s in sessions),
            "busy": sum(s["busy"] for s in sessions), "pinned_gauge_idle": idle, "pinned_gauge": stepped,
            "step_status": r.status_code, "integrity": integrity}
