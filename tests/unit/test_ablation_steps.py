"""The ablation's typed steps, its `--grid` flag and its objective axis, without running anything.

Proves: `render_argv` turns each kind of step (train, import, mask variant, evaluation, finish,
check) into exactly the command line its program expects, with the launcher in front replaceable
(torchrun, `$PYTHON`) and the flags alone for an in-process `main(argv)`; `plan.json`'s record
of a step carries that same command line; a bad `--grid` value is refused with a message naming the flag.
Objective axis: `--objective NAME=FLAGS` items parse (shlex) or are refused naming the flag; a
grid that does not name the axis has the default objective only, with the cell names of before;
each training run of a cell gets its objective's flags through `TrainStep.extra`, before the
`--` flags, and the default objective renders exactly the command line of before; cells of every
objective share their base; plan.json records the objective; SLURM scripts carry the flags; the
built-in objectives' flags are the trainer's (they reach its config); objective flags the trainer
does not know, flags the grid sets per cell, and query-query / document-document negatives in a
run without in-batch negatives are refused before anything runs.
No subprocess; the grid and step tests import no torch (about 0.1 s), the plan tests import
`ablation.plan` (torch: a few seconds, once).

Run alone: python3 -m pytest -q tests/unit/test_ablation_steps.py
"""

import sys

import pytest

from megatron_nvembed.ablation.grid import (
    DEFAULT_OBJECTIVE,
    OBJECTIVES,
    Cell,
    cell_name,
    cells,
    order_key,
    parse_grid,
    parse_objectives,
)
from megatron_nvembed.ablation.steps import (
    ROOT,
    CheckStep,
    DeriveStep,
    EvalStep,
    FinishStep,
    ImportStep,
    TrainStep,
    render_argv,
    step_record,
)


def test_train_step_renders_the_launcher_command():
    step = TrainStep(
        name="train",
        recipe="tiny",
        stage=1,
        pretrained="/o/bases/mean_causal",
        data=("0.5", "/d/a.jsonl", "1.5", "/d/b.jsonl"),
        save="/o/cells/c/train",
        in_batch_negatives=False,
        extra=("--train-iters", "4"),
    )
    assert render_argv(step) == [
        "bash",
        str(ROOT / "examples/pretrain_nvembed.sh"),
        "--recipe",
        "tiny",
        "--stage",
        "1",
        "--no-in-batch-negatives",
        "--pretrained-checkpoint",
        "/o/bases/mean_causal",
        "--train-data",
        "0.5",
        "/d/a.jsonl",
        "1.5",
        "/d/b.jsonl",
        "--save",
        "/o/cells/c/train",
        "--load",
        "/o/cells/c/train",
        "--log-json",
        "/o/cells/c/train/log.jsonl",
        "--train-iters",  # extra flags last: they win
        "4",
    ]
    with_negatives = TrainStep("stage2", "tiny", 2, "/o/s1", ("/d/a.jsonl",), "/o/s2")
    assert "--no-in-batch-negatives" not in render_argv(with_negatives)
    assert render_argv(with_negatives)[2:6] == ["--recipe", "tiny", "--stage", "2"]


def test_tool_steps_render_each_tools_flags():
    py = sys.executable
    imp = ImportStep("import_eos_causal", "/hf", "/o/bases/eos_causal", "eos", "causal")
    assert render_argv(imp) == [
        py,
        str(ROOT / "tools/convert_checkpoint.py"),
        "import-hf",
        "--hf-dir",
        "/hf",
        "--save",
        "/o/bases/eos_causal",
        "--pooling",
        "eos",
        "--mask-type",
        "causal",
    ]
    derive = DeriveStep("derive_eos_causal", "/o/bases/eos_bidirectional", "/o/b", "causal")
    assert render_argv(derive) == [
        py,
        str(ROOT / "tools/ablate.py"),
        "--derive-mask",
        "/o/bases/eos_bidirectional",
        "/o/b",
        "causal",
    ]
    assert render_argv(FinishStep("/o", "cell")) == [
        py,
        str(ROOT / "tools/ablate.py"),
        "--finish-cell",
        "/o",
        "cell",
    ]
    check = CheckStep("/o", "cell", "stage1")
    assert render_argv(check, ["$PYTHON"]) == [
        "$PYTHON",
        str(ROOT / "tools/ablate.py"),
        "--check-trained",
        "/o",
        "cell",
        "stage1",
    ]
    assert (check.name, check.output) == ("check_stage1", "/o/cells/cell/steps")


