"""import-hf / export-hf: transformers or NV-Embed checkpoints <-> megatron_nvembed checkpoints.

Both directions write into a temporary sibling directory and rename it into place at the end, so
a failed conversion never leaves a half-written output. Weights are read with safetensors (or
`torch.load(weights_only=True)` for `.bin` files): loading never unpickles code.

Output folders are checked before anything is read or computed (`check_conversion_paths`): an
existing non-empty folder is replaced only with `overwrite=True` (`--overwrite`), and an output
that is, holds or lies inside the conversion's source is always refused.

Over 400 lines: import-hf, export-hf and merge-lora, which share the output checks and the
write-beside-then-swap routine.
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from megatron_nvembed.checkpoint import TOKENIZER_DIR, copy_tokenizer_files
from megatron_nvembed.config import EmbeddingModelConfig, ParallelConfig
from megatron_nvembed.conversion.hf_config import text_config_dict
from megatron_nvembed.conversion.st_layout import PROMPTS_FILE, prompts_config, write_st_layout
from megatron_nvembed.logging_utils import get_logger

logger = get_logger(__name__)

HF_FILES_DIR = Path(__file__).parent / "hf_files"
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


class LazyHFState(Mapping):
    """Read-only mapping over a transformers checkpoint directory, one tensor at a time.

    Supports `model.safetensors`, sharded safetensors with `model.safetensors.index.json`, and
    `pytorch_model.bin` (loaded with `weights_only=True`). Only the tensors asked for are read, so
    mapping a 7B model holds one tensor of the source at a time.
    """

    def __init__(self, hf_dir: str | os.PathLike):
        self.dir = Path(hf_dir)
        self._where: dict[str, Path] = {}
        self._bin: dict[str, torch.Tensor] | None = None
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise ValueError(f"{index}: not a safetensors index ({err})") from err
            for key, fname in weight_map.items():
                self._where[key] = self.dir / fname
            for f in set(self._where.values()):
                if not f.is_file():
                    raise FileNotFoundError(f"{f}: shard named in {index} is missing")
        elif single.is_file():
            from safetensors import safe_open

            with safe_open(str(single), framework="pt") as f:
                self._where = {k: single for k in f.keys()}
        elif (self.dir / "pytorch_model.bin").is_file():
            self._bin = torch.load(
                self.dir / "pytorch_model.bin", map_location="cpu", weights_only=True
            )
        else:
            raise FileNotFoundError(
                f"{self.dir}: no model.safetensors, model.safetensors.index.json or "
                "pytorch_model.bin"
            )

    def __getitem__(self, key: str) -> torch.Tensor:
        if self._bin is not None:
            return self._bin[key]
        from safetensors import safe_open

        if key not in self._where:
            raise KeyError(key)
        with safe_open(str(self._where[key]), framework="pt") as f:
            return f.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._bin if self._bin is not None else self._where)

    def __len__(self) -> int:
        return len(self._bin if self._bin is not None else self._where)


def _backbone_prefix(state: Mapping, hf_dir: Path, default: str) -> str:
    for prefix in (default, "", "model.", "embedding_model."):
        if f"{prefix}embed_tokens.weight" in state:
            return prefix
    raise KeyError(f"{hf_dir}: no embed_tokens.weight under any known prefix")


def _import_worker(
    rank: int,
    world: int,
    hf_dir: str,
    tmp_dir: str,
    cfg_dict: dict,
    has_head: bool,
    prefix: str,
    seed: int,
) -> None:
    from megatron_nvembed.checkpoint import save_checkpoint
    from megatron_nvembed.conversion.hf_mapping import load_hf_into_model
    from megatron_nvembed.model.build import build_model
    from megatron_nvembed.parallel import initialize_model_parallel

    cfg = EmbeddingModelConfig.from_dict(cfg_dict)
    par = cfg.parallel
    pg = initialize_model_parallel(
        par.tensor_model_parallel_size, par.pipeline_model_parallel_size, seed=seed
    )
    model = build_model(cfg, pg)
    state = LazyHFState(hf_dir)
    load_hf_into_model(
        model,
        state,
        cfg,
        pg.tp.rank(),
        pg.pp.rank(),
        backbone_prefix=prefix,
        include_head=has_head,
    )
    save_checkpoint(model, cfg, tmp_dir, iteration=0)


# The source / output flags of each command, as the messages name them.
_PATH_FLAGS = {
    "import-hf": ("--hf-dir", "--save"),
    "export-hf": ("--load", "--hf-dir"),
    "merge-lora": ("--load", "--save"),
}


def _relation(path: Path, other: Path) -> str | None:
    """How resolved `path` stands to resolved `other`: same folder, inside it, holds it, or None."""
    if path == other:
        return "is the same folder as"
    if other in path.parents:
        return "is inside"
    if path in other.parents:
        return "contains"
    return None


def check_output_dir(
    output: str | os.PathLike,
    flag: str,
    sources: list[tuple[str, str | os.PathLike]],
    *,
    overwrite: bool = False,
) -> Path:
    """Refuses an output folder a conversion must not write; returns its resolved path.

    Reads nothing but the file system entries themselves, so it runs before any weights are
    loaded.

    Args:
        output: the folder the conversion writes (replaced whole when it exists).
        flag: its command-line flag, for the messages (e.g. "--hf-dir").
        sources: (flag, path) of each folder the conversion reads.
        overwrite: allow replacing an existing non-empty folder.

    Raises:
        ValueError, naming the flag(s) and path(s): `output` is a symbolic link, the file system
            root, not a folder, the same folder as a source, inside one or holding one (even with
            `overwrite`); an existing non-empty folder without `overwrite`.
    """
    out = Path(output)
    if out.is_symlink():
        raise ValueError(
            f"{flag} {out}: is a symbolic link (to {os.readlink(out)}); give a folder path that "
            "is not a link"
        )
    resolved = out.resolve()
    if resolved.parent == resolved:
        raise ValueError(f"{flag} {out}: is the file system root; give a folder below it")
    for source_flag, source in sources:
        relation = _relation(resolved, Path(source).resolve())
        if relation is not None:
            raise ValueError(
                f"{flag} {out} {relation} {source_flag} {source}: a conversion never writes over "
                f"or inside its own source, not even with --overwrite; choose another {flag}"
            )
    if out.exists() and not out.is_dir():
        raise ValueError(
            f"{flag} {out}: exists and is not a folder; choose another path (--overwrite "
            "replaces folders only)"
        )
    if out.is_dir() and not overwrite:
        try:
            entries = sum(1 for _ in out.iterdir())
        except OSError as err:
            raise ValueError(f"{flag} {out}: cannot list it ({err})") from err
        if entries:
            raise ValueError(
                f"{flag} {out}: exists and is not empty ({entries} "
                f"entr{'y' if entries == 1 else 'ies'}); pass --overwrite to replace it"
            )
    return resolved


def check_conversion_paths(
    command: str,
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    peft_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """The output checks of `command` ("import-hf", "export-hf" or "merge-lora"), run by each
    conversion before it reads anything (and by the CLI before it sets up megatron-core).

    Returns:
        `output`, resolved.

    Raises:
        ValueError: see `check_output_dir`; also a `peft_dir` equal to or inside `output` (it
            would go when `output` is replaced).
    """
    source_flag, output_flag = _PATH_FLAGS[command]
    out = check_output_dir(output, output_flag, [(source_flag, source)], overwrite=overwrite)
    if peft_dir is not None:
        peft = check_output_dir(
            peft_dir, "--peft-dir", [(source_flag, source)], overwrite=overwrite
        )
        relation = _relation(peft, out)
        if relation in ("is the same folder as", "is inside"):
            raise ValueError(
                f"--peft-dir {peft_dir} {relation} {output_flag} {output}, which is replaced "
                "whole; choose a --peft-dir outside it"
            )
    return out


def _sibling(final: Path, tag: str) -> Path:
    """A hidden path beside `final` that does not exist yet: `.NAME.nvembed-<tag>-<random>`."""
    while True:
        path = final.with_name(f".{final.name}.nvembed-{tag}-{secrets.token_hex(4)}")
        if not path.exists() and not path.is_symlink():
            return path


def _temp_dir_beside(final: Path) -> Path:
    """A new empty folder next to `final` (created with its parents), to write the output in.

    Its name is new each time and marked as this tool's (`.NAME.nvembed-tmp-*`), so no folder of
    the user's (a `NAME.tmp`) is ever deleted to make room for it; the temporaries of earlier
    runs to the same output that were killed midway are removed here.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    for left in final.parent.glob(f".{glob.escape(final.name)}.nvembed-tmp-*"):
        shutil.rmtree(left, ignore_errors=True)
    tmp = _sibling(final, "tmp")
    tmp.mkdir()
    return tmp


