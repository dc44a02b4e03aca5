"""The engine's counters and where its thread's time goes, step by step (plus an optional trace file)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from deltaserve.engine.scheduler import StepPlan
from deltaserve.engine.sequence import Sequence


@dataclass
class EngineCounters:
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    prefilled_tokens: int = 0
    generated_tokens: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    steps: int = 0
    preemptions: int = 0
    # Where the engine thread's time goes (seconds, perf_counter): building the step (scheduling, admission,
    # KV reservation), the forward pass of steps that carry prefill tokens and of pure decode/verify steps,
    # and sampling/verification/bookkeeping after it. Read by `deltaserve bench agents` for its profile.
    time_schedule: float = 0.0
    time_forward_prefill: float = 0.0
    time_forward_decode: float = 0.0
    time_sample: float = 0.0
    prefill_steps: int = 0


class StepStats:
    """Counts and times one step's phases: `begin` → `scheduled` → `forwarded` → `done`.

    `trace_path`: append one JSON line per forward step there (context before, tokens fed and draft length of
    each item, forward seconds), for profiling; `DELTASERVE_STEP_TRACE` sets it.
    """

    def __init__(self, trace_path: str | None = None):
        self.counters = EngineCounters()
        self._trace = open(trace_path, "a", buffering=1) if trace_path else None
        self._t = 0.0

    def begin(self) -> None:
        self._t = time.perf_counter()

    def _lap(self) -> float:
        now = time.perf_counter()
        dt, self._t = now - self._t, now
        return dt

    def scheduled(self) -> None:
        self.counters.time_schedule += self._lap()

    def forwarded(self, plan: StepPlan) -> None:
        """After the forward pass of `plan` (before its items' `num_computed` advance)."""
        c = self.counters
        dt = self._lap()
        # a step carries prefill when some item feeds more than its last sampled token
        if any(i.num_tokens > 1 for i in plan.items):
            c.time_forward_prefill += dt
            c.prefill_steps += 1
        else:
            c.time_forward_decode += dt
        c.steps += 1
        if self._trace is not None:
            self._trace.write(json.dumps({"t": round(self._t - dt, 4), "fwd": round(dt, 5), "items": [
                [i.seq.num_computed, i.num_tokens, len(i.draft)] for i in plan.items]}) + "\n")

    def done(self) -> None:
        self.counters.time_sample += self._lap()

    def finished(self, seq: Sequence) -> None:
        """A request ended: add its counters."""
        c, st = self.counters, seq.stats
        c.prompt_tokens += st.prompt_tokens
        c.cached_tokens += st.cached_tokens
        c.prefilled_tokens += st.prefilled_tokens
        c.drafted_tokens += st.drafted_tokens
        c.accepted_tokens += st.accepted_tokens
