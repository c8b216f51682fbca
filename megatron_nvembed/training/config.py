"""`TrainingConfig`: a training run, composed of one config per component.

| section | class | what it configures |
|---|---|---|
| `model` | `config.EmbeddingModelConfig` | backbone, pooling head, parallel layout, query template |
| `lora` | `LoRAConfig` | adapters (rank 0: full fine-tuning) |
| `data` | `data.config.DataConfig` | training files, tokenisation limits, batch sizes, packing |
| `loss` | `loss.config.ContrastiveLossConfig` | temperature, in-batch terms, Matryoshka, distillation |
| `optimizer` | `OptimizerConfig` | Adam(W), learning-rate / weight-decay schedule, clipping |
| `checkpoint` | `CheckpointConfig` | initial weights, `--save` / `--load`, exit conditions |
| `evaluation` | `EvaluationConfig` | validation during training |
| `logging` | `LoggingConfig` | log lines, JSON log, TensorBoard, W&B |

A field declared with `utils.options.option` is a flag: `training/arguments.py` generates the parser
from the fields (name, type, help, bounds), and each section checks its own fields once in its
`validate()`; `TrainingConfig.validate()` adds only the rules that span sections.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

from megatron_nvembed.core.config import EmbeddingModelConfig
from megatron_nvembed.data.config import DataConfig
from megatron_nvembed.loss.config import ContrastiveLossConfig
from megatron_nvembed.utils.options import check_options, option


@dataclass
class LoRAConfig:
    """LoRA on `linear_qkv`, `linear_proj`, `linear_fc1`, `linear_fc2` (rank 0: full fine-tuning)."""

    rank: int = option(16, "--lora-rank", "LoRA rank (0: full fine-tuning)", min=0)
    alpha: float = option(
        32.0, "--lora-alpha", "LoRA scale: adapter output times alpha / rank", above=0.0
    )
    dropout: float = option(
        0.1, "--lora-dropout", "dropout on the LoRA adapter input", min=0.0, below=1.0
    )

    def validate(self) -> LoRAConfig:
        check_options(self)
        return self


@dataclass
class OptimizerConfig:
    """Adam(W) and its learning-rate / weight-decay schedule (megatron-core's)."""

    train_iters: int = option(20000, "--train-iters", "optimizer steps", min=1)
    lr: float = option(2e-5, "--lr", "peak learning rate", above=0.0)
    min_lr: float = option(0.0, "--min-lr", "learning rate at the end of the decay", min=0.0)
    lr_warmup_iters: int = option(500, "--lr-warmup-iters", "linear warm-up steps", min=0)
    lr_decay_iters: int | None = option(
        None, "--lr-decay-iters", "decay steps (default --train-iters)", min=1
    )
    lr_decay_style: str = option(
        "linear",
        "--lr-decay-style",
        "linear, cosine or constant",
        choices=("linear", "cosine", "constant"),
    )
    weight_decay: float = option(0.03, "--weight-decay", "Adam(W) weight decay", min=0.0)
    adam_beta1: float = option(0.9, "--adam-beta1", "Adam(W) first-moment decay")
    adam_beta2: float = option(0.999, "--adam-beta2", "Adam(W) second-moment decay")
    adam_eps: float = option(1e-8, "--adam-eps", "Adam(W) denominator epsilon")
    clip_grad: float = option(1.0, "--clip-grad", "gradient-norm clipping (0: off)", min=0.0)
    use_distributed_optimizer: bool = option(
        True, "--use-distributed-optimizer", "shard optimizer state over DP ranks"
    )
    override_opt_param_scheduler: bool = option(
        False,
        "--override-opt-param-scheduler",
        "on resume, use the schedule flags (--lr, --min-lr, --lr-warmup-iters, --lr-decay-iters "
        "/ --train-iters, --lr-decay-style, --weight-decay) instead of the checkpoint's, from the "
        "resumed iteration on; without it different values are refused",
    )

    @property
    def decay_iters(self) -> int:
        """The decay length: `--lr-decay-iters`, default `--train-iters`."""
        return self.lr_decay_iters or self.train_iters

    def schedule(self) -> dict:
        """The schedule as megatron-core's `OptimizerParamScheduler` stores it (key -> (flag,
        value)): what a resume compares against the checkpoint's."""
        return {
            "max_lr": ("--lr", self.lr),
            "min_lr": ("--min-lr", self.min_lr),
            "lr_warmup_steps": ("--lr-warmup-iters", self.lr_warmup_iters),
            "lr_decay_steps": ("--lr-decay-iters (default: --train-iters)", self.decay_iters),
            "lr_decay_style": ("--lr-decay-style", self.lr_decay_style),
            "start_wd": ("--weight-decay", self.weight_decay),
        }

    def validate(self) -> OptimizerConfig:
        check_options(self)
        if self.min_lr > self.lr:
            raise ValueError(f"need 0 <= --min-lr ({self.min_lr}) <= --lr ({self.lr}), --lr > 0")
        if self.lr_warmup_iters >= self.decay_iters:
            raise ValueError(
                f"--lr-warmup-iters ({self.lr_warmup_iters}) must be below the decay length "
                f"(--lr-decay-iters, default --train-iters: {self.decay_iters})"
            )
        return self


@dataclass
class CheckpointConfig:
    """Where the weights come from and go, and when a run saves and stops."""

    pretrained_checkpoint: str | None = option(
        None,
        "--pretrained-checkpoint",
        "initial weights (import-hf output or a stage-1 save); optimizer state not loaded",
    )
    save: str | None = option(None, "--save", "checkpoint directory to write")
    load: str | None = option(
        None, "--load", "checkpoint directory to resume from (if it holds one)"
    )
    save_interval: int | None = option(
        None, "--save-interval", "iterations between checkpoints", min=1
    )
    exit_interval: int | None = option(
        None, "--exit-interval", "save and exit at a multiple of this iteration", min=1
    )
    exit_duration_in_mins: float | None = option(
        None,
        "--exit-duration-in-mins",
        "save and exit at the end of the first iteration after this many minutes of training "
        "(all ranks agree)",
        above=0.0,
    )

    def validate(self) -> CheckpointConfig:
        check_options(self)
        return self


@dataclass
class EvaluationConfig:
    """Validation during training on BEIR-format folders (`training/validation.py`)."""

    eval_interval: int | None = option(
        None, "--eval-interval", "iterations between validations", min=1
    )
    eval_data: list[str] = option(
        default_factory=list,
        flag="--eval-data",
        help="BEIR-format folders (corpus.jsonl, queries.jsonl, qrels/test.tsv)",
    )
    eval_instruction: str | None = option(
        None,
        "--eval-instruction",
        "query instruction for --eval-data (a task definition, or a complete prefix starting "
        "with 'Instruct:')",
    )
    eval_batch_size: int = option(
        32, "--eval-batch-size", "texts per forward call in validation", min=1
    )
    eval_iters: int | None = option(
        None,
        "--eval-iters",
        "validation batches of --eval-batch-size queries per set (default: every query; the "
        "corpus is embedded whole)",
        min=1,
    )

    def validate(self) -> EvaluationConfig:
        check_options(self)
        if self.eval_interval is not None and not self.eval_data:
            raise ValueError("--eval-interval needs --eval-data (BEIR-format folders)")
        if self.eval_iters is not None and self.eval_interval is None:
            raise ValueError("--eval-iters needs --eval-interval (and --eval-data)")
        return self


@dataclass
class LoggingConfig:
    """The training log and its sinks (`training/metrics.py`, `training/sinks.py`)."""

    log_interval: int = option(10, "--log-interval", "iterations between log lines", min=1)
    log_json: str | None = option(
        None, "--log-json", "append one JSON object per logged iteration to this file"
    )
    tensorboard_dir: str | None = option(
        None,
        "--tensorboard-dir",
        "write the log's scalars for TensorBoard here (extra tensorboard)",
    )
    wandb_project: str | None = option(
        None,
        "--wandb-project",
        "log the log's scalars to this W&B project (extra wandb; WANDB_MODE=offline: local only)",
    )
    wandb_exp_name: str | None = option(None, "--wandb-exp-name", "W&B run name")
    wandb_save_dir: str | None = option(
        None, "--wandb-save-dir", "W&B run folder (default: --save/wandb)"
    )

    def validate(self) -> LoggingConfig:
        check_options(self)
        for flag, value in (
            ("--wandb-exp-name", self.wandb_exp_name),
            ("--wandb-save-dir", self.wandb_save_dir),
        ):
            if value is not None and not self.wandb_project:
                raise ValueError(f"{flag} needs --wandb-project (W&B logging is off without it)")
        return self


@dataclass
class TrainingConfig:
    """A training run. Recipes (`training/recipes.py`) return one; flags override fields."""

    recipe: str = "custom"
    """The recipe's name (logged and saved with checkpoints)."""
    stage: int = option(
        1,
        "--stage",
        "1 (in-batch + hard negatives) or 2 (in-batch off): picks the recipe's stage",
        choices=(1, 2),
    )
    seed: int = option(1234, "--seed", "seed of initialisation, data order and dropout")
    grad_cache: bool = option(
        True,
        "--grad-cache",
        "in-batch negatives over the whole global batch (GradCache); off: one micro-batch per DP "
        "rank",
    )
    max_nonfinite_steps: int = option(
        10,
        "--max-nonfinite-steps",
        "non-finite losses in a row before aborting (each skips its step)",
        min=1,
    )
    model: EmbeddingModelConfig = field(default_factory=EmbeddingModelConfig)
    """Used as is when training from scratch; from a checkpoint the architecture and query
    template come from the checkpoint, and only the run-time options (`Option.runtime`: layout,
    dropouts, bf16, recompute, attention backend) and a `--query-template` given come from here
    (`training/start.py`)."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: ContrastiveLossConfig = field(default_factory=ContrastiveLossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def from_checkpoint(self) -> bool:
        """The architecture will come from a checkpoint (`--load` or `--pretrained-checkpoint`)."""
        return bool(self.checkpoint.pretrained_checkpoint or self.checkpoint.load)

    def validate(self) -> TrainingConfig:
        """Checks every section, then the rules that span sections.

        Raises:
            ValueError: naming the flag (or the model setting).
        """
        check_options(self)
        for section in (
            self.lora,
            self.data,
            self.loss,
            self.optimizer,
            self.checkpoint,
            self.evaluation,
            self.logging,
        ):
            section.validate()
        if self.from_checkpoint:
            # The architecture comes from the checkpoint (`training/start.py` checks the layout
            # against it, naming its config file): here only what does not depend on it, on a
            # copy, so that an unset --query-template stays "the checkpoint's".
            arch = copy.deepcopy(self.model)
            arch.parallel = type(arch.parallel)()
            arch.validate()
            self.model.parallel.validate()
        else:
            self.model.validate()
            self.loss.check_width(self.model.model.hidden_size)
        if self.data.length_bucket_size and self.model.parallel.pipeline_model_parallel_size > 1:
            raise ValueError(
                "--length-bucket-size needs --pipeline-model-parallel-size 1 (a pipeline moves "
                "each micro-batch as one tensor); use --pack-sequences with pipelines"
            )
        return self

    def to_dict(self) -> dict:
        return asdict(self)
