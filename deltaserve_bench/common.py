"""Shared benchmark helpers: machine description, markdown tables, the `[bench]` extra's imports."""

from __future__ import annotations

import importlib
import os
import platform
import subprocess

BENCH_EXTRA = "pip install 'deltaserve[bench]'"


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {gb:.0f} GiB, torch {torch.__version__}, {torch.get_num_threads()} threads"


def load_note() -> str:
    """The machine's 1/5/15-minute load average now, for the report (2 cores: above ~2 means contention)."""
    a, b, c = os.getloadavg()
    return f"Load average at the end of the run: {a:.1f} / {b:.1f} / {c:.1f} (1/5/15 min) on {os.cpu_count()} cores."


def git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def md_table(header: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.2f}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def require(*modules: str, what: str) -> None:
    """Import `modules` now, so a missing `[bench]` extra stops a run before its first minute, not after its last."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise RuntimeError(f"{what} cannot import {', '.join(missing)}; install the benchmarks' extra: {BENCH_EXTRA}")


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, imported on first use (matplotlib is in the `[bench]` extra)."""
    require("matplotlib", what="plotting")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def invoked_command(bench: str, fallback: str) -> str:
    """The command line that ran this bench, as `deltaserve bench BENCH …` (else `fallback`, e.g. when imported)."""
    import shlex
    import sys

    if sys.argv[1:3] == ["bench", bench]:
        return ("deltaserve bench " + " ".join([bench] + [shlex.quote(a) for a in sys.argv[3:]])).rstrip()
    return fallback


def report_head(title: str, command: str) -> str:
    """The first lines every generated report starts with: title, machine, commit, the command that reproduces it."""
    return f"## {title}\n\nMachine: {machine()}. Commit {git_rev()}.\nCommand: `{command}`\n\n"


_WORDS = (
    "agent tool call result search file read write list weather city price stock order user account invoice "
    "report summary table query database index error retry timeout budget plan step next previous value key "
    "name status open closed pending shipped delivered refund policy customer support ticket priority high low "
    "the a of to and in is was for on with as by at from that this it be are or an have not"
).split()


def chat_prompt_of_tokens(tok, n_tokens: int, seed: int) -> list[int]:
    """A chat prompt of about `n_tokens` tokens of varied English-like text (deterministic)."""
    import random

    rng = random.Random(seed)
    words = []
    ids: list[int] = []
    while len(ids) < n_tokens:
        words.extend(rng.choice(_WORDS) for _ in range(40))
        body = " ".join(words)
        ids = tok.apply_chat([{"role": "system", "content": "You are a careful assistant."},
                              {"role": "user", "content": f"Summarise these notes: {body}"}])
    return ids
