"""`deltaserve` command line: pull, generate, serve, bench."""

from __future__ import annotations

import argparse
import sys

from deltaserve.models.registry import DEFAULT_MODEL, KNOWN_MODELS

DTYPES = ("bfloat16", "float32")


def add_model_args(p: argparse.ArgumentParser, dtype_default: str = "bfloat16") -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"known name ({', '.join(KNOWN_MODELS)}), HF directory or .gguf file")
    p.add_argument("--dtype", choices=DTYPES, default=dtype_default)
    p.add_argument("--device", default="cpu", help="cpu or cuda")


def ensure_pulled(model: str) -> None:
    """A known model that is not in the cache yet is pulled (with a progress bar) before use."""
    from deltaserve.models.registry import model_path, pull

    if model in KNOWN_MODELS and not model_path(model).exists():
        print(f"pulling {model} (first use)...", file=sys.stderr)
        pull(model)


def engine_from_args(args, **overrides):
    import torch

    from deltaserve.engine.engine import EngineConfig, LLMEngine

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda given but no CUDA device is available")
    ensure_pulled(args.model)
    fields = dict(dtype=getattr(torch, args.dtype), device=args.device)
    fields.update(overrides)
    return LLMEngine.from_model(args.model, EngineConfig(**fields))


def cmd_pull(args) -> int:
    from deltaserve.models.loader import model_dir
    from deltaserve.models.registry import pull

    names = list(KNOWN_MODELS) if args.all else [args.name]
    for name in names:
        path = pull(name, progress=not args.quiet)
        model_dir(name)  # convert once so the first serve/generate starts fast
        print(f"{name}: {path}")
    return 0


def cmd_generate(args) -> int:
    from deltaserve.engine.sampling import SamplingParams

    engine = engine_from_args(args, kv_cache_bytes=512 << 20, speculation=not args.no_speculation)
    tok = engine.tokenizer
    ids = tok.apply_chat([{"role": "user", "content": args.prompt}]) if args.chat else tok.encode(args.prompt)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=args.stop or [])
    from deltaserve.models.tokenizer import IncrementalDecoder

    dec = IncrementalDecoder(tok)
    text = ""
    for new in engine.stream(ids, params):
        text += dec.push(new)
    for s in params.stop:
        if s in text:
            text = text[: text.index(s)]
    sys.stdout.write(text + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    # OpenMP's default wait policy (spin briefly, then sleep) is left alone: a bf16 SmolLM2 decode
    # step takes ~40 ms with it and ~75 ms with OMP_WAIT_POLICY=PASSIVE. On a machine shared with
    # other busy processes, export OMP_WAIT_POLICY=PASSIVE yourself.
    ap = argparse.ArgumentParser(prog="deltaserve", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("pull", help="download and verify a known model into the cache")
    p.add_argument("name", nargs="?", default=DEFAULT_MODEL, choices=list(KNOWN_MODELS))
    p.add_argument("--all", action="store_true", help="pull every known model")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("generate", help="one-shot generation; prints only the completion")
    add_model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt as one user message through the chat template")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append")
    p.add_argument("--no-speculation", action="store_true")
    p.set_defaults(func=cmd_generate)

    from deltaserve.server.app import add_serve_arguments, run_server

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    add_serve_arguments(p)
    p.set_defaults(func=run_server)

    try:
        from deltaserve_bench import add_bench_parser
    except ImportError as e:  # installed without the benchmarks: `bench` stays listed and says what to install
        p = sub.add_parser("bench", help="benchmarks (not installed: pip install 'deltaserve[bench]')")
        p.add_argument("args", nargs=argparse.REMAINDER)
        p.set_defaults(func=lambda _args, e=e: sys.exit(
            f"error: deltaserve bench cannot run here ({e}); install it with: pip install 'deltaserve[bench]'"))
    else:
        add_bench_parser(sub)

    args = ap.parse_args(argv)
    from deltaserve.models.registry import ModelNotFound

    try:
        return args.func(args) or 0
    except ModelNotFound as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
