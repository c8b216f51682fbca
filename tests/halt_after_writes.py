"""Runs a tool that halts for good before its (N+1)-th atomic write of a matching file, so that
a kill test's "random moment" is bounded by the tool's progress, not by how fast the machine is.

    python tests/halt_after_writes.py N REGEX TOOL.py [TOOL ARGS...]

Every write through `megatron_nvembed.utils.fileio` (`write_atomic`, `save_npy_atomic`, `write_with`;
all go through `fileio.atomic_path`) of a file whose name fully matches REGEX is counted; the
first N proceed, the next one blocks until the process is killed. A test waits for some of the N
writes, kills the tool at a random moment after that, and knows that at most N were made
whatever the scheduling (a loaded machine slows the test's polling as much as it likes; an idle
one cannot finish the tool before the kill). The tool runs as `__main__`, as from the command
line; only the timing of its writes changes.
"""

import os
import re
import runpy
import sys
import threading
from contextlib import contextmanager

from megatron_nvembed.utils import fileio

allowed, pattern = int(sys.argv[1]), re.compile(sys.argv[2])
real_atomic_path, seen = fileio.atomic_path, [0]


@contextmanager
def atomic_path(path, *args, **kwargs):
    if pattern.fullmatch(os.path.basename(path)):
        seen[0] += 1
        if seen[0] > allowed:
            threading.Event().wait()  # until killed
    with real_atomic_path(path, *args, **kwargs) as tmp:
        yield tmp


fileio.atomic_path = atomic_path
sys.argv = sys.argv[3:]
runpy.run_path(sys.argv[0], run_name="__main__")
