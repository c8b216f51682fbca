"""Checkpoint checksums: damaged shards are named and refused, never used.

Real bytes changed on disk in a real saved training checkpoint (gloo, 1 rank; every scenario in
one process, since importing megatron-core dominates a process's cost): one flipped byte in a
`.distcp` shard, a weight value set to 1e30 inside one, a truncated shard, a shard added after
the save, a shard of another save put in place of the right one. Each damaged copy is offered
to a training resume, `merge_checkpoints` and `export-hf` (the tools' `main`, as the command line
runs them). A checkpoint saved before manifests existed still loads, with one warning.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import runpy
import shutil
import struct
from pathlib import Path

import pytest

from megatron_nvembed.core.launch import run_distributed
from megatron_nvembed.testing import tiny_training_config, write_synthetic_retrieval

pytestmark = pytest.mark.faults
ROOT = Path(__file__).resolve().parents[2]
ITER = "iter_0000002"


def _flip_byte(folder: Path, good: Path) -> None:
    shard = folder / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))


def _value_1e30(folder: Path, good: Path) -> None:
    """The first word embedding's 100th value set to 1e30 in its shard (the item's other bytes,
    its pickle and zip records, unchanged: torch loads it without complaint)."""
    import torch
    from torch.distributed.checkpoint.metadata import MetadataIndex

    from megatron_nvembed.checkpoint.unpickling import read_metadata

    meta = read_metadata(folder / ".metadata")
    info = meta.storage_data[MetadataIndex("embedding.word_embeddings.weight", (0, 0))]
    shard = folder / info.relative_path
    data = bytearray(shard.read_bytes())
    item = bytes(data[info.offset : info.offset + info.length])
    values = torch.load(io.BytesIO(item), weights_only=True).numpy().tobytes()
    at = info.offset + item.index(values) + 4 * 100
    data[at : at + 4] = struct.pack("<f", 1e30)
    shard.write_bytes(bytes(data))


def _truncated_shard(folder: Path, good: Path) -> None:
    shard = folder / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-1000])


def _extra_shard(folder: Path, good: Path) -> None:
    shutil.copyfile(folder / "__0_1.distcp", folder / "__1_0.distcp")


def _swapped_shard(folder: Path, good: Path) -> None:
    """The same shard of the save one iteration earlier (same layout, same size)."""
    shutil.copyfile(good / "iter_0000001" / "__0_0.distcp", folder / "__0_0.distcp")


DAMAGES = [_flip_byte, _value_1e30, _truncated_shard, _extra_shard, _swapped_shard]


def _tool(name: str, argv: list) -> tuple[int, list[str]]:
    """A tool's `main` in this process: (exit code, its `error:` lines)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = runpy.run_path(str(ROOT / "tools" / name))["main"]([str(a) for a in argv])
    return code, [line for line in err.getvalue().splitlines() if line.startswith("error:")]


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _error(call, *args) -> str | None:
    try:
        call(*args)
    except ValueError as err:
        return str(err)
    return None


def _run(rank, world, data, tmp):
    from megatron_nvembed.checkpoint.manifest import (
        SOURCE_FINGERPRINT,
        checkpoint_fingerprint,
        folder_files,
        verify_folder_manifest,
    )
    from megatron_nvembed.checkpoint.safety import verify_checkpoint_folder
    from megatron_nvembed.training.trainer import train
    from megatron_nvembed.utils.checksums import MANIFEST, read_manifest

    tmp, out = Path(tmp), {}
    good = tmp / "good"
    base = {"train_iters": 2, "lr_decay_iters": 6}
    train(tiny_training_config(data, save=str(good), save_interval=1, **base))
    saved = good / ITER
    out["listed"] = sorted(read_manifest(saved / MANIFEST)["files"])
    out["present"] = folder_files(saved)

    for damage in DAMAGES:
        name = damage.__name__.strip("_")
        root = tmp / name
        shutil.copytree(good, root)
        damage(root / ITER, good)
        res = {}
        cfg = tiny_training_config(data, train_iters=3, lr_decay_iters=6, load=str(root))
        res["resume"] = _error(train, cfg)
        res["merge"] = _tool(
            "merge_checkpoints.py", ["--load", root, good, "--save", tmp / f"merged_{name}"]
        )
        res["merge_wrote"] = (tmp / f"merged_{name}").exists()
        res["export"] = _tool(
            "convert_checkpoint.py", ["export-hf", "--load", root, "--hf-dir", tmp / f"hf_{name}"]
        )
        res["export_wrote"] = (tmp / f"hf_{name}").exists()
        # Without its manifest, the same folder passes every other check of a load.
        (root / ITER / MANIFEST).unlink()
        res["without_manifest"] = _error(verify_checkpoint_folder, root / ITER)
        out[name] = res

    # A checkpoint saved before manifests: exported, with one warning; both exports of the
    # same files record the same source fingerprint.
    legacy = tmp / "legacy"
    shutil.copytree(good, legacy)
    (legacy / ITER / MANIFEST).unlink()
    warnings = _Warnings()
    logging.getLogger("megatron_nvembed").addHandler(warnings)
    try:
        out["legacy_export"] = _tool(
            "convert_checkpoint.py", ["export-hf", "--load", legacy, "--hf-dir", tmp / "hf_legacy"]
        )
    finally:
        logging.getLogger("megatron_nvembed").removeHandler(warnings)
    out["legacy_warnings"] = [w for w in warnings.lines if "cannot be verified" in w]
    out["good_export"] = _tool(
        "convert_checkpoint.py", ["export-hf", "--load", good, "--hf-dir", tmp / "hf_good"]
    )
    exports = {}
    for which in ("legacy", "good"):
        hf = tmp / f"hf_{which}"
        manifest = read_manifest(hf / MANIFEST)
        exports[which] = {
            "listed": sorted(manifest["files"]),
            "present": folder_files(hf),
            "source": manifest.get(SOURCE_FINGERPRINT),
            "verifies": _error(verify_folder_manifest, hf),
        }
    out["exports"] = exports
    out["fingerprint"] = checkpoint_fingerprint(saved)
    (tmp / "out.json").write_text(json.dumps(out))


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("checksums")
    data = write_synthetic_retrieval(tmp / "syn", num_topics=8, train_per_topic=12)
    run_distributed(_run, 1, data, str(tmp))
    return json.loads((tmp / "out.json").read_text())


