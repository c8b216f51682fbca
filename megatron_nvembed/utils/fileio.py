"""Atomic writes of files and folders, and the checks on an output folder before it is written.

A file's content goes to a temporary file beside the target, then one rename puts it in place,
so a reader (or a rerun after a kill) sees the old file or the new one, never half of one
(`atomic_path`, `write_atomic`). A folder output (a converted or merged checkpoint) is written
the same way: into a new hidden folder beside it, swapped in once complete (`atomic_dir`). Before
anything is read, `check_output_dir` refuses an output folder that must not be written (non-empty
without overwrite, a link, the source itself, inside it or holding it).

Disk full: a write that runs out of space anywhere under `atomic_path` or `atomic_dir` removes
its temporary and raises `utils.diskspace.DiskFullError` (one line: the output, the bytes it
needed, the bytes free); `save_npy_atomic` reserves its bytes before writing them.

Paths inside: `resolve_inside` and `check_links_inside` refuse a file or symbolic link of an
input folder that resolves outside it, before it is read.

Imports nothing of the package but `utils.diskspace` and `utils.locking` (a folder output is
written under its lock); everything that writes results uses it.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from megatron_nvembed.utils.diskspace import (
    disk_full_error,
    is_disk_full,
    npy_size,
    reserve_space,
)
from megatron_nvembed.utils.locking import holds, output_lock


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextmanager
def atomic_path(path: str | os.PathLike, size: int | None = None) -> Iterator[Path]:
    """Yields a temporary path beside `path` (same folder, so the rename is atomic); on a clean
    exit it is renamed over `path`, on an exception it is removed. Parent folders are created.

    `size`: the bytes the file will hold, when known (the `DiskFullError` says so). A write that
    runs out of space raises `DiskFullError` naming `path`."""
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
    except BaseException as err:
        if is_disk_full(err):
            raise disk_full_error(err, path, Path(tmp), size) from err
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Writes text (UTF-8) or bytes to `path` atomically."""
    raw = data if isinstance(data, bytes) else data.encode("utf-8")
    with atomic_path(path, len(raw)) as tmp:
        tmp.write_bytes(raw)


def write_with(
    path: str | os.PathLike, write: Callable[[Path], None], size: int | None = None
) -> None:
    """Calls `write(tmp)` to fill a temporary file, then renames it over `path` (`size`: as
    `atomic_path` takes it)."""
    with atomic_path(path, size) as tmp:
        write(tmp)


def save_npy_atomic(path: str | os.PathLike, array: np.ndarray) -> None:
    """`np.save` to `path` atomically (the `.npy` format, no pickled objects); its bytes are
    reserved first (`reserve_space`)."""
    array = np.asarray(array)
    size = npy_size(array.shape, array.dtype)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            reserve_space(f, size, path)
            np.save(f, array, allow_pickle=False)
            f.truncate()  # exactly the array, whatever was reserved

    write_with(path, write, size)


def remove_stale_temporaries(
    folder: str | os.PathLike, name: str | None = None, *, min_age_s: float = 0.0
) -> int:
    """Removes the `.NAME.*.tmp` files a killed writer left in `folder` (only those of file
    `name` when given: a folder other runs write other files into at this moment); returns how
    many. With `min_age_s`, only those unmodified for that long: where another process may be
    writing the same file right now (a writer that is alive keeps its temporary's mtime recent)."""
    pattern = f".{glob.escape(name)}.*.tmp" if name is not None else ".*.tmp"
    now = time.time()
    n = 0
    for p in Path(folder).glob(pattern):
        if min_age_s:
            try:
                if now - p.stat().st_mtime < min_age_s:
                    continue
            except FileNotFoundError:  # its writer renamed or removed it meanwhile
                continue
        p.unlink(missing_ok=True)
        n += 1
    return n


# --------------------------------------------------------------------------------------------
# Output folders: the checks before anything is read, and write-beside-then-swap


def folder_relation(path: Path, other: Path) -> str | None:
    """How resolved `path` stands to resolved `other`, as the refusals word it: "is the same
    folder as", "is inside", "contains", or None when neither holds the other."""
    if path == other:
        return "is the same folder as"
    if other in path.parents:
        return "is inside"
    if path in other.parents:
        return "contains"
    return None


def resolve_inside(
    path: str | os.PathLike,
    folder: str | os.PathLike,
    *,
    error: type[Exception] = ValueError,
    also: tuple[Path, ...] = (),
) -> Path:
    """`path` resolved (symbolic links and `..` followed), refused unless it lies inside
    `folder` (or one of the folders `also`, resolved); links that stay inside are fine.

    Raises:
        `error`, naming `path`, where it leads and `folder`; before `path` is read.
    """
    target = Path(path).resolve()
    for root in (Path(folder), *also):
        if folder_relation(target, root.resolve()) in ("is the same folder as", "is inside"):
            return target
    raise error(
        f"{path}: resolves to {target}, outside {folder}; refusing to read a file outside "
        "the folder it belongs to (a symbolic link or '..' leads out)"
    )


