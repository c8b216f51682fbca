"""Sizes and checksums of written files (manifests), and the fingerprint of a model's weights.

A manifest is a JSON object `{"format": 1, "hash": "xxh3_128", "files": {RELPATH: {"size": N,
"xxh3_128": HEX}}}` listing files of one folder by their path relative to it. It is written with
the files it lists and verified before they are used: a file that is missing, of another size
or whose bytes hash differently is named (`ManifestError`), never used.

The hash is xxHash's XXH3-128 (the `xxhash` package): about 9 GB/s on one core of the 2-core CI
machine, so checking a file costs its read from disk, not the hash (SHA-256: 1.35 GB/s there).
It guards against damage (truncation, flipped bits, a shard of another run), not against an
attacker who can also rewrite the manifest.

`fingerprint(manifest)` is one hash of the files' sizes and checksums: two folders with the same
weight files have the same fingerprint, whatever their paths or modification times. Outputs made
from a model (embeddings, mined negatives, exports) record their model's fingerprint, so a resume
or a reader can refuse a folder made by another model.

Imports nothing of the package.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import xxhash

MANIFEST = "nvembed_manifest.json"
HASH = "xxh3_128"
FORMAT = 1
_CHUNK = 8 << 20


class ManifestError(ValueError):
    """A file disagrees with its manifest (missing, other size, other checksum) or a manifest is
    unreadable; the message names the file."""


def file_checksum(path: str | os.PathLike) -> dict:
    """`{"size": bytes, "xxh3_128": hex}` of one file, read in 8 MiB chunks."""
    h = xxhash.xxh3_128()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, HASH: h.hexdigest()}


def bytes_checksum(data: bytes) -> dict:
    """The same record for bytes about to be written (no second read of the file)."""
    return {"size": len(data), HASH: xxhash.xxh3_128(data).hexdigest()}


def buffers_checksum(buffers: Iterable) -> dict:
    """The same record for several byte buffers written one after the other (e.g. a `.npy`
    header and an array's memory, without joining them into one copy)."""
    h = xxhash.xxh3_128()
    size = 0
    for buf in buffers:
        view = memoryview(buf).cast("B")
        h.update(view)
        size += view.nbytes
    return {"size": size, HASH: h.hexdigest()}


def build_manifest(folder: str | os.PathLike, relpaths: Iterable[str]) -> dict:
    """The manifest of the files `relpaths` (relative to `folder`), hashed now."""
    folder = Path(folder)
    files = {rel: file_checksum(folder / rel) for rel in sorted(relpaths)}
    return {"format": FORMAT, "hash": HASH, "files": files}


def manifest_from(entries: dict[str, dict]) -> dict:
    """A manifest from records already computed (e.g. gathered from the ranks that wrote them)."""
    return {"format": FORMAT, "hash": HASH, "files": {k: entries[k] for k in sorted(entries)}}


def read_manifest(path: str | os.PathLike) -> dict:
    """Reads and checks the shape of a manifest file.

    Raises:
        ManifestError: naming the file, when it is not JSON, not this format, or an entry lacks
            its size or checksum.
    """
    path = Path(path)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ManifestError(f"{path}: cannot read the manifest ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ManifestError(f"{path}: not a manifest of format {FORMAT}")
    if manifest.get("hash") != HASH or not isinstance(manifest.get("files"), dict):
        raise ManifestError(f"{path}: needs 'hash': '{HASH}' and a 'files' object")
    for rel, entry in manifest["files"].items():
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("size"), int)
            or not isinstance(entry.get(HASH), str)
        ):
            raise ManifestError(f"{path}: entry {rel!r} needs an integer 'size' and '{HASH}'")
    return manifest


def check_file(folder: str | os.PathLike, rel: str, entry: dict, *, what: str = "") -> None:
    """Checks one file of a folder against its manifest entry: size first (a stat), then bytes.

    Raises:
        ManifestError: naming the file and what differs.
    """
    path = Path(folder) / rel
    label = f"{what} {path}" if what else str(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ManifestError(
            f"{label}: missing (its manifest lists {entry['size']} bytes)"
        ) from None
    if size != entry["size"]:
        raise ManifestError(f"{label}: {size} bytes, its manifest says {entry['size']}")
    got = file_checksum(path)[HASH]
    if got != entry[HASH]:
        raise ManifestError(
            f"{label}: damaged: its bytes hash to {got}, its manifest says {entry[HASH]}"
        )


def verify_manifest(folder: str | os.PathLike, manifest: dict, *, what: str = "") -> int:
    """Checks every file the manifest lists; returns the bytes read.

    Raises:
        ManifestError: at the first file that differs, naming it.
    """
    total = 0
    for rel, entry in manifest["files"].items():
        check_file(folder, rel, entry, what=what)
        total += entry["size"]
    return total


def fingerprint(manifest: dict, *, only: Iterable[str] | None = None) -> str:
    """A 32-hex-digit hash of the listed files' paths, sizes and checksums (of those in `only`
    when given), independent of where the folder lies and of file times."""
    files = manifest["files"]
    keys = sorted(files if only is None else (k for k in only if k in files))
    blob = json.dumps([[k, files[k]["size"], files[k][HASH]] for k in keys], separators=(",", ":"))
    return xxhash.xxh3_128(blob.encode("utf-8")).hexdigest()
