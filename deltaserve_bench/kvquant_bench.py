"""`deltaserve bench kvquant`: what an int8 / fp8 KV cache costs in quality, beside the bytes it saves.

For each model (weights in --dtype, bf16 as served) and each cache dtype, against the model's own-dtype cache:

- greedy agreement over the correctness suite's prompts (tests/test_real_models.py: N chat prompts of 100 to L
  tokens, 64 new tokens each, ignore_eos, one batch): prompts whose 64 tokens are identical, and the mean number
  of tokens generated before the first difference;
- log-likelihood of a long held text (Python's own reference text on compound statements, `pydoc_data.topics`,
  its first --text-tokens tokens), teacher-forced in --chunk-token chunks so each chunk attends over the history
  as the cache stores it: mean negative log-likelihood a token, its change against the full-precision cache, and
  how often the next-token argmax agrees;
- bytes a token of cache.

Quantized caches are not exact (that is their price); what the engine guarantees at any cache dtype is that a
session's turns equal a recompute at that dtype (tests/test_kv_quant.py).
"""

from __future__ import annotations

import torch

from deltaserve_bench.common import chat_prompt_of_tokens, load_note, md_table, report_head
from deltaserve_bench.sections import add_write_argument, publish

NUM_PROMPTS = {"smollm2-135m": 20, "qwen2.5-coder-0.5b": 10}  # as tests/test_real_models.py
MAX_LEN = {"smollm2-135m": 1500, "qwen2.5-coder-0.5b": 1000}


def add_parser(sub) -> None:
    p = sub.add_parser("kvquant", help="quality cost of int8/fp8 KV caches (greedy agreement, log-likelihood)")
    p.add_argument("--models", default="smollm2-135m,qwen2.5-coder-0.5b")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="model (weights) dtype")
    p.add_argument("--kv-cache-dtypes", default="int8,fp8", help="cache dtypes compared with the model's own")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--text-tokens", type=int, default=4096, help="tokens of the held text scored")
    p.add_argument("--chunk-tokens", type=int, default=512)
    add_write_argument(p, "kvquant-DTYPE")
    p.set_defaults(func=run)


def held_text() -> str:
    """A long English technical text every Python has (not in any prompt of ours)."""
    from pydoc_data.topics import topics

    return topics["compound"] + topics["specialnames"]


def text_logprobs(model, fmt, ids: list[int], chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced scoring of `ids` with a pool storing K/V in `fmt`: (log-prob of each next token [n-1],
    the argmax prediction at each position [n-1]). Chunks of `chunk` tokens, each attending over the stored
    history. Leaves the model's backend on `fmt`."""
    from deltaserve.kv.pool import KVLayout, KVPool
    from deltaserve.layers.attention import SeqSpan

    cfg, n = model.cfg, len(ids)
    pool = KVPool(KVLayout(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, model.dtype, fmt.name), n + 1)
    model.use_kv_format(fmt)
    slots = torch.arange(n)
    tokens = torch.tensor(ids)
    lps, preds = [], []
    with torch.inference_mode():
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            meta = model.attn.prepare([SeqSpan(0, e - s, slots[:e])], slots[s:e])
            logits = model.logits(model(tokens[s:e], torch.arange(s, e), pool, meta))  # [e - s, vocab] fp32
            logp = torch.log_softmax(logits, dim=-1)
            nxt = tokens[s + 1 : e + 1]  # the tokens these positions predict (the last position has none)
            lps.append(logp[: len(nxt)].gather(1, nxt[:, None]).squeeze(1))
            preds.append(logits[: len(nxt)].argmax(-1))
    return torch.cat(lps), torch.cat(preds)


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def run(args) -> int:
    from tqdm import tqdm

    from deltaserve.engine.engine import EngineConfig, LLMEngine
    from deltaserve.engine.kv_manager import CacheMode
    from deltaserve.engine.sampling import SamplingParams
    from deltaserve.kv.pool import KVLayout
    from deltaserve.kv.quant import resolve
    from deltaserve.models.llama import LlamaModel
    from deltaserve.models.loader import load_config, load_state_dict, model_dir
    from deltaserve.models.registry import ensure_pulled
    from deltaserve.models.tokenizer import Tokenizer

    dtype = getattr(torch, args.dtype)
    rows = []
    for name in args.models.split(","):
        ensure_pulled(name)
        d = model_dir(name)
        model = LlamaModel.from_state_dict(load_config(d), load_state_dict(d), dtype)
        tok, cfg = Tokenizer(d), model.cfg
        n, top = NUM_PROMPTS.get(name, 10), MAX_LEN.get(name, 1000)
        prompts = [chat_prompt_of_tokens(tok, 100 + (top - 100) * i // (n - 1), seed=100 + i) for i in range(n)]
        text = tok.encode(held_text())[: args.text_tokens]
        params = SamplingParams(max_tokens=args.new_tokens, ignore_eos=True)
        base = resolve("auto", dtype)
        results = {}
        for kvd in tqdm([base.name] + args.kv_cache_dtypes.split(","), desc=name, unit="cache dtype"):
            fmt = resolve(kvd, dtype)
            eng = LLMEngine(model, tok, EngineConfig(dtype=dtype, kv_cache_bytes=1 << 30, kv_cache_dtype=fmt.name,
                                                     cache_mode=CacheMode.STATELESS, speculation=False,
                                                     max_batch_tokens=2048))
            outs = eng.generate(prompts, params)
            lp, pred = text_logprobs(model, fmt, text, args.chunk_tokens)
            bpt = KVLayout(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype, fmt.name).bytes_per_token
            results[fmt.name] = (outs, lp, pred, bpt)
            eng.close(5)
        ref_outs, ref_lp, ref_pred, ref_bpt = results[base.name]
        for kvd, (outs, lp, pred, bpt) in results.items():
            same = sum(o == r for o, r in zip(outs, ref_outs))
            before = sum(_first_difference(o, r) for o, r in zip(outs, ref_outs)) / len(outs)
            nll = -lp.mean().item()
            row = [name, kvd, bpt, f"{bpt / ref_bpt:.2f}x", f"{same}/{len(outs)}", before, f"{nll:.4f}",
                   f"{nll + ref_lp.mean().item():+.4f}", f"{(pred == ref_pred).float().mean().item() * 100:.1f}%"]
            rows.append(row)
            print(" | ".join(str(v) for v in row), flush=True)
    table = md_table(["model", "KV cache", "bytes/token", "vs own dtype", "greedy identical",
                      f"mean tokens before a difference (of {args.new_tokens})", "NLL/token", "ΔNLL",
                      "next-token argmax agrees"], rows)
    body = (report_head(f"KV cache dtype: quality cost ({args.dtype} weights)",
                        f"deltaserve bench kvquant --models {args.models} --dtype {args.dtype} "
                        f"--kv-cache-dtypes {args.kv_cache_dtypes}")
            + f"Greedy: the correctness suite's prompts (100 to {max(MAX_LEN.values())} tokens), {args.new_tokens} new "
            f"tokens each, against the same model with its own-dtype cache. Held text: {args.text_tokens} tokens of "
            f"Python's reference text (`pydoc_data.topics`: compound statements, special method names), scored in "
            f"{args.chunk_tokens}-token chunks over the stored history.\n\n" + table + "\n\n" + load_note() + "\n")
    publish(args.write, f"kvquant-{args.dtype}", body)
    return 0
