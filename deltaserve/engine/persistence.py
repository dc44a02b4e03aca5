"""Sessions that outlive the pool and the process: the engine's side of the session store, and of exports.

After each finished turn the session's new tokens' KV is read out of the pool (engine thread, a copy of the new
rows only) and handed to the store's writer thread; its metadata (token ids, turns as messages, TTL) follows, and
again once the front end records the turn's messages. On start the store's sessions are registered unloaded
(listed at once; no KV read). A turn of a session whose saved KV is not in the pool (after a restart, an import,
or an eviction from both RAM tiers) reads the missing part on a loader thread while the request waits; the
segments land in the host tier as staged entries and admission restores them by copy (kv_manager.restore).

Owners and cache namespaces contain API keys: only their digests are written. A session restored from disk is
owned by an `OwnerDigest`, which compares equal to the raw owner it was made from, so every owner check works
unchanged; its KV is restored only into a request namespace with the same digest.
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import logging
from array import array
from typing import Any, Callable, Iterator, NamedTuple

from deltaserve.cache.radix import RadixCache
from deltaserve.cache.session import Session, SessionManager, TurnMark
from deltaserve.engine.api import TurnRecord
from deltaserve.engine.chat import Transcript, compact_tokens
from deltaserve.engine.owners import OwnerDigest, namespace_digest, owner_digest
from deltaserve.kv.pool import KVPool
from deltaserve.store.disk import SessionStore, session_key
from deltaserve.store.format import Segment, Stamp, StoreError, pack_export, unpack_export
from deltaserve.tokens import common_prefix_len

log = logging.getLogger("deltaserve.store")


def _tokens_b64(tokens: list[int]) -> str:
    return base64.b64encode(array("i", tokens).tobytes()).decode()


def _tokens_from_b64(text: str) -> list[int]:
    a = array("i")
    a.frombytes(base64.b64decode(text))
    return a.tolist()


# ------------------------------------------------------------------ metadata
def record_json(r: TurnRecord, state: list[int]) -> dict[str, Any]:
    """A TurnRecord as JSON; its token ids as "state prefix + tail" when they extend the state's prefix."""
    toks = list(r.transcript.tokens)
    n = common_prefix_len(toks, state[: len(toks)])
    view = r.view.to_json() if hasattr(r.view, "to_json") else None  # what a front end shows, if it can say
    return {"response_id": r.response_id, "session_id": r.session_id, "messages": r.transcript.messages,
            "tools": r.transcript.tools, "request_tools": r.request_tools, "state_prefix": n,
            "tail": toks[n:], "view": view}


def record_from_json(d: dict[str, Any], state: list[int], owner: Any) -> TurnRecord:
    toks = state[: d["state_prefix"]] + list(d["tail"])
    return TurnRecord(d["response_id"], owner, d["session_id"],
                      Transcript(d["messages"], d["tools"], compact_tokens(toks)), d["request_tools"], d.get("view"))


def session_meta(s: Session) -> dict[str, Any]:
    tokens = list(s.tokens)
    ns = namespace_digest(s.namespace) if s.namespace is not None else s.stored_namespace
    return {"session_id": s.session_id, "owner": owner_digest(s.owner), "namespace": ns, "ttl": s.ttl,
            "tokens": _tokens_b64(tokens), "turns": s.turns,
            "history": [{"end": m.end, "record": None if m.record is None else record_json(m.record, tokens)}
                        for m in s.history if m.end <= len(tokens)]}


def apply_meta(s: Session, meta: dict[str, Any]) -> None:
    """Give a new, empty session the state `meta` describes (its KV comes later, by restore)."""
    s.tokens = _tokens_from_b64(meta["tokens"])
    s.stored_namespace = meta.get("namespace")
    s.turns = int(meta.get("turns", 0))
    s.history = []
    for h in meta.get("history", []):
        end = int(h["end"])
        if end > len(s.tokens) or (s.history and end <= s.history[-1].end):
            break
        rec = h.get("record")
        s.history.append(TurnMark(end, None if rec is None else record_from_json(rec, s.tokens, s.owner)))


class PendingLoad(NamedTuple):
    """A turn's saved KV on its way in: segments of tokens the prompt shares with the session, for `namespace`."""

    future: cf.Future  # -> list[Segment]
    namespace: str
    prompt: list[int]


