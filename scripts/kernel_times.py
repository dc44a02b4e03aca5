"""Kernel-alone times of the decode / verify attention kernels over 30 layers' pools (SmolLM2's heads), each call's
K/V read from memory as in a model step: bf16 and fp8 rows on the AMX short kernel and the short kernel's pairs, int8
rows on the short kernel's integer path and the AMX-INT8 short kernel (those built here). Best and median of 7 rounds, the
kernels taking turns (the machine's drift cancels); GB/s is the rows' bytes over the best time.

    OMP_NUM_THREADS=2 python scripts/kernel_times.py [--seqs 8] [--context 8000] [--q-len 1] [--slots pages16]

--slots: pages16 (runs of 16 slots in scattered order, as the page table gives them), run (one run a sequence),
scattered (every slot anywhere), small (1,024 slots reused, one pool for every layer: the rows stay in L2, so the
time is the kernels' compute alone).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from deltaserve.kernels import paged_attention as pa
from deltaserve.kv.quant import FORMATS, quantize_rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", type=int, default=8)
    ap.add_argument("--context", type=int, default=8000)
    ap.add_argument("--q-len", type=int, default=1)
    ap.add_argument("--slots", default="pages16", choices=["pages16", "run", "scattered", "small"])
    ap.add_argument("--layers", type=int, default=30)
    args = ap.parse_args()
    H, Hkv, D, B, L, ql = 9, 3, 64, args.seqs, args.context, args.q_len
    g = torch.Generator().manual_seed(0)
    total = B * L
    n = 1024 if args.slots == "small" else total + 64
    layers = 1 if args.slots == "small" else args.layers
    bf16 = [(torch.randn(n, Hkv, D, generator=g).to(torch.bfloat16),
             torch.randn(n, Hkv, D, generator=g).to(torch.bfloat16)) for _ in range(layers)]
    int8 = [(quantize_rows(k.float(), FORMATS["int8"]), quantize_rows(v.float(), FORMATS["int8"])) for k, v in bf16]
    fp8 = [(quantize_rows(k.float(), FORMATS["fp8_e4m3"]), quantize_rows(v.float(), FORMATS["fp8_e4m3"]))
           for k, v in bf16]
    if args.slots == "small":
        bf16, int8, fp8 = bf16 * args.layers, int8 * args.layers, fp8 * args.layers
    slots = {"pages16": lambda: (torch.randperm(n // 16, generator=g)[:, None] * 16 + torch.arange(16)).reshape(-1),
             "run": lambda: torch.arange(total), "scattered": lambda: torch.randperm(n, generator=g),
             "small": lambda: torch.arange(total) % n}[args.slots]()[:total].to(torch.int64).contiguous()
    seqs = torch.tensor([[i * ql, ql, i * L, L] for i in range(B)], dtype=torch.int64)
    q = [(2 * torch.randn(B * ql, H, D, generator=g)).to(torch.bfloat16).float() for _ in range(args.layers)]
    scale = D**-0.5
    out = torch.zeros(B * ql, H, D)
    kernels = {}
    if pa.amx_short_available():
        kernels["bf16 AMX short"] = (bf16, lambda qq, k, v: pa.paged_attention_amx_short(qq, k, v, slots, seqs, scale,
                                                                                          out))
    if pa.available():
        kernels["bf16 short (pairs)"] = (bf16, lambda qq, k, v: pa.paged_attention_short(qq, k, v, slots, seqs, scale,
                                                                                          out, True))
        kernels["int8 short (integer)"] = (int8, lambda qq, k, v: pa.paged_attention_short(
            qq, k, v, slots, seqs, scale, out, True, kind=FORMATS["int8"].kind))
    fp8_kind = FORMATS["fp8_e4m3"].kind
    if pa.amx_short_available():
        kernels["fp8 AMX short"] = (fp8, lambda qq, k, v: pa.paged_attention_amx_short(qq, k, v, slots, seqs, scale,
                                                                                        out, kind=fp8_kind))
    if pa.available():
        kernels["fp8 short (pairs)"] = (fp8, lambda qq, k, v: pa.paged_attention_short(
            qq, k, v, slots, seqs, scale, out, True, kind=fp8_kind))
    if pa.supports_amx_short_int8(D, Hkv):
        kernels["int8 AMX short"] = (int8, lambda qq, k, v: pa.paged_attention_amx_short_int8(qq, k, v, slots, seqs,
                                                                                               scale, out))
    times = {name: [] for name in kernels}
    names = list(kernels)
    for rnd in range(8):
        for name in names if rnd % 2 == 0 else names[::-1]:
            pools, f = kernels[name]
            t = time.perf_counter()
            for layer in range(args.layers):
                f(q[layer], *pools[layer])
            if rnd:  # the first round warms up
                times[name].append(time.perf_counter() - t)
    print(f"{B} x {L} keys, q_len {ql}, slots {args.slots}, {args.layers} layers, {torch.get_num_threads()} threads")
    for name in names:
        row_bytes = 2 * D if name.startswith("bf16") else D + 4
        best = min(times[name])
        gbs = total * args.layers * 2 * Hkv * row_bytes / best / 1e9
        print(f"  {name:22s} best {best * 1e3:7.1f} ms  median {statistics.median(times[name]) * 1e3:7.1f} ms"
              f"  {gbs:5.1f} GB/s")


if __name__ == "__main__":
    main()
