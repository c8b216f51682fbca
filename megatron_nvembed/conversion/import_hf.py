"""import-hf: a transformers Mistral/Llama or NV-Embed checkpoint -> a megatron_nvembed checkpoint.

The output folder is checked before anything is read (`fileio.check_output_dir`: an existing
non-empty folder is replaced only with `overwrite=True`, an output that is, holds or lies inside
the source is always refused), written into a temporary sibling folder and swapped in at the end
(`fileio.atomic_dir`), so a failed import never leaves a half-written output. The source's
weights are read one tensor at a time (`hf_weights.LazyHFState`), never unpickling code, and
written one parameter at a time (`checkpoint.streaming`): memory does not grow with the model's
depth. The checkpoint keeps the source's dtype unless `--dtype` says otherwise.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch

from megatron_nvembed.checkpoint.lazy import DTYPE_NAMES, parse_dtype
from megatron_nvembed.checkpoint.store import TOKENIZER_DIR, store_tokenizer
from megatron_nvembed.conversion.hf_weights import LazyHFState, backbone_prefix
from megatron_nvembed.core.config import EmbeddingModelConfig, ParallelConfig
from megatron_nvembed.core.logging_utils import get_logger
from megatron_nvembed.utils.diskspace import check_free_space
from megatron_nvembed.utils.fileio import atomic_dir, check_output_dir

logger = get_logger(__name__)

# The flags that size a new pooling head: (flag, PoolingConfig field, pooling types that have it).
_HEAD_SIZE_FLAGS = (
    ("--pooling-num-latents", "num_latents", ("latent",)),
    ("--pooling-num-attention-heads", "num_heads", ("latent", "self-attention")),
    ("--pooling-head-dim", "head_dim", ("latent", "self-attention")),
)


def _import_worker(
    rank: int,
    world: int,
    hf_dir: str,
    tmp_dir: str,
    cfg_dict: dict,
    has_head: bool,
    prefix: str,
    seed: int,
    dtype_name: str,
) -> None:
    """One of the TP x PP import processes: writes its shard of the checkpoint into `tmp_dir`,
    one parameter at a time (its model stage is built on the meta device: nothing is allocated
    or randomly initialised for weights the source gives)."""
    from megatron_nvembed.checkpoint.lazy import DTYPES, meta_model
    from megatron_nvembed.checkpoint.store import save_checkpoint
    from megatron_nvembed.conversion.hf_mapping import hf_parameter, stage_sources
    from megatron_nvembed.core.parallel import initialize_model_parallel
    from megatron_nvembed.utils.sharding import uses_te_names

    cfg = EmbeddingModelConfig.from_dict(cfg_dict)
    par = cfg.parallel
    pg = initialize_model_parallel(
        par.tensor_model_parallel_size, par.pipeline_model_parallel_size, seed=seed
    )
    dtype = DTYPES[dtype_name]
    model = meta_model(cfg, dtype, pg)
    new_head = {} if has_head else _new_head(model, cfg, pg, seed, dtype)
    state = LazyHFState(hf_dir)
    tp_rank = pg.tp.rank()
    sources = stage_sources(
        cfg,
        pg.pp.rank(),
        backbone_prefix=prefix,
        te_names=uses_te_names(model),
        include_head=has_head,
    )
    params = dict(model.named_parameters())
    unmapped = [n for n in params if n not in sources and n not in new_head]
    if unmapped or set(sources) - set(params):
        raise KeyError(
            f"no source tensor for model parameter(s) {unmapped}; no model parameter for "
            f"{sorted(set(sources) - set(params))}"
        )

    def value(name: str) -> torch.Tensor:
        if name in new_head:
            return new_head[name]
        tensor = hf_parameter(state, cfg, tp_rank, sources[name])
        # The source's shapes were checked against its config before any process started
        # (`_read_source`); this guards the map and the TP sharding themselves.
        if tensor.shape != params[name].shape:
            raise ValueError(
                f"shape mismatch for {name!r}: model {tuple(params[name].shape)}, "
                f"{hf_dir} gives {tuple(tensor.shape)} (from {', '.join(sources[name][0])})"
            )
        return tensor.to(dtype)

    save_checkpoint(model, cfg, tmp_dir, iteration=0, values=value)


def _new_head(model, cfg: EmbeddingModelConfig, pg, seed: int, dtype) -> dict:
    """This stage's values of a new pooling head (none off the last stage or for a head without
    parameters): the head built alone from `seed`, so its initialisation is the same at every
    TP / PP layout and whatever the backbone's depth."""
    from megatron_nvembed.model.build import transformer_config
    from megatron_nvembed.model.pooling import build_pooling

    if model.pooling is None or not any(True for _ in model.pooling.parameters()):
        return {}
    torch.manual_seed(seed)
    head = build_pooling(
        cfg.model.hidden_size, cfg.pooling, transformer_config(cfg, params_dtype=dtype), pg.tp
    )
    return {f"pooling.{n}": p.detach() for n, p in head.named_parameters()}


