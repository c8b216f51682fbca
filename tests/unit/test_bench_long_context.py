"""`bench/long_context.py`: a whole run at a tiny size (2 gloo processes per cell, TP=2) writes a
report with one cell per length x mode, each with the step's memory per rank (both ranks),
tokens/s and the saving against `none`; modes that need TP > 1 are refused at TP=1 before any
work (exit 2).

Run alone: pytest tests/unit/test_bench_long_context.py
"""

import importlib
import json
import os
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture
def bench(monkeypatch):
    """bench/long_context.py as a module, importable by name in the ranks it spawns too."""
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", str(BENCH_DIR) + (os.pathsep + path if path else ""))
    return importlib.import_module("long_context")


@pytest.mark.distributed
def test_long_context_bench_reports_every_cell(bench, tmp_path):
    out = tmp_path / "r.json"
    tiny = "--hidden-size 64 --ffn-hidden-size 96 --layers 1 --heads 4 --kv-heads 2 --latents 8"
    assert (
        bench.main(
            [*tiny.split(), "--lengths", "96", "--modes", "none", "sp", "--output", str(out)]
        )
        == 0
    )
    report = json.loads(out.read_text())
    cells = {(c["tokens"], c["mode"]): c for c in report["cells"]}
    assert set(cells) == {(96, "none"), (96, "sp")}
    for cell in cells.values():
        assert len(cell["step_mib_each_rank"]) == 2
        assert cell["step_mib_per_rank"] > 0 and cell["tokens_per_s"] > 0
        assert cell["saved_mib_per_rank"] > 0
    assert set(report["memory_saved_vs_none"]) == {"96/sp"}
    assert report["settings"]["tp"] == 2 and "load_average_at_start" in report["machine"]


def test_long_context_bench_refuses_sp_without_tp(bench, tmp_path):
    with pytest.raises(SystemExit) as err:
        bench.main(["--tp", "1", "--modes", "sp", "--output", str(tmp_path / "r.json")])
    assert err.value.code == 2
    assert not (tmp_path / "r.json").exists()
