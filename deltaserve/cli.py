"""`deltaserve` command line: pull, generate, serve, cluster, bench."""

from __future__ import annotations

import argparse
import sys

from deltaserve.models.registry import DEFAULT_MODEL, KNOWN_MODELS


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
    from deltaserve.engine.args import build_engine
    from deltaserve.engine.sampling import SamplingParams
    from deltaserve.engine.textstream import TextStream

    engine = build_engine(args)
    tok = engine.tokenizer
    ids = tok.apply_chat([{"role": "user", "content": args.prompt}]) if args.chat else tok.encode(args.prompt)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=args.stop or [])
    text = TextStream(tok, params.stop)  # the server's detokenizer and stop strings
    for new in engine.stream(ids, params):
        sys.stdout.write(text.push(new))
        sys.stdout.flush()
        if text.stopped:
            break  # closing the stream aborts the request
    sys.stdout.write(text.finish() + "\n")
    return 0


def _run_cluster(args) -> int:
    try:
        import ray  # noqa: F401
    except ImportError as e:
        sys.exit(f"error: deltaserve cluster needs Ray Serve ({e}); install it with: pip install 'deltaserve[cluster]'")
    from deltaserve.cluster.app import run_cluster

    return run_cluster(args)


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

    from deltaserve.engine.args import add_engine_args

    p = sub.add_parser("generate", help="one-shot generation; prints only the completion")
    add_engine_args(p, kv_cache_gb=0.5)
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt as one user message through the chat template")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", help="stop string (repeatable); not included in the output")
    p.set_defaults(func=cmd_generate)

    from deltaserve.server.app import add_serve_arguments, run_server

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    add_serve_arguments(p)
    p.set_defaults(func=run_server)

    from deltaserve.cluster.app import add_cluster_arguments

    p = sub.add_parser("cluster", help="N engine replicas behind one session-affine ingress (Ray Serve; "
                                       "pip install 'deltaserve[cluster]')")
    add_cluster_arguments(p)
    p.set_defaults(func=_run_cluster)

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
