"""Verification (greedy + lossless speculative sampling), stop truncation and
the adaptive draft-length controller that consumes verify outcomes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from deltaserve.spec.adaptive import DraftLengthController
from deltaserve.spec.verify import (
    VerifyResult,
    truncate_at_stop,
    verify_greedy,
    verify_sampling,
)

# --- greedy --------------------------------------------------------------


def test_greedy_all_accepted_appends_bonus():
    assert verify_greedy(torch.tensor([1, 2, 3, 4]), [1, 2, 3]) == VerifyResult([1, 2, 3, 4], 3, 3)


def test_greedy_reject_at_first_position():
    assert verify_greedy(torch.tensor([1, 2, 3, 4]), [9, 2, 3]) == VerifyResult([1], 0, 3)


def test_greedy_partial_and_empty():
    assert verify_greedy(torch.tensor([1, 2, 3, 4]), [1, 2, 9]) == VerifyResult([1, 2, 3], 2, 3)
    assert verify_greedy(torch.tensor([7]), []) == VerifyResult([7], 0, 0)
    with pytest.raises(ValueError):
        verify_greedy(torch.tensor([1, 2]), [1, 2])


# --- sampling: edge cases -------------------------------------------------


def test_sampling_shapes_and_degenerate_rows():
    g = torch.Generator().manual_seed(0)
    one_hot = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    # All mass on the draft: always accepted (the empty residual is never used).
    for _ in range(50):
        assert verify_sampling(one_hot, [1, 2], g) == VerifyResult([1, 2, 0], 2, 2)
    # No mass on the draft: always rejected, correction from the rest.
    assert verify_sampling(one_hot, [0, 2], g) == VerifyResult([1], 0, 2)
    assert verify_sampling(one_hot[:1], [], g) == VerifyResult([1], 0, 0)
    with pytest.raises(ValueError):
        verify_sampling(one_hot, [1], g)  # needs [k+1, V]
    with pytest.raises(ValueError):
        verify_sampling(torch.zeros(2, 3), [1], g)
    with pytest.raises(ValueError):
        verify_sampling(torch.full((2, 3), float("nan")), [1], g)


def test_sampling_is_reproducible_with_seeded_generator():
    probs = torch.softmax(torch.randn(4, 7, generator=torch.Generator().manual_seed(1)), -1)
    runs = []
    for _ in range(2):
        g = torch.Generator().manual_seed(123)
        runs.append([verify_sampling(probs, [1, 2, 3], g) for _ in range(30)])
    assert runs[0] == runs[1]


# --- sampling: the distribution is preserved -------------------------------

# Target distributions at three positions; positions are independent in this
# synthetic setting, so the first two emitted tokens must be ~ p0(a) * p1(b).
P = torch.tensor(
    [
        [0.40, 0.30, 0.20, 0.10, 0.00],  # token 4 impossible at position 0
        [0.10, 0.20, 0.30, 0.25, 0.15],
        [0.20, 0.20, 0.20, 0.20, 0.20],
    ],
    dtype=torch.float64,
)
V = P.shape[1]
N = 20_000
ALPHA = 1e-3


def first_two(verify, probs, draft, n, gen):
    """Emit >= 2 tokens per sample like the engine would; return [n, 2] tokens.

    After a step that emitted only one token, the next step verifies the rest
    of the (deterministic) draft against the following positions.
    """
    out = np.empty((n, 2), dtype=np.int64)
    for s in range(n):
        emitted, pos = [], 0
        while len(emitted) < 2:
            rest = draft[pos:]
            res = verify(probs[pos:pos + len(rest) + 1], rest, gen)
            emitted += res.tokens
            pos += len(res.tokens)
        out[s] = emitted[:2]
    return out


def chisq_pvalue(samples, expected_probs):
    """Goodness of fit of integer-coded `samples` [n] against `expected_probs` [m].

    Impossible outcomes must never be observed; they are then dropped (a
    zero expected count is undefined for chi-square).
    """
    expected_probs = np.asarray(expected_probs, dtype=np.float64).ravel()
    counts = np.bincount(samples, minlength=len(expected_probs))
    zero = expected_probs == 0
    assert counts[zero].sum() == 0, "an impossible token was emitted"
    probs = expected_probs[~zero] / expected_probs[~zero].sum()
    return chisquare(counts[~zero], probs * len(samples)).pvalue


def assert_preserves_target(verify, draft, seed):
    gen = torch.Generator().manual_seed(seed)
    toks = first_two(verify, P, draft, N, gen)
    p0, p1 = P[0].numpy(), P[1].numpy()
    assert chisq_pvalue(toks[:, 0], p0) > ALPHA, "first token"
    assert chisq_pvalue(toks[:, 0] * V + toks[:, 1], np.outer(p0, p1)) > ALPHA, "joint of first two"


@pytest.mark.parametrize(
    "draft",
    [
        [3],  # unlikely draft (p=0.1); the joint covers the bonus row
        [4, 1],  # impossible first draft (p=0), then a second draft
        [0, 2],  # two likely drafts: exercises accept-accept and reject-at-1
    ],
)
def test_speculative_sampling_preserves_distribution(draft):
    assert_preserves_target(verify_sampling, draft, seed=1000 + sum(draft) * 7 + len(draft))


def _naive_verify(probs, draft, gen):
    """BIASED: on rejection resamples from p itself instead of the residual."""
    k, n = len(draft), 0
    while n < k and torch.rand((), generator=gen) < probs[n, draft[n]]:
        n += 1
    return VerifyResult(list(draft[:n]) + [int(torch.multinomial(probs[n], 1, generator=gen))], n, k)


def _wrong_bonus_verify(probs, draft, gen):
    """BIASED: correct accept/residual, but the bonus comes from row k-1."""
    res = verify_sampling(probs, draft, gen)
    if res.num_accepted == len(draft) and draft:
        bonus = int(torch.multinomial(probs[len(draft) - 1], 1, generator=gen))
        return VerifyResult(res.tokens[:-1] + [bonus], res.num_accepted, res.num_drafted)
    return res


@pytest.mark.parametrize("biased", [_naive_verify, _wrong_bonus_verify])
def test_chi_square_machinery_rejects_biased_samplers(biased):
    # Same sample size and thresholds as the real test: it can fail.
    with pytest.raises(AssertionError):
        assert_preserves_target(biased, [0], seed=7)


# --- stop truncation -----------------------------------------------------


def test_truncate_at_stop():
    assert truncate_at_stop([5, 6, 2, 7], {2}, None) == ([5, 6, 2], True)
    assert truncate_at_stop([5, 6, 2, 7], {2}, 2) == ([5, 6], False)  # stop beyond budget
    assert truncate_at_stop([5, 6, 2, 7], {2}, 3) == ([5, 6, 2], True)
    assert truncate_at_stop([5, 6, 7], {2, 9}, 10) == ([5, 6, 7], False)
    assert truncate_at_stop([5, 6], {2}, 0) == ([], False)


# --- adaptive draft length -------------------------------------------------


def run_steps(ctl, accept, steps):
    """Feed `steps` verify outcomes; accept(k) -> num_accepted. Returns the ks."""
    ks = []
    for _ in range(steps):
        k = ctl.next_k()
        ks.append(k)
        if k:
            ctl.update(k, accept(k))
    return ks


def test_controller_switches_off_on_full_rejections():
    ctl = DraftLengthController(k_max=8, probe_interval=5)
    ks = run_steps(ctl, lambda k: 0, 40)
    first_off = ks.index(0)
    assert first_off <= 12
    assert not ctl.enabled
    # Once off it stays off; only periodic probes of probe_k are issued.
    tail = ks[first_off:]
    assert all(k in (0, ctl.probe_k) for k in tail)
    assert 0 < tail.count(ctl.probe_k) <= len(tail) // 5 + 1


def test_controller_recovers_after_successful_probe():
    ctl = DraftLengthController(k_max=8, probe_interval=4)
    run_steps(ctl, lambda k: 0, 60)  # off, with many failed probes
    assert not ctl.enabled
    ks = [ctl.next_k() for _ in range(4)]
    assert sorted(ks) == [0, 0, 0, ctl.probe_k]  # one probe per interval
    ctl.update(ctl.probe_k, ctl.probe_k)
    assert ctl.enabled and ctl.next_k() > 0


def test_controller_grows_to_k_max_on_full_acceptance_and_backs_off():
    ctl = DraftLengthController(k_min=1, k_max=8)
    ks = run_steps(ctl, lambda k: k, 15)
    assert ks == sorted(ks) and ks[-1] == 8
    # Half acceptance (one accepted, then a rejection): a mid-length draft.
    ks = run_steps(ctl, lambda k: 1, 30)
    assert 1 < ks[-1] < 8 and ks[-1] < ks[0]


def test_controller_cost_and_no_evidence_updates():
    # Verification too expensive for 50% acceptance: off from the start.
    assert DraftLengthController(verify_cost_per_token=1.0).next_k() == 0
    ctl = DraftLengthController()
    before = (ctl.next_k(), ctl.acceptance_rate)
    ctl.update(0, 0)  # no draft found this step: no evidence
    assert (ctl.next_k(), ctl.acceptance_rate) == before
    with pytest.raises(ValueError):
        ctl.update(2, 3)