class Persistence:
    def __init__(self, store: SessionStore | None, stamp: Stamp | Callable[[], Stamp], pool: KVPool,
                 radix: RadixCache, manager: SessionManager):
        self.store, self.pool, self.radix, self.manager = store, pool, radix, manager
        self._stamp = stamp  # a callable until first needed: hashing the weights takes a moment
        self._loader = cf.ThreadPoolExecutor(1, thread_name_prefix="deltaserve-store-read") if store else None
        self.restored_sessions = 0

    @property
    def stamp(self) -> Stamp:
        if not isinstance(self._stamp, Stamp):
            self._stamp = self._stamp()
        return self._stamp

    def close(self, timeout: float | None = 30.0) -> bool:
        """Write everything queued (shutdown; the store stays usable: an engine may be driven again); False if
        the disk did not finish in time."""
        return True if self.store is None else self.store.flush(timeout)

    def key(self, s: Session) -> str:
        return session_key(owner_digest(s.owner), s.session_id)

    # ---------------------------------------------------------------- start
    def restore_sessions(self) -> int:
        """Register every session of the store, unloaded (their KV is read on their next turn)."""
        assert self.store is not None
        n = 0
        for stored in self.store.scan():
            meta = stored.meta
            sid = meta.get("session_id")
            if not isinstance(sid, str) or sid in self.manager:
                continue
            try:
                s = self.manager.open(sid, OwnerDigest(meta["owner"]), float(meta["ttl"]))
            except (KeyError, ValueError, TypeError) as e:
                log.warning("session store: session %r not restored: %s", sid, e)
                continue
            try:
                apply_meta(s, meta)
            except (KeyError, ValueError, TypeError) as e:
                log.warning("session store: session %r not restored: %s", sid, e)
                self.manager.close(sid)
                continue
            s.persisted = _contiguous_end(meta["segments"], len(s.tokens))
            self.store.set_live(stored.key, True)
            n += 1
        self.restored_sessions = n
        return n

    # ---------------------------------------------------------------- engine thread, after a turn
    def after_turn(self, s: Session) -> None:
        """Append the KV of the tokens the session gained since its last save (and its metadata)."""
        if self.store is None or s.node is None or s.node.detached:
            return
        n, start = len(s.tokens), min(s.persisted, len(s.tokens))
        if start >= n:
            self.store.write_meta(self.key(s), session_meta(s))
            return
        slots = self.radix.path_slots(s.node)[start:n]  # the state's path: its KV was just computed or matched
        self.store.append(self.key(s), Segment(start, list(s.tokens[start:n]), self.pool.read_rows(slots)),
                          session_meta(s))
        self.store.set_live(self.key(s), True)
        s.persisted = n

    # ---------------------------------------------------------------- any thread
    def after_record(self, s: Session) -> None:
        if self.store is not None and s.persisted:
            self.store.write_meta(self.key(s), session_meta(s))

    def closed(self, s: Session) -> None:
        if self.store is not None:
            self.store.delete(self.key(s))

    def forgotten(self, s: Session) -> None:
        if self.store is not None:
            self.store.set_live(self.key(s), False)

    # ---------------------------------------------------------------- engine thread, before a turn
    def begin_load(self, s: Session, prompt: list[int], namespace: str, tier_has: Any) -> PendingLoad | None:
        """Start reading the saved KV this turn shares with the session when neither the pool nor the host tier
        holds it (`tier_has(namespace, prompt, start)`); None when there is nothing to read."""
        if s.stored_namespace is not None and s.stored_namespace != namespace_digest(namespace):
            return None  # another cache namespace (cache_salt): that KV is not this request's to reuse
        if s.staged:
            want = min(common_prefix_len(s.tokens, prompt), len(prompt) - 1)
            segs, s.staged = s.staged, None
            fut: cf.Future = cf.Future()
            fut.set_result([g for g in segs if g.start < want])
            return PendingLoad(fut, namespace, prompt)
        if self.store is None or not s.persisted:
            return None
        want = min(s.persisted, common_prefix_len(s.tokens, prompt), len(prompt) - 1)
        if want <= 0:
            return None
        have = self.radix.match_prefix(prompt[:want], namespace).num_matched
        if have >= want or tier_has(namespace, prompt, have):
            return None
        return PendingLoad(self._loader.submit(self.store.read_segments, self.key(s), have, want), namespace, prompt)

    # ---------------------------------------------------------------- export / import (engine thread)
    def export(self, s: Session) -> Iterator[bytes]:
        """The session's state in the store's format: metadata, and the KV of the longest prefix of its state that
        the pool (or the store) holds; a shorter KV is recomputed by the importer's next turn."""
        segs: list[Segment] = []
        if s.namespace is not None and s.tokens:
            m = self.radix.match_prefix(s.tokens, s.namespace)
            if m.num_matched:
                segs = [Segment(0, list(s.tokens[: m.num_matched]), self.pool.read_rows(m.slots))]
        if not segs and self.store is not None and s.persisted:
            segs = self.store.read_segments(self.key(s), 0, s.persisted)
        return pack_export(self.stamp, session_meta(s), segs)

    def import_state(self, s: Session, data: bytes) -> None:
        """Give the new empty session `s` an export's state; its KV waits, staged, for its first turn.
        StampMismatch / StoreError / SegmentCorrupt before `s` changed."""
        meta, segs = unpack_export(data, self.stamp)
        try:
            tokens = _tokens_from_b64(meta["tokens"])
        except (KeyError, ValueError, TypeError) as e:
            raise StoreError(f"bad session metadata: {e}") from e
        at = 0
        for g in segs:
            if g.start != at or g.tokens != tokens[at : at + len(g.tokens)]:
                raise StoreError("the export's KV does not spell its token ids")
            at += len(g.tokens)
        apply_meta(s, meta)
        s.stored_namespace = None  # the importing key's own namespace (the exporter's digest means nothing here)
        s.staged = segs


def _contiguous_end(segments: list[dict[str, Any]], limit: int) -> int:
    at = 0
    for seg in segments:
        if seg["start"] != at:
            break
        at = seg["end"]
    return min(at, limit)
