"""Engine flags, declared once for every command that builds an engine (`deltaserve generate`, `deltaserve serve`)."""

from __future__ import annotations

import argparse

from deltaserve.engine.engine import EngineConfig, LLMEngine
from deltaserve.engine.kv_manager import CacheMode
from deltaserve.kv.quant import KV_CACHE_DTYPES
from deltaserve.models.registry import DEFAULT_MODEL, KNOWN_MODELS


def add_engine_args(p: argparse.ArgumentParser, kv_cache_gb: float = 2.0) -> None:
    """The model and engine options (`kv_cache_gb`: this command's default pool size)."""
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"known name ({', '.join(KNOWN_MODELS)}), HF directory or .gguf file")
    # `auto` (vLLM's default) is bfloat16: the checkpoints we run are bf16 or f16, and on CPU f16 matmuls are
    # slow while bf16 ones use the AMX/AVX512-BF16 kernels; float32 stays available for reference runs.
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="bfloat16",
                   help="weights/activations dtype; auto (vLLM's name) = bfloat16")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--kv-cache-gb", type=float, default=kv_cache_gb, help="KV pool size in GiB")
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                   help="how the pool stores K/V: auto = the model dtype; int8 / fp8 (e4m3) halve a bf16 cache's "
                        "bytes a token (one scale per token and kv head; quality cost in BENCHMARKS.md)")
    p.add_argument("--batch-invariant", "--enable-deterministic-inference", dest="batch_invariant",
                   action="store_true",
                   help="a token's output never depends on what it was batched with (one GEMM form, the tiled "
                        "attention kernel for every span; slower decode): with --kv-cache-dtype int8/fp8, session "
                        "turns then equal a recompute exactly, as they do with a float cache")
    p.add_argument("--kv-offload-gb", type=float, default=0.0, metavar="GB",
                   help="host-memory tier: KV evicted from the pool is copied here (LRU, GB bound) and restored by "
                        "copy instead of prefill (default 0: evicted KV is dropped)")
    p.add_argument("--shared-prefix", default=None, metavar="PATH",
                   help="JSON list of prefixes (chat messages + tools, text or token ids) that every tenant may "
                        "share: stored once, and a tenant's prompt starting with one reuses its KV; nothing else "
                        "is shared across tenants (default: none)")
    p.add_argument("--session-store", default=None, metavar="DIR",
                   help="save each session's turns (token ids, messages, KV) to DIR behind the engine, and restore "
                        "the sessions found there on start (default: sessions live in memory only)")
    p.add_argument("--session-store-gb", type=float, default=None, metavar="GB",
                   help="bound on the session store; past it the least recently written closed sessions go first "
                        "(default: unbounded)")
    p.add_argument("--cache-mode", choices=[m.value for m in CacheMode], default="stateful",
                   help="stateful: pinned sessions + prefix cache; prefix: LRU prefix cache only; stateless: none")
    p.add_argument("--speculation", choices=("lookup", "off"), default="lookup",
                   help="prompt-lookup speculative decoding")
    p.add_argument("--num-speculative-tokens", type=int, default=8, metavar="K",
                   help="the most draft tokens a sequence's verify step carries; the adaptive controller drafts "
                        "fewer while drafts miss (default: 8)")
    p.add_argument("--session-ttl", type=float, default=300.0, help="default seconds a session stays pinned")
    p.add_argument("--max-pinned-fraction", type=float, default=0.7,
                   help="share of the KV pool pinned sessions may hold; the rest is working space (stateful mode)")
    p.add_argument("--max-context", "--max-model-len", dest="max_context", type=int, default=None,
                   help="cap on prompt + completion tokens")
    p.add_argument("--max-batch-tokens", "--max-num-batched-tokens", dest="max_batch_tokens", type=int,
                   default=512, help="tokens a forward step may carry")
    p.add_argument("--max-prefill-with-decode", type=int, default=None,
                   help="prefill tokens a step that also carries decodes may take (default: no cap below "
                        "--max-batch-tokens); lower keeps decoding agents' tokens coming during long prefills")
    p.add_argument("--max-sessions-per-key", type=int, default=None,
                   help="open sessions one API key may hold; one more is HTTP 429 (default: no cap)")
    p.add_argument("--request-timeout", type=float, default=None, metavar="S",
                   help="a request running longer than S seconds ends with finish_reason 'length' and "
                        "deltaserve.timed_out (its KV so far stays cached; default: no limit)")
    p.add_argument("--max-pinned-tokens-per-key", type=int, default=None, metavar="N",
                   help="tokens one API key's pinned sessions may hold; over it, that key's least recently used "
                        "pins are demoted (never another key's; default: no cap)")
    p.add_argument("--max-responses", type=int, default=1024, metavar="N",
                   help="finished turns kept by response id for previous_response_id and GET /v1/responses/{id} "
                        "(least recently used go first)")
    p.add_argument("--max-responses-per-key", type=int, default=None, metavar="N",
                   help="of those, one API key's at most; past it that key's own least recently used go, never "
                        "another key's (default: no cap)")
    p.add_argument("--max-waiting", type=int, default=None,
                   help="requests waiting for admission beyond this are refused (HTTP 429; default: no cap)")
    p.add_argument("--max-num-seqs", "--max-running", dest="max_running", type=int, default=64,
                   help="sequences a step may run at once (vLLM's --max-num-seqs); the rest wait")
    p.add_argument("--enable-prefix-caching", action="store_true",
                   help="accepted for vLLM scripts; a no-op: prefix caching is always on in stateful/prefix mode")
    p.add_argument("--generation-config", choices=("auto", "vllm"), default="auto",
                   help="auto: sampling defaults from the model's generation_config.json when a request omits "
                        "them; vllm: ignore it (OpenAI defaults)")


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The EngineConfig the flags ask for; a clear `SystemExit` for values out of range."""
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda given but no CUDA device is available")
    if args.kv_cache_gb <= 0:
        raise SystemExit(f"error: --kv-cache-gb must be positive, got {args.kv_cache_gb}")
    if not 0.0 < args.max_pinned_fraction <= 1.0:
        raise SystemExit(f"error: --max-pinned-fraction must be in (0, 1], got {args.max_pinned_fraction}")
    if args.max_batch_tokens < 1 or (args.max_prefill_with_decode is not None and args.max_prefill_with_decode < 1):
        raise SystemExit("error: --max-batch-tokens and --max-prefill-with-decode must be at least 1")
    if getattr(args, "max_running", 64) < 1:
        raise SystemExit(f"error: --max-num-seqs must be at least 1, got {args.max_running}")
    if args.session_ttl < 0:
        raise SystemExit(f"error: --session-ttl must be >= 0, got {args.session_ttl}")
    if args.max_context is not None and args.max_context < 2:
        raise SystemExit(f"error: --max-context must be at least 2, got {args.max_context}")
    if args.max_waiting is not None and args.max_waiting < 0:
        raise SystemExit(f"error: --max-waiting must be >= 0, got {args.max_waiting}")
    if args.session_store_gb is not None and args.session_store_gb <= 0:
        raise SystemExit(f"error: --session-store-gb must be positive, got {args.session_store_gb}")
    if args.session_store is not None and args.cache_mode == "stateless":
        raise SystemExit("error: --session-store needs KV reuse: --cache-mode stateful or prefix")
    if args.max_responses < 1 or (args.max_responses_per_key is not None and args.max_responses_per_key < 1):
        raise SystemExit("error: --max-responses and --max-responses-per-key must be at least 1")
    if not 1 <= args.num_speculative_tokens <= 32:
        raise SystemExit(f"error: --num-speculative-tokens must be 1..32, got {args.num_speculative_tokens}")
    if args.kv_offload_gb < 0:
        raise SystemExit(f"error: --kv-offload-gb must be >= 0, got {args.kv_offload_gb}")
    dtype = "bfloat16" if args.dtype == "auto" else args.dtype
    store_gb = args.session_store_gb
    return EngineConfig(shared_prefix=getattr(args, "shared_prefix", None), max_responses=args.max_responses, max_responses_per_key=args.max_responses_per_key,
                        session_store=args.session_store,
                        session_store_bytes=None if store_gb is None else int(store_gb * (1 << 30)),
                        kv_offload_bytes=int(args.kv_offload_gb * (1 << 30)), max_waiting=args.max_waiting,
                        max_sessions_per_key=args.max_sessions_per_key,
                        request_timeout=args.request_timeout, max_pinned_tokens_per_key=args.max_pinned_tokens_per_key,
                        dtype=getattr(torch, dtype), device=args.device,
                        kv_cache_bytes=int(args.kv_cache_gb * (1 << 30)),
                        kv_cache_dtype=getattr(args, "kv_cache_dtype", "auto"),
                        batch_invariant=getattr(args, "batch_invariant", False), cache_mode=CacheMode(args.cache_mode),
                        speculation=args.speculation == "lookup", session_ttl=args.session_ttl,
                        num_speculative_tokens=getattr(args, "num_speculative_tokens", 8),
                        max_pinned_fraction=args.max_pinned_fraction, max_context=args.max_context,
                        max_batch_tokens=args.max_batch_tokens, max_prefill_with_decode=args.max_prefill_with_decode,
                        max_running=getattr(args, "max_running", 64),
                        generation_config=getattr(args, "generation_config", "auto") == "auto")


def build_engine(args: argparse.Namespace) -> LLMEngine:
    """Check the flags, pull a known model on first use, load it."""
    from deltaserve.models.registry import ensure_pulled

    from deltaserve.cache.shared_prefix import SharedPrefixError
    from deltaserve.store.format import StoreError

    config = engine_config(args)
    ensure_pulled(args.model)
    try:
        return LLMEngine.from_model(args.model, config)
    except (StoreError, SharedPrefixError) as e:  # a store for other KV, an unusable --shared-prefix file
        raise SystemExit(f"error: {e}") from e
