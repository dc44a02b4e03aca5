"""Sessions: conversations whose KV stays pinned in the radix cache between turns.

A session remembers the full token state of the conversation (`tokens`:
prompt + generated tokens whose KV is cached) and the radix node ending that
path. While *pinned* it holds one lock on that node, so the whole path
survives eviction and the next turn only prefills its new tokens. A pin lasts
`ttl` seconds after the last turn; then `expire` drops the lock and the path
becomes ordinary LRU cache (still hit by a late turn as long as memory
allows). Under memory pressure `demote_lru` drops the least recently used
pins early, so pins can never starve running requests of slots.

Engine protocol for one turn (one turn per session at a time):
    m = radix.match_prefix(prompt); radix.lock(m.node)      # protect what we reuse
    why = explain_match(session, prompt, m.num_matched, was_pinned=session.pinned)
    short = need - allocator.num_free                         # need = new tokens' slots
    if short > 0: radix.evict(short)
    if still short: sessions.demote_lru(short); radix.evict(short)
    ... allocate, run the model ...
    r = radix.insert_with_node(tokens, torch.cat([m.slots, own_slots]))  # cache owns them all now
    sessions.repin(session, r.node, tokens); radix.unlock(m.node)
    sessions.record_turn(session, why)
`session.node` is only where the last turn ended; the engine always matches
the new prompt itself (the node may be evicted when the session is unpinned).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, NamedTuple, Sequence

from deltaserve.cache.radix import RadixCache, RadixNode
from deltaserve.tokens import common_prefix_len


class MatchReason(str, Enum):
    """Why a turn reused as much of its prompt as it did."""

    NO_SESSION = "no_session"  # stateless request: plain prefix-cache lookup
    NEW_SESSION = "new_session"  # first turn of a session
    EXTENDED = "extended"  # prompt extends the session state, all of it cached
    DIVERGED = "diverged"  # prompt differs from (or truncates) the session state
    EVICTED = "evicted"  # unpinned session state partly evicted by LRU
    EXPIRED = "expired"  # pin TTL passed, then the state was partly evicted
    DEMOTED = "demoted"  # pin dropped under memory pressure, then partly evicted
    RESTORED = "restored"  # KV copied back from the host tier or the session store instead of prefilled


class MatchExplanation(NamedTuple):
    reason: MatchReason
    prompt_tokens: int
    cached_tokens: int  # prompt tokens whose KV came from the cache (the radix match)
    prefilled_tokens: int  # prompt_tokens - cached_tokens
    diverged_at: int | None  # token index of the first difference, for DIVERGED
    session_tokens: int  # tokens in the session state before this turn
    detail: str
    restored_tokens: int = 0  # of cached_tokens, copied back from a tier (host memory or the session store)


@dataclass
class TurnMark:
    """Where one turn of the session's current state ended, and what it spelled."""

    end: int  # session tokens through this turn's reply (turn k ends at history[k-1].end)
    record: Any = None  # the front end's TurnRecord for it (opaque here), once recorded


@dataclass
class Session:
    session_id: str
    owner: str | None
    ttl: float
    created_at: float
    last_used: float
    tokens: list[int] = field(default_factory=list)
    node: RadixNode | None = None  # radix node ending `tokens`' path (locked iff pinned)
    pinned: bool = False
    pin_expires_at: float = 0.0
    unpin_reason: MatchReason | None = None  # EXPIRED / DEMOTED once a pin is dropped, until repinned
    turns: int = 0
    prompt_tokens: int = 0  # counters summed over turns
    cached_tokens: int = 0
    prefilled_tokens: int = 0
    last_match: MatchExplanation | None = None
    seq: int = 0  # open order; breaks last_used ties in demote_lru
    # The turns `tokens` holds, oldest first: a turn that diverged from the state drops the marks past the
    # divergence, a rollback drops the later ones. Ends are increasing; the last one is len(tokens).
    history: list[TurnMark] = field(default_factory=list)
    namespace: str | None = None  # the radix namespace its KV lives in (known from its first turn)
    # Persistence (engine/persistence.py): leading tokens of the state whose KV is in the session store; the
    # namespace digest a session from disk was saved under; an import's KV segments waiting for the first turn.
    persisted: int = 0
    stored_namespace: str | None = None
    staged: Any = None

    @property
    def last_turn(self) -> Any:
        """What the last turn's tokens spell in messages (the engine's TurnRecord; opaque here), so the next turn
        can be rendered as an exact extension of `tokens`. Written by the front end after a turn."""
        return self.history[-1].record if self.history else None

    @last_turn.setter
    def last_turn(self, record: Any) -> None:
        if not self.history or self.history[-1].end != len(self.tokens):
            self.history.append(TurnMark(len(self.tokens)))
        self.history[-1].record = record

    def turn_end(self, turn: int) -> int:
        """Token offset where turn `turn` (1-based) ends; ValueError when the state holds no such turn."""
        if not 1 <= turn <= len(self.history):
            raise ValueError(f"session {self.session_id!r} has turns 1..{len(self.history)}, not turn {turn}")
        return self.history[turn - 1].end


