"""One engine replica of `deltaserve cluster`: the `deltaserve serve` app, unchanged, behind a Serve deployment.

Each replica builds the engine and `create_app` exactly as `deltaserve serve` does, and runs that app under its
own uvicorn on a loopback port (`ServerThread`), so lifespan, auth, limits, errors, SSE framing and client
disconnects (which abort generation) behave as on a single server. The ingress reaches it only through the Serve
handle: `forward` replays one HTTP request against the local port and streams the answer back as a generator
(first item: status, headers and this replica's id; then body chunks). Going through the handle, not straight to
the port, is what lets Serve count each replica's ongoing requests for autoscaling and notice dead replicas.

Stopping: when Serve stops a replica gracefully (scale-down, redeploy, shutdown), its `__del__` hands its sessions
to the other replicas through the ingress (`hand_off`) before the server stops, as an admin drain would.

Mutable state: the engine (sessions, caches) and the uvicorn thread, both owned here for the actor's life.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from typing import AsyncIterator

import httpx
from ray import serve

log = logging.getLogger("deltaserve.cluster")

INGRESS = "Ingress"  # the ingress deployment's name (app.py)
# Hop-by-hop or recomputed headers: the loopback client sets its own.
_DROP_REQUEST = {"host", "content-length", "connection", "transfer-encoding", "keep-alive", "accept-encoding"}


def replica_id() -> str:
    """This Serve replica's unique id (the id the request router sees)."""
    return serve.get_replica_context().replica_id.unique_id


class EngineReplica:
    """The deployment class (wrapped by `serve.deployment` in `app.py`, which sets replicas and CPUs)."""

    def __init__(self, args: argparse.Namespace):
        from deltaserve import env
        from deltaserve.engine.args import build_engine
        from deltaserve.engine.async_engine import AsyncEngine
        from deltaserve.server.app import create_app
        from deltaserve.server.testing import ServerThread

        keys = list(args.api_key or [])
        if env.api_key():
            keys.append(env.api_key())
        engine = AsyncEngine.build(lambda: build_engine(args))
        app = create_app(engine, args.served_model_name or args.model, keys or None,
                         # The ingress bounds client bodies (--max-request-bytes); a drain's import of a whole
                         # session's KV (23 KB a token for SmolLM2 bf16) comes from the ingress itself.
                         max_request_bytes=0, admin_key=args.admin_key,
                         allowed_origins=None,  # CORS is the ingress's business; the port is loopback only
                         stats_interval=args.stats_interval or None, tenant_header=args.tenant_header,
                         log_requests=args.log_requests, enforce_strict_tools=args.enforce_strict_tools,
                         shutdown_timeout=args.shutdown_timeout)
        self.id = replica_id()
        # Serve kills the actor graceful_shutdown_timeout_s (= --shutdown-timeout) after asking it to stop.
        self.handoff_timeout = max(1.0, 0.8 * args.shutdown_timeout)
        self.server = ServerThread(app, log_level="warning").start(timeout=600)
        # No timeout on reads: a long generation may go minutes between chunks only if the engine is stalled,
        # and the client's own timeout (at the ingress) is the one that should decide.
        self.client = httpx.AsyncClient(base_url=self.server.base_url, timeout=httpx.Timeout(None, connect=10))
        log.info("replica %s serving on %s (pid %d)", self.id, self.server.base_url, os.getpid())

    async def forward(self, method: str, path: str, query: str, headers: list[tuple[str, str]], body: bytes,
                      replica: str | None = None) -> AsyncIterator:
        """Replay one request on the local app; yields {"status", "headers", "replica"} then the body's chunks.
        `replica` is the id the ingress asked for (read by the request router, unused here)."""
        hdrs = [(k, v) for k, v in headers if k.lower() not in _DROP_REQUEST]
        req = self.client.build_request(method, path + ("?" + query if query else ""), headers=hdrs,
                                        content=body)
        resp = await self.client.send(req, stream=True)
        try:
            yield {"status": resp.status_code, "headers": list(resp.headers.multi_items()), "replica": self.id}
            async for chunk in resp.aiter_raw():
                yield chunk
        finally:
            await resp.aclose()  # on cancellation too: closing the connection aborts the request in the app

    async def whoami(self, replica: str | None = None) -> str:
        return self.id

    async def die(self, replica: str | None = None) -> str:
        """Test hook: end this replica's process at once, as a crash would (no drain, no session export).
        Only when `replica` names this one: a call the request router re-sent elsewhere (its target was gone,
        or Serve retried it after the target died) must not take a second replica down."""
        if replica != self.id:
            return self.id
        os._exit(1)

    async def check_health(self) -> None:
        """Serve's health check: the uvicorn thread must be alive (a dead engine thread shows in /health)."""
        if not self.server._thread.is_alive():
            raise RuntimeError("the replica's HTTP server thread exited")

    async def hand_off(self, replica: str | None = None) -> dict:
        """Move this replica's sessions to the others before it stops: ask the ingress which sessions live here
        (`Ingress.handoff_plan`, which also stops placing new ones here), export each from the local app under
        its owner's key, and give the states to the ingress to import elsewhere (`Ingress.adopt`, the admin
        drain's import path). Called by `__del__`; `replica` (the request router's pin) lets a test call it.
        Returns the ingress's summary; {} when there was nothing to move or no ingress to ask."""
        ingress = serve.get_deployment_handle(INGRESS, app_name=serve.get_replica_context().app_name)
        plan = await ingress.handoff_plan.remote(self.id)
        states = []
        for sid, auth in plan:
            r = await self.client.get(f"/v1/sessions/{sid}/state", headers={"authorization": auth} if auth else {})
            if r.status_code == 200:  # gone meanwhile (closed, expired): nothing to move
                states.append((sid, r.content))
        if not states:
            return {}
        out = await ingress.adopt.remote(self.id, states)
        auths = dict(plan)
        for m in out["migrated"]:  # one replica holds each session (matters when this replica keeps running)
            auth = auths.get(m["id"])
            await self.client.delete(f"/v1/sessions/{m['id']}", headers={"authorization": auth} if auth else {})
        return out

    async def __del__(self):
        """Serve's graceful stop (scale-down, redeploy, shutdown), once requests in flight are done: hand the
        sessions off, within the time Serve gives (`graceful_shutdown_timeout_s`), then stop the server. On a
        shutdown of the whole application the ingress may be gone first; the sessions then simply end here."""
        try:
            out = await asyncio.wait_for(self.hand_off(), timeout=self.handoff_timeout)
            if out:
                log.info("replica %s handed off %d session(s) (%d failed)", self.id, len(out["migrated"]),
                         len(out["failed"]))
        except Exception as e:  # noqa: BLE001 - stopping anyway; unmoved sessions recompute on their next turn
            log.warning("replica %s: session hand-off failed (%s)", self.id, type(e).__name__)
        try:
            await self.client.aclose()
            self.server.stop(timeout=5)
        except Exception:  # noqa: BLE001 - interpreter shutdown; nothing to save
            pass
