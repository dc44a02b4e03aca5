"""The cluster's HTTP ingress: every route of `deltaserve serve`, proxied to the engine replica the policy picks.

One Serve deployment with a FastAPI ingress. For each request it reads the routing keys and the prompt's prefix
hashes (`placement.py`), asks the `Router` (`routing.py`) for a replica, and replays the request there through
the engine deployment's handle (`replica.EngineReplica.forward`, pinned by `pinned.PinnedRequestRouter`). The
replica's status, headers and body come back unchanged (SSE streamed as it is produced), so routes, errors, auth
and streaming are the single server's own; the ingress adds only its routes below.

Why the ingress decides and the Serve request router only pins: the policy needs the request body (session id,
previous_response_id, prompt) and the session table learnt from responses (response ids), which a Serve request
router does not see; the ingress sees both, and one ingress replica keeps one table.

Failure: a call that fails before the replica answered (its actor died) marks that replica dead and is placed
again (at most `_ATTEMPTS` times), so a session whose replica died is answered by another one, recomputing its
context from the request's full messages (chat completions carry the whole history). A Responses request whose
`previous_response_id` lived on a replica that is gone is re-sent with the chain's transcript as its input
(`transcripts.py`). A stream cut after its first byte cannot be replayed and ends early.

Routes of its own: `GET /health`, `GET /metrics` (routing counters, `Placement.metrics`), `GET /v1/sessions`
(merged from every replica), and, with `--admin-key`, `GET /admin/replicas`, `POST /admin/replicas/{id}/drain`
(export each session homed there, import it on another replica, and stop placing new sessions there),
`POST /admin/replicas/{id}/undrain`, `GET /admin/replicas/{id}/metrics` (that replica's own /metrics). Drains and
a stopping replica's hand-off are `migration.py`'s.
"""

import asyncio
import dataclasses
import hmac
import json
import logging

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve

from deltaserve.cluster.migration import Migration
from deltaserve.cluster.pinned import live_replicas
from deltaserve.cluster.placement import Placement, prompt_hashes, request_keys
from deltaserve.cluster.transcripts import TranscriptStore, final_response
from deltaserve.server.errors import APIError, install_error_handlers
from deltaserve.server.limits import DEFAULT_MAX_REQUEST_BYTES, BodySizeLimitMiddleware

log = logging.getLogger("deltaserve.cluster")

_ATTEMPTS = 3  # placements tried for one request when replicas fail before answering
_DROP_RESPONSE = {"content-length", "transfer-encoding", "connection", "keep-alive", "date", "server"}

