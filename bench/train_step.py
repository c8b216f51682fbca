"""Training-step benchmark: NVEmbedModel (megatron-core, this project) against a typical
transformers + peft implementation of the same model, at NV-Embed's batch shape.

    python bench/train_step.py --preset tiny --output bench/results/cpu-tiny.json
    python bench/train_step.py --preset mistral-7b-width --layers 4 --device cuda --output r.json

One step = forward of B queries and B x (1 + K) passages, latent-attention pooling, InfoNCE loss
(own + in-batch candidates), backward, AdamW step, on a frozen base with LoRA adapters and a
trainable pooling head. Each implementation runs in its own subprocess (its own peak memory, no
shared allocator or megatron-core global state), on the same seeded batches, after the same
warm-up; reported numbers are medians over the timed steps. What is counted: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))  # megatron_nvembed without an install

from megatron_nvembed.flops import (  # noqa: E402
    Call,
    FlopShape,
    attention_flops,
    flop_shape as config_flop_shape,
    model_step_flops,
    packed_call,
    split_adapter_flops,
    train_step_flops,
)
from megatron_nvembed.fileio import write_atomic  # noqa: E402
from megatron_nvembed.hardware import GPU_PEAK_BF16_TFLOPS  # noqa: E402

# ----------------------------------------------------------------------------- configuration

PRESETS = {
    # A small Mistral-shaped model that keeps NV-Embed's structure (GQA 4:1, SwiGLU 3x, latent
    # head with K/V from a latent array, GEGLU 4x) and runs a step in seconds on 2 CPU cores.
    "tiny": dict(
        model=dict(
            vocab_size=32000,
            hidden_size=256,
            ffn_hidden_size=768,
            num_layers=4,
            num_attention_heads=8,
            num_query_groups=2,
        ),
        pooling=dict(num_latents=64, num_heads=4, head_dim=64, ff_mult=4),
        batch_size=4,
        length_scale=0.5,
        warmup=1,
        weights="shared",
    ),
    # Mistral-7B's width (NV-Embed-v1's backbone) and NV-Embed's head (512 latents, 8 heads of
    # width 4096); --layers N cuts the depth to fit a device or a time budget.
    "mistral-7b-width": dict(
        model=dict(
            vocab_size=32000,
            hidden_size=4096,
            ffn_hidden_size=14336,
            num_layers=32,
            num_attention_heads=32,
            num_query_groups=8,
        ),
        pooling=dict(num_latents=512, num_heads=8, head_dim=4096, ff_mult=4),
        batch_size=2,
        length_scale=1.0,
        warmup=2,
        weights="independent",
    ),
}


LAYOUTS = ("buckets", "pad512", "packed")
LAYOUT_DOC = {
    "buckets": "length-sorted buckets of --bucket-size rows, each padded to its longest row "
    "(rounded up to --pad-multiple); queries and passages bucketed separately",
    "pad512": "every text padded to the cap (--max-length); one call for the queries and one for "
    "the passages (the padded layout of a fixed-length collator)",
    "packed": "queries and passages packed separately (pack_batch, pack_length = --max-length) "
    "into one call each; the sdpa backend runs the packed rows in megatron-core's THD layout "
    "(real tokens only, per-text attention) and the latent head pools those tokens as they "
    "are, so neither computes padding",
}
LORA_TARGETS_HF = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BOS, EOS = 1, 2


@dataclass
class Plan:
    """Everything a worker needs; written by the parent as JSON."""

    preset: str
    model: dict
    pooling: dict
    device: str
    dtype: str
    batch_size: int
    negatives: int
    query_len: tuple[int, int]
    passage_len: tuple[int, int]
    instruction_len: tuple[int, int]
    max_length: int
    bucket_size: int
    pad_multiple: int
    lora_rank: int
    lora_alpha: float
    lora_dropout: float
    lr: float
    temperature: float
    warmup: int
    steps: int
    repeats: int
    length_scale: float
    seed: int
    threads: int
    weights: str
    weights_file: str | None = None
    profile_dir: str | None = None
    check_flops: bool = False
    layout: str = "buckets"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--layers", type=int, default=None, help="override the preset's depth")
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default=None,
        help="default: cuda when available, else cpu",
    )
    p.add_argument("--steps", type=int, default=5, help="timed steps per round (median reported)")
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed steps first (default: tiny 1, else 2)"
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="rounds, run interleaved (ours, baseline, ours, ...), each in a fresh process with "
        "its own warm-up; medians over the timed steps of all rounds (evens out a shared "
        "machine's changing load)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="queries per step B (default: tiny 4, mistral-7b-width 2); each has "
        "1 positive + --negatives hard negatives",
    )
    p.add_argument("--negatives", type=int, default=7, help="hard negatives per query (paper: 7)")
    p.add_argument(
        "--length-scale",
        type=float,
        default=None,
        help="multiply the paper's length ranges (queries 20-60, passages 80-400); "
        "default: tiny 0.5, mistral-7b-width 1",
    )
    p.add_argument("--max-length", type=int, default=512, help="token cap per text")
    p.add_argument(
        "--bucket-size",
        type=int,
        default=8,
        help="ours: sequences per length bucket (queries and passages bucketed "
        "separately); 0 = one bucket per kind (dynamic padding only)",
    )
    p.add_argument(
        "--pad-multiple",
        type=int,
        default=8,
        help="ours: bucket width rounded up to this (as the project's collator)",
    )
    p.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="buckets",
        help="ours' sequence layout: buckets (length buckets, padded per bucket); pad512 (every "
        "text padded to --max-length, one call per kind); packed (pack_batch into rows of "
        "--max-length, run as THD: real tokens only). The baseline always pads per kind",
    )
    p.add_argument(
        "--compare-layouts",
        action="store_true",
        help="run ours with --layout pad512 and with --layout packed on the same batches (no "
        "baseline); writes {pad512, packed, useful_tokens_speedup, parity_max_abs}",
    )
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--lora-dropout", type=float, default=0.1, help="NV-Embed: 0.1")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--temperature", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument(
        "--weights",
        choices=["shared", "independent"],
        default=None,
        help="shared: both start from one saved HF-layout state dict (copied into "
        "ours via conversion/hf_mapping) and their embeddings are compared; "
        "independent: each initialises its own (same shapes and seed). "
        "Default: tiny shared, mistral-7b-width independent",
    )
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="device peak for MFU (default: table for known GPUs; none on CPU)",
    )
    p.add_argument("--only", choices=["ours", "baseline"], default=None)
    p.add_argument(
        "--paired",
        action="store_true",
        help="run both implementations in one process, alternating step by step on the same "
        "batches, so both see the same machine load (for shared machines; CPU memory is then "
        "not measured)",
    )
    p.add_argument(
        "--profile",
        default=None,
        metavar="DIR",
        help="also profile one extra step per implementation (torch.profiler); "
        "tables written to DIR",
    )
    p.add_argument(
        "--check-flops",
        action="store_true",
        help="also run one extra step per implementation under torch.utils.flop_counter and "
        "record its count next to the analytic one (config.flop_check)",
    )
    p.add_argument("--output", required=True, help="RESULT.json")
    p.add_argument("--worker", choices=["ours", "baseline", "paired"], help=argparse.SUPPRESS)
    p.add_argument("--plan", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def make_plan(args) -> Plan:
    import torch

    preset = PRESETS[args.preset]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    if device == "cpu" and torch.cuda.is_available():
        # megatron_nvembed places models on CUDA whenever it exists (cpu_support.cpu_mode).
        raise SystemExit("--device cpu on a CUDA machine: run with CUDA_VISIBLE_DEVICES=''")
    model = dict(preset["model"])
    if args.layers is not None:
        if args.layers < 1:
            raise SystemExit(f"--layers must be >= 1, got {args.layers}")
        model["num_layers"] = args.layers
    scale = args.length_scale if args.length_scale is not None else preset["length_scale"]
    warmup = args.warmup if args.warmup is not None else preset["warmup"]
    if scale <= 0:
        raise SystemExit(f"--length-scale must be > 0, got {scale}")

    def rng(lo, hi):
        return (max(4, round(lo * scale)), max(4, round(hi * scale)))

    for name, value, least in (
        ("steps", args.steps, 1),
        ("warmup", warmup, 0),
        ("repeats", args.repeats, 1),
        ("negatives", args.negatives, 0),
        ("lora-rank", args.lora_rank, 1),
        ("batch-size", args.batch_size or 1, 1),
    ):
        if value < least:
            raise SystemExit(f"--{name} must be >= {least}, got {value}")
    return Plan(
        preset=args.preset,
        model=model,
        pooling=dict(preset["pooling"]),
        device=device,
        dtype="bfloat16" if device == "cuda" else "float32",
        batch_size=args.batch_size or preset["batch_size"],
        negatives=args.negatives,
        query_len=rng(20, 60),
        passage_len=rng(80, 400),
        instruction_len=rng(8, 16),
        max_length=args.max_length,
        bucket_size=args.bucket_size,
        pad_multiple=args.pad_multiple,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        lr=args.lr,
        temperature=args.temperature,
        warmup=warmup,
        steps=args.steps,
        repeats=args.repeats,
        length_scale=scale,
        seed=args.seed,
        threads=args.threads or os.cpu_count() or 1,
        weights=args.weights or preset["weights"],
        profile_dir=args.profile,
        check_flops=args.check_flops,
        layout=args.layout,
    )


def embedding_config(plan: Plan):
    from megatron_nvembed.config import (
        EmbeddingModelConfig,
        ModelConfig,
        ParallelConfig,
        PoolingConfig,
    )

    return EmbeddingModelConfig(
        model=ModelConfig(
            **plan.model,
            mask_type="bidirectional",
            attention_backend="sdpa",
            bf16=plan.dtype == "bfloat16",
        ),
        pooling=PoolingConfig(type="latent", **plan.pooling),
        parallel=ParallelConfig(),
    ).validate()


def flop_shape(plan: Plan) -> FlopShape:
    """The FLOP count's sizes of the plan's model (LoRA on the frozen decoder)."""
    return config_flop_shape(embedding_config(plan), plan.lora_rank)


# ----------------------------------------------------------------------------- data


@dataclass
class Seq:
    ids: list[int]
    instruction: int  # leading positions out of pooling (0 for passages)


def make_batch(plan: Plan, index: int) -> tuple[list[Seq], list[Seq]]:
    """B queries and B x (1 + K) passages with seeded random lengths and tokens.

    Queries: BOS + instruction + query + EOS, total length uniform in `query_len`, the first
    `instruction` positions (BOS included) out of pooling; passages: BOS + text + EOS, length
    uniform in `passage_len`; everything capped at `max_length` (a capped text loses its EOS).
    """
    import random

    r = random.Random(plan.seed * 1_000_003 + index)
    vocab = plan.model["vocab_size"]

    def seq(lo, hi, instr=(0, 0)):
        n = min(r.randint(lo, hi), plan.max_length)
        ids = [BOS] + [r.randrange(3, vocab) for _ in range(n - 2)] + [EOS]
        return Seq(ids[: plan.max_length], min(r.randint(*instr), n - 1) if instr[1] else 0)

    queries = [seq(*plan.query_len, plan.instruction_len) for _ in range(plan.batch_size)]
    passages = [seq(*plan.passage_len) for _ in range(plan.batch_size * (1 + plan.negatives))]
    return queries, passages


def pad(seqs: list[Seq], width: int):
    """Right-padded [rows, width] input_ids / attention_mask / pool_mask (pad id = EOS)."""
    import torch

    ids = torch.full((len(seqs), width), EOS, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s.ids)] = torch.tensor(s.ids)
        mask[i, : len(s.ids)] = 1
    pool = mask.clone()
    for i, s in enumerate(seqs):
        pool[i, : s.instruction] = 0
    return ids, mask, pool


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple if multiple > 1 else n


def bucketize(seqs: list[Seq], bucket_size: int, multiple: int, cap: int):
    """Sorts by length, cuts into buckets of `bucket_size` rows, pads each to its own longest row
    (rounded up to `multiple`, capped at `cap`). Returns ([(ids, mask, pool)], inverse order)."""
    import torch

    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].ids))
    size = bucket_size if bucket_size > 0 else len(seqs)
    buckets = []
    for start in range(0, len(order), size):
        members = [seqs[i] for i in order[start : start + size]]
        width = min(round_up(max(len(s.ids) for s in members), multiple), cap)
        buckets.append(pad(members, width))
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return buckets, inverse


@dataclass
class Prepared:
    """One step's device tensors for one implementation."""

    query_calls: list  # [(ids, mask, pool)]
    passage_calls: list
    query_inverse: object  # LongTensor or None (no reordering)
    passage_inverse: object
    candidate_ids: object  # [B, 1 + K] int64
    real_tokens: int
    padded_tokens: int
    sequences: int
    calls: list  # [(rows, width)] dense calls, or flops.Call for packed ones
    lengths: list  # real lengths of every sequence
    layout: str = "buckets"
    row_padding_fraction: float | None = None  # packed: padding share of the [rows, L] rows


