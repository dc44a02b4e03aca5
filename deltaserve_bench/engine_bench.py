"""`deltaserve bench engine`: prefill and single-stream decode speed vs HF transformers.

Both run the same weights (the converted model directory) in the same
process, one after the other, in bf16 and fp32. deltaserve runs in
`stateless` mode so no prompt is served from cache.
"""

from __future__ import annotations

import gc
import time

import torch

from deltaserve_bench.common import load_note, md_table, report_head
from deltaserve_bench.sections import add_write_argument, publish


def add_parser(sub) -> None:
    p = sub.add_parser("engine", help="prefill / decode tokens/s vs HF transformers")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--prompt-lens", default="512,2048,8192")
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--device", default="cpu", help="cpu or cuda (both sides run there)")
    p.add_argument("--no-hf", action="store_true", help="skip the HF transformers side")
    add_write_argument(p, "engine-MODEL")
    p.set_defaults(func=run)


def _sync(device) -> None:
    """CUDA runs asynchronously: a timer must wait for the queued kernels (HF's forward returns before they end)."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _prompt(n: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, min(vocab, 30000), (n,), generator=g).tolist()


def _ours(model_name, dtype, lens, decode_tokens, max_ctx, device="cpu"):
    from deltaserve.engine.engine import EngineConfig, LLMEngine
    from deltaserve.engine.kv_manager import CacheMode
    from deltaserve.engine.sampling import SamplingParams

    eng = LLMEngine.from_model(model_name, EngineConfig(dtype=dtype, cache_mode=CacheMode.STATELESS, speculation=False,
                                                         kv_cache_bytes=1 << 30, max_batch_tokens=8192,
                                                         device=device))
    res = {}
    eng.generate([_prompt(64, eng.cfg.vocab_size, 0)], SamplingParams(max_tokens=4))  # warm-up
    for n in lens:
        n = min(n, max_ctx - 1)
        p = _prompt(n, eng.cfg.vocab_size, n)
        t = time.perf_counter()
        eng.generate([p], SamplingParams(max_tokens=1))
        res[("prefill", n)] = n / (time.perf_counter() - t)
    p = _prompt(128, eng.cfg.vocab_size, 1)
    seq = eng.add_request(p, SamplingParams(max_tokens=decode_tokens + 1, ignore_eos=True))
    eng.step()  # prefill + first token
    t = time.perf_counter()
    eng.run_until_done([seq])
    res[("decode", 128)] = (seq.num_output - 1) / (time.perf_counter() - t)
    del eng
    gc.collect()
    return res


def _hf(model_name, dtype, lens, decode_tokens, max_ctx, device="cpu"):
    from transformers import AutoModelForCausalLM

    from deltaserve.models.loader import model_dir

    m = AutoModelForCausalLM.from_pretrained(str(model_dir(model_name)), dtype=dtype).eval().to(device)
    vocab = m.config.vocab_size
    res = {}
    with torch.inference_mode():
        m(torch.tensor([_prompt(64, vocab, 0)], device=device))
        for n in lens:
            n = min(n, max_ctx - 1)
            p = torch.tensor([_prompt(n, vocab, n)], device=device)
            t = time.perf_counter()
            m(p, use_cache=True)
            _sync(device)
            res[("prefill", n)] = n / (time.perf_counter() - t)
        p = torch.tensor([_prompt(128, vocab, 1)], device=device)
        kw = dict(do_sample=False, pad_token_id=0)
        t = time.perf_counter()
        m.generate(p, max_new_tokens=1, min_new_tokens=1, **kw)
        _sync(device)
        t1 = time.perf_counter() - t
        t = time.perf_counter()
        m.generate(p, max_new_tokens=decode_tokens + 1, min_new_tokens=decode_tokens + 1, **kw)
        _sync(device)
        res[("decode", 128)] = decode_tokens / (time.perf_counter() - t - t1)
    del m
    gc.collect()
    return res


def run(args) -> int:
    from deltaserve.models.loader import load_config, model_dir

    cfg = load_config(model_dir(args.model))
    lens = [int(x) for x in args.prompt_lens.split(",")]
    rows = []
    for dname in args.dtypes.split(","):
        dtype = getattr(torch, dname)
        ours = _ours(args.model, dtype, lens, args.decode_tokens, cfg.max_position, args.device)
        hf = {} if args.no_hf else _hf(args.model, dtype, lens, args.decode_tokens, cfg.max_position, args.device)
        for key in ours:
            kind, n = key
            label = f"prefill {n} tok" if kind == "prefill" else f"decode (ctx {n})"
            h = hf.get(key)
            rows.append([dname, label, ours[key], h if h else "-", f"{ours[key] / h:.2f}x" if h else "-"])
            print(f"{dname:9s} {label:18s} deltaserve {ours[key]:9.1f} tok/s   HF {h or 0:9.1f} tok/s")
    table = md_table(["dtype", "phase", "deltaserve tok/s", "HF transformers tok/s", "ratio"], rows)
    body = (
        report_head(f"Engine: prefill and single-stream decode ({args.model})",
                    f"deltaserve bench engine --model {args.model} --dtypes {args.dtypes} --prompt-lens {args.prompt_lens}"
                    + (f" --device {args.device}" if args.device != "cpu" else ""))
        + table
        + "\n\nPrefill at the model's context limit is capped to `max_position - 1` tokens. "
        "deltaserve runs stateless (no cache reuse) with a step budget of 8,192 tokens, so each prompt is one forward pass like HF's. "
        + load_note() + "\n"
    )
    publish(args.write, f"engine-{args.model}", body)
    return 0
