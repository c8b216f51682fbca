"""Checkpoint faults inside one training process (gloo, 1 rank; every scenario runs in one
process group, as tests/distributed/test_training.py does, since importing megatron-core
dominates a process's cost):

- a full disk (ENOSPC injected at megatron-core's shard writer) fails the save with one error
  naming the folder and the cause; the previous checkpoint stays the latest and loads;
- a re-save of an existing iteration killed between its two renames still leaves a loadable
  checkpoint, and the next save repairs the folder;
- steps whose gradients are non-finite (with a finite loss) are skipped, and no checkpoint is
  written while the last step was skipped: every saved weight is finite;
- a resume with another schedule (--lr) is refused naming the flag; with
  --override-opt-param-scheduler the flags' schedule applies;
- a crafted RNG file in a checkpoint is refused at resume and its payload never runs;
- damaged checkpoints (truncated shard or RNG file, missing metadata, edited config) are named;
- a bad record late in a file stops the run at open, before the model is built.
Flag checks (non-finite values, --load typos, --save on a file) run without a process group.
"""

from __future__ import annotations

import errno
import json
import math
import os
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from megatron_nvembed.core.launch import run_distributed
from megatron_nvembed.testing import tiny_training_config, write_synthetic_retrieval

pytestmark = pytest.mark.faults
_cfg = tiny_training_config


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return write_synthetic_retrieval(
        tmp_path_factory.mktemp("syn"), num_topics=8, train_per_topic=12
    )


def _error(kind, call, *args, **kwargs) -> str | None:
    """The message of the `kind` error `call` raises, or None when it raises none."""
    try:
        call(*args, **kwargs)
    except kind as err:
        return str(err)
    return None


@contextmanager
def _patched(owner, name: str, value):
    """`owner.name = value` for the block (a fault injected into one call path)."""
    real = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield real
    finally:
        setattr(owner, name, real)


def _tracker(root: Path) -> int:
    return int((root / "latest_checkpointed_iteration.txt").read_text())


def _all_finite(root: Path) -> bool:
    from megatron_nvembed.checkpoint.store import load_checkpoint, read_config
    from megatron_nvembed.model.build import build_model

    model = build_model(read_config(root))
    load_checkpoint(model, root)
    return all(torch.isfinite(p).all() for p in model.parameters())


def _disk_full(data, tmp: Path, out: dict) -> None:
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megatron_nvembed.checkpoint.store import CheckpointSaveError
    from megatron_nvembed.training.trainer import train

    root = tmp / "full"
    train(_cfg(data, train_iters=2, lr_decay_iters=10, save=str(root)))

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with _patched(filesystem_async, "_write_item", no_space):
        out["disk_full"] = _error(
            CheckpointSaveError,
            train,
            _cfg(data, train_iters=3, lr_decay_iters=10, save=str(root), load=str(root)),
        )
    out["disk_full_tracker"] = _tracker(root)
    out["disk_full_loads"] = _all_finite(root)
    out["disk_full_left"] = sorted(p.name for p in root.iterdir())


def _resave_killed_between_renames(data, tmp: Path, out: dict) -> None:
    from megatron_nvembed.checkpoint import store as checkpoint
    from megatron_nvembed.training.trainer import train

    root = tmp / "resave"
    train(_cfg(data, train_iters=2, save=str(root)))
    real_replace = os.replace

    def killed_after_first_rename(src, dst):
        real_replace(src, dst)
        if str(dst).endswith(checkpoint.REPLACED_SUFFIX):
            raise KeyboardInterrupt("killed between the renames (simulated)")

    with _patched(checkpoint.os, "replace", killed_after_first_rename):
        # Another --save over the same folder re-saves iteration 2.
        out["resave_killed"] = _error(
            KeyboardInterrupt, train, _cfg(data, train_iters=2, save=str(root), load=None)
        )
    out["resave_window"] = sorted(p.name for p in root.iterdir())
    out["resave_dir"] = checkpoint.iteration_dir(root, 2).name
    out["resave_loads"] = _all_finite(root)
    train(_cfg(data, train_iters=3, lr_decay_iters=6, save=str(root), load=None))
    out["resave_repaired"] = sorted(p.name for p in root.iterdir())