def prepare(plan: Plan, impl: str, batch, device) -> Prepared:

    from megatron_nvembed.loss import sequence_hash

    queries, passages = batch
    layout = plan.layout if impl == "ours" else "baseline"
    calls = row_padding = None
    if layout == "packed":
        (qc, qinv, qcall, qrows), (pc, pinv, pcall, prows) = (
            pack_kind(seqs, plan.max_length, plan.pad_multiple) for seqs in (queries, passages)
        )
        calls = [qcall, pcall]
        row_padding = 1 - (qcall.tokens + pcall.tokens) / (qrows + prows)
    elif layout == "pad512":
        qc, pc = [pad(queries, plan.max_length)], [pad(passages, plan.max_length)]
        qinv = pinv = None
    elif layout == "buckets":
        qc, qinv = bucketize(queries, plan.bucket_size, plan.pad_multiple, plan.max_length)
        pc, pinv = bucketize(passages, plan.bucket_size, plan.pad_multiple, plan.max_length)
    else:  # typical HF trainer: queries and passages each padded to their longest row
        qc = [pad(queries, max(len(s.ids) for s in queries))]
        pc = [pad(passages, max(len(s.ids) for s in passages))]
        qinv = pinv = None
    ids, mask, _ = pad(passages, max(len(s.ids) for s in passages))
    cand = sequence_hash(ids, mask).view(plan.batch_size, 1 + plan.negatives)
    move = lambda calls: [tuple(t.to(device) for t in c) for c in calls]  # noqa: E731
    if calls is None:
        calls = [tuple(c[0].shape) for c in qc + pc]
    return Prepared(
        query_calls=move(qc),
        passage_calls=move(pc),
        query_inverse=None if qinv is None else qinv.to(device),
        passage_inverse=None if pinv is None else pinv.to(device),
        candidate_ids=cand.to(device),
        real_tokens=sum(len(s.ids) for s in queries + passages),
        # positions the decoder computes: rows x width, or (THD) the real tokens
        padded_tokens=sum(c.tokens if isinstance(c, Call) else c[0] * c[1] for c in calls),
        sequences=len(queries) + len(passages),
        calls=calls,
        lengths=[len(s.ids) for s in queries + passages],
        layout=layout,
        row_padding_fraction=row_padding,
    )


