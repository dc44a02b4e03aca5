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

import time
from enum import Enum
from typing import Callable

import torch

from deltaserve.cache.radix import RadixCache
from deltaserve.cache.session import Session, SessionManager, explain_match
from deltaserve.engine.sequence import Sequence
from deltaserve.kv.pool import KVPool
from deltaserve.tokens import common_prefix_len


ADMIT_HEADROOM = 16  # slots beyond the uncached prompt a request needs before it is admitted
# A waiting request whose prompt shares at least this many tokens beyond its cache match with a prompt being
# prefilled right now waits for that prefill (a step or two) and then reuses its KV, instead of computing the
# same tokens beside it: agents of one role arrive together with the same system prompt and tools.
SHARE_MIN_TOKENS = 32


class CacheMode(str, Enum):
    STATEFUL = "stateful"
    PREFIX = "prefix"
    STATELESS = "stateless"


class KVManager:
    def __init__(self, pool: KVPool, mode: CacheMode = CacheMode.STATEFUL, default_ttl: float = 300.0,
                 clock: Callable[[], float] = time.monotonic, max_pinned_fraction: float = 0.7):
        self.pool = pool
        self.mode = CacheMode(mode)
        self.allocator = pool.allocator
        self.radix = RadixCache(self.allocator, clock)
        self.sessions = SessionManager(self.radix, default_ttl, clock, pin=self.mode == CacheMode.STATEFUL)
        self.evicted_tokens = 0
        self.demoted_sessions = 0
        self.unpinned_over_budget = 0  # turns whose session was left unpinned by the pin budget
        # pinned (+ in-use) KV may hold at most this many slots; the rest is working space
        self.pin_budget = int(max_pinned_fraction * pool.num_slots)
        # set by the engine before each plan: True while other sequences run, so admission
        # waits for them to free memory instead of demoting pins (see _make_room)
        self.others_running = False
        # the scheduler's running list (set by the engine), for in-flight prefix sharing
        self.running: list[Sequence] = []

    @property
    def reuse(self) -> bool:
        return self.mode != CacheMode.STATELESS

    # ------------------------------------------------------------ admission
    def admit(self, seq: Sequence) -> bool:
        """Match `seq` against the cache, lock its prefix; False if memory cannot take it yet.

        Needs room for the uncached part of the prompt plus a little headroom,
        counting slots that eviction or pin demotion could free.
        """
        self.sessions.expire()
        session = self.sessions.get(seq.session_id) if seq.session_id else None
        was_pinned = bool(session and session.pinned)
        if self.reuse:
            m = self.radix.match_prefix(seq.tokens)
            matched, slots, node = m.num_matched, m.slots, m.node
        else:
            matched, slots, node = 0, torch.empty(0, dtype=torch.int64), None
        # At least the last prompt token is computed: its logits give the first output token.
        cached = min(matched, len(seq.tokens) - 1)
        if self.reuse and self._prefill_in_flight(seq, cached):
            return False
        if cached > 0:
            self.radix.lock(node)  # before the room check, so the check cannot count our own prefix as evictable
        if not self._make_room(len(seq.tokens) - cached + ADMIT_HEADROOM):
            if cached > 0:
                self.radix.unlock(node)
            return False
        if cached > 0:
            seq.locked_node = node
        seq.slots = slots[:cached].clone()
        seq.num_computed = seq.num_shared = cached
        seq.stats.cached_tokens = cached
        seq.stats.prefilled_tokens = len(seq.tokens) - cached
        seq.explanation = explain_match(session, seq.tokens, cached, was_pinned)
        return True

    def _prefill_in_flight(self, seq: Sequence, cached: int) -> bool:
        """True if a running prefill will put at least SHARE_MIN_TOKENS more of `seq`'s prompt in the tree."""
        for r in self.running:
            if r is not seq and r.num_output == 0:
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
        res = self.radix.insert_with_node(seq.tokens[:n], seq.slots[:n])
        self.radix.lock(res.node)  # before unlocking the old prefix, so no shared ancestor turns evictable
        if seq.locked_node is not None:
            self.radix.unlock(seq.locked_node)
        seq.locked_node = res.node
        # the tree keeps slots it already had for these tokens (an insert frees passed duplicates)
        seq.slots = torch.cat([self.radix.path_slots(res.node), seq.slots[n:]])
        seq.num_shared = n

    def _make_room(self, n: int) -> bool:
        """True if `n` slots are free or evictable, demoting LRU session pins if that is what it takes.

        Pins are demoted for admission only when nothing else is running: while
        others run, the request waits for them to finish and free their private
        KV (demoting would throw away a pinned session for memory that is about
        to come back). With nothing running, waiting could last forever, so pins go.
        """
        if self.allocator.num_free + self.radix.evictable_size >= n:
            return True
        if self.mode == CacheMode.STATEFUL and not self.others_running:
            self.demoted_sessions += len(self.sessions.demote_lru(n - self.allocator.num_free))
        return self.allocator.num_free + self.radix.evictable_size >= n

    # ---------------------------------------------------------- reservation
    def reserve(self, seq: Sequence, n: int) -> bool:
        """Give `seq` private slots for `n` more tokens; evicts LRU cache, then demotes LRU pins."""
        assert len(seq.slots) == seq.num_computed, "unconsumed reservation"
        if not self.ensure_free(n):
            return False
        seq.slots = torch.cat([seq.slots, self.allocator.allocate(n)])
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
        if self.reuse and n > 0:
            res = self.radix.insert_with_node(seq.tokens[:n], seq.slots[:n])
            if session is not None:
                self.sessions.repin(session, res.node, seq.tokens[:n])
        else:
            private = seq.slots[seq.num_shared : n]
            if private.numel():
                self.allocator.free(private)
            if session is not None:
                _set_tokens(session, seq.tokens[:n])
        if seq.locked_node is not None:
            self.radix.unlock(seq.locked_node)
            seq.locked_node = None
        if session is not None and session.pinned and self.radix.protected_size > self.pin_budget:
            self.sessions.unpin_over_budget(session)
            self.unpinned_over_budget += 1
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

    def check_integrity(self, running: list[Sequence]) -> None:
        extra = [s.slots[s.num_shared :] for s in running if len(s.slots) > s.num_shared]
        self.radix.check_integrity(torch.cat(extra) if extra else torch.empty(0, dtype=torch.int64))


def _set_tokens(session: Session, tokens: list[int]) -> None:
    session.tokens = list(tokens)