class Ingress(Migration):
    """The deployment class (wrapped by `serve.deployment` + `serve.ingress(app)` in `app.py`).

    Mutable state: `self.placement` (session table, loads, summaries, counters), updated on each response."""

    def __init__(self, engine, admin_key: str | None = None):
        self.engine = engine  # DeploymentHandle of EngineReplica
        self.admin_key = admin_key
        self.placement = Placement()
        self.transcripts = TranscriptStore()  # Responses chains, to answer them when their replica is gone
        self._lock = asyncio.Lock()  # a drain runs alone

    async def _live(self) -> frozenset[str]:
        live = live_replicas()
        if not live:  # the handle's router starts on its first call; make one
            await self.engine.whoami.remote(replica=None)
            live = live_replicas()
        self.placement.sync(live)
        return live

    # ------------------------------------------------------------------ the proxy
    async def _open(self, method: str, path: str, query: str, headers, body: bytes, replica: str):
        """Send one request to `replica`; returns (head, generator) once the replica answered its head."""
        gen = self.engine.options(stream=True).forward.remote(method, path, query, headers, body, replica=replica)
        try:
            head = await gen.__anext__()
        except BaseException:
            gen.cancel()
            raise
        return head, gen

    async def proxy(self, request: Request) -> Response:
        method, path, query = request.method, request.url.path, request.url.query
        body = await request.body()
        headers = list(request.headers.items())
        lower = {k.lower(): v for k, v in headers}
        auth = lower.get("authorization")
        parsed = None
        if body and method in ("POST", "PUT", "PATCH") and "json" in lower.get("content-type", ""):
            try:
                parsed = json.loads(body)
            except ValueError:
                parsed = None  # the replica answers the 400
        keys = request_keys(method, path, lower, parsed)
        hashes = prompt_hashes(parsed) if keys.generation else []
        # A Responses request: its answer's transcript is kept (`transcripts.py`); `chain` is what it continues.
        chain = Chain(parsed) if method == "POST" and path == "/v1/responses" and isinstance(parsed, dict) else None
        if chain and keys.previous_response_id and not self._holds(keys.previous_response_id):
            body, keys, hashes = self._rebuilt(chain, auth, body, keys, hashes, True)  # its replica is gone
        last_error: Exception | None = None
        counted = False  # this request was counted `recovered` (once a request, whichever way it recovered)
        for _ in range(_ATTEMPTS):
            live = await self._live()
            if not self.placement.candidates(live):
                break
            was_lost = keys.previous_response_id in self.placement.lost or keys.session_id in self.placement.lost
            d = self.placement.choose(keys, hashes, live)
            counted = counted or (was_lost and d.kind != "affine")  # `Placement.recovering` counted it
            self.placement.begin(d.replica)
            try:
                head, gen = await self._open(method, path, query, headers, body, d.replica)
            except ray.exceptions.RayError as e:  # died before answering: nothing was sent, place it again
                self.placement.end(d.replica)
                self.placement.drop(d.replica)
                log.warning("replica %s failed (%s); placing the request again", d.replica, type(e).__name__)
                last_error = e
                continue
            served = head["replica"]
            if served != d.replica:  # the request router did not have the chosen replica (gone, or not yet
                self.placement.end(d.replica)  # listed) and sent the request elsewhere; its answer re-homes the
                self.placement.begin(served)  # session below; the chosen one leaves at `sync` if it is gone
                if d.kind == "affine" and not counted:
                    self.placement.counts["recovered"] += 1
                    counted = True
            if chain and keys.previous_response_id and head["status"] == 404 \
                    and self.transcripts.rebuild(auth, chain.body) is not None:
                # The replica lost a response this ingress saw (evicted, restarted, or the table pointed at the
                # wrong replica): answer from the transcript rather than pass the 404 on.
                try:
                    data = b"".join([c async for c in gen])
                finally:
                    self.placement.end(served)
                if _error_code(data) == "response_not_found":
                    self.placement.router.forget(keys.previous_response_id)
                    body, keys, hashes = self._rebuilt(chain, auth, body, keys, hashes, not counted)
                    if keys.previous_response_id is None:  # rebuilt; else the 404 stands
                        counted = True
                        continue
                return Response(data, status_code=404, headers=dict(_merge(head["headers"])))
            return await self._answer(method, keys, hashes, auth, head, gen, served, chain)
        self.placement.sync(live_replicas())
        why = type(last_error).__name__ if last_error else "none running"
        raise APIError(503, f"no engine replica could take the request ({why})", None, "no_replica",
                       headers={"Retry-After": "1"})

    def _holds(self, response_id: str) -> bool:
        """Whether the session table places `response_id` on a replica that can still take requests."""
        r = self.placement.router.replica_of(response_id)
        return r is not None and r in self.placement.candidates(live_replicas())

    def _rebuilt(self, chain: "Chain", auth, body: bytes, keys, hashes, count: bool):
        """The request with the chain's transcript as `input` (no previous_response_id), counted `recovered`;
        unchanged when this ingress does not know the chain (the replica's answer, a 404, stands)."""
        new = self.transcripts.rebuild(auth, chain.body)
        if new is None:
            return body, keys, hashes
        chain.prior = self.transcripts.get(auth, chain.body.get("previous_response_id"))
        self.placement.lost.discard(keys.previous_response_id)
        if count:
            self.placement.counts["recovered"] += 1
        keys = dataclasses.replace(keys, previous_response_id=None)
        return json.dumps(new).encode(), keys, prompt_hashes(new)

    async def _answer(self, method, keys, hashes, auth, head, gen, replica, chain=None) -> Response:
        status = head["status"]
        out_headers = [(k, v) for k, v in head["headers"] if k.lower() not in _DROP_RESPONSE]
        out_headers.append(("x-deltaserve-replica", replica))  # which replica answered (logs, tests)
        ctype = next((v for k, v in out_headers if k.lower() == "content-type"), "")
        ok = status < 400
        if not ctype.startswith("text/event-stream"):
            try:
                data = b"".join([c async for c in gen])
            finally:
                self.placement.end(replica)
            if ok:
                self.placement.placed(replica, method, keys, hashes, auth, _json_id(data))
                if chain is not None:
                    self._keep(auth, chain, _json(data))
            return Response(data, status_code=status, headers=dict(_merge(out_headers)))
        if ok:  # record the session before any byte is sent: the client may send its next turn at once
            self.placement.placed(replica, method, keys, [], auth, None)

        async def stream():
            buf, found = b"", not keys.generation
            tail = b"" if ok and chain is not None else None  # the current event, while looking for the last
            try:
                async for chunk in gen:
                    if not found:  # the first event carries the response id (chat chunk `id`, `response.id`)
                        buf += chunk
                        if b"\n\n" in buf:
                            found = True
                            self.placement.placed(replica, method, keys, hashes, auth, _sse_id(buf))
                    if tail is not None:  # only the event being read is held, not the stream
                        tail += chunk
                        *events, tail = tail.split(b"\n\n")
                        for ev in events:
                            final = final_response(ev)
                            if final is not None:
                                self._keep(auth, chain, final)
                    yield chunk
            finally:
                gen.cancel()  # the client went away (or we are done): abort the generation on the replica
                self.placement.end(replica)

        return StreamingResponse(stream(), status_code=status, headers=dict(_merge(out_headers)),
                                 media_type=ctype)

    def _keep(self, auth, chain: "Chain", response) -> None:
        self.transcripts.record(auth, chain.body, response, chain.prior)

    # ------------------------------------------------------------------ routes of the ingress
    async def health(self) -> Response:
        live = await self._live()
        n = len(self.placement.candidates(live))
        return JSONResponse({"status": "ok" if n else "no_replica", "replicas": n}, status_code=200 if n else 503)

    async def metrics(self) -> Response:
        live = await self._live()
        return Response(self.placement.metrics(live), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def list_sessions(self, request: Request) -> Response:
        """Every replica's `GET /v1/sessions` for this key, merged (a session lives on one replica)."""
        live = await self._live()
        headers = list(request.headers.items())
        data, last = [], None
        for r in self.placement.candidates(live):
            head, gen = await self._open("GET", "/v1/sessions", "", headers, b"", r)
            body = b"".join([c async for c in gen])
            if head["status"] >= 400:
                return Response(body, status_code=head["status"], headers=dict(_merge(head["headers"])))
            data += json.loads(body)["data"]
            last = head
        if last is None:
            raise APIError(503, "no engine replica is running", None, "no_replica")
        return JSONResponse({"object": "list", "data": data})

    def check_admin(self, request: Request) -> None:
        if not self.admin_key:
            raise APIError(404, f"Not found: {request.url.path}", code="not_found")
        auth = request.headers.get("authorization", "")
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), self.admin_key.encode()):
            raise APIError(401, "admin key required: send 'Authorization: Bearer <admin key>'", code="invalid_api_key")

    async def replicas(self) -> dict:
        live = await self._live()
        p = self.placement
        return {"object": "list", "data": [
            {"id": r, "state": "dead" if r in p.dead else "draining" if r in p.draining else "serving",
             "in_flight": p.inflight.get(r, 0), "sessions": len(p.homed_sessions(r))} for r in sorted(live)]}

    async def replica_metrics(self, replica: str) -> Response:
        live = await self._live()
        if replica not in live:
            raise APIError(404, f"no replica {replica!r}", None, "not_found")
        head, gen = await self._open("GET", "/metrics", "", [], b"", replica)
        return Response(b"".join([c async for c in gen]), status_code=head["status"],
                        headers=dict(_merge(head["headers"])))