def pack_kind(seqs: list[Seq], cap: int, multiple: int):
    """One packed call of `seqs` (pack_batch: first-fit decreasing into rows of `cap` tokens).

    Returns ([(ids, mask, pool, segment_ids)] each [rows, L], restore [n] (packed order ->
    original order), the call's flops.Call (THD: real tokens; head: n x longest text), rows x L).
    """
    from megatron_nvembed.data.packing import pack_batch

    ids, mask, pool = pad(seqs, max(len(s.ids) for s in seqs))
    packed = pack_batch(
        {"input_ids": ids, "attention_mask": mask, "pool_mask": pool},
        pack_length=cap,
        pad_to_multiple_of=multiple,
    )
    rows, width = packed.input_ids.shape
    call = packed_call([len(s.ids) for s in seqs], rows, width, thd=True)
    inputs = (packed.input_ids, packed.attention_mask, packed.pool_mask, packed.segment_ids)
    return [inputs], packed.restore, call, rows * width


# ----------------------------------------------------------------------------- models


def hf_reference(plan: Plan, cfg, device, dtype):
    """transformers MistralModel (SDPA, padding-only 4-D mask) + the plain-torch latent head."""
    import torch

    from megatron_nvembed.reference import ReferenceEmbedder

    torch.manual_seed(plan.seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            ref = ReferenceEmbedder(cfg)
    finally:
        torch.set_default_dtype(previous)
    ref.embedding_model.set_attn_implementation("sdpa")
    return ref


def build_baseline(plan: Plan, cfg, device, dtype):
    """Returns (embed(calls, inverse) -> [rows, d], trainable params, module)."""
    import torch
    from peft import LoraConfig, get_peft_model

    ref = hf_reference(plan, cfg, device, dtype)
    if plan.weights_file:
        state = torch.load(plan.weights_file, map_location=device)
        missing, unexpected = ref.load_state_dict(
            {k: v.to(dtype) for k, v in state.items()}, strict=False
        )
        if unexpected or any(not k.endswith("inv_freq") for k in missing):
            raise RuntimeError(f"weights file mismatch: {missing} {unexpected}")
    ref.embedding_model = get_peft_model(
        ref.embedding_model,
        LoraConfig(
            r=plan.lora_rank,
            lora_alpha=plan.lora_alpha,
            lora_dropout=plan.lora_dropout,
            target_modules=LORA_TARGETS_HF,
            bias="none",
        ),
        autocast_adapter_dtype=False,  # adapters in the base dtype, as ours
    )
    for p in ref.latent_attention_model.parameters():
        p.requires_grad_(True)

    def embed(calls, inverse):
        ((ids, mask, pool),) = calls
        return ref(ids, mask, pool)

    return embed, [p for p in ref.parameters() if p.requires_grad], ref


def build_ours(plan: Plan, cfg, device, dtype):
    """Returns (embed(calls, inverse) -> [rows, d], trainable params, module)."""
    import torch

    from megatron_nvembed.conversion.hf_mapping import load_hf_into_model
    from megatron_nvembed.model.build import build_model
    from megatron_nvembed.model.lora import apply_lora
    from megatron_nvembed.testing import init_single_process_megatron

    pg = init_single_process_megatron(seed=plan.seed)
    model = build_model(cfg, pg, params_dtype=dtype)
    if plan.weights_file:
        state = torch.load(plan.weights_file, map_location="cpu")
        load_hf_into_model(model, state, cfg, 0, 0, backbone_prefix="embedding_model.")
        del state
    apply_lora(model, plan.lora_rank, plan.lora_alpha, plan.lora_dropout, seed=plan.seed)

    def embed(calls, inverse):
        # (ids, mask, pool) or, packed, (ids, mask, pool, segment_ids): [n_texts, d] each
        outs = [model(*c) for c in calls]
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return out if inverse is None else out[inverse]

    return embed, [p for p in model.parameters() if p.requires_grad], model


# ----------------------------------------------------------------------------- worker


class RSSSampler:
    """Peak resident set size while running (Linux /proc/self/statm, sampled every ~2 ms)."""

    def __init__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = self.start = self.current()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def current(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self.current())

    def __enter__(self):
        self.start = self.peak = self.current()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())


