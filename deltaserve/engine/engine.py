"""LLMEngine: requests in, tokens out; sessions that advance by their new tokens only.

Control lives here and in `scheduler`/`kv_manager`; compute lives in `models/` and `layers/`; `model_runner`
is the one bridge between them. A step is schedule -> forward -> postprocess (sample or verify, append, stop
checks, next drafts); its outputs are immutable `RequestOutput` snapshots (`engine/api.py`). The engine is not
thread-safe: `AsyncEngine` drives it from one thread.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from deltaserve import env
from deltaserve.config import ModelConfig
from deltaserve.engine.api import (Constraint, EngineError, EngineInfo, IntegrityReport, Overloaded, PromptTooLong,
                                   RequestOutput, RequestStats, SessionInfo)
from deltaserve.engine.kv_manager import ADMIT_HEADROOM, CacheMode, KVManager
from deltaserve.engine.model_runner import ModelRunner, StepLogits
from deltaserve.engine.persistence import Persistence
from deltaserve.engine.responses import ResponseStore
from deltaserve.engine.sampling import SamplingParams, make_generator, sample
from deltaserve.engine.scheduler import Scheduler, StepPlan
from deltaserve.engine.sequence import Sequence, SeqStatus
from deltaserve.engine.sessions import EngineSessions
from deltaserve.engine.stats import StepStats
from deltaserve.kv.pool import KVLayout, KVPool
from deltaserve.models.llama import LlamaModel
from deltaserve.store.disk import SessionStore
from deltaserve.store.format import Stamp, weights_sha256

log = logging.getLogger("deltaserve.engine")


@dataclass(frozen=True)
class EngineConfig:
    dtype: torch.dtype = torch.bfloat16
    device: str = "cpu"
    kv_cache_bytes: int = 2 << 30
    kv_cache_dtype: str = "auto"  # how the pool stores K/V (`kv/quant.py`: auto = the model dtype, int8, fp8, ...)
    # a token's bits independent of its batch (`LlamaModel.set_batch_invariant`): exact sessions with int8/fp8 KV
    batch_invariant: bool = False
    max_batch_tokens: int = 512
    max_prefill_with_decode: int | None = None  # prefill tokens a step that also decodes may carry (None: no cap)
    max_running: int = 64
    cache_mode: CacheMode = CacheMode.STATEFUL
    session_ttl: float = 300.0
    max_pinned_fraction: float = 0.7  # pinned session KV may hold this share of the pool (the rest: working space)
    max_context: int | None = None  # defaults to the model's
    speculation: bool = True
    num_speculative_tokens: int = 8  # the most draft tokens a verify step carries a sequence (the adaptive cap)
    session_max_idle: float = 3600.0  # forget unpinned sessions idle longer than this (seconds)
    max_responses: int = 1024  # finished turns kept for previous_response_id (LRU)
    max_responses_per_key: int | None = None  # of those, one owner's at most (its own LRU go first; None: no cap)
    check_integrity: bool = False  # after every step (tests)
    max_sessions_per_key: int | None = None  # open sessions per owner (None: no cap)
    max_waiting: int | None = None  # requests not yet admitted beyond this are refused with Overloaded (None: no cap)
    # a request still running this many seconds after it arrived ends with finish_reason "timeout" (None: never)
    request_timeout: float | None = None
    max_pinned_tokens_per_key: int | None = None  # tokens one owner's pinned sessions may hold (None: no cap)
    generation_config: bool = True  # from_model reads the model's generation_config.json sampling defaults
    kv_offload_bytes: int = 0  # host-memory tier for evicted KV (0: evicted KV is dropped)
    shared_prefix: str | None = None  # JSON file of prefixes every tenant may share (cache/shared_prefix.py)
    session_store: str | None = None  # directory sessions are saved to after each turn and restored from on start
    session_store_bytes: int | None = None  # bound on the store (None: unbounded)


class LLMEngine:
    def __init__(self, model: LlamaModel, tokenizer=None, config: EngineConfig = EngineConfig(),
                 clock: Callable[[], float] = time.monotonic, sampling_defaults: Any = None):
        self.model = model
        self.cfg: ModelConfig = model.cfg
        self.tokenizer = tokenizer
        self.config = config
        layout = KVLayout(self.cfg.num_layers, self.cfg.num_kv_heads, self.cfg.head_dim, model.dtype,
                          config.kv_cache_dtype)
        self.pool = KVPool.from_budget(layout, config.kv_cache_bytes, model.device)
        self.runner = ModelRunner(model, self.pool, config.batch_invariant)  # binds the model to the pool's format
        log.info("KV pool: %d token slots of %s KV (%d bytes a token), attention %s", self.pool.num_slots,
                 layout.fmt.name, layout.bytes_per_token, type(model.attn).__name__)
        self.kv = KVManager(self.pool, config.cache_mode, config.session_ttl, clock, config.max_pinned_fraction,
                            config.kv_offload_bytes)
        self.kv.max_pinned_tokens_per_owner = config.max_pinned_tokens_per_key
        if config.shared_prefix is not None:
            from deltaserve.cache.shared_prefix import load_shared_prefixes

            if tokenizer is None:
                raise ValueError("--shared-prefix needs the model's tokenizer")
            self.kv.shared_prefixes = load_shared_prefixes(config.shared_prefix, tokenizer)
        self.sessions = EngineSessions(self.kv.sessions, ResponseStore(config.max_responses,
                                                                       max_per_owner=config.max_responses_per_key))
        self.sessions.max_per_owner = config.max_sessions_per_key
        self.persistence = self._persistence(model, layout)
        self.sessions.persistence = self.persistence
        self.scheduler = Scheduler(config.max_batch_tokens, config.max_running, config.max_prefill_with_decode)
        self.max_context = min(config.max_context or self.cfg.max_position, self.cfg.max_position)
        self.stop_ids = frozenset(tokenizer.stop_token_ids) if tokenizer is not None else frozenset()
        self.step_stats = StepStats(env.step_trace())
        self.speculator = None
        if config.speculation:
            from deltaserve.engine.speculator import Speculator

            self.speculator = Speculator(k_max=config.num_speculative_tokens, tokenizer=tokenizer)
        self.info = EngineInfo(tokenizer, self.cfg.vocab_size, self.max_context, self.stop_ids, self.kv.mode.value,
                               sampling_defaults)

    def _persistence(self, model: LlamaModel, layout: KVLayout) -> Persistence:
        """The session store (when configured: opened, checked against this model, its sessions registered) and
        exports/imports, which need the model's stamp only when used."""
        def stamp() -> Stamp:
            dt = str(model.dtype).removeprefix("torch.")
            return Stamp(weights_sha256(model), dt, layout.fmt.name, layout.num_layers,
                         layout.num_kv_heads, layout.head_dim)

        c = self.config
        if c.session_store is None:
            return Persistence(None, stamp, self.pool, self.kv.radix, self.kv.sessions)
        if not self.kv.reuse:
            raise ValueError("a session store needs KV reuse: cache mode stateful or prefix, not stateless")
        st = stamp()
        p = Persistence(SessionStore(c.session_store, st, c.session_store_bytes), st, self.pool, self.kv.radix,
                        self.kv.sessions)
        self.kv.on_turn_end = p.after_turn
        self.kv.enable_staging()
        n = p.restore_sessions()
        for s in self.kv.sessions.list():  # their turns' response ids work again (previous_response_id, GET)
            for m in s.history:
                if m.record is not None:
                    self.sessions.responses.put(m.record)
        log.info("session store %s: %d sessions restored (%d bytes on disk)", c.session_store, n, p.store.nbytes)
        return p

    def close(self, timeout: float | None = 30.0) -> bool:
        """Flush the session store (shutdown); False if its writes did not finish within `timeout`."""
        return self.persistence.close(timeout)

    @classmethod
    def from_model(cls, model: str, config: EngineConfig = EngineConfig(), **kw) -> "LLMEngine":
        from deltaserve.models.generation_config import load_sampling_defaults
        from deltaserve.models.loader import load_config, load_state_dict, model_dir
        from deltaserve.models.tokenizer import Tokenizer

        d = model_dir(model)
        net = LlamaModel.from_state_dict(load_config(d), load_state_dict(d), config.dtype, config.device)
        if config.generation_config:
            kw.setdefault("sampling_defaults", load_sampling_defaults(d))
        return cls(net, Tokenizer(d), config, **kw)

    # -------------------------------------------------------------- sessions
    def open_session(self, session_id: str, owner: str | None = None, ttl: float | None = None) -> SessionInfo:
        return self.sessions.open(session_id, owner, ttl)

    def close_session(self, session_id: str, owner: str | None = None) -> None:
        self.sessions.close(session_id, owner)

    def get_session(self, session_id: str):
        """The cache's `Session` object (engine-internal: token state, pin), or None."""
        return self.kv.sessions.get(session_id)

    # -------------------------------------------------------------- requests
    def add_request(self, prompt: list[int], params: SamplingParams, session_id: str | None = None,
                    owner: str | None = None, *, constraint: Constraint | None = None, open_session: bool = False,
                    session_ttl: float | None = None, cache_namespace: str = "") -> Sequence:
        """Queue a request; input errors (EngineError, ValueError) raise here, before it exists.

        With `session_id` the request is a turn of that session (opened first if unknown and `open_session`).
        """
        params.validate()
        if not prompt:
            raise EngineError("prompt is empty")
        if any(not (0 <= t < self.cfg.vocab_size) for t in prompt):
            raise EngineError(f"prompt has token ids outside [0, {self.cfg.vocab_size})")
        if len(prompt) + 1 > self.max_context:
            raise PromptTooLong(len(prompt), self.max_context)
        if len(prompt) + ADMIT_HEADROOM > self.pool.num_slots:  # it could never be admitted: it would wait forever
            raise EngineError(f"prompt is {len(prompt)} tokens but the KV pool holds {self.pool.num_slots} token "
                              "slots; give the engine a larger KV cache (--kv-cache-gb)")
        limit = self.config.max_waiting
        if limit is not None and len(self.scheduler.waiting) >= limit:  # before begin_turn: a refusal changes nothing
            raise Overloaded(len(self.scheduler.waiting), limit)
        if session_id is not None:
            self.sessions.begin_turn(session_id, owner, open_session, session_ttl)
        pending = None
        if session_id is not None and self.kv.reuse:
            tier = self.kv.host_tier
            try:
                pending = self.persistence.begin_load(
                    self.kv.sessions.get(session_id), prompt, cache_namespace,
                    lambda ns, toks, at: tier is not None and tier.find(ns, toks, at) is not None)
            except Exception:  # the session is claimed for this turn: a store problem must not strand it
                log.exception("session store: cannot start reading session %r; its turn recomputes", session_id)
        p = params
        if len(prompt) + p.max_tokens > self.max_context:
            p = SamplingParams(**{**p.__dict__, "max_tokens": self.max_context - len(prompt)})
        seq = Sequence(prompt, p, session_id, owner)
        seq.constraint = constraint
        seq.pending_load = pending
        seq.cache_namespace = cache_namespace  # radix matches/inserts stay inside it
        seq.generator = None if p.greedy else make_generator(p.seed)
        self.scheduler.add(seq)
        self.step_stats.counters.requests += 1
        return seq

    def abort(self, seq: Sequence) -> RequestOutput | None:
        """Cancel a request; its computed KV still enters the cache so the session stays consistent.

        Returns its final output, or None if it had already finished."""
        seq.cancelled = True
        if seq.status == SeqStatus.FINISHED:
            return None
        return self._end_early(seq, "abort")

    def _end_early(self, seq: Sequence, reason: str) -> RequestOutput:
        """Finish a queued or running request between steps (abort, timeout): the KV it computed enters the
        cache, so its session stays consistent. Its final output."""
        release = seq.status != SeqStatus.WAITING  # a waiting request holds no KV yet
        self.scheduler.remove(seq)
        self._finish(seq, reason, release=release)
        return _output(seq, [], True)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ------------------------------------------------------------------ step
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """One forward pass over everything the scheduler fits; the outputs of the requests it advanced."""
        self._housekeeping()
        expired = self._expire_deadlines()
        st = self.step_stats
        st.begin()
        plan = self.scheduler.plan(self.kv)
        st.scheduled()
        if not plan.items:
            return expired + self._unblock()
        logits = self.runner.run(plan)
        st.forwarded(plan)
        outputs = expired + self._postprocess(plan, logits)
        st.done()
        if self.config.check_integrity:
            self.kv.check_integrity(self.scheduler.running)
        return outputs

    def check_integrity(self) -> IntegrityReport:
        """Check the KV bookkeeping's invariants now (engine thread; mutates nothing); a violation is reported,
        not raised, so an admin probe cannot stop the engine."""
        try:
            self.kv.check_integrity(self.scheduler.running)
            error = None
        except AssertionError as e:  # the checks are asserts that name the broken invariant
            error = str(e) or "integrity check failed"
        return IntegrityReport(error is None, error, len(self.scheduler.running), len(self.scheduler.waiting),
                               self.pool.allocator.num_used,
                               self.kv.radix.total_size if self.kv.reuse else 0)

    def _housekeeping(self) -> None:
        if self.step_stats.counters.steps % 256 == 0:
            # Unpinned sessions idle this long are forgotten, so the registry stays bounded.
            self.sessions.forget_idle(self.config.session_max_idle)

    def _expire_deadlines(self) -> list[RequestOutput]:
        """End requests older than `request_timeout` (finish_reason "timeout"), before this step plans.

        They end as an abort does: the KV computed so far stays in the cache and the session is released, so its
        next turn is consistent (and reuses that KV)."""
        timeout = self.config.request_timeout
        if timeout is None or not self.scheduler.has_work():
            return []
        cutoff = time.perf_counter() - timeout
        late = [s for s in (*self.scheduler.running, *self.scheduler.waiting) if s.stats.arrival < cutoff]
        return [self._end_early(seq, "timeout") for seq in late]

    def _postprocess(self, plan: StepPlan, out: StepLogits) -> list[RequestOutput]:
        """Advance each item by what the step computed; sample (or verify drafts) where logits came back."""
        outputs: list[RequestOutput] = []
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
        return outputs

    def _sample(self, seq: Sequence, logits: torch.Tensor) -> int:
        if seq.constraint is not None:
            seq.constraint.apply_mask(logits)
        return sample(logits, seq.params, seq.generator)

    def _append(self, seq: Sequence, new: list[int]) -> RequestOutput:
        if seq.stats.first_token_time is None:
            seq.stats.first_token_time = time.perf_counter()
        p = seq.params
        emitted: list[int] = []
        reason = None
        for t in new:
            seq.tokens.append(t)
            emitted.append(t)
            if seq.constraint is not None:
                seq.constraint.accept(t)
            if not p.ignore_eos and (t in self.stop_ids or t in p.stop_token_ids):
                reason = "stop"
                break
            if seq.constraint is not None and seq.constraint.is_terminated():
                reason = "stop"
                break
            if seq.num_output >= p.max_tokens:
                reason = "length"
                break
        # Tokens past a stop were verified but are not part of the output: drop their KV.
        if len(seq.tokens) - 1 < seq.num_computed:
            seq.num_computed = len(seq.tokens) - 1
            self.kv.rollback(seq, seq.num_computed)
        self.step_stats.counters.generated_tokens += len(emitted)
        if reason is None and seq.cancelled:
            reason = "abort"
        if reason is not None:
            self.scheduler.remove(seq)
            self._finish(seq, reason)
            return _output(seq, emitted, True)
        if self.speculator is not None:
            seq.draft = self.speculator.propose(seq)
        return _output(seq, emitted, False)

    def _finish(self, seq: Sequence, reason: str, release: bool = True) -> None:
        seq.finish_reason = reason
        seq.status = SeqStatus.FINISHED
        seq.stats.finish_time = time.perf_counter()
        if release:
            self.kv.release(seq)
        if self.speculator is not None:
            self.speculator.finish(seq)
        if seq.session_id is not None:
            self.sessions.end_turn(seq.session_id)
        self.step_stats.finished(seq)

    def _unblock(self) -> list[RequestOutput]:
        """Nothing could be scheduled: preempt (recompute later) the newest running sequence."""
        running = self.scheduler.running
        if not running:
            return []
        if len(running) == 1:
            seq = running[0]
            self.scheduler.remove(seq)
            self._finish(seq, "length")  # the KV pool cannot hold even this one sequence
            return [_output(seq, [], True)]
        seq = running[-1]
        self.kv.preempt(seq)
        self.scheduler.preempt(seq)
        self.step_stats.counters.preemptions += 1
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
        """New token ids step by step; closing the iterator early aborts the request."""
        seq = self.add_request(prompt, params, session_id)
        try:
            while seq.status != SeqStatus.FINISHED:
                for o in self.step():
                    if o.request_id == seq.seq_id and o.new_token_ids:
                        yield list(o.new_token_ids)
        finally:
            if seq.status != SeqStatus.FINISHED:
                self.abort(seq)

    def stats(self) -> dict:
        # Pins whose TTL passed are released at the next admission; an idle engine has none, so the gauges below
        # would show them pinned forever. Apply the TTLs now (idempotent: the same expiry a step would do).
        self.kv.sessions.expire()
        c = self.step_stats.counters
        alloc = self.pool.allocator
        runs = self.kv.slot_runs()
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
            "kv_slot_run_fraction": runs.runs / runs.windows if runs.windows else 1.0,
            "evicted_tokens": self.kv.evicted_tokens,
            "demoted_sessions": self.kv.demoted_sessions,
            "grafted_tokens": self.kv.grafted_tokens,
            **self._tier_stats(),
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


    def _tier_stats(self) -> dict:
        t, store = self.kv.host_tier, self.persistence.store
        out = {} if store is None else {"store_bytes": store.nbytes, "store_write_errors": store.write_errors,
                                        "store_restored_sessions": self.persistence.restored_sessions}
        if t is None:
            return out
        return {**out,"tier_bytes": t.nbytes, "tier_budget_bytes": t.budget_bytes, "tier_staged_bytes": t.staged_bytes,
                "offloaded_tokens": t.offloaded_tokens, "restored_tokens": t.restored_tokens,
                "tier_dropped_tokens": t.dropped_tokens}


def _output(seq: Sequence, new: list[int], finished: bool) -> RequestOutput:
    """The immutable snapshot of `seq` after a step that appended `new`."""
    st = seq.stats
    stats = RequestStats(seq.prompt_len, seq.num_output, st.cached_tokens, st.prefilled_tokens, st.drafted_tokens,
                         st.accepted_tokens, seq.explanation,
                         None if st.scheduled_time is None else st.scheduled_time - st.arrival)
    return RequestOutput(seq.seq_id, tuple(new), finished, seq.finish_reason, stats)
