"""Session routes: create, inspect, list, change TTL, delete.

A session is a conversation whose KV stays pinned between turns (TTL
seconds after each turn). Sessions are also created implicitly by the first
chat turn naming an unseen `session_id`. Every read of engine state happens
on the engine thread (`driver.call`), and a session of another API key is
reported as not found.
"""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Body, Depends, Request

from deltaserve.engine.engine import EngineError, LLMEngine, SessionBusy, SessionNotFound
from deltaserve.server.context import ServerContext, get_ctx, get_owner
from deltaserve.server.errors import APIError, from_engine_error, session_not_found
from deltaserve.server.protocol import (CacheInfo, DeletedSession, ErrorResponse, SessionCreateRequest,
                                        SessionInfo, SessionUpdateRequest)

router = APIRouter()
_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 409)}


def _snapshot(engine: LLMEngine, session_id: str, owner: str | None, has_transcript: bool) -> SessionInfo | None:
    """Engine thread: the session as the API shows it, or None if absent or someone else's."""
    s = engine.get_session(session_id)
    if s is None or s.owner != owner:
        return None
    now = engine.kv.sessions.clock()
    expired = s.pinned and s.pin_expires_at <= now
    if s.pinned:
        state = "expired" if expired else "pinned"
    elif s.unpin_reason is not None:
        state = s.unpin_reason.value
    else:
        state = "new" if not s.tokens else "unpinned"
    m = s.last_match
    last = None if m is None else CacheInfo(reason=m.reason.value, cached_tokens=m.cached_tokens,
                                            prefilled_tokens=m.prefilled_tokens, diverged_at=m.diverged_at,
                                            detail=m.detail)
    busy = engine.session_busy(session_id)
    return SessionInfo(id=session_id, state=state, busy=busy, pinned=s.pinned and not expired, tokens=len(s.tokens),
                       ttl=s.ttl, ttl_remaining=max(0.0, s.pin_expires_at - now) if s.pinned else None,
                       turns=s.turns, prompt_tokens=s.prompt_tokens, cached_tokens=s.cached_tokens,
                       prefilled_tokens=s.prefilled_tokens, has_transcript=has_transcript, last_match=last)


def _has_transcript(ctx: ServerContext, session_id: str, owner: str | None) -> bool:
    e = ctx.sessions.get(session_id)
    return e is not None and e.owner == owner and e.transcript is not None


async def session_info(ctx: ServerContext, session_id: str, owner: str | None) -> SessionInfo:
    has = _has_transcript(ctx, session_id, owner)
    info = await ctx.driver.call(lambda e: _snapshot(e, session_id, owner, has))
    if info is None:
        raise session_not_found(session_id)
    return info


@router.post("/v1/sessions", response_model=SessionInfo, responses=_ERRORS, summary="Create a session")
async def create_session(request: Request, body: SessionCreateRequest | None = Body(default=None),
                         owner: str | None = Depends(get_owner)):
    ctx = get_ctx(request)
    body = body or SessionCreateRequest()
    sid = body.session_id or f"sess_{uuid.uuid4().hex[:24]}"

    def create(engine: LLMEngine) -> None:
        if engine.get_session(sid) is not None:
            raise APIError(409, f"session {sid!r} already exists", "session_id", "session_exists")
        engine.open_session(sid, owner, body.ttl)

    try:
        await ctx.driver.call(create)
    except (EngineError, ValueError) as e:
        raise from_engine_error(e, sid) from e
    ctx.sessions.ensure(sid, owner)
    return await session_info(ctx, sid, owner)


@router.get("/v1/sessions", responses=_ERRORS, summary="List this key's sessions")
async def list_sessions(request: Request, owner: str | None = Depends(get_owner)) -> dict[str, Any]:
    ctx = get_ctx(request)

    def snap(engine: LLMEngine) -> list[SessionInfo]:
        out = []
        for s in engine.kv.sessions.list():
            info = _snapshot(engine, s.session_id, owner, False)
            if info is not None:
                out.append(info)
        return out

    infos = await ctx.driver.call(snap)
    for i in infos:
        i.has_transcript = _has_transcript(ctx, i.id, owner)
    return {"object": "list", "data": [i.model_dump() for i in infos]}


@router.get("/v1/sessions/{session_id}", response_model=SessionInfo, responses=_ERRORS,
            summary="Session state: tokens, pin, TTL left, counters, last cache-match explanation")
async def get_session(session_id: str, request: Request, owner: str | None = Depends(get_owner)):
    return await session_info(get_ctx(request), session_id, owner)


async def _set_ttl(ctx: ServerContext, session_id: str, owner: str | None, ttl: float) -> SessionInfo:
    def update(engine: LLMEngine) -> bool:
        s = engine.get_session(session_id)
        if s is None or s.owner != owner:
            return False
        engine.set_session_ttl(session_id, ttl)
        return True

    if not await ctx.driver.call(update):
        raise session_not_found(session_id)
    return await session_info(ctx, session_id, owner)


@router.patch("/v1/sessions/{session_id}", response_model=SessionInfo, responses=_ERRORS,
              summary="Change a session's pin TTL (counted from now)")
async def patch_session(session_id: str, body: SessionUpdateRequest, request: Request,
                        owner: str | None = Depends(get_owner)):
    return await _set_ttl(get_ctx(request), session_id, owner, body.ttl)


@router.post("/v1/sessions/{session_id}/ttl", response_model=SessionInfo, responses=_ERRORS,
             summary="Change a session's pin TTL (same as PATCH)")
async def post_session_ttl(session_id: str, body: SessionUpdateRequest, request: Request,
                           owner: str | None = Depends(get_owner)):
    return await _set_ttl(get_ctx(request), session_id, owner, body.ttl)


@router.delete("/v1/sessions/{session_id}", response_model=DeletedSession, responses=_ERRORS,
               summary="Close a session; its KV stays as ordinary evictable prefix cache")
async def delete_session(session_id: str, request: Request, owner: str | None = Depends(get_owner)):
    ctx = get_ctx(request)

    def close(engine: LLMEngine) -> None:
        s = engine.get_session(session_id)
        if s is None or s.owner != owner:
            raise SessionNotFound(session_id)
        engine.close_session(session_id)

    try:
        await ctx.driver.call(close)
    except (SessionBusy, SessionNotFound) as e:
        raise from_engine_error(e, session_id) from e
    ctx.sessions.drop(session_id)
    return DeletedSession(id=session_id)
