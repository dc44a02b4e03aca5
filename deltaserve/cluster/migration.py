"""Moving sessions between engine replicas: the admin drain, and the hand-off of a replica Serve is stopping.

Both export a session's state (`GET /v1/sessions/{id}/state`, under the key the session was last used with),
import it on the least loaded other serving replica (`PUT .../state`) and re-home it in the session table
(`Placement.moved`, counted `migrated`). They differ in who exports: a drain reaches the replica through the
engine handle; a stopping replica is no longer routed to, so it exports its own sessions (`replica.hand_off`,
from its `__del__`) after asking `handoff_plan` which, and hands the states to `adopt`.

A mixin of `ingress.Ingress`: it uses the ingress's `placement`, `_live`, `_open` and `_lock` (one migration at
a time), and mutates the placement's table, draining set and counters.
"""

import logging

import ray

from deltaserve.server.errors import APIError

log = logging.getLogger("deltaserve.cluster")


class Migration:
    async def drain(self, replica: str) -> dict:
        """Stop placing new sessions on `replica` and move each session homed there to another replica
        (export, import, table updated). A session that fails to move stays where it is (listed in `failed`)."""
        live = await self._live()
        if replica not in live:
            raise APIError(404, f"no replica {replica!r}", None, "not_found")
        async with self._lock:
            others = self._others(replica, live)
            if not others:
                raise APIError(409, "no other serving replica to move this replica's sessions to", None,
                               "no_other_replica")
            self.placement.draining.add(replica)
            moved, failed = [], []
            for sid in self.placement.homed_sessions(replica):
                hdrs = self._owner_headers(sid)
                try:
                    head, gen = await self._open("GET", f"/v1/sessions/{sid}/state", "", hdrs, b"", replica)
                    state = b"".join([c async for c in gen])
                    if head["status"] != 200:
                        failed.append({"id": sid, "status": head["status"]})
                        continue
                    if await self._import(sid, state, others, moved, failed):
                        # The old copy is closed (its KV becomes plain cache there), so one replica holds the pin.
                        head, gen = await self._open("DELETE", f"/v1/sessions/{sid}", "", hdrs, b"", replica)
                        b"".join([c async for c in gen])
                except ray.exceptions.RayError as e:
                    failed.append({"id": sid, "error": type(e).__name__})
        return {"id": replica, "state": "draining", "migrated": moved, "failed": failed}

    def _others(self, replica: str, live: frozenset[str]) -> list[str]:
        return [r for r in self.placement.candidates(live) if r != replica]

    def _owner_headers(self, sid: str) -> list[tuple[str, str]]:
        auth = self.placement.sessions.get(sid)  # export and import under the session owner's key
        return [("authorization", auth)] if auth else []

    async def _import(self, sid: str, state: bytes, others: list[str], moved: list, failed: list) -> bool:
        """Import one exported session on the least busy of `others` and home it there (the table and the
        `migrated` count change only when the import succeeded). Appends to `moved` or `failed`."""
        p = self.placement
        target = min(others, key=lambda r: (p.inflight.get(r, 0), p.router.homed(r), r))
        head, gen = await self._open("PUT", f"/v1/sessions/{sid}/state", "",
                                     self._owner_headers(sid) + [("content-type", "application/octet-stream")],
                                     state, target)
        answer = b"".join([c async for c in gen])
        if head["status"] != 200:
            failed.append({"id": sid, "status": head["status"], "error": answer[:200].decode(errors="replace")})
            return False
        p.moved(sid, head["replica"])
        moved.append({"id": sid, "to": head["replica"]})
        return True

    # ------------------------------------------------------------------ a replica stopping (replica.__del__)
    async def handoff_plan(self, replica: str) -> list[tuple[str, str | None]]:
        """`replica` is stopping (Serve scales it down, redeploys or shuts down): stop placing sessions there and
        return the sessions it should export, with their owners' Authorization headers. The stopping replica
        exports them itself (Serve no longer routes calls to it, so the ingress cannot) and hands the states to
        `adopt`. Empty when no other replica can take them: they recompute on their next turn instead."""
        live = await self._live()
        if not self._others(replica, live):
            return []
        p = self.placement
        if replica in live:
            p.draining.add(replica)
        # Sessions already placed anew elsewhere (their next turn came first) stay where they are now.
        left = [s for s in p.left.pop(replica, []) if p.router.replica_of(s) is None]
        sids = dict.fromkeys(p.homed_sessions(replica) + left)
        return [(sid, p.sessions.get(sid)) for sid in sids if sid in p.sessions]

    async def adopt(self, replica: str, states: list[tuple[str, bytes]]) -> dict:
        """Import sessions exported by the stopping `replica` on the others: the admin drain's import path."""
        live = await self._live()
        async with self._lock:
            others = self._others(replica, live)
            moved, failed = [], []
            for sid, state in states:
                if not others:
                    failed.append({"id": sid, "error": "no_other_replica"})
                    continue
                try:
                    await self._import(sid, state, others, moved, failed)
                except ray.exceptions.RayError as e:
                    failed.append({"id": sid, "error": type(e).__name__})
        log.info("replica %s stopping: %d session(s) moved, %d failed", replica, len(moved), len(failed))
        return {"id": replica, "migrated": moved, "failed": failed}

    async def undrain(self, replica: str) -> dict:
        self.placement.draining.discard(replica)
        return {"id": replica, "state": "serving"}
