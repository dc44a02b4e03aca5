"""The session store on disk (`--session-store DIR`): each session's turns appended as KV segments, written behind.

Layout:
    DIR/stamp.json                      what the KV is valid for (format.Stamp); a mismatch refuses the store
    DIR/sessions/<key>/meta.json        session id, owner digest, TTL, token ids, turns, the segment list
    DIR/sessions/<key>/<n>.kv           KV segments (format.py), in token order

`<key>` is a digest of (owner digest, session id): any session id is a safe file name, and no API key is ever
written (owners are stored as digests).

Writes run on one background thread in submission order (`append`, `write_meta`, `delete`), so a step never
waits for the disk. A segment is renamed into place before the metadata that lists it, and a file the new
metadata no longer lists is removed only after that metadata is in place: after a crash at any point the
metadata lists only complete segments (a partial tail was never listed, or its checksum fails on read).

Bound: `max_bytes`; past it, the least recently written sessions that are not live (closed or forgotten in this
server) are removed, oldest first. Live sessions' files are never removed by the bound (their next restore needs
them); a store over its bound with only live sessions says so in the log.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import shutil
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

from deltaserve.store.format import Segment, SegmentCorrupt, Stamp, atomic_write, decode_segment, encode_segment

log = logging.getLogger("deltaserve.store")


class StoredSession(NamedTuple):
    key: str
    meta: dict[str, Any]  # as written by the engine (persistence.session_meta), plus "segments"


def session_key(owner_digest: str, session_id: str) -> str:
    return hashlib.sha256(f"{owner_digest}\x00{session_id}".encode()).hexdigest()[:32]


class SessionStore:
    def __init__(self, root: str | Path, stamp: Stamp, max_bytes: int | None = None):
        self.root = Path(root)
        self.stamp = stamp
        self.max_bytes = max_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        stamp_path = self.root / "stamp.json"
        if stamp_path.exists():
            stamp.check(Stamp.from_json(stamp_path.read_text()), f"session store {self.root}")
        else:
            atomic_write(stamp_path, stamp.to_json().encode())
        self.dir = self.root / "sessions"
        self.dir.mkdir(exist_ok=True)
        self._lock = threading.Lock()  # guards the tables below (writer thread vs readers)
        self._segments: dict[str, list[dict[str, Any]]] = {}  # key -> [{"file", "start", "end"}] in token order
        self._bytes: dict[str, int] = {}
        self._written_at: dict[str, float] = {}
        self._live: set[str] = set()
        self._next_file: dict[str, int] = {}
        self.write_errors = 0
        self._q: queue.Queue[tuple[str, tuple] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="deltaserve-store", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- start
    def scan(self) -> list[StoredSession]:
        """The sessions on disk (call once, before any write). A session whose metadata cannot be read is removed;
        listed segments that are missing cut its list there; files no metadata lists are removed."""
        out = []
        for d in sorted(p for p in self.dir.iterdir() if p.is_dir()):
            try:
                meta = json.loads((d / "meta.json").read_text())
                segs = list(meta["segments"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("session store: dropping %s (unreadable metadata: %s)", d.name, e)
                shutil.rmtree(d, ignore_errors=True)
                continue
            kept = []
            for s in segs:
                if not (d / s["file"]).is_file():
                    break
                kept.append(s)
            listed = {s["file"] for s in kept} | {"meta.json"}
            for f in d.iterdir():
                if f.name not in listed:
                    f.unlink(missing_ok=True)
            meta["segments"] = kept
            with self._lock:
                self._segments[d.name] = kept
                self._bytes[d.name] = sum((d / s["file"]).stat().st_size for s in kept)
                self._written_at[d.name] = (d / "meta.json").stat().st_mtime
                self._next_file[d.name] = 1 + max((int(s["file"].split(".")[0]) for s in kept), default=0)
            out.append(StoredSession(d.name, meta))
        return out

    # ---------------------------------------------------------------- writes (any thread; return at once)
    def append(self, key: str, seg: Segment, meta: dict[str, Any]) -> None:
        """Queue: KV for tokens [seg.start, seg.start + n) replaces whatever the session had from seg.start on."""
        self._q.put(("append", (key, seg, meta)))

    def write_meta(self, key: str, meta: dict[str, Any]) -> None:
        self._q.put(("meta", (key, meta)))

    def delete(self, key: str) -> None:
        self._q.put(("delete", (key,)))

    def set_live(self, key: str, live: bool) -> None:
        """Live sessions (open in this server) are removed by the size bound only after every other one."""
        with self._lock:
            (self._live.add if live else self._live.discard)(key)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued write is on disk; False on timeout."""
        done = threading.Event()
        self._q.put(("barrier", (done,)))
        return done.wait(timeout)

    def close(self, timeout: float | None = 30.0) -> bool:
        ok = self.flush(timeout)
        self._q.put(None)
        return ok

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(self._bytes.values())

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._segments

    # ---------------------------------------------------------------- reads (any thread)
    def read_segments(self, key: str, start: int, end: int) -> list[Segment]:
        """The KV of tokens [start, end) as written, in order, cut to that range; stops at the first segment that
        is missing or fails its checksum (what follows it is recomputed, never served)."""
        with self._lock:
            segs = [dict(s) for s in self._segments.get(key, ())]
        out = []
        for s in segs:
            lo, hi = max(s["start"], start), min(s["end"], end)
            if lo >= hi:
                continue
            try:
                seg = decode_segment((self.dir / key / s["file"]).read_bytes())
            except (OSError, SegmentCorrupt) as e:
                log.warning("session store: %s/%s unusable (%s); the session's KV from token %d on is recomputed",
                            key, s["file"], e, lo)
                break
            if seg.start != s["start"] or seg.start + len(seg.tokens) < s["end"]:
                log.warning("session store: %s/%s does not hold what its metadata says", key, s["file"])
                break
            a, b = lo - seg.start, hi - seg.start
            out.append(Segment(lo, seg.tokens[a:b], seg.rows[:, :, a:b]))
        contiguous, at = [], start
        for seg in out:
            if seg.start != at:
                break
            contiguous.append(seg)
            at += len(seg.tokens)
        return contiguous

    # ---------------------------------------------------------------- writer thread
    def _work(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                return
            kind, args = job
            try:
                if kind == "barrier":
                    args[0].set()
                elif kind == "append":
                    self._append(*args)
                elif kind == "meta":
                    self._meta(*args)
                elif kind == "delete":
                    self._delete(*args)
            except Exception as e:  # a failed write loses that session's unsaved tail only; the writer goes on
                self.write_errors += 1
                log.error("session store: %s failed: %s", kind, e)

    def _append(self, key: str, seg: Segment, meta: dict[str, Any]) -> None:
        d = self.dir / key
        d.mkdir(exist_ok=True)
        with self._lock:
            n = self._next_file.get(key, 1)
            self._next_file[key] = n + 1
            old = self._segments.get(key, [])
        name = f"{n:08d}.kv"
        atomic_write(d / name, encode_segment(seg))
        kept = []
        for s in old:
            if s["start"] < seg.start:
                kept.append({**s, "end": min(s["end"], seg.start)})  # a straddling segment is used only up to here
        new = kept + [{"file": name, "start": seg.start, "end": seg.start + len(seg.tokens)}]
        with self._lock:
            self._segments[key] = new
        self._meta(key, meta)
        for s in old:
            if s["file"] not in {x["file"] for x in kept}:
                (d / s["file"]).unlink(missing_ok=True)
        with self._lock:
            self._bytes[key] = sum((d / s["file"]).stat().st_size for s in new)
        self._bound()

    def _meta(self, key: str, meta: dict[str, Any]) -> None:
        d = self.dir / key
        with self._lock:
            segs = self._segments.get(key)
        if segs is None:
            return  # deleted meanwhile, or never appended: nothing to describe
        atomic_write(d / "meta.json", json.dumps({**meta, "segments": segs}).encode())
        with self._lock:
            self._written_at[key] = time.time()

    def _delete(self, key: str) -> None:
        with self._lock:
            for table in (self._segments, self._bytes, self._written_at, self._next_file):
                table.pop(key, None)
            self._live.discard(key)
        shutil.rmtree(self.dir / key, ignore_errors=True)

    def _bound(self) -> None:
        if self.max_bytes is None:
            return
        with self._lock:
            total = sum(self._bytes.values())
            order = sorted(self._bytes, key=lambda k: (k in self._live, self._written_at.get(k, 0.0)))
        for key in order:
            if total <= self.max_bytes:
                break
            with self._lock:
                if key in self._live:  # a live session's files are what its next restore needs: kept
                    log.warning("session store over its bound (%d > %d bytes) with only live sessions left",
                                total, self.max_bytes)
                    break
                total -= self._bytes.get(key, 0)
            self._delete(key)
