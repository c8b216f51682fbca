"""The ablation's typed steps and its `--grid` flag, without running anything.

Proves: `render_argv` turns each kind of step (train, import, mask variant, evaluation, finish)
into exactly the command line its program expects, with the launcher in front replaceable
(torchrun) and the flags alone for an in-process `main(argv)`; `plan.json`'s record of a step
carries that same command line; a bad `--grid` value is refused with a message naming the flag.
No subprocess, no torch import (about 0.1 s).

Run alone: python3 -m pytest -q tests/unit/test_ablation_steps.py
"""

import sys

import pytest

from megatron_nvembed.ablation.grid import Cell, cells, parse_grid
from megatron_nvembed.ablation.steps import (
    ROOT,
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