def _replace_dir(tmp: Path, final: Path, *, overwrite: bool, flag: str) -> None:
    """Moves the finished `tmp` to `final`. An existing `final` is renamed aside, `tmp` renamed
    in, then the old one deleted: at every moment one complete version exists on disk (after a
    kill between the two renames, the old one under `.NAME.nvembed-old-*`).

    Raises:
        ValueError: `final` became non-empty since `check_output_dir` and `overwrite` is off.
    """
    if final.is_dir() and not overwrite and any(final.iterdir()):
        raise ValueError(
            f"{flag} {final}: was filled while the conversion ran; pass --overwrite to replace it"
        )
    if final.exists():
        old = _sibling(final, "old")
        os.replace(final, old)
        try:
            os.replace(tmp, final)
        except BaseException:
            os.replace(old, final)  # put the old version back
            raise
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


def import_hf(
    hf_dir: str | os.PathLike,
    save_dir: str | os.PathLike,
    *,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    pooling: str | None = None,
    mask_type: str | None = None,
    seed: int = 1234,
    num_latents: int | None = None,
    num_heads: int | None = None,
    head_dim: int | None = None,
    overwrite: bool = False,
) -> EmbeddingModelConfig:
    """Converts a transformers Mistral/Llama or NV-Embed checkpoint into a sharded checkpoint.

    A source without a pooling head (plain decoder) gets the head's seeded initialisation.
    Runs TP x PP gloo processes on this machine (conversion is CPU work).

    Args:
        num_latents, num_heads, head_dim: the size of a new head (`--pooling-num-latents`,
            `--pooling-num-attention-heads`, `--pooling-head-dim`; None: `PoolingConfig`'s
            defaults, NV-Embed's 512 latents, 8 heads, head width = model width). Refused for a
            source that has a head (its size is the source's) and for a pooling type without
            that setting.
        overwrite: replace an existing non-empty `save_dir` (`--overwrite`); without it such a
            folder is refused. `save_dir` may never be, hold or lie inside `hf_dir`.

    Raises:
        FileNotFoundError / ValueError / KeyError: naming the file, key or setting at fault
            (output folder: `check_output_dir`, before anything is read).
    """
    from megatron_nvembed.conversion.hf_config import config_from_hf_dir
    from megatron_nvembed.launch import run_distributed

    final = check_conversion_paths("import-hf", hf_dir, save_dir, overwrite=overwrite)
    hf_dir, save_dir = Path(hf_dir), Path(save_dir)
    cfg, has_head, prefix = config_from_hf_dir(hf_dir)
    state = LazyHFState(hf_dir)  # validates files before any process starts
    prefix = _backbone_prefix(state, hf_dir, prefix)
    if not (hf_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"{hf_dir / 'tokenizer.json'}: missing; the tokenizer is read from its tokenizer.json "
            "(the fast tokenizer file published with Mistral / Llama models)"
        )
    if pooling is not None:
        if has_head and pooling != cfg.pooling.type:
            raise ValueError(
                f"--pooling {pooling}: the source already has a {cfg.pooling.type!r} head"
            )
        cfg.pooling.type = pooling
    for flag, field_name, value, types in (
        ("--pooling-num-latents", "num_latents", num_latents, ("latent",)),
        ("--pooling-num-attention-heads", "num_heads", num_heads, ("latent", "self-attention")),
        ("--pooling-head-dim", "head_dim", head_dim, ("latent", "self-attention")),
    ):
        if value is None:
            continue
        if has_head:
            raise ValueError(
                f"{flag} {value}: the source already has a {cfg.pooling.type!r} head, whose size "
                "comes with its weights; the flag only sizes a new head"
            )
        if cfg.pooling.type not in types:
            raise ValueError(
                f"{flag}: {cfg.pooling.type!r} pooling has no such setting (only "
                f"--pooling {' / '.join(types)})"
            )
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
        setattr(cfg.pooling, field_name, value)
    if mask_type is not None:
        cfg.model.mask_type = mask_type
    cfg.parallel = ParallelConfig(tensor_model_parallel_size, pipeline_model_parallel_size)
    cfg.validate()
    start = time.perf_counter()
    tmp = _temp_dir_beside(final)
    try:
        run_distributed(
            _import_worker,
            tensor_model_parallel_size * pipeline_model_parallel_size,
            str(hf_dir),
            str(tmp),
            cfg.to_dict(),
            has_head,
            prefix,
            seed,
        )
        copy_tokenizer_files(hf_dir, tmp / TOKENIZER_DIR)
        _replace_dir(tmp, final, overwrite=overwrite, flag="--save")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("imported %s -> %s in %.1fs", hf_dir, save_dir, time.perf_counter() - start)
    return cfg


