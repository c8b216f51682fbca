"""Training set-up: from a validated `TrainingConfig` and its `StartingPoint` to a `Run`
(process groups, tokenizer, data, this rank's model stage, optimizer, loss), in the order
`train()` needs them, and `resume()` into it."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from megatron_nvembed.core.cpu_support import cpu_mode
from megatron_nvembed.core.logging_utils import get_logger
from megatron_nvembed.training.config import TrainingConfig
from megatron_nvembed.training.start import StartingPoint, model_config, resolve_start

if TYPE_CHECKING:
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.optimizer import MegatronOptimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_nvembed.core.config import EmbeddingModelConfig
    from megatron_nvembed.data.pipeline import BlendedEmbeddingData
    from megatron_nvembed.loss import ContrastiveLoss
    from megatron_nvembed.model.nvembed_model import NVEmbedModel

logger = get_logger(__name__)


@dataclass
class Run:
    """Everything a training run is built from, on this rank."""

    cfg: TrainingConfig
    start: StartingPoint
    model_cfg: EmbeddingModelConfig
    """The model trained (architecture from the checkpoint or the recipe)."""
    pg: ProcessGroupCollection
    device: torch.device
    tokenizer: object
    """A `transformers` tokenizer (`data.tokenization.load_tokenizer`)."""
    data: BlendedEmbeddingData
    model: NVEmbedModel
    ddp: DistributedDataParallel
    optimizer: MegatronOptimizer
    scheduler: OptimizerParamScheduler
    loss_fn: ContrastiveLoss

    @property
    def lora(self) -> dict | None:
        """The adapters trained ({"rank", "alpha", "dropout"}), None in full fine-tuning."""
        lora = self.cfg.lora
        return None if lora.rank == 0 else {"rank": lora.rank, "alpha": lora.alpha,
                                           "dropout": lora.dropout}  # fmt: skip

    @property
    def layout(self) -> dict:
        """{"tp", "pp", "dp"} sizes (saved with checkpoints; a resume on another layout
        re-seeds)."""
        par = self.model_cfg.parallel
        return {
            "tp": par.tensor_model_parallel_size,
            "pp": par.pipeline_model_parallel_size,
            "dp": self.pg.dp.size(),
        }


def build_model(cfg: TrainingConfig, model_cfg, pg, start: StartingPoint) -> NVEmbedModel:
    """This rank's model stage as training starts: built, initial weights from
    `--pretrained-checkpoint` (a checkpoint with LoRA adapters, e.g. stage 1, is merged into the
    base first), then new adapters when `--lora-rank` > 0. A resume loads its weights later."""
    from megatron_nvembed.checkpoint.store import load_checkpoint
    from megatron_nvembed.model.build import build_model as build
    from megatron_nvembed.model.lora import apply_lora

    model = build(model_cfg, pg)
    if start.kind == "pretrained":
        load_checkpoint(model, start.path, start.iteration)
        if dist.get_rank() == 0:
            logger.info("initial weights from %s", start.path)
    lora = cfg.lora
    if lora.rank > 0:
        apply_lora(model, lora.rank, lora.alpha, lora.dropout, seed=cfg.seed)
    return model


def build_data(cfg: TrainingConfig, tokenizer, pg, query_template: str) -> BlendedEmbeddingData:
    """This rank's batches of `--train-data` (every record checked here, before the model)."""
    from megatron_nvembed.data.pipeline import build_train_data

    d = cfg.data
    data = build_train_data(
        d.train_data,
        tokenizer,
        skip_bad_records=d.skip_bad_records,
        data_cache_path=d.data_cache_path,
        global_batch_size=d.global_batch_size,
        micro_batch_size=d.micro_batch_size,
        num_negatives=d.num_negatives,
        max_length=d.seq_length,
        dp_rank=pg.dp.rank(),
        dp_size=pg.dp.size(),
        seed=cfg.seed,
        composition=d.batch_composition,
        query_template=query_template,
    )
    if cfg.loss.distill_weight and not any(src.scored_records for src in data.sources):
        raise ValueError(
            f"--distill-weight {cfg.loss.distill_weight}: no record of --train-data carries "
            'teacher scores ("pos_scores" / "neg_scores", docs/data.md); nothing to distil'
        )
    return data


