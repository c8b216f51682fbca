"""merge-lora: a LoRA training checkpoint -> a plain checkpoint with the adapters folded in, and
optionally the adapters in PEFT's format.

The output folders are checked before the checkpoint is read (`check_merge_lora_paths`), written
into temporary sibling folders and swapped in only once both are written (`fileio.atomic_dir`).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from megatron_nvembed.core.logging_utils import get_logger
from megatron_nvembed.utils.fileio import atomic_dir, check_output_dir, folder_relation

logger = get_logger(__name__)


def check_merge_lora_paths(
    load_dir: str | os.PathLike,
    save_dir: str | os.PathLike,
    peft_dir: str | os.PathLike | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """The output checks of merge-lora (`fileio.check_output_dir` for `--save` and `--peft-dir`,
    the source being `--load`), run by `merge_lora_checkpoint` before it reads anything and by
    the CLI before it sets up megatron-core.

    Returns:
        `save_dir`, resolved.

    Raises:
        ValueError: see `check_output_dir`; also a `peft_dir` equal to, inside or around
            `save_dir` (each is replaced whole, so one would take the other with it).
    """
    sources = [("--load", load_dir)]
    out = check_output_dir(save_dir, "--save", sources, overwrite=overwrite)
    if peft_dir is not None:
        peft = check_output_dir(peft_dir, "--peft-dir", sources, overwrite=overwrite)
        relation = folder_relation(peft, out)
        if relation is not None:
            raise ValueError(
                f"--peft-dir {peft_dir} {relation} --save {save_dir}; each is replaced whole: "
                "choose two folders that do not hold each other"
            )
    return out


def merge_lora_checkpoint(
    load_dir: str | os.PathLike,
    save_dir: str | os.PathLike,
    peft_dir: str | os.PathLike | None = None,
    *,
    peft_base_model: str | None = None,
    peft_target: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Folds a checkpoint's LoRA adapters into its base weights and writes a plain checkpoint.

    Must run in one process with megatron-core's parallel state at TP = PP = 1 (the CLI does
    this); any saved layout works. One layer is read, merged and written at a time
    (`checkpoint.lazy.CheckpointTensors.merged`: in float32, written in the checkpoint's dtype).
    The output has the same model config (pooling head included, trained as saved) and
    tokenizer, and no optimizer state: it is what `export-hf`, `tools/embed.py` and
    `--pretrained-checkpoint` take.

    Args:
        peft_dir: also write the adapters in PEFT's format (adapter_config.json +
            adapter_model.safetensors) for the model the LoRA run started from
            (`conversion.peft_adapters.save_peft_adapters`).
        peft_base_model: with `peft_dir` (required): that base model as the adapters' users
            will load it, a hub id or a path (for target "nvembed" an `export-hf` of the
            checkpoint the LoRA run started from), recorded as `base_model_name_or_path`.
        peft_target: with `peft_dir`: "nvembed" (default: the exported NV-Embed model; the
            trained pooling head is saved with the adapters) or "mistral" (a plain transformers
            `MistralModel`, backbone only).
        overwrite: replace an existing non-empty `save_dir` / `peft_dir` whole (`--overwrite`);
            without it such a folder is refused. Neither may be, hold or lie inside `load_dir`,
            nor `peft_dir` be or lie inside `save_dir`. Both are written beside and swapped in
            once everything is written.

    Returns:
        The LoRA settings that were merged.

    Raises:
        ValueError: the checkpoint holds no adapters; `peft_dir` without `peft_base_model`;
            `peft_base_model` or `peft_target` without `peft_dir`; an unknown `peft_target`;
            an output folder refused by `check_merge_lora_paths` (before the checkpoint is read).
    """
    from megatron_nvembed.checkpoint.lazy import CheckpointTensors
    from megatron_nvembed.checkpoint.store import (
        TOKENIZER_DIR,
        read_lora,
        save_checkpoint,
        store_tokenizer,
        tokenizer_dir,
    )
    from megatron_nvembed.conversion.peft_adapters import check_peft_options, save_peft_adapters

    if peft_dir is not None:  # before the checkpoint is read
        peft_target = peft_target or "nvembed"
        check_peft_options(peft_base_model, peft_target)
    elif peft_base_model is not None or peft_target is not None:
        raise ValueError("--peft-base-model and --peft-target take effect with --peft-dir only")
    final = check_merge_lora_paths(load_dir, save_dir, peft_dir, overwrite=overwrite)
    load_dir, save_dir = Path(load_dir), Path(save_dir)
    lora = read_lora(load_dir)
    if lora is None:
        raise ValueError(f"{load_dir}: the checkpoint holds no LoRA adapters (no lora.json)")
    reader = CheckpointTensors(load_dir)
    cfg = reader.cfg
    peft_out = (
        atomic_dir(Path(peft_dir).resolve(), overwrite=overwrite, flag="--peft-dir")
        if peft_dir is not None
        else contextlib.nullcontext()
    )
    # --peft-dir is swapped in first (inner), then --save: neither before both are written.
    with atomic_dir(final, overwrite=overwrite, flag="--save") as tmp, peft_out as peft_tmp:
        if peft_tmp is not None:
            save_peft_adapters(
                _with_adapters_read(reader),
                cfg,
                peft_tmp,
                lora["rank"],
                lora["alpha"],
                lora["dropout"],
                base_model_name_or_path=peft_base_model,
                target=peft_target,
            )
        # The plain model's parameters, each merged when written (one layer's at a time).
        save_checkpoint(
            reader.plain,
            cfg,
            tmp,
            iteration=0,
            values=lambda name: reader.merged(name).to(reader.dtype),
        )
        if (load_dir / TOKENIZER_DIR).is_dir():
            store_tokenizer(tokenizer_dir(load_dir), tmp / TOKENIZER_DIR)
    count = sum(1 for n in reader.names() if n.endswith(".lora_A"))
    logger.info("merged %d adapters (rank %d) into %s", count, lora["rank"], save_dir)
    return lora


def _with_adapters_read(reader):
    """The reader's meta model with its adapters and pooling head read from the checkpoint
    (what `save_peft_adapters` takes; the backbone's base weights stay on the meta device)."""
    names = [n for n in reader.names() if n.endswith((".lora_A", ".lora_B"))]
    names += [n for n in reader.names() if n.startswith("pooling.")]
    values = reader.read(names)
    model = reader.model
    for name, value in values.items():
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        param = getattr(module, attr)
        new = torch.nn.Parameter(value, requires_grad=param.requires_grad)
        for key, item in vars(param).items():  # megatron-core's TP attributes
            setattr(new, key, item)
        setattr(module, attr, new)
    return model