class Runner:
    """One implementation, ready to step: model, optimizer, loss and its prepared batches."""

    def __init__(self, plan: Plan, impl: str, device, dtype):
        import torch

        from megatron_nvembed.loss import ContrastiveLoss, ContrastiveLossConfig, contrastive_loss

        self.impl, self.device = impl, device
        self.cuda = device.type == "cuda"
        cfg = embedding_config(plan)
        t0 = time.perf_counter()
        builder = build_ours if impl == "ours" else build_baseline
        self.embed, self.params, self.module = builder(plan, cfg, device, dtype)
        self.build_seconds = time.perf_counter() - t0
        self.b, self.n = plan.batch_size, 1 + plan.negatives
        cand_mask = torch.ones(self.b, self.n, dtype=torch.bool, device=device)
        in_batch = torch.ones(self.b, dtype=torch.bool, device=device)
        if impl == "ours":
            loss_mod = ContrastiveLoss(
                ContrastiveLossConfig(temperature=plan.temperature, in_batch_negatives=True),
                group=self.module.pg_collection.dp,
            )
            self.loss_fn = lambda q, c, ids: loss_mod(q, c, cand_mask, in_batch, ids)
        else:
            self.loss_fn = lambda q, c, ids: contrastive_loss(
                q, c, cand_mask, temperature=plan.temperature, in_batch=in_batch, candidate_ids=ids
            )[0]
        self.batches = [
            prepare(plan, impl, make_batch(plan, i), device)
            for i in range(plan.warmup + plan.steps)
        ]
        self.opt = torch.optim.AdamW(self.params, lr=plan.lr, fused=self.cuda or None)

    def first_batch_embeddings(self) -> dict:
        """Embeddings of batch 0 before any update, in eval mode (no dropout): parity check."""
        import torch

        self.module.eval()
        with torch.no_grad():
            p = self.batches[0]
            out = {
                "query": self.embed(p.query_calls, p.query_inverse).float().cpu(),
                "passage": self.embed(p.passage_calls, p.passage_inverse).float().cpu(),
            }
        self.module.train()
        return out

    @property
    def latent_kv_calls(self) -> int | None:
        """Latent K/V projections per step for the FLOP count: ours projects once per step (as
        the trainer does), the baseline once per forward call (None)."""
        return 1 if self.impl == "ours" else None

    def step(self, p: Prepared):
        self.opt.zero_grad(set_to_none=True)
        with self.step_context():
            q = self.embed(p.query_calls, p.query_inverse)
            c = self.embed(p.passage_calls, p.passage_inverse).view(self.b, self.n, -1)
            loss = self.loss_fn(q, c, p.candidate_ids)
            loss.backward()
        self.opt.step()
        return loss.detach()

    def step_context(self):
        """Ours: `latent_kv_once_per_step`, as the trainer wraps each step (the step's forward
        calls share one latent K/V projection, its gradient sent back once after backward)."""
        if self.impl != "ours":
            return contextlib.nullcontext()
        from megatron_nvembed.model.pooling import latent_kv_once_per_step

        return latent_kv_once_per_step([self.module])

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)


