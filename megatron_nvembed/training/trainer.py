"""The training loop: megatron-core DDP + (distributed) optimizer + pipeline schedules, the
contrastive loss over the data-parallel group, GradCache, LoRA, checkpoints and logs.

One iteration = one global batch = one optimizer step:

- GradCache on (`grad_cache=True`, the recipes' default): phase 1 embeds every micro-batch of
  this rank through megatron-core's forward-only schedule (no activations kept, RNG recorded);
  the last pipeline stage computes the loss over the whole global batch (candidates gathered over
  the DP group) and its gradient with respect to every embedding; phase 2 replays each
  micro-batch through the training schedule with `surrogate_loss`, which delivers exactly those
  gradients. In-batch negatives span the whole global batch.
- GradCache off: each micro-batch's loss is computed on its own inside the training schedule;
  in-batch negatives span one micro-batch per rank x the DP ranks (the log says so).

With pipeline parallelism a micro-batch travels as one tensor: queries and candidates are padded
to a common width and stacked (rows [b queries; b x (1 + K) candidates]). Without it, queries and
candidates run as two forwards at their own widths.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_nvembed.cpu_support import cpu_mode, cuda_allocations_on_cpu
from megatron_nvembed.data.collate import EmbeddingBatch
from megatron_nvembed.flops import flop_shape, loss_flops, model_step_flops
from megatron_nvembed.logging_utils import SPEAKER, get_logger
from megatron_nvembed.loss import (
    ContrastiveLoss,
    ContrastiveLossConfig,
    RngReplay,
    embedding_gradients,
    surrogate_loss,
)
from megatron_nvembed.training.config import TrainingConfig

logger = get_logger(__name__)


class NonFiniteGuard:
    """Counts consecutive non-finite losses: each skips its step; too many in a row abort."""

    def __init__(self, max_in_row: int):
        self.max_in_row = max_in_row
        self.in_row = 0
        self.skipped = 0

    def update(self, finite: bool, iteration: int) -> bool:
        """Returns True when the step may be applied.

        Raises:
            RuntimeError: after `max_in_row` non-finite losses in a row.
        """
        if finite:
            self.in_row = 0
            return True
        self.in_row += 1
        self.skipped += 1
        logger.warning(
            "iteration %d: non-finite loss, optimizer step skipped (%d in a row, limit %d; "
            "--max-nonfinite-steps)",
            iteration,
            self.in_row,
            self.max_in_row,
        )
        if self.in_row >= self.max_in_row:
            raise RuntimeError(
                f"iteration {iteration}: {self.in_row} non-finite losses in a row "
                f"(--max-nonfinite-steps {self.max_in_row}); aborting. Check the data, or "
                "resume from the last checkpoint with a lower --lr and "
                "--override-opt-param-scheduler (the schedule of the flags then applies)."
            )
        return False


class _SigtermFlag:
    """Set by SIGTERM (cluster preemption); the loop saves and exits at the end of the step."""

    def __init__(self):
        self.raised = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.raised = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


@dataclass
class TrainResult:
    """What `train` returns (on every rank)."""

    iteration: int
    losses: dict[int, float] = field(default_factory=dict)
    """Global-batch mean loss of every iteration run in this call."""
    skipped: int = 0
    exit_reason: str = "done"
    """Why the loop stopped: "done" (`--train-iters` reached), "sigterm", "exit_interval"
    (`--exit-interval`) or "exit_duration" (`--exit-duration-in-mins`)."""
    evals: dict[int, dict] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# setup


def _resolve_model_config(cfg: TrainingConfig):
    """Architecture from the checkpoint (resume or pretrained) or the recipe; run-time fields
    (layout, dropout, bf16, recompute, backend) from the training config."""
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


def _tokenizer_dir(cfg: TrainingConfig, source: str | None) -> Path:
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


def _load_tokenizer(cfg: TrainingConfig, source: str | None):
    from megatron_nvembed.data.tokenization import load_tokenizer

    return load_tokenizer(_tokenizer_dir(cfg, source))


def _build_optimizer(cfg: TrainingConfig, model, model_cfg):
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    bf16 = model_cfg.model.bf16
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    opt_cfg = OptimizerConfig(
        optimizer="adam",
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
    )
    with cuda_allocations_on_cpu():
        ddp = DistributedDataParallel(model.config, ddp_cfg, model)
        optimizer = get_megatron_optimizer(opt_cfg, [ddp])
    _patch_torch_adam_step_state(optimizer)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=cfg.lr,
        min_lr=cfg.min_lr,
        lr_warmup_steps=cfg.lr_warmup_iters,
        lr_decay_steps=cfg.lr_decay_iters or cfg.train_iters,
        lr_decay_style=cfg.lr_decay_style,
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=cfg.train_iters,
        wd_incr_style="constant",
        # A resume keeps the checkpoint's schedule unless --override-opt-param-scheduler;
        # `check_schedule` refuses different schedule flags before anything is built.
        use_checkpoint_opt_param_scheduler=not cfg.override_opt_param_scheduler,
        override_opt_param_scheduler=cfg.override_opt_param_scheduler,
    )
    model.config.no_sync_func = ddp.no_sync
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.grad_scale_func = optimizer.scale_loss if bf16 else None
    return ddp, optimizer, scheduler


def _patch_torch_adam_step_state(optimizer) -> None:
    """Work-around (megatron-core 0.16.1, torch Adam fallback without TE/Apex): loading a
    `fully_reshardable` distributed-optimizer state copies every key of the live Adam state,
    including torch's per-parameter "step", which the saved shards do not carry (the step is
    restored from the param groups). Feed the live step back so the copy is a no-op for it."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        original = getattr(opt, "_set_main_param_and_optimizer_states", None)
        if original is None:
            continue

        def setter(model_param, tensors, opt=opt, original=original):
            group, order = opt.model_param_group_index_map[model_param]
            live = opt.optimizer.state[opt.optimizer.param_groups[group]["params"][order]]
            if "step" in live and "step" not in tensors:
                tensors = dict(tensors, step=live["step"])
            original(model_param, tensors)

        opt._set_main_param_and_optimizer_states = setter


