"""Admin routes, served only with `--admin-key KEY` (`Authorization: Bearer KEY`, compared in constant time).

Without an admin key the routes answer 404 (they do not exist); with one, a missing or wrong key is 401.
Mutates nothing: `GET /v1/debug/integrity` runs the engine's invariant checks between steps.
"""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Request

from deltaserve.server.context import get_ctx
from deltaserve.server.errors import APIError

router = APIRouter()


def _check_admin(request: Request) -> None:
    key: str | None = getattr(request.app.state, "admin_key", None)
    if not key:
        raise APIError(404, f"Not found: {request.url.path}", code="not_found")
    auth = request.headers.get("authorization", "")
    token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
    if not hmac.compare_digest(token.encode(), key.encode()):
        raise APIError(401, "admin key required: send 'Authorization: Bearer <admin key>'", code="invalid_api_key")


@router.get("/v1/debug/integrity", summary="Check the engine's KV bookkeeping (admin)", include_in_schema=False)
async def integrity(request: Request) -> dict:
    _check_admin(request)
    return (await get_ctx(request).driver.check_integrity())._asdict()