def _nonfinite_grads(data, tmp: Path, out: dict) -> None:
    from megatron_nvembed.loss import contrastive
    from megatron_nvembed.training.trainer import train

    root = tmp / "nonfinite"
    calls = {"n": 0}

    def nan_gradient_from_iteration_3(self, *args, **kwargs):
        calls["n"] += 1
        loss = original(self, *args, **kwargs)
        if calls["n"] >= 3:
            # Value unchanged (finite), gradient NaN: 0 * d sqrt(x)/dx at x = 0.
            loss = loss + 0.0 * torch.sqrt(loss - loss)
        return loss

    forward = nan_gradient_from_iteration_3
    with _patched(contrastive.ContrastiveLoss, "forward", forward) as original:
        result = train(_cfg(data, train_iters=4, save=str(root), save_interval=1))
    out["nonfinite_losses"] = result.losses
    out["nonfinite_skipped"] = result.skipped
    out["nonfinite_tracker"] = _tracker(root)
    out["nonfinite_saved"] = sorted(p.name for p in root.iterdir() if p.name.startswith("iter_"))
    out["nonfinite_weights_finite"] = _all_finite(root)


def _schedule_on_resume(data, tmp: Path, out: dict) -> None:
    from megatron_nvembed.training.trainer import train

    root = tmp / "schedule"
    base = {"lr_decay_iters": 8, "save": str(root)}
    train(_cfg(data, train_iters=3, **base))
    out["schedule_refused"] = _error(
        ValueError,
        train,
        _cfg(data, train_iters=4, lr=1e-4, min_lr=1e-5, load=str(root), **base),
    )
    log = tmp / "override.jsonl"
    train(
        _cfg(
            data,
            train_iters=4,
            lr=1e-4,
            min_lr=1e-5,
            load=str(root),
            override_opt_param_scheduler=True,
            log_json=str(log),
            **base,
        )
    )
    out["override_lr"] = [json.loads(x) for x in log.read_text().splitlines()][-1]["lr"]
    fresh = tmp / "fresh.jsonl"
    train(_cfg(data, train_iters=4, lr=1e-4, min_lr=1e-5, lr_decay_iters=8, log_json=str(fresh)))
    out["fresh_lr"] = [json.loads(x) for x in fresh.read_text().splitlines()][-1]["lr"]


def _crafted_rng_file(data, tmp: Path, out: dict) -> None:
    from megatron_nvembed.training.trainer import train

    root = tmp / "crafted"
    train(_cfg(data, train_iters=2, lr_decay_iters=6, save=str(root)))
    marker = tmp / "payload_ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"cpu": Payload()}, root / "iter_0000002" / "rng" / "rank_00000.pt")
    out["crafted_rng"] = _error(
        ValueError,
        train,
        _cfg(data, train_iters=3, lr_decay_iters=6, save=str(root), load=str(root)),
    )
    out["crafted_rng_ran"] = marker.exists()


def _damaged_checkpoints(data, tmp: Path, out: dict) -> None:
    """Each damage is found at resume and named (file and cause) before training goes on."""
    import shutil

    from megatron_nvembed.training.trainer import train

    good = tmp / "good"
    train(_cfg(data, train_iters=2, lr_decay_iters=6, save=str(good)))

    def resume(damage) -> str | None:
        root = tmp / damage.__name__
        shutil.copytree(good, root)
        damage(root / "iter_0000002")
        cfg = _cfg(data, train_iters=3, lr_decay_iters=6, save=str(root), load=str(root))
        return _error(ValueError, train, cfg)

    def truncated_shard(folder):
        shard = sorted(folder.glob("*.distcp"))[0]
        shard.write_bytes(shard.read_bytes()[:100])

    def missing_metadata(folder):
        (folder / ".metadata").unlink()

    def truncated_rng(folder):
        rng = folder / "rng" / "rank_00000.pt"
        rng.write_bytes(rng.read_bytes()[:50])

    def edited_num_layers(folder):
        cfg = json.loads((folder / "nvembed_config.json").read_text())
        cfg["model"]["num_layers"] += 1
        (folder / "nvembed_config.json").write_text(json.dumps(cfg))

    for damage in (truncated_shard, missing_metadata, truncated_rng, edited_num_layers):
        out[f"damaged_{damage.__name__}"] = resume(damage)
    # A layout the checkpoint's model cannot take is named with the checkpoint's config file.
    layout = {"model.parallel.tensor_model_parallel_size": 3}
    out["damaged_tp"] = _error(
        ValueError, train, _cfg(data, pretrained_checkpoint=str(good), **layout)
    )


