"""The bridge between engine (control) and model (compute): a StepPlan in, logits out."""

from __future__ import annotations

from typing import NamedTuple

import torch

from deltaserve.engine.scheduler import StepPlan
from deltaserve.kv.pool import KVPool
from deltaserve.layers.attention import SeqSpan
from deltaserve.models.llama import LlamaModel


class StepLogits(NamedTuple):
    logits: torch.Tensor  # [num_rows, vocab] fp32
    rows: list[tuple[int, int]]  # per plan item: (first row, row count); count 0 = chunk ended mid-prompt


class ModelRunner:
    def __init__(self, model: LlamaModel, kv: KVPool, batch_invariant: bool = False):
        self.model = model
        self.kv = kv
        self.batch_invariant = batch_invariant
        self.device = model.device
        self.bind()

    def bind(self) -> None:
        """Put the model in this runner's modes: attention for its pool's KV format, batch invariance. No-ops when
        already so; a model shared by engines of other modes (tests) is switched back at each step. Mutates the model."""
        self.model.set_batch_invariant(self.batch_invariant)
        self.model.use_kv_format(self.kv.layout.fmt)

    def run(self, plan: StepPlan) -> StepLogits:
        ids: list[int] = []
        pos: list[int] = []
        spans: list[SeqSpan] = []
        write: list[torch.Tensor] = []
        logit_index: list[int] = []
        rows: list[tuple[int, int]] = []
        for item in plan.items:
            seq, n, draft = item
            start = seq.num_computed
            feed = seq.tokens[start : start + n] + list(draft)
            end = start + len(feed)
            assert len(seq.slots) >= end, "slots were not reserved for this step"
            q0 = len(ids)
            ids.extend(feed)
            pos.extend(range(start, end))
            write.append(seq.slots[start:end])
            spans.append(SeqSpan(q0, len(feed), seq.slots[:end]))
            if start + n == len(seq.tokens):  # reaches the end: logits for the last real token and each draft
                rows.append((len(logit_index), 1 + len(draft)))
                logit_index.extend(range(q0 + n - 1, q0 + len(feed)))
            else:
                rows.append((len(logit_index), 0))
        # the model's attention backend lays out the step once for all layers
        self.bind()
        meta = self.model.attn.prepare(spans, torch.cat(write).to(self.device))
        hidden = self.model(
            torch.tensor(ids, dtype=torch.int64, device=self.device),
            torch.tensor(pos, dtype=torch.int64, device=self.device),
            self.kv,
            meta,
        )
        if logit_index:
            logits = self.model.logits(hidden[torch.tensor(logit_index, device=self.device)]).cpu()
        else:
            logits = torch.empty(0, self.model.cfg.vocab_size)
        return StepLogits(logits, rows)
