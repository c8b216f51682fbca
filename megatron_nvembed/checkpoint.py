"""Model checkpoints in megatron-core's distributed format, reshardable to any TP/PP layout.

Layout of a checkpoint directory (`--save` / `--load`):
```
DIR/
  latest_checkpointed_iteration.txt   written last: a save that stops midway is never "latest"
  iter_0000000/                       megatron-core dist_checkpointing (torch_dist) shards
    nvembed_config.json                the EmbeddingModelConfig (parallel layout at save time)
  tokenizer/                          tokenizer files (copied by import-hf)
```
Each iteration folder is written as `iter_XXXXXXX.tmp` and renamed once every rank finished.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_nvembed.config import EmbeddingModelConfig
from megatron_nvembed.cpu_support import cuda_allocations_on_cpu

TRACKER = "latest_checkpointed_iteration.txt"
CONFIG_FILE = "nvembed_config.json"
TOKENIZER_DIR = "tokenizer"


def iteration_dir(root: str | os.PathLike, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    """True when `path` holds a checkpoint of this project (its tracker file exists)."""
    return (Path(path) / TRACKER).is_file()


def latest_iteration(root: str | os.PathLike) -> int:
    """The iteration named by the tracker file.

    Raises:
        FileNotFoundError / ValueError: naming the missing or malformed tracker file.
    """
    tracker = Path(root) / TRACKER
    if not tracker.is_file():
        raise FileNotFoundError(f"{tracker}: not a megatron_nvembed checkpoint (no tracker file)")
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise ValueError(f"{tracker}: expected an iteration number, found {text!r}")
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


def save_checkpoint(
    model: torch.nn.Module,
    cfg: EmbeddingModelConfig,
    root: str | os.PathLike,
    iteration: int = 0,
    extra_state: dict | None = None,
) -> Path:
    """Saves this rank's model stage (all ranks call it) as iteration `iteration` under `root`.

    Args:
        model: this rank's `NVEmbedModel` stage.
        cfg: the model config (written next to the shards).
        root: checkpoint directory.
        iteration: iteration number of this save.
        extra_state: more sharded state (optimizer, scheduler, ...) merged into the save.

    Returns:
        The final iteration directory.
    """
    from megatron.core import dist_checkpointing

    from megatron_nvembed.model.lora import has_lora

    if has_lora(model):
        raise ValueError(
            "saving a model with unmerged LoRA adapters is not supported yet; call "
            "megatron_nvembed.model.lora.merge_lora(model) first"
        )
    root = Path(root)
    final = iteration_dir(root, iteration)
    tmp = final.with_name(final.name + ".tmp")
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # leftovers of an interrupted save
        tmp.mkdir()
    _barrier()
    state = model.sharded_state_dict()
    if extra_state:
        state.update(extra_state)
    with cuda_allocations_on_cpu():
        dist_checkpointing.save(state, str(tmp))
    _barrier()
    if _rank() == 0:
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        tracker_tmp = root / (TRACKER + ".tmp")
        tracker_tmp.write_text(str(iteration))
        os.replace(tracker_tmp, root / TRACKER)
    _barrier()
    return final


def load_checkpoint(
    model: torch.nn.Module, root: str | os.PathLike, iteration: int | None = None
) -> int:
    """Loads the model stage from `root` (any saved TP/PP layout; all ranks call it).

    Returns:
        The iteration loaded.

    Raises:
        FileNotFoundError / ValueError: naming the missing file or the mismatching setting.
    """
    from megatron.core import dist_checkpointing

    it = latest_iteration(root) if iteration is None else iteration
    saved = read_config(root, it)
    mine: EmbeddingModelConfig = model.model_config
    for section in ("model", "pooling"):
        a, b = getattr(saved, section).__dict__, getattr(mine, section).__dict__
        for key in (
            "vocab_size",
            "hidden_size",
            "ffn_hidden_size",
            "num_layers",
            "num_attention_heads",
            "num_query_groups",
            "kv_channels",
            "type",
            "num_latents",
            "num_heads",
            "head_dim",
            "ff_mult",
        ):
            if key in a and a[key] != b[key]:
                raise ValueError(
                    f"{iteration_dir(root, it) / CONFIG_FILE}: {section}.{key} is {a[key]!r} "
                    f"in the checkpoint but {b[key]!r} in the model being loaded"
                )
    with cuda_allocations_on_cpu():
        state = dist_checkpointing.load(model.sharded_state_dict(), str(iteration_dir(root, it)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ValueError(f"checkpoint {root}: missing {missing}, unexpected {unexpected}")
    return it
