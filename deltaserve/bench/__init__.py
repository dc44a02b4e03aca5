"""`deltaserve bench …`: engine, turns, spec (and agents) benchmarks."""

from __future__ import annotations

import argparse


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks (results go to BENCHMARKS.md)")
    bsub = p.add_subparsers(dest="bench", required=True)
    from deltaserve.bench import engine_bench

    engine_bench.add_parser(bsub)
    try:
        from deltaserve.bench import turns_bench

        turns_bench.add_parser(bsub)
    except ImportError:
        pass
    try:
        from deltaserve.bench import spec_bench

        spec_bench.add_parser(bsub)
    except ImportError:
        pass
    try:
        from deltaserve.bench import agents_bench

        agents_bench.add_parser(bsub)
    except ImportError:
        pass


__all__ = ["add_bench_parser", "argparse"]
