"""Time whole-model forward steps of typical shapes (SmolLM2 bf16 by default), best of 5 after 2 warm-ups.

    OMP_NUM_THREADS=2 python scripts/step_times.py [--model M] [--profile CASE]

Each case is a list of (context before, new tokens) per sequence: decodes, verify steps (k+1 tokens), a turn's
delta over a long context, a whole prompt. K/V slots are contiguous and their contents arbitrary: only the
timing means anything. --profile CASE prints torch's operator table for that case (the native attention
kernels run through ctypes and show up as the gap between the table's total and the step time).
"""

from __future__ import annotations

import argparse
import time

import torch

from deltaserve.engine.engine import EngineConfig, LLMEngine
from deltaserve.engine.kv_manager import CacheMode
from deltaserve.layers.attention import AttentionMetadata, SeqSpan

CASES = {
    "decode 4 @4k": [(4000, 1)] * 4, "verify 4x5 @4k": [(4000, 5)] * 4, "verify 4x8 @4k": [(4000, 8)] * 4,
    "verify 1x5 @4k": [(4000, 5)], "delta 300 @4k": [(4000, 300)], "delta 300 + 3 verify @4k": [(4000, 300)] + [(4000, 5)] * 3,
    "prefill 2048": [(0, 2048)], "decode 1 @100": [(100, 1)], "verify 1x5 @100": [(100, 5)], "verify 1x16 @100": [(100, 16)],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--profile", default="", choices=[""] + list(CASES))
    args = ap.parse_args()
    eng = LLMEngine.from_model(args.model, EngineConfig(dtype=torch.bfloat16, cache_mode=CacheMode.STATELESS,
                                                        speculation=False, kv_cache_bytes=1 << 30, max_batch_tokens=8192))
    r = eng.runner

    def step(spec):
        ids, pos, spans, write, base = [], [], [], [], 0
        for ctx, q in spec:
            slots = torch.arange(base, base + ctx + q)
            base += ctx + q + 16
            spans.append(SeqSpan(len(ids), q, slots))
            ids += [100 + i % 1000 for i in range(q)]
            pos += list(range(ctx, ctx + q))
            write.append(slots[ctx:])
        meta = AttentionMetadata(torch.cat(write), spans).prepare(torch.device("cpu"), r.native_attention,
                                                                  r.tiled_attention, r.gqa_group)
        return lambda: r.model(torch.tensor(ids), torch.tensor(pos), r.kv, meta)

    with torch.inference_mode():
        for name, spec in CASES.items():
            f = step(spec)
            for _ in range(2):
                f()
            ts = []
            for _ in range(5):
                t = time.perf_counter()
                f()
                ts.append(time.perf_counter() - t)
            print(f"{name:26s} {min(ts) * 1e3:8.1f} ms")
        if args.profile:
            from torch.profiler import profile

            f = step(CASES[args.profile])
            with profile() as p:
                for _ in range(3):
                    f()
            print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
