"""Sampling parameters and the logits -> token step (greedy, temperature, top-k, top-p, seed)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from deltaserve.spec.schema_drafts import ToolDrafts


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings (not included in the output text)
    stop_token_ids: list[int] = field(default_factory=list)  # extra stop tokens besides the model's own
    ignore_eos: bool = False  # keep generating through the model's stop tokens (benchmarks)
    # the request's tools, for speculative drafts of its tool calls (None: history drafts only); never
    # changes what is generated, only how fast
    tool_drafts: ToolDrafts | None = None

    def validate(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
    return g


def processed_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """logits [n, vocab] fp32 -> probabilities [n, vocab] after temperature, top-k and top-p.

    This is the target distribution both plain sampling and speculative
    verification draw from, so the two stay identical in law.
    """
    x = logits / max(p.temperature, 1e-5)
    if p.top_k and p.top_k < x.shape[-1]:
        kth = torch.topk(x, p.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if p.top_p < 1.0:
        sp, si = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = sp.cumsum(-1) - sp > p.top_p
        sp = sp.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, si, sp)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> int:
    """logits [vocab] -> one token id."""
    if p.greedy:
        return int(torch.argmax(logits))
    probs = processed_probs(logits[None], p)[0]
    return int(torch.multinomial(probs, 1, generator=generator))
