"""One request's state inside the engine."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

import torch

from deltaserve.engine.sampling import SamplingParams

if TYPE_CHECKING:
    from deltaserve.engine.api import Constraint

_ids = itertools.count()


class SeqStatus(str, Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class SeqStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from the cache
    prefilled_tokens: int = 0  # prompt tokens computed by this request
    restored_tokens: int = 0  # of the cached ones, copied back from the host tier or the session store
    restored_from_store: int = 0  # of those, read from the session store on disk
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    verify_steps: int = 0
    arrival: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    scheduled_time: float | None = None  # first admission to the running set (a preempted re-admission keeps it)
    finish_time: float | None = None


class Sequence:
    """Token state and KV ownership of one request.

    `tokens` = prompt + generated. The first `num_computed` tokens have K/V in
    the pool at `slots[:num_computed]`; of those, `slots[:num_shared]` belong to
    the radix tree (locked through `locked_node`) and the rest are private to
    this sequence until it finishes and inserts them.
    """

    def __init__(self, prompt: list[int], params: SamplingParams, session_id: str | None = None, owner: Any = None):
        self.seq_id = next(_ids)
        self.prompt_len = len(prompt)
        self.tokens: list[int] = list(prompt)
        self.params = params
        self.session_id = session_id
        self.owner = owner
        self.cache_namespace = ""  # radix namespace: KV is shared only with equal namespaces
        self.status = SeqStatus.WAITING
        self.slots = torch.empty(0, dtype=torch.int64)
        self.num_computed = 0
        self.num_shared = 0
        self.locked_node: Any = None
        self.stats = SeqStats(prompt_tokens=len(prompt))
        self.finish_reason: str | None = None
        self.explanation: Any = None  # MatchExplanation, set at admission
        self.generator: torch.Generator | None = None
        self.draft: list[int] = []  # tokens proposed for the next verify step
        self.spec_state: Any = None  # drafter index + length controller, owned by the speculator
        self.cancelled = False
        self.constraint: Constraint | None = None  # constrained decoding state (a grammar), if any
        self.pending_load: Any = None  # persistence.PendingLoad: saved KV being read for this turn

    @property
    def num_output(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[self.prompt_len :]

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < len(self.tokens) - 1 or self.num_output == 0

    @property
    def private_slots(self) -> torch.Tensor:
        return self.slots[self.num_shared : self.num_computed]

    def __repr__(self) -> str:
        return f"Sequence({self.seq_id}, {self.status.value}, tokens={len(self.tokens)}, computed={self.num_computed})"