def explain_match(session: Session | None, prompt: Sequence[int], num_matched: int, was_pinned: bool,
                  restored: int = 0, restored_from: str = "host memory") -> MatchExplanation:
    """Classify a turn's cache reuse. `num_matched` is the radix match length (after any restore); `was_pinned` the
    pin state at match time; `restored` how many of the matched tokens were copied back from a tier
    (`restored_from` says which): the reason is then RESTORED, unless the prompt diverged from the session."""
    e = _classify(session, prompt, num_matched, was_pinned)
    if restored <= 0:
        return e
    reason = e.reason if e.reason is MatchReason.DIVERGED else MatchReason.RESTORED
    return e._replace(reason=reason, restored_tokens=restored,
                      detail=f"{restored} of the {num_matched} cached tokens restored from {restored_from}; {e.detail}")


def _classify(session: Session | None, prompt: Sequence[int], num_matched: int, was_pinned: bool) -> MatchExplanation:
    n = len(prompt)
    base = dict(prompt_tokens=n, cached_tokens=num_matched, prefilled_tokens=n - num_matched)
    if session is None:
        detail = f"no session; prefix cache hit {num_matched}/{n} tokens"
        return MatchExplanation(MatchReason.NO_SESSION, diverged_at=None, session_tokens=0, detail=detail, **base)
    state = session.tokens
    have = len(state)
    if not state:
        detail = f"new session {session.session_id!r}; prefix cache hit {num_matched}/{n} tokens"
        return MatchExplanation(MatchReason.NEW_SESSION, diverged_at=None, session_tokens=0, detail=detail, **base)
    lcp = common_prefix_len(list(state), list(prompt))
    if lcp < have:
        if lcp == n:
            detail = f"prompt truncates the session state at token {lcp} (session had {have} tokens)"
        else:
            detail = (f"prompt diverges from the session state at token index {lcp} "
                      f"(session token {state[lcp]}, prompt token {prompt[lcp]}; session had {have} tokens)")
        return MatchExplanation(MatchReason.DIVERGED, diverged_at=lcp, session_tokens=have, detail=detail, **base)
    if num_matched < lcp:
        lost = lcp - num_matched
        if was_pinned:
            # Should not happen: a pin protects the whole state. Report it rather than hide it.
            reason, why = MatchReason.EVICTED, "despite a pin (cache inconsistency)"
        elif session.unpin_reason in (MatchReason.EXPIRED, MatchReason.DEMOTED):
            reason = session.unpin_reason
            why = "after its pin expired" if reason is MatchReason.EXPIRED else "after its pin was demoted under memory pressure"
        else:
            reason, why = MatchReason.EVICTED, "while unpinned"
        detail = f"{lost} of the session's {have} cached tokens were evicted {why}; cache hit {num_matched}/{n}"
        return MatchExplanation(reason, diverged_at=None, session_tokens=have, detail=detail, **base)
    detail = f"prompt extends the session state: {num_matched}/{n} tokens cached, {n - num_matched} new"
    return MatchExplanation(MatchReason.EXTENDED, diverged_at=None, session_tokens=have, detail=detail, **base)


def _path_tokens(node: RadixNode) -> list[int]:
    pieces: list[tuple[int, ...]] = []
    while node.parent is not None:
        pieces.append(node.key)
        node = node.parent
    return [t for key in reversed(pieces) for t in key]


def advance(session: Session, tokens: Sequence[int]) -> None:
    """A turn ended with the session's state at `tokens`: turns past where `tokens` leaves the old state are
    dropped, and this turn is marked at its end."""
    tokens = list(tokens)
    lcp = common_prefix_len(session.tokens, tokens)
    while session.history and session.history[-1].end > lcp:
        session.history.pop()
    session.persisted = min(session.persisted, lcp)
    session.tokens = tokens
    if not session.history or session.history[-1].end < len(tokens):
        session.history.append(TurnMark(len(tokens)))


