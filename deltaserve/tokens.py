"""Token-sequence helpers shared by the cache, the engine and the speculator."""

from __future__ import annotations

from typing import Sequence


def common_prefix_len(a: Sequence[int], b: Sequence[int], limit: int | None = None) -> int:
    """Length of the longest common prefix of `a` and `b` (looking at most `limit` tokens deep).

    Slice comparisons run in C: the usual case (one sequence extends the other) costs one comparison, a
    difference is found by binary search over slices (log2(n) comparisons), never a Python loop per token.
    `a` and `b` must be the same kind of container (a list never equals a tuple: the answer would be 0).
    """
    if type(a) is not type(b):
        raise TypeError(f"common_prefix_len: {type(a).__name__} vs {type(b).__name__}")
    n = min(len(a), len(b))
    if limit is not None:
        n = min(n, limit)
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # invariant: a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo
