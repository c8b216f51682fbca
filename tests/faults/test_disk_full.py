"""Disk full: one line with the path, the bytes needed and free; nothing half-written is left.

Each output goes onto a real small tmpfs mounted for the test (root mounts it; without root the
tests are skipped, and fail under CI=true). The tools print `error: PATH: no space left on
device: N bytes needed, M bytes free` and exit with code 3 (the trainer's code for a failed
checkpoint save); an output whose size is known is refused before anything is computed; the
temporary files are removed and the files written before (earlier outputs, finished shards,
mined chunks) stay intact.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_nvembed.testing.st_folders import (
    build_qwen3_embedding_tokenizer,
    save_tiny_qwen3_embedding,
)
from megatron_nvembed.utils.locking import LOCK_SUFFIX

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.faults
FULL = re.compile(r"^error: (?P<path>\S+): no space left on device: (?P<needed>\d+) bytes needed, "
                  r"(?P<free>\d+) bytes free$")  # fmt: skip


@pytest.fixture
def tmpfs(tmp_path):
    """`mount(kib)`: a new tmpfs of that size under `tmp_path`; unmounted at teardown."""
    mounted: list[Path] = []

    def mount(kib: int) -> Path:
        folder = tmp_path / f"tmpfs{len(mounted)}"
        folder.mkdir()
        cmd = ["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(folder)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            why = f"cannot mount a tmpfs ({proc.stderr.strip()})"
            if os.environ.get("CI") == "true":
                pytest.fail(why)
            pytest.skip(why)
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=True)


@pytest.fixture(scope="module")
def st_model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("st")
    build_qwen3_embedding_tokenizer(["how do plants make food", "the sky is blue"], tmp / "tok")
    return save_tiny_qwen3_embedding(tmp / "model", tmp / "tok")


def _texts(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"text": f"text number {i} about plants"}) + "\n"
                            for i in range(n)))  # fmt: skip
    return path


def _error_line(err: str) -> re.Match:
    # (a progress bar may end its line without a newline before it)
    lines = [line[line.index("error: ") :] for line in err.splitlines() if "error: " in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    match = FULL.match(lines[0])
    assert match, lines[0]
    return match


def _temporaries(folder: Path) -> list[Path]:
    """Temporary files and folders left in `folder` (the outputs' lock files, released and
    empty, are kept by design: utils/locking.py)."""
    return [
        p
        for p in folder.rglob("*")
        if (p.name.endswith(".tmp") or ".nvembed-" in p.name) and not _is_lock(p)
    ]


def _is_lock(p: Path) -> bool:
    return p.name.endswith(LOCK_SUFFIX) and p.stat().st_size == 0  # released


def _names(folder: Path) -> list[str]:
    """The entries of `folder` but the released lock files."""
    return sorted(p.name for p in folder.iterdir() if not _is_lock(p))


def test_embed_output_on_a_full_disk_is_refused_before_computing(st_model, tmpfs, tmp_path):
    """Fault: tools/embed.py --output names a file on a disk without room for the embeddings.
    Happens: before any text is embedded, one `error:` line names the file, the bytes it needs and the bytes free; exit code 3 (not a SIGBUS); no temporary file or shard folder is left and earlier files in that folder are intact.
    Do: free space or choose another --output, then rerun."""
    disk = tmpfs(16)
    earlier = disk / "earlier.npy"
    np.save(earlier, np.arange(8, dtype=np.float32))
    before = earlier.read_bytes()
    out = disk / "emb.npy"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "embed.py"), "--load", str(st_model),
         "--input", str(_texts(tmp_path / "in.jsonl", 40)), "--output", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr[-3000:]
    match = _error_line(proc.stderr)
    assert match["path"] == str(out)
    assert int(match["needed"]) > int(match["free"]) > 0
    assert "embedded" not in proc.stdout  # refused before the texts were embedded
    assert _names(disk) == ["earlier.npy"]
    assert earlier.read_bytes() == before


_WRITE_ARRAY = """
import sys
from megatron_nvembed.retrieval.shards import ShardedEmbeddings, write_single_array
from megatron_nvembed.utils.diskspace import DiskFullError
try:
    write_single_array(ShardedEmbeddings(sys.argv[1]), sys.argv[2])
