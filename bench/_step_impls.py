"""The implementations `bench/train_step.py` times, and the batches they share.

- `synthetic_texts` / `micro_batch`: seeded token lists at NV-Embed's batch shape, collated as the
  trainer's `EmbeddingBatch` (right-padded as the project's collator pads, or to a fixed width).
- `Ours`: the trainer's model, optimizer and loss (`build_model` + `apply_lora`,
  `training.optimizer.build_optimizer`: megatron-core DDP at DP = 1, its Adam and the LR
  schedule; `ContrastiveLoss`); `OursStep` is one of its step runners (`training.step.StepRunner`
  with a layout and GradCache on or off), stepped as `training.trainer.train` steps.
- `Baseline`: transformers' `MistralModel` + peft LoRA + NV-Embed's plain-torch latent head, torch
  AdamW with gradient clipping and a linear schedule, one backward per micro-batch.

Both lay their micro-batches out with `training.step.plan_micro_batch` (the baseline with no
buckets and no packing: one call for the queries, one for the candidates), so the bench has no
layout code of its own.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import torch

from megatron_nvembed.core.loss_inputs import LossInputs
from megatron_nvembed.data.buckets import bucket_width
from megatron_nvembed.data.collate import EmbeddingBatch
from megatron_nvembed.training.config import TrainingConfig
from megatron_nvembed.training.setup import step_plan
from megatron_nvembed.utils.hashing import sequence_hash

BOS, EOS = 1, 2  # EOS doubles as the padding id, as the project's tokenizers do
LORA_TARGETS_HF = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

LAYOUT_DOC = {
    "buckets": "--length-bucket-size (default 8): queries and candidates each in length-sorted "
    "calls of that many texts, each call cut to its longest text rounded up to 8",
    "padded": "the trainer without a layout flag: one call for the queries and one for the "
    "candidates, each padded to its longest text rounded up to 8 (the baseline's layout)",
    "pad512": "the trainer without a layout flag on texts padded to the cap (--max-length), as a "
    "fixed-length collator pads: one call per kind",
    "packed": "--pack-sequences (rows of --max-length): queries and candidates packed together "
    "into one call, run as THD on the sdpa backend (real tokens only, attention per text)",
}
LAYOUTS = tuple(LAYOUT_DOC)


@dataclass(frozen=True)
class Shape:
    """A step's texts: sizes and length ranges (inclusive, in tokens)."""

    batch_size: int
    negatives: int
    micro_batches: int
    query_len: tuple[int, int]
    passage_len: tuple[int, int]
    instruction_len: tuple[int, int]
    max_length: int
    vocab_size: int
    seed: int


Text = tuple[list[int], int]  # token ids (BOS ... EOS), leading positions out of pooling


def synthetic_texts(shape: Shape, index: int) -> list[tuple[list[Text], list[Text], int]]:
    """Step `index`'s micro-batches: (B queries, B x (1 + K) passages, texts cut at the cap).

    Queries: BOS + instruction + query + EOS, total length uniform in `query_len`, the first
    `instruction` positions (BOS included) out of pooling; passages: BOS + text + EOS, length
    uniform in `passage_len`; a text longer than `max_length` is cut there (and loses its EOS).
    """
    r = random.Random(shape.seed * 1_000_003 + index)

    def text(lengths, instruction=(0, 0)) -> tuple[Text, bool]:
        n = r.randint(*lengths)
        ids = [BOS] + [r.randrange(3, shape.vocab_size) for _ in range(n - 2)] + [EOS]
        skip = min(r.randint(*instruction), n - 1) if instruction[1] else 0
        return (ids[: shape.max_length], skip), n > shape.max_length

    out = []
    for _ in range(shape.micro_batches):
        q = [text(shape.query_len, shape.instruction_len) for _ in range(shape.batch_size)]
        n_passages = shape.batch_size * (1 + shape.negatives)
        p = [text(shape.passage_len) for _ in range(n_passages)]
        out.append(([t for t, _ in q], [t for t, _ in p], sum(cut for _, cut in q + p)))
    return out


