"""A checkpoint's tokenizer: the files that travel with it (`CKPT/tokenizer/`), written with
their manifest and checked before they are read.

The tokenizer files travel byte for byte from the imported model through checkpoints to exports:
a tokenizer re-saved by a newer transformers is written in a form older readers (NV-Embed's
released code runs under transformers 4.42) cannot parse. `store_tokenizer` copies them into a
checkpoint with a manifest of their sizes and checksums (`checkpoint.manifest`);
`tokenizer_dir` returns the folder once it and every link in it lie inside the checkpoint and
its files are as written (a folder written before tokenizer manifests has none and is read as
it is).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from megatron_nvembed.checkpoint.manifest import verify_folder_manifest, write_manifest
from megatron_nvembed.checkpoint.safety import UnsafeCheckpointError
from megatron_nvembed.utils.checksums import MANIFEST
from megatron_nvembed.utils.fileio import check_links_inside, resolve_inside

TOKENIZER_DIR = "tokenizer"
# The files that define a tokenizer (see the module's docstring).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> int:
    """Copies the tokenizer files of folder `src` into `dst` (created), unchanged.

    Returns:
        The number of files copied (0: `src` holds no tokenizer).
    """
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    n = 0
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            n += 1
    return n


def store_tokenizer(src: str | os.PathLike, dst: str | os.PathLike) -> int:
    """Copies the tokenizer files of `src` into a checkpoint's tokenizer folder `dst` (created)
    with their manifest (sizes and checksums, `checkpoint.manifest.write_manifest`), which
    `tokenizer_dir` verifies before they are read.

    Returns:
        The number of files copied (0: `src` holds no tokenizer; no manifest is written).
    """
    n = copy_tokenizer_files(src, dst)
    if n:
        write_manifest(dst)
    return n


def tokenizer_dir(root: str | os.PathLike) -> Path:
    """The tokenizer folder stored with checkpoint `root`, checked before anything reads it: it
    and every link in it lie inside the checkpoint, and its files match its manifest (a folder
    written before tokenizer manifests has none and is read as it is).

    Raises:
        FileNotFoundError: the checkpoint has no tokenizer folder.
        UnsafeCheckpointError: the folder or a link in it leads out of the checkpoint.
        ManifestError: a file missing, changed or added since it was written (naming it).
    """
    root = Path(root)
    tok = root / TOKENIZER_DIR
    if not tok.is_dir():
        raise FileNotFoundError(f"{tok}: missing (the checkpoint has no tokenizer)")
    resolve_inside(tok, root, error=UnsafeCheckpointError)
    check_links_inside(tok, error=UnsafeCheckpointError, also=(root.resolve(),))
    if (tok / MANIFEST).is_file():
        verify_folder_manifest(tok, what="tokenizer")
    return tok
