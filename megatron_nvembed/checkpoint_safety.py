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
- Every stored item's shard file exists inside the folder and is long enough for the item's
  byte range; every bytes item is read (after undoing its stored stream transforms, as torch
  does) and must load with `torch.load(weights_only=True)`.
- `common.pt` must load with `torch.load(weights_only=True)`; `metadata.json` must name the
  torch_dist / torch backends (the only ones verified here).

`load_rng_file` reads an RNG file with `weights_only=True`.

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

Over 400 lines on purpose: the threat model and every check of it in one file, so a security
review reads them together.
"""

from __future__ import annotations

import _compat_pickle
import importlib
import io
import json
import os
import pickle
import pickletools
import re
import stat
import zipfile
from pathlib import Path

import torch

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


class UnsafeCheckpointError(ValueError):
    """A checkpoint file refers to code that loading it would import or call."""


class CorruptCheckpointError(ValueError):
    """A checkpoint file is missing, truncated or unreadable."""


class _LegacyMCoreMetadata:
    """Stands in, while checking, for megatron-core's `MCoreMetadata` (checkpoints of
    megatron-core 0.15 name it; today an empty class kept only so they unpickle)."""


class _LegacyMCoreSavePlan:
    """Stands in for megatron-core's empty legacy `MCoreSavePlan`, as above."""


