"""Server-side conversation state: session transcripts and the previous_response_id map.

The engine keeps a session's *tokens* and KV; the server keeps what those
tokens spell in messages (a `Transcript`), because rendering turn t+1 as an
extension of turn t's exact tokens needs both (see `engine/chat.py`).

* `SessionStore`: per session id, its owner, the transcript after its last
  completed turn, the tools that turn was requested with and the id of the
  response that produced it ("has the session moved on since response X?").
* `ResponseStore`: every chat completion id -> the transcript at the end of
  that response, so `previous_response_id` can continue from any earlier
  response. Bounded LRU by entry count and by total stored tokens (token
  ids are kept in `array('i')`: 4 bytes each instead of a Python int).
"""

from __future__ import annotations

import threading
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from deltaserve.engine.chat import Transcript


def compact_tokens(tokens: list[int]) -> array:
    return array("i", tokens)


@dataclass
class SessionEntry:
    owner: str | None
    transcript: Transcript | None = None
    request_tools: list[dict[str, Any]] | None = None
    last_response_id: str | None = None


class SessionStore:
    def __init__(self) -> None:
        self._entries: dict[str, SessionEntry] = {}
        self._lock = threading.Lock()

    def get(self, session_id: str) -> SessionEntry | None:
        return self._entries.get(session_id)

    def ensure(self, session_id: str, owner: str | None) -> SessionEntry:
        with self._lock:
            e = self._entries.get(session_id)
            if e is None or e.owner != owner:  # a stale entry of a session that was re-created
                e = self._entries[session_id] = SessionEntry(owner)
            return e

    def drop(self, session_id: str) -> None:
        with self._lock:
            self._entries.pop(session_id, None)

    def record_turn(self, session_id: str, owner: str | None, transcript: Transcript,
                    request_tools: list[dict[str, Any]] | None, response_id: str) -> None:
        e = self.ensure(session_id, owner)
        e.transcript, e.request_tools, e.last_response_id = transcript, request_tools, response_id


@dataclass
class ResponseEntry:
    response_id: str
    owner: str | None
    transcript: Transcript
    request_tools: list[dict[str, Any]] | None
    session_id: str | None


class ResponseStore:
    def __init__(self, max_entries: int = 1024, max_tokens: int = 16 << 20):
        self.max_entries, self.max_tokens = max_entries, max_tokens
        self._entries: OrderedDict[str, ResponseEntry] = OrderedDict()
        self._tokens = 0
        self._lock = threading.Lock()

    def put(self, entry: ResponseEntry) -> None:
        with self._lock:
            old = self._entries.pop(entry.response_id, None)
            if old is not None:
                self._tokens -= len(old.transcript.tokens)
            self._entries[entry.response_id] = entry
            self._tokens += len(entry.transcript.tokens)
            while self._entries and (len(self._entries) > self.max_entries or self._tokens > self.max_tokens):
                _, gone = self._entries.popitem(last=False)
                self._tokens -= len(gone.transcript.tokens)

    def get(self, response_id: str, owner: str | None) -> ResponseEntry | None:
        """The entry if it exists and belongs to `owner` (another key's responses do not exist for you)."""
        with self._lock:
            e = self._entries.get(response_id)
            if e is None or e.owner != owner:
                return None
            self._entries.move_to_end(response_id)
            return e

    def __len__(self) -> int:
        return len(self._entries)
