"""tools/ablate.py end to end on the synthetic retrieval task with the tiny recipe.

- A 2x2 grid (pooling {mean, latent} x mask {bidirectional, causal}, schedule
  single-stage-no-inbatch, 4 iterations, 1 process per cell): two import-hf runs (one per
  pooling; the causal bases are mask variants of them), four trainings, four evaluations.
  ablation.csv's values equal each cell's eval/summary.json; ablation.md has one row per variant
  with those values x 100; ablation.png is a PNG; the training log shows the schedule (stage-1
  settings: full fine-tuning, in-batch negatives off); no temporary file is left.
- Rerun: finished cells are skipped (done.json and summary.json untouched); a cell whose
  done.json and evaluation marker were removed redoes only its evaluation (its training step is
  kept) and gets the same scores.
- --run slurm on the same OUT with the whole grid and three objectives (infonce, homogeneous and
  one of --objective): bases.sbatch (the same bases: objectives share them), one script per
  unfinished cell, submit_all.sh; every script passes `bash -n`, trains through
  examples/slurm_train.sh (requeue on the signal's save) with its objective's flags, checks
  each run's checkpoint and runs every tool under the `$PYTHON` of this interpreter.
- Fast checks: the mask variant of a base equals import-hf's config except mask_type and leaves
  its source untouched; grid errors name the flag.

Run alone: pytest tests/functional/test_ablate.py   (2.5 to 5 minutes on 2 busy cores)
"""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_nvembed.ablation.bases import derive_mask_variant
from megatron_nvembed.ablation.cells import is_done
from megatron_nvembed.ablation.grid import MASKS, POOLINGS, SCHEDULES, cell_name, parse_grid
from megatron_nvembed.ablation.plan import build_plan, combine_data
from megatron_nvembed.ablation.steps import render_argv
from megatron_nvembed.checkpoint.store import CONFIG_FILE, iteration_dir, latest_iteration

pytest.importorskip("mteb")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[2]
CELLS = [
    f"single-stage-no-inbatch_{p}_{m}"
    for p in ("mean", "latent")
    for m in ("bidirectional", "causal")
]


def _ablate(*args, timeout=900):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "ablate.py"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    return proc


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory):
    from transformers import AutoTokenizer

    from megatron_nvembed.testing import save_tiny_hf_decoder, write_synthetic_retrieval

    tmp = tmp_path_factory.mktemp("ablate")
    data = write_synthetic_retrieval(tmp / "data")
    save_tiny_hf_decoder(tmp / "hf", AutoTokenizer.from_pretrained(data["tokenizer"]))
    out = tmp / "out"
    common = [
        "--base-hf",
        tmp / "hf",
        "--stage1-data",
        data["train"],
        "--stage2-data",
        data["train_pairs"],
        "--eval-beir",
        data["eval"],
        "--instruction",
        data["instruction"],
        "--recipe",
        "tiny",
        "--out",
        out,
    ]
    grid = ["--grid", "pooling=mean,latent", "mask=bidirectional,causal"]
    grid += ["schedule=single-stage-no-inbatch"]
    extra = ["--", "--train-iters", "4", "--lr-warmup-iters", "1"]
    proc = _ablate(*common, *grid, "--nproc", "1", *extra)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return {"out": out, "common": common, "grid": grid, "extra": extra, "stdout": proc.stdout}


def _summary(out: Path, cell: str) -> dict:
    return json.loads((out / "cells" / cell / "eval" / "summary.json").read_text())


