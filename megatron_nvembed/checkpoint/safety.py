"""Checks that reading a training checkpoint cannot run code written into its files.

Threat model: someone who can write into a checkpoint folder (a shared file system, a
downloaded checkpoint) crafts files so that loading them runs their code. The pickle format
calls whatever functions a file names while it is read, and several files of a checkpoint are
read with plain pickle:

- `.metadata` (torch distributed checkpoint metadata): torch's `FileSystemReader` reads it with
  `pickle.load`;
- the "bytes" items of the `*.distcp` shards (megatron-core's `ShardedObject`s, e.g. each
  layer's `..._extra_state/shard_L_N`): torch's `DefaultLoadPlanner.load_bytes` reads them with
  `torch.load(weights_only=False)`;
- `common.pt` (megatron-core's non-sharded state): `torch.load` with torch's default, which is
  `weights_only=True` since torch 2.6 unless `TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD` is set;
- `rng/rank_XXXXX.pt` (our per-rank generator states).

What is verified, before anything is loaded (`verify_checkpoint_folder`):

- `.metadata` is unpickled by an unpickler that resolves only the globals torch's metadata
  classes need (torch.distributed.checkpoint's metadata / planner / storage dataclasses and
  enums, `torch.Size`, torch dtypes, `torch.serialization._get_layout`, `pathlib.PosixPath` of
  `StorageMeta.checkpoint_id`, and megatron-core's two empty legacy classes `MCoreMetadata` /
  `MCoreSavePlan`). Any other global (`builtins.exec`, `os.system`, `getattr`...) is refused
  before it is imported or called.
- No symbolic link in the folder (a shard, `.metadata`, a subfolder such as `rng/`) leads out
  of it (`fileio.check_links_inside`; `store.iteration_dir` and `store.latest_iteration` refuse
  an iteration folder or a tracker file that leads out of the checkpoint folder).
- Every stored item's shard file exists inside the folder and is long enough for the item's
  byte range; every bytes item is read (after undoing its stored stream transforms, as torch
  does) and must load with `torch.load(weights_only=True)`.
- `common.pt` must load with `torch.load(weights_only=True)`; `metadata.json` must name the
  torch_dist / torch backends (the only ones verified here).

`load_rng_file` reads an RNG file with `weights_only=True`.

Damage (flipped bits, a truncated or swapped shard, a shard added after the save) is found by the
folder's manifest of sizes and checksums (`checkpoint.manifest`), checked last.

"Loads with weights_only=True" means: accepted by torch's weights-only unpickler with the
globals registered in this process through `torch.serialization.add_safe_globals`; importing
megatron-core registers a few (`io.BytesIO`, `argparse.Namespace`, numpy arrays, its config
dataclasses...), which is how Transformer Engine extra states saved as `io.BytesIO` pass.

What is not verified:

- Transformer Engine's own extra-state handling (GPU runs): TE restores FP8 metadata from the
  bytes of its `_extra_state` with its own deserialisation (pickle); a bytes item holding a
  crafted uint8 tensor or BytesIO passes this check and reaches that code.
- Tensor items: torch reads them with `weights_only=True` itself; only their byte ranges are
  checked here, not their contents.
- Denial of service (huge or deeply nested files, decompression bombs) and wrong values.
- Files read with `weights_only=True` are accepted as torch's weights-only unpickler accepts
  them; the real loader then reads bytes items with full pickle, so this relies on both
  unpicklers reading the same stream the same way.
- Time of check versus time of use: the files are read again by the loader after this check.
  Someone who can rewrite the folder between the two reads defeats it; checkpoints must live
  where only trusted writers can change them while a job reads them.

The restricted unpickler and the weights-only loading with its refusal messages live in
`safe_unpickling`; this module holds the threat model and the checks of a checkpoint folder.
"""

from __future__ import annotations

import io
import json
import os
import stat
from pathlib import Path

import torch

from megatron_nvembed.checkpoint.unpickling import (
    CorruptCheckpointError,
    UnsafeCheckpointError,
    error_cause,
    load_weights_only,
    read_metadata,
)
from megatron_nvembed.utils.fileio import check_links_inside

__all__ = [
    "CorruptCheckpointError",
    "UnsafeCheckpointError",
    "load_rng_file",
    "verify_checkpoint_folder",
]

