"""The engine's boundary: every type that crosses between the engine thread and its callers.

The server (and any other front end) talks to the engine only through `AsyncEngine`'s named methods and
these types; it never sees a `Sequence`, the KV manager or the scheduler. What crosses is immutable:
requests in, `RequestOutput` snapshots and `SessionInfo` out, `TurnRecord`s (what a turn's tokens spell in
messages) stored beside the session that owns them. Engine input errors are `EngineError`s, raised to the
caller before any output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, Sequence, runtime_checkable

import torch

from deltaserve.cache.session import MatchExplanation
from deltaserve.engine.chat import Transcript
from deltaserve.engine.sampling import SamplingParams


# ------------------------------------------------------------------ errors
class EngineError(Exception):
    """Bad input to the engine (a front end maps it to a 4xx)."""


class PromptTooLong(EngineError):
    def __init__(self, prompt_tokens: int, limit: int):
        super().__init__(f"prompt is {prompt_tokens} tokens; the context holds {limit} (prompt + max_tokens must fit)")
        self.prompt_tokens, self.limit = prompt_tokens, limit


class SessionBusy(EngineError):
    """The session has a turn in progress (one turn per session at a time)."""


class SessionNotFound(EngineError, KeyError):
    """No such session for this owner (another owner's session does not exist for you)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class SessionExists(EngineError):
    """Opening a session under an id that is taken."""


class SessionQuotaExceeded(EngineError):
    """The owner already holds its maximum of open sessions (EngineConfig.max_sessions_per_key)."""

    def __init__(self, held: int, limit: int):
        super().__init__(f"this API key already has {held} open sessions (limit {limit}); close one first")
        self.held, self.limit = held, limit


class Overloaded(EngineError):
    """The scheduler's waiting queue is full (EngineConfig.max_waiting): retry later; nothing was queued."""

    def __init__(self, waiting: int, limit: int):
        super().__init__(f"server overloaded: {waiting} requests are waiting (limit {limit}); retry later")
        self.waiting, self.limit = waiting, limit


# -------------------------------------------------------------- constraint
@runtime_checkable
class Constraint(Protocol):
    """Constrained decoding state of one request (the server's grammar matcher implements it).

    The engine thread alone drives it, once it has the request. Shapes: `V` is the model's vocabulary width.
    """

    def apply_mask(self, logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Set forbidden entries of `logits` ([V] or [n, V]) to -inf in place and return it; `mask` (bool [V] or
        [n, V], True = allowed) defaults to the current state's."""

    def draft_masks(self, draft: Sequence[int]) -> torch.Tensor:
        """Bool [k+1, V]: row i is the mask after `draft[:i]`; leaves the state unchanged."""

    def accept(self, token_id: int) -> bool:
        """Advance by one token (False, state unchanged, if it is forbidden)."""

    def is_terminated(self) -> bool:
        """An end-of-turn token was accepted: the output is complete."""

    def forced_tokens(self) -> list[int]:
        """Tokens the constraint forces next (may be empty): the best speculative draft there is."""


# --------------------------------------------------------------- requests
@dataclass(frozen=True)
class GenerateRequest:
    """One generation. With `session_id` the turn belongs to that session (owned by `owner`): `open_session`
    opens it when unknown (else unknown is SessionNotFound); `session_ttl` sets its pin TTL from this turn on."""

    prompt: list[int]
    params: SamplingParams
    owner: str | None = None
    session_id: str | None = None
    open_session: bool = False
    session_ttl: float | None = None
    constraint: Constraint | None = None
    # Radix namespace (server: tenant + cache_salt). KV is reused only between requests with equal namespaces.
    cache_namespace: str = ""


class RequestStats(NamedTuple):
    """A request's counters so far."""

    prompt_tokens: int
    output_tokens: int
    cached_tokens: int  # prompt tokens whose KV came from the cache
    prefilled_tokens: int  # prompt tokens computed by this request
    drafted_tokens: int  # speculative tokens verified
    accepted_tokens: int  # of those, accepted
    explanation: MatchExplanation | None  # why the cache matched what it did (set at admission)
    queue_s: float | None = None  # seconds from submission to first admission (None: not admitted yet)


class RequestOutput(NamedTuple):
    """What one engine step did for one request: an immutable snapshot, safe to hand to any thread."""

    request_id: int
    new_token_ids: tuple[int, ...]  # appended by this step (may be empty)
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" once finished
    stats: RequestStats


# --------------------------------------------------------------- sessions
class TurnInfo(NamedTuple):
    """One turn of a session's current state."""

    turn: int  # 1-based
    end: int  # token offset where it ends (its reply included, up to the last token whose KV is computed)
    has_transcript: bool  # its messages are known (a fork or rollback to it can extend them exactly)


class SessionInfo(NamedTuple):
    """A session as its owner may see it."""

    session_id: str
    state: str  # "new" | "pinned" | "unpinned" | "expired" | "demoted" | "stored" (KV on disk or imported)
    busy: bool  # a turn is in progress
    pinned: bool
    tokens: int  # tokens of the session state (their KV is cached)
    ttl: float
    ttl_remaining: float | None  # while pinned
    turns: int
    prompt_tokens: int
    cached_tokens: int
    prefilled_tokens: int
    has_transcript: bool  # a completed turn's messages are known (the delta route can extend it)
    last_match: MatchExplanation | None
    history: tuple[TurnInfo, ...] = ()  # the turns `tokens` holds, oldest first


@dataclass(frozen=True)
class TurnRecord:
    """A finished turn as messages: what its tokens spell, so the next turn can extend them exactly.

    Kept by the engine under its response id (for `previous_response_id`) and, for a session turn, as the
    session's last turn. `transcript.tokens` is empty when the reply was cut by a stop string (no token state
    to extend: the next turn is rendered in full and the prefix cache finds what it can).
    """

    response_id: str
    owner: str | None
    session_id: str | None
    transcript: Transcript
    request_tools: list[dict[str, Any]] | None  # tools the request sent (a later turn that omits them inherits)
    # what the front end shows for this turn, opaque to the engine (the Responses API: the Response object and
    # its input items); it lives and dies with the record, so a front end keeps no second store
    view: Any = None


# ----------------------------------------------------------------- facts
@dataclass(frozen=True)
class EngineInfo:
    """Immutable facts about the served model, readable from any thread."""

    tokenizer: Any  # models.tokenizer.Tokenizer
    vocab_size: int
    max_context: int
    stop_ids: frozenset[int]
    cache_mode: str
    # the model's generation_config.json sampling defaults (models.generation_config.SamplingDefaults; None: none)
    sampling_defaults: Any = None


class IntegrityReport(NamedTuple):
    """Result of LLMEngine.check_integrity: ok, the first violated invariant (None when ok), and counts."""
    ok: bool
    error: str | None
    running: int
    waiting: int
    kv_slots_used: int
    kv_cached_tokens: int