_DCP = "torch.distributed.checkpoint"
# Every global a `.metadata` written by torch 2.13 / megatron-core 0.16 can name (read from
# torch/distributed/checkpoint/{metadata,planner,filesystem}.py): the metadata dataclasses, the
# save plans megatron-core stores as `all_local_plans` (its plan cache), the per-item storage
# records, and what their fields hold.
_ALLOWED_GLOBALS: dict[str, frozenset[str]] = {
    f"{_DCP}.metadata": frozenset(
        {
            "Metadata",
            "MetadataIndex",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorStorageMetadata",
            "TensorProperties",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        }
    ),
    f"{_DCP}.planner": frozenset(
        {"SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "BytesIOWriteData"}
    ),
    f"{_DCP}.filesystem": frozenset({"_StorageInfo", "_StoragePrefix"}),
    "torch.serialization": frozenset({"_get_layout"}),  # how torch.layout pickles
    "pathlib": frozenset({"PosixPath"}),  # StorageMeta.checkpoint_id given as a Path
}
_LEGACY_GLOBALS = {
    ("megatron.core.dist_checkpointing.strategies.torch", "MCoreMetadata"): _LegacyMCoreMetadata,
    ("megatron.core.dist_checkpointing.strategies.torch", "MCoreSavePlan"): _LegacyMCoreSavePlan,
}
_TORCH_DTYPES = frozenset(k for k, v in vars(torch).items() if isinstance(v, torch.dtype))


def _allowed_global(module: str, name: str):
    """The object `module.name` stands for in a `.metadata` file, or None when not allowed."""
    legacy = _LEGACY_GLOBALS.get((module, name))
    if legacy is not None:
        return legacy
    if module == "torch":
        if name == "Size":
            return torch.Size
        return getattr(torch, name) if name in _TORCH_DTYPES else None
    if name in _ALLOWED_GLOBALS.get(module, ()):
        return getattr(importlib.import_module(module), name)
    return None


def _global_name(module: str, name: str) -> str:
    """`module.name` as Python 3 spells it (protocol 0-2 pickles write `__builtin__`...)."""
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}"


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a `.metadata` file, resolving only the allow-listed globals."""

    def __init__(self, file, path: Path) -> None:
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str):
        obj = _allowed_global(module, name)
        if obj is None:
            raise UnsafeCheckpointError(
                f"{self._path}: refers to {_global_name(module, name)}, which a checkpoint "
                "never holds; refusing to load it (it could run code)"
            )
        return obj


def _cause(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


# torch's weights-only unpickler messages that mean "this names or calls something not allowed"
_REFUSED_PATTERNS = (
    re.compile(r"GLOBAL (\S+) was not an allowed global"),
    re.compile(r"unsupported GLOBAL (\S+) whose module"),
    re.compile(r"reduce for unrecognized function (.+?)(?: which belongs|$)", re.M),
    re.compile(r"Can only create new object .*? but got (.+)$", re.M),
    re.compile(r"(\S+) must be imported to load"),
)
_STRING_OPS = frozenset(
    {
        "UNICODE",
        "SHORT_BINUNICODE",
        "BINUNICODE",
        "BINUNICODE8",
        "STRING",
        "BINSTRING",
        "SHORT_BINSTRING",
    }
)


def _imports_of_pickle(stream) -> list[str]:
    """The globals one pickle read from `stream` imports (approximate names for STACK_GLOBAL).

    Raises whatever `pickletools.genops` raises when the stream is no complete pickle."""
    found: list[str] = []
    strings: list[str | None] = []  # recent pushes of strings, for STACK_GLOBAL's operands
    memo: dict[int, str | None] = {}
    for op, arg, _ in pickletools.genops(stream):
        name = op.name
        if name in ("GLOBAL", "INST"):
            found.append(_global_name(*str(arg).split(" ", 1)))
        elif name == "STACK_GLOBAL":
            mod, attr = strings[-2:] if len(strings) >= 2 else [None, None]
            found.append(_global_name(mod, attr) if mod and attr else "a global named on the stack")
        elif name.startswith("EXT"):
            found.append(f"copyreg extension code {arg}")
        elif name in _STRING_OPS:
            strings.append(arg if isinstance(arg, str) else None)
        elif name == "MEMOIZE":
            memo[len(memo)] = strings[-1] if strings else None
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = strings[-1] if strings else None
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            strings.append(memo.get(arg))
        elif name == "STOP":
            return found
    raise EOFError("pickle without STOP")


def _pickle_streams(data: bytes) -> list[bytes]:
    """The pickle data of a `torch.save` file: its `*.pkl` records (zip format) or the file."""
    buf = io.BytesIO(data)
    if zipfile.is_zipfile(buf):
        try:
            with zipfile.ZipFile(buf) as archive:
                return [archive.read(n) for n in archive.namelist() if n.endswith(".pkl")]
        except (zipfile.BadZipFile, OSError, ValueError, EOFError):
            return []
    return [data]


def _refused_globals(err: BaseException, data: bytes) -> list[str]:
    """What a failed weights-only load refused because it would import or call it (empty when
    the failure is damage): the globals that the complete pickles in `data` import and torch's
    weights-only unpickler does not allow (it stops at opcodes it does not implement, such as
    protocol 4's FRAME / STACK_GLOBAL, before reaching any global), else what torch's message
    names."""
    named = None
    for pattern in _REFUSED_PATTERNS:
        m = pattern.search(str(err))
        if m:
            named = m.group(1).strip()
            break
    try:
        from torch._weights_only_unpickler import (
            _get_allowed_globals,
            _get_user_allowed_globals,
        )

        allowed = set(_get_allowed_globals()) | set(_get_user_allowed_globals())
    except (ImportError, AttributeError):  # private helpers of torch; without them, refuse all
        allowed = set()
    refused: list[str] = []
    for pickled in _pickle_streams(data):
        stream = io.BytesIO(pickled)
        while stream.tell() < len(pickled):  # the legacy format is a sequence of pickles
            try:
                names = _imports_of_pickle(stream)
            except Exception:  # noqa: BLE001 - damaged data: no complete pickle from here on
                break
            refused += [n for n in names if n not in allowed and n not in refused]
    if not refused and named is not None:
        refused = [named]
    return refused


def _load_weights_only(source, label: str, data: bytes | None = None):
    """`torch.load(source, weights_only=True)`; errors name `label` and the cause.

    Args:
        source: a path or a seekable binary stream.
        label: how errors name what is read ("FILE", "FILE: item 'KEY'").
        data: the bytes of `source` (read from the path on failure when None).
    """
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if data is None:
            try:
                data = Path(source).read_bytes()
            except OSError:
                data = b""
        refused = _refused_globals(err, data)
        if refused:
            raise UnsafeCheckpointError(
                f"{label}: refers to {', '.join(refused[:3])}, which torch's weights-only "
                "loading refuses; refusing to load it (it could run code)"
            ) from None
        raise CorruptCheckpointError(f"{label}: garbled ({_cause(err)})") from err
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 - EOFError, RuntimeError (zip), ValueError...
        raise CorruptCheckpointError(f"{label}: truncated or garbled ({_cause(err)})") from err


def _read_metadata(path: Path):
    """Unpickles `.metadata` with only the allow-listed globals."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CorruptCheckpointError(
            f"{path}: missing; {path.parent} is no complete torch_dist checkpoint "
            "(an interrupted save?)"
        ) from None
    except OSError as err:
        raise CorruptCheckpointError(f"{path}: unreadable ({_cause(err)})") from err
    try:
        meta = _MetadataUnpickler(io.BytesIO(data), path).load()
    except UnsafeCheckpointError:
        raise
    except EOFError as err:
        raise CorruptCheckpointError(f"{path}: truncated ({len(data)} bytes)") from err
    except Exception as err:  # noqa: BLE001 - UnpicklingError, TypeError, KeyError...
        raise CorruptCheckpointError(f"{path}: garbled ({_cause(err)})") from err
    return meta


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
            f"{label}: cannot undo its stored transforms {list(descriptors)} ({_cause(err)})"
        ) from err


