"""An ablation cell counts as trained only when its checkpoints reached their last iteration, and
`--run slurm`'s scripts and flags, without running a job.

Proves: plan.json records each training run's last iteration (its `--train-iters`, else its
recipe's); `check_trained` refuses a checkpoint before it (a run stopped by a signal or a time
limit), naming both iterations, and `tools/ablate.py --check-trained` exits 1 with that message;
`finish_cell` writes no done.json for such a cell; the report lists it as incomplete with the
step and iteration it reached (a `status` column in ablation.csv only then, its scores empty)
and reports it like any other once it finished; the SLURM cell script trains through
examples/slurm_train.sh, checks each run before its marker, records seconds, runs the tools under
`$PYTHON` (the generating interpreter unless the environment sets it) with NPROC_PER_NODE from
`--nproc`; `--nproc` and `--slurm-gpus-per-node` combine as documented or are refused.
Files only, no subprocess (the plan imports the trainer's flags: torch, a few seconds).

Run alone: python3 -m pytest -q tests/unit/test_ablation_resume.py
"""

import argparse
import csv
import io
import json
import runpy
from pathlib import Path

import pytest

from megatron_nvembed.ablation import cells, report
from megatron_nvembed.ablation.grid import parse_grid
from megatron_nvembed.checkpoint.store import TRACKER

ROOT = Path(__file__).resolve().parents[2]
CELL = "single-stage-no-inbatch_mean_bidirectional"


def _plan(tmp_path, extra=("--train-iters", "10")):
    from megatron_nvembed.ablation.plan import build_plan

    (tmp_path / "hf").mkdir(exist_ok=True)
    (tmp_path / "hf" / "config.json").write_text("{}")
    grid = ["pooling=mean", "mask=bidirectional", "schedule=single-stage-no-inbatch,two-stage"]
    return build_plan(
        out=tmp_path / "out",
        grid=parse_grid(grid),
        recipe="tiny",
        stage1_data=["s1.jsonl"],
        stage2_data=["s2.jsonl"],
        base_hf=str(tmp_path / "hf"),
        eval_beir=[str(tmp_path / "eval")],
        extra=list(extra),
    )


def _stopped_cell(tmp_path, reached: int) -> Path:
    """CELL of a 10-iteration plan with its training checkpoint at `reached` and an evaluation
    summary (as if evaluated by mistake); returns OUT."""
    plan = _plan(tmp_path)
    out = plan.out
    cells.write_plan(out, CELL, plan.cells[CELL].record())
    ckpt = out / "cells" / CELL / "train"
    ckpt.mkdir(parents=True)
    (ckpt / TRACKER).write_text(str(reached))
    (out / "cells" / CELL / "eval").mkdir()
    summary = {
        "categories": {"Retrieval": {"average": 0.5, "num_tasks": 1}},
        "average": {"score": 0.5},
        "tasks": {"eval": {"ndcg_at_10": 0.5}},
    }
    (out / "cells" / CELL / cells.SUMMARY).write_text(json.dumps(summary))
    return out


def test_plan_records_each_runs_last_iteration(tmp_path):
    given = _plan(tmp_path).cells
    assert [s["train_iters"] for s in given[CELL].record()["steps"][:-1]] == [10]
    two = given["two-stage_mean_bidirectional"].record()["steps"]
    assert [(s["name"], s.get("train_iters")) for s in two] == [
        ("stage1", 10),
        ("stage2", 10),
        ("eval", None),
    ]
    recipe = _plan(tmp_path, extra=()).cells["two-stage_mean_bidirectional"].train_iters
    assert recipe == {"stage1": 80, "stage2": 20}  # tiny's stage values


def test_check_trained_needs_the_last_iteration(tmp_path):
    with pytest.raises(RuntimeError, match="at iteration 0 of 4: training has not finished"):
        cells.check_trained(tmp_path / "none", 4)
    (tmp_path / TRACKER).write_text("3")
    with pytest.raises(RuntimeError, match=f"{tmp_path}: checkpoint at iteration 3 of 4"):
        cells.check_trained(tmp_path, 4)
    (tmp_path / TRACKER).write_text("4")
    assert cells.check_trained(tmp_path, 4) == 4


def test_check_trained_tool_exits_1_naming_the_iterations(tmp_path, capsys):
    out = _stopped_cell(tmp_path, 7)
    main = runpy.run_path(str(ROOT / "tools" / "ablate.py"))["main"]
    assert main(["--check-trained", str(out), CELL, "train"]) == 1
    assert "checkpoint at iteration 7 of 10" in capsys.readouterr().err
    assert main(["--finish-cell", str(out), CELL]) == 1
    assert not (out / "cells" / CELL / cells.DONE_FILE).exists()
    (out / "cells" / CELL / "train" / TRACKER).write_text("10")
    assert main(["--check-trained", str(out), CELL, "train"]) == 0