def _merge(headers):
    """Header pairs to a dict-able list, dropping hop-by-hop ones (repeated names joined, as HTTP allows)."""
    out: dict[str, str] = {}
    for k, v in headers:
        if k.lower() in _DROP_RESPONSE:
            continue
        out[k] = f"{out[k]}, {v}" if k in out else v
    return out.items()


class Chain:
    """A `/v1/responses` request being proxied: its body as the client sent it, and the transcript it continues
    once the ingress rebuilt it (None while it still names its `previous_response_id`)."""

    def __init__(self, body: dict):
        self.body = body
        self.prior = None


def _json(data: bytes):
    try:
        return json.loads(data)
    except ValueError:
        return None


def _error_code(data: bytes) -> str | None:
    v = _json(data)
    e = v.get("error") if isinstance(v, dict) else None
    return e.get("code") if isinstance(e, dict) else None


def _json_id(data: bytes) -> str | None:
    v = _json(data)
    if v is None:
        return None
    return v.get("id") if isinstance(v, dict) and isinstance(v.get("id"), str) else None


def _sse_id(buf: bytes) -> str | None:
    """The id in a stream's first `data:` event: a chat chunk's `id`, a Responses event's `response.id`."""
    for line in buf.split(b"\n"):
        if line.startswith(b"data:"):
            try:
                v = json.loads(line[5:])
            except ValueError:
                return None
            if isinstance(v, dict):
                r = v.get("response")
                if isinstance(r, dict) and isinstance(r.get("id"), str):
                    return r["id"]
                return v.get("id") if isinstance(v.get("id"), str) else None
    return None


