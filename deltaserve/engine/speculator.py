"""Prompt-lookup speculation wired into the engine: drafts per sequence, lossless verification.

Drafts come from the sequence's own token history (prompt + generated, which
holds tool schemas, tool results and earlier calls). A session keeps its
lookup index across turns, so each turn only indexes its new tokens.

A request that carries `SamplingParams.tool_drafts` (its tools, set by the
server) also gets schema drafts (`spec/schema_drafts.py`) inside a tool call:
the call's frame, names, keys and values copied from the prompt, which pay on
a conversation's first call where the history has nothing to copy. Where both
propose, the history draft wins only if it extends the schema draft. Each
source has its own length controller, so one that misses switches itself off
without starving the other.
"""

from __future__ import annotations

import logging

import torch

from deltaserve.engine.sampling import processed_probs
from deltaserve.engine.sequence import Sequence
from deltaserve.spec.adaptive import DraftLengthController
from deltaserve.spec.lookup import LookupIndex
from deltaserve.spec.schema_drafts import SchemaDrafter
from deltaserve.spec.verify import verify_greedy, verify_sampling

log = logging.getLogger("deltaserve.engine")


class _SpecState:
    def __init__(self, index: LookupIndex, k_max: int, schema: SchemaDrafter | None = None):
        self.index = index
        self.ctl = DraftLengthController(k_min=1, k_max=k_max)
        self.schema = schema
        self.schema_ctl = DraftLengthController(k_min=1, k_max=k_max) if schema is not None else None
        self.source = "lookup"  # which drafter made the pending draft: its controller gets the outcome


class Speculator:
    def __init__(self, k_max: int = 8, max_ngram: int = 4, max_session_indices: int = 1024, tokenizer=None):
        self.k_max = k_max
        self.max_ngram = max_ngram
        self._session_index: dict[str, LookupIndex] = {}
        self.max_session_indices = max_session_indices
        self.tokenizer = tokenizer  # schema drafts need it; without one requests get history drafts only
        # Totals over all requests of the schema drafts alone (also counted in the sequences' stats).
        self.schema_drafted = 0
        self.schema_accepted = 0

    def _state(self, seq: Sequence) -> _SpecState:
        if seq.spec_state is None:
            idx = self._session_index.pop(seq.session_id, None) if seq.session_id else None
            if idx is None:
                idx = LookupIndex(min_ngram=1, max_ngram=self.max_ngram, max_draft=self.k_max)
            idx.sync(seq.tokens)  # keeps the common prefix with the last turn, indexes the rest
            drafts = seq.params.tool_drafts
            schema = (SchemaDrafter(drafts, self.tokenizer, seq.tokens[: seq.prompt_len])
                      if drafts is not None and self.tokenizer is not None else None)
            seq.spec_state = _SpecState(idx, self.k_max, schema)
        return seq.spec_state

    def propose(self, seq: Sequence) -> list[int]:
        """Draft tokens to verify in the sequence's next step (may be empty)."""
        st = self._state(seq)
        if len(st.index) < len(seq.tokens):
            st.index.extend(seq.tokens[len(st.index) :])
        room = seq.params.max_tokens - seq.num_output - 1
        if seq.constraint is not None:
            # Text a grammar forces next (JSON punctuation, property names of the schema)
            # is the best draft there is; fall back to lookup when nothing is forced.
            forced = seq.constraint.forced_tokens()[: min(self.k_max, room)]
            if forced:
                st.source = "lookup"
                return forced
        if st.schema is not None:
            ks = min(st.schema_ctl.next_k(), room)
            try:
                draft = st.schema.propose(seq.output_ids, ks) if ks > 0 else []
            except Exception:  # a drafter bug must not fail the request: drafts are only ever a guess
                log.exception("schema drafts failed; request %d continues without them", seq.seq_id)
                st.schema, draft = None, []
            if draft:
                longer = st.index.propose(ks).tokens
                if len(longer) > len(draft) and longer[: len(draft)] == draft:
                    draft = list(longer)
                st.source = "schema"
                return draft
        st.source = "lookup"
        k = min(st.ctl.next_k(), room)
        if k <= 0:
            return []
        return list(st.index.propose(k).tokens)

    def verify(self, seq: Sequence, draft: list[int], logits: torch.Tensor) -> list[int]:
        """logits [k+1, vocab] at the last real token and each draft -> tokens to append."""
        p = seq.params
        if seq.constraint is not None:
            # Row i is the constraint's mask after draft[:i]: a drafted token the constraint forbids
            # gets probability 0 at its row and is rejected, exactly as plain constrained decoding.
            logits = seq.constraint.apply_mask(logits.clone(), seq.constraint.draft_masks(draft))  # [k+1, vocab]
        if p.greedy:
            res = verify_greedy(logits.argmax(-1), draft)
        else:
            res = verify_sampling(processed_probs(logits, p), draft, seq.generator)
        st = self._state(seq)
        if st.source == "schema":
            st.schema_ctl.update(res.num_drafted, res.num_accepted)
            self.schema_drafted += res.num_drafted
            self.schema_accepted += res.num_accepted
        else:
            st.ctl.update(res.num_drafted, res.num_accepted)
        seq.stats.drafted_tokens += res.num_drafted
        seq.stats.accepted_tokens += res.num_accepted
        seq.stats.verify_steps += 1
        return list(res.tokens)

    def finish(self, seq: Sequence) -> None:
        """Keep a session's index for its next turn."""
        if seq.session_id and seq.spec_state is not None:
            if len(self._session_index) >= self.max_session_indices:
                self._session_index.pop(next(iter(self._session_index)))
            self._session_index[seq.session_id] = seq.spec_state.index
        seq.spec_state = None
