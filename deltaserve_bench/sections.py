"""Generated benchmark sections: `--write [DIR]` puts a report in DIR/KEY.md (default docs/benchmarks/KEY.md).

The report sits between `<!-- bench:KEY ... -->` and `<!-- /bench:KEY -->`; text outside the markers is never
touched. Inside them everything is the writer's, and a rerun replaces it. So that hand-written text put between
the markers is not lost that way, the start marker records a short hash of every heading line the writer put in
the block (`headings=…`), and a block that holds any other heading is refused: `ForeignHeadingError` names the
file and the headings, and nothing is written. Measurement diaries belong in docs/perf/, not in a section.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
from pathlib import Path

DEFAULT_DIR = Path("docs/benchmarks")

_ATX = re.compile(r"^ {0,3}#{1,6}(?:[ \t]|$)")
_SETEXT_UNDERLINE = re.compile(r"^ {0,3}(?:=+|-+)[ \t]*$")


class ForeignHeadingError(RuntimeError):
    """A section's block holds headings the writer did not put there (hand-written text between its markers)."""


def add_write_argument(p: argparse.ArgumentParser, key: str) -> None:
    """`--write [DIR]` for a bench subcommand whose section key is `key`."""
    p.add_argument("--write", nargs="?", const=DEFAULT_DIR, default=None, type=_write_dir, metavar="DIR",
                   help=f"write the report as section {key} to DIR/{key}.md (DIR: {DEFAULT_DIR} when omitted), "
                        "replacing that section's previous run; without --write nothing under docs/ changes")


def _write_dir(value: str) -> Path:
    if not value:
        raise argparse.ArgumentTypeError("leave --write out to write no section")
    if value.endswith(".md"):
        raise argparse.ArgumentTypeError(
            f"{value!r}: --write takes a directory (sections go to DIR/KEY.md, by default {DEFAULT_DIR}/KEY.md); "
            "generated sections are no longer kept in BENCHMARKS.md")
    return Path(value)


IMG_HELP = ("where --write copies the plots (default: docs/img for a section under docs/benchmarks, DIR/img for one "
            "written elsewhere, so a trial run never overwrites the committed plots; '': the section links the copies "
            "in --out)")


def plot_dir(write_dir: str | Path, img_dir: str | None) -> Path | None:
    """Where a section written to `write_dir` keeps its plots: `img_dir` when given ('' : nowhere, the section links
    the copies in --out), else docs/img beside docs/benchmarks, or `write_dir`/img for a section written elsewhere."""
    if img_dir is not None:
        return Path(img_dir) if img_dir else None
    write_dir = Path(write_dir)
    return DEFAULT_DIR.parent / "img" if write_dir == DEFAULT_DIR else write_dir / "img"


def section_path(directory: str | Path, key: str) -> Path:
    return Path(directory) / f"{key}.md"


def rel_link(target: str | Path, section: Path) -> str:
    """`target` (a path from the working directory, e.g. a plot under docs/img) as a link from the section file."""
    return Path(os.path.relpath(Path(target), section.parent)).as_posix()


def headings(text: str) -> list[str]:
    """Markdown heading lines of `text`: ATX (`# …`) and setext (a line underlined with `===` or `---`)."""
    lines = text.splitlines()
    out = []
    for i, line in enumerate(lines):
        if _ATX.match(line):
            out.append(line.strip())
        elif i > 0 and lines[i - 1].strip() and not lines[i - 1].lstrip().startswith("|") \
                and _SETEXT_UNDERLINE.match(line):
            out.append(lines[i - 1].strip())
    return out


def _tag(heading: str) -> str:
    return hashlib.sha256(heading.encode()).hexdigest()[:8]


def write_section(path: str | Path, key: str, body: str) -> Path:
    """Replace the `key` block of `path` with `body` (or append the block; create the file and its folder)."""
    path = Path(path)
    text = path.read_text() if path.exists() else ""
    tags = ",".join(_tag(h) for h in headings(body))
    block = f"<!-- bench:{key}{' headings=' + tags if tags else ''} -->\n{body.rstrip()}\n<!-- /bench:{key} -->"
    start = re.compile(rf"<!-- bench:{re.escape(key)}(?: headings=([0-9a-f,]*))? -->\n?")
    m = start.search(text)
    if m is None:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + block + "\n"
    else:
        end = text.find(f"<!-- /bench:{key} -->", m.end())
        if end < 0:
            raise RuntimeError(f"{path}: section {key!r} has a start marker but no `<!-- /bench:{key} -->`")
        ours = set((m.group(1) or "").split(","))
        foreign = [h for h in headings(text[m.end():end]) if _tag(h) not in ours]
        if foreign:
            raise ForeignHeadingError(
                f"{path}: section {key!r} holds headings the bench did not write: "
                + "; ".join(repr(h) for h in foreign)
                + (" (its start marker records none: written by hand or by an older writer)" if m.group(1) is None
                   else "") + ". Rewriting it would delete that text: move it outside the markers (measurement "
                "notes go to docs/perf/) and run again. Nothing was written.")
        text = text[:m.start()] + block + text[end + len(f"<!-- /bench:{key} -->"):]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def publish(write: str | None, key: str, body: str) -> None:
    """Print a report, and with `--write [DIR]` also put it in DIR/KEY.md as section KEY."""
    if write:
        write_section(section_path(write, key), key, body)
    print(body)
