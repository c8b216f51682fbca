"""export-hf: a megatron_nvembed checkpoint -> NV-Embed's HF format or sentence-transformers'
native layout.

The output folder is checked before the checkpoint is read (`check_export_paths`), written into a
temporary sibling folder and swapped in at the end (`fileio.atomic_dir`), so a failed export
never leaves a half-written output. Its last file is `nvembed_manifest.json`: the size and
checksum of every other file, and the `source_fingerprint` of the checkpoint it was made from
(`checkpoint.manifest`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from megatron_nvembed.checkpoint.lazy import DTYPES
from megatron_nvembed.checkpoint.manifest import (
    SOURCE_FINGERPRINT,
    checkpoint_fingerprint,
    write_manifest,
)
from megatron_nvembed.checkpoint.store import copy_tokenizer_files, tokenizer_dir
from megatron_nvembed.conversion.hf_config import latent_attention_config_dict, text_config_dict
from megatron_nvembed.conversion.hf_weights import write_safetensors_shards
from megatron_nvembed.conversion.st_layout import PROMPTS_FILE, prompts_config, write_st_layout
from megatron_nvembed.core.config import EmbeddingModelConfig
from megatron_nvembed.utils.diskspace import check_free_space
from megatron_nvembed.utils.fileio import atomic_dir, check_output_dir

HF_FILES_DIR = Path(__file__).resolve().parents[1] / "hf_model"
HF_MODEL_FILES = (
    "configuration_nvembed.py",
    "modeling_nvembed.py",
    "tokenization_nvembed.py",
    "sentence_transformers_nvembed.py",
)
EXPORT_FORMATS = ("nvembed", "sentence-transformers")
"""`export-hf --format`: NV-Embed's format (every head and mask; model code shipped in the folder)
or sentence-transformers' native layout (a plain transformers backbone + Pooling + Normalize
modules; last-token pooling and a causal mask only, loaded without remote code)."""


def check_export_paths(
    load_dir: str | os.PathLike, hf_dir: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """The output check of export-hf (`fileio.check_output_dir` for `--hf-dir`, the source being
    `--load`), run by `export_hf` before it reads anything and by the CLI before it sets up
    megatron-core.

    Returns:
        `hf_dir`, resolved.

    Raises:
        ValueError: see `check_output_dir`.
    """
    return check_output_dir(hf_dir, "--hf-dir", [("--load", load_dir)], overwrite=overwrite)


def _write_sentence_transformers_files(
    out: Path, query_template: str, max_seq_length: int = 512
) -> None:
    """modules.json and configs so `SentenceTransformer(out, trust_remote_code=True)` loads."""
    modules = [
        {
            "idx": 0,
            "name": "0",
            "path": "",
            "type": "sentence_transformers_nvembed.NVEmbedSentenceTransformer",
        }
    ]
    (out / "modules.json").write_text(json.dumps(modules, indent=2))
    st_config = prompts_config(query_template)  # prompts: complete prefixes (docs/data.md)
    (out / PROMPTS_FILE).write_text(json.dumps(st_config, indent=2))
    (out / "nvembed_sentence_transformers_config.json").write_text(
        json.dumps({"max_seq_length": max_seq_length}, indent=2)
    )


def nvembed_config_json(cfg: EmbeddingModelConfig, dtype: str) -> dict:
    """The exported top-level config.json (NV-Embed format, sizes explicit).

    A latent head with a bidirectional mask is NV-Embed's own model, loadable by NV-Embed's
    released code. A causal mask is written as a plain `mistral` backbone (every loader builds
    it causal) and `mask_type` "c"; any other head gets the head type `nvembed_pooling`, which
    NV-Embed's released code does not know and so refuses to load.
    """
    return {
        "architectures": ["NVEmbedModel"],
        "model_type": "nvembed",
        "auto_map": {
            "AutoConfig": "configuration_nvembed.NVEmbedConfig",
            "AutoModel": "modeling_nvembed.NVEmbedModel",
        },
        "padding_side": "right",
        "add_eos": True,
        "add_pad_token": True,
        "is_mask_instruction": True,
        "mask_type": "b" if cfg.model.mask_type == "bidirectional" else "c",
        "hidden_size": cfg.model.hidden_size,
        "latent_attention_config": latent_attention_config_dict(cfg),
        "text_config": text_config_dict(cfg),
        "torch_dtype": dtype,
    }


def check_st_exportable(cfg: EmbeddingModelConfig, tokenizer_dir: Path) -> None:
    """Refuses a model that sentence-transformers' native layout would not compute alike.

    Raises:
        ValueError: naming `--format` and what differs.
    """
    from megatron_nvembed.data.tokenization import load_tokenizer, special_token_layout

    what = "--format sentence-transformers"
    if cfg.pooling.type != "eos":
        raise ValueError(
            f"{what}: the checkpoint's pooling head is {cfg.pooling.type!r}; the layout holds "
            "last-token (eos) pooling only (export other heads with --format nvembed)"
        )
    if cfg.model.mask_type != "causal":
        raise ValueError(
            f"{what}: the checkpoint was trained with a {cfg.model.mask_type} mask; a plain "
            "transformers decoder runs causal (export with --format nvembed)"
        )
    _, suffix = special_token_layout(load_tokenizer(tokenizer_dir))
    if not suffix:
        raise ValueError(
            f"{what}: the tokenizer in {tokenizer_dir} appends no end token by itself, so "
            "sentence-transformers would pool the last text token where training pooled the EOS "
            "(use a tokenizer whose post-processor appends it, as Qwen3-Embedding's does, or "
            "--format nvembed)"
        )


def _write_model_files(out: Path, cfg: EmbeddingModelConfig, dtype: str, st: bool) -> None:
    """config.json and what the format loads the model with: sentence-transformers' module
    layout (`st`), or NV-Embed's model code and its sentence-transformers wrapper files."""
    if st:
        config = dict(text_config_dict(cfg), torch_dtype=dtype)
        (out / "config.json").write_text(json.dumps(config, indent=2))
        write_st_layout(out, cfg)
        return
    config = nvembed_config_json(cfg, dtype)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in HF_MODEL_FILES:
        shutil.copy2(HF_FILES_DIR / name, out / name)
    _write_sentence_transformers_files(out, cfg.prompts.query_template)