def _bad_record_before_the_model(data, tmp: Path, out: dict) -> None:
    """A record that would be sampled late (line 90 of 96) stops the run at open, naming its
    file and line, before the model is built."""
    from megatron_nvembed.training import setup, trainer

    lines = Path(data["train"]).read_text().splitlines()
    record = json.loads(lines[89])
    record.pop("instruction")  # so the task must be a Table 6 one
    record["task"] = "MSMACRO"  # a typo of one
    lines[89] = json.dumps(record)
    bad = tmp / "train.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    built = []

    def counting_build(*args, **kwargs):
        built.append(1)
        return real(*args, **kwargs)

    with _patched(setup, "build_model", counting_build) as real:
        cfg = _cfg({**data, "train": str(bad)}, save=str(tmp / "never"))
        out["bad_record"] = _error(ValueError, trainer.train, cfg)
    out["bad_record_model_built"] = bool(built)
    out["bad_record_saved"] = (tmp / "never").exists()


_SCENARIOS = [
    _disk_full,
    _resave_killed_between_renames,
    _nonfinite_grads,
    _schedule_on_resume,
    _crafted_rng_file,
    _damaged_checkpoints,
    _bad_record_before_the_model,
]


def _run(rank, world, data, tmp):
    out: dict = {}
    for scenario in _SCENARIOS:
        folder = Path(tmp) / scenario.__name__
        folder.mkdir(parents=True, exist_ok=True)
        scenario(data, folder, out)
    (Path(tmp) / "out.json").write_text(json.dumps(out))


