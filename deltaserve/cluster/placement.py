"""The ingress's view of the cluster, independent of Ray: what a request is keyed by, where it goes, what was learnt.

`request_keys` reads a request's session id (the `X-Session-Id` header, the body's `session_id`, or the
`/v1/sessions/{id}/...` path), its `previous_response_id`, and the response id it names (`/v1/responses/{id}`).

Prefix summaries are recorded by the ingress, not published by the replicas: the ingress hashes the text of each
prompt it places (tools, then each message; `prompt`; `instructions` + `input`) into chained blocks of
`RouterConfig.block_tokens` *bytes* of canonical JSON, and adds them to the summary of the replica that served
it. Text, because the ingress has no tokenizer (and needs none); canonical JSON of each message in order, so a
prompt that extends another shares its leading blocks exactly as the token ids would. What the ingress placed is
what the replica has seen; what the replica has since evicted is not removed (a stale summary costs a prefill,
never a wrong answer), and a summary is bounded (`max_summary`, oldest placements forgotten first).

`Placement` mutates: the `Router`'s session table (through `placed`, `drop`, `moved`), the per-replica counts of
requests in flight (`begin`/`end`), the summaries, the draining / dead sets, the sessions of replicas that left
(`left`, for a stopping replica's hand-off), the `Authorization` header each session was last used with (a drain
must export and import under the session owner's key), and the counters.
"""

from __future__ import annotations

import json
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from deltaserve.cluster.routing import RequestInfo, ReplicaState, RouteDecision, Router, RouterConfig, block_hashes

_SESSION_PATH = re.compile(r"^/v1/sessions/([^/]+)(/.*)?$")
_RESPONSE_PATH = re.compile(r"^/v1/responses/([^/]+)(/.*)?$")
GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")

# The cluster's router defaults: blocks are bytes of canonical JSON here, ~4 bytes a token, so 256 bytes is
# about the 64 tokens a block of routing.RouterConfig's default; 32 blocks cover an ~8 KB system prompt + tools.
DEFAULT_CONFIG = RouterConfig(block_tokens=256, summary_blocks=32)
DEAD_SECONDS = 60.0


@dataclass
class Keys:
    session_id: str | None = None  # the session the request runs in (or acts on)
    previous_response_id: str | None = None  # the response it continues, or names in the path
    generation: bool = False  # a completion / chat / responses request: records a response id when it succeeds
    session_route: bool = False  # /v1/sessions...: the answer's `id` is a session id (create, fork)


def request_keys(method: str, path: str, headers: dict[str, str], body: dict | None) -> Keys:
    """The keys a request is routed by (headers: lower-case names)."""
    k = Keys()
    body = body if isinstance(body, dict) else {}
    k.session_id = headers.get("x-session-id") or _str(body.get("session_id"))
    m = _SESSION_PATH.match(path)
    if m:
        k.session_route = True
        k.session_id = m.group(1)  # the path's session; a fork's new id is in the body, learnt from the answer
        k.generation = m.group(2) == "/chat/completions"
    elif path == "/v1/sessions" and method == "POST":
        k.session_route = True
    m = _RESPONSE_PATH.match(path)
    if m:
        k.previous_response_id = m.group(1)
    else:
        k.previous_response_id = _str(body.get("previous_response_id"))
    k.generation = k.generation or (method == "POST" and path in GENERATION_PATHS)
    return k


def prompt_text(body: dict | None) -> bytes:
    """Canonical bytes of a generation request's prompt, in prompt order (tools first, as the templates put them)."""
    if not isinstance(body, dict):
        return b""
    parts = []
    if body.get("tools"):
        parts.append(body["tools"])
    if body.get("instructions"):
        parts.append(body["instructions"])
    for field in ("messages", "input"):
        v = body.get(field)
        if isinstance(v, list):
            parts.extend(v)
        elif v is not None:
            parts.append(v)
    if body.get("prompt") is not None:
        parts.append(body["prompt"])
    return b"".join(json.dumps(p, sort_keys=True, separators=(",", ":")).encode() + b"\n" for p in parts)


def prompt_hashes(body: dict | None, config: RouterConfig = DEFAULT_CONFIG) -> list[int]:
    return block_hashes(prompt_text(body), config.block_tokens, config.summary_blocks)


def _str(v) -> str | None:
    return v if isinstance(v, str) and v else None


