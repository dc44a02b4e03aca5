"""Shared benchmark helpers: machine description, markdown tables, BENCHMARKS.md sections."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path


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


def write_section(path: str | Path, key: str, body: str) -> None:
    """Replace (or append) the section between `<!-- bench:KEY -->` markers in BENCHMARKS.md."""
    path = Path(path)
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start, end = f"<!-- bench:{key} -->", f"<!-- /bench:{key} -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
