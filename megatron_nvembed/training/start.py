"""Where a training run starts: resolved once, before anything is built, and passed down.

`resolve_start(cfg)` reads the checkpoint folders once (the tracker, the saved model config,
LoRA settings and, for a resume, `train_state.json`) and returns a `StartingPoint`;
`model_config(cfg, start)` is the model the run trains: the checkpoint's architecture and query
template with the run-time options of the flags, or the recipe's model from scratch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from megatron_nvembed.checkpoint.store import (
    CONFIG_FILE,
    is_checkpoint_dir,
    iteration_dir,
    latest_iteration,
    read_config,
    read_lora,
    tokenizer_dir,
)
from megatron_nvembed.core.config import EmbeddingModelConfig
from megatron_nvembed.core.cpu_support import cpu_mode
from megatron_nvembed.core.logging_utils import get_logger, log_rank0
from megatron_nvembed.training.checkpointing import check_schedule, read_train_state
from megatron_nvembed.training.config import TrainingConfig
from megatron_nvembed.utils.options import option_of

logger = get_logger(__name__)


@dataclass(frozen=True)
class StartingPoint:
    """What a run starts from (read once from disk by `resolve_start`)."""

    kind: Literal["scratch", "pretrained", "resume"]
    """New weights, `--pretrained-checkpoint`'s weights, or `--load`'s training state."""
    path: Path | None = None
    """The checkpoint folder (`--load` when resuming, else `--pretrained-checkpoint`)."""
    iteration: int | None = None
    """That checkpoint's iteration (its tracker file, read once)."""
    saved_model: EmbeddingModelConfig | None = None
    """The model config saved with that iteration."""
    lora: dict | None = None
    """The checkpoint's LoRA settings ({"rank", "alpha", "dropout"}), None without adapters."""
    train_state: dict | None = None
    """A resume's `train_state.json` (iteration, schedule, data position, layout)."""
    own_save: bool = False
    """`--load` is `--save`: a job relaunched on its own checkpoints."""

    @property
    def resuming(self) -> bool:
        return self.kind == "resume"

    @property
    def config_file(self) -> Path | None:
        """The saved model config's path (named in errors about the checkpoint's model)."""
        return None if self.path is None else iteration_dir(self.path, self.iteration) / CONFIG_FILE

    def tokenizer_dir(self, tokenizer: str | None) -> Path:
        """`--tokenizer`, else the tokenizer stored with the starting checkpoint.

        Raises:
            ValueError / FileNotFoundError: naming `--tokenizer`.
        """
        if tokenizer is None and self.path is not None:
            return tokenizer_dir(self.path)  # inside the checkpoint, its files as written
        path = tokenizer
        if path is None:
            raise ValueError(
                "no tokenizer: pass --tokenizer DIR, or --pretrained-checkpoint from import-hf "
                "(which stores one)"
            )
        if not Path(path).is_dir():
            raise FileNotFoundError(f"{path}: tokenizer directory not found (--tokenizer)")
        return Path(path)


def resolve_start(cfg: TrainingConfig) -> StartingPoint:
    """The run's `StartingPoint`, every file read once.

    Raises:
        FileNotFoundError: `--load` holds no checkpoint and is not `--save`.
        ValueError: the schedule flags differ from the checkpoint's (`check_schedule`), or a
            checkpoint file is malformed (naming it).
    """
    ck = cfg.checkpoint
    own_save = bool(ck.load and ck.save) and Path(ck.load).resolve() == Path(ck.save).resolve()
    if ck.load and is_checkpoint_dir(ck.load):
        path = Path(ck.load)
        it = latest_iteration(path)
        state = read_train_state(path, it)
        check_schedule(path, state, cfg.optimizer)
        return StartingPoint(
            "resume", path, it, read_config(path, it), read_lora(path, it), state, own_save
        )
    if ck.load and not own_save:
        raise FileNotFoundError(
            f"--load {ck.load}: holds no checkpoint (no latest_checkpointed_iteration.txt); "
            "only a --load equal to --save may be empty (the run then starts at iteration 0)"
        )
    if ck.load:
        log_rank0(logger, "--load %s holds no checkpoint yet: starting at iteration 0", ck.load)
    if ck.pretrained_checkpoint:
        path = Path(ck.pretrained_checkpoint)
        it = latest_iteration(path)
        return StartingPoint(
            "pretrained", path, it, read_config(path, it), read_lora(path, it), own_save=own_save
        )
    return StartingPoint("scratch", own_save=own_save)


def _runtime_options(mine: EmbeddingModelConfig, saved: EmbeddingModelConfig) -> None:
    """Copies the run-time options (`Option.runtime`) of `mine` onto `saved`, section by section."""
    for section in ("model", "pooling", "parallel", "prompts"):
        src, dst = getattr(mine, section), getattr(saved, section)
        for f in dataclasses.fields(src):
            opt = option_of(f)
            if opt is not None and opt.runtime:
                setattr(dst, f.name, getattr(src, f.name))


def model_config(cfg: TrainingConfig, start: StartingPoint) -> EmbeddingModelConfig:
    """The model this run trains (validated).

    From a checkpoint: its architecture and query template, with the run-time options of `cfg`
    (layout, dropouts, bf16, recompute, attention backend) and a `--query-template` given (or set
    by the recipe). From scratch: `cfg.model`. On a machine without CUDA bf16 falls back to
    float32 (said once); LoRA with backend `auto` resolves to sdpa.

    Raises:
        ValueError: naming the setting (and the checkpoint's config file when it is at fault).
    """
    mine = cfg.model
    if start.saved_model is None:
        model_cfg = mine
    else:
        model_cfg = start.saved_model
        _runtime_options(mine, model_cfg)
        if mine.prompts.query_template is not None:
            model_cfg.prompts.query_template = mine.prompts.query_template
    m = model_cfg.model
    if m.bf16 and cpu_mode():
        logger.warning("--bf16 on a machine without CUDA: training in float32 on the CPU")
        m.bf16 = False
    if cfg.lora.rank > 0:
        # LoRA wraps the linear layers; Transformer Engine's layers fuse the preceding norm into
        # linear_qkv / linear_fc1, which the adapter would bypass (see docs/model.md).
        if m.attention_backend == "te":
            raise ValueError(
                "--attention-backend te with --lora-rank > 0 is not supported (Transformer "
                "Engine fuses the norms into the adapted layers); use --attention-backend sdpa, "
                "or --lora-rank 0 for full fine-tuning on Transformer Engine"
            )
        if m.attention_backend == "auto":
            logger.info("LoRA: attention backend 'auto' resolves to sdpa (torch SDPA kernels)")
            m.attention_backend = "sdpa"
    try:
        model_cfg.validate()
        cfg.loss.check_width(m.hidden_size)
        if cfg.data.seq_length > m.max_position_embeddings:
            raise ValueError(
                f"--seq-length {cfg.data.seq_length} exceeds the {m.max_position_embeddings} "
                "positions the backbone was trained for (max_position_embeddings)"
            )
    except ValueError as err:
        if start.path is None:
            raise
        raise ValueError(f"{err} (the model of {start.config_file})") from err
    return model_cfg
