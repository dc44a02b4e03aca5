"""Prompt-lookup drafting: propose draft tokens by copying from earlier context.

Agentic and tool-calling traffic repeats itself: arguments quote the prompt,
JSON keys repeat the schema, a new call copies the previous one. So the
cheapest useful draft model is no model at all: find the last `n` tokens of
the sequence somewhere earlier and propose whatever followed them there.

Matching rule (shared by `LookupIndex.propose`, `PromptLookupDrafter.propose`
and the brute-force reference in the tests):

1. Key: the last `n` tokens of the history, for `n` from `max_ngram` down to
   `min_ngram`; the first `n` that has any match wins (longer keys predict
   better).
2. For one `n`, search the history first: the most recent occurrence that
   starts strictly before the trailing key itself (`p < len - n`; the key
   trivially "matches" itself at the end and would have no continuation).
   Most recent because tool-call JSON tends to copy the latest call.
3. Then the corpus (extra sequences such as tokenized tool schemas), latest
   added sequence first, latest position within it first, and only
   occurrences followed by at least one token.
4. Continuation: up to `k` (capped at `max_draft`) tokens following the match.
   A history match whose continuation runs into the end of the history keeps
   copying from the draft itself, i.e. `draft[i] = (history + draft)[c + i]`
   with `c` the continuation start. This extends repetitive runs periodically
   (`a b a b` -> `a b a b ...`), the one case where copying "what followed"
   would otherwise yield a uselessly short draft. Corpus continuations stop at
   the end of their sequence.

Empty `Draft.tokens` means "no draft"; the other fields are then 0/None.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from deltaserve.tokens import common_prefix_len


class Draft(NamedTuple):
    """A proposed continuation.

    tokens: the drafted token ids (may be shorter than asked; empty = no draft).
    ngram: length of the matched key (0 when there is no draft).
    source_pos: where the copy starts, i.e. `tokens[i]` was copied from
        `source[source_pos + i]` with `source` the history (extended by the
        draft itself, see module docstring) or corpus sequence `corpus_id`.
    corpus_id: None for a history match, else the index (in `add_corpus`
        order) of the corpus sequence that matched.
    """

    tokens: list[int]
    ngram: int
    source_pos: int
    corpus_id: int | None = None


NO_DRAFT = Draft([], 0, 0, None)


def _check_params(min_ngram: int, max_ngram: int, max_draft: int) -> None:
    if not 1 <= min_ngram <= max_ngram:
        raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
    if max_draft < 0:
        raise ValueError(f"max_draft must be >= 0, got {max_draft}")


def _periodic_copy(history: Sequence[int], start: int, k: int) -> list[int]:
    """`out[i] = (history + out)[start + i]` for i < k, with start < len(history)."""
    avail = list(history[start:start + k])
    if len(avail) == k:
        return avail
    # Ran into the end: the continuation is `history[start:]` repeated, since
    # each missing token copies the one `len(history) - start` drafts back.
    reps = -(-k // len(avail))
    return (avail * reps)[:k]


class LookupIndex:
    """Incremental n-gram index over one session's token history (+ corpus).

    Per key length `n` it keeps `last[n]: dict[tuple, int]` (n-gram -> start
    of its latest occurrence) and `prev[n]: list[int]` (start -> start of the
    previous occurrence of the same n-gram, -1 if none), i.e. a linked list of
    occurrences threaded through a flat array. That makes every operation
    independent of the history length:

    - `extend(tokens)`: O(len(tokens) * num_ngram_sizes).
    - `truncate(n)`: O(removed * num_ngram_sizes), by unlinking in reverse.
    - `propose(k)`: O(num_ngram_sizes + k); the trailing n-gram was indexed
      last, so its previous occurrence is one `prev` lookup away.

    Memory is one tuple + dict entry + int per (position, n): a few MB for a
    10k-token session, negligible next to its KV cache.
    """

    def __init__(
        self,
        min_ngram: int = 1,
        max_ngram: int = 4,
        max_draft: int = 8,
        tokens: Sequence[int] = (),
    ):
        _check_params(min_ngram, max_ngram, max_draft)
        self.min_ngram = min_ngram
        self.max_ngram = max_ngram
        self.max_draft = max_draft
        self._tokens: list[int] = []
        sizes = range(min_ngram, max_ngram + 1)
        self._last: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in sizes}
        # -1 is private to this linked list; it never escapes the class.
        self._prev: dict[int, list[int]] = {n: [] for n in sizes}
        self._corpus: list[list[int]] = []
        # n -> key -> (corpus_id, continuation start) of the latest usable match.
        self._corpus_last: dict[int, dict[tuple[int, ...], tuple[int, int]]] = {
            n: {} for n in sizes
        }
        self.extend(tokens)

    # ---- history -------------------------------------------------------

    def __len__(self) -> int:
        return len(self._tokens)

    @property
    def tokens(self) -> tuple[int, ...]:
        """The indexed history (a copy; mutate through extend/truncate/sync)."""
        return tuple(self._tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        """Append tokens to the history and index every n-gram they complete."""
        hist = self._tokens
        for tok in tokens:
            hist.append(tok)
            end = len(hist)
            for n, last in self._last.items():
                start = end - n
                if start < 0:
                    break  # sizes ascend, so larger n cannot fit either
                key = tuple(hist[start:end])
                prev = self._prev[n]
                # prev[n] is indexed by start; starts are appended in order.
                prev.append(last.get(key, -1))
                last[key] = start

    def truncate(self, n: int) -> None:
        """Keep only the first `n` tokens (rollback after a divergence)."""
        hist = self._tokens
        if not 0 <= n <= len(hist):
            raise ValueError(f"cannot truncate a {len(hist)}-token history to {n}")
        # Unlink in reverse order of insertion so each removed start is the
        # head of its key's list and the previous head is restored exactly.
        for end in range(len(hist), n, -1):
            for size, last in self._last.items():
                start = end - size
                if start < 0:
                    break
                key = tuple(hist[start:end])
                before = self._prev[size].pop()
                if before < 0:
                    del last[key]
                else:
                    last[key] = before
        del hist[n:]

    def sync(self, history: Sequence[int]) -> int:
        """Make the index equal `history` with minimal work; return kept length.

        Keeps the longest common prefix, truncates the rest and extends with
        the new suffix. The common case (history = index + appended tokens)
        costs one C-level list comparison.
        """
        hist = self._tokens
        m = len(hist)
        keep = common_prefix_len(hist, list(history[:m]))
        if keep < m:
            self.truncate(keep)
        self.extend(history[keep:])
        return keep

    # ---- corpus --------------------------------------------------------

    def add_corpus(self, tokens: Sequence[int]) -> int:
        """Add a read-only sequence searched after the history; returns its id.

        Later-added sequences take precedence over earlier ones (and later
        positions over earlier ones within a sequence).
        """
        seq = list(tokens)
        cid = len(self._corpus)
        self._corpus.append(seq)
        for n, last in self._corpus_last.items():
            # Only starts with at least one following token are useful.
            for start in range(len(seq) - n):
                last[tuple(seq[start:start + n])] = (cid, start + n)
        return cid

    def clear_corpus(self) -> None:
        self._corpus.clear()
        for last in self._corpus_last.values():
            last.clear()

    # ---- drafting ------------------------------------------------------

    def propose(self, k: int) -> Draft:
        """Draft up to `min(k, max_draft)` tokens continuing the history."""
        k = min(k, self.max_draft)
        hist = self._tokens
        length = len(hist)
        if k <= 0:
            return NO_DRAFT
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if length < n:
                continue
            key = tuple(hist[length - n:])
            # The trailing n-gram is the head of its list (indexed last), so
            # its predecessor is the most recent earlier occurrence.
            if length > n:
                before = self._prev[n][length - n]
                if before >= 0:
                    return Draft(_periodic_copy(hist, before + n, k), n, before + n, None)
            hit = self._corpus_last[n].get(key)
            if hit is not None:
                cid, cont = hit
                return Draft(self._corpus[cid][cont:cont + k], n, cont, cid)
        return NO_DRAFT


class PromptLookupDrafter:
    """Configuration + factory for prompt-lookup drafting.

    Hot path: one `LookupIndex` per session (`drafter.index(prompt)`), kept in
    step with `extend`/`truncate`/`sync`. `propose(history, k)` is the
    stateless convenience for one-off calls: it scans with numpy
    (O(len(history) * max_ngram) per call) instead of building an index.
    """

    def __init__(self, min_ngram: int = 1, max_ngram: int = 4, max_draft: int = 8):
        _check_params(min_ngram, max_ngram, max_draft)
        self.min_ngram = min_ngram
        self.max_ngram = max_ngram
        self.max_draft = max_draft

    def index(
        self, tokens: Sequence[int] = (), corpus: Sequence[Sequence[int]] = ()
    ) -> LookupIndex:
        idx = LookupIndex(self.min_ngram, self.max_ngram, self.max_draft, tokens)
        for seq in corpus:
            idx.add_corpus(seq)
        return idx

    def propose(
        self, history: Sequence[int], k: int, corpus: Sequence[Sequence[int]] = ()
    ) -> Draft:
        """Same result as `self.index(history, corpus).propose(k)`, no index kept."""
        k = min(k, self.max_draft)
        length = len(history)
        if k <= 0 or length == 0:
            return NO_DRAFT
        arr = np.asarray(history, dtype=np.int64)
        corpus_arrs = [np.asarray(seq, dtype=np.int64) for seq in corpus]
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if length < n:
                continue
            key = arr[length - n:]
            # Candidate starts p <= length - n - 1: windows over arr[:-1].
            start = _last_match(arr[:-1], key)
            if start is not None:
                return Draft(_periodic_copy(history, start + n, k), n, start + n, None)
            for cid in range(len(corpus_arrs) - 1, -1, -1):
                seq = corpus_arrs[cid]
                start = _last_match(seq[:-1], key)
                if start is not None:
                    return Draft(list(corpus[cid][start + n:start + n + k]), n, start + n, cid)
        return NO_DRAFT


def _last_match(arr: np.ndarray, key: np.ndarray) -> int | None:
    """Largest p with arr[p:p+len(key)] == key, or None.  arr [L], key [n]."""
    n = len(key)
    if len(arr) < n:
        return None
    windows = np.lib.stride_tricks.sliding_window_view(arr, n)  # [L-n+1, n]
    hits = np.flatnonzero((windows == key).all(axis=1))
    return int(hits[-1]) if len(hits) else None
