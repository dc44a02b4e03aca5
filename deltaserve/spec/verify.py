"""Lossless verification of a deterministic draft against the target model.

The engine runs the target once over `[last_token] + draft` (k draft tokens)
and gets k+1 next-token distributions: position i predicts the token after
`draft[:i]`. These functions decide how many draft tokens to keep and emit
exactly one more token from the target, so every verify step makes progress
(>= 1 token) and the emitted stream has exactly the distribution plain
decoding would have produced.

Greedy: accept while `draft[i] == argmax_i`, then emit `argmax_{num_accepted}`
(the correction, or the bonus token when everything was accepted).

Sampling (speculative sampling, Leviathan et al. / Chen et al. 2023) with a
deterministic draft, i.e. a one-hot proposal q_i = e_{draft[i]}:
accept draft[i] with probability min(1, p_i(d)/q_i(d)) = p_i(d); on the first
rejection emit a sample from the residual norm((p_i - q_i)+), which is p_i
with d removed and renormalised, and stop. Then
P(emit d) = p_i(d) and P(emit x != d) = (1 - p_i(d)) * p_i(x) / (1 - p_i(d))
= p_i(x): exactly p_i. If all k are accepted, the bonus comes from p_k.

Stop tokens are the engine's business; `truncate_at_stop` is the helper.
"""

from __future__ import annotations

from typing import Collection, NamedTuple, Sequence

import torch


class VerifyResult(NamedTuple):
    """Outcome of one verify step.

    tokens: `draft[:num_accepted]` followed by exactly one target token (the
        correction at the first rejection, or the bonus when all accepted);
        length `num_accepted + 1`.
    num_accepted: accepted draft tokens, 0..num_drafted.
    num_drafted: len(draft).
    """

    tokens: list[int]
    num_accepted: int
    num_drafted: int


class StopTruncation(NamedTuple):
    """tokens: the emitted tokens that survive; hit_stop: a stop token ended them."""

    tokens: list[int]
    hit_stop: bool


def verify_greedy(target_argmax: torch.Tensor | Sequence[int], draft: Sequence[int]) -> VerifyResult:
    """Greedy acceptance.

    target_argmax: [k+1] ints, the target's argmax at each verified position.
    draft: k token ids.
    """
    k = len(draft)
    # One host transfer; k is small so the prefix scan is cheaper in Python
    # than as tensor ops.
    target = target_argmax.tolist() if isinstance(target_argmax, torch.Tensor) else list(target_argmax)
    if len(target) != k + 1:
        raise ValueError(f"target_argmax must have k+1={k + 1} entries, got {len(target)}")
    n = 0
    while n < k and draft[n] == target[n]:
        n += 1
    return VerifyResult(list(draft[:n]) + [target[n]], n, k)


def verify_sampling(
    probs: torch.Tensor, draft: Sequence[int], generator: torch.Generator | None = None
) -> VerifyResult:
    """Speculative-sampling acceptance for a deterministic draft (lossless).

    probs: [k+1, vocab], the target's processed distribution (after
        temperature/top-k/top-p) at each verified position. Rows are treated
        as non-negative weights: they need not sum to exactly 1, but each
        must have positive mass (else ValueError; NaN rows included).
    draft: k token ids.
    generator: seeded generator on `probs.device` for reproducibility.

    Randomness: k uniforms for the accept tests, then an exponential race
    over all k+1 rows (candidate for every possible stopping row), so the
    whole step is a fixed sequence of tensor ops with a single host sync.
    Every row's candidate uses fresh independent noise, so picking the one at
    `num_accepted` afterwards does not bias it.
    """
    k = len(draft)
    if probs.dim() != 2 or probs.shape[0] != k + 1:
        raise ValueError(f"probs must be [k+1={k + 1}, vocab], got {tuple(probs.shape)}")
    device = probs.device
    # float32 copy: fp16/bf16 multinomial-style maths is too coarse, and the
    # residual is edited in place below.
    weights = probs.to(torch.float32, copy=True)
    total = weights.sum(-1)  # [k+1]
    valid = total > 0  # also False for NaN
    if k:
        d = torch.as_tensor(list(draft), dtype=torch.long, device=device).unsqueeze(1)  # [k, 1]
        p_draft = weights[:k].gather(1, d).squeeze(1)  # [k]
        u = torch.rand(k, generator=generator, device=device)
        # Accept w.p. p(d)/total; multiplying avoids a division, and when all
        # mass is on d (p(d) == total) u < 1 makes acceptance certain, so the
        # then-empty residual below is never used.
        accept = u * total[:k] < p_draft
        weights[:k].scatter_(1, d, 0.0)  # residual (p - q)+ for the rejection rows
    else:
        accept = torch.zeros(0, dtype=torch.bool, device=device)
    # Exponential race: argmax_j w_j / E_j with E_j ~ Exp(1) is distributed
    # proportionally to w_j (no normalisation, zero-weight tokens never win
    # while any weight is positive). The clamp keeps E > 0 so 0/0 = NaN
    # (which argmax would pick) cannot occur.
    race = torch.empty_like(weights).exponential_(generator=generator).clamp_min_(1e-30)
    candidates = (weights / race).argmax(-1)  # [k+1]
    host = torch.cat([accept.long(), candidates, valid.long()]).tolist()
    accepted, cand, ok = host[:k], host[k:2 * k + 1], host[2 * k + 1:]
    if not all(ok):
        raise ValueError("every probs row needs positive total mass (NaN rows are rejected)")
    n = 0
    while n < k and accepted[n]:
        n += 1
    return VerifyResult(list(draft[:n]) + [cand[n]], n, k)


def truncate_at_stop(
    tokens: Sequence[int], stop_token_ids: Collection[int], max_new: int | None = None
) -> StopTruncation:
    """Cut a verify step's emitted tokens at the first stop token or budget.

    tokens: the emitted tokens of one step (VerifyResult.tokens).
    stop_token_ids: ids that end generation (EOS, end-of-turn, ...).
    max_new: how many more tokens the request may emit (None = unlimited).

    The stop token itself is kept (the engine decides whether to render or
    cache it); everything after it is dropped because it was generated as
    if the sequence had not ended. `hit_stop` is True only if the stop token
    lies within the budget.
    """
    if max_new is not None and max_new < 0:
        raise ValueError(f"max_new must be >= 0, got {max_new}")
    limit = len(tokens) if max_new is None else min(len(tokens), max_new)
    for i in range(limit):
        if tokens[i] in stop_token_ids:
            return StopTruncation(list(tokens[:i + 1]), True)
    return StopTruncation(list(tokens[:limit]), False)
