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
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_nvembed.config import EmbeddingModelConfig
from megatron_nvembed.cpu_support import cuda_allocations_on_cpu

TRACKER = "latest_checkpointed_iteration.txt"
CONFIG_FILE = "nvembed_config.json"
TOKENIZER_DIR = "tokenizer"
# The files that define a tokenizer. They travel byte for byte from the imported model through
# checkpoints to exports: a tokenizer re-saved by a newer transformers is written in a form older
# readers (NV-Embed's released code runs under transformers 4.42) cannot parse.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> int:
    """Copies the tokenizer files of folder `src` into `dst` (created), unchanged.

    Returns:
        The number of files copied (0: `src` holds no tokenizer).
    """
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    n = 0
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            n += 1
    return n


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
    final = iteration_dir(root, iteration)
    tmp = final.with_name(final.name + ".tmp")
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # leftovers of an interrupted save
        tmp.mkdir()
    _barrier()
    with cuda_allocations_on_cpu():
        state = model.sharded_state_dict()
        if optimizer is not None:
            state["optimizer"] = optimizer.sharded_state_dict(
                model.sharded_state_dict(), is_loading=False, metadata=OPTIMIZER_SHARDING
            )
        if extra_state:
            state.update(extra_state)
        dist_checkpointing.save(state, str(tmp))
    if write_files is not None:
        write_files(tmp)
    _barrier()
    if _rank() == 0:
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2))
        if has_lora(model):
            (tmp / LORA_FILE).write_text(json.dumps(lora, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        tracker_tmp = root / (TRACKER + ".tmp")
        tracker_tmp.write_text(str(iteration))
        os.replace(tracker_tmp, root / TRACKER)
    _barrier()
    return final


def load_checkpoint(
    model: torch.nn.Module,
    root: str | os.PathLike,
    iteration: int | None = None,
    *,
    optimizer=None,
    merge_adapters: bool = True,
) -> int:
    """Loads the model stage from `root` (any saved TP/PP layout; all ranks call it).

    A checkpoint with LoRA adapters loads into a model that has adapters of the same rank; into
    a plain model (export, embedding, a next stage's initial weights) the adapters are applied,
    loaded and merged into the base weights when `merge_adapters` (the default).

    Args:
        optimizer: also restore this megatron-core optimizer's state (any saved TP/PP/DP).

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
    with cuda_allocations_on_cpu():
        request = model.sharded_state_dict()
        if optimizer is not None:
            request["optimizer"] = optimizer.sharded_state_dict(
                model.sharded_state_dict(), is_loading=True, metadata=OPTIMIZER_SHARDING
            )
        state = dist_checkpointing.load(request, str(iteration_dir(root, it)))
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
