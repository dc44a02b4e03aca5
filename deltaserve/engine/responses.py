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


class ResponseStore:
    def __init__(self, max_entries: int = 1024, max_tokens: int = 16 << 20):
        self.max_entries, self.max_tokens = max_entries, max_tokens
        self._entries: OrderedDict[str, TurnRecord] = OrderedDict()
        self._tokens = 0
        self._lock = threading.Lock()

    def put(self, record: TurnRecord) -> None:
        """Store `record` (most recently used), evicting the least recently used beyond the bounds."""
        with self._lock:
            old = self._entries.pop(record.response_id, None)
            if old is not None:
                self._tokens -= len(old.transcript.tokens)
            self._entries[record.response_id] = record
            self._tokens += len(record.transcript.tokens)
            while self._entries and (len(self._entries) > self.max_entries or self._tokens > self.max_tokens):
                _, gone = self._entries.popitem(last=False)
                self._tokens -= len(gone.transcript.tokens)

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
            del self._entries[response_id]
            self._tokens -= len(r.transcript.tokens)
            return True

    def __len__(self) -> int:
        return len(self._entries)
