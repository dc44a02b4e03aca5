"""KV ownership across requests: admission against the cache, slot reservation, finish.

Composes the slot allocator, the radix cache and the session manager; the
cache mode decides which of them take part:
- `stateful`: radix prefix cache + sessions pinned between turns (with TTL), up to a
  pin budget (`max_pinned_fraction` of the pool): a session finishing a turn when
  pinned KV is already over budget stays unpinned, so under memory pressure a
  stable set of sessions keeps its KV instead of every session evicting the next
  one in turn (what LRU does to agents that take turns in a cycle);
- `prefix`:   radix prefix cache with LRU only, sessions never pinned (vLLM/SGLang policy);
- `stateless`: no reuse at all, every prompt is computed from scratch.
"""

from __future__ import annotations

import logging
import time
from enum import Enum
from typing import Callable, NamedTuple

import torch

from deltaserve.cache.base import MatchResult
from deltaserve.cache.host_tier import HostTier
from deltaserve.cache.radix import RadixCache
from deltaserve.cache.session import Session, SessionManager, advance, explain_match
from deltaserve.cache.shared_prefix import SHARED_NAMESPACE, declared_prefix
from deltaserve.engine.sequence import Sequence
from deltaserve.kv.allocator import PAGE
from deltaserve.kv.pool import KVPool
from deltaserve.tokens import common_prefix_len


log = logging.getLogger("deltaserve.engine")

ADMIT_HEADROOM = 16  # slots beyond the uncached prompt a request needs before it is admitted
# A waiting request whose prompt shares at least this many tokens beyond its cache match with a prompt being
# prefilled right now waits for that prefill (a step or two) and then reuses its KV, instead of computing the
# same tokens beside it: agents of one role arrive together with the same system prompt and tools.
SHARE_MIN_TOKENS = 32


class Restored(NamedTuple):
    match: MatchResult  # the radix match after the restore
    num_tokens: int  # tokens copied back into the pool
    from_store: int  # of those, from staged session-store reads


class SlotRuns(NamedTuple):
    windows: int  # full 16-token windows of the pinned sessions' paths
    runs: int  # of those, the ones in 16 consecutive slots


class _Admission(NamedTuple):
    seq: Sequence
    match: MatchResult
    cached: int  # prompt tokens reused (at most all but the last)
    session: Session | None
    was_pinned: bool  # the session's pin state when the turn was matched


class CacheMode(str, Enum):
    STATEFUL = "stateful"
    PREFIX = "prefix"
    STATELESS = "stateless"


