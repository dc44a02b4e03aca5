<<<<<<< HEAD
"""`deltaserve bench …`: engine, turns, spec, agents, restore and route benchmarks.
=======
"""`deltaserve bench …`: engine, turns, spec, agents, restore and load benchmarks.
>>>>>>> bench-load

A top-level package beside `deltaserve`, so the runtime never imports it. Plots (matplotlib) and the agents
bench's HTTP client (httpx) come with the `[bench]` extra; the subcommands that need them say so when they run.
"""

from __future__ import annotations

<<<<<<< HEAD
from deltaserve_bench import agents_bench, engine_bench, restore_bench, route_bench, spec_bench, turns_bench
=======
from deltaserve_bench import agents_bench, engine_bench, load_bench, restore_bench, spec_bench, turns_bench
>>>>>>> bench-load


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks (--write: a section in docs/benchmarks/; summary: BENCHMARKS.md)")
    bsub = p.add_subparsers(dest="bench", required=True)
<<<<<<< HEAD
    for module in (engine_bench, turns_bench, spec_bench, agents_bench, restore_bench, route_bench):
=======
    for module in (engine_bench, turns_bench, spec_bench, agents_bench, restore_bench, load_bench):
>>>>>>> bench-load
        module.add_parser(bsub)
