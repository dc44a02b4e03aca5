"""Session routes: create, fork, inspect, list, change TTL, delete.

A session is a conversation whose KV stays pinned between turns (TTL seconds after each turn). Sessions are
also created implicitly by the first chat turn naming an unseen `session_id`. Every verb is one call of the
engine's typed API (`AsyncEngine`), whose `SessionInfo` is shown as is; a session of another API key is
reported as not found.
"""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Body, Depends, Request, Response

from deltaserve.engine.api import EngineError, SessionExists
from deltaserve.engine.api import SessionInfo as EngineSessionInfo
from deltaserve.server.context import get_ctx, get_owner
from deltaserve.server.errors import APIError, engine_errors, from_engine_error
from deltaserve.server.protocol import (CacheInfo, DeletedSession, SessionCreateRequest, SessionForkRequest,
                                        SessionInfo, SessionRollbackRequest, SessionTurn, SessionUpdateRequest,
                                        openapi_responses)

router = APIRouter()
_ERRORS = openapi_responses(400, 401, 404, 409)


def _shown(s: EngineSessionInfo) -> SessionInfo:
    m = s.last_match
    last = None if m is None else CacheInfo(reason=m.reason.value, cached_tokens=m.cached_tokens,
                                            prefilled_tokens=m.prefilled_tokens, diverged_at=m.diverged_at,
                                            detail=m.detail, restored_tokens=m.restored_tokens)
    return SessionInfo(id=s.session_id, state=s.state, busy=s.busy, pinned=s.pinned, tokens=s.tokens, ttl=s.ttl,
                       ttl_remaining=s.ttl_remaining, turns=s.turns, prompt_tokens=s.prompt_tokens,
                       cached_tokens=s.cached_tokens, prefilled_tokens=s.prefilled_tokens,
                       has_transcript=s.has_transcript, last_match=last,
                       history=[SessionTurn(turn=t.turn, end=t.end, has_transcript=t.has_transcript)
                                for t in s.history])


@router.post("/v1/sessions", response_model=SessionInfo, responses=_ERRORS, summary="Create a session")
async def create_session(request: Request, body: SessionCreateRequest | None = Body(default=None),
                         owner: str | None = Depends(get_owner)):
    body = body or SessionCreateRequest()
    sid = body.session_id or f"sess_{uuid.uuid4().hex[:24]}"
    with engine_errors(sid):
        return _shown(await get_ctx(request).driver.open_session(sid, owner, body.ttl))


@router.post("/v1/sessions/{session_id}/fork", response_model=SessionInfo, responses=_ERRORS,
             summary="Fork a session at its end or at turn k: a new session sharing its KV (no copy, no prefill)")
async def fork_session(session_id: str, request: Request, body: SessionForkRequest | None = Body(default=None),
                       owner: str | None = Depends(get_owner)):
    body = body or SessionForkRequest()
    new_id = body.session_id or f"sess_{uuid.uuid4().hex[:24]}"
    try:
        return _shown(await get_ctx(request).driver.fork_session(session_id, new_id, owner, body.ttl, body.turn))
    except SessionExists as e:
        raise from_engine_error(e, new_id) from e
    except (EngineError, ValueError) as e:
        raise from_engine_error(e, session_id) from e


@router.post("/v1/sessions/{session_id}/rollback", response_model=SessionInfo, responses=_ERRORS,
             summary="Truncate a session to the end of turn k (nothing recomputed; later turns become plain cache)")
async def rollback_session(session_id: str, body: SessionRollbackRequest, request: Request,
                           owner: str | None = Depends(get_owner)):
    with engine_errors(session_id):
        return _shown(await get_ctx(request).driver.rollback_session(session_id, owner, body.turn))


@router.get("/v1/sessions/{session_id}/state", responses={**_ERRORS, 200: {
    "description": "the session's state (token ids, turns, KV) in the session store's binary format",
    "content": {"application/octet-stream": {}}}}, response_class=Response,
            summary="Export a session: token ids, turns as messages, and KV, for PUT on another server")
async def export_state(session_id: str, request: Request, owner: str | None = Depends(get_owner)):
    with engine_errors(session_id):
        data = await get_ctx(request).driver.export_session(session_id, owner)
    return Response(data, media_type="application/octet-stream")


@router.put("/v1/sessions/{session_id}/state", response_model=SessionInfo, responses=openapi_responses(
    400, 401, 404, 409, 413, 429), openapi_extra={"requestBody": {"required": True, "content": {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}},
            summary="Import a session exported by GET .../state (same model, dtype and KV layout required)")
async def import_state(session_id: str, request: Request, owner: str | None = Depends(get_owner)):
    from deltaserve.store.format import StampMismatch, StoreError

    data = await request.body()
    try:
        with engine_errors(session_id):
            return _shown(await get_ctx(request).driver.import_session(session_id, owner, data))
    except StampMismatch as e:
        raise APIError(400, str(e), None, "stamp_mismatch") from e
    except StoreError as e:
        raise APIError(400, f"not a usable session state: {e}", None, "invalid_session_state") from e


@router.get("/v1/sessions", responses=_ERRORS, summary="List this key's sessions")
async def list_sessions(request: Request, owner: str | None = Depends(get_owner)) -> dict[str, Any]:
    infos = await get_ctx(request).driver.list_sessions(owner)
    return {"object": "list", "data": [_shown(i).model_dump() for i in infos]}


@router.get("/v1/sessions/{session_id}", response_model=SessionInfo, responses=_ERRORS,
            summary="Session state: tokens, pin, TTL left, counters, last cache-match explanation")
async def get_session(session_id: str, request: Request, owner: str | None = Depends(get_owner)):
    with engine_errors(session_id):
        return _shown(await get_ctx(request).driver.get_session(session_id, owner))


@router.patch("/v1/sessions/{session_id}", response_model=SessionInfo, responses=_ERRORS,
              summary="Change a session's pin TTL (counted from now)")
async def patch_session(session_id: str, body: SessionUpdateRequest, request: Request,
                        owner: str | None = Depends(get_owner)):
    with engine_errors(session_id):
        return _shown(await get_ctx(request).driver.set_session_ttl(session_id, owner, body.ttl))


@router.post("/v1/sessions/{session_id}/ttl", response_model=SessionInfo, responses=_ERRORS,
             summary="Change a session's pin TTL (same as PATCH)")
async def post_session_ttl(session_id: str, body: SessionUpdateRequest, request: Request,
                           owner: str | None = Depends(get_owner)):
    return await patch_session(session_id, body, request, owner)


@router.delete("/v1/sessions/{session_id}", response_model=DeletedSession, responses=_ERRORS,
               summary="Close a session; its KV stays as ordinary evictable prefix cache")
async def delete_session(session_id: str, request: Request, owner: str | None = Depends(get_owner)):
    with engine_errors(session_id):
        await get_ctx(request).driver.close_session(session_id, owner)
    return DeletedSession(id=session_id)
