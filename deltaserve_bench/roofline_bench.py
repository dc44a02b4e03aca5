"""`deltaserve bench roofline`: measured step times beside this CPU's floors for the same work.

One forward step of the model (all layers, the logits it needs) for decode batches at 1k/4k/8k context and 1/4/8
sequences, and for 128-token spans (a prefill chunk or long verify) over 1k/4k/8k of history. Beside each:

- the memory floor: bytes the step must read (every weight once, plus each sequence's K/V) / the copy bandwidth;
- the compute floor: its FLOPs (2 per weight per token, 4 x heads x head_dim per query-key pair) / the matmul
  rate: bf16 where its GEMM is fast here (AMX, fast AVX512-BF16), else fp32, the form the engine's large linears
  take there (`layers/linear.large_batch_form`; without AVX-512 torch's bf16 matmul is a generic loop at well
  under 1 GFLOP/s, no floor of anything the engine runs);

both floors measured here with torch (a 256 MiB copy, read + write bytes counted as STREAM does; a 2048^3 matmul)
before the steps and again between each context's cases, the best of them kept: on a shared machine a single early
measurement can catch a slow minute (one run read 11.6 GB/s, the next one's best of 7 was 20.2), and a floor is the
best the machine does. The step's floor is the larger one; `x floor` says how far the step is from it. The cache
dtypes of a decode case, and the span paths built here (the tiled kernel, `layers/attention/span_matmul.py`, the AMX
kernel on Xeons with AMX) of a span case, take turns a repetition at a time, each pool alive throughout, so their
ratios compare the same minutes rather than cases run minutes apart.

The model runs below the engine (no scheduler, no sampling): the pool's history is left at zeros, which costs
the kernels what any values cost. Contexts are capped to the model's positions (SmolLM2: 8,192 in all, so its
"8k" rows are 8,191 tokens of history for decode and 8,064 before a 128-token span).
"""

from __future__ import annotations

import dataclasses
import time

import torch

from deltaserve_bench.common import load_note, machine, md_table, report_head
from deltaserve_bench.sections import add_write_argument, publish


def add_parser(sub) -> None:
    p = sub.add_parser("roofline", help="step times vs this CPU's memory and bf16-matmul floors")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--contexts", default="1024,4096,8192", help="context lengths (tokens of history)")
    p.add_argument("--batches", default="1,4,8", help="decode batch sizes")
    p.add_argument("--span", type=int, default=128, help="query tokens of the span cases")
    p.add_argument("--kv-cache-dtypes", default="auto",
                   help="cache dtypes the decode cases run with, e.g. auto,int8,fp8 (spans: the first one)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per case (the fastest is reported)")
    add_write_argument(p, "roofline-MODEL")
    p.set_defaults(func=run)


def _best_ms(f, reps: int) -> float:
    """The fastest of `reps` calls after a warm-up: on a shared machine the least disturbed one, the closest to what
    the step costs (a floor is a best case too)."""
    from deltaserve.layers.attention.span_probe import best_ms

    f()
    return best_ms(f, reps)


def best_interleaved(fs: list, reps: int) -> list[float]:
    """The fastest ms of each of `fs` over `reps` rounds after a warm-up each, the calls taking turns (forward, then
    backward order): a machine's drift then costs each the same."""
    for f in fs:
        f()
    best = [float("inf")] * len(fs)
    for r in range(reps):
        order = range(len(fs)) if r % 2 == 0 else reversed(range(len(fs)))
        for i in order:
            t = time.perf_counter()
            fs[i]()
            best[i] = min(best[i], (time.perf_counter() - t) * 1e3)
    return best


def copy_bandwidth(nbytes: int = 256 << 20, reps: int = 5) -> float:
    """Bytes/s of a large tensor copy, read + write counted (STREAM's convention); best of `reps`."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = _best_ms(lambda: dst.copy_(src), reps)
    return 2 * nbytes / (best / 1e3)


def matmul_rate(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """FLOP/s of an n^3 matmul in `dtype` (bf16: oneDNN, AMX where the CPU has it); best of `reps`."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    best = _best_ms(lambda: a @ b, reps)
    return 2 * n**3 / (best / 1e3)


