"""The models that embed: a megatron_nvembed checkpoint, an exported NV-Embed HF directory or a
sentence-transformers model, each an `evaluation.embedder.Embedder` (data-parallel under
torchrun, and tensor-parallel for Megatron checkpoints).

Shared by `tools/embed.py`, `tools/evaluate_mteb.py`, BEIR evaluation and hard-negative mining:
- `load_embedder(path, ...)` detects the format (`detect_model_format`): a directory with
  `latest_checkpointed_iteration.txt` is our checkpoint (loaded at any TP, resharded on load), a
  directory with `config.json` is an NV-Embed-format model (our exports, and NVIDIA's released
  NV-Embed-v2 folder), read natively by the package's own copy of the model classes: the
  folder's Python files are never imported, so no remote code runs, and NVIDIA's release works
  under current transformers although its own code does not import there. Any other
  sentence-transformers folder (a mining teacher, a `--format sentence-transformers` export, a
  released Qwen3-Embedding model) loads with `trust_remote_code=False`.
- Our formats tokenise with the tokenizer loader shared with training and the exported model
  (`load_tokenizer`); batching and the data-parallel split are the driver's (`Embedder`).
- `query_template_of(path)` reads the model's query template from its config files alone.
- On GPUs NV-Embed-format folders run in bf16 (checkpoints in their training dtype); on CPU in
  fp32.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from megatron_nvembed.core.config import DEFAULT_QUERY_TEMPLATE
from megatron_nvembed.data.tokenization import load_tokenizer
from megatron_nvembed.evaluation.embedder import Embedder, token_lengths


class MegatronEmbedder(Embedder):
    """A megatron_nvembed checkpoint at `--tensor-model-parallel-size` (any saved layout)."""

    kind = "megatron"

    def __init__(self, load: str | os.PathLike, tensor_model_parallel_size: int = 1, **kw):
        super().__init__(**kw)
        import torch.distributed as dist

        from megatron_nvembed.checkpoint.store import (
            latest_iteration,
            load_checkpoint,
            read_config,
            tokenizer_dir,
        )
        from megatron_nvembed.core.config import ParallelConfig
        from megatron_nvembed.core.parallel import initialize_model_parallel
        from megatron_nvembed.model.build import build_model

        tok_dir = tokenizer_dir(load)  # inside the checkpoint, its files as written
        self.iteration = latest_iteration(load)
        pg = initialize_model_parallel(tensor_model_parallel_size, 1)
        self.dp_rank, self.dp_size, self.dp_group = pg.dp.rank(), pg.dp.size(), pg.dp
        self.is_main = dist.get_rank() == 0
        self.is_writer = pg.tp.rank() == 0
        self.source = str(Path(load).resolve())
        self.cfg = read_config(load)
        positions = self.cfg.model.max_position_embeddings
        if self.max_length > positions:
            raise ValueError(
                f"--max-length {self.max_length} exceeds the {positions} positions the model of "
                f"{load} was trained for (max_position_embeddings)"
            )
        self.cfg.parallel = ParallelConfig(tensor_model_parallel_size, 1)
        self.model = build_model(self.cfg, pg)
        load_checkpoint(self.model, load)  # verifies the folder's manifest first
        self.fingerprint = model_fingerprint(self.source, self.kind)
        self.model.eval()
        self.tokenizer = load_tokenizer(tok_dir)
        self.device = next(self.model.parameters()).device
        self.dim = self.cfg.model.hidden_size

    def identity(self) -> dict:
        # the fingerprint too: a run re-saved in place at the same iteration differs
        return {**super().identity(), "iteration": self.iteration}

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

        from megatron_nvembed.hf_model.modeling_nvembed import NVEmbedModel

        config = Path(path) / "config.json"
        try:
            raw = json.loads(config.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{config}: invalid JSON ({err})") from err
        model_type = raw.get("model_type")
        if model_type != "nvembed":
            raise ValueError(
                f"{config}: model_type {model_type!r} is not an NV-Embed-format model "
                "(expected 'nvembed'); import it first: tools/convert_checkpoint.py import-hf"
            )
        text = raw.get("text_config")
        positions = text.get("max_position_embeddings") if isinstance(text, dict) else None
        if isinstance(positions, int) and self.max_length > positions:
            raise ValueError(
                f"--max-length {self.max_length} exceeds the {positions} positions the model of "
                f"{config} was trained for (text_config.max_position_embeddings)"
            )
        self._one_copy_per_rank()
        model = NVEmbedModel.from_pretrained(str(path))
        # bf16 on GPUs; fp32 on CPU (its kernels; exports are often bf16)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = model.to(self.device, self.dtype).eval()
        # The backbone's attention through torch SDPA (fused kernels on CPU and GPU) instead of
        # the model files' default eager softmax: the model is always called with an explicit
        # 4-D padding (and, for causal models, causal) mask, which SDPA applies unchanged.
        backbone = self.model.embedding_model.config
        if backbone._attn_implementation == "eager":
            backbone._attn_implementation = "sdpa"
        self.source = str(Path(path).resolve())
        self.fingerprint = model_fingerprint(self.source, self.kind)
        self.tokenizer = load_tokenizer(path)
        self.dim = int(model.config.hidden_size)

    def identity(self) -> dict:
        return {**super().identity(), "dtype": str(self.dtype)}

    def _forward(self, batch):
        return self.model(**batch)["sentence_embeddings"]


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
"""Files of a model folder that hold its weights (the model formats' loaders read these)."""
OTHER_RUNTIMES = ("onnx", "openvino")
"""Subfolders of a sentence-transformers folder with the same weights for other runtimes (never
loaded here)."""


def model_fingerprint(path: str | os.PathLike, kind: str) -> str:
    """The fingerprint of the weights of the model at `path` (`utils.checksums.fingerprint`: their
    paths, sizes and XXH3-128 checksums): equal for two copies of a model wherever they lie, other
    for other weights at the same path. Outputs made with the model record it (embedding shards,
    mined negatives), so a resume or a reader refuses outputs of another model.

    A checkpoint (`kind` "megatron"): `checkpoint.manifest.checkpoint_fingerprint` of its latest
    iteration folder (read from its manifest, verified before the load). A model folder: its
    weight files (`WEIGHT_SUFFIXES`, at any depth, outside `OTHER_RUNTIMES`), hashed now: every
    weight byte read once (about 9 GB/s of hashing on one core; loading the model has just
    brought the files into the page cache).
    """
    root = Path(path)
    if kind == "megatron":
        from megatron_nvembed.checkpoint.manifest import checkpoint_fingerprint
        from megatron_nvembed.checkpoint.store import iteration_dir, latest_iteration

        return checkpoint_fingerprint(iteration_dir(root, latest_iteration(root)))
    from megatron_nvembed.utils.checksums import build_manifest, fingerprint

    rels = [
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix in WEIGHT_SUFFIXES
        and p.relative_to(root).parts[0] not in OTHER_RUNTIMES
    ]
    return fingerprint(build_manifest(root, rels))


class SentenceTransformerEmbedder(Embedder):
    """A sentence-transformers model folder (e.g. a mining teacher such as all-MiniLM-L6-v2),
    loaded without remote code. Instructions are its `prompt`s (prepended to the text, as
    `SentenceTransformer.encode(prompt=...)` does); embeddings are its raw outputs. Under
    torchrun every process holds a copy and the ranks split the batches."""

    kind = "sentence-transformers"

    def __init__(self, path: str | os.PathLike, **kw):
        super().__init__(**kw)
        from sentence_transformers import SentenceTransformer

        self._one_copy_per_rank()
        self.model = SentenceTransformer(
            str(path), device=str(self.device), trust_remote_code=False, local_files_only=True
        ).eval()
        if self.device.type == "cuda":
            self.model = self.model.to(torch.bfloat16)
        self.tokenizer = self.model.tokenizer
        self.max_length = min(self.max_length, int(self.model.max_seq_length or self.max_length))
        dim = getattr(self.model, "get_embedding_dimension", None)  # sentence-transformers >= 6
        self.dim = int((dim or self.model.get_sentence_embedding_dimension)())
        self.source = str(Path(path).resolve())
        self.fingerprint = model_fingerprint(self.source, self.kind)

    def _lengths(self, texts, instructions):
        return token_lengths(self.tokenizer, texts, instructions, eos=False)

    def _embed_batch(self, texts, instructions):
        out = torch.empty(len(texts), self.model_dim)
        for prompt in dict.fromkeys(instructions):
            rows = [i for i, p in enumerate(instructions) if p == prompt]
            out[rows] = (
                self.model.encode(
                    [texts[i] for i in rows],
                    prompt=prompt or None,
                    batch_size=len(rows),
                    convert_to_tensor=True,
                    show_progress_bar=False,
                )
                .float()
                .cpu()
            )
        return out


def detect_model_format(path: str | os.PathLike) -> str:
    """`"megatron"` (our checkpoint), `"hf"` (an exported / NV-Embed-format folder) or
    `"sentence-transformers"` (any other sentence-transformers model folder).

    Raises:
        FileNotFoundError / ValueError: naming the path when it is none of them, or the link
            or module path that leads out of a model folder (`st_layout.check_folder_inside`).
    """
    import json

    from megatron_nvembed.checkpoint.store import is_checkpoint_dir

    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: --model must be a directory (checkpoint or HF export)")
    if is_checkpoint_dir(p):
        return "megatron"
    from megatron_nvembed.conversion.st_layout import check_folder_inside

    check_folder_inside(p)  # no file read from it, here or by transformers, lies outside it
    config = p / "config.json"
    if config.is_file():
        try:
            model_type = json.loads(config.read_text()).get("model_type")
        except json.JSONDecodeError as err:
            raise ValueError(f"{config}: invalid JSON ({err})") from err
        if model_type == "nvembed" or not (p / "modules.json").is_file():
            return "hf"
        return "sentence-transformers"
    raise FileNotFoundError(
        f"{p}: neither a megatron_nvembed checkpoint (no latest_checkpointed_iteration.txt) nor "
        "an HF model directory (no config.json)"
    )


def query_template_of(path: str | os.PathLike) -> str:
    """The query template of the model at `path` (`config.PromptConfig`): a checkpoint's saved
    one; for a model folder the one behind its sentence-transformers `query` prompt
    (`st_layout.prompt_query_template`); else NV-Embed's. Read from the config files only, so
    tools resolve instructions before loading the model."""
    if detect_model_format(path) == "megatron":
        from megatron_nvembed.checkpoint.store import read_config

        return read_config(path).prompts.query_template
    from megatron_nvembed.conversion.st_layout import prompt_query_template

    return prompt_query_template(path) or DEFAULT_QUERY_TEMPLATE


def load_embedder(
    path: str | os.PathLike,
    *,
    tensor_model_parallel_size: int = 1,
    batch_size: int = 128,
    max_length: int = 512,
    max_tokens: int | None = None,
    truncate_dim: int | None = None,
    show_progress: bool = True,
) -> Embedder:
    """Loads `path` as whichever format it is (see `detect_model_format`): our checkpoint, an
    NV-Embed-format folder, or a sentence-transformers folder (a mining teacher, a
    `--format sentence-transformers` export, a released Qwen3-Embedding model)."""
    kind = detect_model_format(path)
    kw = dict(
        batch_size=batch_size,
        max_length=max_length,
        max_tokens=max_tokens,
        truncate_dim=truncate_dim,
        show_progress=show_progress,
    )
    if kind == "megatron":
        embedder = MegatronEmbedder(path, tensor_model_parallel_size, **kw)
    elif tensor_model_parallel_size != 1:
        raise ValueError(
            f"{path}: --tensor-model-parallel-size {tensor_model_parallel_size} needs a "
            "megatron_nvembed checkpoint; HF directories run data-parallel only"
        )
    elif kind == "sentence-transformers":
        embedder = SentenceTransformerEmbedder(path, **kw)
    else:
        embedder = HFEmbedder(path, **kw)
    embedder.query_template = query_template_of(path)
    return embedder