def unshare_adam_steps(optimizer) -> None:
    """Work-around (same fallback): megatron-core restores torch Adam's per-parameter "step" as
    one tensor object shared by every parameter; torch's multi-tensor Adam increments each
    parameter's step in place, so the shared counter would advance once per parameter per
    iteration and the bias correction after a resume would differ from an uninterrupted run."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for state in inner.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()


def init_empty_adam_state(optimizer) -> None:
    """Work-around (same fallback): a distributed optimizer whose torch Adam has never stepped
    has no per-parameter state, and megatron-core's `state_dict()` (needed to request a
    checkpoint load) asserts on the missing "step". Give every parameter zero state first;
    the load then overwrites all of it."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                if len(inner.state[p]) == 0:
                    inner.state[p]["step"] = torch.tensor(0.0)
                    inner.state[p]["exp_avg"] = torch.zeros_like(p.data)
                    inner.state[p]["exp_avg_sq"] = torch.zeros_like(p.data)


# ---------------------------------------------------------------------------------------------
# one iteration


def _stacked(mb: EmbeddingBatch) -> dict[str, torch.Tensor]:
    """Queries and candidates as one right-padded batch [b + b*(1+K), s] (pipeline transport)."""
    q, c = mb.query, mb.candidates
    width = max(q["input_ids"].shape[1], c["input_ids"].shape[1])
    out = {}
    for key in ("input_ids", "attention_mask", "pool_mask"):
        pad_value = q["input_ids"][0, -1].item() if key == "input_ids" else 0
        parts = []
        for part in (q[key], c[key]):
            extra = width - part.shape[1]
            if extra:
                part = torch.nn.functional.pad(part, (0, extra), value=pad_value)
            parts.append(part)
        out[key] = torch.cat(parts)
    return out


