"""`TrainingConfig`: every setting of a training run, filled by a recipe and then by flags."""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field

from megatron_nvembed.config import (
    BATCH_COMPOSITIONS,
    EmbeddingModelConfig,
    Matryoshka,
    check_query_template,
)


@dataclass
class LoRAConfig:
    """LoRA on `linear_qkv`, `linear_proj`, `linear_fc1`, `linear_fc2` (rank 0: full fine-tuning)."""

    rank: int = 16
    """`--lora-rank` (0: every parameter trains)."""
    alpha: float = 32.0
    """`--lora-alpha`: the adapter output is scaled by alpha / rank."""
    dropout: float = 0.1
    """`--lora-dropout`: dropout on the adapter input."""


@dataclass
class TrainingConfig:
    """A training run. Recipes (`training/recipes.py`) return one; flags override fields."""

    recipe: str = "custom"
    stage: int = 1
    """1: retrieval data with in-batch + hard negatives; 2: blended tasks, in-batch off."""
    model: EmbeddingModelConfig = field(default_factory=EmbeddingModelConfig)
    """Used as is when training from scratch; with `--pretrained-checkpoint` / `--load` the
    architecture comes from the checkpoint and only the run-time fields (parallel layout,
    dropouts, bf16, recompute, attention backend) come from here."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    # data
    train_data: list[str] = field(default_factory=list)
    """`--train-data`: paths, or weight/path pairs as Megatron's `--data-path`."""
    tokenizer: str | None = None
    """`--tokenizer`: a tokenizer directory (default: the checkpoint's `tokenizer/`)."""
    num_negatives: int = 7
    """`--num-negatives`: hard negatives per query (K)."""
    seq_length: int = 512
    """`--seq-length`: token limit per text (right padding)."""
    pack_sequences: bool = False
    """`--pack-sequences`: pack each micro-batch's queries and candidates into rows of at most
    `seq_length` tokens (`data/packing.py`; THD on te / sdpa, a block mask on local)."""
    length_bucket_size: int = 0
    """`--length-bucket-size`: run each micro-batch's queries and candidates sorted by length,
    this many texts per forward call, each call padded to its own longest text (0: off)."""
    skip_bad_records: bool = False

    # batch and schedule
    micro_batch_size: int = 4
    global_batch_size: int = 128
    train_iters: int = 20000
    lr: float = 2e-5
    min_lr: float = 0.0
    lr_warmup_iters: int = 500
    lr_decay_iters: int | None = None
    """Default: `train_iters`."""
    lr_decay_style: str = "linear"
    weight_decay: float = 0.03
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    seed: int = 1234
    use_distributed_optimizer: bool = True

    # loss
    temperature: float = 0.02
    false_negative_margin: float | None = None
    matryoshka_dims: list[int] = field(default_factory=list)
    """`--matryoshka-dims`: the loss summed over these prefix widths (empty: full width only)."""
    matryoshka_weights: list[float] = field(default_factory=list)
    """`--matryoshka-weights`: one per width (empty: 1 each)."""
    query_query_negatives: bool = False
    """`--query-query-negatives`: other in-batch queries are negatives too."""
    document_document_negatives: bool = False
    """`--document-document-negatives`: in-batch documents are negatives of the positive too."""
    batch_composition: str = "systematic"
    """`--batch-composition`: how datasets mix in a global batch: systematic / multinomial
    (blended), homogeneous (one dataset per global batch; `data/blending.py`)."""
    query_template: str | None = None
    """`--query-template`: the model's query prefix, `{instruction}` replaced by the task
    definition (default: the checkpoint's, NV-Embed's `"Instruct: {instruction}\\nQuery: "` for a
    new model); saved with the model and written into exports' prompts."""
    distill_weight: float = 0.0
    """`--distill-weight`: weight of the KL term towards the records' teacher scores (0: off)."""
    distill_temperature: float = 1.0
    """`--distill-temperature`: temperature of the teacher scores in that term."""
    grad_cache: bool = True
    """In-batch negatives over the whole global batch (GradCache); off: one micro-batch per DP
    rank (the log says so)."""

    # checkpoints and logs
    pretrained_checkpoint: str | None = None
    save: str | None = None
    load: str | None = None
    save_interval: int | None = None
    log_interval: int = 10
    log_json: str | None = None
    override_opt_param_scheduler: bool = False
    """`--override-opt-param-scheduler`: on resume, the learning-rate / weight-decay schedule of
    the flags replaces the checkpoint's (from the resumed iteration on). Without it a resume with
    different schedule flags is refused (`training/checkpointing.py` `check_schedule`)."""
    max_nonfinite_steps: int = 10
    """Consecutive non-finite losses tolerated (each skips its step) before the run aborts."""
    tensorboard_dir: str | None = None
    """`--tensorboard-dir`: TensorBoard event files with the JSON log's scalars (extra
    `tensorboard`)."""
    wandb_project: str | None = None
    """`--wandb-project`: log the JSON log's scalars to this Weights & Biases project (extra
    `wandb`; `WANDB_MODE=offline` writes the run locally only)."""
    wandb_exp_name: str | None = None
    """`--wandb-exp-name`: the W&B run name (default: one W&B picks)."""
    wandb_save_dir: str | None = None
    """`--wandb-save-dir`: where W&B writes its run folder (default: `--save`/wandb, else W&B's
    default `./wandb`)."""
    exit_interval: int | None = None
    """`--exit-interval N`: save (with `--save`) and exit once the iteration is a multiple of N."""
    exit_duration_in_mins: float | None = None
    """`--exit-duration-in-mins M`: save (with `--save`) and exit at the end of the first
    iteration after M minutes since `train()` started (all ranks agree through an all-reduce)."""

    # evaluation during training
    eval_interval: int | None = None
    eval_data: list[str] = field(default_factory=list)
    """BEIR-format folders (corpus.jsonl, queries.jsonl, qrels/test.tsv) for in-training
    validation."""
    eval_instruction: str | None = None
    """`--eval-instruction`: the query instruction of `eval_data` (a task definition, put into the
    model's query template, or a complete prefix starting with "Instruct:")."""
    eval_batch_size: int = 32
    eval_iters: int | None = None
    """`--eval-iters N`: each validation scores the first N x `eval_batch_size` queries of each
    set (N query batches); the corpus is embedded whole (ranking needs every document)."""

    in_batch: bool | None = None
    """`--in-batch-negatives / --no-in-batch-negatives`; None: on in stage 1, off in stage 2."""

    @property
    def in_batch_negatives(self) -> bool:
        """The stage switch of in-batch negatives (each dataset's own switch is ANDed in)."""
        return self.stage == 1 if self.in_batch is None else self.in_batch

    def matryoshka(self, width: int | None = None) -> Matryoshka | None:
        """The `Matryoshka` of `--matryoshka-dims` / `--matryoshka-weights` (None: off).

        Args:
            width: the embedding width to check the widths against (the model's hidden size;
                None: not checked).

        Raises:
            ValueError: naming the flag (weights without widths, a width above `width`, ...).
        """
        if not self.matryoshka_dims:
            if self.matryoshka_weights:
                raise ValueError("--matryoshka-weights needs --matryoshka-dims")
            return None
        return Matryoshka(tuple(self.matryoshka_dims), tuple(self.matryoshka_weights)).validate(
            width=width
        )

    def validate(self) -> TrainingConfig:
        """Checks fields that do not need the process groups; raises ValueError naming the flag."""
        if self.stage not in (1, 2):
            raise ValueError(f"--stage must be 1 or 2, got {self.stage}")
        positive = {
            "--micro-batch-size": self.micro_batch_size,
            "--global-batch-size": self.global_batch_size,
            "--train-iters": self.train_iters,
            "--seq-length": self.seq_length,
            "--log-interval": self.log_interval,
            "--max-nonfinite-steps": self.max_nonfinite_steps,
        }
        for flag, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{flag} must be a positive integer, got {value!r}")
        for flag, value in (
            ("--save-interval", self.save_interval),
            ("--eval-interval", self.eval_interval),
            ("--lr-decay-iters", self.lr_decay_iters),
        ):
            if value is not None and value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        if not isinstance(self.length_bucket_size, int) or self.length_bucket_size < 0:
            raise ValueError(
                f"--length-bucket-size must be >= 0 (0: off), got {self.length_bucket_size!r}"
            )
        if self.length_bucket_size and self.pack_sequences:
            raise ValueError(
                "--length-bucket-size and --pack-sequences are two answers to padding; pick one "
                "(packing removes more of it)"
            )
        if self.length_bucket_size and self.model.parallel.pipeline_model_parallel_size > 1:
            raise ValueError(
                "--length-bucket-size needs --pipeline-model-parallel-size 1 (a pipeline moves "
                "each micro-batch as one tensor); use --pack-sequences with pipelines"
            )
        if self.num_negatives < 0:
            raise ValueError(f"--num-negatives must be >= 0, got {self.num_negatives}")
        for flag, value in (
            ("--lr", self.lr),
            ("--min-lr", self.min_lr),
            ("--weight-decay", self.weight_decay),
            ("--adam-beta1", self.adam_beta1),
            ("--adam-beta2", self.adam_beta2),
            ("--adam-eps", self.adam_eps),
            ("--clip-grad", self.clip_grad),
            ("--temperature", self.temperature),
            ("--lora-alpha", self.lora.alpha),
            ("--lora-dropout", self.lora.dropout),
            ("--false-negative-margin", self.false_negative_margin),
            ("--distill-weight", self.distill_weight),
            ("--distill-temperature", self.distill_temperature),
            ("--exit-duration-in-mins", self.exit_duration_in_mins),
        ):
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{flag} must be a finite number, got {value}")
        # --matryoshka-dims / --matryoshka-weights; the widths against the recipe's model only
        # when it is the one trained (a checkpoint's width is checked once it is read)
        from_scratch = self.pretrained_checkpoint is None and self.load is None
        self.matryoshka(self.model.model.hidden_size if from_scratch else None)
        if self.query_template is not None:
            check_query_template(self.query_template)
        if self.batch_composition not in BATCH_COMPOSITIONS:
            raise ValueError(
                f"--batch-composition must be one of {BATCH_COMPOSITIONS}, got "
                f"{self.batch_composition!r}"
            )
        if self.distill_weight < 0:
            raise ValueError(f"--distill-weight must be >= 0 (0: off), got {self.distill_weight}")
        if not self.distill_temperature > 0:
            raise ValueError(f"--distill-temperature must be > 0, got {self.distill_temperature}")
        if (
            self.query_query_negatives or self.document_document_negatives
        ) and not self.in_batch_negatives:
            flag = (
                "--query-query-negatives"
                if self.query_query_negatives
                else "--document-document-negatives"
            )
            raise ValueError(
                f"{flag} adds in-batch terms; it needs in-batch negatives (stage 1 or "
                "--in-batch-negatives)"
            )
        if not self.lr > 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"need 0 <= --min-lr ({self.min_lr}) <= --lr ({self.lr}), --lr > 0")
        if self.lr_warmup_iters < 0:
            raise ValueError(f"--lr-warmup-iters must be >= 0, got {self.lr_warmup_iters}")
        decay = self.lr_decay_iters or self.train_iters
        if self.lr_warmup_iters >= decay:
            raise ValueError(
                f"--lr-warmup-iters ({self.lr_warmup_iters}) must be below the decay length "
                f"(--lr-decay-iters, default --train-iters: {decay})"
            )
        if self.lr_decay_style not in ("linear", "cosine", "constant"):
            raise ValueError(
                f"--lr-decay-style must be linear, cosine or constant, got {self.lr_decay_style!r}"
            )
        if self.weight_decay < 0:
            raise ValueError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.clip_grad < 0:
            raise ValueError(f"--clip-grad must be >= 0 (0: off), got {self.clip_grad}")
        if self.lora.rank < 0:
            raise ValueError(f"--lora-rank must be >= 0, got {self.lora.rank}")
        if self.lora.rank > 0 and not self.lora.alpha > 0:
            raise ValueError(f"--lora-alpha must be > 0, got {self.lora.alpha}")
        if not 0.0 <= self.lora.dropout < 1.0:
            raise ValueError(f"--lora-dropout must be in [0, 1), got {self.lora.dropout}")
        if not self.temperature > 0:
            raise ValueError(f"--temperature must be > 0, got {self.temperature}")
        if not self.train_data:
            raise ValueError("--train-data is required (paths, or weight/path pairs)")
        if self.eval_interval is not None and not self.eval_data:
            raise ValueError("--eval-interval needs --eval-data (BEIR-format folders)")
        for flag, value in (
            ("--exit-interval", self.exit_interval),
            ("--eval-iters", self.eval_iters),
        ):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{flag} must be a positive integer, got {value!r}")
        if self.eval_iters is not None and self.eval_interval is None:
            raise ValueError("--eval-iters needs --eval-interval (and --eval-data)")
        if self.exit_duration_in_mins is not None and not self.exit_duration_in_mins > 0:
            raise ValueError(
                f"--exit-duration-in-mins must be > 0, got {self.exit_duration_in_mins}"
            )
        for flag, value in (
            ("--wandb-exp-name", self.wandb_exp_name),
            ("--wandb-save-dir", self.wandb_save_dir),
        ):
            if value is not None and not self.wandb_project:
                raise ValueError(f"{flag} needs --wandb-project (W&B logging is off without it)")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"--global-batch-size ({self.global_batch_size}) must be a multiple of "
                f"--micro-batch-size ({self.micro_batch_size})"
            )
        self.model.parallel.validate()
        if self.pretrained_checkpoint or self.load:
            # The architecture will come from the checkpoint (`setup.resolve_model_config`
            # checks the layout against it, naming its config file): here only what does not
            # depend on the layout.
            arch = copy.deepcopy(self.model)
            arch.parallel = type(arch.parallel)()
            arch.validate()
        else:
            self.model.validate()
        return self

    def to_dict(self) -> dict:
        return asdict(self)