def build(cfg: TrainingConfig) -> Run:
    """Resolves the starting point and the model, initialises the process groups, then builds
    data (first: bad records stop the run before any weight is loaded), model, optimizer and
    loss, for a validated `cfg`."""
    from megatron_nvembed.core.parallel import initialize_model_parallel
    from megatron_nvembed.data.tokenization import load_tokenizer
    from megatron_nvembed.loss import ContrastiveLoss
    from megatron_nvembed.training.optimizer import build_optimizer

    start = resolve_start(cfg)
    model_cfg = model_config(cfg, start)
    par = model_cfg.parallel
    pg = initialize_model_parallel(
        par.tensor_model_parallel_size,
        par.pipeline_model_parallel_size,
        seed=cfg.seed,
        context_parallel_size=par.context_parallel_size,
    )
    device = (
        torch.device("cpu") if cpu_mode() else torch.device("cuda", torch.cuda.current_device())
    )
    tokenizer = load_tokenizer(start.tokenizer_dir(cfg.data.tokenizer))
    if start.kind == "scratch" and model_cfg.model.vocab_size != len(tokenizer):
        model_cfg.model.vocab_size = len(tokenizer)  # from scratch: sized by the tokenizer
    data = build_data(cfg, tokenizer, pg, model_cfg.prompts.query_template)
    model = build_model(cfg, model_cfg, pg, start)
    ddp, optimizer, scheduler = build_optimizer(cfg.optimizer, model, model_cfg)
    loss_fn = ContrastiveLoss(cfg.loss, group=pg.dp, global_batch_size=cfg.data.global_batch_size)
    return Run(
        cfg, start, model_cfg, pg, device, tokenizer, data, model, ddp, optimizer, scheduler,
        loss_fn,
    )  # fmt: skip


def runs_thd(model_cfg) -> bool:
    """Whether packed rows run as the THD layout on this model's attention backend (only real
    tokens are computed), or as padded rows with a block-diagonal mask."""
    from megatron_nvembed.model.nvembed_model import THD_BACKENDS
    from megatron_nvembed.model.specs import resolve_backend

    return resolve_backend(model_cfg.model) in THD_BACKENDS


def step_plan(cfg: TrainingConfig, model_cfg, thd: bool | None = None):
    """`step.plan_micro_batch` with the layout settings of `cfg` (packing, length buckets) and
    of the model (pipeline stages, THD backend) bound: host `EmbeddingBatch` -> `ModelBatch`.

    Args:
        thd: whether packed rows run as THD; None: as the model's attention backend does.
    """
    from megatron_nvembed.training.step import plan_micro_batch

    d = cfg.data
    return partial(
        plan_micro_batch,
        pack_length=d.seq_length if d.pack_sequences else 0,
        bucket_size=d.length_bucket_size,
        pipeline=model_cfg.parallel.pipeline_model_parallel_size > 1,
        thd=runs_thd(model_cfg) if thd is None else thd,
    )


def resume(run: Run, guard) -> int:
    """Loads the resumed checkpoint's training state into `run` (weights, optimizer, schedule,
    data position, RNG) and the guard's skipped-step count; returns the checkpoint's iteration.

    Raises:
        ValueError: the checkpoint's LoRA settings differ from `--lora-rank`.
    """
    from megatron_nvembed.training import checkpointing as ckpt
    from megatron_nvembed.training.optimizer import init_empty_adam_state, unshare_adam_steps

    start = run.start
    if (start.lora or {}).get("rank") != (run.lora or {}).get("rank"):
        raise ValueError(
            f"--load {start.path}: the checkpoint's LoRA settings ({start.lora}) differ from "
            f"--lora-rank {run.cfg.lora.rank}"
        )
    init_empty_adam_state(run.optimizer)
    state = ckpt.load_training_checkpoint(
        start, run.model, run.optimizer, run.scheduler, run.data, run.layout, run.cfg.seed
    )
    unshare_adam_steps(run.optimizer)
    guard.skipped = state.get("skipped", 0)
    return state["iteration"]
