"""`deltaserve bench …`: engine, roofline, kvquant, turns, spec, agents, restore, route and load benchmarks.

A top-level package beside `deltaserve`, so the runtime never imports it. Plots (matplotlib) and the agents
bench's HTTP client (httpx) come with the `[bench]` extra; the subcommands that need them say so when they run.
"""

from __future__ import annotations

from deltaserve_bench import (agents_bench, engine_bench, kvquant_bench, load_bench, restore_bench, roofline_bench,
                              route_bench, spec_bench, turns_bench)


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks (--write: a section in docs/benchmarks/; summary: BENCHMARKS.md)")
    bsub = p.add_subparsers(dest="bench", required=True)
    for module in (engine_bench, roofline_bench, kvquant_bench, turns_bench, spec_bench, agents_bench, restore_bench, route_bench,
                   load_bench):
        module.add_parser(bsub)
