"""The ablation report without matplotlib: tools/ablate.py's collection still writes ablation.md
and ablation.csv, skips ablation.png with one line naming the setup.py extra that brings
matplotlib (and that extra really lists matplotlib), removes an ablation.png of an earlier
collection, and the tool's summary line no longer claims a .png. With matplotlib the PNG is
written and nothing is said. matplotlib is hidden by setting sys.modules["matplotlib"] to None,
which makes `import matplotlib` raise ImportError as in an environment without it.

Objective axis: a cell recorded without an objective (an OUT folder of before the axis) collects
as the default objective, and a report of such cells has no objective column (the report of
before); once a cell has another objective, both tables gain the column, in grid order (built-in
objectives, then `--objective` ones by name); `finish_cell` records the objective of plan.json,
or the default for a plan.json without one.

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


def _finished_cell(out: Path, objective: str | None = None, score: float = 0.5) -> str:
    """One finished cell as tools/ablate.py leaves it: done.json and its eval/summary.json;
    `objective` None: a done.json of before the objective axis (no `objective` key)."""
    cell = CELL if objective is None else f"{CELL}_{objective}"
    cdir = out / "cells" / cell
    (cdir / "eval").mkdir(parents=True)
    summary = {
        "categories": {"Retrieval": {"average": score, "num_tasks": 1}},
        "average": {"score": score},
        "tasks": {"eval": {"ndcg_at_10": score}},
    }
    (cdir / "eval" / "summary.json").write_text(json.dumps(summary))
    done = {
        "cell": cell,
        "schedule": "single-stage-no-inbatch",
        "pooling": "mean",
        "mask": "bidirectional",
        "beir_sets": ["eval"],
    }
    if objective is not None:
        done["objective"] = objective
    (cdir / "done.json").write_text(json.dumps(done))
    return cell


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


def test_cells_without_the_objective_axis_collect_as_before(tmp_path):
    _finished_cell(tmp_path)

    rows = report.load_results(tmp_path)

    assert rows[0]["objective"] == "infonce"
    csv_lines = report.render_csv(rows).splitlines()
    assert csv_lines[0] == "cell,schedule,pooling,mask,Retrieval,Average,ndcg_at_10:eval"
    md = report.render_markdown(rows)
    assert "| Pooling | Mask | Retrieval (1) | Average | eval nDCG@10 |" in md
    assert "Objective" not in md and "objective" not in md


def test_report_gains_an_objective_column_in_grid_order(tmp_path):
    old = _finished_cell(tmp_path)  # no objective recorded: infonce
    mat = _finished_cell(tmp_path, "mat", 0.25)  # an --objective one: after the built-in ones
    homogeneous = _finished_cell(tmp_path, "homogeneous", 0.75)

    rows = report.load_results(tmp_path)

    assert [r["cell"] for r in rows] == [old, homogeneous, mat]
    csv_lines = report.render_csv(rows).splitlines()
    assert csv_lines[0] == "cell,schedule,pooling,mask,objective,Retrieval,Average,ndcg_at_10:eval"
    assert csv_lines[1] == f"{old},single-stage-no-inbatch,mean,bidirectional,infonce,0.5,0.5,0.5"
    assert csv_lines[2].startswith(f"{homogeneous},single-stage-no-inbatch,mean,bidirectional,homo")
    md = report.render_markdown(rows)
    assert "| Objective | Pooling | Mask | Retrieval (1) | Average | eval nDCG@10 |" in md
    table = [line for line in md.splitlines() if line.startswith("| ") and "Pooling" not in line]
    assert table == [
        "| infonce | mean | bidirectional | 50.00 | 50.00 | 50.00 |",
        "| homogeneous | mean | bidirectional | 75.00 | 75.00 | 75.00 |",
        "| mat | mean | bidirectional | 25.00 | 25.00 | 25.00 |",
    ]


def test_finish_cell_records_the_objective(tmp_path):
    from megatron_nvembed.ablation.cells import finish_cell

    for name, plan_objective in (("old", None), ("new", ("homogeneous", ["--batch-composition"]))):
        cdir = tmp_path / "cells" / name
        (cdir / "eval").mkdir(parents=True)
        summary = {"categories": {}, "average": {"score": 0.5}, "tasks": {}}
        (cdir / "eval" / "summary.json").write_text(json.dumps(summary))
        plan = {
            "cell": name,
            "schedule": "two-stage",
            "pooling": "eos",
            "mask": "causal",
            "recipe": "tiny",
            "beir_sets": [],
            "final_checkpoint": "/c",
            "steps": [],
        }
        if plan_objective is not None:
            plan["objective"], plan["objective_flags"] = plan_objective
        (cdir / "plan.json").write_text(json.dumps(plan))
        done = finish_cell(tmp_path, name)
        expected = plan_objective or ("infonce", [])
        assert (done["objective"], done["objective_flags"]) == expected
        assert json.loads((cdir / "done.json").read_text())["objective"] == expected[0]