def check_links_inside(
    folder: str | os.PathLike, *, error: type[Exception] = ValueError, also: tuple[Path, ...] = ()
) -> None:
    """Every symbolic link in `folder` and its subfolders (links are not followed, so a linked
    subfolder is checked as a link) resolves inside `folder` (`resolve_inside`): no read of a
    file of the folder leaves it.

    Raises:
        `error`, naming the first link that leads out.
    """
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in sorted(dirnames + filenames):
            entry = Path(dirpath) / name
            if entry.is_symlink():
                resolve_inside(entry, folder, error=error, also=also)


def check_output_dir(
    output: str | os.PathLike,
    flag: str,
    sources: list[tuple[str, str | os.PathLike]],
    *,
    overwrite: bool = False,
) -> Path:
    """Refuses an output folder a conversion or merge must not write; returns its resolved path.

    Reads nothing but the file system entries themselves, so it runs before any weights are
    loaded.

    Args:
        output: the folder the tool writes (replaced whole when it exists).
        flag: its command-line flag, for the messages (e.g. "--hf-dir").
        sources: (flag, path) of each folder the tool reads.
        overwrite: allow replacing an existing non-empty folder (`--overwrite`).

    Returns:
        `output`, resolved.

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
        relation = folder_relation(resolved, Path(source).resolve())
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


def _sibling(final: Path, tag: str) -> Path:
    """A hidden path beside `final` that does not exist yet: `.NAME.nvembed-<tag>-<random>`."""
    while True:
        path = final.with_name(f".{final.name}.nvembed-{tag}-{secrets.token_hex(4)}")
        if not path.exists() and not path.is_symlink():
            return path


def _temp_dir_beside(final: Path) -> Path:
    """A new empty folder next to `final` (created with its parents), to write the output in.

    Its name is new each time and marked as this package's (`.NAME.nvembed-tmp-*`), so no folder
    of the user's (a `NAME.tmp`) is ever deleted to make room for it; the temporaries of earlier
    runs to the same output that were killed midway are removed here, by the holder of the
    output's lock only (`utils.locking`): a live run's temporary is never taken from it.

    Returns:
        The new folder's path.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    if not holds(final):
        raise RuntimeError(f"{final}: written without holding its lock (utils.locking)")
    for left in final.parent.glob(f".{glob.escape(final.name)}.nvembed-tmp-*"):
        shutil.rmtree(left, ignore_errors=True)
    tmp = _sibling(final, "tmp")
    tmp.mkdir()
    return tmp


def _replace_dir(tmp: Path, final: Path, *, overwrite: bool, flag: str) -> None:
    """Moves the finished `tmp` to `final`. An existing `final` is renamed aside, `tmp` renamed
    in, then the old one deleted: at every moment one complete version exists on disk (after a
    kill between the two renames, the old one under `.NAME.nvembed-old-*`).

    Args:
        tmp: the written folder (from `_temp_dir_beside(final)`).
        final: the output folder, as `check_output_dir` returned it.
        overwrite: an existing non-empty `final` may be replaced.
        flag: the output's command-line flag, for the message.

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


@contextmanager
def atomic_dir(
    final: Path, *, overwrite: bool, flag: str, size: int | None = None
) -> Iterator[Path]:
    """Yields a new folder beside `final` (`_temp_dir_beside`) to write the output in; on a clean
    exit it is swapped in for `final` (`_replace_dir`), on an exception it is removed and `final`
    stays as it was. All of it under the lock of `final` (`utils.locking.output_lock`, taken here
    unless the caller holds it already).

    Args:
        final: the output folder, resolved (as `check_output_dir` returns it).
        overwrite, flag: as `_replace_dir` takes them.
        size: the bytes the output will hold, when known (for the `DiskFullError`).

    Raises:
        utils.locking.OutputLocked: another job writes `final`.
        DiskFullError: a write into the folder ran out of space (the folder is removed).
    """
    with output_lock(final, flag):
        tmp = _temp_dir_beside(final)
        try:
            yield tmp
            _replace_dir(tmp, final, overwrite=overwrite, flag=flag)
        except BaseException as err:
            if is_disk_full(err):
                raise disk_full_error(err, final, tmp, size) from err
            shutil.rmtree(tmp, ignore_errors=True)
            raise
