"""The engine's sessions as their owners see them: the one registry of session state.

Wraps the cache's `SessionManager` (pins, token state, counters) with what belongs to a session beyond its KV:
its owner (every verb takes one; another owner's session does not exist for you), whether a turn is in
progress (one at a time), its last turn as messages (`TurnRecord`), and the store of finished turns by
response id. Results are `SessionInfo` snapshots.

Threads: the engine thread runs every verb except `last_turn`, `record_turn` and `response`, which a front end
calls from its own thread between turns (they read or replace one immutable record). `_lock` guards what those
three touch: the registry's membership (inserts and deletes happen here, under it) and `Session.last_turn`.
"""

from __future__ import annotations

import threading
from typing import Any

from deltaserve.cache.session import Session, SessionManager
from deltaserve.engine.api import (SessionBusy, SessionExists, SessionInfo, SessionNotFound, SessionQuotaExceeded,
                                   TurnInfo, TurnRecord)
from deltaserve.engine.responses import ResponseStore


class EngineSessions:
    def __init__(self, manager: SessionManager, responses: ResponseStore):
        self.manager = manager
        self.responses = responses
        self._busy: set[str] = set()
        self._lock = threading.Lock()
        self.max_per_owner: int | None = None  # open sessions one owner may hold (None: no cap)
        self.persistence: Any = None  # engine/persistence.Persistence: the session store and exports

    def _check_quota(self, owner: str | None) -> None:
        """SessionQuotaExceeded when `owner` already holds max_per_owner sessions (call under the lock)."""
        if self.max_per_owner is not None:
            held = sum(1 for s in self.manager.list() if s.owner == owner)
            if held >= self.max_per_owner:
                raise SessionQuotaExceeded(held, self.max_per_owner)

    # ----------------------------------------------------------- engine thread
    def open(self, session_id: str, owner: str | None = None, ttl: float | None = None) -> SessionInfo:
        """A new empty session; SessionExists if the id is taken (by anyone), ValueError for a negative ttl."""
        with self._lock:
            if session_id in self.manager:
                raise SessionExists(f"session {session_id!r} already exists")
            self._check_quota(owner)
            s = self.manager.open(session_id, owner, ttl)
        return self._info(s)

    def fork(self, session_id: str, new_id: str, owner: str | None, ttl: float | None = None,
             turn: int | None = None) -> SessionInfo:
        """A new session of `owner`'s at `session_id`'s state through turn `turn` (default: its end): its tokens,
        pinned KV and turns, shared; nothing is copied or prefilled.

        SessionNotFound / SessionExists / ValueError (no such turn). A fork of a session with a turn in progress
        starts from its last finished turn."""
        src = self.owned(session_id, owner)
        if turn is not None:
            src.turn_end(turn)  # ValueError before anything changed
        with self._lock:
            if new_id in self.manager:
                raise SessionExists(f"session {new_id!r} already exists")
            self._check_quota(owner)
            s = self.manager.fork(src, new_id, owner, turn)
        return self._info(s) if ttl is None else self.set_ttl(new_id, owner, ttl)

    def rollback(self, session_id: str, owner: str | None, turn: int) -> SessionInfo:
        """Truncate the session to the end of turn `turn` (1-based); its later tokens stay as evictable cache.
        SessionNotFound / SessionBusy (a turn in progress) / ValueError (no such turn)."""
        s = self.owned(session_id, owner)
        if session_id in self._busy:
            raise SessionBusy(f"session {session_id!r} has a turn in progress")
        with self._lock:  # last_turn readers see the history before or after, never between
            self.manager.rollback(s, turn)
        return self._info(s)

    def owned(self, session_id: str, owner: str | None) -> Session:
        """The session, if it exists and belongs to `owner`; else SessionNotFound."""
        s = self.manager.get(session_id)
        if s is None or s.owner != owner:
            raise SessionNotFound(f"session {session_id!r} not found")
        return s

    def info(self, session_id: str, owner: str | None) -> SessionInfo:
        return self._info(self.owned(session_id, owner))

    def list(self, owner: str | None) -> list[SessionInfo]:
        """`owner`'s sessions, in open order."""
        return [self._info(s) for s in self.manager.list() if s.owner == owner]

    def set_ttl(self, session_id: str, owner: str | None, ttl: float) -> SessionInfo:
        """Change the pin TTL; a pinned session's expiry restarts from now."""
        s = self.owned(session_id, owner)
        if ttl < 0:
            raise ValueError("ttl must be >= 0")
        s.ttl = ttl
        if s.pinned:
            s.pin_expires_at = self.manager.clock() + ttl
        return self._info(s)

    def close(self, session_id: str, owner: str | None) -> None:
        """Unpin and forget; the KV stays as evictable prefix cache. SessionBusy while a turn runs."""
        s = self.owned(session_id, owner)
        if session_id in self._busy:
            raise SessionBusy(f"session {session_id!r} has a turn in progress")
        with self._lock:
            self.manager.close(session_id)
        if self.persistence is not None:
            self.persistence.closed(s)  # a closed session leaves the store too

    def begin_turn(self, session_id: str, owner: str | None, open_missing: bool, ttl: float | None) -> None:
        """Claim the session for a turn: opened if missing and `open_missing`; SessionNotFound / SessionBusy."""
        if self.manager.get(session_id) is None and open_missing:
            self.open(session_id, owner, ttl)
        s = self.owned(session_id, owner)
        if session_id in self._busy:
            raise SessionBusy(f"session {session_id!r} already has a turn in progress")
        if ttl is not None:
            self.set_ttl(session_id, owner, ttl)
        self._busy.add(s.session_id)

    def end_turn(self, session_id: str) -> None:
        self._busy.discard(session_id)

    def busy(self, session_id: str) -> bool:
        return session_id in self._busy

    def forget_idle(self, max_idle: float) -> list[str]:
        """Forget unpinned sessions idle longer than `max_idle` seconds (bounds the registry)."""
        with self._lock:
            by_id = {s.session_id: s for s in self.manager.list()}
            gone = self.manager.forget_idle(max_idle)
        if self.persistence is not None:
            for sid in gone:
                self.persistence.forgotten(by_id[sid])  # stays on disk, first to go when the store is full
        return gone

    def export(self, session_id: str, owner: str | None) -> bytes:
        """The session's state (tokens, turns, KV) in the session store's format; SessionNotFound / SessionBusy."""
        s = self.owned(session_id, owner)
        if session_id in self._busy:
            raise SessionBusy(f"session {session_id!r} has a turn in progress")
        return b"".join(self.persistence.export(s))

    def import_state(self, session_id: str, owner: str | None, data: bytes, ttl: float | None = None) -> SessionInfo:
        """A new session of `owner`'s from an export: its turns at once, its KV restored by copy on its first
        turn. SessionExists / SessionQuotaExceeded / StoreError (bad data, another model's KV: nothing made)."""
        self.open(session_id, owner, ttl)
        try:
            self.persistence.import_state(self.manager.get(session_id), data)
        except Exception:
            with self._lock:
                self.manager.close(session_id)
            raise
        return self._info(self.manager.get(session_id))

    def _info(self, s: Session) -> SessionInfo:
        now = self.manager.clock()
        expired = s.pinned and s.pin_expires_at <= now  # not yet unpinned: that happens at the next admission
        if s.pinned:
            state = "expired" if expired else "pinned"
        elif s.unpin_reason is not None:
            state = s.unpin_reason.value
        elif s.tokens and s.namespace is None:
            state = "stored"  # from the session store or an import: its KV comes back on its next turn
        else:
            state = "new" if not s.tokens else "unpinned"
        return SessionInfo(
            session_id=s.session_id, state=state, busy=s.session_id in self._busy, pinned=s.pinned and not expired,
            tokens=len(s.tokens), ttl=s.ttl, ttl_remaining=max(0.0, s.pin_expires_at - now) if s.pinned else None,
            turns=s.turns, prompt_tokens=s.prompt_tokens, cached_tokens=s.cached_tokens,
            prefilled_tokens=s.prefilled_tokens, has_transcript=s.last_turn is not None, last_match=s.last_match,
            history=tuple(TurnInfo(i + 1, m.end, m.record is not None) for i, m in enumerate(s.history)))

    # ------------------------------------------------------------- any thread
    def last_turn(self, session_id: str, owner: str | None) -> TurnRecord | None:
        """The session's last finished turn, None if it has none yet; SessionNotFound if there is no such session
        of `owner`'s (a front end about to open it on its first turn treats that as "no prior turn")."""
        with self._lock:
            s = self.owned(session_id, owner)
            return s.last_turn

    def turn_records(self, session_id: str, owner: str | None) -> list[TurnRecord]:
        """The recorded turns of the session's state, newest first (a client retrying a turn that never reached
        it extends an older one); SessionNotFound as `last_turn`."""
        with self._lock:
            s = self.owned(session_id, owner)
            return [m.record for m in reversed(s.history) if m.record is not None]

    def turn_of_response(self, session_id: str, owner: str | None, response_id: str) -> int | None:
        """The turn (1-based) of the session's state that response `response_id` ended, None if it holds none
        (the state moved past it by an edit or a rollback) or there is no such session of `owner`'s."""
        with self._lock:
            s = self.manager.get(session_id)
            if s is None or s.owner != owner:
                return None
            return next((i + 1 for i, m in enumerate(s.history)
                         if m.record is not None and m.record.response_id == response_id), None)

    def record_turn(self, record: TurnRecord) -> None:
        """Keep a finished turn under its response id and, if its session still exists, as its last turn."""
        self.responses.put(record)
        if record.session_id is None:
            return
        with self._lock:
            s = self.manager.get(record.session_id)
            if s is not None and s.owner == record.owner:
                _attach(s, record)
            else:
                s = None
        if s is not None and self.persistence is not None:
            self.persistence.after_record(s)

    def response(self, response_id: str, owner: str | None) -> TurnRecord | None:
        return self.responses.get(response_id, owner)

    def forget_response(self, response_id: str, owner: str | None) -> bool:
        """Drop a stored response (a session keeps its last turn: that record is the session's too)."""
        return self.responses.delete(response_id, owner)


def _attach(s: Session, record: TurnRecord) -> None:
    """Give `record` to the turn mark it spells: the session's state ends before the reply's last token (whose KV
    was never computed) or at it. A record cut by a stop string (no tokens), or one no mark fits (the session
    moved on meanwhile), becomes the last turn's: its tokens are self-consistent, so rendering from it is exact
    and the radix match finds whatever KV still agrees."""
    n = len(record.transcript.tokens)
    for m in reversed(s.history):
        if m.end in (n - 1, n):
            m.record = record
            return
        if m.end < n - 1:
            break
    s.last_turn = record