def matmul_dtype() -> torch.dtype:
    """The dtype whose matmul rate is this CPU's compute floor: the one its large linears run in."""
    from deltaserve.layers.linear import large_batch_form

    return torch.bfloat16 if large_batch_form() == "bf16" else torch.float32


class Work:
    """What a step must do at least: bytes read and FLOPs, from the model's shapes."""

    def __init__(self, model, kv_bytes_per_token: int):
        cfg = model.cfg
        self.cfg = cfg
        self.elt = torch.finfo(model.dtype).bits // 8
        self.layer_weights = sum(p.numel() for layer in model.layers for p in layer.parameters() if p.dim() == 2)
        self.head_weights = model.lm_head.numel()
        self.kv_per_token = kv_bytes_per_token  # the pool's layout: scales of quantized rows included

    def of(self, tokens: int, logit_rows: int, keys_read: int, pairs: int) -> tuple[float, float]:
        """(bytes, FLOPs) of a step with `tokens` query tokens, `logit_rows` logits, `keys_read` context tokens
        whose K/V it reads (each once) and `pairs` query-key pairs attended."""
        cfg = self.cfg
        nbytes = (self.layer_weights + self.head_weights) * self.elt + keys_read * self.kv_per_token
        flops = (2 * self.layer_weights * tokens + 2 * self.head_weights * logit_rows
                 + 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * pairs)
        return nbytes, flops


