"""Finished turns by response id: what `previous_response_id` continues from.

A bounded LRU of `TurnRecord`s, by entry count and by stored tokens (a record's token ids are an `array('i')`:
4 bytes each instead of a Python int). A session's last turn is the same record object, held by the session
too, so a busy store evicting it never takes a live session's render state away.

Threads: any thread may call every method (one lock); the engine thread never needs to.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from deltaserve.engine.api import TurnRecord
from deltaserve.engine.owners import owner_digest


class ResponseStore:
    """`max_per_owner`: entries one owner (API key) may hold; past it that owner's least recently used go, never
    another owner's, so one busy key cannot push every other key's responses out (None: only the global bounds)."""

    def __init__(self, max_entries: int = 1024, max_tokens: int = 16 << 20, max_per_owner: int | None = None):
        self.max_entries, self.max_tokens, self.max_per_owner = max_entries, max_tokens, max_per_owner
        self._entries: OrderedDict[str, TurnRecord] = OrderedDict()
        self._tokens = 0
        self._per_owner: dict[str, int] = {}  # owner digest -> entries
        self._lock = threading.Lock()

    def put(self, record: TurnRecord) -> None:
        """Store `record` (most recently used), evicting the least recently used beyond the bounds."""
        with self._lock:
            self._drop(self._entries.get(record.response_id))
            self._entries[record.response_id] = record
            self._tokens += len(record.transcript.tokens)
            key = _owner_key(record.owner)
            self._per_owner[key] = self._per_owner.get(key, 0) + 1
            if self.max_per_owner is not None and self._per_owner[key] > self.max_per_owner:
                oldest = next(r for r in self._entries.values() if _owner_key(r.owner) == key)
                self._drop(oldest)
            while self._entries and (len(self._entries) > self.max_entries or self._tokens > self.max_tokens):
                self._drop(next(iter(self._entries.values())))

    def _drop(self, r: TurnRecord | None) -> None:
        if r is None:
            return
        del self._entries[r.response_id]
        self._tokens -= len(r.transcript.tokens)
        key = _owner_key(r.owner)
        self._per_owner[key] -= 1
        if not self._per_owner[key]:
            del self._per_owner[key]

    def get(self, response_id: str, owner: str | None) -> TurnRecord | None:
        """The record if it exists and belongs to `owner` (another key's responses do not exist for you)."""
        with self._lock:
            r = self._entries.get(response_id)
            if r is None or r.owner != owner:
                return None
            self._entries.move_to_end(response_id)
            return r

    def delete(self, response_id: str, owner: str | None) -> bool:
        """Drop the record if it exists and belongs to `owner`; whether it did."""
        with self._lock:
            r = self._entries.get(response_id)
            if r is None or r.owner != owner:
                return False
            self._drop(r)
            return True

    def held_by(self, owner: str | None) -> int:
        with self._lock:
            return self._per_owner.get(_owner_key(owner), 0)

    def __len__(self) -> int:
        return len(self._entries)


def _owner_key(owner) -> str:
    """One key per owner, equal for a raw owner and the digest a restored record carries."""
    return owner_digest(owner)
