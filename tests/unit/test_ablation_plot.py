"""The ablation report without matplotlib: tools/ablate.py's collection still writes ablation.md
and ablation.csv, skips ablation.png with one line naming the setup.py extra that brings
matplotlib (and that extra really lists matplotlib), removes an ablation.png of an earlier
collection, and the tool's summary line no longer claims a .png. With matplotlib the PNG is
written and nothing is said. matplotlib is hidden by setting sys.modules["matplotlib"] to None,
which makes `import matplotlib` raise ImportError as in an environment without it.

Run alone: pytest tests/unit/test_ablation_plot.py
"""

import ast
import json
import re
import runpy
import sys
from pathlib import Path

import pytest

from megatron_nvembed.ablation import report

ROOT = Path(__file__).resolve().parents[2]
CELL = "single-stage-no-inbatch_mean_bidirectional"


def _finished_cell(out: Path) -> None:
    """One finished cell as tools/ablate.py leaves it: done.json and its eval/summary.json."""
    cdir = out / "cells" / CELL
    (cdir / "eval").mkdir(parents=True)
    summary = {
        "categories": {"Retrieval": {"average": 0.5, "num_tasks": 1}},
        "average": {"score": 0.5},
        "tasks": {"eval": {"ndcg_at_10": 0.5}},
    }
    (cdir / "eval" / "summary.json").write_text(json.dumps(summary))
    done = {
        "cell": CELL,
        "schedule": "single-stage-no-inbatch",
        "pooling": "mean",
        "mask": "bidirectional",
        "beir_sets": ["eval"],
    }
    (cdir / "done.json").write_text(json.dumps(done))


def _setup_extras() -> dict[str, list[str]]:
    """setup.py's EXTRAS literal (the extras dict before the `test` extra is added)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == [
            "EXTRAS"
        ]:
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no EXTRAS = {...} assignment")


def test_message_names_an_extra_that_brings_matplotlib():
    names = re.findall(r"\.\[(\w+)\]", report.PLOT_SKIPPED_MESSAGE)
    assert len(names) == 1, report.PLOT_SKIPPED_MESSAGE
    reqs = _setup_extras().get(names[0])
    assert reqs is not None, f"setup.py has no extra {names[0]!r}"
    assert any(re.match(r"matplotlib\b", r) for r in reqs), reqs


def test_collect_without_matplotlib_skips_the_plot_with_one_line(tmp_path, monkeypatch, capsys):
    _finished_cell(tmp_path)
    (tmp_path / "ablation.png").write_bytes(b"a plot of an earlier collection")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert not report.plotting_available()

    rows = report.collect(tmp_path)

    assert [r["cell"] for r in rows] == [CELL]
    assert capsys.readouterr().out.splitlines() == [report.PLOT_SKIPPED_MESSAGE]
    table = (tmp_path / "ablation.md").read_text()
    assert "| mean | bidirectional | 50.00 | 50.00 | 50.00 |" in table
    assert (tmp_path / "ablation.csv").read_text().splitlines()[1].startswith(CELL + ",")
    assert not (tmp_path / "ablation.png").exists()


def test_ablate_collect_without_matplotlib(tmp_path, monkeypatch, capsys):
    _finished_cell(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    main = runpy.run_path(str(ROOT / "tools" / "ablate.py"))["main"]

    assert main(["--collect", "--out", str(tmp_path)]) == 0

    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == report.PLOT_SKIPPED_MESSAGE
    assert lines[1] == f"collected 1 finished cells into {tmp_path / 'ablation.md'} (.csv)"
    assert not (tmp_path / "ablation.png").exists()


def test_collect_with_matplotlib_writes_the_png_silently(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    _finished_cell(tmp_path)

    report.collect(tmp_path)

    assert capsys.readouterr().out == ""
    assert (tmp_path / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