def padded(texts: list[Text], width: int) -> dict[str, torch.Tensor]:
    """`input_ids` / `attention_mask` / `pool_mask`, each [n, width], right-padded with EOS."""
    ids = torch.full((len(texts), width), EOS, dtype=torch.long)
    mask = torch.zeros(len(texts), width, dtype=torch.long)
    for i, (tokens, _) in enumerate(texts):
        ids[i, : len(tokens)] = torch.tensor(tokens)
        mask[i, : len(tokens)] = 1
    pool = mask.clone()
    for i, (_, skip) in enumerate(texts):
        pool[i, :skip] = 0
    return {"input_ids": ids, "attention_mask": mask, "pool_mask": pool}


def micro_batch(
    queries: list[Text], passages: list[Text], truncated: int, cap: int, to_cap: bool
) -> EmbeddingBatch:
    """The texts as the trainer's collator hands them over: each kind padded to its longest
    text rounded up to 8 (`to_cap`: to `cap`); every candidate present, in-batch on."""

    def width(texts):
        return cap if to_cap else bucket_width(max(len(t) for t, _ in texts), 8, cap)

    b = len(queries)
    q, c = padded(queries, width(queries)), padded(passages, width(passages))
    inputs = LossInputs(
        candidate_mask=torch.ones(b, len(passages) // b, dtype=torch.bool),
        in_batch=torch.ones(b, dtype=torch.bool),
        candidate_ids=sequence_hash(c["input_ids"], c["attention_mask"]).view(b, -1),
        query_ids=sequence_hash(q["input_ids"], q["attention_mask"]),
    )
    return EmbeddingBatch(
        query=q,
        candidates=c,
        loss_inputs=inputs,
        dataset_index=torch.zeros(b, dtype=torch.long),
        truncated=truncated,
    )


def layout_plan(cfg: TrainingConfig, model_cfg, layout: str, thd: bool | None = None):
    """The trainer's plan (`training.setup.step_plan`) for `cfg` with `layout`'s trainer settings
    (checked by `TrainingConfig.validate`); `cfg.data.length_bucket_size` is the size `buckets`
    uses; `thd` as `step_plan`'s."""
    data = replace(
        cfg.data,
        length_bucket_size=cfg.data.length_bucket_size if layout == "buckets" else 0,
        pack_sequences=layout == "packed",
    )
    cfg = replace(cfg, data=data).validate()
    return step_plan(cfg, model_cfg, thd)


class Ours:
    """The trainer's model, optimizer, schedule and loss, built as `training.setup.build` builds
    them (TP = PP = DP = 1); `weights`: an NV-Embed-layout state dict to start from."""

    def __init__(self, cfg: TrainingConfig, pg, device, weights: dict | None = None):
        from megatron_nvembed.conversion.hf_mapping import load_hf_into_model
        from megatron_nvembed.loss import ContrastiveLoss
        from megatron_nvembed.model.build import build_model
        from megatron_nvembed.model.lora import apply_lora
        from megatron_nvembed.training.optimizer import build_optimizer
        from megatron_nvembed.training.start import StartingPoint, model_config

        self.cfg, self.pg, self.device = cfg, pg, device
        self.model_cfg = model_config(cfg, StartingPoint("scratch"))
        self.model = build_model(self.model_cfg, pg)
        if weights is not None:
            load_hf_into_model(
                self.model, weights, self.model_cfg, 0, 0, backbone_prefix="embedding_model."
            )
        if cfg.lora.rank > 0:
            apply_lora(self.model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, seed=cfg.seed)
        self.ddp, self.optimizer, self.scheduler = build_optimizer(
            cfg.optimizer, self.model, self.model_cfg
        )
        self.loss_fn = ContrastiveLoss(
            cfg.loss, group=pg.dp, global_batch_size=cfg.data.global_batch_size
        )


class OursStep:
    """One layout and GradCache setting of `Ours`: `step` is `training.trainer.train`'s step
    without its statistics, guards and logging."""

    def __init__(self, ours: Ours, layout: str, grad_cache: bool):
        from megatron_nvembed.training.step import StepRunner

        self.ours, self.layout, self.grad_cache = ours, layout, grad_cache
        self.params = sum(p.numel() for p in ours.model.parameters() if p.requires_grad)
        self.total_params = sum(p.numel() for p in ours.model.parameters())
        plan = layout_plan(ours.cfg, ours.model_cfg, layout)
        self.runner = StepRunner(
            ours.ddp, ours.loss_fn, ours.pg, grad_cache=grad_cache, plan=plan, device=ours.device
        )

    def step(self, micro_batches: list[EmbeddingBatch]):
        """One optimizer step; returns (loss tensor, the planned micro-batches)."""
        from megatron_nvembed.core.cpu_support import cuda_allocations_on_cpu

        o = self.ours
        batches = self.runner.prepare(micro_batches)
        o.ddp.zero_grad_buffer()
        o.optimizer.zero_grad()
        loss = self.runner.run(batches)
        with cuda_allocations_on_cpu():
            o.optimizer.step()
        o.scheduler.step(increment=1)
        o.loss_fn.pop_stats()  # the trainer pops them for its log line every step
        return loss, batches

    def embed(self, mb: EmbeddingBatch) -> torch.Tensor:
        """[b + b*n, d] embeddings of one micro-batch's queries then candidates, eval mode."""
        self.ours.model.eval()
        with torch.no_grad():
            out = self.runner.forward(0, self.runner.prepare([mb])[0])
        self.ours.model.train()
        return out


def hf_reference(cfg, seed: int, device, dtype):
    """transformers `MistralModel` (SDPA, padding-only 4-D mask) + the plain-torch latent head."""
    from megatron_nvembed.testing.reference import ReferenceEmbedder

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            ref = ReferenceEmbedder(cfg)
    finally:
        torch.set_default_dtype(previous)
    ref.embedding_model.set_attn_implementation("sdpa")
    return ref


class Baseline:
    """A typical transformers + peft training step of the same model: `ReferenceEmbedder` with
    peft LoRA (same rank / alpha / dropout, adapters in the base dtype), the head trainable,
    `contrastive_loss`, torch AdamW (fused on CUDA), `clip_grad_norm_` and a linear schedule.
    Micro-batches are accumulated (one backward each, in-batch negatives within a micro-batch).
    """

    layout, grad_cache = "padded", False

    def __init__(self, cfg: TrainingConfig, ref, device, total_steps: int):
        from peft import LoraConfig, get_peft_model

        self.cfg, self.ref, self.device = cfg, ref, device
        ref.embedding_model = get_peft_model(
            ref.embedding_model,
            LoraConfig(
                r=cfg.lora.rank,
                lora_alpha=cfg.lora.alpha,
                lora_dropout=cfg.lora.dropout,
                target_modules=LORA_TARGETS_HF,
                bias="none",
            ),
            autocast_adapter_dtype=False,
        )
        for p in ref.latent_attention_model.parameters():
            p.requires_grad_(True)
        self.trainable = [p for p in ref.parameters() if p.requires_grad]
        self.params = sum(p.numel() for p in self.trainable)
        self.total_params = sum(p.numel() for p in ref.parameters())
        self.opt = torch.optim.AdamW(
            self.trainable,
            lr=cfg.optimizer.lr,
            betas=(cfg.optimizer.adam_beta1, cfg.optimizer.adam_beta2),
            eps=cfg.optimizer.adam_eps,
            weight_decay=cfg.optimizer.weight_decay,
            fused=device.type == "cuda" or None,
        )
        self.schedule = torch.optim.lr_scheduler.LinearLR(
            self.opt, 1.0, 0.0, total_iters=max(total_steps, 1)
        )
        self.plan = layout_plan(cfg, cfg.model, self.layout, thd=False)

    def forward(self, mb) -> torch.Tensor:
        out = torch.cat([self.ref(**call) for call in mb.calls])
        return out if mb.restore is None else out[mb.restore]

    def step(self, micro_batches: list[EmbeddingBatch]):
        """One optimizer step; returns (mean loss over the micro-batches, the planned batches)."""
        from megatron_nvembed.loss import ContrastiveLossConfig, contrastive_loss

        settings = ContrastiveLossConfig(temperature=self.cfg.loss.temperature)
        batches = [self.plan(mb).to(self.device) for mb in micro_batches]
        self.opt.zero_grad(set_to_none=True)
        total = 0.0
        for mb in batches:
            out = self.forward(mb)
            b, n = mb.loss_inputs.shape
            loss, _ = contrastive_loss(out[:b], out[b:].view(b, n, -1), mb.loss_inputs, settings)
            loss = loss / len(batches)
            loss.backward()
            total = total + loss.detach()
        if self.cfg.optimizer.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.optimizer.clip_grad)
        self.opt.step()
        self.schedule.step()
        return total, batches

    def embed(self, mb: EmbeddingBatch) -> torch.Tensor:
        self.ref.eval()
        with torch.no_grad():
            out = self.forward(self.plan(mb).to(self.device))
        self.ref.train()
        return out