def run_worker(plan: Plan, impl: str, out_path: str) -> None:
    """impl "ours" / "baseline": one implementation in this process; "paired": both, alternating
    step by step on the same batches (same machine load for both; no CPU memory figure)."""
    import gc
    import resource

    import torch

    torch.set_num_threads(plan.threads)
    device = torch.device(plan.device)
    dtype = getattr(torch, plan.dtype)
    impls = ["ours", "baseline"] if impl == "paired" else [impl]
    runners = {i: Runner(plan, i, device, dtype) for i in impls}
    for i, r in runners.items():
        torch.save(r.first_batch_embeddings(), f"{out_path}.{i}.emb.pt")
    shape = flop_shape(plan)
    records = {i: [] for i in impls}
    losses = {i: [] for i in impls}
    transient = {i: 0 for i in impls}
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        mem_before = torch.cuda.memory_allocated(device)
    with RSSSampler() as rss:
        for k in range(plan.warmup + plan.steps):
            order = impls if k % 2 == 0 else impls[::-1]  # paired: alternate who goes first
            for i in order:
                r = runners[i]
                p = r.batches[k]
                if device.type == "cuda" and len(impls) > 1:
                    torch.cuda.reset_peak_memory_stats(device)
                    base = torch.cuda.memory_allocated(device)
                r.sync()
                start, cpu_start = time.perf_counter(), time.process_time()
                loss = r.step(p)
                r.sync()
                elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
                if device.type == "cuda" and len(impls) > 1:
                    peak = torch.cuda.max_memory_allocated(device) - base
                    transient[i] = max(transient[i], peak)
                losses[i].append(float(loss))
                if k < plan.warmup:
                    continue
                records[i].append(
                    dict(
                        seconds=elapsed,
                        cpu_seconds=cpu,
                        real_tokens=p.real_tokens,
                        padded_tokens=p.padded_tokens,
                        sequences=p.sequences,
                        forward_calls=len(p.calls),
                        latent_kv_projections=r.latent_kv_calls or len(p.calls),
                        row_padding_fraction=p.row_padding_fraction,
                        model_flops=model_step_flops(shape, p.lengths, r.b, r.n).total,
                        executed_flops=train_step_flops(
                            shape, p.calls, r.b, r.n, latent_kv_calls=r.latent_kv_calls
                        ).total,
                    )
                )
    if plan.profile_dir:
        for i, r in runners.items():
            profile_step(plan, i, r.step, r.batches[plan.warmup], r.sync)
    checks = {i: flop_check(plan, r) for i, r in runners.items()} if plan.check_flops else {}

    results = {}
    for i, r in runners.items():
        res = dict(
            layout=r.batches[0].layout,
            steps=records[i],
            losses=losses[i],
            build_seconds=r.build_seconds,
            trainable_parameters=sum(p.numel() for p in r.params),
            total_parameters=sum(p.numel() for p in r.module.parameters()),
        )
        if i in checks:
            res["flop_check"] = checks[i]
        if len(impls) > 1:
            # Both models live in this process: only the CUDA per-step increase is attributable.
            res["peak_memory_bytes"] = transient[i] if device.type == "cuda" else None
        elif device.type == "cuda":
            res["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
            res["memory_before_steps_bytes"] = mem_before
        else:
            res["peak_memory_bytes"] = rss.peak - rss.start
            res["rss_before_steps_bytes"] = rss.start
            res["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        results[i] = res
    Path(out_path).write_text(json.dumps(results, indent=2))


MEMORY_METHOD = {
    "paired-cuda": "per step, torch.cuda.max_memory_allocated minus the memory allocated just "
    "before it (activations, gradients, optimizer-step temporaries; weights and optimizer "
    "state excluded), max over steps (--paired: both models share the process)",
    "paired-cpu": "not measured with --paired (both models share the process); run without it",
    "cuda": "torch.cuda.max_memory_allocated over warm-up + timed steps (weights, gradients, "
    "optimizer state and activations); max over rounds",
    "cpu": "peak resident set size sampled from /proc/self/statm every 2 ms during warm-up + "
    "timed steps, minus the RSS just before them (activations, gradients, optimizer state; "
    "weights excluded); max over rounds. max_rss_bytes: getrusage ru_maxrss of the worker "
    "process (everything, weights and imports included)",
}


def summarize(impl: str, rounds: list[dict], memory_method: str) -> dict:
    """Medians over the timed steps of every round (rates are per step, then the median)."""
    steps = [s for r in rounds for s in r["steps"]]

    def med(key, time_key="seconds"):
        return statistics.median(s[key] / s[time_key] for s in steps)

    rows = [s["row_padding_fraction"] for s in steps if s.get("row_padding_fraction") is not None]
    out = dict(
        implementation=impl,
        layout=rounds[0].get("layout"),
        layout_description=LAYOUT_DOC.get(rounds[0].get("layout")),
        step_seconds_median=statistics.median(s["seconds"] for s in steps),
        tokens_per_s=med("real_tokens"),
        padded_tokens_per_s=med("padded_tokens"),
        sequences_per_s=med("sequences"),
        model_tflops_per_s=med("model_flops") / 1e12,
        executed_tflops_per_s=med("executed_flops") / 1e12,
        step_cpu_seconds_median=statistics.median(s["cpu_seconds"] for s in steps),
        tokens_per_cpu_s=med("real_tokens", "cpu_seconds"),
        real_tokens_per_step=statistics.mean(s["real_tokens"] for s in steps),
        padded_tokens_per_step=statistics.mean(s["padded_tokens"] for s in steps),
        # positions the decoder computes that are padding (packed / THD: 0, none computed)
        padding_fraction=1
        - sum(s["real_tokens"] for s in steps) / sum(s["padded_tokens"] for s in steps),
        # packed only: padding share of the [rows, L] packed rows (not computed by THD)
        packed_row_padding_fraction=statistics.mean(rows) if rows else None,
        forward_calls_per_step=statistics.median(s["forward_calls"] for s in steps),
        # ours: once per step (latent_kv_once_per_step); baseline: once per forward call
        latent_kv_projections_per_step=statistics.median(s["latent_kv_projections"] for s in steps),
        model_flops_per_step=statistics.mean(s["model_flops"] for s in steps),
        executed_flops_per_step=statistics.mean(s["executed_flops"] for s in steps),
        peak_memory_bytes=None
        if rounds[0]["peak_memory_bytes"] is None
        else max(r["peak_memory_bytes"] for r in rounds),
        memory_method=MEMORY_METHOD[memory_method],
        trainable_parameters=rounds[0]["trainable_parameters"],
        total_parameters=rounds[0]["total_parameters"],
        build_seconds=statistics.median(r["build_seconds"] for r in rounds),
        timed_steps=len(steps),
        step_seconds=[[s["seconds"] for s in r["steps"]] for r in rounds],
        step_cpu_seconds=[[s["cpu_seconds"] for s in r["steps"]] for r in rounds],
        losses=[r["losses"] for r in rounds],
    )
    if "flop_check" in rounds[0]:
        out["flop_check"] = rounds[0]["flop_check"]
    if "max_rss_bytes" in rounds[0]:
        out["max_rss_bytes"] = max(r["max_rss_bytes"] for r in rounds)
    return out


def flop_check(plan: Plan, runner: Runner) -> dict:
    """One more step under torch.utils.flop_counter, against the analytic count of that step.

    torch's counter has no FLOP formula for CPU's fused SDPA kernel
    (`_scaled_dot_product_flash_attention_for_cpu`), and peft's separate q / k / v and
    gate / up adapters run a few more products than the fused ones counted analytically; both
    parts are reported so the numbers can be reconciled exactly. With --layout packed the
    analytic count is `packed_call(..., thd=True)` per call (decoder: the real tokens and each
    text's own square; head: the real tokens); on CPU the THD path's
    per-text SDPA calls run the same uncounted fused kernel, so the expected torch count is again
    the analytic count minus its SDPA attention (measured difference on `tiny`: 0).
    """
    from torch.utils.flop_counter import FlopCounterMode

    shape = flop_shape(plan)
    p = runner.batches[plan.warmup]
    with FlopCounterMode(display=False) as counter:
        runner.step(p)
        runner.sync()
    by_op = {str(k): v for k, v in counter.get_flop_counts().get("Global", {}).items()}
    executed = train_step_flops(
        shape, p.calls, runner.b, runner.n, latent_kv_calls=runner.latent_kv_calls
    ).total
    decoder_attention = attention_flops(shape, p.calls, head=False).total
    head_attention = attention_flops(shape, p.calls, decoder=False).total
    split = split_adapter_flops(shape, p.calls).total if runner.impl == "baseline" else 0
    out = dict(
        layout=p.layout,
        torch_flop_counter=counter.get_total_flops(),
        torch_flop_counter_by_op=by_op,
        analytic_executed=executed,
        analytic_decoder_attention=decoder_attention,
        analytic_head_attention=head_attention,
        analytic_split_adapter_extra=split,
    )
    if plan.device == "cpu":
        # Ours runs the decoder's and the head's attention in SDPA; the baseline the decoder's
        # (its head multiplies explicitly, which torch counts).
        sdpa = decoder_attention + (head_attention if runner.impl == "ours" else 0)
        out["expected_torch_count_cpu"] = executed - sdpa + split
        out["difference"] = out["torch_flop_counter"] - out["expected_torch_count_cpu"]
    return out


def profile_step(plan: Plan, impl: str, step, batch: Prepared, sync) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if plan.device == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        step(batch)
        sync()
    sort = "cuda_time_total" if plan.device == "cuda" else "self_cpu_time_total"
    out = Path(plan.profile_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{impl}.txt").write_text(
        prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=60)
    )


# ----------------------------------------------------------------------------- parent


def machine_info(device: str) -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = dict(
        cpu_model=cpu,
        cpu_cores=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        platform=platform.platform(),
        python=platform.python_version(),
        torch=torch.__version__,
        device=device,
        device_name=cpu if device == "cpu" else torch.cuda.get_device_name(0),
    )
    for pkg in ("transformers", "peft", "megatron.core"):
        try:
            info[pkg] = __import__(pkg, fromlist=["__version__"]).__version__
        except Exception:  # noqa: BLE001 - versions are informational
            info[pkg] = None
    if device == "cuda":
        info["cuda"] = torch.version.cuda
    return info


def device_peak_tflops(device_name: str, device: str, override: float | None):
    if override is not None:
        return override, "--peak-tflops"
    if device == "cuda":
        for key, peak in GPU_PEAK_BF16_TFLOPS:
            if key in device_name:
                return peak, f"table: {key} dense bf16"
    return None, None


def write_shared_weights(plan: Plan, path: str) -> None:
    import torch

    ref = hf_reference(plan, embedding_config(plan), "cpu", torch.float32)
    torch.save(ref.hf_state_dict(), path)


def parity(tmp: Path, worker_out: dict) -> float | None:
    """Max |ours - baseline| over the first batch's embeddings (shared weights, before updates)."""
    import torch

    files = [Path(f"{worker_out[impl]}.{impl}.emb.pt") for impl in ("ours", "baseline")]
    if not all(f.exists() for f in files):
        return None
    a, b = (torch.load(f) for f in files)
    return max(float((a[k] - b[k]).abs().max()) for k in ("query", "passage"))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        plan = Plan(**json.loads(Path(args.plan).read_text()))
        run_worker(plan, args.worker, args.worker_out)
        return 0
    plan = make_plan(args)
    if args.compare_layouts:
        return compare_layouts(args, plan, argv)
    if args.paired and args.only:
        raise SystemExit("--paired runs both implementations; drop --only")
    impls = [args.only] if args.only else ["ours", "baseline"]
    workers = ["paired"] if args.paired else impls
    rounds = {impl: [] for impl in impls}
    first_out = {}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="nvembed-bench-") as tmpdir:
        tmp = Path(tmpdir)
        if plan.weights == "shared":
            plan.weights_file = str(tmp / "weights.pt")
            write_shared_weights(plan, plan.weights_file)
        plan_file = tmp / "plan.json"
        plan_file.write_text(json.dumps(asdict(plan)))
        for r in range(plan.repeats):
            for worker in workers:
                out = tmp / f"{worker}-{r}.json"
                cmd = [sys.executable, str(Path(__file__).resolve()), "--output", args.output]
                cmd += ["--worker", worker, "--plan", str(plan_file), "--worker-out", str(out)]
                print(
                    f"[bench] round {r + 1}/{plan.repeats}: {worker}", file=sys.stderr, flush=True
                )
                proc = subprocess.run(cmd)
                if proc.returncode != 0:
                    raise SystemExit(f"{worker} worker failed with exit code {proc.returncode}")
                for impl, res in json.loads(out.read_text()).items():
                    rounds[impl].append(res)
                    first_out.setdefault(impl, str(out))
        both = plan.weights == "shared" and len(impls) == 2
        parity_diff = parity(tmp, first_out) if both else None
    memory = ("paired-" if args.paired else "") + plan.device
    results = {impl: summarize(impl, rounds[impl], memory) for impl in impls}

    machine = machine_info(plan.device)
    # 1-minute load averages before and after: on a shared machine, other processes' load
    # slows both implementations (interleaved --repeats spread it evenly).
    machine["load_average_1min_before_after"] = [load_before[0], os.getloadavg()[0]]
    peak, peak_source = device_peak_tflops(machine["device_name"], plan.device, args.peak_tflops)
    for r in results.values():
        r["mfu"] = None if peak is None else r["model_tflops_per_s"] / peak
    speedup = speedup_cpu = speedup_paired = None
    if "ours" in results and "baseline" in results:
        speedup = results["ours"]["tokens_per_s"] / results["baseline"]["tokens_per_s"]
        if plan.device == "cpu":
            speedup_cpu = (
                results["ours"]["tokens_per_cpu_s"] / results["baseline"]["tokens_per_cpu_s"]
            )
        # Same batch index = same real tokens: the per-step time ratio is the throughput ratio.
        pairs = [
            b["seconds"] / o["seconds"]
            for ro, rb in zip(rounds["ours"], rounds["baseline"])
            for o, b in zip(ro["steps"], rb["steps"])
        ]
        speedup_paired = statistics.median(pairs)
    config = asdict(plan)
    config.pop("weights_file")
    config.update(
        mode="paired: both in one process, alternating steps"
        if args.paired
        else "separate: one process per implementation and round",
        flop_shape=flop_shape(plan).to_dict(),
        peak_tflops=peak,
        peak_tflops_source=peak_source,
        parity_max_abs_diff=parity_diff,
        lora_targets_ours=["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"],
        lora_targets_baseline=LORA_TARGETS_HF,
        command=" ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:])),
    )
    report = dict(
        ours=results.get("ours"),
        baseline=results.get("baseline"),
        speedup=speedup,
        speedup_median_of_step_ratios=speedup_paired,
        speedup_cpu_time=speedup_cpu,
        machine=machine,
        config=config,
    )
    out = Path(args.output)
    write_atomic(out, json.dumps(report, indent=2) + "\n")
    print(summary_line(report))
    return 0


