"""LLMEngine: requests in, tokens out; sessions that advance by their new tokens only.

Control lives here and in `scheduler`/`kv_manager`; compute lives in
`models/` and `layers/`; `model_runner` is the one bridge between them.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple

import torch

from deltaserve.config import ModelConfig
from deltaserve.engine.kv_manager import CacheMode, KVManager
from deltaserve.engine.model_runner import ModelRunner
from deltaserve.engine.sampling import SamplingParams, make_generator, sample
from deltaserve.engine.scheduler import Scheduler
from deltaserve.engine.sequence import Sequence, SeqStatus
from deltaserve.kv.pool import KVLayout, KVPool
from deltaserve.models.llama import LlamaModel


class EngineError(Exception):
    """Bad input to the engine (the server maps it to a 4xx)."""


class PromptTooLong(EngineError):
    def __init__(self, prompt_tokens: int, limit: int):
        super().__init__(f"prompt is {prompt_tokens} tokens; the context holds {limit} (prompt + max_tokens must fit)")
        self.prompt_tokens, self.limit = prompt_tokens, limit


class SessionBusy(EngineError):
    pass


class SessionNotFound(EngineError):
    pass


@dataclass(frozen=True)
class EngineConfig:
    dtype: torch.dtype = torch.bfloat16
    device: str = "cpu"
    kv_cache_bytes: int = 2 << 30
    max_batch_tokens: int = 512
    max_prefill_with_decode: int | None = None  # prefill tokens a step that also decodes may carry (None: no cap)
    max_running: int = 64
    cache_mode: CacheMode = CacheMode.STATEFUL
    session_ttl: float = 300.0
    max_pinned_fraction: float = 0.7  # pinned session KV may hold this share of the pool (the rest: working space)
    max_context: int | None = None  # defaults to the model's
    speculation: bool = True
    session_max_idle: float = 3600.0  # forget unpinned sessions idle longer than this (seconds)
    check_integrity: bool = False  # after every step (tests)


class SeqOutput(NamedTuple):
    seq: Sequence
    new_tokens: list[int]
    finished: bool


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


class LLMEngine:
    def __init__(self, model: LlamaModel, tokenizer=None, config: EngineConfig = EngineConfig(),
                 clock: Callable[[], float] = time.monotonic):
        self.model = model
        self.cfg: ModelConfig = model.cfg
        self.tokenizer = tokenizer
        self.config = config
        layout = KVLayout(self.cfg.num_layers, self.cfg.num_kv_heads, self.cfg.head_dim, model.dtype)
        self.pool = KVPool.from_budget(layout, config.kv_cache_bytes, model.device)
        self.kv = KVManager(self.pool, config.cache_mode, config.session_ttl, clock, config.max_pinned_fraction)
        self.scheduler = Scheduler(config.max_batch_tokens, config.max_running, config.max_prefill_with_decode)
        self.kv.running = self.scheduler.running  # the same list: admission sees prefills in flight
        self.runner = ModelRunner(model, self.pool)
        self.max_context = min(config.max_context or self.cfg.max_position, self.cfg.max_position)
        self.stop_ids = frozenset(tokenizer.stop_token_ids) if tokenizer is not None else frozenset()
        self.counters = EngineCounters()
        self.speculator = None
        if config.speculation:
            from deltaserve.engine.speculator import Speculator

            self.speculator = Speculator()
        self._busy_sessions: set[str] = set()
        # DELTASERVE_STEP_TRACE=path: a JSON line per step (profiling; off by default)
        trace = os.environ.get("DELTASERVE_STEP_TRACE")
        self._trace = open(trace, "a", buffering=1) if trace else None

    @classmethod
    def from_model(cls, model: str, config: EngineConfig = EngineConfig(), **kw) -> "LLMEngine":
        from deltaserve.models.loader import load_config, load_state_dict, model_dir
        from deltaserve.models.tokenizer import Tokenizer

        d = model_dir(model)
        net = LlamaModel.from_state_dict(load_config(d), load_state_dict(d), config.dtype, config.device)
        return cls(net, Tokenizer(d), config, **kw)

    # -------------------------------------------------------------- sessions
    def open_session(self, session_id: str, owner=None, ttl: float | None = None):
        if session_id in self.kv.sessions:
            raise EngineError(f"session {session_id!r} already exists")
        return self.kv.sessions.open(session_id, owner, ttl)

    def get_session(self, session_id: str):
        return self.kv.sessions.get(session_id)

    def close_session(self, session_id: str) -> None:
        if session_id not in self.kv.sessions:
            raise SessionNotFound(session_id)
        if session_id in self._busy_sessions:
            raise SessionBusy(f"session {session_id!r} has a turn in progress")
        self.kv.sessions.close(session_id)

    # -------------------------------------------------------------- requests
    def add_request(self, prompt: list[int], params: SamplingParams, session_id: str | None = None, owner=None) -> Sequence:
        params.validate()
        if not prompt:
            raise EngineError("prompt is empty")
        if any(not (0 <= t < self.cfg.vocab_size) for t in prompt):
            raise EngineError(f"prompt has token ids outside [0, {self.cfg.vocab_size})")
        if len(prompt) + 1 > self.max_context:
            raise PromptTooLong(len(prompt), self.max_context)
        if session_id is not None:
            if session_id not in self.kv.sessions:
                raise SessionNotFound(session_id)
            if session_id in self._busy_sessions:
                raise SessionBusy(f"session {session_id!r} already has a turn in progress")
            self._busy_sessions.add(session_id)
        p = params
        if len(prompt) + p.max_tokens > self.max_context:
            p = SamplingParams(**{**p.__dict__, "max_tokens": self.max_context - len(prompt)})
        seq = Sequence(prompt, p, session_id, owner)
        seq.generator = None if p.greedy else make_generator(p.seed)
        self.scheduler.add(seq)
        self.counters.requests += 1
        return seq

    def abort(self, seq: Sequence) -> None:
        """Cancel a request; its computed KV still enters the cache so the session stays consistent."""
        seq.cancelled = True
        if seq.status == SeqStatus.FINISHED:
            return
        if seq.status == SeqStatus.WAITING:
            self.scheduler.remove(seq)
            self._finish(seq, "abort", release=False)
        else:
            self.scheduler.remove(seq)
            self._finish(seq, "abort")

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def session_busy(self, session_id: str) -> bool:
        return session_id in self._busy_sessions

    def set_session_ttl(self, session_id: str, ttl: float) -> None:
        """Change a session's pin TTL; a pinned session's expiry restarts from now."""
        s = self.kv.sessions.get(session_id)
        if s is None:
            raise SessionNotFound(session_id)
        if ttl < 0:
            raise EngineError("ttl must be >= 0")
        s.ttl = ttl
        if s.pinned:  # a new TTL counts from now
            s.pin_expires_at = self.kv.sessions.clock() + ttl

    # ------------------------------------------------------------------ step
    @torch.inference_mode()
    def step(self) -> list[SeqOutput]:
        if self.counters.steps % 256 == 0:
            # Unpinned sessions idle this long are forgotten, so the registry stays bounded.
            self.kv.sessions.forget_idle(self.config.session_max_idle)
        c = self.counters
        t0 = time.perf_counter()
        self.kv.others_running = bool(self.scheduler.running)
        plan = self.scheduler.plan(self.kv.admit, self.kv.reserve)
        t1 = time.perf_counter()
        c.time_schedule += t1 - t0
        if not plan.items:
            return self._unblock()
        out = self.runner.run(plan)
        t2 = time.perf_counter()
        # a step carries prefill when some item feeds more than its last sampled token
        if any(i.num_tokens > 1 for i in plan.items):
            c.time_forward_prefill += t2 - t1
            c.prefill_steps += 1
        else:
            c.time_forward_decode += t2 - t1
        c.steps += 1
        if self._trace is not None:
            # one JSON line a step: per item (context before, tokens fed, draft length), forward seconds
            self._trace.write(json.dumps({"t": round(t1, 4), "fwd": round(t2 - t1, 5), "items": [
                [i.seq.num_computed, i.num_tokens, len(i.draft)] for i in plan.items]}) + "\n")
        outputs: list[SeqOutput] = []
        for item, (r0, nrows) in zip(plan.items, out.rows):
            seq = item.seq
            seq.num_computed += item.num_tokens
            if nrows == 0:
                continue  # prefill chunk that did not reach the end of the prompt
            if seq.num_output == 0:
                self.kv.share_prompt(seq)  # the prompt is computed: others with the same prefix may use it now
            logits = out.logits[r0 : r0 + nrows]
            if item.draft:
                new = self.speculator.verify(seq, item.draft, logits)
                # Accepted drafts already have K/V: they count as computed; rejected slots go back.
                seq.num_computed += len(new) - 1
                self.kv.rollback(seq, seq.num_computed)
            else:
                new = [self._sample(seq, logits[0])]
            outputs.append(self._append(seq, new))
        if self.config.check_integrity:
            self.kv.check_integrity(self.scheduler.running)
        c.time_sample += time.perf_counter() - t2
        return outputs

    def _sample(self, seq: Sequence, logits: torch.Tensor) -> int:
        if seq.grammar is not None:
            seq.grammar.apply_mask(logits)
        return sample(logits, seq.params, seq.generator)

    def _append(self, seq: Sequence, new: list[int]) -> SeqOutput:
        if seq.stats.first_token_time is None:
            seq.stats.first_token_time = time.perf_counter()
        p = seq.params
        emitted: list[int] = []
        reason = None
        for t in new:
            seq.tokens.append(t)
            emitted.append(t)
            if seq.grammar is not None:
                seq.grammar.accept(t)
            if not p.ignore_eos and (t in self.stop_ids or t in p.stop_token_ids):
                reason = "stop"
                break
            if seq.grammar is not None and seq.grammar.is_terminated():
                reason = "stop"
                break
            if seq.num_output >= p.max_tokens:
                reason = "length"
                break
        # Tokens past a stop were verified but are not part of the output: drop their KV.
        if len(seq.tokens) - 1 < seq.num_computed:
            seq.num_computed = len(seq.tokens) - 1
            self.kv.rollback(seq, seq.num_computed)
        self.counters.generated_tokens += len(emitted)
        if reason is None and seq.cancelled:
            reason = "abort"
        if reason is not None:
            self.scheduler.remove(seq)
            self._finish(seq, reason)
            return SeqOutput(seq, emitted, True)
        if self.speculator is not None:
            seq.draft = self.speculator.propose(seq)
        return SeqOutput(seq, emitted, False)

    def _finish(self, seq: Sequence, reason: str, release: bool = True) -> None:
        seq.finish_reason = reason
        seq.status = SeqStatus.FINISHED
        seq.stats.finish_time = time.perf_counter()
        if release:
            self.kv.release(seq)
        if self.speculator is not None:
            self.speculator.finish(seq)
        if seq.session_id is not None:
            self._busy_sessions.discard(seq.session_id)
        c = self.counters
        c.prompt_tokens += seq.stats.prompt_tokens
        c.cached_tokens += seq.stats.cached_tokens
        c.prefilled_tokens += seq.stats.prefilled_tokens
        c.drafted_tokens += seq.stats.drafted_tokens
        c.accepted_tokens += seq.stats.accepted_tokens

    def _unblock(self) -> list[SeqOutput]:
        """Nothing could be scheduled: preempt (recompute later) the newest running sequence."""
        running = self.scheduler.running
        if not running:
            return []
        if len(running) == 1:
            seq = running[0]
            self.scheduler.remove(seq)
            self._finish(seq, "length")  # the KV pool cannot hold even this one sequence
            return [SeqOutput(seq, [], True)]
        seq = running[-1]
        self.scheduler.remove(seq)
        self.kv.preempt(seq)
        seq.status = SeqStatus.WAITING
        seq.draft = []
        self.scheduler.waiting.appendleft(seq)
        self.counters.preemptions += 1
        return []

    # ------------------------------------------------------------ sync helpers
    def run_until_done(self, seqs: list[Sequence]) -> None:
        while any(s.status != SeqStatus.FINISHED for s in seqs):
            self.step()

    def generate(self, prompts: list[list[int]], params: SamplingParams, session_ids=None) -> list[list[int]]:
        seqs = [self.add_request(p, params, (session_ids or [None] * len(prompts))[i]) for i, p in enumerate(prompts)]
        self.run_until_done(seqs)
        return [s.output_ids for s in seqs]

    def stream(self, prompt: list[int], params: SamplingParams, session_id: str | None = None) -> Iterator[list[int]]:
        seq = self.add_request(prompt, params, session_id)
        while seq.status != SeqStatus.FINISHED:
            for o in self.step():
                if o.seq is seq and o.new_tokens:
                    yield o.new_tokens

    def stats(self) -> dict:
        c = self.counters
        alloc = self.pool.allocator
        return {
            "cache_mode": self.kv.mode.value,
            "requests": c.requests,
            "prompt_tokens": c.prompt_tokens,
            "cached_tokens": c.cached_tokens,
            "prefilled_tokens": c.prefilled_tokens,
            "hit_ratio": c.cached_tokens / c.prompt_tokens if c.prompt_tokens else 0.0,
            "generated_tokens": c.generated_tokens,
            "drafted_tokens": c.drafted_tokens,
            "accepted_tokens": c.accepted_tokens,
            "acceptance_rate": c.accepted_tokens / c.drafted_tokens if c.drafted_tokens else 0.0,
            "sessions": len(self.kv.sessions),
            "pinned_sessions": self.kv.sessions.num_pinned,
            "kv_slots_total": alloc.num_slots,
            "kv_slots_used": alloc.num_used,
            "kv_cached_tokens": self.kv.radix.total_size if self.kv.reuse else 0,
            "kv_bytes_per_token": self.pool.layout.bytes_per_token,
            "evicted_tokens": self.kv.evicted_tokens,
            "demoted_sessions": self.kv.demoted_sessions,
            "unpinned_over_budget": self.kv.unpinned_over_budget,
            "preemptions": c.preemptions,
            "steps": c.steps,
            "prefill_steps": c.prefill_steps,
            "time_schedule_s": c.time_schedule,
            "time_forward_prefill_s": c.time_forward_prefill,
            "time_forward_decode_s": c.time_forward_decode,
            "time_sample_s": c.time_sample,
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
        }
