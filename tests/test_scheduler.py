"""engine/scheduler.py: exact token counts per step under the budget and the prefill cap beside decodes."""

from __future__ import annotations

from deltaserve.engine.sampling import SamplingParams
from deltaserve.engine.scheduler import Scheduler
from deltaserve.engine.sequence import Sequence, SeqStatus


def _decoding(sched: Scheduler, draft: list[int] | None = None) -> Sequence:
    seq = Sequence([1] * 10, SamplingParams(max_tokens=8))
    seq.tokens.append(7)  # one generated token, its K/V not yet computed: next step decodes it
    seq.num_computed = 10
    seq.status = SeqStatus.RUNNING
    seq.draft = list(draft or [])
    sched.running.append(seq)
    return seq


class _RoomyKV:
    """The KV manager's verbs with unlimited memory: every request is admitted, every reservation granted."""

    def can_admit(self, seq, running, demote_pins):
        return True

    def admit(self, seq):
        pass

    def reserve(self, seq, n):
        return True


def _plan(sched: Scheduler):
    return [(it.seq, it.num_tokens, len(it.draft)) for it in sched.plan(_RoomyKV()).items]


def test_prefill_fills_the_budget_without_a_cap():
    sched = Scheduler(max_batch_tokens=2048)
    a, b = _decoding(sched), _decoding(sched, draft=[3, 4, 5])
    p = Sequence([2] * 3000, SamplingParams(max_tokens=8))
    sched.add(p)
    assert _plan(sched) == [(a, 1, 0), (b, 1, 3), (p, 2048 - 5, 0)]


def test_prefill_beside_decodes_is_capped():
    sched = Scheduler(max_batch_tokens=2048, max_prefill_with_decode=256)
    a = _decoding(sched)
    p = Sequence([2] * 3000, SamplingParams(max_tokens=8))
    sched.add(p)
    assert _plan(sched) == [(a, 1, 0), (p, 256, 0)]
    p.num_computed += 256
    assert _plan(sched) == [(a, 1, 0), (p, 256, 0)]  # a running prefill is capped the same way


def test_a_step_without_decodes_takes_the_full_budget():
    sched = Scheduler(max_batch_tokens=2048, max_prefill_with_decode=256)
    p, q = Sequence([2] * 1500, SamplingParams(max_tokens=8)), Sequence([3] * 1500, SamplingParams(max_tokens=8))
    sched.add(p)
    sched.add(q)
    assert _plan(sched) == [(p, 1500, 0), (q, 548, 0)]
    p.num_computed, q.num_computed = 1500, 548
    p.tokens.append(9)  # p's first token was sampled: it decodes now, q keeps prefilling under the cap
    assert _plan(sched) == [(p, 1, 0), (q, 256, 0)]
