"""Entry points' `--help` and flag errors: cheap, once, and complete.

Proves, for every entry point (tools/*.py and their subcommands, examples/pretrain_nvembed.py):
- `--help` exits 0, prints one usage, and imports none of torch, transformers, megatron-core,
  mteb, datasets, sentence-transformers, faiss or numpy (what made it take seconds; the timings
  are in bench/results/cli-help-20261201.md, not asserted here);
- every flag of every parser has help text;
- `--help --recipe NAME` shows NAME's value next to each flag;
- `bash examples/pretrain_nvembed.sh --help` prints one usage without starting torchrun or
  importing torch; a bad flag or a missing input path under it is one error line, no traceback,
  exit code 2.

Run alone: python3 -m pytest -q -n 0 tests/unit/test_cli_help.py
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = {
    "torch",
    "transformers",
    "megatron",
    "mteb",
    "datasets",
    "sentence_transformers",
    "faiss",
    "numpy",
}
# What `--check-args` may not import either (it reads no data, but imports the data module).
DEEP = {"torch", "transformers", "megatron"}

ENTRY_POINTS = [
    ("tools/convert_checkpoint.py",),
    ("tools/convert_checkpoint.py", "import-hf"),
    ("tools/convert_checkpoint.py", "export-hf"),
    ("tools/convert_checkpoint.py", "merge-lora"),
    ("tools/embed.py",),
    ("tools/evaluate_mteb.py",),
    ("tools/ablate.py",),
    ("tools/prepare_data.py",),
    ("tools/prepare_data.py", "classification"),
    ("tools/prepare_data.py", "clustering"),
    ("tools/prepare_data.py", "sts"),
    ("tools/prepare_data.py", "decontaminate"),
    ("tools/mine_hard_negatives.py",),
    ("tools/merge_checkpoints.py",),
    ("examples/pretrain_nvembed.py",),
]

# Runs a script as `__main__` with the given arguments, then writes which heavy modules were
# imported and which flags were added without help text to the file named by $HELP_REPORT.
_WRAPPER = """
import argparse, json, os, runpy, sys
no_help = []
add = argparse._ActionsContainer.add_argument
def add_argument(self, *args, **kwargs):
    action = add(self, *args, **kwargs)
    if not action.help:
        no_help.append("/".join(action.option_strings) or action.dest)
    return action
argparse._ActionsContainer.add_argument = add_argument
sys.argv = sys.argv[1:]
code = 0
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as exit:
    code = exit.code
with open(os.environ["HELP_REPORT"], "w") as f:
    json.dump({"code": code, "modules": sorted(sys.modules), "no_help": no_help}, f)
"""


def _env(**extra) -> dict:
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, **extra}


def _help(tmp_path, *argv) -> tuple[str, dict]:
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-c", _WRAPPER, *argv],
        cwd=ROOT,
        env=_env(HELP_REPORT=str(report)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(report.read_text())


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=" ".join)
def test_help_is_cheap_once_and_every_flag_explained(tmp_path, entry):
    out, report = _help(tmp_path, *entry, "--help")
    assert report["code"] in (0, None)
    assert out.count("usage:") == 1, out
    heavy = sorted({m.split(".")[0] for m in report["modules"]} & HEAVY)
    assert not heavy, f"{' '.join(entry)} --help imported {heavy}"
    assert not report["no_help"], f"{' '.join(entry)}: flags without help {report['no_help']}"


def test_help_with_recipe_shows_its_values(tmp_path):
    out, _ = _help(
        tmp_path, "examples/pretrain_nvembed.py", "--help", "--recipe", "nvembed_mistral_7b_stage1"
    )
    flat = " ".join(out.split())  # argparse wraps help lines
    assert "(recipe nvembed_mistral_7b_stage1: 2e-05)" in flat  # --lr, Table 5
    assert "(recipe nvembed_mistral_7b_stage1: 128)" in flat  # --global-batch-size
    assert "(recipe nvembed_mistral_7b_stage1: on)" in flat  # --bf16
    stage2, _ = _help(
        tmp_path, "examples/pretrain_nvembed.py", "--help", "--recipe", "nvembed_mistral_7b_stage2"
    )
    assert "(recipe nvembed_mistral_7b_stage2: 1.5e-05)" in " ".join(stage2.split())


def _launcher(*args):
    env = _env(PYTHONPROFILEIMPORTTIME="1", NPROC_PER_NODE="2")
    return subprocess.run(
        ["bash", str(ROOT / "examples" / "pretrain_nvembed.sh"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _imported(stderr: str) -> set[str]:
    """Top-level module names in `-X importtime` lines ("import time: ... | name")."""
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


def test_launcher_help_prints_usage_once_without_torchrun():
    proc = _launcher("--help", "--recipe", "tiny")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("usage:") == 1
    assert "launching" not in proc.stderr  # torchrun never started
    assert not _imported(proc.stderr) & HEAVY


@pytest.mark.parametrize(
    "args, message",
    [
        (["--recipe", "tiny", "--lr", "abc"], "argument --lr: invalid float value: 'abc'"),
        (["--recipe", "tiny", "--train-data", "missing.jsonl"], "--train-data: missing.jsonl"),
        (["--recipe", "no_such_recipe"], "--recipe 'no_such_recipe' is unknown"),
    ],
)
def test_launcher_bad_input_is_one_error_and_exit_code_2(args, message):
    proc = _launcher(*args)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], errors
    assert "Traceback" not in proc.stderr and "launching" not in proc.stderr
    assert not _imported(proc.stderr) & DEEP
