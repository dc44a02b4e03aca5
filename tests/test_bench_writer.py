"""The section writer of `deltaserve bench … --write`: docs/benchmarks/KEY.md, between `<!-- bench:KEY -->` markers.

It replaces its own block on a rerun, keeps everything outside the markers, and refuses (writing nothing) to
replace a block that holds a heading it did not write: hand-written text put between the markers.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from deltaserve_bench.common import invoked_command, report_head
from deltaserve_bench.sections import ForeignHeadingError, headings, publish, rel_link, write_section

RUN1 = "## Engine (run 1)\n\n| a | b |\n|---|---|\n| 1 | 2 |\n"
RUN2 = "## Engine (run 2)\n\nFaster now.\n\n### Details\n\nmore\n"


def test_new_section_creates_the_file_and_its_folder(tmp_path):
    path = tmp_path / "docs" / "benchmarks" / "engine-m.md"
    assert write_section(path, "engine-m", RUN1) == path
    text = path.read_text()
    assert text.startswith("<!-- bench:engine-m headings=") and text.endswith("<!-- /bench:engine-m -->\n")
    assert RUN1.rstrip() in text


def test_rerun_replaces_its_own_section_and_keeps_the_text_around_it(tmp_path):
    path = tmp_path / "s.md"
    write_section(path, "k", RUN1)
    before, after = "# Notes by hand\n\nKeep me.\n\n", "\n## Also by hand\n\nKeep me too.\n"
    path.write_text(before + path.read_text() + after)
    write_section(path, "k", RUN2)  # its own heading changed: still its own
    write_section(path, "k", RUN2)
    text = path.read_text()
    assert text.startswith(before) and text.endswith(after)
    assert "run 1" not in text and text.count("## Engine (run 2)") == 1 and text.count("<!-- /bench:k -->") == 1


def test_another_key_is_appended_beside_the_first(tmp_path):
    path = tmp_path / "s.md"
    write_section(path, "agents-w6", RUN1)
    write_section(path, "agents-w6-xeon", RUN2)
    write_section(path, "agents-w6", RUN1.replace("1 | 2", "3 | 4"))
    text = path.read_text()
    assert "| 3 | 4 |" in text and "Faster now." in text and text.index("agents-w6 ") < text.index("agents-w6-xeon")


@pytest.mark.parametrize("foreign", ["## Intel Xeon whose AVX512-BF16 is slow (2026-12-02)\n\nA diary.\n",
                                     "Setext by hand\n--------------\n\ntext\n"])
def test_refuses_a_block_with_a_heading_it_did_not_write(tmp_path, foreign):
    path = tmp_path / "spec-m.md"
    write_section(path, "spec-m", RUN1)
    marker_end = path.read_text().index("-->\n") + 4
    edited = path.read_text()[:marker_end] + foreign + "\n" + path.read_text()[marker_end:]
    path.write_text(edited)
    with pytest.raises(ForeignHeadingError) as e:
        write_section(path, "spec-m", RUN2)
    assert str(path) in str(e.value) and headings(foreign)[0] in str(e.value)
    assert path.read_text() == edited  # nothing written


def test_refuses_a_block_without_a_headings_record(tmp_path):
    path = tmp_path / "s.md"
    path.write_text("<!-- bench:k -->\n## Written before headings were recorded\n<!-- /bench:k -->\n")
    with pytest.raises(ForeignHeadingError, match="records none"):
        write_section(path, "k", RUN1)


def test_headings_are_atx_and_setext_lines_not_table_rules():
    text = "# One\ntext\n  ## Two ##\n#not a heading\nThree\n===\n| a |\n|---|\n\n---\n"
    assert headings(text) == ["# One", "## Two ##", "Three"]


def test_plots_are_linked_from_the_section_file():
    assert rel_link("docs/img/agents-w6-latency.png", Path("docs/benchmarks/agents-w6.md")) == \
        "../img/agents-w6-latency.png"
    assert rel_link("bench_out/turns/t.png", Path("docs/benchmarks/turns-m.md")) == "../../bench_out/turns/t.png"


def test_the_committed_sections_can_be_rewritten(tmp_path):
    """Every generated section in the repository holds only the writer's headings: a rerun loses nothing."""
    files = sorted((Path(__file__).resolve().parent.parent / "docs" / "benchmarks").glob("*.md"))
    assert files
    for f in files:
        key, probe = f.stem, tmp_path / f.name
        assert f"<!-- bench:{key} " in f.read_text(), f
        probe.write_text(f.read_text())
        write_section(probe, key, "probe")  # raises ForeignHeadingError on hand-written headings


def test_publish_prints_always_and_writes_only_with_write(tmp_path, capsys):
    publish(None, "k", RUN1)
    assert capsys.readouterr().out.strip() == RUN1.strip() and not any(tmp_path.iterdir())
    publish(str(tmp_path), "k", RUN1)
    assert RUN1.strip() in capsys.readouterr().out
    assert RUN1.rstrip() in (tmp_path / "k.md").read_text()


def test_report_head_names_the_command_and_echoes_the_invocation(monkeypatch):
    head = report_head("Turns (m)", "deltaserve bench turns --turns 2")
    assert head.startswith("## Turns (m)\n\nMachine: ") and head.endswith("Command: `deltaserve bench turns --turns 2`\n\n")
    monkeypatch.setattr("sys.argv", ["deltaserve", "bench", "turns", "--out", "a dir"])
    assert invoked_command("turns", "fallback") == "deltaserve bench turns --out 'a dir'"
    monkeypatch.setattr("sys.argv", ["pytest", "-q"])
    assert invoked_command("turns", "fallback") == "fallback"


def test_plots_of_a_section_written_elsewhere_stay_beside_it(tmp_path):
    from deltaserve_bench.sections import DEFAULT_DIR, plot_dir

    # a trial run (--write DIR) must not overwrite the committed plots under docs/img
    assert plot_dir(DEFAULT_DIR, None) == Path("docs/img")
    assert plot_dir(tmp_path / "x", None) == tmp_path / "x" / "img"
    assert plot_dir(tmp_path / "x", "elsewhere") == Path("elsewhere")
    assert plot_dir(tmp_path / "x", "") is None  # the section links the copies in --out