def test_every_file_of_a_saved_checkpoint_is_in_its_manifest(damaged):
    """Fault: a checkpoint file is changed, removed or added on disk after the save.
    Happens: every iteration folder holds nvembed_manifest.json with the size and checksum of every file in it, written before the folder is renamed into place.
    Do: nothing; the manifest is written with every save, merge and import."""
    assert damaged["listed"] == damaged["present"]
    assert {".metadata", "__0_0.distcp", "common.pt", "rng/rank_00000.pt"} <= set(damaged["listed"])


def _refused(result: dict, names: list[str]) -> None:
    assert result["resume"] is not None
    for part in names:
        assert part in result["resume"], (part, result["resume"])
    for tool in ("merge", "export"):
        code, errors = result[tool]
        assert code == 2 and len(errors) == 1, (tool, code, errors)
        for part in names:
            assert part in errors[0], (tool, part, errors[0])
    assert not result["merge_wrote"] and not result["export_wrote"]


def test_a_flipped_byte_in_a_shard_is_named_and_refused(damaged):
    """Fault: one byte of a .distcp shard changed on disk (a bad disk, a copy gone wrong).
    Happens: resume, merge_checkpoints and export-hf refuse the checkpoint with exit 2, naming the shard as damaged; nothing is loaded or written.
    Do: resume from an earlier iteration or copy the checkpoint again from its source."""
    _refused(damaged["flip_byte"], [f"{ITER}/__0_0.distcp: damaged: "])


def test_a_weight_flipped_to_1e30_is_named_and_refused(damaged):
    """Fault: a weight inside a .distcp shard reads 1e30 (a flipped exponent bit), which torch loads without complaint.
    Happens: resume, merge_checkpoints and export-hf refuse the checkpoint with exit 2, naming the shard as damaged, instead of merging or exporting the value.
    Do: resume from an earlier iteration or copy the checkpoint again from its source."""
    result = damaged["value_1e30"]
    _refused(result, [f"{ITER}/__0_0.distcp: damaged: "])
    assert result["without_manifest"] is None  # only the checksum finds it


def test_a_truncated_shard_is_named_and_refused(damaged):
    """Fault: a .distcp shard lost its end (a copy or a save that stopped midway).
    Happens: resume, merge_checkpoints and export-hf refuse the checkpoint with exit 2, naming the shard as truncated.
    Do: resume from an earlier iteration or copy the checkpoint again from its source."""
    _refused(damaged["truncated_shard"], [f"{ITER}/__0_0.distcp", "truncated"])


def test_a_shard_added_after_the_save_is_named_and_refused(damaged):
    """Fault: a .distcp file that the save did not write lies in the iteration folder.
    Happens: resume, merge_checkpoints and export-hf refuse the checkpoint with exit 2, naming the unlisted file.
    Do: remove the file if it is known to be stray, or copy the checkpoint again from its source."""
    result = damaged["extra_shard"]
    _refused(result, [f"{ITER}/__1_0.distcp: not listed in "])
    assert result["without_manifest"] is None


def test_a_shard_of_another_save_is_named_and_refused(damaged):
    """Fault: a .distcp shard was replaced by the same-named shard of another save (same size).
    Happens: resume, merge_checkpoints and export-hf refuse the checkpoint with exit 2, naming the shard as damaged.
    Do: copy the right save's shard back, or copy the checkpoint again from its source."""
    result = damaged["swapped_shard"]
    _refused(result, [f"{ITER}/__0_0.distcp: damaged: "])
    assert result["without_manifest"] is None


def test_a_checkpoint_without_manifest_loads_with_one_warning(damaged):
    """Fault: a checkpoint saved before manifests existed has no nvembed_manifest.json.
    Happens: it is loaded as before, with one warning that its files cannot be verified.
    Do: re-save it (merge_checkpoints of it alone, or one training step) to give it a manifest."""
    assert damaged["legacy_export"] == [0, []]
    assert len(damaged["legacy_warnings"]) == 1, damaged["legacy_warnings"]
    assert ITER in damaged["legacy_warnings"][0]


def test_exports_list_their_files_and_name_their_source_checkpoint(damaged):
    """Fault: an exported model folder is later damaged, or its source checkpoint is unknown.
    Happens: export-hf writes a manifest of its own files with the source checkpoint's fingerprint, the same with or without the source's manifest.
    Do: verify an export with megatron_nvembed.checkpoint.manifest.verify_folder_manifest."""
    assert damaged["good_export"] == [0, []]
    for export in damaged["exports"].values():
        assert export["listed"] == export["present"] and export["verifies"] is None
        assert export["source"] == damaged["fingerprint"]
