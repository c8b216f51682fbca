"""The embedding driver shared by every model format: texts to float32 embeddings, batched under
a token budget, split over data-parallel ranks and gathered.

- `Embedder` is the base of the three model formats (`evaluation.encoder`): a subclass sets the
  tokenizer, width, device and ranks and implements `_forward` on one tokenised batch.
- Batches: texts sorted by token length (longest first), cut under a budget of `max_tokens`
  padded tokens and at most `batch_size` rows (`max_tokens=None`: the device's default,
  `MAX_TOKENS_BY_DEVICE`; 0: no budget, fixed `batch_size` rows). Short texts thus run in large
  batches and long ones in small, at a bounded activation size. Our formats tokenise with
  `data.tokenization.tokenize_for_embedding`.
- `Embedder.embed(texts, instructions)` deals the batches to the data-parallel ranks round
  robin, gathers, and returns the float32 `[n, d]` embeddings in input order on every rank (a
  collective: every rank calls it with the same texts). `embed_local` computes on this rank
  alone; `retrieval.shards.encode_corpus` uses it to encode a corpus in shards without
  gathering.

Embeddings are the model's raw outputs (no extra normalisation here), except with
`truncate_dim` (`--truncate-dim`): then the first `truncate_dim` coordinates, L2-normalised
again (`loss.matryoshka.prefix`, the same prefix the Matryoshka loss trains).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from megatron_nvembed.core.config import DEFAULT_QUERY_TEMPLATE
from megatron_nvembed.data.buckets import length_grouped_batches
from megatron_nvembed.loss.matryoshka import prefix

logger = logging.getLogger(__name__)


MAX_TOKENS_BY_DEVICE = {"cpu": 1024, "cuda": 16384}
"""Default token budget per forward call. On CPU small calls keep the latent head's
[rows, heads, tokens, latents] scores in cache: with the tiny test model on 2 cores 512-1536
tokens ran 1.5-1.7x faster than 16384 (`bench/encode.py`, docs/retrieval.md); GPUs want large
calls (raise it until the memory is used)."""


def token_lengths(
    tokenizer, texts: list[str], instructions: list[str], eos: bool = True
) -> list[int]:
    """Tokens per row as `tokenize_for_embedding` feeds it (the tokenizer's special tokens +
    instruction + text + the appended end token), before truncation; `eos=False`: the
    tokenizer's own special tokens only (sentence-transformers models)."""
    from megatron_nvembed.data.tokenization import appended_end_text

    eos = appended_end_text(tokenizer) if eos else ""
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
    """Common driver: length grouping under a token budget, data-parallel split, gather,
    progress and throughput.

    Subclasses set `tokenizer`, `dim`, `device`, `dp_rank`, `dp_size`, `dp_group`, `is_main`,
    `is_writer` and implement `_forward(batch) -> [b, d] tensor` on a batch of
    `tokenize_for_embedding` (or override `_embed_batch`).
    """

    tokenizer = None
    dp_rank: int = 0
    dp_size: int = 1
    dp_group = None
    is_main: bool = True
    is_writer: bool = True
    """Writes results for its data-parallel rank (the first tensor-parallel rank of a group)."""
    kind: str = ""
    source: str = ""
    query_template: str = DEFAULT_QUERY_TEMPLATE
    """The model's query template (`encoder.query_template_of`; `encoder.load_embedder` sets it):
    tools put task definitions into it."""
    last_encode = None  # the `retrieval.shards.EncodeSummary` of the latest corpus encoding
    fingerprint: str = ""
    """The fingerprint of the model's weights (`encoder.model_fingerprint`; the model formats set
    it at load): outputs record it, and refuse a resume or a read by another model."""

    def __init__(
        self,
        batch_size: int = 128,
        max_length: int = 512,
        show_progress: bool = True,
        max_tokens: int | None = None,
        truncate_dim: int | None = None,
    ):
        """
        Args:
            truncate_dim: keep the first `truncate_dim` coordinates of every embedding,
                L2-normalised again (`--truncate-dim`: a Matryoshka-trained width); None: all.
        """
        if truncate_dim is not None and truncate_dim < 1:
            raise ValueError(f"--truncate-dim must be >= 1, got {truncate_dim}")
        if batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
        if max_length < 2:
            raise ValueError(f"--max-length must be >= 2, got {max_length}")
        if max_tokens is not None and max_tokens < 0:
            raise ValueError(f"--max-tokens must be >= 0, got {max_tokens}")
        self.batch_size = batch_size
        self.max_length = max_length
        self.max_tokens = max_tokens
        self.show_progress = show_progress
        self.truncate_dim = truncate_dim
        self.stats = EmbedStats()

    @property
    def dim(self) -> int:
        """Width of the embeddings returned (`truncate_dim` when set)."""
        return self.truncate_dim or self.model_dim

    @dim.setter
    def dim(self, width: int) -> None:
        """Subclasses set the model's own embedding width."""
        if self.truncate_dim is not None and self.truncate_dim > width:
            raise ValueError(
                f"--truncate-dim {self.truncate_dim} exceeds the model's embedding width {width}"
            )
        self.model_dim = width

    @property
    def token_budget(self) -> int | None:
        """Padded tokens per forward call (None: no budget, `batch_size` rows a call)."""
        if self.max_tokens is None:
            return MAX_TOKENS_BY_DEVICE.get(self.device.type, MAX_TOKENS_BY_DEVICE["cuda"])
        return self.max_tokens or None

    def _one_copy_per_rank(self) -> None:
        """Every process holds the whole model and is its own data-parallel rank (under
        torchrun; one process otherwise); its device is the local GPU, else the CPU."""
        import torch.distributed as dist

        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from megatron_nvembed.core.parallel import init_distributed

            init_distributed()
        if dist.is_initialized():
            self.dp_rank, self.dp_size = dist.get_rank(), dist.get_world_size()
            self.is_main = self.dp_rank == 0
        if torch.cuda.is_available():
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        else:
            self.device = torch.device("cpu")

    def identity(self) -> dict:
        """What determines this embedder's outputs (for caches of corpus embeddings)."""
        out = {
            "kind": self.kind,
            "source": self.source,
            "fingerprint": self.fingerprint,
            "max_length": self.max_length,
        }
        if self.truncate_dim is not None:
            out["truncate_dim"] = self.truncate_dim
        return out

    def _forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def _embed_batch(self, texts: list[str], instructions: list[str]) -> torch.Tensor:
        from megatron_nvembed.data.tokenization import tokenize_for_embedding

        batch, _ = tokenize_for_embedding(
            self.tokenizer, texts, instructions, max_length=self.max_length
        )
        return self._forward({k: v.to(self.device) for k, v in batch.items()})

    def _lengths(self, texts: list[str], instructions: list[str]) -> list[int]:
        return token_lengths(self.tokenizer, texts, instructions)

    def _batches(self, lengths: list[int]) -> list[list[int]]:
        return length_grouped_batches(
            [min(n, self.max_length) for n in lengths], self.batch_size, self.token_budget
        )

    def _run(self, texts, instructions, batches, label, out: np.ndarray | None = None):
        """Embeds `batches` (lists of indices into `texts`). With `out` ([len(texts), dim]),
        each batch's rows are written into it in place (one copy of the result in memory) and
        `out` is returned; else (indices in batch order, their embeddings)."""
        from tqdm import tqdm

        idx_out: list[int] = []
        emb_out: list[np.ndarray] = []
        bar = tqdm(
            total=sum(len(b) for b in batches),
            desc=label,
            unit="text",
            disable=not (self.is_main and self.show_progress) or len(batches) < 2,
        )
        with torch.inference_mode():
            for idx in batches:
                emb = self._embed_batch([texts[i] for i in idx], [instructions[i] for i in idx])
                emb = prefix(emb.float(), self.truncate_dim).cpu().numpy()
                if out is not None:
                    out[idx] = emb
                else:
                    idx_out.extend(idx)
                    emb_out.append(emb)
                bar.update(len(idx))
        bar.close()
        if out is not None:
            return out
        emb = np.concatenate(emb_out) if emb_out else np.zeros((0, self.dim), np.float32)
        return idx_out, emb

    def _account(self, label, lengths, seconds, ranks, log: bool = True) -> None:
        truncated = sum(n > self.max_length for n in lengths)
        self.stats.texts += len(lengths)
        self.stats.truncated += truncated
        self.stats.seconds += seconds
        self.stats.calls.append((label, len(lengths), seconds))
        if log and self.is_main and lengths:
            logger.info(
                "%s: %d texts in %.1fs (%.1f texts/s, %d data-parallel ranks)%s",
                label,
                len(lengths),
                seconds,
                len(lengths) / max(seconds, 1e-9),
                ranks,
                f"; {truncated} truncated to {self.max_length} tokens" if truncated else "",
            )

    @staticmethod
    def _instructions(texts, instructions) -> list[str]:
        if instructions is None or isinstance(instructions, str):
            return [instructions or ""] * len(texts)
        if len(instructions) != len(texts):
            raise ValueError(f"{len(instructions)} instructions for {len(texts)} texts")
        return list(instructions)

    def embed_local(
        self,
        texts: list[str],
        instructions: list[str] | str | None = None,
        label: str = "embedding",
    ) -> np.ndarray:
        """Float32 `[len(texts), dim]` embeddings in input order, computed by this data-parallel
        rank alone (no split, no gather; tensor-parallel ranks of a group call it together)."""
        instructions = self._instructions(texts, instructions)
        start = time.perf_counter()
        lengths = self._lengths(texts, instructions)
        result = np.zeros((len(texts), self.dim), dtype=np.float32)
        self._run(texts, instructions, self._batches(lengths), label, out=result)
        self._account(label, lengths, time.perf_counter() - start, 1, log=False)
        return result

    def embed(
        self,
        texts: list[str],
        instructions: list[str] | str | None = None,
        label: str = "embedding",
    ) -> np.ndarray:
        """Float32 `[len(texts), dim]` embeddings in input order, on every rank.

        The data-parallel ranks split the batches round robin and gather: a collective, every
        rank calls it with the same texts. For corpora use `retrieval.shards.encode_corpus`,
        which keeps each rank's embeddings to itself.

        Args:
            texts: the texts (identical on every rank).
            instructions: one complete prefix ("Instruct: ...\\nQuery: ") per text, one for all,
                or None / "" (documents).
            label: what the progress bar and the throughput line call this call.
        """
        import torch.distributed as dist

        instructions = self._instructions(texts, instructions)
        start = time.perf_counter()
        lengths = self._lengths(texts, instructions)
        batches = self._batches(lengths)
        local = self._run(texts, instructions, batches[self.dp_rank :: self.dp_size], label)
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
        self._account(label, lengths, time.perf_counter() - start, self.dp_size)
        return result