def _verify_shards(folder: Path, meta, meta_path: Path) -> None:
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorStorageMetadata,
    )

    items = getattr(meta, "state_dict_metadata", None)
    storage = getattr(meta, "storage_data", None)
    if not isinstance(meta, (Metadata, _LegacyMCoreMetadata)) or not isinstance(items, dict):
        raise CorruptCheckpointError(
            f"{meta_path}: holds {type(meta).__name__}, not torch distributed-checkpoint metadata"
        )
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
            raise CorruptCheckpointError(f"{path}: unreadable ({_cause(err)})") from err
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
                _load_weights_only(io.BytesIO(raw), label, raw)


def _verify_config(folder: Path) -> None:
    path = folder / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise CorruptCheckpointError(
            f"{path}: missing; {folder} is no megatron-core distributed checkpoint"
        ) from None
    except (OSError, ValueError) as err:
        raise CorruptCheckpointError(f"{path}: garbled ({_cause(err)})") from err
    if not isinstance(config, dict):
        raise CorruptCheckpointError(f"{path}: garbled (not a JSON object)")
    for key, expected in (("sharded_backend", "torch_dist"), ("common_backend", "torch")):
        if config.get(key, expected) != expected:
            raise CorruptCheckpointError(
                f"{path}: {key} is {config.get(key)!r}; only {expected!r} checkpoints "
                "(megatron-core's default format) are verified and read"
            )


def verify_checkpoint_folder(folder: str | os.PathLike) -> None:
    """Checks that loading the torch_dist checkpoint in `folder` (an `iter_XXXXXXX` folder)
    with megatron-core cannot run code from its files; call it before loading.

    Reads `metadata.json`, `.metadata` (restricted unpickling), every shard file's size, every
    bytes item of the shards and `common.pt` (weights-only). See the module docstring for
    what is and is not covered.

    Raises:
        UnsafeCheckpointError: a file refers to code (names the file, the item and the global).
        CorruptCheckpointError: a file is missing, truncated or garbled (names file and cause).
        FileNotFoundError: `folder` does not exist.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such checkpoint folder")
    _verify_config(folder)
    meta_path = folder / METADATA_FILE
    meta = _read_metadata(meta_path)
    _verify_shards(folder, meta, meta_path)
    common = folder / COMMON_FILE
    if not common.is_file():
        raise CorruptCheckpointError(
            f"{common}: missing; {folder} is no complete torch_dist checkpoint"
        )
    _load_weights_only(common, str(common))


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
    state = _load_weights_only(path, str(path))
    if not isinstance(state, dict) or any(k not in state for k in RNG_KEYS):
        keys = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
        raise CorruptCheckpointError(
            f"{path}: holds no RNG state (expected keys {list(RNG_KEYS)}, found {keys})"
        )
    cpu = state["cpu"]
    if not isinstance(cpu, torch.Tensor) or cpu.dtype != torch.uint8:
        raise CorruptCheckpointError(f"{path}: 'cpu' is not a generator state (uint8 tensor)")
    return state