def _hf_tensors(reader, prefix: str, dtype: torch.dtype):
    """The export's tensors: HF key -> meta tensor (shape and dtype, for the files' headers) and
    a function giving each key's value, reading one megatron parameter at a time (the last two
    kept: a fused parameter's HF tensors are written close together, in key order)."""
    from megatron_nvembed.conversion.hf_mapping import hf_sources, hf_tensors_of

    sources = hf_sources(reader.cfg, backbone_prefix=prefix)
    params = dict(reader.plain.named_parameters())
    layout = {}
    for key, (mname, kind, n, i) in sources.items():
        layout[key] = hf_tensors_of([params[mname]], reader.cfg, kind, n)[i].to(dtype)
    last: dict[str, tuple] = {}

    def produce(key: str) -> torch.Tensor:
        mname, kind, n, i = sources[key]
        if mname not in last:
            while len(last) >= 2:
                last.pop(next(iter(last)))  # the oldest
            last[mname] = hf_tensors_of([reader.merged(mname)], reader.cfg, kind, n)
        return last[mname][i].to(dtype).contiguous()

    return layout, produce


def export_hf(
    load_dir: str | os.PathLike,
    hf_dir: str | os.PathLike,
    *,
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
    format: str = "nvembed",
) -> Path:
    """Writes a checkpoint in NV-Embed's HF format (weights, config, model files, tokenizer), or
    with `format="sentence-transformers"` in that library's native layout (`st_layout`).

    Must run in one process with megatron-core's parallel state at TP = PP = 1 (the CLI does
    this); any saved layout works. The weights are read one parameter at a time
    (`checkpoint.lazy.CheckpointTensors`, LoRA adapters folded in) and written one tensor at a
    time, in `dtype` (`--dtype`; None: the checkpoint's).

    Every head and both masks are written (see `nvembed_config_json` for what NV-Embed's own
    code accepts); the tokenizer files are copied byte for byte. The sentence-transformers layout
    holds what a plain transformers decoder + its Pooling module compute: an `eos`-pooled causal
    model whose tokenizer appends its end token itself (as Qwen3-Embedding's does; otherwise the
    library would pool the last text token, not the EOS trained on); anything else is refused,
    naming what differs, before the weights are read.

    `hf_dir` must be new or an empty folder unless `overwrite` (`--overwrite`: replaced whole,
    swapped in once written); it may never be, hold or lie inside `load_dir`.

    Returns:
        `hf_dir`, as given.

    Raises:
        ValueError: unknown dtype or format; a model the format cannot hold; an output folder
            refused by `check_output_dir` (before the checkpoint is read).
        FileNotFoundError: the checkpoint holds no tokenizer files.
        DiskFullError: the weights do not fit beside `hf_dir` (before any is read), or the
            disk filled while writing (the output folder is not created).
    """
    from megatron_nvembed.checkpoint.lazy import DTYPE_NAMES, CheckpointTensors, parse_dtype

    if dtype is not None:
        parse_dtype(dtype)
    if format not in EXPORT_FORMATS:
        raise ValueError(f"--format must be one of {EXPORT_FORMATS}, got {format!r}")
    final = check_export_paths(load_dir, hf_dir, overwrite=overwrite)
    load_dir, hf_dir = Path(load_dir), Path(hf_dir)
    st = format == "sentence-transformers"
    tok = tokenizer_dir(load_dir)  # inside the checkpoint, its files as written
    if st:
        from megatron_nvembed.checkpoint.store import read_config

        check_st_exportable(read_config(load_dir), tok)
    reader = CheckpointTensors(load_dir)
    cfg = reader.cfg
    dtype = dtype or DTYPE_NAMES[reader.dtype]
    layout, produce = _hf_tensors(reader, "" if st else "embedding_model.", DTYPES[dtype])
    size = sum(t.numel() * t.element_size() for t in layout.values())
    check_free_space(final, size)  # before any weight is read
    with atomic_dir(final, overwrite=overwrite, flag="--hf-dir", size=size) as tmp:
        write_safetensors_shards(layout, tmp, max_shard_bytes, produce)
        _write_model_files(tmp, cfg, dtype, st)
        if copy_tokenizer_files(tok, tmp) == 0:
            raise FileNotFoundError(f"{tok}: no tokenizer files to export")
        # Its own files' checksums, and the checkpoint it was made from (by its files).
        write_manifest(tmp, provenance={SOURCE_FINGERPRINT: checkpoint_fingerprint(reader.folder)})
    return hf_dir
