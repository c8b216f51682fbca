"""A full disk, reported in one place: `DiskFullError` names the output, the bytes it needed and
the bytes free (`shutil.disk_usage`, measured after the temporary is removed).

`is_disk_full` recognises the error however the writer reported it (ENOSPC / EDQUOT, or the
texts of numpy's, torch's and safetensors' writers, which carry no errno); `reserve_space`
allocates a file's bytes before they are written, so a write of known size fails before its
first byte and a memory map of it never dies of SIGBUS; `check_free_space` refuses an output
of known size before anything is computed. `fileio.atomic_path` / `atomic_dir` turn a full disk
inside them into `DiskFullError`. Tools print it as one `error:` line and exit with
`DISK_FULL_EXIT` (3, the trainer's exit code for a failed checkpoint save).

Imports nothing of the package.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
from pathlib import Path

import numpy as np


class DiskFullError(OSError):
    """A write ran out of space; its message is one line: the path, the bytes needed (`needed`;
    when unknown, more than the `written` ones), the bytes free (`free`, as measured when the
    write failed; by default now). Tools print it as `error: ...` and exit with code 3 (as a failed checkpoint save)."""

    def __init__(
        self,
        path: str | os.PathLike,
        needed: int | None,
        written: int | None = None,
        free: int | None = None,
    ):
        self.path, self.needed, self.written = Path(path), needed, written
        self.free = free_bytes(self.path) if free is None else free
        if needed is not None:
            need = f"{needed} bytes needed"
        else:
            need = f"more than {written or 0} bytes needed (it failed after writing those)"
        super().__init__(
            errno.ENOSPC, f"{path}: no space left on device: {need}, {self.free} bytes free"
        )

    def __str__(self) -> str:
        return self.strerror


DISK_FULL_EXIT = 3
"""The exit code of every tool for a full disk (the trainer's for a failed checkpoint save)."""

# Writers that report a full disk without an errno: numpy's `tofile` ("N requested and M
# written"), torch's zip writer ("file write failed", "unexpected pos"), safetensors' Rust writer.
_FULL_TEXTS = (
    "No space left",
    "requested and",
    "file write failed",
    "unexpected pos",
    "StorageFull",
)


def is_disk_full(err: BaseException) -> bool:
    """Whether `err` (or an exception it was raised from) says the disk or quota is full."""
    seen = 0
    e: BaseException | None = err
    while e is not None and seen < 8:
        if isinstance(e, DiskFullError):
            return True
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(t in str(e) for t in _FULL_TEXTS):  # torch's CheckpointException is a BaseException
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes (for this user) on the file system of `path` or of its nearest existing
    parent."""
    p = Path(path).absolute()
    while not p.exists() and p.parent != p:
        p = p.parent
    return shutil.disk_usage(p).free


def check_free_space(path: str | os.PathLike, needed: int) -> None:
    """Refuses, before anything is computed, an output of `needed` bytes at `path` that cannot
    fit on its file system.

    Raises:
        DiskFullError: fewer than `needed` bytes free there.
    """
    if free_bytes(path) < needed:
        raise DiskFullError(path, needed)


def reserve_space(handle, size: int, path: str | os.PathLike) -> None:
    """Allocates `size` bytes for the open file `handle` (`os.posix_fallocate`; where the file
    system cannot, by writing zeros) so that writing them later cannot run out of space, and a
    memory map of them cannot die of SIGBUS.

    Raises:
        DiskFullError: naming `path`, when the space is not there.
    """
    fd = handle.fileno()
    try:
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as err:
            if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
            pos = os.lseek(fd, 0, os.SEEK_CUR)
            os.lseek(fd, 0, os.SEEK_SET)
            block = b"\0" * (1 << 20)
            for start in range(0, size, len(block)):
                os.write(fd, block[: min(len(block), size - start)])
            os.fsync(fd)
            os.lseek(fd, pos, os.SEEK_SET)
    except OSError as err:
        if is_disk_full(err):
            raise DiskFullError(path, size) from err
        raise


def _size_of(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    return path.stat().st_size if path.exists() else 0


def disk_full_error(err: BaseException, final: Path, tmp: Path, size: int | None) -> DiskFullError:
    """The one-line error for a write to `final` through `tmp` (a file or folder) that ran out
    of space, with the free space when it did; `tmp` is removed."""
    inner = err if isinstance(err, DiskFullError) else None
    written = inner.written if inner is not None else _size_of(tmp)
    needed = inner.needed if inner is not None and inner.needed is not None else size
    free = inner.free if inner is not None else free_bytes(tmp)
    if tmp.is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.unlink(missing_ok=True)
    return DiskFullError(final, needed, written, free)


def npy_size(shape: tuple[int, ...], dtype) -> int:
    """Bytes of a `.npy` file of an array of `shape` and `dtype` (C order): header and data."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False}
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {**header, "shape": tuple(shape)})
    return buf.tell() + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