PARITY_TOLERANCE = {"float32": 1e-5}  # max |pad512 - packed| on batch 0; bf16: reported only


def compare_layouts(args, plan: Plan, argv=None) -> int:
    """--compare-layouts: ours with --layout pad512 and with --layout packed, each in its own
    worker process (rounds interleaved), on the same seeded batches and the same weights (the
    shared weights file, or the same seeded initialisation); no baseline. Writes the JSON report
    and a markdown file next to it (same name, .md)."""
    for flag in ("paired", "only", "profile"):
        if getattr(args, flag):
            raise SystemExit(
                f"--compare-layouts runs ours alone, one process per layout: drop --{flag}"
            )
    layouts = ("pad512", "packed")
    rounds: dict[str, list] = {name: [] for name in layouts}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="nvembed-bench-") as tmpdir:
        tmp = Path(tmpdir)
        if plan.weights == "shared":
            plan.weights_file = str(tmp / "weights.pt")
            write_shared_weights(plan, plan.weights_file)
        outs = {}
        for r in range(plan.repeats):
            for name in layouts:
                plan_file = tmp / f"plan-{name}.json"
                plan_file.write_text(json.dumps(asdict(plan) | {"layout": name}))
                out = tmp / f"{name}-{r}.json"
                cmd = [sys.executable, str(Path(__file__).resolve()), "--output", args.output]
                cmd += ["--worker", "ours", "--plan", str(plan_file), "--worker-out", str(out)]
                print(f"[bench] round {r + 1}/{plan.repeats}: ours {name}", file=sys.stderr)
                proc = subprocess.run(cmd)
                if proc.returncode != 0:
                    raise SystemExit(
                        f"ours ({name}) worker failed with exit code {proc.returncode}"
                    )
                rounds[name].append(json.loads(out.read_text())["ours"])
                outs.setdefault(name, out)
        emb = {name: torch_load(f"{outs[name]}.ours.emb.pt") for name in layouts}
    parity_diff = max(
        float((emb["pad512"][k] - emb["packed"][k]).abs().max()) for k in ("query", "passage")
    )
    tolerance = PARITY_TOLERANCE.get(plan.dtype)
    results = {name: summarize("ours", rounds[name], plan.device) for name in layouts}
    machine = machine_info(plan.device)
    machine["load_average_1min_before_after"] = [load_before[0], os.getloadavg()[0]]
    peak, peak_source = device_peak_tflops(machine["device_name"], plan.device, args.peak_tflops)
    for r in results.values():
        r["mfu"] = None if peak is None else r["model_tflops_per_s"] / peak
    # Same batch index = same real tokens: the per-step time ratio is the throughput ratio.
    ratios = [
        a["seconds"] / b["seconds"]
        for ra, rb in zip(rounds["pad512"], rounds["packed"])
        for a, b in zip(ra["steps"], rb["steps"])
    ]
    config = asdict(plan)
    config.pop("weights_file")
    config.pop("layout")
    config.update(
        mode="compare-layouts: ours only, one process per layout and round",
        layouts={name: LAYOUT_DOC[name] for name in layouts},
        flop_shape=flop_shape(plan).to_dict(),
        peak_tflops=peak,
        peak_tflops_source=peak_source,
        parity_tolerance=tolerance,
        command=" ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:])),
    )
    report = dict(
        pad512=results["pad512"],
        packed=results["packed"],
        # real (useful) tokens per second, packed over pad512 (medians over the timed steps)
        useful_tokens_speedup=results["packed"]["tokens_per_s"] / results["pad512"]["tokens_per_s"],
        useful_tokens_speedup_median_of_step_ratios=statistics.median(ratios),
        # max |embedding difference| on batch 0, before any update, eval mode (no dropout)
        parity_max_abs=parity_diff,
        machine=machine,
        config=config,
    )
    out = Path(args.output)
    write_atomic(out, json.dumps(report, indent=2) + "\n")
    line = layouts_line(report)
    out.with_suffix(".md").write_text(layouts_markdown(report, out.name, line))
    print(line)
    if tolerance is not None and not parity_diff <= tolerance:
        raise SystemExit(
            f"layout parity FAILED: max |pad512 - packed| embedding difference {parity_diff:.3e} "
            f"> {tolerance:.0e} ({plan.dtype}) on batch 0; the packed (THD) path does not compute "
            f"what the padded one does (report written to {out})"
        )
    return 0


