"""deltaserve/tokens.py: the one longest-common-prefix helper, against a plain loop."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deltaserve.tokens import common_prefix_len


def _naive(a, b, limit=None):
    n = min(len(a), len(b), limit if limit is not None else len(a))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@given(st.lists(st.integers(0, 3), max_size=60), st.lists(st.integers(0, 3), max_size=60),
       st.one_of(st.none(), st.integers(0, 70)))
def test_matches_a_plain_loop(a, b, limit):
    assert common_prefix_len(a, b, limit) == _naive(a, b, limit)
    assert common_prefix_len(tuple(a), tuple(b), limit) == _naive(a, b, limit)


def test_mixed_containers_are_refused():
    with pytest.raises(TypeError, match="list vs tuple"):
        common_prefix_len([1, 2], (1, 2))
