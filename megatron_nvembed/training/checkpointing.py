"""Training checkpoints: model (+ LoRA adapters) and optimizer through megatron-core's
distributed checkpointing (reshardable to any TP/PP/DP), plus what exact resumption needs:

```
iter_XXXXXXX/
  (model + optimizer shards, nvembed_config.json, lora.json)   see megatron_nvembed/checkpoint/store.py
  train_state.json      iteration, scheduler, data position, skipped steps, layout, run settings
  rng/rank_XXXXX.pt     each rank's CPU / CUDA / tensor-parallel generator states
```
The RNG files are restored when the layout (TP, PP, DP) is unchanged; after a layout change
each rank re-seeds from (seed, iteration) and the log says so (dropout masks then differ from
an uninterrupted run, nothing else does).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_nvembed.checkpoint.safety import load_rng_file
from megatron_nvembed.checkpoint.store import (
    TOKENIZER_DIR,
    iteration_dir,
    load_checkpoint,
    save_checkpoint,
    store_tokenizer,
)
from megatron_nvembed.core.logging_utils import get_logger, log_rank0
from megatron_nvembed.utils.rng import RngSnapshot, capture_rng_state, restore_rng_state

logger = get_logger(__name__)
TRAIN_STATE = "train_state.json"


def _rng_file(folder: Path, rank: int) -> Path:
    return folder / "rng" / f"rank_{rank:05d}.pt"


def save_training_checkpoint(
    root,
    iteration,
    model,
    model_cfg,
    optimizer,
    scheduler,
    data,
    state: dict,
    lora: dict | None,
    tokenizer_dir=None,
) -> Path:
    """Saves everything a resume needs (all ranks call it). Written to a temporary folder and
    renamed; the tracker file moves last, so an interrupted save is never what `--load` picks.

    `tokenizer_dir`: the tokenizer the run reads; its files are copied unchanged (never
    re-saved) into `root/tokenizer/` once, so exports carry the imported model's own files."""
    rank = dist.get_rank()
    rng = capture_rng_state()

    def write_files(tmp: Path) -> None:
        path = _rng_file(tmp, rank)
        path.parent.mkdir(exist_ok=True)
        torch.save({"cpu": rng.cpu, "cuda": rng.cuda, "tracker": rng.tracker}, path)
        if rank == 0:
            body = dict(state)
            body["iteration"] = iteration
            body["scheduler"] = scheduler.state_dict()
            body["data"] = data.state_dict()
            (tmp / TRAIN_STATE).write_text(json.dumps(body, indent=2))
            if tokenizer_dir is not None and not (Path(root) / TOKENIZER_DIR).exists():
                tok_tmp = Path(root) / (TOKENIZER_DIR + ".tmp")
                shutil.rmtree(tok_tmp, ignore_errors=True)
                store_tokenizer(tokenizer_dir, tok_tmp)
                os.replace(tok_tmp, Path(root) / TOKENIZER_DIR)

    return save_checkpoint(
        model,
        model_cfg,
        root,
        iteration,
        optimizer=optimizer,
        lora=lora,
        write_files=write_files,
    )


def read_train_state(root, iteration: int) -> dict:
    """`train_state.json` of checkpoint `iteration` under `root`.

    Raises:
        FileNotFoundError: not a training checkpoint; ValueError: malformed (naming the file).
    """
    path = iteration_dir(root, iteration) / TRAIN_STATE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: not a training checkpoint (no train_state.json); use it as "
            "--pretrained-checkpoint to start a new run from its weights"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: {err}") from err


def check_schedule(root, state: dict, optimizer) -> None:
    """Refuses a resume whose schedule flags differ from the checkpoint's schedule.

    A resume continues the checkpoint's learning-rate and weight-decay schedule (megatron-core's
    scheduler state). Flags that would change it (a lower `--lr` after a divergence, a longer
    `--train-iters` moving the decay end) take effect only with `--override-opt-param-scheduler`
    (then from the resumed iteration on, as Megatron-LM's flag of that name); without it they
    are refused here, before the model is built, instead of being silently ignored.

    Args:
        root: the `--load` folder (named in the error).
        state: its `train_state.json`.
        optimizer: the run's `OptimizerConfig`.

    Raises:
        ValueError: naming each differing flag with both values.
    """
    if optimizer.override_opt_param_scheduler:
        return
    saved = state.get("scheduler", {})
    diffs = [
        f"{flag} {value} (checkpoint: {saved[key]})"
        for key, (flag, value) in optimizer.schedule().items()
        if key in saved and saved[key] != value
    ]
    if diffs:
        raise ValueError(
            f"--load {root}: iteration {state['iteration']} was trained with another schedule: "
            + "; ".join(diffs)
            + ". A resume keeps the checkpoint's schedule: pass --override-opt-param-scheduler "
            "to apply the flags' schedule from there on, or give the checkpoint's values."
        )


def load_training_checkpoint(start, model, optimizer, scheduler, data, layout: dict, seed: int):
    """Restores model, optimizer, scheduler, data position and (same layout) RNG states from a
    resume's `StartingPoint` (`training/start.py`: its folder, iteration and train state).

    Returns:
        The saved train_state dict (iteration, skipped steps, ...).
    """
    root, state = start.path, start.train_state
    it = load_checkpoint(model, root, start.iteration, optimizer=optimizer, merge_adapters=False)
    if it != state["iteration"]:
        raise ValueError(
            f"{root}: tracker says iteration {it}, train_state.json {state['iteration']}"
        )
    if scheduler.override_opt_param_scheduler:
        # megatron-core keeps each parameter group's own max_lr / min_lr, restored with the
        # optimizer state; the schedule of the flags needs them too.
        for group in optimizer.param_groups:
            for key in ("max_lr", "min_lr"):
                if key in group:
                    group[key] = getattr(scheduler, key)
    scheduler.load_state_dict(state["scheduler"])
    data.load_state_dict(state["data"])
    rng_path = _rng_file(iteration_dir(root, it), dist.get_rank())
    if state.get("layout") == layout and rng_path.is_file():
        saved = load_rng_file(rng_path)  # tensors only: a crafted file cannot run code
        restore_rng_state(RngSnapshot(saved["cpu"], saved["cuda"], saved["tracker"]))
        log_rank0(logger, "resumed at iteration %d with every rank's RNG state", it)
    else:
        from megatron_nvembed.core.cpu_support import model_parallel_seed

        tp_rank = model.pg_collection.tp.rank()
        model_parallel_seed(seed + 7919 * it, tp_rank=tp_rank)
        log_rank0(
            logger,
            "resumed at iteration %d with a different layout (saved %s, now %s): generators "
            "re-seeded from (seed, iteration); dropout masks differ from an uninterrupted run",
            it,
            state.get("layout"),
            layout,
        )
    return state