def test_eval_step_renders_optional_flags_only_when_set():
    step = EvalStep(
        model="/o/cells/c/train",
        out="/o/cells/c/eval",
        run_name="ablation/c",
        beir_dirs=("/b/one", "/b/two"),
        tasks=("STS12",),
        instruction="",
    )
    flags = [
        "--model",
        "/o/cells/c/train",
        "--output",
        "/o/cells/c/eval",
        "--resume",
        "--name",
        "ablation/c",
        "--beir-dir",
        "/b/one",
        "/b/two",
        "--tasks",
        "STS12",
        "--instruction",
        "",  # an empty instruction is a value, not "unset"
    ]
    assert render_argv(step, program=False) == flags
    assert render_argv(step) == [sys.executable, str(ROOT / "tools/evaluate_mteb.py"), *flags]
    torchrun = ["torchrun", "--nproc_per_node", "2"]
    assert render_argv(step, torchrun) == [*torchrun, str(ROOT / "tools/evaluate_mteb.py"), *flags]
    assert render_argv(step, []) == [str(ROOT / "tools/evaluate_mteb.py"), *flags]
    bare = EvalStep(model="/m", out="/e", run_name="n", tasks=("STS12",))
    assert "--beir-dir" not in render_argv(bare) and "--instruction" not in render_argv(bare)
    assert step_record(step) == {
        "name": "eval",
        "kind": "eval",
        "argv": render_argv(step),
        "output": "/o/cells/c/eval",
    }


def test_render_refuses_what_is_not_a_step():
    with pytest.raises(TypeError, match="not an ablation step"):
        render_argv(["bash", "x.sh"])