class SessionManager:
    """Registry of sessions and owner of their pins (one radix lock per pinned session).

    `pin=False` is the "prefix" cache mode: sessions keep their token state
    (for explanations and counters) but never lock the tree, so their KV is
    plain LRU cache.
    """

    def __init__(self, radix: RadixCache, default_ttl: float = 300.0, clock: Callable[[], float] = time.monotonic, pin: bool = True):
        self.radix = radix
        self.default_ttl = default_ttl
        self.clock = clock
        self.pin = pin
        self._sessions: dict[str, Session] = {}
        self._seq = itertools.count()

    # ------------------------------------------------------------------ registry
    def open(self, session_id: str, owner: str | None = None, ttl: float | None = None) -> Session:
        """Create an empty, unpinned session; raises KeyError if the id exists."""
        if session_id in self._sessions:
            raise KeyError(f"session {session_id!r} already exists")
        ttl = self.default_ttl if ttl is None else ttl
        if ttl < 0:
            raise ValueError(f"ttl must be >= 0, got {ttl}")
        now = self.clock()
        s = Session(session_id, owner, ttl, created_at=now, last_used=now, seq=next(self._seq))
        self._sessions[session_id] = s
        return s

    def fork(self, src: Session, session_id: str, owner: str | None = None, turn: int | None = None) -> Session:
        """A new session whose state is `src`'s through turn `turn` (default: all of it), no copy of any KV.

        A pinned `src` gives the fork its own lock on the node ending that prefix (the shared path now has two
        pins and counts once in the tree's sizes); an unpinned one gives an unpinned fork, whose next turn hits
        whatever LRU left. The fork's counters start at zero. Raises KeyError if the id exists, ValueError for
        a turn `src` does not hold (before anything changed).
        """
        end = len(src.tokens) if turn is None else src.turn_end(turn)
        keep = len(src.history) if turn is None else turn
        node = src.node
        if src.pinned and end < len(src.tokens):
            node = self.radix.prefix_node(src.node, end)  # a pinned path is in the tree
        s = self.open(session_id, owner, src.ttl)
        s.tokens, s.node, s.namespace = list(src.tokens[:end]), node, src.namespace
        s.history = [TurnMark(m.end, m.record) for m in src.history[:keep]]
        if src.pinned:
            self.radix.lock(node)
            s.pinned, s.pin_expires_at = True, self.clock() + s.ttl
        else:
            s.unpin_reason = src.unpin_reason
            if end < len(src.tokens):
                s.node = None  # the unpinned state's node ends past the fork (or was evicted)
        return s

    def rollback(self, session: Session, turn: int) -> None:
        """Truncate `session` to the end of turn `turn`: later turns' tokens leave its state (their KV stays in
        the tree as ordinary evictable cache) and nothing is recomputed. A pinned session moves its pin to the
        node ending turn `turn` (locked before the old one is unlocked, so no shared node turns evictable in
        between). ValueError for a turn it does not hold, before anything changed."""
        end = session.turn_end(turn)
        if session.pinned:
            assert session.node is not None
            node = self.radix.prefix_node(session.node, end)
            self.radix.lock(node)
            self.radix.unlock(session.node)
            session.node = node
        elif end < len(session.tokens):
            session.node = None  # where the unpinned state ended no longer bounds it
        session.tokens = session.tokens[:end]
        session.persisted = min(session.persisted, end)
        del session.history[turn:]
        session.last_used = self.clock()

    def get(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._sessions

    def __len__(self) -> int:
        return len(self._sessions)

    def list(self) -> list[Session]:
        """All known sessions, in open order."""
        return sorted(self._sessions.values(), key=lambda s: s.seq)

    @property
    def num_pinned(self) -> int:
        return sum(1 for s in self._sessions.values() if s.pinned)

    def close(self, session_id: str) -> None:
        """Unpin and forget the session; its path stays as ordinary evictable cache. KeyError if unknown."""
        s = self._sessions.pop(session_id)
        if s.pinned:
            self._unpin(s, None)

    # ------------------------------------------------------------------ pins
    def repin(self, session: Session, node: RadixNode, tokens: Sequence[int], ttl: float | None = None) -> None:
        """After a turn: move the session's pin to `node`, whose root path must be exactly `tokens`.

        Locks the new node BEFORE unlocking the old one, so refs on the shared
        prefix never drop to 0 in between (nothing there becomes evictable even
        for an instant). Refreshes the expiry to now + ttl (`ttl` also becomes
        the session's ttl when given) and `last_used`.
        """
        tokens = list(tokens)
        if _path_tokens(node) != tokens:
            raise ValueError("repin: node's path does not spell the session tokens")
        if ttl is not None:
            session.ttl = ttl
        if self.pin:
            self.radix.lock(node)  # raises on an evicted node, before anything changed
            if session.pinned:
                assert session.node is not None
                self.radix.unlock(session.node)
            session.pinned, session.unpin_reason = True, None
        now = self.clock()
        session.node = node
        advance(session, tokens)
        session.pin_expires_at = now + session.ttl
        session.last_used = now

    def record_turn(self, session: Session, explanation: MatchExplanation) -> None:
        """Add a turn's explanation to the session's counters."""
        session.turns += 1
        session.prompt_tokens += explanation.prompt_tokens
        session.cached_tokens += explanation.cached_tokens
        session.prefilled_tokens += explanation.prefilled_tokens
        session.last_match = explanation
        session.last_used = self.clock()

    def _unpin(self, session: Session, reason: MatchReason | None) -> None:
        assert session.pinned and session.node is not None
        self.radix.unlock(session.node)
        session.pinned, session.unpin_reason = False, reason

    def expire(self) -> list[str]:
        """Unpin sessions whose pin TTL has passed; return their ids (open order).

        Frees nothing: the path becomes evictable LRU cache, and the session
        object (token state, counters) stays known so a late turn still hits
        whatever survived and its miss is explained as EXPIRED.
        """
        now = self.clock()
        out = []
        for s in self.list():
            if s.pinned and s.pin_expires_at <= now:
                self._unpin(s, MatchReason.EXPIRED)
                out.append(s.session_id)
        return out

    def unpin_over_budget(self, session: Session) -> None:
        """Leave a session that just finished a turn unpinned because pinned KV is over budget.

        Its path stays in the tree as evictable LRU cache (a quick next turn still
        hits it); the miss, if it comes, is explained as DEMOTED.
        """
        self._unpin(session, MatchReason.DEMOTED)

    def enforce_owner_quota(self, owner: str | None, max_tokens: int) -> list[str]:
        """Unpin `owner`'s least recently used pins until its pinned sessions hold <= `max_tokens` tokens.

        A key's quota is paid by that key alone: other owners' pins are never touched. A session's tokens count
        in full even where they share a prefix with another pin (what the key asks to keep, not what it costs
        the pool). Demoted paths stay as LRU cache; their misses are explained as DEMOTED. Returns the ids."""
        pinned = sorted((s for s in self._sessions.values() if s.pinned and s.owner == owner),
                        key=lambda s: (s.last_used, s.seq))
        held = sum(len(s.tokens) for s in pinned)
        out: list[str] = []
        for s in pinned:
            if held <= max_tokens:
                break
            self._unpin(s, MatchReason.DEMOTED)
            held -= len(s.tokens)
            out.append(s.session_id)
        return out

    def demote_lru(self, num_tokens_needed: int) -> list[str]:
        """Unpin least-recently-used sessions until `radix.evictable_size >= num_tokens_needed`.

        Policy (so pins can never deadlock the pool): running requests beat
        idle pins. Pinned sessions are demoted one at a time in order of
        `last_used` (oldest first; ties by open order) until enough of the
        tree is evictable or no pins are left. Demoting a session whose path is
        shared with another pin or a running request may add nothing; the loop
        just goes on. Afterwards only running requests' own locks protect
        anything, so `radix.evict` can then free everything else.
        `num_tokens_needed` is the shortfall beyond the allocator's free
        slots. Frees nothing itself; returns the demoted ids in order.
        """
        out: list[str] = []
        if self.radix.evictable_size >= num_tokens_needed:
            return out
        for s in sorted((s for s in self._sessions.values() if s.pinned), key=lambda s: (s.last_used, s.seq)):
            self._unpin(s, MatchReason.DEMOTED)
            out.append(s.session_id)
            if self.radix.evictable_size >= num_tokens_needed:
                break
        return out

    def forget_idle(self, max_idle: float) -> list[str]:
        """Forget unpinned sessions unused for more than `max_idle` seconds (bounds registry memory)."""
        now = self.clock()
        gone = [s.session_id for s in self.list() if not s.pinned and now - s.last_used > max_idle]
        for sid in gone:
            del self._sessions[sid]
        return gone