class Placement:
    def __init__(self, config: RouterConfig = DEFAULT_CONFIG, max_summary: int = 200_000,
                 clock: Callable[[], float] = time.monotonic):
        self.router = Router(config)
        self.config = config
        self.max_summary = max_summary
        self.inflight: dict[str, int] = {}
        self.summaries: dict[str, OrderedDict[int, None]] = {}
        self.draining: set[str] = set()
        # Replica -> when a call to it failed: not chosen for DEAD_SECONDS while Serve still lists it (it notices
        # a dead actor within seconds); after that it is tried again, so one transient failure costs little.
        self.dead: dict[str, float] = {}
        self.clock = clock
        self.sessions: dict[str, str | None] = {}  # session id -> Authorization header it was last used with
        self.lost: set[str] = set()  # keys whose replica died or left: their next request counts as recovered
        self.known: set[str] = set()  # replicas seen live
        self.left: dict[str, list[str]] = {}  # replica dropped -> session ids homed there then (insertion order)
        self.counts = {"migrated": 0, "recovered": 0}

    # ------------------------------------------------------------------ replicas
    def sync(self, live: frozenset[str]) -> None:
        """Forget replicas that are no longer live (died, scaled down); their keys become `lost`."""
        for r in list(self.known - live):
            self.drop(r)
        now = self.clock()
        self.dead = {r: t for r, t in self.dead.items() if r in live and now - t < DEAD_SECONDS}
        self.known |= live

    def drop(self, replica: str) -> None:
        """`replica` failed or left: its session table entries and summary go; it is not chosen again."""
        keys = self.router.remove_replica(replica)
        self.lost.update(keys)
        # Its sessions, for a replica that is stopping rather than dead: its hand-off (`Ingress.handoff_plan`)
        # may come after the handle stopped listing it. The last few replicas only.
        self.left[replica] = [k for k in keys if k in self.sessions]
        while len(self.left) > 16:
            self.left.pop(next(iter(self.left)))
        self.summaries.pop(replica, None)
        self.draining.discard(replica)
        self.dead[replica] = self.clock()
        self.known.discard(replica)

    def candidates(self, live: frozenset[str]) -> list[str]:
        ok = [r for r in live if r not in self.dead]
        serving = [r for r in ok if r not in self.draining]
        return sorted(serving or ok)  # every replica draining: drain is advisory, keep serving

    # ------------------------------------------------------------------ routing
    def choose(self, keys: Keys, hashes: list[int], live: frozenset[str]) -> RouteDecision:
        replicas = {r: ReplicaState(self.inflight.get(r, 0), self.summaries.get(r, ())) for r in self.candidates(live)}
        d = self.router.route(RequestInfo(replicas, session_id=keys.session_id,
                                          previous_response_id=keys.previous_response_id, block_hashes=hashes))
        if d.kind != "affine":
            self.recovering(keys)
        return d

    def recovering(self, keys: Keys) -> None:
        """The request is being placed away from the replica its session lived on, which died or left: count it
        (once per lost key)."""
        for key in (keys.session_id, keys.previous_response_id):
            if key is not None and key in self.lost:
                self.lost.discard(key)
                self.counts["recovered"] += 1
                break

    def begin(self, replica: str) -> None:
        self.inflight[replica] = self.inflight.get(replica, 0) + 1

    def end(self, replica: str) -> None:
        self.inflight[replica] = max(0, self.inflight.get(replica, 0) - 1)

    def placed(self, replica: str, method: str, keys: Keys, hashes: list[int], auth: str | None,
               answer_id: str | None) -> None:
        """A request succeeded (status < 400) on `replica`: learn where its session / response now lives."""
        if keys.session_route and method == "DELETE" and keys.previous_response_id is None:
            if keys.session_id is not None:
                self.router.forget(keys.session_id)
                self.sessions.pop(keys.session_id, None)
            return
        if method == "DELETE" and keys.previous_response_id is not None and not keys.generation:
            self.router.forget(keys.previous_response_id)
            return
        if keys.session_id is not None:
            self.router.record(keys.session_id, replica)
            self.sessions[keys.session_id] = auth
        if keys.session_route and answer_id and method == "POST" and not keys.generation:
            self.router.record(answer_id, replica)  # a created or forked session
            self.sessions[answer_id] = auth
        if keys.generation and answer_id:
            self.router.record(answer_id, replica, replaces=keys.previous_response_id)
        if keys.generation and hashes:
            s = self.summaries.setdefault(replica, OrderedDict())
            for h in hashes:
                s[h] = None
                s.move_to_end(h)
            while len(s) > self.max_summary:
                s.popitem(last=False)

    def homed_sessions(self, replica: str) -> list[str]:
        return [s for s in self.sessions if self.router.replica_of(s) == replica]

    def moved(self, session_id: str, replica: str) -> None:
        """A drain (or a stopping replica's hand-off) imported `session_id` on `replica`."""
        self.router.record(session_id, replica)
        self.lost.discard(session_id)  # it did not need recomputing
        self.counts["migrated"] += 1

    def metrics(self, live: frozenset[str]) -> str:
        """Prometheus text: decisions by kind, sessions migrated / recovered, replicas, requests in flight."""
        lines = ["# HELP deltaserve_cluster_route_decisions_total Routing decisions of the ingress, by kind.",
                 "# TYPE deltaserve_cluster_route_decisions_total counter"]
        for kind, n in self.router.counters().items():
            lines.append(f'deltaserve_cluster_route_decisions_total{{kind="{kind}"}} {n}')
        for name, help_ in (("migrated", "Sessions exported from a draining replica and imported on another."),
                            ("recovered", "Requests of sessions whose replica died or left, placed anew.")):
            lines += [f"# HELP deltaserve_cluster_sessions_{name}_total {help_}",
                      f"# TYPE deltaserve_cluster_sessions_{name}_total counter",
                      f"deltaserve_cluster_sessions_{name}_total {self.counts[name]}"]
        lines += ["# HELP deltaserve_cluster_replicas Engine replicas by state.",
                  "# TYPE deltaserve_cluster_replicas gauge"]
        serving = [r for r in live if r not in self.dead and r not in self.draining]
        lines.append(f'deltaserve_cluster_replicas{{state="serving"}} {len(serving)}')
        lines.append(f'deltaserve_cluster_replicas{{state="draining"}} {len(self.draining & live)}')
        lines += ["# HELP deltaserve_cluster_requests_in_flight Requests the ingress has sent to a replica, "
                  "not yet answered.", "# TYPE deltaserve_cluster_requests_in_flight gauge"]
        for r in sorted(live):
            lines.append(f'deltaserve_cluster_requests_in_flight{{replica="{r}"}} {self.inflight.get(r, 0)}')
        lines += ["# HELP deltaserve_cluster_sessions Sessions in the ingress's table, by replica.",
                  "# TYPE deltaserve_cluster_sessions gauge"]
        for r in sorted(live):
            lines.append(f'deltaserve_cluster_sessions{{replica="{r}"}} {len(self.homed_sessions(r))}')
        return "\n".join(lines) + "\n"