def _read_source(hf_dir: Path) -> tuple[EmbeddingModelConfig, bool, str]:
    """The source's model config, whether it has a pooling head, and its backbone's key prefix;
    its config, weight files and tokenizer.json are checked against each other before any
    process starts or anything is allocated: config.json's sizes (positive integers, heads
    dividing the width) against every tensor's shape in the weight files' headers
    (`hf_shapes.check_hf_shapes`), and the tokenizer's vocabulary against the embedding's rows
    (`_check_tokenizer`).

    Raises:
        FileNotFoundError / ValueError / KeyError: one line naming the file and the field or key
            at fault.
    """
    from megatron_nvembed.conversion.hf_config import config_from_hf_dir
    from megatron_nvembed.conversion.hf_shapes import check_hf_shapes
    from megatron_nvembed.conversion.st_layout import check_folder_inside

    check_folder_inside(hf_dir)  # nothing read below lies outside --hf-dir
    cfg, has_head, prefix = config_from_hf_dir(hf_dir)
    state = LazyHFState(hf_dir)  # validates files before any process starts
    prefix = backbone_prefix(state, hf_dir, prefix)
    shapes = state.shapes()
    check_hf_shapes(
        cfg,
        shapes,
        config_file=hf_dir / "config.json",
        weights_file=state.source,
        backbone_prefix=prefix,
        include_head=has_head,
    )
    _check_tokenizer(hf_dir / "tokenizer.json", shapes[f"{prefix}embed_tokens.weight"][0][0])
    return cfg, has_head, prefix


def _check_tokenizer(path: Path, rows: int) -> None:
    """`path` (tokenizer.json) is a tokenizer the `tokenizers` library loads, and its largest
    token id (added tokens included) indexes one of the embedding's `rows`.

    Raises:
        FileNotFoundError / ValueError: one line naming `path`.
    """
    import json

    from tokenizers import Tokenizer

    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: missing; the tokenizer is read from its tokenizer.json "
            "(the fast tokenizer file published with Mistral / Llama models)"
        )
    try:
        json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: invalid JSON ({err})") from err
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as err:  # the library's own error type is a plain Exception
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"{path}: not a tokenizer the tokenizers library loads ({first})") from err
    ids = tokenizer.get_vocab(with_added_tokens=True).values()
    size = max(ids, default=-1) + 1
    if size > rows:
        raise ValueError(
            f"{path}: vocabulary of {size} tokens (largest id {size - 1}, added tokens included) "
            f"exceeds the embedding's {rows} rows (embed_tokens.weight)"
        )


def _source_dtype(hf_dir: Path, prefix: str) -> str:
    """The name of the source's weights' dtype (its token embedding's).

    Raises:
        ValueError: naming the file and `--dtype` for a dtype a checkpoint cannot hold.
    """
    tensor = LazyHFState(hf_dir)[f"{prefix}embed_tokens.weight"]
    if tensor.dtype not in DTYPE_NAMES:
        raise ValueError(
            f"{hf_dir}: weights in {tensor.dtype}; choose the checkpoint's with --dtype "
            f"({' / '.join(DTYPE_NAMES.values())})"
        )
    return DTYPE_NAMES[tensor.dtype]


def _apply_head_options(
    cfg: EmbeddingModelConfig,
    has_head: bool,
    pooling: str | None,
    sizes: tuple[int | None, int | None, int | None],
    mask_type: str | None,
) -> None:
    """Sets `--pooling`, the new head's sizes (`sizes`: num_latents, num_heads, head_dim, in
    `_HEAD_SIZE_FLAGS`' order; None: unchanged) and `--mask-type` on `cfg`.

    Raises:
        ValueError naming the flag: a pooling type or size for a source that has a head (its
            type and size come with its weights), a size the pooling type has no setting for, a
            size < 1.
    """
    if pooling is not None:
        if has_head and pooling != cfg.pooling.type:
            raise ValueError(
                f"--pooling {pooling}: the source already has a {cfg.pooling.type!r} head"
            )
        cfg.pooling.type = pooling
    for (flag, field_name, types), value in zip(_HEAD_SIZE_FLAGS, sizes):
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
    dtype: str | None = None,
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
        dtype: the checkpoint's weights' dtype (`--dtype` bfloat16 / float16 / float32); None:
            the source's (that of its token embedding), so a bf16 model stays bf16.

    Returns:
        The written checkpoint's model config.

    Raises:
        FileNotFoundError / ValueError / KeyError: naming the file, key or setting at fault
            (output folder: `check_output_dir`, before anything is read).
        DiskFullError: the weights do not fit beside `save_dir` (before any worker starts), or
            the disk filled while writing (the output folder is not created).
    """
    from megatron_nvembed.core.launch import run_distributed

    final = check_output_dir(save_dir, "--save", [("--hf-dir", hf_dir)], overwrite=overwrite)
    hf_dir, save_dir = Path(hf_dir), Path(save_dir)
    cfg, has_head, prefix = _read_source(hf_dir)
    _apply_head_options(cfg, has_head, pooling, (num_latents, num_heads, head_dim), mask_type)
    cfg.parallel = ParallelConfig(tensor_model_parallel_size, pipeline_model_parallel_size)
    cfg.validate()
    dtype = dtype or _source_dtype(hf_dir, prefix)
    # The checkpoint holds the source's weights in `dtype`: refused before any worker starts
    # when they cannot fit.
    itemsize = parse_dtype(dtype).itemsize
    size = sum(math.prod(shape) * itemsize for shape, _ in LazyHFState(hf_dir).shapes().values())
    check_free_space(final, size)
    start = time.perf_counter()
    with atomic_dir(final, overwrite=overwrite, flag="--save", size=size) as tmp:
        run_distributed(
            _import_worker,
            tensor_model_parallel_size * pipeline_model_parallel_size,
            str(hf_dir),
            str(tmp),
            cfg.to_dict(),
            has_head,
            prefix,
            seed,
            dtype,
        )
        store_tokenizer(hf_dir, tmp / TOKENIZER_DIR)
    logger.info(
        "imported %s -> %s (%s) in %.1fs", hf_dir, save_dir, dtype, time.perf_counter() - start
    )
    return cfg