METADATA_FILE = ".metadata"
COMMON_FILE = "common.pt"
CONFIG_FILE = "metadata.json"
RNG_KEYS = ("cpu", "cuda", "tracker")


def _check_storage_info(info, index, meta_path: Path) -> None:
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    rel = getattr(info, "relative_path", None)
    offset = getattr(info, "offset", None)
    length = getattr(info, "length", None)
    if (
        not isinstance(info, _StorageInfo)
        or not isinstance(rel, str)
        or not isinstance(offset, int)
        or not isinstance(length, int)
        or offset < 0
        or length < 0
    ):
        raise CorruptCheckpointError(
            f"{meta_path}: the storage record of {getattr(index, 'fqn', index)!r} is malformed "
            f"({info!r})"
        )
    parts = Path(rel).parts
    if not rel or Path(rel).is_absolute() or ".." in parts or "\0" in rel:
        raise UnsafeCheckpointError(
            f"{meta_path}: item {getattr(index, 'fqn', index)!r} is stored in {rel!r}, outside "
            "the checkpoint folder; refusing to load it"
        )


def _read_range(handle, offset: int, length: int) -> bytes:
    handle.seek(offset)
    return handle.read(length)


def _undo_transforms(raw: bytes, descriptors, label: str) -> bytes:
    """The item's bytes as torch's reader hands them to the planner (stored transforms, e.g.
    zstd compression, undone with torch's default extension registry, as the loader does)."""
    if not descriptors:
        return raw
    try:
        from torch.distributed.checkpoint._extension import (
            ExtensionRegistry,
            StreamTransformExtension,
        )

        stream = io.BytesIO(raw)
        for ext in ExtensionRegistry().from_descriptor_list(list(descriptors)):
            if isinstance(ext, StreamTransformExtension):
                stream = ext.transform_from(stream)
        return stream.read(-1)
    except Exception as err:  # noqa: BLE001 - unknown transform, damaged compressed data
        raise CorruptCheckpointError(
            f"{label}: cannot undo its stored transforms {list(descriptors)} ({error_cause(err)})"
        ) from err


def _verify_shards(folder: Path, meta, meta_path: Path) -> None:
    """Every stored item's shard file lies inside `folder`, exists and is long enough; every bytes
    item loads weights-only."""
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        MetadataIndex,
        TensorStorageMetadata,
    )

    items = meta.state_dict_metadata  # a dict: `read_metadata` checked it
    storage = getattr(meta, "storage_data", None)
    if not isinstance(storage, dict):
        raise CorruptCheckpointError(f"{meta_path}: no storage records ({type(storage).__name__})")
    for fqn, md in items.items():
        if not isinstance(md, (TensorStorageMetadata, BytesStorageMetadata)):
            raise CorruptCheckpointError(
                f"{meta_path}: item {fqn!r} has metadata of type {type(md).__name__}"
            )

    needed: dict[str, int] = {}  # shard file -> bytes the records need
    for index, info in storage.items():
        _check_storage_info(info, index, meta_path)
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for rel, need in sorted(needed.items()):
        path = folder / rel
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise CorruptCheckpointError(
                f"{path}: missing; {meta_path} stores items in it"
            ) from None
        except OSError as err:
            raise CorruptCheckpointError(f"{path}: unreadable ({error_cause(err)})") from err
        if not stat.S_ISREG(st.st_mode):
            raise CorruptCheckpointError(f"{path}: not a regular file")
        if st.st_size < need:
            raise CorruptCheckpointError(
                f"{path}: truncated: {st.st_size} bytes, the metadata needs {need}"
            )

    per_file: dict[str, list] = {}
    for fqn, md in items.items():
        if not isinstance(md, BytesStorageMetadata):
            continue
        info = storage.get(MetadataIndex(fqn))
        if info is None:
            raise CorruptCheckpointError(
                f"{meta_path}: lists the item {fqn!r} but no record of where it is stored"
            )
        per_file.setdefault(info.relative_path, []).append((fqn, info))
    for rel, entries in sorted(per_file.items()):
        path = folder / rel
        with open(path, "rb") as handle:
            for fqn, info in sorted(entries, key=lambda e: e[1].offset):
                label = f"{path}: item {fqn!r} (bytes {info.offset}..{info.offset + info.length})"
                raw = _read_range(handle, info.offset, info.length)
                if len(raw) != info.length:  # shrank since the size check
                    raise CorruptCheckpointError(
                        f"{path}: truncated: item {fqn!r} needs bytes up to "
                        f"{info.offset + info.length}"
                    )
                raw = _undo_transforms(raw, getattr(info, "transform_descriptors", None), label)
                load_weights_only(io.BytesIO(raw), label, raw)


