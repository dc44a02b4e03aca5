"""Everything a request handler needs, in one object hung on `app.state.ctx`.

The engine is reached only through `ctx.driver` (`engine/async_engine.py`: named methods, immutable results);
its immutable facts (tokenizer, context length, vocabulary size, stop tokens) are copied here from
`driver.info`.

Auth: with API keys configured, every /v1 route needs `Authorization: Bearer <key>`. A request's *owner* is a
fingerprint of its key (never the key itself, so nothing secret is kept in sessions); sessions and stored
responses belong to their owner, and another key sees them as nonexistent (404), which does not reveal whether
an id is in use.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from typing import Any

from fastapi import Request

from deltaserve.engine.async_engine import AsyncEngine
from deltaserve.server.errors import APIError, bad_request
from deltaserve.server.metrics import Metrics

# End-of-turn tokens first: a grammar ends the turn with the first of its EOS ids,
# and a chat transcript should end the way the template would render it.
_EOT_PREFERENCE = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>")


def key_fingerprint(key: str) -> str:
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]


class ServerContext:
    def __init__(self, driver: AsyncEngine, model_name: str, api_keys: list[str] | None = None):
        info = driver.info
        if info.tokenizer is None:
            raise ValueError("the server needs an engine with a tokenizer")
        self.driver = driver
        self.tokenizer = info.tokenizer
        self.vocab_size = info.vocab_size
        self.model_name = model_name
        self.max_context = info.max_context
        self.stop_ids = info.stop_ids
        self.sampling_defaults = info.sampling_defaults  # SamplingDefaults or None
        self.created = int(time.time())
        self._keys = [k for k in (api_keys or []) if k]
        self.tenant_header: str | None = None  # create_app sets it from --tenant-header
        self.log_requests = False  # create_app sets it from --log-requests: prompts and outputs in the log
        # --[no-]enforce-strict-tools: `strict` tools under tool_choice auto get the text-or-calls grammar, which
        # leaves an output alone unless it would hold a call with invalid arguments (create_app: on by default)
        self.enforce_strict_tools = True
        self.grammar_timeout = 10.0  # seconds a request's output grammar may take to compile (else 400)
        self.metrics = Metrics()
        self._grammar: Any = None
        self._grammar_lock = asyncio.Lock()

    # ------------------------------------------------------------------ auth
    def authenticate(self, request: Request) -> str | None:
        """The request's owner (None when no keys are configured); 401 on a missing or wrong key."""
        if not self._keys:
            return None
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else ""
        if not token:
            raise APIError(401, "Missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        for k in self._keys:
            if hmac.compare_digest(token.encode(), k.encode()):
                return key_fingerprint(k)
        raise APIError(401, "Incorrect API key provided", code="invalid_api_key")

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist; this server serves `{self.model_name}`",
                           "model", "model_not_found")

    # --------------------------------------------------------------- grammar
    async def grammar_compiler(self) -> Any:
        """The GrammarCompiler for this tokenizer, built on first use (it takes a few seconds)."""
        if self._grammar is None:
            async with self._grammar_lock:
                if self._grammar is None:
                    try:
                        from deltaserve.server.grammar import GrammarCompiler
                    except ImportError as e:
                        raise bad_request(f"constrained decoding is unavailable on this server: {e}",
                                          code="unsupported") from e
                    hf = self.tokenizer.hf
                    self._grammar = await asyncio.to_thread(
                        GrammarCompiler, hf, self.vocab_size, self.eos_ids_for_grammar())
        return self._grammar

    def eos_ids_for_grammar(self) -> list[int]:
        hf = self.tokenizer.hf
        ordered: list[int] = []
        for t in _EOT_PREFERENCE:
            tid = hf.convert_tokens_to_ids(t)
            if isinstance(tid, int) and tid in self.stop_ids and tid not in ordered:
                ordered.append(tid)
        ordered += sorted(self.stop_ids - set(ordered))
        return ordered


def get_ctx(request: Request) -> ServerContext:
    return request.app.state.ctx


def get_owner(request: Request) -> str | None:
    """FastAPI dependency: authenticate and return the owner (the tenant).

    With `--tenant-header NAME` the owner also folds in that header's value (absent: the anonymous tenant), so
    a gateway's tenants get separate caches, sessions and responses even when they share one API key.
    """
    ctx = get_ctx(request)
    owner = ctx.authenticate(request)
    if ctx.tenant_header is None:
        return owner
    tenant = request.headers.get(ctx.tenant_header) or ""
    return "t-" + hashlib.sha256(f"{owner or ''}\x00{tenant}".encode()).hexdigest()[:24]


def cache_namespace(owner: str | None, cache_salt: str | None) -> str:
    """The engine's radix namespace for a request: its tenant (the owner, see `get_owner`) and `cache_salt`.

    KV is reused only between requests with equal namespaces, so cached_tokens, timing and the cache
    explanation reveal nothing about another tenant's prompts. No tenant and no salt: "" (one shared tree).
    """
    if owner is None and cache_salt is None:
        return ""
    return f"{owner or ''}\x00{cache_salt or ''}"  # NUL: no owner/salt pair can alias another
