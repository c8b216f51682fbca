"""Model checkpoints in megatron-core's distributed format, reshardable to any TP/PP layout.

Layout of a checkpoint directory (`--save` / `--load`):
```
DIR/
  latest_checkpointed_iteration.txt   written last: a save that stops midway is never "latest"
  iter_0000000/                       megatron-core dist_checkpointing (torch_dist) shards
    nvembed_config.json                the EmbeddingModelConfig (parallel layout at save time)
    nvembed_manifest.json              size and XXH3-128 checksum of every other file in it
  tokenizer/                          tokenizer files (copied by import-hf)
```
Each iteration folder is written as `iter_XXXXXXX.tmp` and renamed once every rank finished.
Saving an iteration that already exists (a finished run relaunched onto the same `--save`) moves
the old folder aside as `iter_XXXXXXX.replaced` before the rename and deletes it after; readers
fall back to it if a kill lands between the two renames, so there is never a moment without a
loadable checkpoint. The shards are written by each rank's own process (`streaming.writes_in_this_process`).
Each iteration folder holds `nvembed_manifest.json`, the size and checksum of every file in it
(`checkpoint.manifest`), written before the rename and checked before every load.

Over 400 lines on purpose: saving, loading and the re-save fallback share one folder protocol
(tracker, iteration folders, `.replaced`), which is easier to check in one file.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_nvembed.checkpoint.manifest import write_manifest
from megatron_nvembed.checkpoint.safety import (
    CorruptCheckpointError,
    UnsafeCheckpointError,
    verify_checkpoint_folder,
)
from megatron_nvembed.checkpoint.streaming import (
    Resolver,
    merge_in_place,
    resolving_writes,
    streaming_strategy,
    writes_in_this_process,
)
from megatron_nvembed.checkpoint.tokenizer import (  # noqa: F401 (the checkpoint's API)
    TOKENIZER_DIR,
    TOKENIZER_FILES,
    copy_tokenizer_files,
    store_tokenizer,
    tokenizer_dir,
)
from megatron_nvembed.core.config import EmbeddingModelConfig
from megatron_nvembed.core.cpu_support import cuda_allocations_on_cpu
from megatron_nvembed.utils.diskspace import is_disk_full
from megatron_nvembed.utils.fileio import resolve_inside
from megatron_nvembed.utils.locking import output_lock

TRACKER = "latest_checkpointed_iteration.txt"
_TRACKER_MAX_BYTES = 64
CONFIG_FILE = "nvembed_config.json"
REPLACED_SUFFIX = ".replaced"


class CheckpointSaveError(RuntimeError):
    """A save that could not complete (disk full, permissions, a failed peer); the message names
    the folder and the cause. The previous checkpoint, if any, is untouched."""


def _failures() -> tuple[type[BaseException], ...]:
    # torch's distributed-checkpoint errors derive from BaseException, not Exception.
    from torch.distributed.checkpoint.api import CheckpointException

    return (Exception, CheckpointException)


CHECKPOINT_FAILURES = _failures()


def _iteration_path(root: str | os.PathLike, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def iteration_dir(root: str | os.PathLike, iteration: int) -> Path:
    """The folder of iteration `iteration` under `root`: `iter_XXXXXXX`, or, while a re-save of
    that iteration is between its two renames (or was killed there), the complete old copy
    `iter_XXXXXXX.replaced`.

    Raises:
        UnsafeCheckpointError: the folder is a symbolic link leading out of `root`."""
    path = _iteration_path(root, iteration)
    if not path.exists():
        old = path.with_name(path.name + REPLACED_SUFFIX)
        if old.is_dir():
            path = old
    resolve_inside(path, root, error=UnsafeCheckpointError)  # a link out of the checkpoint
    return path


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    """True when `path` holds a checkpoint of this project (its tracker file exists)."""
    return (Path(path) / TRACKER).is_file()


def latest_iteration(root: str | os.PathLike) -> int:
    """The iteration named by the tracker file.

    Raises:
        FileNotFoundError / ValueError: naming the missing or malformed tracker file, or
            (UnsafeCheckpointError) a tracker that is a symbolic link leading out of `root`.
    """
    tracker = Path(root) / TRACKER
    if not tracker.is_file():
        raise FileNotFoundError(f"{tracker}: not a megatron_nvembed checkpoint (no tracker file)")
    resolve_inside(tracker, root, error=UnsafeCheckpointError)
    with open(tracker, "rb") as f:
        head = f.read(_TRACKER_MAX_BYTES + 1)  # a tracker holds a number: never read more
    text = head.decode("utf-8", errors="replace").strip()
    if len(head) > _TRACKER_MAX_BYTES or not (text.isascii() and text.isdigit()) or len(text) > 18:
        shown = text if len(text) <= 40 else f"{text[:20]}...{text[-10:]} ({len(head)}+ bytes)"
        raise ValueError(f"{tracker}: expected an iteration number, found {shown!r}")
    return int(text)


def read_config(root: str | os.PathLike, iteration: int | None = None) -> EmbeddingModelConfig:
    """The model config stored with a checkpoint (its parallel section is the saved layout)."""
    it = latest_iteration(root) if iteration is None else iteration
    path = iteration_dir(root, it) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing model config")
    try:
        return EmbeddingModelConfig.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from err


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


LORA_FILE = "lora.json"
OPTIMIZER_SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}


def read_lora(root: str | os.PathLike, iteration: int | None = None) -> dict | None:
    """The LoRA settings saved with a checkpoint ({"rank", "alpha", "dropout"}), or None when the
    checkpoint holds no adapters."""
    it = latest_iteration(root) if iteration is None else iteration
    path = iteration_dir(root, it) / LORA_FILE
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
        return {
            "rank": int(value["rank"]),
            "alpha": float(value["alpha"]),
            "dropout": float(value.get("dropout", 0.0)),
        }
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from err


def save_checkpoint(
    model: torch.nn.Module,
    cfg: EmbeddingModelConfig,
    root: str | os.PathLike,
    iteration: int = 0,
    extra_state: dict | None = None,
    *,
    optimizer=None,
    lora: dict | None = None,
    write_files: Callable[[Path], None] | None = None,
    values: Callable[[str], torch.Tensor] | None = None,
) -> Path:
    """Saves this rank's model stage (all ranks call it) as iteration `iteration` under `root`.

    Args:
        model: this rank's `NVEmbedModel` stage (LoRA adapters, if applied, are saved with it).
        cfg: the model config (written next to the shards).
        root: checkpoint directory.
        iteration: iteration number of this save.
        extra_state: more sharded state merged into the save.
        optimizer: a megatron-core optimizer whose state is saved reshardably
            (`fully_reshardable`: loadable at any TP/PP/DP).
        lora: {"rank", "alpha", "dropout"} when the model carries adapters (required then).
        write_files: called on every rank with the temporary iteration folder before it is
            renamed (per-rank RNG states, training state...).
        values: for a model built on the meta device (`streaming.meta_model`): each
            parameter's value, `values(name)` (state-dict name), asked for when its bytes are
            written and dropped after them, so the save holds one parameter at a time.

    Returns:
        The final iteration directory.
    """
    from megatron.core import dist_checkpointing

    from megatron_nvembed.model.lora import has_lora

    if has_lora(model) and lora is None:
        raise ValueError(
            "the model carries LoRA adapters: pass lora={rank, alpha, dropout} to save them, "
            "or merge them first (megatron_nvembed.model.lora.merge_lora)"
        )
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"{root}: the checkpoint directory is an existing file, not a folder")
    final = _iteration_path(root, iteration)
    tmp = final.with_name(final.name + ".tmp")
    old = final.with_name(final.name + REPLACED_SUFFIX)
    if _rank() == 0:
        # Leftovers are removed by the holder of the folder's lock only (the trainer holds it
        # for the whole run; taken here for other callers): never a live job's save.
        with output_lock(root, "--save"):
            _repair_and_clear(root)
            tmp.mkdir()
    _barrier()
    resolver = Resolver(model, values) if values is not None else None
    strategy = streaming_strategy() if values is not None else None
    written: dict[str, dict] = {}  # shard path -> checksum record, hashed right after writing
    try:
        with cuda_allocations_on_cpu(), writes_in_this_process(resolver, written):
            state = model.sharded_state_dict()
            if optimizer is not None:
                state["optimizer"] = optimizer.sharded_state_dict(
                    model.sharded_state_dict(), is_loading=False, metadata=OPTIMIZER_SHARDING
                )
            if extra_state:
                state.update(extra_state)
            with resolving_writes(resolver):
                dist_checkpointing.save(state, str(tmp), sharded_strategy=strategy)
        if write_files is not None:
            write_files(tmp)
    except CHECKPOINT_FAILURES as err:
        message = _save_failure(err, root, tmp)
        if _rank() == 0:  # a failed save's shards are garbage: give the space back
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointSaveError(message) from err
    records = _gather_records(written, tmp)
    if _rank() == 0:
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2))
        if has_lora(model):
            (tmp / LORA_FILE).write_text(json.dumps(lora, indent=2))
        write_manifest(tmp, records=records)  # every file; the small ones not yet hashed now
        replacing = final.exists()
        if replacing:
            os.replace(final, old)  # readers fall back to `old` until the next rename
        os.replace(tmp, final)
        tracker_tmp = root / (TRACKER + ".tmp")
        tracker_tmp.write_text(str(iteration))
        os.replace(tracker_tmp, root / TRACKER)
        if replacing:
            shutil.rmtree(old)
    _barrier()
    return final


def _gather_records(written: dict[str, dict], tmp: Path) -> dict[str, dict]:
    """The checksum records of the shards every rank wrote, by path relative to `tmp`, on rank
    0 (an empty dict elsewhere); a barrier: every rank has finished writing."""
    mine = {Path(path).relative_to(tmp).as_posix(): rec for path, rec in written.items()}
    if not dist.is_initialized():
        return mine
    parts = [None] * dist.get_world_size() if _rank() == 0 else None
    dist.gather_object(mine, parts, dst=0)
    return {k: v for part in parts or [] for k, v in part.items()}


def _repair_and_clear(root: Path) -> None:
    """The leftovers of interrupted saves in `root`: a re-save killed between its renames gets
    its complete copy back in place; unfinished `iter_*.tmp` folders (never what --load picks)
    are removed."""
    root.mkdir(parents=True, exist_ok=True)
    for left in root.glob(f"iter_*{REPLACED_SUFFIX}"):
        main = left.with_name(left.name[: -len(REPLACED_SUFFIX)])
        if main.exists():
            shutil.rmtree(left)
        else:
            os.replace(left, main)
    for left in root.glob("iter_*.tmp"):
        shutil.rmtree(left)


def first_line(err: BaseException, limit: int = 300) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else "")[:limit]


def _save_failure(err: BaseException, root: Path, tmp: Path) -> str:
    """One line for a failed save: the folder, the cause and, for a full disk, the free space."""
    causes, e = [], err
    while e is not None and len(causes) < 8:
        causes.append(e)
        e = e.__cause__ or e.__context__
    full = is_disk_full(err)
    try:
        free = shutil.disk_usage(tmp if tmp.exists() else root).free
    except OSError:
        free = None
    try:
        previous = f"iteration {latest_iteration(root)} is intact"
    except (FileNotFoundError, ValueError):
        previous = "there is no earlier checkpoint"
    cause = (
        "no space left on device"
        + (f" ({free / 2**20:.1f} MiB free on its filesystem)" if free is not None else "")
        if full
        else f"{type(causes[-1]).__name__}: {causes[-1]}"
    )
    return f"saving checkpoint {tmp.name} in {root} failed on rank {_rank()}: {cause}; {previous}"


MODEL_KEYS = (
    "vocab_size",
    "hidden_size",
    "ffn_hidden_size",
    "num_layers",
    "num_attention_heads",
    "num_query_groups",
    "kv_channels",
    "add_qkv_bias",
    "qk_layernorm",
    "type",
    "num_latents",
    "num_heads",
    "head_dim",
    "ff_mult",
)
"""The config keys (of `model` and `pooling`) a checkpoint and the model loading it must share."""


def _check_same_model(saved: EmbeddingModelConfig, mine: EmbeddingModelConfig, root, it) -> None:
    for section in ("model", "pooling"):
        a, b = getattr(saved, section).__dict__, getattr(mine, section).__dict__
        for key in MODEL_KEYS:
            if key in a and a[key] != b[key]:
                raise ValueError(
                    f"{iteration_dir(root, it) / CONFIG_FILE}: {section}.{key} is {a[key]!r} "
                    f"in the checkpoint but {b[key]!r} in the model being loaded"
                )


def load_checkpoint(
    model: torch.nn.Module,
    root: str | os.PathLike,
    iteration: int | None = None,
    *,
    optimizer=None,
    merge_adapters: bool = True,
    verified: bool = False,
) -> int:
    """Loads the model stage from `root` (any saved TP/PP layout; all ranks call it).

    A checkpoint with LoRA adapters loads into a model that has adapters of the same rank; into
    a plain model (export, embedding, a next stage's initial weights) the adapters are applied,
    loaded and merged into the base weights when `merge_adapters` (the default).

    Args:
        optimizer: also restore this megatron-core optimizer's state (any saved TP/PP/DP).
        verified: the caller already ran `verify_checkpoint_folder` on the iteration folder
            (a tool that checks all its inputs up front); otherwise it runs here, its checksum
            reads split among the ranks (all ranks call this function).

    Returns:
        The iteration loaded.

    Raises:
        FileNotFoundError / ValueError: naming the missing file or the mismatching setting.
    """
    from megatron.core import dist_checkpointing

    it = latest_iteration(root) if iteration is None else iteration
    _check_same_model(read_config(root, it), model.model_config, root, it)
    from megatron_nvembed.model.lora import apply_lora, has_lora, merge_lora

    lora = read_lora(root, it)
    merge_after = False
    if lora is not None and not has_lora(model):
        if not merge_adapters:
            raise ValueError(
                f"{iteration_dir(root, it) / LORA_FILE}: the checkpoint holds LoRA adapters "
                f"(rank {lora['rank']}) but the model being loaded has none"
            )
        apply_lora(model, lora["rank"], lora["alpha"], 0.0)
        merge_after = True
    elif lora is None and has_lora(model):
        raise ValueError(
            f"{iteration_dir(root, it)}: no LoRA adapters in the checkpoint, but the model has "
            "them; load base weights before apply_lora (--pretrained-checkpoint)"
        )
    folder = iteration_dir(root, it)
    # Before anything is unpickled: the folder holds only data (no object that runs code) and
    # every shard the metadata names is there in full.
    if not verified:
        verify_checkpoint_folder(folder, split_among_ranks=True)
    with cuda_allocations_on_cpu():
        request = model.sharded_state_dict()
        merge_in_place(request)
        if optimizer is not None:
            request["optimizer"] = optimizer.sharded_state_dict(
                model.sharded_state_dict(), is_loading=True, metadata=OPTIMIZER_SHARDING
            )
        try:
            state = dist_checkpointing.load(request, str(folder))
        except CHECKPOINT_FAILURES as err:
            raise CorruptCheckpointError(
                f"{folder}: the shards do not load into the model built from "
                f"{folder / CONFIG_FILE} ({type(err).__name__}: {first_line(err)}); the files "
                "were edited, truncated, or belong to another model"
            ) from err
        if optimizer is not None:
            optimizer.load_state_dict(state.pop("optimizer"))
        # Common (non-sharded) state of everything saved comes back too: keep what was asked.
        state = {k: v for k, v in state.items() if k in request}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ValueError(f"checkpoint {root}: missing {missing}, unexpected {unexpected}")
    if merge_after:
        merge_lora(model)
        for p in model.parameters():
            p.requires_grad_(True)
    return it
