"""The files of a resumable mining run (`curation.mining`) and the process group it runs in.

Rank 0 owns the output files: `OUT.partial` (the lines of the chunks done, appended),
`OUT.state.json` (the run's fingerprint, the teacher's weights' fingerprint, the queries done, the
byte size of `OUT.partial` and the summary so far, rewritten atomically after each chunk) and, at
the end, `OUT` itself. A resume with another teacher (other weights) is refused. Without a
process group (or with one rank) the group helpers are identities.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from megatron_nvembed.core.logging_utils import get_logger
from megatron_nvembed.curation.mining_options import MiningSummary
from megatron_nvembed.utils.diskspace import DiskFullError, free_bytes, is_disk_full
from megatron_nvembed.utils.fileio import remove_stale_temporaries, write_atomic

logger = get_logger(__name__)

STATE_VERSION = 2

# ---------------------------------------------------------------------------------------------
# process group helpers (identities without one)


def _dist():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None


def broadcast(obj):
    """Rank 0's `obj` on every rank."""
    dist = _dist()
    if dist is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj) -> list | None:
    """Every rank's `obj` on rank 0 (list by global rank), None elsewhere."""
    dist = _dist()
    if dist is None:
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_sum(value: int) -> int:
    """The sum of every rank's `value`, on every rank."""
    dist = _dist()
    if dist is None:
        return value
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return sum(out)


def barrier() -> None:
    dist = _dist()
    if dist is not None:
        dist.barrier()


def global_rank() -> int:
    dist = _dist()
    return 0 if dist is None else dist.get_rank()


# ---------------------------------------------------------------------------------------------
# the run's files


def fingerprint(obj) -> str:
    """A short hash of a JSON-able description of the run."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_fingerprint(path: str | os.PathLike) -> dict:
    """A file's resolved path, size and modification time."""
    p = Path(path)
    st = p.stat()
    return {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


@dataclass
class OutputFiles:
    """The files of the output `out`, and the folder of the corpus embeddings."""

    out: Path
    partial: Path
    state: Path
    embeddings: Path
    private: bool
    """`embeddings` is the run's own `OUT.cache/` (removed after a successful run)."""

    @classmethod
    def of(cls, output_path, corpus_embeddings) -> OutputFiles:
        out = Path(output_path)
        private = corpus_embeddings is None
        return cls(
            out=out,
            partial=out.parent / (out.name + ".partial"),
            state=out.parent / (out.name + ".state.json"),
            embeddings=out.parent / (out.name + ".cache") if private else Path(corpus_embeddings),
            private=private,
        )


def resume(files: OutputFiles, fp: str, teacher_fp: str) -> tuple[int, dict | None]:
    """Rank 0: (queries done, saved summary) of an earlier run with fingerprint `fp`, with the
    partial output truncated to the size recorded after its last chunk; else (0, None) with the
    partial output emptied. The temporaries a killed run's state writes left are removed first.

    Raises:
        ValueError: naming the state file and both fingerprints, when the earlier run's teacher
            had other weights than this run's (`teacher_fp`).
    """
    for p in (files.state, files.partial):
        remove_stale_temporaries(p.parent, p.name)
    state = None
    if files.state.is_file():
        try:
            state = json.loads(files.state.read_text())
        except ValueError:
            state = None
    saved = state.get("summary") if isinstance(state, dict) else None
    made_by = saved.get("teacher_fingerprint") if isinstance(saved, dict) else None
    if made_by and made_by != teacher_fp and files.partial.is_file():
        raise ValueError(
            f"{files.state}: the run to resume was mined with teacher model {made_by}, this run's "
            f"teacher is model {teacher_fp}; delete {files.partial.name} and {files.state.name} "
            "or choose another output"
        )
    if (
        isinstance(state, dict)
        and state.get("fingerprint") == fp
        and files.partial.is_file()
        and files.partial.stat().st_size >= int(state.get("partial_bytes", -1)) >= 0
    ):
        os.truncate(files.partial, int(state["partial_bytes"]))
        logger.info("resuming %s after %d queries", files.out, state["done"])
        return int(state["done"]), state["summary"]
    files.state.unlink(missing_ok=True)
    files.partial.parent.mkdir(parents=True, exist_ok=True)
    with open(files.partial, "wb"):
        pass
    return 0, None


def append_chunk(files: OutputFiles, data: bytes, fp: str, done: int, summary: MiningSummary):
    """Rank 0: appends a chunk's lines to the partial output, then records the state (a kill
    between the two leaves bytes the next run's `resume` cuts off).

    Raises:
        DiskFullError: naming the output, when the chunk or the state does not fit; the partial
            output is cut back to its earlier chunks (a rerun resumes after them)."""
    with open(files.partial, "ab", buffering=0) as fh:  # unbuffered: every write checked
        before = fh.tell()
        try:
            view = memoryview(data)
            while view:
                view = view[fh.write(view) :]
            state = {"fingerprint": fp, "done": done, "partial_bytes": fh.tell()}
            state = json.dumps({**state, "summary": asdict(summary)})
            write_atomic(files.state, state)
        except OSError as err:
            if not is_disk_full(err):
                raise
            free = free_bytes(files.partial)  # as the write failed, before the cut
            fh.truncate(before)
            raise DiskFullError(files.out, len(data), free=free) from err


def publish(files: OutputFiles) -> None:
    """Rank 0: renames the finished partial output into place and removes the state file and a
    private embeddings folder."""
    os.replace(files.partial, files.out)
    files.state.unlink(missing_ok=True)
    if files.private:
        shutil.rmtree(files.embeddings, ignore_errors=True)


__all__ = [
    "STATE_VERSION",
    "OutputFiles",
    "all_sum",
    "append_chunk",
    "barrier",
    "broadcast",
    "file_fingerprint",
    "fingerprint",
    "gather",
    "global_rank",
    "publish",
    "resume",
]
