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

from collections import deque
from typing import NamedTuple

from deltaserve.engine.sequence import Sequence, SeqStatus


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

    def plan(self, admit, reserve) -> StepPlan:
        """Build the next step.

        `admit(seq) -> bool` matches a waiting sequence against the cache and
        locks its prefix (False: no memory yet, try later). `reserve(seq, n) -> bool`
        secures KV slots for `n` more tokens (False: out of memory).
        """
        budget = self.max_batch_tokens
        items: list[ScheduledSeq] = []
        for seq in list(self.running):
            if seq.in_prefill:
                continue
            draft = seq.draft[: max(0, budget - 1)]
            if not reserve(seq, 1 + len(draft)):
                draft = []
                if not reserve(seq, 1):
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
            if n > 0 and reserve(seq, n):
                items.append(ScheduledSeq(seq, n, []))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_running:
            seq = self.waiting[0]
            if seq.cancelled:
                self.waiting.popleft()
                continue
            if not admit(seq):
                break
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            n = min(budget, len(seq.tokens) - seq.num_computed)
            if reserve(seq, n):
                items.append(ScheduledSeq(seq, n, []))
                budget -= n
        return StepPlan(items)

    def remove(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
