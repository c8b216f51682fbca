"""Manifests of checkpoint iteration folders and exports: written with the files, checked before
any of them is loaded, and the fingerprint that names a checkpoint in what is made from it.

Every `iter_XXXXXXX` folder holds `nvembed_manifest.json` (`utils.checksums`) listing every file
in it (shards, `.metadata`, `common.pt`, RNG files, JSON files) with its size and XXH3-128
checksum. `checkpoint.store.save_checkpoint` writes it before the folder is renamed into place:
each rank hashes the shard files it wrote right after writing them (still in the page cache),
rank 0 gathers those records, hashes the few small files written afterwards and writes the
manifest atomically. `checkpoint.safety.verify_checkpoint_folder` runs `verify_folder_manifest`
before every load (resume, export-hf, merge-lora, merge_checkpoints, embedding).

A folder without a manifest (saved before manifests existed) is accepted with one warning that
it cannot be verified. A file the manifest does not list is refused when a load would read it
(`.distcp`, `.metadata`, `.pt`, `.json`); other files (notes, editor backups) are ignored.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path, PurePosixPath

from megatron_nvembed.core.logging_utils import get_logger, log_rank0
from megatron_nvembed.utils.checksums import (
    MANIFEST,
    ManifestError,
    build_manifest,
    check_file,
    file_checksum,
    fingerprint,
    manifest_from,
    read_manifest,
)
from megatron_nvembed.utils.fileio import write_atomic

__all__ = [
    "SOURCE_FINGERPRINT",
    "checkpoint_fingerprint",
    "folder_files",
    "verify_folder_manifest",
    "write_manifest",
]

logger = get_logger(__name__)
WHERE_WRITTEN = (".metadata",)
"""Files whose bytes depend on the folder they were saved in: torch's `.metadata` records its
checkpoint folder (a temporary path); it is derived from the model's sharded layout, which the
config and the shards, all fingerprinted, fix."""
SOURCE_FINGERPRINT = "source_fingerprint"
"""Manifest field of an export (`export-hf`): `checkpoint_fingerprint` of the iteration folder
it was made from."""
LOADED_SUFFIXES = (".distcp", ".pt", ".json", ".metadata")
"""Files a load reads (by name ending): unlisted ones are refused. `.metadata` is torch's."""


def folder_files(folder: str | os.PathLike) -> list[str]:
    """Every regular file under `folder` (recursively) but the manifest, as sorted POSIX paths
    relative to it."""
    folder = Path(folder)
    out = []
    for path in folder.rglob("*"):
        if path.is_file():
            rel = path.relative_to(folder).as_posix()
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def write_manifest(
    folder: str | os.PathLike,
    relpaths=None,
    *,
    records: dict[str, dict] | None = None,
    provenance: dict | None = None,
) -> dict:
    """Writes `folder/nvembed_manifest.json` (atomically) and returns the manifest.

    Args:
        relpaths: the files to list (default: every file in the folder, `folder_files`).
        records: checksum records already computed (`utils.checksums.file_checksum` of a file
            just written); the other files are hashed now.
        provenance: extra top-level fields (e.g. `{"source_fingerprint": ...}` of an export).
    """
    folder = Path(folder)
    rels = folder_files(folder) if relpaths is None else sorted(relpaths)
    records = records or {}
    entries = {rel: records.get(rel) or file_checksum(folder / rel) for rel in rels}
    manifest = manifest_from(entries)
    if provenance:
        manifest.update(provenance)
    write_atomic(folder / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest


def _loaded(rel: str) -> bool:
    return rel.endswith(LOADED_SUFFIXES)


def _safe_rel(rel: str) -> bool:
    p = PurePosixPath(rel)
    return bool(rel) and not p.is_absolute() and ".." not in p.parts and "\0" not in rel


def _share(files: dict[str, dict], rank: int, world: int) -> list[str]:
    """This rank's part of the files: largest first, each to the least loaded rank (the same
    split on every rank: it depends on the manifest only)."""
    load = [0] * world
    mine = []
    for rel in sorted(files, key=lambda r: (-files[r]["size"], r)):
        owner = min(range(world), key=lambda i: (load[i], i))
        load[owner] += files[rel]["size"]
        if owner == rank:
            mine.append(rel)
    return mine


def _group():
    """(rank, world) of the default process group, or None outside one / with one rank."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return None


def verify_folder_manifest(
    folder: str | os.PathLike, *, what: str = "", split_among_ranks: bool = False
) -> None:
    """Checks every file `folder/nvembed_manifest.json` lists (present, its size, its checksum)
    and refuses an unlisted file a load would read. A folder without manifest: one warning.

    Args:
        what: a word naming the folder's role in messages (e.g. "--load").
        split_among_ranks: all ranks of the default process group call this together; each
            hashes about 1/world of the bytes and the first failure found is raised on every rank.

    Raises:
        ManifestError: naming the file (`.../iter_0000004/__0_0.distcp: damaged: ...`).
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        log_rank0(
            logger,
            "%s: no %s (saved before manifests were written): its files cannot be verified",
            folder,
            MANIFEST,
            level=logging.WARNING,
        )
        return
    manifest = read_manifest(path)
    files = manifest["files"]
    label = f"{what} " if what else ""
    for rel in files:
        if not _safe_rel(rel):
            raise ManifestError(f"{path}: lists {rel!r}, a path outside {folder}")
    # A listed file may be a link to another file of the folder (checked inside it by
    # `safety`): the file it leads to is read through it, as listed.
    through_links = {(folder / rel).resolve() for rel in files if (folder / rel).is_symlink()}
    for rel in folder_files(folder):
        if rel not in files and _loaded(rel) and (folder / rel).resolve() not in through_links:
            raise ManifestError(
                f"{label}{folder / rel}: not listed in {path}; refusing a checkpoint file "
                "that was added after the save"
            )
    group = _group() if split_among_ranks else None
    mine = list(files) if group is None else _share(files, *group)
    error = None
    try:
        for rel in mine:
            check_file(folder, rel, files[rel], what=what)
    except (ManifestError, OSError) as err:
        error = f"{err}" if isinstance(err, ManifestError) else f"{label}{folder}: {err}"
    if group is not None:
        import torch.distributed as dist

        found: list = [None] * group[1]
        dist.all_gather_object(found, error)
        error = next((e for e in found if e is not None), None)
    if error is not None:
        raise ManifestError(error)


def checkpoint_fingerprint(folder: str | os.PathLike) -> str:
    """The fingerprint (`utils.checksums.fingerprint`) of the files of a checkpoint iteration
    folder (or any model folder): from its manifest, or, for a folder saved without one, from a
    manifest computed in memory (reading every file). Independent of the folder's path and of
    file times; the same files give the same fingerprint with or without a manifest. Files
    that record where they were written (`WHERE_WRITTEN`) are left out, so two saves of the
    same weights and config (an import run twice) have the same fingerprint."""
    folder = Path(folder)
    path = folder / MANIFEST
    if path.is_file():
        manifest = read_manifest(path)
    elif folder.is_dir():
        manifest = build_manifest(folder, folder_files(folder))
    else:
        raise FileNotFoundError(f"{folder}: no such folder")
    return fingerprint(manifest, only=[f for f in manifest["files"] if f not in WHERE_WRITTEN])
