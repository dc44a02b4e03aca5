"""Seeded generator of multi-agent tool-calling workflows for `deltaserve bench agents`.

A workflow has `agents` agents, each of one of a few roles (researcher,
coder, reviewer, ops, ...). Agents of a role share that role's system prompt,
which embeds the role's tool definitions (OpenAI `tools` JSON schemas) -- the
model's chat template (SmolLM2's ChatML) has no tool syntax, so the
definitions are rendered into the system text, identically for every target.
Every turn an agent receives one tool result (the first also carries its
task) and the model replies with a fixed number of tokens. Tool-result sizes
follow a clipped lognormal (tens to ~1,500 tokens), scaled down where the
whole transcript would not fit the model's context; contents are fresh
pseudo-data per seed: JSON records, log lines, file listings, diffs, CSV.
Between turns the agent waits a simulated tool latency (50-300 ms).

Everything is decided here up front and deterministically from the seed, so
every target sees the same workload; only the model's replies (appended as
returned) differ.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from typing import Any

_W = ("file path line value status ok error warning result item id name price total count city date user order "
      "invoice ticket report query index table row column commit branch test passed failed latency bytes request "
      "response cache session token model agent step plan retry timeout done config module service queue worker "
      "shard replica metric alert deploy build artifact schema field record batch stream offset cursor").split()

ROLES: dict[str, dict[str, Any]] = {
    "researcher": {"goal": "find, read and summarise sources and data for the team",
                   "tools": ["web_search", "fetch_url", "read_document", "query_database", "summarize_table"]},
    "coder": {"goal": "change the code base so that the requested feature works and the tests pass",
              "tools": ["read_file", "write_file", "list_directory", "run_tests", "grep_repository", "apply_patch"]},
    "reviewer": {"goal": "review changes, run checks and report problems precisely",
                 "tools": ["git_diff", "run_linter", "run_tests", "read_file", "post_comment"]},
    "ops": {"goal": "keep the services healthy: inspect logs and metrics, restart and scale services",
            "tools": ["tail_logs", "query_metrics", "list_services", "restart_service", "scale_deployment"]},
}


@dataclass
class Turn:
    tool: str
    call_id: str
    content: str  # the message the client appends (tool result, turn 1 also the task)
    result_tokens: int  # tokens of the tool result alone
    latency_s: float  # simulated tool latency before this turn's request


@dataclass
class Agent:
    agent_id: str
    role: str
    system: str
    tools: list[dict[str, Any]]
    turns: list[Turn] = field(default_factory=list)


@dataclass
class Workflow:
    seed: int
    n_turns: int
    max_tokens: int
    agents: list[Agent]
    result_median_tokens: float

    def summary(self) -> dict[str, Any]:
        sizes = [t.result_tokens for a in self.agents for t in a.turns]
        sizes.sort()
        return {"seed": self.seed, "turns": self.n_turns, "agents": len(self.agents), "max_tokens": self.max_tokens,
                "roles": sorted({a.role for a in self.agents}),
                "tool_result_tokens": {"min": sizes[0], "median": sizes[len(sizes) // 2], "max": sizes[-1],
                                       "mean": round(sum(sizes) / len(sizes), 1),
                                       "lognormal_median": round(self.result_median_tokens, 1)}}


class _Tok:
    """Token counting / truncation with the model's own tokenizer (falls back to ~4 chars per token)."""

    def __init__(self, tokenizer_json: str | None):
        self.tk = None
        if tokenizer_json:
            try:
                from tokenizers import Tokenizer

                self.tk = Tokenizer.from_file(tokenizer_json)
            except Exception:  # noqa: BLE001 - counting is approximate without it
                self.tk = None

    def count(self, text: str) -> int:
        if self.tk is None:
            return max(1, len(text) // 4)
        return len(self.tk.encode(text, add_special_tokens=False).ids)

    def cut(self, text: str, n: int) -> str:
        if self.tk is None:
            return text[: 4 * n]
        enc = self.tk.encode(text, add_special_tokens=False)
        if len(enc.ids) <= n:
            return text
        return text[: enc.offsets[n - 1][1]]


def _words(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(_W) for _ in range(rng.randint(lo, hi)))


def _tool_def(rng: random.Random, name: str) -> dict[str, Any]:
    props = {}
    for j in range(rng.randint(2, 5)):
        typ = rng.choice(["string", "integer", "boolean", "array"])
        p: dict[str, Any] = {"type": typ, "description": _words(rng, 5, 14)}
        if typ == "array":
            p["items"] = {"type": "string"}
        if typ == "string" and rng.random() < 0.3:
            p["enum"] = [rng.choice(_W) for _ in range(3)]
        props[f"{rng.choice(_W)}_{j}"] = p
    req = list(props)[: rng.randint(1, len(props))]
    return {"type": "function", "function": {"name": name, "description": _words(rng, 10, 30) + ".",
                                             "parameters": {"type": "object", "properties": props, "required": req}}}


def _system(rng: random.Random, role: str, tools: list[dict[str, Any]]) -> str:
    r = ROLES[role]
    rules = "\n".join(f"- {_words(rng, 8, 20)}." for _ in range(rng.randint(6, 10)))
    return (f"You are the {role} agent in a team of cooperating AI agents. Your job: {r['goal']}.\n"
            f"Work step by step. Call exactly one tool per turn by answering with a JSON object "
            f'{{"name": <tool name>, "arguments": {{...}}}} inside <tool_call></tool_call> tags. '
            f"Tool results arrive in the next message.\n\n# Rules\n{rules}\n\n# Tools\n"
            + "\n".join(json.dumps(t, separators=(",", ": ")) for t in tools))


# --------------------------------------------------------------- pseudo-content
def _json_records(rng: random.Random) -> str:
    recs = []
    for i in range(200):
        recs.append({"id": rng.randint(10_000, 99_999), "name": f"{rng.choice(_W)}-{rng.choice(_W)}",
                     "status": rng.choice(["ok", "failed", "pending", "retry"]),
                     "value": round(rng.uniform(0, 5000), 2), "city": rng.choice(_W).title(),
                     "updated": f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"})
    return json.dumps({"count": len(recs), "records": recs}, indent=1)


def _log_lines(rng: random.Random) -> str:
    lines = []
    for i in range(300):
        lvl = rng.choices(["INFO", "DEBUG", "WARN", "ERROR"], [6, 3, 2, 1])[0]
        lines.append(f"2026-11-{rng.randint(1, 28):02d}T{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:"
                     f"{rng.randint(0, 59):02d}.{rng.randint(0, 999):03d}Z {lvl} [{rng.choice(_W)}-{rng.randint(0, 9)}] "
                     f"{_words(rng, 4, 12)} latency_ms={rng.randint(1, 900)} req={rng.getrandbits(32):08x}")
    return "\n".join(lines)


def _listing(rng: random.Random) -> str:
    lines = []
    for i in range(300):
        d = "/".join(rng.choice(_W) for _ in range(rng.randint(1, 4)))
        ext = rng.choice(["py", "rs", "ts", "md", "json", "yaml", "go", "c"])
        lines.append(f"{rng.choice(['-rw-r--r--', '-rwxr-xr-x', 'drwxr-xr-x'])} {rng.randint(0, 99_999):>7} "
                     f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d} src/{d}/{rng.choice(_W)}_{i}.{ext}")
    return "\n".join(lines)


def _diff(rng: random.Random) -> str:
    out = []
    for f in range(12):
        path = f"src/{rng.choice(_W)}/{rng.choice(_W)}.py"
        out.append(f"diff --git a/{path} b/{path}\n@@ -{rng.randint(1, 400)},7 +{rng.randint(1, 400)},9 @@")
        for _ in range(rng.randint(6, 20)):
            sign = rng.choice([" ", " ", "+", "-"])
            out.append(f"{sign}    {rng.choice(_W)}_{rng.randint(0, 9)} = {rng.choice(_W)}({_words(rng, 1, 3).replace(' ', ', ')})")
    return "\n".join(out)


def _csv(rng: random.Random) -> str:
    cols = [rng.choice(_W) for _ in range(6)]
    rows = [",".join(cols)]
    for _ in range(250):
        rows.append(",".join(str(rng.choice([rng.randint(0, 9999), round(rng.random(), 4), rng.choice(_W)]))
                             for _ in cols))
    return "\n".join(rows)


_GENERATORS = (_json_records, _log_lines, _listing, _diff, _csv)


def generate(n_turns: int, n_agents: int, seed: int = 0, max_tokens: int = 32, tokenizer_json: str | None = None,
             context_limit: int = 8192, min_tokens: int = 20, max_result_tokens: int = 1500,
             median_tokens: float = 180.0, sigma: float = 1.0, latency_ms: tuple[int, int] = (50, 300),
             tools_per_role: int | None = None) -> Workflow:
    """Build the workflow. Tool results: lognormal(ln median, sigma) clipped to [min, max]; the median shrinks
    where `n_turns` average-sized results plus replies would not fit `context_limit`, and any result that
    would overflow it is cut."""
    rng = random.Random(seed)
    tok = _Tok(tokenizer_json)
    roles = list(ROLES)
    rng.shuffle(roles)
    roles = roles[: max(1, min(len(roles), math.ceil(n_agents / 2)))]
    role_tools, role_system, sys_tokens = {}, {}, {}
    for role in roles:
        tools = [_tool_def(rng, name) for name in ROLES[role]["tools"][:tools_per_role]]
        role_tools[role] = tools
        role_system[role] = _system(rng, role, tools)
        sys_tokens[role] = tok.count(role_system[role])
    per_turn_overhead = max_tokens + 24  # reply + chat-template framing + tool-call header
    usable = 0.9 * context_limit - max(sys_tokens.values()) - 64 - n_turns * per_turn_overhead
    # mean of a lognormal is median * exp(sigma^2 / 2); clipping lowers it somewhat
    med = max(float(min_tokens), min(median_tokens, usable / n_turns / math.exp(sigma * sigma / 2)))
    agents = []
    for a in range(n_agents):
        role = roles[a % len(roles)]
        ag = Agent(f"agent-{seed}-{a}", role, role_system[role], role_tools[role])
        used = sys_tokens[role] + 64
        for t in range(n_turns):
            n = int(min(max_result_tokens, max(min_tokens, rng.lognormvariate(math.log(med), sigma))))
            remaining_turns = n_turns - t - 1
            room = int(0.95 * context_limit) - used - per_turn_overhead - remaining_turns * (per_turn_overhead + min_tokens)
            n = max(min_tokens, min(n, room))
            tool = rng.choice(ROLES[role]["tools"][:tools_per_role])
            call_id = f"call_{rng.getrandbits(40):010x}"
            body = tok.cut(rng.choice(_GENERATORS)(rng), n)
            result_tokens = tok.count(body)
            head = f"[tool_result name={tool} id={call_id}]\n"
            content = head + body
            if t == 0:
                content = (f"Task {rng.randint(100, 999)}: {_words(rng, 12, 30)}.\n"
                           f"You already called {tool}; its result follows.\n") + content
            ag.turns.append(Turn(tool, call_id, content, result_tokens, rng.uniform(*latency_ms) / 1000.0))
            used += tok.count(content) + per_turn_overhead
        agents.append(ag)
    return Workflow(seed, n_turns, max_tokens, agents, med)


def system_tokens(wf: Workflow, tokenizer_json: str | None) -> dict[str, int]:
    tok = _Tok(tokenizer_json)
    return {a.role: tok.count(a.system) for a in wf.agents}
