"""Session-affine, prefix-aware routing policy across replicas, independent of Ray.

A Ray Serve request router (or a simulation) describes each request and the replicas it may choose from as a
`RequestInfo`, and `Router.route` answers with a `RouteDecision`, in this order:

  affine        the request's session id (or `previous_response_id`) is in the session table: the replica that
                holds that session's KV. No load bound here: moving a session costs recomputing its whole context.
  prefix        a new session goes to the replica whose prefix summary holds the longest run of the prompt's
                leading chained block hashes (system prompt + tools), if that replica is within the load bound;
                otherwise the next best match within the bound.
  fallback      the request had a preference that could not be honoured (an unknown `previous_response_id`, whose
                state is gone, or every replica holding its prefix is over the bound): the least loaded replica.
  least_loaded  nothing to go by (no session state, no prefix cached anywhere): the least loaded replica.

Bounded load (consistent hashing with bounded loads, Mirrokni et al. 2018): a prefix placement is allowed only if
`load <= (1 + epsilon) * mean_load + 1`, where load is the replica's queued + running requests, and, because an
affine session stays on its replica for all its turns, the same bound on the sessions the table homes there. The
instantaneous queue alone would let a popular prefix collect every new session while its replica is idle between
turns, and pay for it later. Ties go to the lower load, then fewer homed sessions, then the replica id.

Prefix summaries are sets of chained block hashes, as vLLM's prefix cache keys its blocks: h_i = H(h_{i-1},
tokens of block i), so h_i alone identifies the whole prefix up to block i, and a replica publishes the hashes of
the first `summary_blocks` blocks of the prompts it caches. H is BLAKE2b, not Python's `hash`, so every process
and Python version computes the same values.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Collection, Iterable, Mapping, NamedTuple, Sequence

KINDS = ("affine", "prefix", "least_loaded", "fallback")


@dataclass(frozen=True)
class RouterConfig:
    block_tokens: int = 64  # tokens a block; a partial last block is never hashed (it cannot be shared yet)
    summary_blocks: int = 32  # K: leading blocks hashed, for requests and for replicas' summaries
    epsilon: float = 0.25  # bounded-load slack: a prefix placement needs load <= (1 + eps) * mean + 1
    min_prefix_blocks: int = 1  # fewer matched blocks than this is not a prefix placement
    max_sessions: int = 1_000_000  # session table entries kept (least recently used dropped first)

    def __post_init__(self):
        if self.block_tokens < 1 or self.summary_blocks < 1 or self.epsilon < 0 or self.max_sessions < 1:
            raise ValueError(f"invalid RouterConfig: {self}")


class RouteDecision(NamedTuple):
    replica: str
    kind: str  # one of KINDS
    matched_blocks: int  # leading prompt blocks found in the replica's summary (0 unless kind == "prefix")


@dataclass
class ReplicaState:
    """What a replica publishes. `prefixes` may be any container (a live set the replica keeps up to date)."""

    load: int = 0  # queued + running requests
    prefixes: Collection[int] = frozenset()


@dataclass
class RequestInfo:
    """One request and the candidate replicas (replica id -> state). Block hashes win over token ids if both."""

    replicas: Mapping[str, ReplicaState]
    session_id: str | None = None
    previous_response_id: str | None = None
    prompt_token_ids: Sequence[int] | None = None
    block_hashes: Sequence[int] | None = None
    extra: dict = field(default_factory=dict)  # for the caller; the router ignores it


def block_hashes(token_ids: Sequence[int], block_tokens: int = 64, max_blocks: int | None = None,
                 parent: int = 0) -> list[int]:
    """Chained hashes of the full `block_tokens` blocks of `token_ids` (at most `max_blocks` of them)."""
    n = len(token_ids) // block_tokens
    if max_blocks is not None:
        n = min(n, max_blocks)
    out, h = [], parent
    for i in range(n):
        block = array("I", token_ids[i * block_tokens:(i + 1) * block_tokens]).tobytes()
        h = int.from_bytes(hashlib.blake2b(h.to_bytes(8, "little") + block, digest_size=8).digest(), "little")
        out.append(h)
    return out


def prefix_summary(prompts: Iterable[Sequence[int]], config: RouterConfig = RouterConfig()) -> set[int]:
    """The summary a replica publishes: every chained hash of the first K blocks of each cached prompt."""
    out: set[int] = set()
    for p in prompts:
        out.update(block_hashes(p, config.block_tokens, config.summary_blocks))
    return out


def matched_blocks(hashes: Sequence[int], summary: Collection[int]) -> int:
    """Leading hashes found in `summary` (chaining makes h_i imply h_0..h_{i-1}; stop at the first miss)."""
    n = 0
    for h in hashes:
        if h not in summary:
            break
        n += 1
    return n


class Router:
    """The routing policy. Mutable state: the session table (learnt by `record`, dropped by `forget`, LRU-bounded,
    cleared per replica by `remove_replica`), the homed-session count per replica derived from it, and the
    per-kind decision counters. `route` reads the replicas' states and never changes them."""

    def __init__(self, config: RouterConfig = RouterConfig()):
        self.config = config
        self._table: OrderedDict[str, str] = OrderedDict()  # session id / response id -> replica id
        self._homed: dict[str, int] = {}  # replica id -> entries of _table pointing at it
        self.counts: dict[str, int] = {k: 0 for k in KINDS}

    # ------------------------------------------------------------------ the session table
    def record(self, key: str, replica: str, replaces: str | None = None) -> None:
        """Learn from a response that `key` (a session id or a response id) lives on `replica`; mutates the table.
        `replaces`: the `previous_response_id` this response continues, dropped so a chain holds one entry."""
        if replaces is not None and replaces != key:
            self.forget(replaces)
        old = self._table.pop(key, None)
        if old is not None:
            self._homed[old] -= 1
        self._table[key] = replica
        self._homed[replica] = self._homed.get(replica, 0) + 1
        while len(self._table) > self.config.max_sessions:
            _, r = self._table.popitem(last=False)
            self._homed[r] -= 1

    def forget(self, key: str) -> None:
        """Drop `key` (its session was deleted or finished); mutates the table. Unknown keys are ignored."""
        r = self._table.pop(key, None)
        if r is not None:
            self._homed[r] -= 1

    def remove_replica(self, replica: str) -> list[str]:
        """Forget every key homed on `replica` (it left the cluster); returns them, in table order, for the caller
        to re-home (restore from a session store, or let their next request be placed as a new session)."""
        keys = [k for k, r in self._table.items() if r == replica]
        for k in keys:
            del self._table[k]
        self._homed.pop(replica, None)
        return keys

    def replica_of(self, key: str) -> str | None:
        return self._table.get(key)

    def homed(self, replica: str) -> int:
        return self._homed.get(replica, 0)

    def counters(self) -> dict[str, int]:
        """Decisions so far by kind (a copy), for metrics export."""
        return dict(self.counts)

    # ------------------------------------------------------------------ routing
    def route(self, req: RequestInfo) -> RouteDecision:
        """Choose a replica for `req`; counts the decision and touches the session's table entry (LRU), nothing
        else. The caller `record`s where the response came from. Raises ValueError when there is no replica."""
        replicas = req.replicas
        if not replicas:
            raise ValueError("no replica to route to")
        preferred = False
        for key in (req.previous_response_id, req.session_id):
            if key is None:
                continue
            r = self._table.get(key)
            if r is not None and r in replicas:
                self._table.move_to_end(key)
                return self._count(RouteDecision(r, "affine", 0))
        if req.previous_response_id is not None:
            preferred = True  # it continues a response whose state this router cannot place: lost or elsewhere
        hashes = req.block_hashes
        if hashes is None and req.prompt_token_ids is not None:
            hashes = block_hashes(req.prompt_token_ids, self.config.block_tokens, self.config.summary_blocks)
        hashes = list(hashes or ())[:self.config.summary_blocks]
        if hashes:
            n = len(replicas)
            eps = 1.0 + self.config.epsilon
            load_cap = eps * sum(s.load for s in replicas.values()) / n + 1
            homed_cap = eps * sum(self._homed.get(r, 0) for r in replicas) / n + 1
            matches = []
            for rid, s in replicas.items():
                m = matched_blocks(hashes, s.prefixes)
                if m >= self.config.min_prefix_blocks:
                    matches.append((-m, s.load, self._homed.get(rid, 0), rid))
            matches.sort()
            for neg_m, load, homed, rid in matches:
                if load <= load_cap and homed <= homed_cap:
                    return self._count(RouteDecision(rid, "prefix", -neg_m))
            preferred = preferred or bool(matches)
        best = min(replicas, key=lambda r: (replicas[r].load, self._homed.get(r, 0), r))
        return self._count(RouteDecision(best, "fallback" if preferred else "least_loaded", 0))

    def _count(self, d: RouteDecision) -> RouteDecision:
        self.counts[d.kind] += 1
        return d
