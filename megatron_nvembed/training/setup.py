"""Training set-up: the model configuration (checkpoint or recipe), the tokenizer, the
`--load` / `--save` checks and this rank's model stage, in the order `train()` needs them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_nvembed.cpu_support import cpu_mode
from megatron_nvembed.logging_utils import get_logger, log_rank0
from megatron_nvembed.training.config import TrainingConfig

logger = get_logger(__name__)


def check_load_and_save(cfg: TrainingConfig) -> tuple[bool, bool]:
    """Whether this run resumes from `--load`, and whether `--load` is its own `--save`.

    Raises:
        FileNotFoundError: `--load` holds no checkpoint and is not `--save`.
        ValueError: the schedule flags differ from the checkpoint's (`check_schedule`).
    """
    from megatron_nvembed.training import checkpointing as ckpt

    resuming = ckpt.has_training_checkpoint(cfg.load)
    own_save = bool(cfg.load and cfg.save) and Path(cfg.load).resolve() == Path(cfg.save).resolve()
    if resuming:
        ckpt.check_schedule(cfg.load, cfg)
    elif cfg.load and not own_save:
        raise FileNotFoundError(
            f"--load {cfg.load}: holds no checkpoint (no latest_checkpointed_iteration.txt); "
            "only a --load equal to --save may be empty (the run then starts at iteration 0)"
        )
    elif cfg.load:
        log_rank0(logger, "--load %s holds no checkpoint yet: starting at iteration 0", cfg.load)
    return resuming, own_save


def resolve_model_config(cfg: TrainingConfig):
    """Architecture and query template from the checkpoint (resume or pretrained) or the recipe;
    run-time fields (layout, dropout, bf16, recompute, backend) and a `--query-template` given
    from the training config."""
    from megatron_nvembed.checkpoint import read_config
    from megatron_nvembed.training.checkpointing import has_training_checkpoint

    source = cfg.load if has_training_checkpoint(cfg.load) else cfg.pretrained_checkpoint
    mine = cfg.model
    if source is None:
        model_cfg = mine
    else:
        model_cfg = read_config(source)
        for key in (
            "hidden_dropout",
            "attention_dropout",
            "bf16",
            "recompute_granularity",
            "recompute_num_layers",
            "attention_backend",
        ):
            setattr(model_cfg.model, key, getattr(mine.model, key))
        model_cfg.parallel = mine.parallel
    if cfg.query_template is not None:
        model_cfg.prompts.query_template = cfg.query_template
    if model_cfg.model.bf16 and cpu_mode():
        logger.warning("--bf16 on a machine without CUDA: training in float32 on the CPU")
        model_cfg.model.bf16 = False
    if cfg.lora.rank > 0:
        # LoRA wraps the linear layers; Transformer Engine's layers fuse the preceding norm into
        # linear_qkv / linear_fc1, which the adapter would bypass (see docs/model.md).
        if model_cfg.model.attention_backend == "te":
            raise ValueError(
                "--attention-backend te with --lora-rank > 0 is not supported (Transformer "
                "Engine fuses the norms into the adapted layers); use --attention-backend sdpa, "
                "or --lora-rank 0 for full fine-tuning on Transformer Engine"
            )
        if model_cfg.model.attention_backend == "auto":
            logger.info("LoRA: attention backend 'auto' resolves to sdpa (torch SDPA kernels)")
            model_cfg.model.attention_backend = "sdpa"
    try:
        return model_cfg.validate(), source
    except ValueError as err:
        if source is None:
            raise
        from megatron_nvembed.checkpoint import CONFIG_FILE, iteration_dir, latest_iteration

        saved = iteration_dir(source, latest_iteration(source)) / CONFIG_FILE
        raise ValueError(f"{err} (the model of {saved})") from err


def tokenizer_dir(cfg: TrainingConfig, source: str | None) -> Path:
    """`--tokenizer`, else the tokenizer stored with the starting checkpoint."""
    from megatron_nvembed.checkpoint import TOKENIZER_DIR

    path = cfg.tokenizer or (str(Path(source) / TOKENIZER_DIR) if source else None)
    if path is None:
        raise ValueError(
            "no tokenizer: pass --tokenizer DIR, or --pretrained-checkpoint from import-hf "
            "(which stores one)"
        )
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{path}: tokenizer directory not found (--tokenizer)")
    return Path(path)


def load_tokenizer(cfg: TrainingConfig, source: str | None):
    """The tokenizer of `tokenizer_dir`."""
    from megatron_nvembed.data.tokenization import load_tokenizer as load

    return load(tokenizer_dir(cfg, source))


def build_training_model(cfg: TrainingConfig, model_cfg, pg, resuming: bool):
    """This rank's model stage as training starts: built, initial weights from
    `--pretrained-checkpoint` unless resuming (a checkpoint with LoRA adapters, e.g. stage 1, is
    merged into the base first), then new adapters when `--lora-rank` > 0.

    Returns:
        (model, lora settings dict or None)
    """
    from megatron_nvembed.checkpoint import load_checkpoint
    from megatron_nvembed.model.build import build_model
    from megatron_nvembed.model.lora import apply_lora

    model = build_model(model_cfg, pg)
    if not resuming and cfg.pretrained_checkpoint:
        load_checkpoint(model, cfg.pretrained_checkpoint)
        if dist.get_rank() == 0:
            logger.info("initial weights from %s", cfg.pretrained_checkpoint)
    lora = None
    if cfg.lora.rank > 0:
        apply_lora(model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, seed=cfg.seed)
        lora = {"rank": cfg.lora.rank, "alpha": cfg.lora.alpha, "dropout": cfg.lora.dropout}
    return model, lora


def runs_thd(model_cfg) -> bool:
    """Whether packed rows run as the THD layout on this model's attention backend (only real
    tokens are computed), or as padded rows with a block-diagonal mask."""
    from megatron_nvembed.model.nvembed_model import THD_BACKENDS
    from megatron_nvembed.model.specs import resolve_backend

    return resolve_backend(model_cfg.model) in THD_BACKENDS


@dataclass
class Run:
    """Everything a training run is built from, on this rank."""

    cfg: TrainingConfig
    model_cfg: object
    """The `EmbeddingModelConfig` trained (architecture from the checkpoint or the recipe)."""
    source: str | None
    """The checkpoint the architecture came from (`--load` when resuming, else
    `--pretrained-checkpoint`), None from scratch."""
    resuming: bool
    own_save: bool
    """`--load` is `--save` (a job relaunched on its own checkpoints)."""
    pg: object
    device: torch.device
    tokenizer: object
    data: object
    model: object
    lora: dict | None
    ddp: object
    optimizer: object
    scheduler: object
    loss_fn: object
    layout: dict
    """{"tp", "pp", "dp"} sizes (saved with checkpoints; a resume on another layout re-seeds)."""


def build(cfg: TrainingConfig) -> Run:
    """Checks `--load` / `--save`, resolves the model, initialises the process groups, then
    builds data (first: bad records stop the run before any weight is loaded), model, optimizer
    and loss, for a validated `cfg`."""
    from megatron_nvembed.data.pipeline import build_train_data
    from megatron_nvembed.parallel import initialize_model_parallel
    from megatron_nvembed.training.optimizer import build_optimizer

    resuming, own_save = check_load_and_save(cfg)
    model_cfg, source = resolve_model_config(cfg)
    try:  # the widths against the model trained
        cfg.matryoshka(model_cfg.model.hidden_size)
    except ValueError as err:
        raise ValueError(f"{err} (the model of {source})" if source else str(err)) from None
    par = model_cfg.parallel
    pg = initialize_model_parallel(
        par.tensor_model_parallel_size, par.pipeline_model_parallel_size, seed=cfg.seed
    )
    dp = pg.dp.size()
    device = (
        torch.device("cpu") if cpu_mode() else torch.device("cuda", torch.cuda.current_device())
    )
    tokenizer = load_tokenizer(cfg, source)
    if source is None and model_cfg.model.vocab_size != len(tokenizer):
        model_cfg.model.vocab_size = len(tokenizer)  # from scratch: sized by the tokenizer
    data = build_train_data(
        cfg.train_data,
        tokenizer,
        skip_bad_records=cfg.skip_bad_records,
        global_batch_size=cfg.global_batch_size,
        micro_batch_size=cfg.micro_batch_size,
        num_negatives=cfg.num_negatives,
        max_length=cfg.seq_length,
        dp_rank=pg.dp.rank(),
        dp_size=dp,
        seed=cfg.seed,
        composition=cfg.batch_composition,
        query_template=model_cfg.prompts.query_template,
    )
    if cfg.distill_weight and not any(src.scored_records for src in data.sources):
        raise ValueError(
            f"--distill-weight {cfg.distill_weight}: no record of --train-data carries teacher "
            'scores ("pos_scores" / "neg_scores", docs/data.md); nothing to distil'
        )
    model, lora = build_training_model(cfg, model_cfg, pg, resuming)
    ddp, optimizer, scheduler = build_optimizer(cfg, model, model_cfg)
    loss_fn = build_loss(cfg, pg)
    layout = {
        "tp": par.tensor_model_parallel_size,
        "pp": par.pipeline_model_parallel_size,
        "dp": dp,
    }
    return Run(
        cfg, model_cfg, source, resuming, own_save, pg, device, tokenizer, data, model, lora,
        ddp, optimizer, scheduler, loss_fn, layout,
    )  # fmt: skip


def build_loss(cfg: TrainingConfig, pg):
    """The contrastive loss of `cfg` over the data-parallel group of `pg`."""
    from megatron_nvembed.loss import ContrastiveLoss, ContrastiveLossConfig

    return ContrastiveLoss(
        ContrastiveLossConfig(
            temperature=cfg.temperature,
            in_batch_negatives=cfg.in_batch_negatives,
            false_negative_margin=cfg.false_negative_margin,
            query_query=cfg.query_query_negatives,
            document_document=cfg.document_document_negatives,
            matryoshka=cfg.matryoshka(),  # widths checked against the model in `build`
            distill_weight=cfg.distill_weight,
            distill_temperature=cfg.distill_temperature,
        ),
        group=pg.dp,
        global_batch_size=cfg.global_batch_size,
    )


def step_plan(cfg: TrainingConfig, model_cfg, thd: bool | None = None):
    """`step.plan_micro_batch` with the layout settings of `cfg` (packing, length buckets) and
    of the model (pipeline stages, THD backend) bound: host `EmbeddingBatch` -> `ModelBatch`.

    Args:
        thd: whether packed rows run as THD; None: as the model's attention backend does.
    """
    from functools import partial

    from megatron_nvembed.training.step import plan_micro_batch

    return partial(
        plan_micro_batch,
        pack_length=cfg.seq_length if cfg.pack_sequences else 0,
        bucket_size=cfg.length_bucket_size,
        pipeline=model_cfg.parallel.pipeline_model_parallel_size > 1,
        thd=runs_thd(model_cfg) if thd is None else thd,
    )


def resume(run: Run, guard) -> int:
    """Loads `--load`'s training state into `run` (weights, optimizer, schedule, data position,
    RNG) and the guard's skipped-step count; returns the checkpoint's iteration.

    Raises:
        ValueError: the checkpoint's LoRA settings differ from `--lora-rank`.
    """
    from megatron_nvembed.checkpoint import read_lora
    from megatron_nvembed.training import checkpointing as ckpt
    from megatron_nvembed.training.optimizer import init_empty_adam_state, unshare_adam_steps

    cfg = run.cfg
    saved_lora = read_lora(cfg.load)
    if (saved_lora or {}).get("rank") != (run.lora or {}).get("rank"):
        raise ValueError(
            f"--load {cfg.load}: the checkpoint's LoRA settings ({saved_lora}) differ from "
            f"--lora-rank {cfg.lora.rank}"
        )
    init_empty_adam_state(run.optimizer)
    state = ckpt.load_training_checkpoint(
        cfg.load, run.model, run.optimizer, run.scheduler, run.data, run.layout, cfg.seed
    )
    unshare_adam_steps(run.optimizer)
    guard.skipped = state.get("skipped", 0)
    return state["iteration"]
