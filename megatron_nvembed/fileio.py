"""Atomic file writes: the content goes to a temporary file beside the target, then one rename
puts it in place, so a reader (or a rerun after a kill) sees the old file or the new one, never
half of one. Imports nothing of the package; everything that writes results uses it.
"""

from __future__ import annotations

import glob
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside `path` (same folder, so the rename is atomic); on a clean
    exit it is renamed over `path`, on an exception it is removed. Parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    # mkstemp creates the file private (0600); the result gets the mode a plain open() would
    # give it (0666 less the umask), so colleagues on a shared filesystem can read results.
    os.chmod(tmp, 0o666 & ~_UMASK)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Writes text (UTF-8) or bytes to `path` atomically."""
    with atomic_path(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")


def write_with(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Calls `write(tmp)` to fill a temporary file, then renames it over `path`."""
    with atomic_path(path) as tmp:
        write(tmp)


def save_npy_atomic(path: str | os.PathLike, array: np.ndarray) -> None:
    """`np.save` to `path` atomically (the `.npy` format, no pickled objects)."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(array), allow_pickle=False)

    write_with(path, write)


def remove_stale_temporaries(folder: str | os.PathLike, name: str | None = None) -> int:
    """Removes the `.NAME.*.tmp` files a killed writer left in `folder` (only those of file
    `name` when given: a folder other runs write other files into at this moment); returns how
    many."""
    pattern = f".{glob.escape(name)}.*.tmp" if name is not None else ".*.tmp"
    n = 0
    for p in Path(folder).glob(pattern):
        p.unlink(missing_ok=True)
        n += 1
    return n
