"""Serve request router for the engine replicas: send each call to the replica the ingress chose.

The policy (`routing.Router`: affinity, prefix, bounded load) runs in the ingress, which alone sees the request
bodies, the session table and its own per-replica counts of requests in flight; it passes its choice as the
`replica=` keyword of the handle call, and this router, Ray Serve's `RequestRouter` extension point (ray >=
2.47), honours it. A choice that is not among the live candidates (the replica died or was removed since) falls
back to every candidate, least queued first: the request still runs, and the ingress learns from the response
which replica served it.

It also publishes the live replica ids (`live_replicas()`): the router runs in the ingress's process (handle
side), so that is how the ingress learns which replicas exist without polling the controller. Module-level
state (`_registry()`), written by the router's loop and read by the ingress: one frozenset replaced whole
(atomic under the GIL).
"""

from __future__ import annotations

import logging
import sys
from typing import List, Optional

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica



log = logging.getLogger("ray.serve")


class _Registry:
    live: frozenset[str] = frozenset()


def _registry() -> _Registry:
    # Looked up in sys.modules, not through this module's globals: Serve may run a copy of this class (unpickled
    # by value) whose globals are not the ones the ingress imported; sys.modules is the one table per process.
    return sys.modules.setdefault("deltaserve.cluster._pinned_registry", _Registry())  # type: ignore[return-value]


def live_replicas() -> frozenset[str]:
    """Ids of the engine replicas the handle currently routes to (empty until the handle's first call)."""
    return _registry().live


class PinnedRequestRouter(RequestRouter):
    def update_replicas(self, replicas: List[RunningReplica]):
        super().update_replicas(replicas)
        _registry().live = frozenset(r.replica_id.unique_id for r in replicas)

    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        target = None if pending_request is None else pending_request.kwargs.get("replica")
        if target is not None:
            for r in candidate_replicas:
                if r.replica_id.unique_id == target:
                    return [[r]]
        if target is not None:
            log.warning("replica %s is not among the %d this router knows (%s); routing to any", target,
                        len(candidate_replicas), ", ".join(r.replica_id.unique_id for r in candidate_replicas))
        return [sorted(candidate_replicas, key=lambda r: self.replica_queue_len_cache.get(r.replica_id) or 0)]