@pytest.mark.parametrize(
    "spec, message",
    [
        (["pooling=cls"], r"--grid 'pooling=cls': pooling must be among \['eos', 'mean',"),
        (["mask=causal,sliding"], r"--grid 'mask=causal,sliding': mask must be among"),
        (["schedule="], r"--grid 'schedule=': schedule must be among"),
        (["size=1"], r"--grid 'size=1': expected AXIS=V1,V2 with AXIS in"),
        (["mask=causal", "mask=causal"], r"--grid: axis 'mask' given twice"),
    ],
)
def test_bad_grid_value_is_refused_naming_the_flag(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_grid(spec)


def test_grid_cells_follow_the_paper_order():
    grid = parse_grid(["pooling=latent,eos", "mask=causal", "schedule=two-stage"])
    assert list(cells(grid)) == [
        Cell("two-stage", "eos", "causal"),
        Cell("two-stage", "latent", "causal"),
    ]
    assert Cell("two-stage", "eos", "causal").name == "two-stage_eos_causal"
    assert Cell("two-stage", "eos", "causal").base == "eos_causal"


# --- objective axis: grid ---------------------------------------------------------------------


def test_grid_without_the_objective_axis_is_the_grid_of_before():
    grid = parse_grid(["pooling=eos", "mask=causal", "schedule=two-stage"])
    assert grid["objective"] == [DEFAULT_OBJECTIVE] == ["infonce"]
    assert OBJECTIVES[DEFAULT_OBJECTIVE] == ()
    assert [c.name for c in cells(grid)] == ["two-stage_eos_causal"]
    assert Cell("two-stage", "eos", "causal") == Cell("two-stage", "eos", "causal", "infonce")
    # every other axis not named keeps all its values, as before
    assert len(list(cells(parse_grid([])))) == 3 * 4 * 2


def test_objective_values_name_cells_and_share_bases():
    grid = parse_grid(["objective=homogeneous,infonce", "pooling=eos", "mask=causal"])
    assert grid["objective"] == ["infonce", "homogeneous"]  # the table's order
    names = [c.name for c in cells(grid)]
    assert names == [
        "two-stage_eos_causal",
        "two-stage_eos_causal_homogeneous",
        "single-stage-inbatch_eos_causal",
        "single-stage-inbatch_eos_causal_homogeneous",
        "single-stage-no-inbatch_eos_causal",
        "single-stage-no-inbatch_eos_causal_homogeneous",
    ]
    assert {c.base for c in cells(grid)} == {"eos_causal"}
    assert cell_name("two-stage", "eos", "causal", "qq-dd") == "two-stage_eos_causal_qq-dd"


def test_builtin_objectives_are_the_documented_flags():
    assert OBJECTIVES == {
        "infonce": (),
        "qq-dd": ("--query-query-negatives", "--document-document-negatives"),
        "homogeneous": ("--batch-composition", "homogeneous"),
    }


def test_objective_flag_defines_values_parsed_like_a_shell():
    objectives = parse_objectives(
        ["mat=--matryoshka-dims 64 32 --matryoshka-weights 1 0.5", "kd='--distill-weight' 0.5"]
    )
    assert list(objectives) == ["infonce", "qq-dd", "homogeneous", "mat", "kd"]
    assert objectives["mat"] == (
        "--matryoshka-dims",
        "64",
        "32",
        "--matryoshka-weights",
        "1",
        "0.5",
    )
    assert objectives["kd"] == ("--distill-weight", "0.5")
    grid = parse_grid(["objective=kd,mat,infonce"], objectives)
    assert grid["objective"] == ["infonce", "mat", "kd"]
    with pytest.raises(ValueError, match=r"--grid 'objective=mat': .*define more with --objective"):
        parse_grid(["objective=mat"])  # not defined: only the built-in ones


@pytest.mark.parametrize(
    "spec, message",
    [
        ("mat", r"--objective 'mat': expected NAME=FLAGS"),
        ("a_b=--x", r"--objective 'a_b=--x': the name must be letters"),
        ("=--x", r"--objective '=--x': the name must be"),
        ("qq-dd=--x", r"--objective 'qq-dd=--x': 'qq-dd' is a built-in objective"),
        ("mat=", r"--objective 'mat=': expected training flags after '='"),
        ("mat=64 32", r"--objective 'mat=64 32': expected training flags after '='"),
        ("mat='--x", r"--objective \"mat='--x\": No closing quotation"),
    ],
)
def test_bad_objective_is_refused_naming_the_flag(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_objectives([spec])


def test_objective_given_twice_is_refused():
    with pytest.raises(ValueError, match=r"--objective: 'mat' given twice"):
        parse_objectives(["mat=--matryoshka-dims 8", "mat=--matryoshka-dims 4"])


def test_order_key_reads_a_missing_objective_as_the_default():
    old = {"schedule": "two-stage", "pooling": "eos", "mask": "causal"}
    assert order_key(old) == order_key({**old, "objective": "infonce"})
    keys = [order_key({**old, "objective": o}) for o in ("infonce", "homogeneous", "zz", "mat")]
    assert sorted(keys) == [keys[0], keys[1], keys[3], keys[2]]  # --objective ones last, by name


# --- objective axis: plan and SLURM scripts ---------------------------------------------------

EXTRA = ("--train-iters", "3")


def _plan(tmp_path, grid, objectives=OBJECTIVES, extra=EXTRA):
    from megatron_nvembed.ablation.plan import build_plan

    hf = tmp_path / "hf"
    hf.mkdir(exist_ok=True)
    (hf / "config.json").write_text("{}")
    return build_plan(
        out=tmp_path / "out",
        grid=grid,
        recipe="tiny",
        stage1_data=["s1.jsonl"],
        stage2_data=["s2.jsonl"],
        base_hf=str(hf),
        tasks=["STS12"],
        extra=extra,
        objectives=objectives,
    )


def test_default_objective_renders_exactly_the_argv_of_before(tmp_path):
    plan = _plan(tmp_path, parse_grid(["pooling=eos", "mask=causal"]))
    out = (tmp_path / "out").resolve()
    base = str(out / "bases" / "eos_causal")
    assert list(plan.cells) == [
        "two-stage_eos_causal",
        "single-stage-inbatch_eos_causal",
        "single-stage-no-inbatch_eos_causal",
    ]
    c = out / "cells"
    both = ("s1.jsonl", "s2.jsonl")
    s1 = TrainStep(
        "stage1", "tiny", 1, base, ("s1.jsonl",), str(c / "two-stage_eos_causal" / "stage1")
    )
    before = {  # the steps as the runner built them before the axis existed
        "two-stage_eos_causal": [
            TrainStep(s1.name, s1.recipe, 1, s1.pretrained, s1.data, s1.save, extra=EXTRA),
            TrainStep(
                "stage2",
                "tiny",
                2,
                s1.save,
                ("s2.jsonl",),
                str(c / "two-stage_eos_causal" / "stage2"),
                extra=EXTRA,
            ),
        ],
        "single-stage-inbatch_eos_causal": [
            TrainStep(
                "train",
                "tiny",
                1,
                base,
                both,
                str(c / "single-stage-inbatch_eos_causal" / "train"),
                True,
                EXTRA,
            )
        ],
        "single-stage-no-inbatch_eos_causal": [
            TrainStep(
                "train",
                "tiny",
                1,
                base,
                both,
                str(c / "single-stage-no-inbatch_eos_causal" / "train"),
                False,
                EXTRA,
            )
        ],
    }
    for name, steps in before.items():
        train = [s for s in plan.cells[name].steps if isinstance(s, TrainStep)]
        assert [render_argv(s) for s in train] == [render_argv(s) for s in steps]
        record = plan.cells[name].record()
        assert record["objective"] == "infonce" and record["objective_flags"] == []


def test_objective_flags_reach_every_training_run_before_the_extra_flags(tmp_path):
    objectives = parse_objectives(["mat=--matryoshka-dims 16 8"])
    grid = parse_grid(
        [
            "pooling=eos",
            "mask=causal",
            "schedule=two-stage,single-stage-no-inbatch",
            "objective=infonce,homogeneous,mat",
        ],
        objectives,
    )
    plan = _plan(tmp_path, grid, objectives)
    assert len(plan.cells) == 6
    assert list(plan.bases) == ["eos_causal"]  # one base for every objective
    for name, cell in plan.cells.items():
        flags = objectives[cell.cell.objective]
        assert cell.base == plan.base_paths["eos_causal"]
        train = [s for s in cell.steps if isinstance(s, TrainStep)]
        assert train and all(s.extra == (*flags, *EXTRA) for s in train)
        default = plan.cells[cell_name(cell.cell.schedule, "eos", "causal")]
        for step, plain in zip(train, [s for s in default.steps if isinstance(s, TrainStep)]):
            argv = render_argv(step)
            assert argv[-len(EXTRA) - len(flags) :] == [*flags, *EXTRA]  # `--` flags win
            assert argv[: -len(EXTRA) - len(flags)] == [
                a.replace(default.cell.name, name) for a in render_argv(plain)[: -len(EXTRA)]
            ]
        evaluate = cell.steps[-1]
        assert not set(flags) & set(render_argv(evaluate))  # the evaluation has none
        record = cell.record()
        assert record["objective"] == cell.cell.objective
        assert record["objective_flags"] == list(flags)
    assert "two-stage_eos_causal_mat" in plan.cells


def test_slurm_scripts_carry_the_objective_flags(tmp_path):
    from megatron_nvembed.ablation.slurm import write_slurm

    grid = parse_grid(
        ["pooling=eos", "mask=causal", "schedule=two-stage", "objective=infonce,homogeneous"]
    )
    written = write_slurm(_plan(tmp_path, grid))
    names = sorted(p.name for p in written)
    assert names == [
        "bases.sbatch",
        "submit_all.sh",
        "two-stage_eos_causal.sbatch",
        "two-stage_eos_causal_homogeneous.sbatch",
    ]
    sdir = (tmp_path / "out" / "slurm").resolve()
    homogeneous = (sdir / "two-stage_eos_causal_homogeneous.sbatch").read_text()
    assert homogeneous.count("--batch-composition homogeneous --train-iters 3") == 2
    assert "bases/eos_causal --train-data" in homogeneous  # the shared base
    assert "--batch-composition" not in (sdir / "two-stage_eos_causal.sbatch").read_text()
    assert (sdir / "bases.sbatch").read_text().count("import-hf") == 1


def test_builtin_objective_flags_reach_the_trainer_config():
    from megatron_nvembed.training.arguments import parse_args

    qq = parse_args([*OBJECTIVES["qq-dd"], "--train-data", "x.jsonl"])
    assert qq.loss.query_query and qq.loss.document_document
    homogeneous = parse_args([*OBJECTIVES["homogeneous"], "--train-data", "x.jsonl"])
    assert homogeneous.data.batch_composition == "homogeneous"
    infonce = parse_args(["--train-data", "x.jsonl"])
    assert infonce.data.batch_composition != "homogeneous"
    assert not (infonce.loss.query_query or infonce.loss.document_document)


@pytest.mark.parametrize(
    "grid, objective, extra, message",
    [
        (
            ["schedule=single-stage-no-inbatch", "objective=qq-dd"],
            [],
            EXTRA,
            r"--grid objective=qq-dd: --query-query-negatives needs in-batch negatives, and "
            r"schedule single-stage-no-inbatch turns them off in run 'train' of cell "
            r"single-stage-no-inbatch_eos_causal_qq-dd: leave schedule single-stage-no-inbatch out",
        ),
        (
            ["schedule=two-stage", "objective=qq-dd"],
            [],
            EXTRA,
            r"--grid objective=qq-dd: --query-query-negatives needs in-batch negatives, and "
            r"stage 2 turns them off in run 'stage2' of cell two-stage_eos_causal_qq-dd",
        ),
        (
            ["schedule=single-stage-inbatch"],
            [],
            ("--document-document-negatives", "--no-in-batch-negatives"),
            r"-- FLAGS: --document-document-negatives needs in-batch negatives, and "
            r"--no-in-batch-negatives in -- FLAGS turns them off",
        ),
        (
            ["schedule=single-stage-inbatch", "objective=x"],
            ["x=--matryoshka-widths 8"],
            EXTRA,
            r"--objective x=--matryoshka-widths 8: not training flags of "
            r"examples/pretrain_nvembed.sh: \['--matryoshka-widths', '8'\]",
        ),
        (
            ["schedule=single-stage-inbatch", "objective=x"],
            ["x=--matryoshka-dims a"],
            EXTRA,
            r"--objective x=--matryoshka-dims a: argument --matryoshka-dims: invalid int value",
        ),
        (
            ["schedule=single-stage-inbatch", "objective=x"],
            ["x=--no-in-batch-negatives --train-data y.jsonl"],
            EXTRA,
            r"--objective x=.*: the grid sets --train-data, --in-batch-negatives \(the schedule "
            r"axis\) per cell, not an objective",
        ),
    ],
)
def test_objectives_that_cannot_run_are_refused_before_running(
    tmp_path, grid, objective, extra, message
):
    objectives = parse_objectives(objective)
    with pytest.raises(ValueError, match=message):
        _plan(
            tmp_path,
            parse_grid(["pooling=eos", "mask=causal", *grid], objectives),
            objectives,
            extra,
        )


def test_qq_dd_runs_with_in_batch_negatives(tmp_path):
    grid = parse_grid(
        ["pooling=eos", "mask=causal", "schedule=single-stage-inbatch", "objective=qq-dd"]
    )
    plan = _plan(tmp_path, grid)
    (train,) = (
        s
        for s in plan.cells["single-stage-inbatch_eos_causal_qq-dd"].steps
        if isinstance(s, TrainStep)
    )
    assert train.extra == (*OBJECTIVES["qq-dd"], *EXTRA)