def _verify_config(folder: Path) -> None:
    path = folder / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise CorruptCheckpointError(
            f"{path}: missing; {folder} is no megatron-core distributed checkpoint"
        ) from None
    except (OSError, ValueError) as err:
        raise CorruptCheckpointError(f"{path}: garbled ({error_cause(err)})") from err
    if not isinstance(config, dict):
        raise CorruptCheckpointError(f"{path}: garbled (not a JSON object)")
    for key, expected in (("sharded_backend", "torch_dist"), ("common_backend", "torch")):
        if config.get(key, expected) != expected:
            raise CorruptCheckpointError(
                f"{path}: {key} is {config.get(key)!r}; only {expected!r} checkpoints "
                "(megatron-core's default format) are verified and read"
            )


def verify_checkpoint_folder(folder: str | os.PathLike, *, split_among_ranks: bool = False) -> None:
    """Checks that loading the torch_dist checkpoint in `folder` (an `iter_XXXXXXX` folder)
    with megatron-core cannot run code from its files, and that its files are those saved;
    call it before loading.

    Reads `metadata.json`, `.metadata` (restricted unpickling), every shard file's size, every
    bytes item of the shards and `common.pt` (weights-only). See the module docstring for
    what is and is not covered. Then every file against the folder's manifest
    (`manifest.verify_folder_manifest`: sizes and checksums, no unlisted shard; a folder saved
    before manifests: one warning), the bytes split among the ranks with `split_among_ranks`
    (all ranks of the default process group call this together).

    Raises:
        UnsafeCheckpointError: a file refers to code (names the file, the item and the global),
            or a symbolic link in the folder (a shard, a subfolder) leads out of it.
        CorruptCheckpointError: a file is missing, truncated or garbled (names file and cause).
        ManifestError: a file differs from the manifest or is not listed (names the file).
        FileNotFoundError: `folder` does not exist.
    """
    from megatron_nvembed.checkpoint.manifest import verify_folder_manifest

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such checkpoint folder")
    # No file read below (nor by the loader) may lie outside the folder: no link leads out.
    check_links_inside(folder, error=UnsafeCheckpointError)
    _verify_config(folder)
    meta_path = folder / METADATA_FILE
    meta = read_metadata(meta_path)
    _verify_shards(folder, meta, meta_path)
    common = folder / COMMON_FILE
    if not common.is_file():
        raise CorruptCheckpointError(
            f"{common}: missing; {folder} is no complete torch_dist checkpoint"
        )
    load_weights_only(common, str(common))
    verify_folder_manifest(folder, split_among_ranks=split_among_ranks)


def load_rng_file(path: str | os.PathLike) -> dict:
    """Reads a per-rank RNG file (`rng/rank_XXXXX.pt`) without running code from it.

    Returns:
        {"cpu": ByteTensor, "cuda": ByteTensor or None, "tracker": {name: ByteTensor} or None},
        as `torch.save`d by the training checkpoint.

    Raises:
        UnsafeCheckpointError: the file refers to code (a crafted pickle).
        CorruptCheckpointError: truncated or garbled, or not an RNG state (names the file).
        FileNotFoundError: no such file.
    """
    path = Path(path)
    state = load_weights_only(path, str(path))
    if not isinstance(state, dict) or any(k not in state for k in RNG_KEYS):
        keys = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
        raise CorruptCheckpointError(
            f"{path}: holds no RNG state (expected keys {list(RNG_KEYS)}, found {keys})"
        )
    cpu = state["cpu"]
    if not isinstance(cpu, torch.Tensor) or cpu.dtype != torch.uint8:
        raise CorruptCheckpointError(f"{path}: 'cpu' is not a generator state (uint8 tensor)")
    return state
