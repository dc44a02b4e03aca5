"""Continuous batching: which sequences run in the next step, and how many tokens each.

Policy per step, under a token budget:
1. every running sequence in decode gets its 1 token (+ its speculative draft);
2. the remaining budget goes to prefill chunks, running prefills first, then
   admitted waiting requests in arrival order. A step that carries decodes
   carries at most `max_prefill_with_decode` prefill tokens: every decoding
   agent waits for the whole step, so a 2,000-token chunk would hold each of
   their next tokens for a second; steps without decodes take the full budget.
So one agent's 1,500-token tool result is spread over several steps while
the other agents keep decoding, instead of stalling them.
"""

from __future__ import annotations

import time
from collections import deque
from typing import NamedTuple, Protocol

from deltaserve.engine.sequence import Sequence, SeqStatus


class KVAdmission(Protocol):
    """What the scheduler asks of the KV manager (`engine/kv_manager.py`), in pairs."""

    def can_admit(self, seq: Sequence, running: list[Sequence], demote_pins: bool) -> bool:
        """May `seq` start now? (matches the cache; may demote pins when `demote_pins`)"""

    def admit(self, seq: Sequence) -> None:
        """Give `seq` its cached prefix; only right after `can_admit(seq, ...)` said yes."""

    def reserve(self, seq: Sequence, n: int) -> bool:
        """Secure KV slots for `n` more tokens of `seq` (False: out of memory)."""


class ScheduledSeq(NamedTuple):
    seq: Sequence
    num_tokens: int  # tokens of seq.tokens fed this step, starting at seq.num_computed
    draft: list[int]  # speculative tokens appended after them (decode only)


class StepPlan(NamedTuple):
    items: list[ScheduledSeq]

    @property
    def num_tokens(self) -> int:
        return sum(i.num_tokens + len(i.draft) for i in self.items)


class Scheduler:
    def __init__(self, max_batch_tokens: int = 512, max_running: int = 64, max_prefill_with_decode: int | None = None):
        self.max_batch_tokens = max_batch_tokens
        self.max_running = max_running
        # None: no cap beyond the step budget
        self.max_prefill_with_decode = max_prefill_with_decode
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def plan(self, kv: KVAdmission) -> StepPlan:
        """Build the next step: reserves KV for every item, moves admitted requests from waiting to running."""
        budget = self.max_batch_tokens
        items: list[ScheduledSeq] = []
        # Pins may be demoted to admit a request only when nothing was running as the step began: then
        # waiting could last forever. (Requests admitted earlier in this step do not count.)
        demote_pins = not self.running
        for seq in list(self.running):
            if seq.in_prefill:
                continue
            draft = seq.draft[: max(0, budget - 1)]
            if not kv.reserve(seq, 1 + len(draft)):
                draft = []
                if not kv.reserve(seq, 1):
                    continue  # the engine preempts when nothing could run
            items.append(ScheduledSeq(seq, 1, draft))
            budget -= 1 + len(draft)
        if items and self.max_prefill_with_decode is not None:
            budget = min(budget, self.max_prefill_with_decode)
        for seq in list(self.running):
            if budget <= 0:
                break
            if not seq.in_prefill:
                continue
            n = min(budget, len(seq.tokens) - seq.num_computed)
            if n > 0 and kv.reserve(seq, n):
                items.append(ScheduledSeq(seq, n, []))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_running:
            seq = self.waiting[0]
            if seq.cancelled:
                self.waiting.popleft()
                continue
            # the running list as it is now: a prefill admitted a moment ago may be one to wait for
            if not kv.can_admit(seq, self.running, demote_pins):
                break
            kv.admit(seq)
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            if seq.stats.scheduled_time is None:
                seq.stats.scheduled_time = time.perf_counter()
            self.running.append(seq)
            n = min(budget, len(seq.tokens) - seq.num_computed)
            if kv.reserve(seq, n):
                items.append(ScheduledSeq(seq, n, []))
                budget -= n
        return StepPlan(items)

    def remove(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def preempt(self, seq: Sequence) -> None:
        """Send a running sequence back to the head of the queue (its KV was taken away: it recomputes)."""
        self.running.remove(seq)
        seq.status = SeqStatus.WAITING
        seq.draft = []
        self.waiting.appendleft(seq)