@pytest.mark.functional
def test_grid_writes_table_csv_and_png(grid_run):
    out = grid_run["out"]
    for cell in CELLS:
        done = json.loads((out / "cells" / cell / "done.json").read_text())
        assert done["cell"] == cell and done["average"] == _summary(out, cell)["average"]["score"]
    with open(out / "ablation.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["cell"] for r in rows] == CELLS
    assert set(rows[0]) == {
        "cell",
        "schedule",
        "pooling",
        "mask",
        "Retrieval",
        "Average",
        "ndcg_at_10:eval",
    }
    md = (out / "ablation.md").read_text()
    assert "## single-stage-no-inbatch" in md
    for r in rows:
        s = _summary(out, r["cell"])
        assert float(r["Retrieval"]) == s["categories"]["Retrieval"]["average"]
        assert float(r["Average"]) == s["average"]["score"]
        assert float(r["ndcg_at_10:eval"]) == s["tasks"]["eval"]["ndcg_at_10"]
        assert 0.0 <= float(r["Average"]) <= 1.0
        pct = f"{100 * s['average']['score']:.2f}"
        assert f"| {r['pooling']} | {r['mask']} | {pct} | {pct} | {pct} |" in md
    png = (out / "ablation.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    img = matplotlib.image.imread(out / "ablation.png")
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert not list(out.rglob("*.tmp"))
    # the schedule reached the trainer: stage-1 settings (tiny: full fine-tuning), in-batch off
    log = (out / "cells" / CELLS[0] / "logs" / "train.log").read_text()
    assert "full fine-tuning" in log and "in-batch negatives off" in log
    assert "iteration      4/4" in log
    # one import per pooling; the causal bases are mask variants
    assert sorted(p.name for p in (out / "bases" / "logs").glob("*.log")) == [
        "import_latent_bidirectional.log",
        "import_mean_bidirectional.log",
    ]


@pytest.mark.functional
def test_rerun_skips_finished_cells_and_redoes_unfinished(grid_run):
    out = grid_run["out"]
    redo = CELLS[1]
    before = {
        c: ((out / "cells" / c / "done.json").stat().st_mtime_ns, _summary(out, c)) for c in CELLS
    }
    train_mtime = (out / "cells" / redo / "steps" / "train.done").stat().st_mtime_ns
    (out / "cells" / redo / "done.json").unlink()
    (out / "cells" / redo / "steps" / "eval.done").unlink()
    proc = _ablate(*grid_run["common"], *grid_run["grid"], "--nproc", "1", *grid_run["extra"])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for c in CELLS:
        if c == redo:
            continue
        assert f"== {c}: finished earlier, skipped" in proc.stdout
        assert (out / "cells" / c / "done.json").stat().st_mtime_ns == before[c][0]
    assert "train: finished earlier" in proc.stdout
    assert "pretrain_nvembed.sh" not in proc.stdout  # nothing trained again
    assert (out / "cells" / redo / "steps" / "train.done").stat().st_mtime_ns == train_mtime
    assert (out / "cells" / redo / "done.json").is_file()
    new = _summary(out, redo)
    assert new["tasks"]["eval"]["ndcg_at_10"] == before[redo][1]["tasks"]["eval"]["ndcg_at_10"]


@pytest.mark.functional
def test_slurm_writes_a_script_per_unfinished_cell(grid_run):
    out = grid_run["out"]
    objectives = ["--grid", "objective=infonce,homogeneous,mat"]
    objectives += ["--objective", "mat=--matryoshka-dims 16 8"]
    proc = _ablate(
        *grid_run["common"], *objectives, "--run", "slurm", "--slurm-nodes", "2", timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    sdir = out / "slurm"
    scripts = sorted(p.stem for p in sdir.glob("*.sbatch"))
    every = {
        cell_name(s, p, m, o)
        for s in SCHEDULES
        for p in POOLINGS
        for m in MASKS
        for o in ("infonce", "homogeneous", "mat")
    }
    expected = {c for c in every if not is_done(out, c)}
    assert set(CELLS) <= every - expected and len(every) == 72
    assert scripts == sorted([*expected, "bases"])
    submit = (sdir / "submit_all.sh").read_text()
    assert submit.count("--dependency=afterok:$BASES") == len(expected)
    mat = (sdir / f"{cell_name('two-stage', 'eos', 'causal', 'mat')}.sbatch").read_text()
    assert mat.count("--matryoshka-dims 16 8") == 2  # both training runs, not the evaluation
    assert "_causal_mat/stage2" in mat and "bases/eos_causal " in mat  # the shared base
    homogeneous = cell_name("single-stage-inbatch", "eos", "causal", "homogeneous")
    assert "--batch-composition homogeneous" in (sdir / f"{homogeneous}.sbatch").read_text()
    plain = (sdir / f"{cell_name('single-stage-inbatch', 'eos', 'causal')}.sbatch").read_text()
    assert "--batch-composition" not in plain and "--matryoshka-dims" not in plain
    for path in [*sdir.glob("*.sbatch"), sdir / "submit_all.sh"]:
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0, path
    two = (sdir / f"{cell_name('two-stage', 'eos', 'causal')}.sbatch").read_text()
    for line in ("--nodes=2", "--gpus-per-node=8", "--signal=TERM@300", "--requeue"):
        assert f"#SBATCH {line}\n" in two
    assert "#SBATCH --open-mode=append\n" in two
    # stage 1, stage 2: through slurm_train.sh (job port, GPUs, requeue), each run checked
    assert two.count("examples/slurm_train.sh --recipe") == 2 and "MASTER_PORT" not in two
    assert two.count("--check-trained") == 2 and "--finish-cell" in two
    assert f'export PYTHON="${{PYTHON:-{sys.executable}}}"' in two
    assert '"$PYTHON" -m torch.distributed.run' in two and "--stage 2" in two
    bases = (sdir / "bases.sbatch").read_text()
    assert bases.count("import-hf") == 4 and bases.count("--derive-mask") == 4
    assert not (out / "cells" / cell_name("two-stage", "eos", "causal") / "done.json").exists()


def _stored_config(checkpoint: Path) -> dict:
    """The model config file of a checkpoint's latest iteration, as stored."""
    path = iteration_dir(checkpoint, latest_iteration(checkpoint)) / CONFIG_FILE
    return json.loads(path.read_text())


@pytest.mark.functional
def test_mask_variant_matches_import_config(grid_run, tmp_path):
    out = grid_run["out"]
    src = out / "bases" / "mean_bidirectional"
    before = (src / "iter_0000000" / "nvembed_config.json").read_text()
    derive_mask_variant(src, tmp_path / "v", "causal")
    assert (src / "iter_0000000" / "nvembed_config.json").read_text() == before
    derived = _stored_config(tmp_path / "v")
    original = json.loads(before)
    assert derived["model"].pop("mask_type") == "causal"
    assert original["model"].pop("mask_type") == "bidirectional"
    assert derived == original
    # the grid's derived base is what the ablation trained from
    assert _stored_config(out / "bases" / "mean_causal")["model"]["mask_type"] == "causal"
    # --base-checkpoint: the checkpoint itself for its mask, a mask variant for the other one
    kw = dict(recipe="tiny", stage1_data=["a"], stage2_data=[], eval_beir=["e"])
    plan = build_plan(
        out=tmp_path / "o",
        grid=parse_grid(["pooling=mean", "schedule=single-stage-inbatch"]),
        base_checkpoint=str(src),
        **kw,
    )
    assert plan.base_paths["mean_bidirectional"] == str(src.resolve())
    assert plan.bases["mean_bidirectional"] == []
    assert [s.kind for s in plan.bases["mean_causal"]] == ["derive"]
    derive = plan.bases["mean_causal"][0]
    assert (derive.src, derive.dst, derive.mask) == (
        str(src.resolve()),
        str((tmp_path / "o" / "bases" / "mean_causal").resolve()),
        "causal",
    )
    with pytest.raises(ValueError, match="has 'mean' pooling; pooling \\['latent'\\] needs"):
        build_plan(
            out=tmp_path / "o",
            grid=parse_grid(["pooling=mean,latent", "schedule=single-stage-inbatch"]),
            base_checkpoint=str(src),
            **kw,
        )


def test_grid_and_data_errors(tmp_path):
    assert parse_grid(["mask=causal"])["pooling"] == list(POOLINGS)
    assert parse_grid(["pooling=latent,mean"])["pooling"] == ["mean", "latent"]
    for bad in (["pooling=cls"], ["size=1"], ["mask=causal", "mask=causal"], ["pooling"]):
        with pytest.raises(ValueError, match="--grid"):
            parse_grid(bad)
    assert combine_data(["a", "b"], ["b", "c"]) == ["a", "b", "c"]
    assert combine_data(["1", "a", "3", "b"], ["c"]) == ["0.5", "a", "1.5", "b", "1.0", "c"]
    kw = dict(out=tmp_path / "o", grid=parse_grid([]), recipe="tiny", eval_beir=["e"])
    with pytest.raises(ValueError, match="--base-hf .*no config.json"):
        build_plan(**kw, stage1_data=["a"], stage2_data=["b"], base_hf=str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="two-stage needs --stage2-data"):
        build_plan(**kw, stage1_data=["a"], stage2_data=[], base_hf=str(tmp_path))
    with pytest.raises(ValueError, match="--recipe 'nope' is unknown"):
        build_plan(
            **{**kw, "recipe": "nope"}, stage1_data=["a"], stage2_data=["b"], base_hf=str(tmp_path)
        )


def test_schedule_commands(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    plan = build_plan(
        out=tmp_path / "out",
        grid=parse_grid(["pooling=eos", "mask=causal"]),
        recipe="tiny_stage1",
        stage1_data=["0.25", "s1a.jsonl", "0.75", "s1b.jsonl"],
        stage2_data=["s2.jsonl"],
        base_hf=str(tmp_path / "hf"),
        eval_beir=[str(tmp_path / "beir")],
        tasks=["STS12"],
        nproc=2,
        extra=["--train-iters", "3"],
    )
    out = (tmp_path / "out").resolve()
    base = str(out / "bases" / "eos_causal")
    assert [s.kind for s in plan.bases["eos_causal"]] == ["import"]
    assert render_argv(plan.bases["eos_causal"][0])[-4:] == [
        "--pooling",
        "eos",
        "--mask-type",
        "causal",
    ]

    def argv(cell, i):
        return render_argv(plan.cells[cell].steps[i])

    two = "two-stage_eos_causal"
    s1, s2, ev = argv(two, 0), argv(two, 1), argv(two, 2)
    assert s1[1].endswith("examples/pretrain_nvembed.sh")
    assert s1[2:6] == ["--recipe", "tiny", "--stage", "1"]
    assert s1[s1.index("--pretrained-checkpoint") + 1] == base
    assert s1[s1.index("--train-data") + 1 : s1.index("--save")] == [
        "0.25",
        "s1a.jsonl",
        "0.75",
        "s1b.jsonl",
    ]
    assert s1[-2:] == ["--train-iters", "3"]  # extra flags last: they win
    assert s2[2:6] == ["--recipe", "tiny", "--stage", "2"]
    assert s2[s2.index("--pretrained-checkpoint") + 1] == str(out / "cells" / two / "stage1")
    assert s2[s2.index("--train-data") + 1 : s2.index("--save")] == ["s2.jsonl"]
    assert s2[s2.index("--load") + 1] == s2[s2.index("--save") + 1]
    assert ev[ev.index("--model") + 1] == str(out / "cells" / two / "stage2")
    assert ev[ev.index("--tasks") + 1] == "STS12" and "--beir-dir" in ev
    single = argv("single-stage-inbatch_eos_causal", 0)
    assert single[2:6] == ["--recipe", "tiny", "--stage", "1"]
    all_data = ["0.5", "s1a.jsonl", "1.5", "s1b.jsonl", "1.0", "s2.jsonl"]
    assert single[single.index("--train-data") + 1 : single.index("--save")] == all_data
    off = argv("single-stage-no-inbatch_eos_causal", 0)
    assert off[2:7] == ["--recipe", "tiny", "--stage", "1", "--no-in-batch-negatives"]
