"""Unpickling a checkpoint's files without running code written into them.

Two readers, used by `checkpoint_safety` (which holds the threat model and the checks of a whole
checkpoint folder):

- `read_metadata`: a `.metadata` file (torch distributed checkpoint metadata, which torch itself
  reads with plain `pickle.load`) through an unpickler that resolves only the globals torch's
  metadata classes need (torch.distributed.checkpoint's metadata / planner / storage dataclasses
  and enums, `torch.Size`, torch dtypes, `torch.serialization._get_layout`, `pathlib.PosixPath`
  of `StorageMeta.checkpoint_id`, and megatron-core's two empty legacy classes `MCoreMetadata` /
  `MCoreSavePlan`). Any other global (`builtins.exec`, `os.system`, `getattr`...) is refused
  before it is imported or called.
- `load_weights_only`: `torch.load(weights_only=True)`, with a failure told apart as a refused
  global (`UnsafeCheckpointError`, naming the globals the file's pickles import that torch's
  weights-only unpickler does not allow) or damage (`CorruptCheckpointError`).
"""

from __future__ import annotations

import _compat_pickle
import importlib
import io
import pickle
import pickletools
import re
import zipfile
from pathlib import Path

import torch


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


def error_cause(err: BaseException) -> str:
    """`Type: first line of the message` of `err`, for the errors that name a file's damage."""
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


def load_weights_only(source, label: str, data: bytes | None = None):
    """`torch.load(source, weights_only=True)` on the CPU; errors name `label` and the cause.

    Args:
        source: a path or a seekable binary stream.
        label: how errors name what is read ("FILE", "FILE: item 'KEY'").
        data: the bytes of `source` (read from the path on failure when None).

    Returns:
        What the file holds.

    Raises:
        UnsafeCheckpointError: the pickle names or calls a global torch's weights-only loading
            refuses (the first three named).
        CorruptCheckpointError: truncated or garbled.
        FileNotFoundError: `source` is a path that does not exist.
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
        raise CorruptCheckpointError(f"{label}: garbled ({error_cause(err)})") from err
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 - EOFError, RuntimeError (zip), ValueError...
        raise CorruptCheckpointError(f"{label}: truncated or garbled ({error_cause(err)})") from err


def read_metadata(path: Path):
    """Unpickles a `.metadata` file with only the allow-listed globals.

    Returns:
        The torch distributed-checkpoint `Metadata` it holds (or megatron-core's legacy
        `MCoreMetadata`, read as a stand-in class with the same fields).

    Raises:
        UnsafeCheckpointError: the file names a global outside the allow-list (names it).
        CorruptCheckpointError: missing, unreadable, truncated or garbled, or holding no
            distributed-checkpoint metadata (names the file).
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CorruptCheckpointError(
            f"{path}: missing; {path.parent} is no complete torch_dist checkpoint "
            "(an interrupted save?)"
        ) from None
    except OSError as err:
        raise CorruptCheckpointError(f"{path}: unreadable ({error_cause(err)})") from err
    try:
        meta = _MetadataUnpickler(io.BytesIO(data), path).load()
    except UnsafeCheckpointError:
        raise
    except EOFError as err:
        raise CorruptCheckpointError(f"{path}: truncated ({len(data)} bytes)") from err
    except Exception as err:  # noqa: BLE001 - UnpicklingError, TypeError, KeyError...
        raise CorruptCheckpointError(f"{path}: garbled ({error_cause(err)})") from err
    from torch.distributed.checkpoint.metadata import Metadata

    items = getattr(meta, "state_dict_metadata", None)
    if not isinstance(meta, (Metadata, _LegacyMCoreMetadata)) or not isinstance(items, dict):
        raise CorruptCheckpointError(
            f"{path}: holds {type(meta).__name__}, not torch distributed-checkpoint metadata"
        )
    return meta