class KVManager:
    def __init__(self, pool: KVPool, mode: CacheMode = CacheMode.STATEFUL, default_ttl: float = 300.0,
                 clock: Callable[[], float] = time.monotonic, max_pinned_fraction: float = 0.7,
                 offload_bytes: int = 0):
        self.pool = pool
        self.mode = CacheMode(mode)
        self.allocator = pool.allocator
        self.radix = RadixCache(self.allocator, clock)
        self.sessions = SessionManager(self.radix, default_ttl, clock, pin=self.mode == CacheMode.STATEFUL)
        self.evicted_tokens = 0
        self.demoted_sessions = 0
        self.unpinned_over_budget = 0  # turns whose session was left unpinned by the pin budget
        self.max_pinned_tokens_per_owner: int | None = None  # a key's pins over this demote its own LRU ones
        # pinned (+ in-use) KV may hold at most this many slots; the rest is working space
        self.pin_budget = int(max_pinned_fraction * pool.num_slots)
        self._admission: _Admission | None = None  # from the last True can_admit, consumed by admit
        # The host tier (--kv-offload-gb): evicted leaves' KV is copied there, and restored from there by copy.
        self.host_tier: HostTier | None = None
        self.on_turn_end: Callable[[Session], None] | None = None  # after a session's turn is in the tree (store)
        self.shared_prefixes: list[tuple[int, ...]] = []  # --shared-prefix: declared, longest first
        self.grafted_tokens = 0  # tokens a tenant took from the shared namespace instead of computing them
        if offload_bytes > 0 and self.reuse:
            self.host_tier = HostTier(offload_bytes)
            self.radix.on_evict = self._offload

    def enable_staging(self) -> HostTier:
        """The tier staged session-store reads land in (made with a zero budget when there is no offload tier)."""
        if self.host_tier is None:
            self.host_tier = HostTier(0)
        return self.host_tier

    @property
    def reuse(self) -> bool:
        return self.mode != CacheMode.STATELESS

    # ------------------------------------------------------------ admission
    def can_admit(self, seq: Sequence, running: list[Sequence], demote_pins: bool) -> bool:
        """Whether `seq` can be admitted now; if so, `admit(seq)` must follow (it uses this call's match).

        No when a running prefill (in `running`) will put at least SHARE_MIN_TOKENS more of its prompt in the
        tree (it waits a step or two and reuses that KV), or when memory cannot take the uncached part of its
        prompt plus a little headroom, counting slots that eviction could free. With `demote_pins` (the caller's
        policy: nothing was running when the step began, so waiting could last forever) LRU session pins are
        demoted until it fits; while others run, a request waits for them to free their private KV instead of
        throwing pinned sessions away for memory that is about to come back.
        Mutates: expires pins whose TTL passed; demotes pins as above (counted in `demoted_sessions`); the match
        refreshes LRU times and may split a node.
        """
        self.sessions.expire()  # pins whose TTL passed become plain cache before anyone counts memory
        if seq.pending_load is not None and not self._land(seq, wait=not running):
            return False  # its saved KV is still being read, and others can run meanwhile
        session = self.sessions.get(seq.session_id) if seq.session_id else None
        was_pinned = bool(session and session.pinned)  # before any demotion below: what the turn found
        if self.reuse:
            m = self.radix.match_prefix(seq.tokens, seq.cache_namespace)
            if self.shared_prefixes:
                m = self._graft(seq.tokens, m, seq.cache_namespace)
        else:
            m = MatchResult(torch.empty(0, dtype=torch.int64), self.radix.namespace_root(seq.cache_namespace), 0)
        # At least the last prompt token is computed: its logits give the first output token.
        cached = min(m.num_matched, len(seq.tokens) - 1)
        if self.reuse and self._prefill_in_flight(seq, cached, running):
            return False
        # Restored tokens need slots as prefilled ones do, so memory is counted before any restore: a request
        # that cannot be admitted yet restores nothing (its copy would be evicted again while it waits).
        need = len(seq.tokens) - cached + ADMIT_HEADROOM
        if cached > 0:
            self.radix.lock(m.node)  # while counting, so our own prefix is not counted as evictable for us
        if self.allocator.num_free + self.radix.evictable_size < need and demote_pins and self.mode == CacheMode.STATEFUL:
            self.demoted_sessions += len(self.sessions.demote_lru(need - self.allocator.num_free))
        fits = self.allocator.num_free + self.radix.evictable_size >= need
        if cached > 0:
            self.radix.unlock(m.node)  # admit locks it for good
        if not fits:
            return False
        if self.host_tier is not None and self.reuse:
            r = self.restore(seq.tokens, m, seq.cache_namespace)
            m, cached = r.match, min(r.match.num_matched, len(seq.tokens) - 1)
            seq.stats.restored_tokens += r.num_tokens
            seq.stats.restored_from_store += r.from_store
        self._admission = _Admission(seq, m, cached, session, was_pinned)
        return True

    def admit(self, seq: Sequence) -> None:
        """Lock `seq`'s cached prefix and give it the cached slots.

        Precondition: `can_admit(seq, ...)` just returned True. Sets `slots`, `num_computed`, `num_shared`,
        `locked_node`, the cached/prefilled counters and the cache explanation.
        """
        a = self._admission
        assert a is not None and a.seq is seq, "admit without can_admit"
        self._admission = None
        m, cached = a.match, a.cached
        if cached > 0:
            self.radix.lock(m.node)
            seq.locked_node = m.node
        seq.slots = m.slots[:cached].clone()
        seq.num_computed = seq.num_shared = cached
        seq.stats.cached_tokens = cached
        seq.stats.prefilled_tokens = len(seq.tokens) - cached
        restored = min(seq.stats.restored_tokens, cached)
        seq.explanation = explain_match(a.session, seq.tokens, cached, a.was_pinned, restored,
                                        "the session store" if seq.stats.restored_from_store else "host memory")

    # ------------------------------------------------------------ shared prefixes
    def _graft(self, tokens: list[int], m: MatchResult, namespace: str) -> MatchResult:
        """A tenant prompt that starts with a declared shared prefix gets what the shared namespace holds of it
        (the same slots, one more holder each) under its own namespace; never more than the declared tokens."""
        p = declared_prefix(self.shared_prefixes, tokens)
        if p <= m.num_matched or namespace in ("", SHARED_NAMESPACE):
            return m
        g = self.radix.match_prefix(tokens[:p], SHARED_NAMESPACE)
        if g.num_matched <= m.num_matched:
            return m
        extra = g.slots[m.num_matched : g.num_matched]
        self.allocator.share(extra)
        self.radix.insert(tokens[: g.num_matched], torch.cat([m.slots, extra]), namespace)
        self.grafted_tokens += extra.numel()
        return self.radix.match_prefix(tokens, namespace)

    def _publish(self, tokens: list[int], namespace: str) -> None:
        """A tenant just cached a declared shared prefix: give its KV to the shared namespace too (shared slots),
        so the next tenant grafts it instead of computing it."""
        p = declared_prefix(self.shared_prefixes, tokens)
        if not p or namespace in ("", SHARED_NAMESPACE):
            return
        g = self.radix.match_prefix(tokens[:p], SHARED_NAMESPACE)
        if g.num_matched >= p:
            return
        t = self.radix.match_prefix(tokens[:p], namespace)
        if t.num_matched < p:
            return
        extra = t.slots[g.num_matched : p]
        self.allocator.share(extra)
        self.radix.insert(tokens[:p], torch.cat([g.slots, extra]), SHARED_NAMESPACE)

    # ------------------------------------------------------------ tiers
    def _land(self, seq: Sequence, wait: bool) -> bool:
        """Put `seq`'s finished store read into the host tier as staged entries (restored by copy at admission);
        False while the read runs and `wait` is off. A failed read lands nothing: the prompt is prefilled."""
        p = seq.pending_load
        if not wait and not p.future.done():
            return False
        seq.pending_load = None
        try:
            segments = p.future.result()
        except Exception:  # an unreadable store file is the store's problem, never the request's
            log.exception("session store read failed; the turn recomputes that KV")
            return True
        tier = self.enable_staging()
        # Restore continues the pool's match, and the tier finds entries by the exact prefix they continue: a
        # segment overlapping what the pool already holds (an imported session sharing a chat template or system
        # prompt with cached KV) is staged from the end of that match, or it would never be found.
        have = self.radix.match_prefix(p.prompt, p.namespace).num_matched
        for g in segments:
            cut = max(0, have - g.start)
            if cut >= len(g.tokens):
                continue
            tier.put(p.namespace, p.prompt[: g.start + cut], g.tokens[cut:], g.rows[:, :, cut:], staged=True)
        return True

    def _offload(self, namespace: str, prefix: list[int], run: tuple[int, ...], slots: torch.Tensor) -> None:
        """Radix eviction hook: copy a leaf's KV to the host tier before its slots are freed."""
        assert self.host_tier is not None
        self.host_tier.put(namespace, prefix, run, self.pool.read_rows(slots))

    def restore(self, tokens: list[int], m: MatchResult, namespace: str) -> Restored:
        """Copy KV continuing the match `m` of `tokens` back from the host tier into the pool, entry after entry,
        and return the longer match. Never the prompt's last token (its logits are computed anyway).

        Restoring evicts LRU cache for room (never the matched prefix, locked meanwhile; never a pin: a restore
        that does not fit stops, and the rest is prefilled). Mutates: the pool, the tree, the tier."""
        tier = self.host_tier
        assert tier is not None
        limit, restored, from_store = len(tokens) - 1, 0, 0
        while m.num_matched < limit:
            hit = tier.find(namespace, tokens, m.num_matched)
            if hit is None:
                break
            n = min(hit.num_tokens, limit - m.num_matched)
            if m.num_matched:
                self.radix.lock(m.node)
            short = n - self.allocator.num_free
            if short > 0:
                self.evicted_tokens += self.radix.evict(short)  # may offload other leaves into the tier
            if m.num_matched:
                self.radix.unlock(m.node)
            if self.allocator.num_free < n:
                break
            staged = hit.entry.staged
            rows = tier.take(hit, n)
            slots = self.allocator.allocate(n, m.num_matched, int(m.slots[-1]) if m.num_matched else None)
            self.pool.write_rows(slots, rows.contiguous())
            self.radix.insert(tokens[: m.num_matched + n], torch.cat([m.slots, slots]), namespace)
            restored += n
            from_store += n if staged else 0
            m = self.radix.match_prefix(tokens, namespace)
        return Restored(m, restored, from_store)

    def _prefill_in_flight(self, seq: Sequence, cached: int, running: list[Sequence]) -> bool:
        """True if a running prefill will put at least SHARE_MIN_TOKENS more of `seq`'s prompt in the tree."""
        for r in running:
            # only same-namespace prefills: waiting on another tenant's would leak its prompt through timing
            if r is not seq and r.num_output == 0 and r.cache_namespace == seq.cache_namespace:
                limit = min(r.prompt_len, len(seq.tokens) - 1)
                if limit >= cached + SHARE_MIN_TOKENS and common_prefix_len(r.tokens, seq.tokens, limit) >= cached + SHARE_MIN_TOKENS:
                    return True
        return False

    def share_prompt(self, seq: Sequence) -> None:
        """`seq` just computed its whole prompt: hand the prompt's KV to the radix tree now, not at finish.

        Then requests waiting on this prefill (`_prefill_in_flight`) match it, and a preempted `seq` keeps its
        prompt cached. The sequence keeps the prompt locked; only its generated tokens stay private.
        """
        n = seq.prompt_len
        if not self.reuse or n <= seq.num_shared or seq.num_computed < n:
            return
        res = self.radix.insert_with_node(seq.tokens[:n], seq.slots[:n], seq.cache_namespace)
        self.radix.lock(res.node)  # before unlocking the old prefix, so no shared ancestor turns evictable
        if self.shared_prefixes:
            self._publish(seq.tokens, seq.cache_namespace)
        if seq.locked_node is not None:
            self.radix.unlock(seq.locked_node)
        seq.locked_node = res.node
        # the tree keeps slots it already had for these tokens (an insert frees passed duplicates)
        seq.slots = torch.cat([self.radix.path_slots(res.node), seq.slots[n:]])
        seq.num_shared = n

    # ---------------------------------------------------------- reservation
    def reserve(self, seq: Sequence, n: int) -> bool:
        """Give `seq` private slots for `n` more tokens; evicts LRU cache, then demotes LRU pins."""
        assert len(seq.slots) == seq.num_computed, "unconsumed reservation"
        if not self.ensure_free(n):
            return False
        # positions continue the sequence's last slot where they can: runs of 16 are one tile load (kv/allocator.py)
        last = int(seq.slots[-1]) if len(seq.slots) else None
        seq.slots = torch.cat([seq.slots, self.allocator.allocate(n, len(seq.slots), last)])
        return True

    def ensure_free(self, n: int) -> bool:
        short = n - self.allocator.num_free
        if short > 0 and self.reuse:
            self.evicted_tokens += self.radix.evict(short)
            short = n - self.allocator.num_free
            if short > 0 and self.mode == CacheMode.STATEFUL:
                self.demoted_sessions += len(self.sessions.demote_lru(short))
                self.evicted_tokens += self.radix.evict(short)
        return self.allocator.num_free >= n

    def rollback(self, seq: Sequence, keep: int) -> None:
        """Free reserved-but-rejected slots beyond `keep` computed tokens (speculative rejects)."""
        extra = seq.slots[keep:]
        if extra.numel():
            self.allocator.free(extra)
        seq.slots = seq.slots[:keep]

    # --------------------------------------------------------------- finish
    def release(self, seq: Sequence) -> None:
        """Hand a finished (or preempted) sequence's KV to the cache; re-pin its session."""
        n = seq.num_computed
        self.rollback(seq, n)
        session = self.sessions.get(seq.session_id) if seq.session_id else None
        if session is not None and seq.explanation is not None:
            self.sessions.record_turn(session, seq.explanation)  # once per finished turn, not per admission
        if session is not None:
            session.namespace = seq.cache_namespace
        if self.reuse and n > 0:
            res = self.radix.insert_with_node(seq.tokens[:n], seq.slots[:n], seq.cache_namespace)
            if session is not None:
                self.sessions.repin(session, res.node, seq.tokens[:n])
        else:
            private = seq.slots[seq.num_shared : n]
            if private.numel():
                self.allocator.free(private)
            if session is not None:
                advance(session, seq.tokens[:n])
        if seq.locked_node is not None:
            self.radix.unlock(seq.locked_node)
            seq.locked_node = None
        if session is not None and session.pinned and self.radix.protected_size > self.pin_budget:
            self.sessions.unpin_over_budget(session)
            self.unpinned_over_budget += 1
        if session is not None and session.pinned and self.max_pinned_tokens_per_owner is not None:
            demoted = self.sessions.enforce_owner_quota(session.owner, self.max_pinned_tokens_per_owner)
            self.demoted_sessions += len(demoted)
        if session is not None and self.reuse and self.on_turn_end is not None and n > 0:
            self.on_turn_end(session)  # the state's path is in the tree now (pinned or not)
        seq.slots = torch.empty(0, dtype=torch.int64)
        seq.num_computed = seq.num_shared = 0

    def preempt(self, seq: Sequence) -> None:
        """Take a running sequence's KV away so others can proceed; it recomputes when re-admitted.

        Its private slots are freed, not cached (caching them would hand the same
        memory straight back to it on re-admission), and its session keeps the
        pin of its previous turn untouched.
        """
        self.rollback(seq, seq.num_computed)
        private = seq.slots[seq.num_shared :]
        if private.numel():
            self.allocator.free(private)
        if seq.locked_node is not None:
            self.radix.unlock(seq.locked_node)
            seq.locked_node = None
        seq.slots = torch.empty(0, dtype=torch.int64)
        seq.num_computed = seq.num_shared = 0

    def slot_runs(self) -> SlotRuns:
        """How the pinned sessions' KV lies for the attention kernels: their full 16-token windows (positions 16k ..
        16k + 15) and how many of those sit in 16 consecutive slots (one tile load; others are copied row by row)."""
        windows = runs = 0
        for session in self.sessions.list():
            if session.pinned and session.node is not None:
                path = self.radix.path_slots(session.node)
                w = path[: len(path) // PAGE * PAGE].view(-1, PAGE)  # [num_windows, PAGE]
                windows += w.shape[0]
                runs += int((w[:, 1:] - w[:, :-1] == 1).all(dim=1).sum())
        return SlotRuns(windows, runs)

    def check_integrity(self, running: list[Sequence]) -> None:
        extra = [s.slots[s.num_shared :] for s in running if len(s.slots) > s.num_shared]
        self.radix.check_integrity(torch.cat(extra) if extra else torch.empty(0, dtype=torch.int64))
        if self.host_tier is not None:
            self.host_tier.check_integrity()