def make_ingress(allowed_origins: list[str] | None = None, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES):
    """A new FastAPI app and the Ingress class serving it (`serve.ingress` needs the routes on the class)."""
    app = FastAPI(title="deltaserve cluster", version="0.1.0",
                  description="OpenAI-compatible ingress of `deltaserve cluster`; see docs/API.md.")
    install_error_handlers(app)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=max_request_bytes)  # the replicas take any size
    if allowed_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=allowed_origins, allow_methods=["*"],
                           allow_headers=["*"], allow_credentials=False)

    @serve.ingress(app)
    class ClusterIngress(Ingress):
        @app.get("/health")
        async def _health(self):
            return await self.health()

        @app.get("/metrics")
        async def _metrics(self):
            return await self.metrics()

        @app.get("/v1/sessions")
        async def _list_sessions(self, request: Request):
            return await self.list_sessions(request)

        @app.get("/admin/replicas")
        async def _replicas(self, request: Request):
            self.check_admin(request)
            return await self.replicas()

        @app.post("/admin/replicas/{replica}/drain")
        async def _drain(self, replica: str, request: Request):
            self.check_admin(request)
            return await self.drain(replica)

        @app.post("/admin/replicas/{replica}/undrain")
        async def _undrain(self, replica: str, request: Request):
            self.check_admin(request)
            return await self.undrain(replica)

        @app.get("/admin/replicas/{replica}/metrics")
        async def _replica_metrics(self, replica: str, request: Request):
            self.check_admin(request)
            return await self.replica_metrics(replica)

        @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
                       include_in_schema=False)
        async def _proxy(self, path: str, request: Request):
            return await self.proxy(request)

    return ClusterIngress