def test_stopped_cell_is_reported_incomplete_then_finished(tmp_path):
    out = _stopped_cell(tmp_path, 7)
    with pytest.raises(RuntimeError, match="iteration 7 of 10"):
        cells.finish_cell(out, CELL)
    assert cells.progress(out, CELL) == "train at iteration 7 of 10"

    assert report.collect(out) == []
    md = (out / "ablation.md").read_text()
    assert f"- {CELL}: train at iteration 7 of 10" in md and "No finished cell yet." in md
    rows = list(csv.DictReader(io.StringIO((out / "ablation.csv").read_text())))
    other = "two-stage_mean_bidirectional"  # no plan.json: never planned in this OUT
    assert [r["cell"] for r in rows] == [CELL] and other not in md
    assert rows[0]["status"] == "incomplete: train at iteration 7 of 10"
    assert rows[0]["Average"] == ""

    (out / "cells" / CELL / "train" / TRACKER).write_text("10")
    cells.step_marker(out, CELL, "train").parent.mkdir(parents=True)
    cells.step_marker(out, CELL, "train").write_text('{"seconds": 3}')
    assert cells.progress(out, CELL) == "eval not finished"
    done = cells.finish_cell(out, CELL)
    assert done["seconds"] == {"train": 3}
    assert [r["cell"] for r in report.collect(out)] == [CELL]
    header = (out / "ablation.csv").read_text().splitlines()[0]
    assert header == "cell,schedule,pooling,mask,Retrieval,Average,ndcg_at_10:eval"
    assert "Incomplete" not in (out / "ablation.md").read_text()


def test_cell_script_trains_through_slurm_train(tmp_path):
    from megatron_nvembed.ablation.slurm import SlurmOptions, write_slurm

    plan = _plan(tmp_path)
    opts = SlurmOptions(gpus_per_node=0, nproc=2, time_limit="1:00:00", signal_lead=90)
    write_slurm(plan, SlurmOptions(**{**opts.__dict__, "python": "/opt/py/bin/python"}))
    sdir = plan.out / "slurm"
    two = (sdir / "two-stage_mean_bidirectional.sbatch").read_text()
    for line in ("--gpus-per-node=0", "--time=1:00:00", "--signal=TERM@90", "--requeue"):
        assert f"#SBATCH {line}\n" in two
    assert f"#SBATCH --output={sdir / 'logs'}/%x-%j.out\n" in two and (sdir / "logs").is_dir()
    assert 'export PYTHON="${PYTHON:-/opt/py/bin/python}"\n' in two
    assert "export NPROC_PER_NODE=2\n" in two
    lines = two.splitlines()
    for run in ("stage1", "stage2"):
        train = next(i for i, ln in enumerate(lines) if f"/{run} --load" in ln)
        assert "examples/slurm_train.sh --recipe tiny" in lines[train]
        assert f'tee -a "$CELL/logs/{run}.log"' in lines[train]
        check = f"tools/ablate.py --check-trained {plan.out} two-stage_mean_bidirectional {run}"
        assert lines[train + 1].startswith('  "$PYTHON" ') and lines[train + 1].endswith(check)
        assert lines[train + 2] == f'  mark "$CELL/steps/{run}.done"'
    evaluate = next(ln for ln in lines if "evaluate_mteb.py" in ln)
    assert '"$PYTHON" -m torch.distributed.run --standalone' in evaluate
    assert lines[-1].startswith('"$PYTHON" ') and "--finish-cell" in lines[-1]
    bases = (sdir / "bases.sbatch").read_text()
    assert '"$PYTHON" ' in bases and "import-hf" in bases
    recorded = json.loads((plan.out / "cells" / CELL / cells.PLAN_FILE).read_text())
    assert recorded["steps"][0]["train_iters"] == 10


def _slurm_args(*argv: str) -> argparse.Namespace:
    parser = runpy.run_path(str(ROOT / "tools" / "ablate.py"))["_parser"]()
    return parser.parse_args(["--out", "o", "--run", "slurm", *argv])


@pytest.mark.parametrize(
    "argv, gpus, nproc",
    [
        ((), 8, 1),
        (("--nproc", "4"), 4, 4),
        (("--slurm-gpus-per-node", "2"), 2, 1),
        (("--slurm-gpus-per-node", "0", "--nproc", "3"), 0, 3),
        (("--slurm-gpus-per-node", "0"), 0, 1),
    ],
)
def test_slurm_processes_per_node_follow_nproc(argv, gpus, nproc):
    from megatron_nvembed.ablation.run import slurm_options

    opts = slurm_options(_slurm_args(*argv))
    assert (opts.gpus_per_node, opts.nproc, opts.signal_lead) == (gpus, nproc, 300)


def test_nproc_and_a_gpu_count_that_disagree_are_refused():
    from megatron_nvembed.ablation.run import slurm_options

    with pytest.raises(ValueError, match="--nproc 2 with --slurm-gpus-per-node 8"):
        slurm_options(_slurm_args("--nproc", "2", "--slurm-gpus-per-node", "8"))