def torch_load(path: str):
    import torch

    return torch.load(path)


LAYOUTS_HEADER = (
    "| result | device | threads | pad512 tok/s | packed tok/s | useful tokens speedup | "
    "median step ratio | pad512 / packed decoder padding | pad512 / packed executed TFLOP/step | "
    "parity max abs |\n|---|---|---|---|---|---|---|---|---|---|"
)


def layouts_line(report: dict) -> str:
    """One markdown row of a --compare-layouts report (tok/s = real tokens per second)."""
    a, b, m = report["pad512"], report["packed"], report["machine"]
    return (
        f"| {report['config']['preset']} L={report['config']['model']['num_layers']} "
        f"B={report['config']['batch_size']} | {m['device_name']} | {report['config']['threads']} "
        f"| {a['tokens_per_s']:,.0f} | {b['tokens_per_s']:,.0f} | "
        f"**{report['useful_tokens_speedup']:.2f}x** | "
        f"{report['useful_tokens_speedup_median_of_step_ratios']:.2f}x | "
        f"{a['padding_fraction']:.0%} / {b['padding_fraction']:.0%} | "
        f"{a['executed_flops_per_step'] / 1e12:.3f} / {b['executed_flops_per_step'] / 1e12:.3f} | "
        f"{report['parity_max_abs']:.1e} |"
    )


