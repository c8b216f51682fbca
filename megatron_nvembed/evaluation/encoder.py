"""Embedding many texts with a megatron_nvembed checkpoint or an exported NV-Embed HF directory,
data-parallel under torchrun (and tensor-parallel for Megatron checkpoints).

Shared by `tools/embed.py` and `tools/evaluate_mteb.py`:
- `load_embedder(path, ...)` detects the format: a directory with
  `latest_checkpointed_iteration.txt` is our checkpoint (loaded at any TP, resharded on load), a
  directory with `config.json` is an NV-Embed-format model (our exports, and NVIDIA's released
  NV-Embed-v2 folder), read natively by the package's own copy of the model classes: the
  folder's Python files are never imported, so no remote code runs, and NVIDIA's release works
  under current transformers although its own code does not import there.
- Both tokenise with `data.tokenization.tokenize_for_embedding` and the tokenizer loader
  shared with training and the exported model (`load_tokenizer`).
- `Embedder.embed(texts, instructions)` sorts the texts by token length, cuts them into batches
  of `batch_size`, deals the batches to the data-parallel ranks round robin, gathers, and returns
  the float32 `[n, d]` embeddings in input order on every rank. Every rank must call it with the
  same texts (they are a collective).

Embeddings are the model's raw outputs (no extra normalisation here).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from megatron_nvembed.data.tokenization import load_tokenizer

logger = logging.getLogger(__name__)


def length_grouped_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices sorted by length (stable), cut into batches of `batch_size` (the last may be short)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def token_lengths(tokenizer, texts: list[str], instructions: list[str]) -> list[int]:
    """Tokens per row as NV-Embed feeds it (BOS + instruction + text + EOS), before truncation."""
    eos = tokenizer.eos_token or ""
    out: list[int] = []
    step = 4096  # bounded memory on big corpora
    for s in range(0, len(texts), step):
        rows = [i + t + eos for t, i in zip(texts[s : s + step], instructions[s : s + step])]
        out.extend(len(r) for r in tokenizer(rows, add_special_tokens=True)["input_ids"])
    return out


@dataclass
class EmbedStats:
    """Totals over every `embed` call of an embedder (all data-parallel ranks together)."""

    texts: int = 0
    truncated: int = 0
    seconds: float = 0.0
    calls: list[tuple[str, int, float]] = field(default_factory=list)  # (label, texts, seconds)

    @property
    def texts_per_second(self) -> float:
        return self.texts / max(self.seconds, 1e-9)


class Embedder:
    """Common driver: length grouping, data-parallel split, gather, progress and throughput.

    Subclasses set `tokenizer`, `dim`, `device`, `dp_rank`, `dp_size`, `dp_group`, `is_main`
    and implement `_forward(batch) -> [b, d] tensor` on a batch of `tokenize_for_embedding`.
    """

    tokenizer = None
    dim: int
    dp_rank: int = 0
    dp_size: int = 1
    dp_group = None
    is_main: bool = True
    kind: str = ""

    def __init__(self, batch_size: int = 32, max_length: int = 512, show_progress: bool = True):
        if batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
        if max_length < 2:
            raise ValueError(f"--max-length must be >= 2, got {max_length}")
        self.batch_size = batch_size
        self.max_length = max_length
        self.show_progress = show_progress
        self.stats = EmbedStats()

    def _forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def _embed_batch(self, texts: list[str], instructions: list[str]) -> torch.Tensor:
        from megatron_nvembed.data.tokenization import tokenize_for_embedding

        batch, _ = tokenize_for_embedding(
            self.tokenizer, texts, instructions, max_length=self.max_length
        )
        return self._forward({k: v.to(self.device) for k, v in batch.items()})

    def embed(
        self,
        texts: list[str],
        instructions: list[str] | str | None = None,
        label: str = "embedding",
    ) -> np.ndarray:
        """Float32 `[len(texts), dim]` embeddings in input order, on every rank.

        Args:
            texts: the texts (identical on every rank).
            instructions: one complete prefix ("Instruct: ...\\nQuery: ") per text, one for all,
                or None / "" (documents).
            label: what the progress bar and the throughput line call this call.
        """
        import torch.distributed as dist

        if instructions is None or isinstance(instructions, str):
            instructions = [instructions or ""] * len(texts)
        if len(instructions) != len(texts):
            raise ValueError(f"{len(instructions)} instructions for {len(texts)} texts")
        start = time.perf_counter()
        lengths = token_lengths(self.tokenizer, texts, instructions)
        batches = length_grouped_batches(lengths, self.batch_size)
        mine = batches[self.dp_rank :: self.dp_size]
        from tqdm import tqdm

        idx_out: list[int] = []
        emb_out: list[np.ndarray] = []
        bar = tqdm(
            mine,
            desc=label,
            unit="batch",
            disable=not (self.is_main and self.show_progress) or len(mine) < 2,
        )
        with torch.no_grad():
            for idx in bar:
                emb = self._embed_batch([texts[i] for i in idx], [instructions[i] for i in idx])
                idx_out.extend(idx)
                emb_out.append(emb.float().cpu().numpy())
        local = (
            idx_out,
            np.concatenate(emb_out) if emb_out else np.zeros((0, self.dim), np.float32),
        )
        if self.dp_size > 1:
            gathered: list = [None] * self.dp_size
            dist.all_gather_object(gathered, local, group=self.dp_group)
        else:
            gathered = [local]
        result = np.zeros((len(texts), self.dim), dtype=np.float32)
        seen = np.zeros(len(texts), dtype=bool)
        for idx, emb in gathered:
            result[idx] = emb
            seen[idx] = True
        if not seen.all():  # a broken split would silently leave zero rows
            raise RuntimeError(f"{label}: {int((~seen).sum())} texts were not embedded")
        seconds = time.perf_counter() - start
        truncated = sum(n > self.max_length for n in lengths)
        self.stats.texts += len(texts)
        self.stats.truncated += truncated
        self.stats.seconds += seconds
        self.stats.calls.append((label, len(texts), seconds))
        if self.is_main and texts:
            logger.info(
                "%s: %d texts in %.1fs (%.1f texts/s, %d data-parallel ranks)%s",
                label,
                len(texts),
                seconds,
                len(texts) / max(seconds, 1e-9),
                self.dp_size,
                f"; {truncated} truncated to {self.max_length} tokens" if truncated else "",
            )
        return result


class MegatronEmbedder(Embedder):
    """A megatron_nvembed checkpoint at `--tensor-model-parallel-size` (any saved layout)."""

    kind = "megatron"

    def __init__(self, load: str | os.PathLike, tensor_model_parallel_size: int = 1, **kw):
        super().__init__(**kw)
        import torch.distributed as dist

        from megatron_nvembed.checkpoint import (
            TOKENIZER_DIR,
            latest_iteration,
            load_checkpoint,
            read_config,
        )
        from megatron_nvembed.config import ParallelConfig
        from megatron_nvembed.model.build import build_model
        from megatron_nvembed.parallel import initialize_model_parallel

        tok_dir = Path(load) / TOKENIZER_DIR
        if not tok_dir.is_dir():
            raise FileNotFoundError(f"{tok_dir}: missing (the checkpoint has no tokenizer)")
        self.iteration = latest_iteration(load)
        pg = initialize_model_parallel(tensor_model_parallel_size, 1)
        self.dp_rank, self.dp_size, self.dp_group = pg.dp.rank(), pg.dp.size(), pg.dp
        self.is_main = dist.get_rank() == 0
        self.cfg = read_config(load)
        self.cfg.parallel = ParallelConfig(tensor_model_parallel_size, 1)
        self.model = build_model(self.cfg, pg)
        load_checkpoint(self.model, load)
        self.model.eval()
        self.tokenizer = load_tokenizer(tok_dir)
        self.device = next(self.model.parameters()).device
        self.dim = self.cfg.model.hidden_size

    def _forward(self, batch):
        return self.model(**batch)


class HFEmbedder(Embedder):
    """An NV-Embed-format directory (`config.json` with model_type "nvembed"): our exports and
    NVIDIA's released layout, loaded with the package's own model classes (weights read
    natively, no remote code). Under torchrun every process holds a full copy and the ranks split
    the batches."""

    kind = "hf"

    def __init__(self, path: str | os.PathLike, **kw):
        super().__init__(**kw)
        import json

        import torch.distributed as dist

        from megatron_nvembed.conversion.hf_files.modeling_nvembed import NVEmbedModel

        config = Path(path) / "config.json"
        try:
            model_type = json.loads(config.read_text()).get("model_type")
        except json.JSONDecodeError as err:
            raise ValueError(f"{config}: invalid JSON ({err})") from err
        if model_type != "nvembed":
            raise ValueError(
                f"{config}: model_type {model_type!r} is not an NV-Embed-format model "
                "(expected 'nvembed'); import it first: tools/convert_checkpoint.py import-hf"
            )
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from megatron_nvembed.parallel import init_distributed

            init_distributed()
        if dist.is_initialized():
            self.dp_rank, self.dp_size = dist.get_rank(), dist.get_world_size()
            self.is_main = self.dp_rank == 0
        if torch.cuda.is_available():
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        else:
            self.device = torch.device("cpu")
        model = NVEmbedModel.from_pretrained(str(path))
        if self.device.type == "cpu":
            model = model.float()  # CPU kernels: fp32 (exports are often bf16)
        self.model = model.to(self.device).eval()
        self.tokenizer = load_tokenizer(path)
        self.dim = int(model.config.hidden_size)

    def _forward(self, batch):
        return self.model(**batch)["sentence_embeddings"]


def detect_model_format(path: str | os.PathLike) -> str:
    """`"megatron"` (our checkpoint) or `"hf"` (an exported / NV-Embed HF directory).

    Raises:
        FileNotFoundError: naming the path when it is neither.
    """
    from megatron_nvembed.checkpoint import is_checkpoint_dir

    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: --model must be a directory (checkpoint or HF export)")
    if is_checkpoint_dir(p):
        return "megatron"
    if (p / "config.json").is_file():
        return "hf"
    raise FileNotFoundError(
        f"{p}: neither a megatron_nvembed checkpoint (no latest_checkpointed_iteration.txt) nor "
        "an HF model directory (no config.json)"
    )


def load_embedder(
    path: str | os.PathLike,
    *,
    tensor_model_parallel_size: int = 1,
    batch_size: int = 32,
    max_length: int = 512,
    show_progress: bool = True,
) -> Embedder:
    """Loads `path` as whichever format it is (see `detect_model_format`)."""
    kind = detect_model_format(path)
    kw = dict(batch_size=batch_size, max_length=max_length, show_progress=show_progress)
    if kind == "megatron":
        return MegatronEmbedder(path, tensor_model_parallel_size, **kw)
    if tensor_model_parallel_size != 1:
        raise ValueError(
            f"{path}: --tensor-model-parallel-size {tensor_model_parallel_size} needs a "
            "megatron_nvembed checkpoint; HF directories run data-parallel only"
        )
    return HFEmbedder(path, **kw)