def run(args) -> int:
    from deltaserve.kv.pool import KVLayout, KVPool
    from deltaserve.layers.attention import NativeCpuBackend, SeqSpan, span_probe
    from deltaserve.models.llama import LlamaModel
    from deltaserve.models.loader import load_config, load_state_dict, model_dir

    dtype = getattr(torch, args.dtype)
    contexts = [int(x) for x in args.contexts.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    d = model_dir(args.model)
    model = LlamaModel.from_state_dict(load_config(d), load_state_dict(d), dtype)
    cfg = model.cfg
    mm = matmul_dtype()
    mm_name = "bf16" if mm == torch.bfloat16 else "fp32"
    floors = [(copy_bandwidth(), matmul_rate(mm))]
    print(f"{machine()}\ncopy bandwidth {floors[0][0] / 1e9:.1f} GB/s, {mm_name} matmul {floors[0][1] / 1e9:.0f} "
          "GFLOP/s (measured again between the cases; the best is the floor)")
    max_ctx = max(contexts) + args.span
    kv_dtypes = args.kv_cache_dtypes.split(",")
    layouts = {k: KVLayout(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype, k) for k in kv_dtypes}
    pools, attns, works = {}, {}, {}
    for k in kv_dtypes:  # every dtype's pool alive at once (8 x 8k tokens: ~1.5 GB in bf16), its backend chosen once
        pools[k] = KVPool(layouts[k], max(batches) * max_ctx)
        model.use_kv_format(layouts[k].fmt)
        attns[k], works[k] = model.attn, Work(model, layouts[k].bytes_per_token)
    first = kv_dtypes[0]
    model.use_kv_format(layouts[first].fmt)
    base = model.attn
    paths = [("selected", base)]
    if isinstance(base, NativeCpuBackend) and base.tiled and dtype == torch.bfloat16:
        names = {"kernel": "tiled kernel", "matmul": "span_matmul", "amx": "AMX kernel"}
        paths = [(names[p] + (" (probe's choice)" if p == base.span_path else ""),
                  dataclasses.replace(base, span_path=p)) for p in span_probe.built_paths(cfg.head_dim)]

    def step(spans: list[SeqSpan], attn, pool):
        """One forward step over `spans` (each sequence's history at slots b * max_ctx ...), as a call."""
        ids = torch.randint(100, 1000, (sum(s.q_len for s in spans),))
        pos = torch.cat([torch.arange(len(s.kv_slots) - s.q_len, len(s.kv_slots)) for s in spans])
        write = torch.cat([s.kv_slots[len(s.kv_slots) - s.q_len :] for s in spans])
        last = torch.tensor([s.q_start + s.q_len - 1 for s in spans])  # one logit row per sequence
        meta = attn.prepare(spans, write)

        def f():
            model.attn = attn
            model.logits(model(ids, pos, pool, meta)[last])

        return f

    cases = []  # (kind, label, path, ms, work, tokens, keys, pairs, logit_rows): floors applied at the end
    decode_ms: dict[tuple[str, int, int], float] = {}
    try:
        for ctx in contexts:
            ctx = min(ctx, cfg.max_position - 1)  # history + the new token within the model's positions
            for B in batches:
                spans = [SeqSpan(b, 1, torch.arange(b * max_ctx, b * max_ctx + ctx + 1)) for b in range(B)]
                times = best_interleaved([step(spans, attns[k], pools[k]) for k in kv_dtypes], args.reps)
                for k, ms in zip(kv_dtypes, times):
                    decode_ms[k, ctx, B] = ms
                    path = "selected" if len(kv_dtypes) == 1 else f"KV {layouts[k].fmt.name}"
                    cases.append(("decode", f"{B} seq x ctx {ctx}", path, ms, works[k], B, B * (ctx + 1),
                                  B * (ctx + 1), B))
                    print(f"decode  {B} seq x ctx {ctx:<8d} {path:28s} {ms:8.2f} ms", flush=True)
            floors.append((copy_bandwidth(), matmul_rate(mm)))
        n = args.span
        for ctx in contexts:
            ctx = min(ctx, cfg.max_position - n)
            span = [SeqSpan(0, n, torch.arange(0, ctx + n))]
            pairs = n * ctx + n * (n + 1) // 2  # every history key, then causal within the span
            times = best_interleaved([step(span, attn, pools[first]) for _, attn in paths], args.reps)
            for (name, _), ms in zip(paths, times):
                cases.append(("span", f"{n} tok over ctx {ctx}", name, ms, works[first], n, ctx + n, pairs, 1))
                print(f"span    {n} tok over ctx {ctx:<6d} {name:28s} {ms:8.2f} ms", flush=True)
            floors.append((copy_bandwidth(), matmul_rate(mm)))
    finally:
        model.attn = base
    bw, rate = max(f[0] for f in floors), max(f[1] for f in floors)
    rows = []
    for kind, label, path, ms, work, tokens, keys, pairs, logit_rows in cases:
        nbytes, flops = work.of(tokens, logit_rows, keys, pairs)
        mem_ms, fl_ms = nbytes / bw * 1e3, flops / rate * 1e3
        rows.append([kind, label, path, ms, nbytes / 1e6, flops / 1e9, mem_ms, fl_ms,
                     f"{ms / max(mem_ms, fl_ms):.1f}x"])
    speedups = ""
    if len(kv_dtypes) > 1:
        lines = [f"- KV {layouts[k].fmt.name}: " + ", ".join(
            f"{B} seq x ctx {c} {decode_ms[first, c, B] / decode_ms[k, c, B]:.2f}x"
            for (k2, c, B) in decode_ms if k2 == k) for k in kv_dtypes[1:]]
        speedups = (f"Decode steps, speed-up against KV {layouts[first].fmt.name}:\n\n" + "\n".join(lines) + "\n\n")
        print(speedups)
    table = md_table(["step", "case", "attention", "measured ms", "MB read", "GFLOP", "memory floor ms",
                      "compute floor ms", "x floor"], rows)
    body = (
        report_head(f"Roofline: step times vs floors ({args.model}, {args.dtype})",
                    f"deltaserve bench roofline --model {args.model} --dtype {args.dtype} --contexts {args.contexts}"
                    f" --batches {args.batches} --span {args.span} --kv-cache-dtypes {args.kv_cache_dtypes}")
        + f"Floors measured in this run, the best of {len(floors)} measurements between the cases: copy bandwidth "
        f"{bw / 1e9:.1f} GB/s (read + write; {min(f[0] for f in floors) / 1e9:.1f} at worst), {mm_name} matmul "
        f"{rate / 1e9:.0f} GFLOP/s ({min(f[1] for f in floors) / 1e9:.0f} at worst; 2048^3, the large linears' form "
        "here). Memory floor: every weight once plus each sequence's K/V once; compute floor: 2 FLOPs per weight per "
        "token (logits for one row a sequence) plus 4 x heads x head_dim per query-key pair. Fastest of "
        f"{args.reps} steps, a case's cache dtypes (or span paths) taking turns.\n\n"
        + table + "\n\n" + speedups + load_note() + "\n"
    )
    publish(args.write, f"roofline-{args.model}", body)
    return 0
