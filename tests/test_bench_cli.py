"""`deltaserve bench` as a command: `--write [DIR]`, and clear errors when the benchmarks or the `[bench]` extra
(matplotlib, httpx) are not installed. Nothing is benchmarked here."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

from deltaserve_bench.common import BENCH_EXTRA, pyplot, require
from deltaserve_bench.sections import DEFAULT_DIR, add_write_argument


def _parse(*argv):
    p = argparse.ArgumentParser()
    add_write_argument(p, "KEY")
    p.add_argument("--merge", action="store_true")
    return p.parse_args(argv)


def test_write_takes_an_optional_directory():
    assert _parse().write is None
    assert _parse("--write").write == DEFAULT_DIR == Path("docs/benchmarks")
    assert _parse("--write", "--merge").write == DEFAULT_DIR
    assert _parse("--write", "/tmp/sections").write == Path("/tmp/sections")


@pytest.mark.parametrize("value", ["BENCHMARKS.md", ""])
def test_write_refuses_a_markdown_file_or_nothing(value, capsys):
    with pytest.raises(SystemExit):
        _parse("--write", value)
    assert "--write" in capsys.readouterr().err


def test_missing_extra_is_named_with_its_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    with pytest.raises(RuntimeError, match="matplotlib") as e:
        require("httpx", "matplotlib", what="deltaserve bench agents")
    assert BENCH_EXTRA in str(e.value) and "httpx" not in str(e.value)
    with pytest.raises(RuntimeError, match=r"deltaserve\[bench\]"):
        pyplot()


def test_bench_without_the_package_says_what_to_install(monkeypatch, capsys):
    from deltaserve import cli

    monkeypatch.setitem(sys.modules, "deltaserve_bench", None)
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "agents", "--workflow", "6"])
    assert "pip install 'deltaserve[bench]'" in str(e.value.code)


def test_peers_are_looked_up_in_the_checkout():
    from deltaserve_bench import agents_targets as tg

    assert (tg.ROOT / "scripts" / "setup_peers.sh").is_file()  # .peers/ sits beside scripts/
