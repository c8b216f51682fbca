"""Manifests of sizes and checksums (utils/checksums.py) and of checkpoint folders
(checkpoint/manifest.py): damage is found and named, fingerprints name the bytes only."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest

from megatron_nvembed.checkpoint.manifest import (
    _share,
    checkpoint_fingerprint,
    folder_files,
    verify_folder_manifest,
    write_manifest,
)
from megatron_nvembed.utils.checksums import (
    MANIFEST,
    ManifestError,
    build_manifest,
    bytes_checksum,
    file_checksum,
    fingerprint,
    read_manifest,
    verify_manifest,
)


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "iter_0000004"
    (d / "rng").mkdir(parents=True)
    (d / "__0_0.distcp").write_bytes(bytes(range(256)) * 64)
    (d / ".metadata").write_bytes(b"metadata" * 10)
    (d / "rng" / "rank_00000.pt").write_bytes(b"rng state")
    (d / "nvembed_config.json").write_text('{"model": {}}')
    return d


def _flip(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_verify_detects_a_one_byte_flip_naming_the_file(folder):
    manifest = build_manifest(folder, folder_files(folder))
    assert verify_manifest(folder, manifest) == sum(e["size"] for e in manifest["files"].values())
    _flip(folder / "__0_0.distcp", 5000)
    with pytest.raises(ManifestError, match=r"iter_0000004/__0_0\.distcp: damaged: "):
        verify_manifest(folder, manifest)


def test_verify_detects_a_size_change_and_a_missing_file(folder):
    manifest = build_manifest(folder, folder_files(folder))
    shard = folder / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes() + b"\0")
    with pytest.raises(ManifestError, match=r"__0_0\.distcp: 16385 bytes, its manifest says 16384"):
        verify_manifest(folder, manifest)
    shard.unlink()
    with pytest.raises(ManifestError, match=r"__0_0\.distcp: missing"):
        verify_manifest(folder, manifest)


def test_bytes_checksum_equals_the_checksum_of_the_written_file(folder):
    shard = folder / "__0_0.distcp"
    assert bytes_checksum(shard.read_bytes()) == file_checksum(shard)


def test_fingerprint_is_independent_of_folder_path_and_mtime(folder, tmp_path):
    first = fingerprint(build_manifest(folder, folder_files(folder)))
    elsewhere = tmp_path / "copied" / "elsewhere"
    shutil.copytree(folder, elsewhere)
    for p in elsewhere.rglob("*"):
        os.utime(p, (1_000_000, 1_000_000))
    assert fingerprint(build_manifest(elsewhere, folder_files(elsewhere))) == first
    _flip(elsewhere / "rng" / "rank_00000.pt", 0)
    assert fingerprint(build_manifest(elsewhere, folder_files(elsewhere))) != first


@pytest.mark.parametrize(
    "text, says",
    [
        ("{not json", "cannot read the manifest"),
        ('{"format": 2, "hash": "xxh3_128", "files": {}}', "not a manifest of format 1"),
        ('{"format": 1, "hash": "sha256", "files": {}}', "needs 'hash': 'xxh3_128'"),
        ('{"format": 1, "hash": "xxh3_128", "files": {"a": {"size": "1"}}}', "entry 'a' needs"),
    ],
)
def test_read_manifest_rejects_malformed_manifests_naming_the_file(tmp_path, text, says):
    path = tmp_path / MANIFEST
    path.write_text(text)
    with pytest.raises(ManifestError, match=says) as err:
        read_manifest(path)
    assert str(err.value).startswith(str(path))


def test_written_manifest_lists_every_file_and_verifies(folder):
    manifest = write_manifest(folder)
    assert sorted(manifest["files"]) == [
        ".metadata",
        "__0_0.distcp",
        "nvembed_config.json",
        "rng/rank_00000.pt",
    ]
    assert read_manifest(folder / MANIFEST) == manifest
    verify_folder_manifest(folder)  # unchanged: passes
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_records_given_are_used_and_the_rest_hashed(folder):
    fake = {"size": 16384, "xxh3_128": "0" * 32}  # a record the writer computed (wrong here)
    manifest = write_manifest(folder, records={"__0_0.distcp": fake})
    assert manifest["files"]["__0_0.distcp"] == fake
    assert manifest["files"][".metadata"] == file_checksum(folder / ".metadata")
    with pytest.raises(ManifestError, match="__0_0.distcp: damaged"):
        verify_folder_manifest(folder)


@pytest.mark.parametrize("name", ["__1_0.distcp", "rng/rank_00001.pt", "lora.json"])
def test_an_unlisted_file_a_load_reads_is_refused(folder, name):
    write_manifest(folder)
    (folder / name).write_bytes(b"added after the save")
    with pytest.raises(ManifestError, match=f"{name}: not listed in .*{MANIFEST}"):
        verify_folder_manifest(folder)


def test_an_unlisted_file_no_load_reads_is_ignored(folder):
    write_manifest(folder)
    (folder / "notes.txt").write_text("mine")
    verify_folder_manifest(folder)


def test_a_listed_path_outside_the_folder_is_refused(folder):
    write_manifest(folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"]["../elsewhere.distcp"] = {"size": 1, "xxh3_128": "0" * 32}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="a path outside"):
        verify_folder_manifest(folder)


def test_a_folder_without_manifest_is_accepted_with_one_warning(folder, caplog):
    with caplog.at_level(logging.WARNING, logger="megatron_nvembed"):
        verify_folder_manifest(folder)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "cannot be verified" in warnings[0]
    assert str(folder) in warnings[0]


def test_checkpoint_fingerprint_is_the_same_with_or_without_manifest(folder, tmp_path):
    legacy = checkpoint_fingerprint(folder)
    write_manifest(folder, provenance={"source_fingerprint": "f" * 32})
    assert checkpoint_fingerprint(folder) == legacy
    with pytest.raises(FileNotFoundError):
        checkpoint_fingerprint(tmp_path / "absent")


def test_checkpoint_fingerprint_ignores_where_metadata_was_written_not_the_shards(folder):
    before = checkpoint_fingerprint(folder)
    (folder / ".metadata").write_bytes(b"metadata saved in /another/tmp/folder")
    assert checkpoint_fingerprint(folder) == before
    _flip(folder / "__0_0.distcp", 0)
    assert checkpoint_fingerprint(folder) != before


def test_ranks_share_the_files_disjointly_and_by_size():
    files = {f"f{i}": {"size": s} for i, s in enumerate([90, 10, 50, 50, 40, 5, 5])}
    parts = [_share(files, rank, 3) for rank in range(3)]
    assert sorted(sum(parts, [])) == sorted(files)
    loads = [sum(files[r]["size"] for r in part) for part in parts]
    assert max(loads) == 90 and min(loads) >= 70  # largest first, to the least loaded rank


def _verify_on_rank(rank, world, folder, out):
    from megatron_nvembed.checkpoint import manifest

    checked = []
    real = manifest.check_file

    def recording(folder, rel, entry, **kw):
        checked.append(rel)
        return real(folder, rel, entry, **kw)

    manifest.check_file = recording
    try:
        verify_folder_manifest(folder, split_among_ranks=True)
        error = None
    except ManifestError as err:
        error = str(err)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"checked": checked, "error": error}, f)


def test_ranks_split_the_reads_and_all_refuse_a_damage_one_of_them_found(folder, tmp_path):
    from megatron_nvembed.core.launch import run_distributed

    write_manifest(folder)
    _flip(folder / "rng" / "rank_00000.pt", 3)  # a small file: not rank 0's (largest first)
    out = tmp_path / "out"
    out.mkdir()
    run_distributed(_verify_on_rank, 2, str(folder), str(out))
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    checked = [r["checked"] for r in ranks]
    assert not set(checked[0]) & set(checked[1])
    assert sorted(checked[0] + checked[1]) == folder_files(folder)
    assert "rng/rank_00000.pt" not in checked[0]
    for r in ranks:
        assert r["error"] is not None and "rng/rank_00000.pt: damaged: " in r["error"]