def layouts_markdown(report: dict, name: str, line: str) -> str:
    c, m = report["config"], report["machine"]
    b = report["packed"]
    return (
        f"{LAYOUTS_HEADER}\n{line}\n\n`{name}`: `{c['command']}`\n\n"
        f"- machine: {m['cpu_model']}, {m['cpu_cores']} cores, torch {m['torch']}, "
        f"megatron-core {m['megatron.core']}; device {m['device_name']}; 1-minute load "
        f"{m['load_average_1min_before_after'][0]:.1f} / {m['load_average_1min_before_after'][1]:.1f}\n"
        f"- batch: B={c['batch_size']} queries x (1 + {c['negatives']}) passages; lengths "
        f"queries {c['query_len'][0]}-{c['query_len'][1]}, passages {c['passage_len'][0]}-"
        f"{c['passage_len'][1]}, cap {c['max_length']}; {c['dtype']}; weights {c['weights']}\n"
        f"- steps: {c['warmup']} warm-up + {c['steps']} timed per layout and round, "
        f"{c['repeats']} round(s)\n"
        f"- pad512: {c['layouts']['pad512']}\n- packed: {c['layouts']['packed']} (packed rows "
        f"{b['packed_row_padding_fraction']:.1%} padding, not computed)\n"
    )


def summary_line(report: dict) -> str:
    """One markdown table row: preset, device, ours/baseline tokens/s, speedup, TFLOP/s, MFU."""
    c, m = report["config"], report["machine"]

    def cell(r, key, fmt):
        return "n/a" if r is None or r.get(key) is None else format(r[key], fmt)

    o, b = report["ours"], report["baseline"]
    speed = "n/a" if report["speedup"] is None else f"{report['speedup']:.2f}x"
    return (
        f"| {c['preset']} L={c['model']['num_layers']} B={c['batch_size']} | "
        f"{m['device_name']} | {cell(o, 'tokens_per_s', ',.0f')} | "
        f"{cell(b, 'tokens_per_s', ',.0f')} | {speed} | "
        f"{cell(o, 'model_tflops_per_s', '.3f')} / {cell(b, 'model_tflops_per_s', '.3f')} | "
        f"{cell(o, 'mfu', '.1%')} / {cell(b, 'mfu', '.1%')} |"
    )


if __name__ == "__main__":
    raise SystemExit(main())