def embed_in_buckets(
    model, part: dict[str, torch.Tensor], bucket_size: int, multiple: int = 8
) -> tuple[torch.Tensor, int]:
    """Embeds a right-padded batch in one forward call or, with `bucket_size` > 0, in calls of
    `bucket_size` length-sorted rows, each cut to its own longest row (rounded up to `multiple`).

    Args:
        model: called as `model(**bucket)`, returns one row per text.
        part: `input_ids`, `attention_mask`, `pool_mask`, each [n, s], right-padded.
        bucket_size: rows per call (0: one call).

    Returns:
        (embeddings [n, ...] in the batch's order, token positions computed).
    """
    n, width = part["input_ids"].shape
    if not bucket_size or n <= bucket_size:
        return model(**part), n * width
    lengths = part["attention_mask"].sum(dim=1)
    order = torch.argsort(lengths, stable=True)
    outs, positions = [], 0
    for start in range(0, n, bucket_size):
        rows = order[start : start + bucket_size]
        longest = max(int(lengths[rows].max()), 1)
        cut = min(-(-longest // multiple) * multiple, width)
        bucket = {k: v[rows, :cut] for k, v in part.items()}
        positions += bucket["input_ids"].numel()
        outs.append(model(**bucket))
    return torch.cat(outs)[torch.argsort(order)], positions


class _Step:
    """Runs one global batch through the schedules (see the module docstring)."""

    def __init__(
        self, cfg: TrainingConfig, ddp, loss_fn: ContrastiveLoss, pg, device, thd: bool = False
    ):
        from megatron.core.pipeline_parallel.schedules import get_forward_backward_func

        self.cfg, self.ddp, self.loss_fn, self.pg, self.device = cfg, ddp, loss_fn, pg, device
        self.thd = thd  # packed rows run as the THD layout (no padding computed)
        self.executed_tokens = 0
        """Token positions the decoder computed in the training passes since the last reset
        (padding included, the GradCache's no-grad pass and evaluation excluded)."""
        self.pp = pg.pp.size()
        if cfg.length_bucket_size and self.pp > 1:
            raise ValueError(
                "--length-bucket-size needs --pipeline-model-parallel-size 1 (a pipeline moves "
                "each micro-batch as one tensor); use --pack-sequences with pipelines"
            )
        self.last_stage = pg.pp.rank() == self.pp - 1
        self.schedule = get_forward_backward_func()

    def _forward(self, model, mb: EmbeddingBatch) -> torch.Tensor:
        if self.cfg.pack_sequences:
            # Queries and candidates packed together (rows of at most --seq-length tokens), on
            # the CPU, deterministically: every pipeline stage and the GradCache replay pack the
            # same micro-batch the same way. The last stage restores the [queries; candidates]
            # order; the other stages pass their packed activations on.
            from megatron_nvembed.data.packing import pack_batch

            stacked = {k: v.cpu() for k, v in _stacked(mb).items()}
            packed = pack_batch(stacked, self.cfg.seq_length).to(self.device)
            ids = packed.input_ids
            self._count(int(packed.lengths.sum()) if self.thd else ids.numel())
            out = model(**packed.model_inputs())
            return out[packed.restore] if self.last_stage else out
        if self.pp == 1:
            return torch.cat([self._embed(model, mb.query), self._embed(model, mb.candidates)])
        stacked = _stacked(mb)
        self._count(stacked["input_ids"].numel())
        return model(**stacked)

    def _embed(self, model, part: dict[str, torch.Tensor]) -> torch.Tensor:
        out, positions = embed_in_buckets(model, part, self.cfg.length_bucket_size)
        self._count(positions)
        return out

    def _count(self, positions: int) -> None:
        if torch.is_grad_enabled():
            self.executed_tokens += positions

    def _split(self, out: torch.Tensor, mb: EmbeddingBatch):
        b, n = mb.candidate_mask.shape
        return out[:b], out[b:].reshape(b, n, -1)

    def _run(self, step_fn, micro_batches, forward_only):
        width = max(
            max(mb.query["input_ids"].shape[1], mb.candidates["input_ids"].shape[1])
            for mb in micro_batches
        )
        rows = micro_batches[0].candidate_mask.numel() + micro_batches[0].in_batch.numel()
        with cuda_allocations_on_cpu():
            return self.schedule(
                forward_step_func=step_fn,
                data_iterator=iter(list(enumerate(micro_batches))),
                model=[self.ddp],
                num_microbatches=len(micro_batches),
                seq_length=width,
                micro_batch_size=rows,
                forward_only=forward_only,
            )

    def direct(self, micro_batches: list[EmbeddingBatch]) -> torch.Tensor | None:
        """Loss per micro-batch inside the training schedule; returns this rank's mean loss."""

        def loss_func(mb, out):
            q, c = self._split(out, mb)
            loss = self.loss_fn(q, c, mb.candidate_mask, mb.in_batch, mb.candidate_ids)
            return loss, {"loss": loss.detach()}

        def step_fn(it, model):
            _, mb = next(it)
            return self._forward(model, mb), partial(loss_func, mb)

        from megatron_nvembed.model.pooling import latent_kv_once_per_step

        with latent_kv_once_per_step([self.ddp]):
            outs = self._run(step_fn, micro_batches, forward_only=False)
        if not self.last_stage:
            return None
        return torch.stack([o["loss"] for o in outs]).mean()

    def grad_cache(self, micro_batches: list[EmbeddingBatch]) -> torch.Tensor | None:
        """GradCache over this rank's micro-batches; returns this rank's loss."""
        rng = RngReplay()
        m = len(micro_batches)

        def embed_fn(it, model):
            i, mb = next(it)
            rng.record(i)
            return self._forward(model, mb), None

        with torch.no_grad():
            outs = self._run(embed_fn, micro_batches, forward_only=True)
        rng.end_recording()
        grads: list[torch.Tensor] = []
        loss = None
        if self.last_stage:
            queries, cands = zip(*(self._split(o, mb) for o, mb in zip(outs, micro_batches)))
            mask = torch.cat([mb.candidate_mask for mb in micro_batches])
            in_batch = torch.cat([mb.in_batch for mb in micro_batches])
            ids = torch.cat([mb.candidate_ids for mb in micro_batches])
            loss, gq, gc = embedding_gradients(
                lambda q, c: self.loss_fn(q, c, mask, in_batch, ids), queries, cands
            )
            grads = [torch.cat([a, b.reshape(-1, b.shape[-1])]) for a, b in zip(gq, gc)]

        def replay_fn(it, model):
            i, mb = next(it)
            rng.replay(i)
            out = self._forward(model, mb)
            return out, lambda o: (surrogate_loss([o], [grads[i]], scale=m), {})

        from megatron_nvembed.model.pooling import latent_kv_once_per_step

        with latent_kv_once_per_step([self.ddp]):
            self._run(replay_fn, micro_batches, forward_only=False)
        rng.finish()
        return loss


# ---------------------------------------------------------------------------------------------
# the loop


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


def train(cfg: TrainingConfig) -> TrainResult:
    """Runs (or resumes) training as configured; every rank calls it.

    Raises:
        ValueError / FileNotFoundError: bad settings or inputs, naming the flag or file.
        RuntimeError: too many non-finite losses in a row.
    """
    from megatron_nvembed.checkpoint import read_lora
    from megatron_nvembed.data.pipeline import build_train_data
    from megatron_nvembed.parallel import initialize_model_parallel
    from megatron_nvembed.training import checkpointing as ckpt
    from megatron_nvembed.training.sinks import Sinks, build_sinks, require_sink_packages

    started = time.perf_counter()  # the clock of elapsed_s, eta_s and --exit-duration-in-mins
    cfg.validate()
    require_sink_packages(cfg)
    resuming = ckpt.has_training_checkpoint(cfg.load)
    own_save = bool(cfg.load and cfg.save) and Path(cfg.load).resolve() == Path(cfg.save).resolve()
    if resuming:
        ckpt.check_schedule(cfg.load, cfg)
    elif cfg.load and not own_save:
        raise FileNotFoundError(
            f"--load {cfg.load}: holds no checkpoint (no latest_checkpointed_iteration.txt); "
            "only a --load equal to --save may be empty (the run then starts at iteration 0)"
        )
    model_cfg, source = _resolve_model_config(cfg)
    par = model_cfg.parallel
    pg = initialize_model_parallel(
        par.tensor_model_parallel_size, par.pipeline_model_parallel_size, seed=cfg.seed
    )
    rank, world = dist.get_rank(), dist.get_world_size()
    dp, dp_rank = pg.dp.size(), pg.dp.rank()
    reporter = rank == world - 1  # last stage, last DP rank: logs (like Megatron's print_rank_last)
    device = (
        torch.device("cpu") if cpu_mode() else torch.device("cuda", torch.cuda.current_device())
    )
    tokenizer = _load_tokenizer(cfg, source)
    if source is None and model_cfg.model.vocab_size != len(tokenizer):
        # From scratch: the embedding table is sized by the tokenizer.
        model_cfg.model.vocab_size = len(tokenizer)
    data = build_train_data(
        cfg.train_data,
        tokenizer,
        skip_bad_records=cfg.skip_bad_records,
        global_batch_size=cfg.global_batch_size,
        micro_batch_size=cfg.micro_batch_size,
        num_negatives=cfg.num_negatives,
        max_length=cfg.seq_length,
        dp_rank=dp_rank,
        dp_size=dp,
        seed=cfg.seed,
        stage_in_batch=cfg.in_batch_negatives,
    )
    # Data first: every record is read and checked at open, so bad data stops the run before
    # the model is built or any weight loaded.
    model, lora = build_training_model(cfg, model_cfg, pg, resuming)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    ddp, optimizer, scheduler = _build_optimizer(cfg, model, model_cfg)
    loss_fn = ContrastiveLoss(
        ContrastiveLossConfig(
            temperature=cfg.temperature,
            in_batch_negatives=cfg.in_batch_negatives,
            false_negative_margin=cfg.false_negative_margin,
        ),
        group=pg.dp,
        global_batch_size=cfg.global_batch_size,
    )
    layout = {
        "tp": par.tensor_model_parallel_size,
        "pp": par.pipeline_model_parallel_size,
        "dp": dp,
    }
    iteration, guard = 0, NonFiniteGuard(cfg.max_nonfinite_steps)
    if resuming:
        saved_lora = read_lora(cfg.load)
        if (saved_lora or {}).get("rank") != (lora or {}).get("rank"):
            raise ValueError(
                f"--load {cfg.load}: the checkpoint's LoRA settings ({saved_lora}) differ from "
                f"--lora-rank {cfg.lora.rank}"
            )
        init_empty_adam_state(optimizer)
        state = ckpt.load_training_checkpoint(
            cfg.load, model, optimizer, scheduler, data, layout, cfg.seed
        )
        unshare_adam_steps(optimizer)
        iteration, guard.skipped = state["iteration"], state.get("skipped", 0)
    elif cfg.load and rank == 0:
        logger.info("--load %s holds no checkpoint yet: starting at iteration 0", cfg.load)

    from megatron_nvembed.model.nvembed_model import THD_BACKENDS
    from megatron_nvembed.model.specs import resolve_backend

    thd = resolve_backend(model_cfg.model) in THD_BACKENDS
    step = _Step(cfg, ddp, loss_fn, pg, device, thd=thd)
    if rank == 0:
        logger.info(
            "training %s stage %d: TP=%d PP=%d DP=%d, %d/%d parameters trainable (%s), global "
            "batch %d = %d micro-batch(es) of %d per DP rank, GradCache %s, in-batch negatives %s",
            cfg.recipe,
            cfg.stage,
            layout["tp"],
            layout["pp"],
            dp,
            trainable,
            total,
            f"LoRA r={cfg.lora.rank}" if lora else "full fine-tuning",
            cfg.global_batch_size,
            cfg.global_batch_size // (cfg.micro_batch_size * dp),
            cfg.micro_batch_size,
            "on" if cfg.grad_cache else "off",
            "on" if cfg.in_batch_negatives else "off",
        )
    result = TrainResult(iteration=iteration, skipped=guard.skipped)
    sigterm = _SigtermFlag()
    peak_tflops = _peak_tflops(device)
    window = {"time": 0.0, "tokens": 0, "padded": 0, "sequences": 0, "flops": 0.0, "iters": 0}
    shape = flop_shape(model_cfg, cfg.lora.rank if lora else 0)
    evaluator = _build_evaluator(cfg, tokenizer, model, pg) if cfg.eval_interval else None

    # A run resumed from --save at its last iteration (a finished run relaunched) has nothing
    # new to save.
    saved_at = [iteration if resuming and own_save else None]

    def save(it):
        saved_at[0] = it
        if guard.in_row:
            # The weights are those of the last applied step, but a run whose last step was
            # non-finite is diverging or reading bad data: its checkpoint is never the latest.
            if rank == 0:
                logger.warning(
                    "iteration %d: not saving, the last step was skipped as non-finite (%d in "
                    "a row); the latest checkpoint stays %s",
                    it,
                    guard.in_row,
                    _latest_or_none(cfg.save),
                )
            return
        _require_finite_weights(model, it, cfg.save)
        ckpt.save_training_checkpoint(
            cfg.save,
            it,
            model,
            model_cfg,
            optimizer,
            scheduler,
            data,
            {
                "skipped": guard.skipped,
                "layout": layout,
                "recipe": cfg.recipe,
                "stage": cfg.stage,
                "config": cfg.to_dict(),
            },
            lora,
            _tokenizer_dir(cfg, source),
        )
        if rank == 0:
            logger.info("saved checkpoint %s at iteration %d", cfg.save, it)

    sinks = Sinks()
    try:
        # The JSON log, TensorBoard and W&B get the same records, from the reporting rank only.
        if reporter:
            sinks = build_sinks(cfg)
        model.train()
        while iteration < cfg.train_iters:
            start = time.perf_counter()
            micro_batches = [mb.to(device) for mb in data.next_global_batch()]
            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            step.executed_tokens = 0
            if cfg.grad_cache:
                local_loss = step.grad_cache(micro_batches)
            else:
                local_loss = step.direct(micro_batches)
            # Global-batch mean loss and token counts, agreed on by every rank.
            contributes = step.last_stage and pg.tp.rank() == 0
            lengths = [
                n
                for mb in micro_batches
                for part in (mb.query, mb.candidates)
                for n in part["attention_mask"].sum(dim=1).tolist()
                if n
            ]
            # Model FLOPs from the real lengths (megatron_nvembed/flops.py): padding, masked
            # attention pairs and GradCache's extra forward are not useful work.
            useful = model_step_flops(shape, lengths, 0, 0).total + sum(
                loss_flops(shape, *mb.candidate_mask.shape, cfg.in_batch_negatives).total
                for mb in micro_batches
            )
            seqs = sum(mb.candidate_mask.numel() + mb.in_batch.numel() for mb in micro_batches)
            vec = torch.tensor(
                [
                    float(local_loss) if contributes else 0.0,
                    float(sum(lengths)) * contributes,
                    float(step.executed_tokens) * contributes,
                    float(seqs) * contributes,
                    float(useful) * contributes,
                    0.0,
                ],
                dtype=torch.float64,
                device=device,
            )
            if contributes and not math.isfinite(float(local_loss)):
                vec[0] = float("nan")
            # A finite loss can still come with non-finite gradients (an overflow in the
            # backward): counted here, in the same reduction, so such a step is skipped too and
            # the weights never take a non-finite update.
            vec[5] = _nonfinite_grads(ddp)
            dist.all_reduce(vec)
            loss_value = float(vec[0]) / dp
            iteration += 1
            grad_norm = None
            if guard.update(math.isfinite(loss_value) and float(vec[5]) == 0, iteration):
                with cuda_allocations_on_cpu():
                    _, grad_norm, _ = optimizer.step()
                scheduler.step(increment=1)
            else:
                ddp.zero_grad_buffer()
                optimizer.zero_grad()
            elapsed = time.perf_counter() - start
            result.losses[iteration] = loss_value
            result.iteration, result.skipped = iteration, guard.skipped
            window["time"] += elapsed
            window["tokens"] += int(vec[1])
            window["padded"] += int(vec[2])
            window["sequences"] += int(vec[3])
            window["flops"] += float(vec[4])
            window["iters"] += 1
            stats = loss_fn.pop_stats()
            if iteration % cfg.log_interval == 0 or iteration == cfg.train_iters:
                record = _log_record(
                    iteration,
                    loss_value,
                    optimizer,
                    grad_norm,
                    window,
                    stats,
                    cfg,
                    device,
                    peak_tflops,
                    guard.skipped,
                    time.perf_counter() - started,
                )
                if reporter:
                    logger.info(_log_line(record, stats, cfg), extra=SPEAKER)
                    sinks.write(record, iteration)
                window = {k: 0 for k in window}
            if evaluator is not None and iteration % cfg.eval_interval == 0:
                metrics = evaluator(iteration)
                result.evals[iteration] = metrics
                if reporter:
                    sinks.write({"iteration": iteration, "eval": metrics}, iteration)
            reason = _exit_reason(cfg, iteration, sigterm.raised, started, device)
            if reason is not None:
                if rank == 0:
                    logger.warning(
                        "%s: %s at iteration %d and exiting",
                        reason[1],
                        "saving" if cfg.save else "not saving (no --save)",
                        iteration,
                    )
                result.exit_reason = reason[0]
                break
            if cfg.save and cfg.save_interval and iteration % cfg.save_interval == 0:
                save(iteration)
        if cfg.save and saved_at[0] != iteration:
            save(iteration)
        if rank == 0:
            logger.info(data.summary())
        return result
    finally:
        sigterm.restore()
        sinks.close()


def _nonfinite_grads(ddp) -> torch.Tensor:
    """1.0 when this rank's gradient buffers hold a non-finite value, else 0.0 (a device tensor:
    no host sync; it joins the step's statistics reduction)."""
    buffers = ddp.buffers + ddp.expert_parallel_buffers
    if not buffers:
        return torch.zeros((), dtype=torch.float64)
    finite = torch.stack([torch.isfinite(b.grad_data).all() for b in buffers]).all()
    return (~finite).to(torch.float64)


def _latest_or_none(root) -> str:
    from megatron_nvembed.checkpoint import is_checkpoint_dir, latest_iteration

    if root and is_checkpoint_dir(root):
        return f"iteration {latest_iteration(root)} in {root}"
    return "none (nothing saved yet)"


def _require_finite_weights(model, iteration: int, root) -> None:
    """Refuses to save non-finite weights (every rank checks its own shard; all agree)."""
    bad = torch.zeros((), dtype=torch.float64, device=next(model.parameters()).device)
    for p in model.parameters():
        bad += (~torch.isfinite(p.detach())).any().to(torch.float64)
    dist.all_reduce(bad)
    if bad.item() > 0:
        raise RuntimeError(
            f"iteration {iteration}: the model's weights hold non-finite values; not saving "
            f"them. The latest checkpoint stays {_latest_or_none(root)}: resume from it with a "
            "lower --lr and --override-opt-param-scheduler."
        )


def _exit_reason(
    cfg: TrainingConfig, iteration: int, sigterm: bool, started: float, device
) -> tuple[str, str] | None:
    """Whether the loop stops early after `iteration`, as (exit_reason, log message), or None.

    SIGTERM and `--exit-duration-in-mins` are decided together in one all-reduce (MAX), so every
    rank stops at the same iteration even when only one got the signal or crossed the limit on
    its own clock first; `--exit-interval` depends on the iteration only. Called by every rank.
    """
    minutes = (time.perf_counter() - started) / 60.0
    over_time = cfg.exit_duration_in_mins is not None and minutes > cfg.exit_duration_in_mins
    flags = torch.tensor([float(sigterm), float(over_time)], device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    if flags[0].item() > 0:
        return "sigterm", "SIGTERM received"
    if flags[1].item() > 0:
        return (
            "exit_duration",
            f"--exit-duration-in-mins {cfg.exit_duration_in_mins}: {minutes:.2f} min since "
            "training started",
        )
    if cfg.exit_interval and iteration % cfg.exit_interval == 0:
        return "exit_interval", f"--exit-interval {cfg.exit_interval} reached"
    return None


def _peak_tflops(device) -> float | None:
    if device.type != "cuda":
        return None
    from megatron_nvembed.hardware import gpu_peak_bf16_tflops

    return gpu_peak_bf16_tflops(torch.cuda.get_device_name(device))


def _log_record(
    iteration,
    loss,
    optimizer,
    grad_norm,
    window,
    stats,
    cfg,
    device,
    peak_tflops,
    skipped,
    elapsed_s,
) -> dict:
    """The logged iteration's scalars: the JSON log's line, and what every sink writes."""
    secs = max(window["time"], 1e-9)
    tokens_per_s = window["tokens"] / secs
    # Per GPU, as MFU is: the step's model FLOPs are summed over data-parallel ranks, and each
    # of the world's GPUs holds a TP x PP share of one replica.
    tflops = window["flops"] / secs / 1e12 / dist.get_world_size()
    if device.type == "cuda":
        peak_mem = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        import resource

        peak_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    lr = optimizer.param_groups[0]["lr"]
    iteration_time = secs / max(window["iters"], 1)
    return {
        "iteration": iteration,
        "loss": loss,
        "lr": lr,
        "grad_norm": None if grad_norm is None else float(grad_norm),
        "tokens_per_s": tokens_per_s,
        "padded_tokens_per_s": window["padded"] / secs,
        "sequences_per_s": window["sequences"] / secs,
        "iteration_time_s": iteration_time,
        "tflops": tflops,
        "mfu": None if peak_tflops is None else tflops / peak_tflops,
        "peak_memory_gib": peak_mem,
        "peak_memory_kind": "cuda_max_allocated" if device.type == "cuda" else "process_max_rss",
        "candidates_per_query": None if stats is None else stats.candidates_per_query_mean,
        "candidates_per_query_min": None if stats is None else stats.candidates_per_query_min,
        "in_batch_pool_queries": None if stats is None else stats.pool_queries,
        "gather_seconds": None if stats is None else stats.gather_seconds,
        "gather_bytes": None if stats is None else stats.gather_bytes,
        "skipped_iterations": skipped,
        # Samples (queries) drawn so far, earlier runs of a resumed job included; a skipped
        # step's batch counts, as in Megatron-LM.
        "consumed_samples": iteration * cfg.global_batch_size,
        "elapsed_s": elapsed_s,
        # The window's mean iteration time x the iterations left to --train-iters.
        "eta_s": iteration_time * (cfg.train_iters - iteration),
    }


def _log_line(record, stats, cfg) -> str:
    gn = record["grad_norm"]
    mfu = record["mfu"]
    parts = [
        f"iteration {record['iteration']:>6d}/{cfg.train_iters}",
        f"consumed samples {record['consumed_samples']}",
        f"elapsed {_hms(record['elapsed_s'])}",
        f"ETA {_hms(record['eta_s'])}",
        f"loss {record['loss']:.4f}",
        f"lr {record['lr']:.3e}",
        f"grad norm {gn:.3f}" if gn is not None else "grad norm -",
        f"{record['tokens_per_s']:.0f} tokens/s ({record['padded_tokens_per_s']:.0f} padded)",
        f"{record['sequences_per_s']:.1f} seq/s",
        f"{record['iteration_time_s'] * 1e3:.0f} ms/it",
        f"MFU {mfu:.1%}" if mfu is not None else f"{record['tflops']:.3f} TFLOP/s",
        f"peak mem {record['peak_memory_gib']:.2f} GiB",
    ]
    if stats is not None:
        parts.append(stats.summary(cfg.global_batch_size))
    if record["skipped_iterations"]:
        parts.append(f"skipped {record['skipped_iterations']}")
    return " | ".join(parts)


def _hms(seconds: float) -> str:
    """`H:MM:SS` (hours unbounded)."""
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _build_evaluator(cfg: TrainingConfig, tokenizer, model, pg):
    """In-training validation on BEIR-format folders: nDCG@10, recall@k (rank 0 logs)."""
    from megatron_nvembed.training.validation import Validator

    return Validator(cfg, tokenizer, model, pg)