def _write_safetensors_shards(state: dict[str, torch.Tensor], out: Path, max_bytes: int) -> None:
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(state):
        nbytes = state[key].numel() * state[key].element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = state[key]
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        for k, v in shard.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


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
    from megatron_nvembed.conversion.hf_config import (
        latent_attention_config_dict,
        text_config_dict,
    )

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


def export_hf(
    load_dir: str | os.PathLike,
    hf_dir: str | os.PathLike,
    *,
    dtype: str = "bfloat16",
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
    format: str = "nvembed",
) -> Path:
    """Writes a checkpoint in NV-Embed's HF format (weights, config, model files, tokenizer), or
    with `format="sentence-transformers"` in that library's native layout (`st_layout`).

    Must run in one process with megatron-core's parallel state at TP = PP = 1 (the CLI does
    this); the checkpoint is resharded on load, so any saved layout works.

    Every head and both masks are written (see `nvembed_config_json` for what NV-Embed's own
    code accepts); the tokenizer files are copied byte for byte. The sentence-transformers layout
    holds what a plain transformers decoder + its Pooling module compute: an `eos`-pooled causal
    model whose tokenizer appends its end token itself (as Qwen3-Embedding's does; otherwise the
    library would pool the last text token, not the EOS trained on); anything else is refused,
    naming what differs, before the weights are read.

    `hf_dir` must be new or an empty folder unless `overwrite` (`--overwrite`: replaced whole,
    swapped in once written); it may never be, hold or lie inside `load_dir`.

    Raises:
        ValueError: unknown dtype or format; a model the format cannot hold; an output folder
            refused by `check_output_dir` (before the checkpoint is read).
    """
    from megatron_nvembed.checkpoint import load_checkpoint, read_config
    from megatron_nvembed.conversion.hf_mapping import megatron_to_hf, model_to_hf_shard
    from megatron_nvembed.model.build import build_model

    dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    if dtype not in dtypes:
        raise ValueError(f"--dtype must be one of {sorted(dtypes)}, got {dtype!r}")
    if format not in EXPORT_FORMATS:
        raise ValueError(f"--format must be one of {EXPORT_FORMATS}, got {format!r}")
    final = check_conversion_paths("export-hf", load_dir, hf_dir, overwrite=overwrite)
    load_dir, hf_dir = Path(load_dir), Path(hf_dir)
    cfg = read_config(load_dir)
    st = format == "sentence-transformers"
    if st:
        check_st_exportable(cfg, load_dir / TOKENIZER_DIR)
    cfg.parallel = ParallelConfig(1, 1)
    model = build_model(cfg)
    load_checkpoint(model, load_dir)
    prefix = "" if st else "embedding_model."
    state = megatron_to_hf([[model_to_hf_shard(model)]], cfg, backbone_prefix=prefix)
    state = {k: v.to(dtypes[dtype]).contiguous() for k, v in state.items()}
    tmp = _temp_dir_beside(final)
    try:
        _write_safetensors_shards(state, tmp, max_shard_bytes)
        if st:
            config = dict(text_config_dict(cfg), torch_dtype=dtype)
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
            write_st_layout(tmp, cfg)
        else:
            config = nvembed_config_json(cfg, dtype)
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
            for name in HF_MODEL_FILES:
                shutil.copy2(HF_FILES_DIR / name, tmp / name)
            _write_sentence_transformers_files(tmp, cfg.prompts.query_template)
        if copy_tokenizer_files(load_dir / TOKENIZER_DIR, tmp) == 0:
            raise FileNotFoundError(f"{load_dir / TOKENIZER_DIR}: no tokenizer files to export")
        _replace_dir(tmp, final, overwrite=overwrite, flag="--hf-dir")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return hf_dir


