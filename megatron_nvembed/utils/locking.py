"""Output locks: one writer per output (a checkpoint folder, a converted model, an embeddings
file or folder, a mined file).

`output_lock(OUTPUT, FLAG)` takes an OS file lock (`flock`, exclusive, not waiting) on a lock
file beside the output, `PARENT/.NAME.nvembed-lock` (beside, not inside: a folder output is
swapped whole by `fileio.atomic_dir`), and holds it while the job writes. The lock file records
its holder as JSON (host, pid, command line, start time), so a second writer is refused in one
line naming the output, the flag and the holder (`OutputLocked`, a ValueError: the tools print
`error: ...` and exit with code 2, before anything is computed). The operating system drops the
lock when its process ends, however it ends; a lock file still naming a holder whose lock is
free was left by a killed job: the next run takes it over and says so in one log line. A clean
release clears the record and keeps the file (removing it would race with another job opening
it).

The lock of OUTPUT covers OUTPUT, what lies inside it and the hidden siblings this package
writes beside it (`.NAME.nvembed-*`: `atomic_dir`'s temporaries): `holds(path)` says whether
this process holds a lock covering `path`, and only the holder removes the temporaries an
earlier run left (`fileio`), so a temporary of a run that is alive is never deleted. Taking a
lock this process already holds (covering) is a no-op, so a tool takes it up front and the
library functions it calls take it again without effect.

Imports nothing of the package.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

logger = logging.getLogger(__name__)

LOCK_SUFFIX = ".nvembed-lock"
_COMMAND_CHARS = 200

_HELD: dict[Path, int] = {}
"""Outputs whose lock this process holds (normalised path) -> the lock file's descriptor."""


class OutputLocked(ValueError):
    """Another live job holds the lock of the output (the message names it)."""


def _normal(path: str | os.PathLike) -> Path:
    """`path` absolute with its parent folders' links resolved; the last part itself is kept
    (an output that is a link is refused by the output checks, not followed here)."""
    path = Path(path).absolute()
    return path.parent.resolve() / path.name


def lock_file(output: str | os.PathLike) -> Path:
    """The lock file of `output`: `.NAME.nvembed-lock` in its parent folder."""
    out = _normal(output)
    return out.parent / f".{out.name}{LOCK_SUFFIX}"


def holds(path: str | os.PathLike) -> bool:
    """Whether this process holds a lock covering `path` (the output itself, inside it, or one
    of the `.NAME.nvembed-*` folders beside it and what they hold), or `path` lies in a
    `.NAME.nvembed-tmp-*` folder (`fileio.atomic_dir`'s: made new, with a name of its own, by a
    run holding NAME's lock, e.g. for the worker processes it starts to write into)."""
    path = _normal(path)
    for p in (path, *path.parents):
        if p.name.startswith(".") and ".nvembed-tmp-" in p.name:
            return True
        for out in _HELD:
            if p == out or (p.parent == out.parent and p.name.startswith(f".{out.name}.nvembed-")):
                return True
    return False


def _owner() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "command": shlex.join(getattr(sys, "orig_argv", sys.argv)),
        "since": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime()),
    }


def read_owner(output: str | os.PathLike) -> dict | None:
    """The holder recorded in `output`'s lock file (None: no file, cleared, or unreadable)."""
    try:
        record = json.loads(lock_file(output).read_text(encoding="utf-8") or "null")
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _describe(owner: dict | None) -> str:
    if owner is None:
        return "a job that recorded no owner"
    command = " ".join(str(owner.get("command", "?")).split())  # one line
    if len(command) > _COMMAND_CHARS:
        command = command[: _COMMAND_CHARS - 3] + "..."
    return (
        f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')} since "
        f"{owner.get('since', '?')} ({command})"
    )


def _refusal(out: Path, flag: str, path: Path) -> OutputLocked:
    return OutputLocked(
        f"{flag} {out}: another job is writing it: {_describe(read_owner(out))}; wait for it "
        f"to end, or stop it, or choose another {flag} (lock file {path})"
    )


def _open(path: Path, output: Path, flag: str) -> int:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise ValueError(f"{flag} {output}: cannot open its lock file {path} ({err})") from err
    return fd


def _acquire(out: Path, flag: str) -> int:
    """Takes `out`'s lock; returns the lock file's descriptor, the holder recorded in it."""
    path = lock_file(out)
    fd = _open(path, out, flag)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise ValueError(f"{flag} {out}: cannot lock {path} ({err})") from err
        raise _refusal(out, flag, path) from None
    left = read_owner(out)
    if left is not None:
        logger.warning(
            "took over the lock of %s left by pid %s on host %s (since %s; that job ended "
            "without releasing it, e.g. killed)",
            out,
            left.get("pid", "?"),
            left.get("host", "?"),
            left.get("since", "?"),
        )
    record = json.dumps(_owner()).encode("utf-8")
    os.ftruncate(fd, 0)
    os.pwrite(fd, record, 0)
    return fd


def _release(out: Path) -> None:
    fd = _HELD.pop(out)
    try:
        os.ftruncate(fd, 0)  # cleared, not removed: another job may be opening it now
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextmanager
def output_lock(output: str | os.PathLike, flag: str) -> Iterator[Path]:
    """Holds the lock of `output` for the `with` block (a no-op when this process already holds
    one covering it, see `holds`); yields `output` normalised.

    Args:
        output: the file or folder the job writes (it need not exist; its parent folders are
            created for the lock file).
        flag: its command-line flag, for the refusal (e.g. "--save").

    Raises:
        OutputLocked: another live job holds it (naming the output, the flag and the holder).
        ValueError: the lock file cannot be opened or locked (naming it).
    """
    out = _normal(output)
    if holds(out):
        yield out
        return
    _HELD[out] = _acquire(out, flag)
    try:
        yield out
    finally:
        _release(out)


def rank0_output_lock(output: str | os.PathLike, flag: str):
    """`output_lock` in the process of global rank 0 (environment variable RANK, set by torchrun;
    none: a single process), before any process group exists; nothing in the other ranks (one
    process per job holds it, on one node)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return nullcontext(_normal(output))
    return output_lock(output, flag)


def check_unlocked(output: str | os.PathLike, flag: str) -> None:
    """Raises `OutputLocked` when another live job holds the lock of `output` (a check before a
    launcher starts the processes that take it); takes nothing and writes nothing."""
    out = _normal(output)
    path = lock_file(out)
    if holds(out) or not path.exists():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        raise _refusal(out, flag, path) from None
    finally:
        os.close(fd)  # closing drops the shared lock too
