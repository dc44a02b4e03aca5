"""Prompt-lookup drafting: LookupIndex vs a brute-force reference."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deltaserve.spec.lookup import Draft, LookupIndex, PromptLookupDrafter


def reference(history, corpus, k, min_n, max_n, max_draft):
    """The matching rule of deltaserve.spec.lookup, written as plainly as possible."""
    history = list(history)
    k = min(k, max_draft)
    if k <= 0:
        return Draft([], 0, 0, None)
    L = len(history)
    for n in range(max_n, min_n - 1, -1):
        if L < n:
            continue
        key = history[L - n:]
        for p in range(L - n - 1, -1, -1):  # strictly before the trailing key
            if history[p:p + n] == key:
                seq, out = list(history), []
                for i in range(k):
                    out.append(seq[p + n + i])
                    seq.append(out[-1])
                return Draft(out, n, p + n, None)
        for cid in range(len(corpus) - 1, -1, -1):
            seq = list(corpus[cid])
            for p in range(len(seq) - n - 1, -1, -1):
                if seq[p:p + n] == key:
                    return Draft(seq[p + n:p + n + k], n, p + n, cid)
    return Draft([], 0, 0, None)


# --- examples ------------------------------------------------------------

A, B = 100, 200
# Trailing (1, 2, 3) occurs at p=1 (followed by A); the shorter (2, 3) occurs
# more recently at p=6 (followed by B).
HIST = [5, 1, 2, 3, A, 6, 2, 3, B, 0, 1, 2, 3]


def test_prefers_longest_ngram():
    d = LookupIndex(1, 4, 8, HIST).propose(3)
    assert d == Draft([A, 6, 2], 3, 4, None)


def test_prefers_most_recent_match_for_same_n():
    d = LookupIndex(1, 2, 8, HIST).propose(2)
    assert d == Draft([B, 0], 2, 8, None)
    hist = [7, 9, 1, 7, 9, 2, 7, 9, 3, 4, 7, 9]
    assert LookupIndex(1, 4, 8, hist).propose(1) == Draft([3], 2, 8, None)


def test_no_self_match_of_trailing_ngram():
    assert LookupIndex(1, 4, 8, [1, 2, 3]).propose(4).tokens == []
    assert LookupIndex(1, 4, 8, []).propose(4).tokens == []
    assert LookupIndex(1, 4, 8, [9]).propose(4).tokens == []
    # Overlapping earlier occurrences are fine; the copy runs periodically.
    assert LookupIndex(1, 4, 8, [7, 7]).propose(3) == Draft([7, 7, 7], 1, 1, None)
    assert LookupIndex(1, 4, 8, [1, 2, 3, 1, 2]).propose(5) == Draft([3, 1, 2, 3, 1], 2, 2, None)


def test_k_capped_by_max_draft_and_zero():
    idx = LookupIndex(1, 4, 2, HIST)
    assert idx.propose(8).tokens == [A, 6]
    assert idx.propose(0).tokens == []


def test_truncate_and_sync():
    idx = LookupIndex(1, 4, 8, HIST)
    idx.truncate(9)  # [5, 1, 2, 3, A, 6, 2, 3, B]: no earlier B
    assert idx.tokens == tuple(HIST[:9]) and idx.propose(4).tokens == []
    idx.extend([1, 2, 3])
    assert idx.propose(3) == Draft([A, 6, 2], 3, 4, None)
    with pytest.raises(ValueError):
        idx.truncate(100)
    # sync: diverge at position 4, then re-grow.
    new = HIST[:4] + [8, 8, 1, 2]
    assert idx.sync(new) == 4
    assert idx.tokens == tuple(new)
    assert idx.propose(2) == reference(new, [], 2, 1, 4, 8)
    assert idx.sync(new + [3]) == len(new)
    assert idx.propose(2) == Draft([8, 8], 3, 4, None)


def test_corpus_searched_after_history():
    schema = [50, 51, 52, 53, 54]
    idx = LookupIndex(1, 4, 8, [9, 50, 51])
    assert idx.propose(3).tokens == []
    cid = idx.add_corpus(schema)
    assert idx.propose(3) == Draft([52, 53, 54], 2, 2, cid)
    # Latest corpus sequence wins at equal n.
    cid2 = idx.add_corpus([50, 51, 60])
    assert idx.propose(3) == Draft([60], 2, 2, cid2)
    # History wins over corpus at equal n; longer n wins over the source.
    idx.extend([51, 77, 50, 51])  # history now has (50, 51) followed by 51
    assert idx.propose(2) == Draft([51, 77], 2, 3, None)
    hist = [51, 52, 0, 7, 50, 51, 52]  # history match for (51, 52) only
    idx2 = LookupIndex(1, 4, 8, hist)
    idx2.add_corpus([50, 51, 52, 99])
    assert idx2.propose(2) == Draft([99], 3, 3, 0)
    idx2.clear_corpus()
    assert idx2.propose(2) == Draft([0, 7], 2, 2, None)


def test_drafter_factory_and_stateless():
    drafter = PromptLookupDrafter(min_ngram=2, max_ngram=3, max_draft=4)
    assert drafter.propose(HIST, 8) == reference(HIST, [], 8, 2, 3, 4)
    idx = drafter.index(HIST[:5], corpus=[[0, 1, 2, 3, 42]])
    idx.extend(HIST[5:])
    assert idx.propose(8) == drafter.propose(HIST, 8, corpus=[[0, 1, 2, 3, 42]])
    with pytest.raises(ValueError):
        PromptLookupDrafter(min_ngram=0)
    with pytest.raises(ValueError):
        PromptLookupDrafter(min_ngram=3, max_ngram=2)


# --- property tests ------------------------------------------------------

tokens_st = st.lists(st.integers(0, 3), max_size=40)
params_st = st.tuples(st.integers(1, 3), st.integers(0, 2), st.integers(0, 6), st.integers(0, 9)).map(
    lambda t: (t[0], t[0] + t[1], t[2], t[3])  # min_n, max_n, max_draft, k
)


@settings(max_examples=150, deadline=None)
@given(hist=tokens_st, corpus=st.lists(st.lists(st.integers(0, 3), max_size=12), max_size=3), params=params_st)
def test_index_and_stateless_match_reference(hist, corpus, params):
    min_n, max_n, max_draft, k = params
    expected = reference(hist, corpus, k, min_n, max_n, max_draft)
    idx = LookupIndex(min_n, max_n, max_draft)
    for seq in corpus:
        idx.add_corpus(seq)
    idx.extend(hist)
    assert idx.propose(k) == expected
    drafter = PromptLookupDrafter(min_n, max_n, max_draft)
    assert drafter.propose(hist, k, corpus=corpus) == expected


# An op is ("extend", tokens) or ("truncate", fraction of the current length).
ops_st = st.lists(
    st.one_of(
        st.tuples(st.just("extend"), st.lists(st.integers(0, 3), max_size=8)),
        st.tuples(st.just("truncate"), st.floats(0, 1)),
    ),
    max_size=12,
)


@settings(max_examples=150, deadline=None)
@given(ops=ops_st, params=params_st)
def test_incremental_updates_match_fresh_index(ops, params):
    """Every extend/truncate sequence leaves the index equal to a fresh build."""
    min_n, max_n, max_draft, k = params
    idx = LookupIndex(min_n, max_n, max_draft)
    hist: list[int] = []
    for op, arg in ops:
        if op == "extend":
            idx.extend(arg)
            hist.extend(arg)
        else:
            n = int(arg * len(hist))
            idx.truncate(n)
            del hist[n:]
        assert idx.tokens == tuple(hist)
        assert idx.propose(k) == reference(hist, [], k, min_n, max_n, max_draft)
    fresh = LookupIndex(min_n, max_n, max_draft, hist)
    assert idx._last == fresh._last and idx._prev == fresh._prev