def merge_lora_checkpoint(
    load_dir: str | os.PathLike,
    save_dir: str | os.PathLike,
    peft_dir: str | os.PathLike | None = None,
    *,
    peft_base_model: str | None = None,
    peft_target: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Folds a checkpoint's LoRA adapters into its base weights and writes a plain checkpoint.

    Must run in one process with megatron-core's parallel state at TP = PP = 1 (the CLI does
    this); any saved layout is resharded on load. The output has the same model config (pooling
    head included, trained as saved) and tokenizer, and no optimizer state: it is what
    `export-hf`, `tools/embed.py` and `--pretrained-checkpoint` take.

    Args:
        peft_dir: also write the adapters in PEFT's format (adapter_config.json +
            adapter_model.safetensors) for the model the LoRA run started from
            (`conversion.peft_adapters.save_peft_adapters`).
        peft_base_model: with `peft_dir` (required): that base model as the adapters' users
            will load it, a hub id or a path (for target "nvembed" an `export-hf` of the
            checkpoint the LoRA run started from), recorded as `base_model_name_or_path`.
        peft_target: with `peft_dir`: "nvembed" (default: the exported NV-Embed model; the
            trained pooling head is saved with the adapters) or "mistral" (a plain transformers
            `MistralModel`, backbone only).
        overwrite: replace an existing non-empty `save_dir` / `peft_dir` whole (`--overwrite`);
            without it such a folder is refused. Neither may be, hold or lie inside `load_dir`,
            nor `peft_dir` be or lie inside `save_dir`. Both are written beside and swapped in
            once everything is written.

    Returns:
        The LoRA settings that were merged.

    Raises:
        ValueError: the checkpoint holds no adapters; `peft_dir` without `peft_base_model`;
            `peft_base_model` or `peft_target` without `peft_dir`; an unknown `peft_target`;
            an output folder refused by `check_conversion_paths` (before the checkpoint is read).
    """
    from megatron_nvembed.checkpoint import (
        TOKENIZER_DIR,
        load_checkpoint,
        read_config,
        read_lora,
        save_checkpoint,
    )
    from megatron_nvembed.conversion.peft_adapters import check_peft_options, save_peft_adapters
    from megatron_nvembed.model.build import build_model
    from megatron_nvembed.model.lora import apply_lora, merge_lora

    if peft_dir is not None:  # before the checkpoint is read
        peft_target = peft_target or "nvembed"
        check_peft_options(peft_base_model, peft_target)
    elif peft_base_model is not None or peft_target is not None:
        raise ValueError("--peft-base-model and --peft-target take effect with --peft-dir only")
    final = check_conversion_paths(
        "merge-lora", load_dir, save_dir, peft_dir=peft_dir, overwrite=overwrite
    )
    peft_final = Path(peft_dir).resolve() if peft_dir is not None else None
    load_dir, save_dir = Path(load_dir), Path(save_dir)
    lora = read_lora(load_dir)
    if lora is None:
        raise ValueError(f"{load_dir}: the checkpoint holds no LoRA adapters (no lora.json)")
    cfg = read_config(load_dir)
    cfg.parallel = ParallelConfig(1, 1)
    model = build_model(cfg)
    apply_lora(model, lora["rank"], lora["alpha"], 0.0)
    load_checkpoint(model, load_dir, merge_adapters=False)
    tmps: list[Path] = []
    try:
        if peft_final is not None:
            tmps.append(_temp_dir_beside(peft_final))
            save_peft_adapters(
                model,
                cfg,
                tmps[-1],
                lora["rank"],
                lora["alpha"],
                lora["dropout"],
                base_model_name_or_path=peft_base_model,
                target=peft_target,
            )
        count = merge_lora(model)
        tmp = _temp_dir_beside(final)
        tmps.append(tmp)
        save_checkpoint(model, cfg, tmp, iteration=0)
        if (load_dir / TOKENIZER_DIR).is_dir():
            shutil.copytree(load_dir / TOKENIZER_DIR, tmp / TOKENIZER_DIR)
        if peft_final is not None:
            _replace_dir(tmps[0], peft_final, overwrite=overwrite, flag="--peft-dir")
        _replace_dir(tmp, final, overwrite=overwrite, flag="--save")
    except BaseException:
        for t in tmps:
            shutil.rmtree(t, ignore_errors=True)
        raise
    logger.info("merged %d adapters (rank %d) into %s", count, lora["rank"], save_dir)
    return lora