@pytest.fixture(scope="module")
def faults(synthetic, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    run_distributed(_run, 1, synthetic, str(root))
    return json.loads((root / "out.json").read_text())


def test_full_disk_names_the_folder_and_cause_and_keeps_the_previous_checkpoint(faults):
    """Fault: The disk fills while a checkpoint's shards are written (ENOSPC at megatron-core's shard
        writer).
    Happens: The save fails with one error naming the folder, "no space left on device" and the
        free space; exit code 3; the temporary folder is removed; the previous checkpoint stays the
        latest and loads.
    Do: Free space (older `iter_*` folders of the run can go: only the tracker's iteration is
        read), then relaunch."""
    msg = faults["disk_full"]
    assert msg is not None and "no space left on device" in msg and "iter_0000003.tmp" in msg
    assert "iteration 2 is intact" in msg
    assert faults["disk_full_tracker"] == 2 and faults["disk_full_loads"]
    assert not [n for n in faults["disk_full_left"] if n.startswith("iter_0000003")]


def test_resave_killed_between_renames_stays_loadable_and_is_repaired(faults):
    """Fault: A re-save of an existing iteration (a finished run relaunched onto another run's
        `--save`) is killed between its two renames.
    Happens: The old copy (`iter_N.replaced`) is what readers load; the next save puts it back or
        removes it.
    Do: Relaunch."""
    assert faults["resave_killed"] == "killed between the renames (simulated)"
    assert "iter_0000002" not in faults["resave_window"]
    assert "iter_0000002.replaced" in faults["resave_window"]
    assert faults["resave_dir"] == "iter_0000002.replaced" and faults["resave_loads"]
    repaired = faults["resave_repaired"]
    assert "iter_0000002" in repaired and "iter_0000003" in repaired
    assert not [name for name in repaired if name.endswith((".replaced", ".tmp"))]


def test_nonfinite_gradients_are_skipped_and_never_saved(faults):
    """Fault: A step with a finite loss and non-finite gradients.
    Happens: The step is skipped (the check rides in the step's one statistics all-reduce); no
        checkpoint is written while the last step was skipped; saved weights are finite.
    Do: Nothing for a few; after an abort (`--max-nonfinite-steps` in a row, exit 1), resume with a
        lower `--lr` and `--override-opt-param-scheduler`."""
    losses = faults["nonfinite_losses"]
    assert all(math.isfinite(v) for v in losses.values())  # the loss itself stayed finite
    assert faults["nonfinite_skipped"] == 2  # iterations 3 and 4
    assert faults["nonfinite_tracker"] == 2
    assert faults["nonfinite_saved"] == ["iter_0000001", "iter_0000002"]
    assert faults["nonfinite_weights_finite"]


def test_resume_with_another_schedule_is_refused_or_overridden(faults):
    """Fault: A new `--lr` (or schedule flag) on resume.
    Happens: Refused naming each flag and both values, unless `--override-opt-param-scheduler`,
        which applies the flags' schedule from the resumed iteration.
    Do: Pass `--override-opt-param-scheduler` when the new schedule is meant, or drop the flag."""
    msg = faults["schedule_refused"]
    assert msg is not None and "--lr 0.0001 (checkpoint: " in msg
    assert "--override-opt-param-scheduler" in msg
    # With the flag, iteration 4's learning rate is the new schedule's (as in a fresh run).
    assert faults["override_lr"] == pytest.approx(faults["fresh_lr"], rel=1e-9)


def test_crafted_rng_file_is_refused_and_runs_nothing(faults):
    """Fault: A checkpoint's RNG file is a crafted pickle that would run code.
    Happens: Refused at resume naming the file; its payload never runs (weights-only loads).
    Do: Restore the file from a copy you trust, or resume from an earlier iteration."""
    assert faults["crafted_rng"] is not None and "rank_00000.pt" in faults["crafted_rng"]
    assert not faults["crafted_rng_ran"]


@pytest.mark.parametrize("flag", ["--lr", "--min-lr", "--temperature", "--adam-eps", "--clip-grad"])
@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_nonfinite_flag_values_are_refused_naming_the_flag(synthetic, flag, value):
    """Fault: `--lr inf`, or `nan` / `inf` in any float flag.
    Happens: Refused naming the flag, before anything starts (exit 2).
    Do: Fix the flag."""
    from megatron_nvembed.training.arguments import parse_args

    args = ["--train-data", synthetic["train"], "--tokenizer", synthetic["tokenizer"]]
    with pytest.raises(ValueError, match=f"{flag} must be"):
        parse_args([*args, f"{flag}={value}"])


def test_load_typo_and_save_on_a_file_are_refused_before_training(synthetic, tmp_path):
    """Fault: `--load` that does not exist or holds no checkpoint (and is not `--save`), or `--save`
        naming a regular file.
    Happens: Refused before any process group (a typo no longer trains from iteration 0); the file
        is untouched.
    Do: Fix the path."""
    from megatron_nvembed.training.cli import main

    base = ["--train-data", synthetic["train"], "--tokenizer", synthetic["tokenizer"]]
    typo = [*base, "--load", str(tmp_path / "ckpt_typo"), "--save", str(tmp_path / "ckpt")]
    assert main([*typo, "--check-args"]) == 2
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    assert main([*base, "--save", str(a_file), "--check-args"]) == 2
    assert a_file.read_text() == "mine"
    # --load equal to --save may be new: a job's first launch.
    own = [*base, "--load", str(tmp_path / "new"), "--save", str(tmp_path / "new")]
    assert main([*own, "--check-args"]) == 0


@pytest.mark.parametrize(
    "damage, names",
    [
        ("truncated_shard", ["__0_0.distcp", "truncated"]),
        ("missing_metadata", [".metadata"]),
        ("truncated_rng", ["rank_00000.pt"]),
        ("edited_num_layers", ["iter_0000002", "nvembed_config.json"]),
    ],
)
def test_damaged_checkpoints_are_named_at_resume(faults, damage, names):
    """Fault: A truncated or missing `.distcp` shard, a missing or garbled `.metadata`, a truncated
        RNG file, an edited `nvembed_config.json` (e.g. `num_layers`).
    Happens: One error naming the file (for shards, "truncated: N bytes, the metadata needs M"),
        exit code 2, before any weight is used.
    Do: Resume from an earlier iteration (write its number into
        `latest_checkpointed_iteration.txt`) or restore the files."""
    msg = faults[f"damaged_{damage}"]
    assert msg is not None, damage
    for part in names:
        assert part in msg, (part, msg)


def test_layout_errors_quote_the_checkpoint_model(faults):
    """Fault: A layout the checkpoint's model cannot take (`--tensor-model-parallel-size 3` for 4
        heads).
    Happens: The error quotes the checkpoint's config file, not the recipe.
    Do: Choose a parallel layout the model divides into."""
    msg = faults["damaged_tp"]
    assert msg is not None and "--tensor-model-parallel-size (3)" in msg
    assert "nvembed_config.json" in msg and "good" in msg


def test_bad_record_stops_the_run_at_open_before_the_model_is_built(faults):
    """Fault: A bad record late in a training file (line 90 of 96).
    Happens: The run stops at open naming file:line and the cause, before the model is built;
        nothing is saved.
    Do: Fix or drop the record, or pass `--skip-bad-records`."""
    msg = faults["bad_record"]
    assert msg is not None and "train.jsonl:90" in msg and "MSMACRO" in msg
    assert not faults["bad_record_model_built"] and not faults["bad_record_saved"]