except DiskFullError as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(3)
"""


def test_single_array_write_on_a_full_disk_fails_cleanly(tmpfs, tmp_path):
    """Fault: the disk fills while tools/embed.py --output joins finished shards into one array (another writer took the space after the tool's check).
    Happens: the array's bytes are reserved before the first is written, so the write fails at once with the one line (path, bytes needed, bytes free) instead of a SIGBUS (exit 135) of a memory-mapped write; the temporary file is removed and the shards stay for the rerun.
    Do: free space and rerun the same command: it finds the shards finished and only writes the array."""
    from megatron_nvembed.retrieval.shard_files import write_shard
    from megatron_nvembed.retrieval.shards import META, single_array_size
    from megatron_nvembed.utils.fileio import write_atomic

    shards = tmp_path / "shards"
    shards.mkdir()
    rng = np.random.default_rng(0)
    meta = {"rows": 300, "dim": 32, "shard_size": 100, "has_ids": False}
    write_atomic(shards / META, json.dumps(meta))
    for s in range(3):  # each with its record, as encode_corpus writes them
        write_shard(shards, s, rng.random((100, 32), dtype=np.float32), None, meta)
    disk = tmpfs(24)  # room for less than the 38 KB array
    out = disk / "emb.npy"
    proc = subprocess.run([sys.executable, "-c", _WRITE_ARRAY, str(shards), str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 3, (proc.returncode, proc.stderr[-3000:])
    match = _error_line(proc.stderr)
    assert match["path"] == str(out) and int(match["needed"]) == single_array_size(300, 32)
    assert _names(disk) == []
    assert len(list(shards.glob("emb_*.npy"))) == 3


def test_embed_output_dir_filling_up_keeps_finished_shards(st_model, tmpfs, tmp_path, capsys):
    """Fault: the disk under tools/embed.py --output-dir fills while shards are written (many small files take more room than their bytes).
    Happens: one `error:` line names the shard file, the bytes it needs and the bytes free (not numpy's "N requested and M written"); exit code 3; the shards written before stay whole, no temporary file is left.
    Do: free space and rerun the same command: only the missing shards are computed."""
    import tools.embed as embed_tool

    disk = tmpfs(20)  # 5 pages: meta.json and a few one-page shards
    out = disk / "shards"
    argv = ["--load", str(st_model), "--input", str(_texts(tmp_path / "in.jsonl", 12)),
            "--output-dir", str(out), "--shard-size", "1"]  # fmt: skip
    assert embed_tool.main(argv) == 3
    match = _error_line(capsys.readouterr().err)
    # a shard is finished when its record (emb_N.json, written last) is there
    done = sorted(p.with_suffix(".npy") for p in out.glob("emb_*.json"))
    assert done and len(done) < 12
    n = len(done)  # the next shard's embeddings or its record did not fit
    assert match["path"] in (str(out / f"emb_{n:05d}.npy"), str(out / f"emb_{n:05d}.json"))
    assert int(match["needed"]) > int(match["free"])
    assert _temporaries(disk) == []
    first = {p: (p.stat().st_mtime_ns, np.load(p).shape) for p in done}
    assert all(shape == (1, first[done[0]][1][1]) for _, shape in first.values())

    subprocess.run(["mount", "-o", "remount,size=256k", str(disk)], check=True)  # space freed
    assert embed_tool.main(argv) == 0
    assert len(list(out.glob("emb_*.npy"))) == 12
    assert {p: (p.stat().st_mtime_ns, np.load(p).shape) for p in done} == first


def test_mining_output_on_a_full_disk_keeps_the_mined_chunks(st_model, tmpfs, tmp_path, capsys):
    """Fault: the disk under tools/mine_hard_negatives.py --output fills while mined records are appended.
    Happens: one `error:` line names the output, the bytes of the chunk that did not fit and the bytes free; exit code 3; the partial output is cut back to the chunks recorded as done (a rerun resumes after them) and an earlier file beside it is intact.
    Do: free space and rerun the same command."""
    import tools.mine_hard_negatives as mine_tool

    (tmp_path / "corpus.jsonl").write_text(
        "".join(json.dumps({"text": f"document {i} on plants"}) + "\n" for i in range(8))
    )
    long = " ".join(["light"] * 150)
    records = [{"query": f"question {i}", "pos": [f"answer {i} {long}"], "neg": []} for i in range(40)]  # fmt: skip
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    disk = tmpfs(24)
    earlier = disk / "earlier.jsonl"
    earlier.write_text('{"kept": true}\n')
    out = disk / "mined.jsonl"
    argv = ["--input", str(tmp_path / "q.jsonl"), "--corpus", str(tmp_path / "corpus.jsonl"),
            "--model", str(st_model), "--output", str(out), "--no-instruction",
            "--num-negatives", "2", "--candidates", "4", "--chunk-size", "2",
            "--corpus-embeddings", str(tmp_path / "emb")]  # fmt: skip
    assert mine_tool.main(argv) == 3
    match = _error_line(capsys.readouterr().err)
    assert match["path"] == str(out) and int(match["needed"]) > int(match["free"])
    assert not out.exists() and earlier.read_text() == '{"kept": true}\n'
    state = json.loads((disk / "mined.jsonl.state.json").read_text())
    partial = disk / "mined.jsonl.partial"
    assert partial.stat().st_size == state["partial_bytes"] > 0
    assert len(partial.read_text().splitlines()) == state["done"]
    assert _temporaries(disk) == []


def test_import_hf_onto_a_full_disk_is_refused_before_converting(tmpfs, tmp_path, capsys):
    """Fault: tools/convert_checkpoint.py import-hf writes the checkpoint onto a disk without room for its weights.
    Happens: before any worker starts, one `error:` line names the output folder, the bytes its weights need and the bytes free; exit code 3; nothing is created beside the earlier files.
    Do: free space or choose another --save, then rerun."""
    import tools.convert_checkpoint as convert_tool
    from megatron_nvembed.conversion.hf_weights import LazyHFState
    from megatron_nvembed.testing import build_word_tokenizer, save_tiny_hf_decoder

    hf = tmp_path / "hf"
    save_tiny_hf_decoder(hf, build_word_tokenizer(["plants make food", "the sky is blue"]))
    disk = tmpfs(64)
    (disk / "earlier.txt").write_text("kept")
    out = disk / "ckpt"
    assert convert_tool.main(["import-hf", "--hf-dir", str(hf), "--save", str(out)]) == 3
    match = _error_line(capsys.readouterr().err)
    weights = LazyHFState(hf)
    assert match["path"] == str(out)
    assert int(match["needed"]) == sum(t.numel() * t.element_size() for t in weights.values())
    assert _names(disk) == ["earlier.txt"]
    assert (disk / "earlier.txt").read_text() == "kept"


def test_folder_output_filling_up_is_removed_whole(tmpfs):
    """Fault: the disk fills while an export, import or merge writes its output folder (the space went to another writer after the check).
    Happens: the write fails with the one line naming the output folder, the bytes it needed and the bytes free; the temporary folder beside it is removed and an earlier output folder of that name stays as it was.
    Do: free space and rerun with --overwrite."""
    import torch

    from megatron_nvembed.conversion.hf_weights import write_safetensors_shards
    from megatron_nvembed.utils.diskspace import DiskFullError
    from megatron_nvembed.utils.fileio import atomic_dir

    disk = tmpfs(64)
    final = disk / "export"
    final.mkdir()
    (final / "model.safetensors").write_bytes(b"earlier export")
    state = {f"w{i}": torch.full((64, 64), float(i)) for i in range(8)}  # 8 x 16 KiB
    size = sum(t.numel() * t.element_size() for t in state.values())
    with pytest.raises(DiskFullError) as err:
        with atomic_dir(final, overwrite=True, flag="--hf-dir", size=size) as tmp:
            write_safetensors_shards(state, tmp, max_bytes=40_000)
    match = FULL.match(f"error: {err.value}")
    assert match and match["path"] == str(final) and int(match["needed"]) == size, err.value
    assert _names(disk) == ["export"]
    assert (final / "model.safetensors").read_bytes() == b"earlier export"
