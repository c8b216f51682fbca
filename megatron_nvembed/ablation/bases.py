"""Base checkpoints of the grid: a *mask variant* is a checkpoint with another attention mask and
the same weights (the weights do not depend on the mask), so `import-hf` runs once per pooling.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from megatron_nvembed.ablation.grid import MASKS
from megatron_nvembed.checkpoint.manifest import write_manifest
from megatron_nvembed.checkpoint.store import CONFIG_FILE, TRACKER, is_checkpoint_dir
from megatron_nvembed.utils.checksums import MANIFEST, read_manifest


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed: a copy serves as well
        shutil.copy2(src, dst)


def derive_mask_variant(src: str | os.PathLike, dst: str | os.PathLike, mask: str) -> None:
    """Writes checkpoint `dst`: checkpoint `src` with attention mask `mask`.

    The files are hard-linked where possible, else copied; every iteration's model config says
    `mask_type: mask`, exactly what `import-hf --mask-type` would have written. Atomic: written
    to a temporary sibling, then renamed into place (an existing `dst` is replaced).

    Args:
        src: a megatron_nvembed checkpoint folder; left untouched.
        dst: the folder to write.
        mask: one of MASKS.

    Raises:
        ValueError: `mask` is not one of MASKS.
        FileNotFoundError: `src` is not a checkpoint (no tracker file).
    """
    if mask not in MASKS:
        raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")
    src, dst = Path(src), Path(dst)
    if not is_checkpoint_dir(src):
        raise FileNotFoundError(f"{src}: not a megatron_nvembed checkpoint (no {TRACKER})")
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, copy_function=_link_or_copy)
    for cfg_path in tmp.glob(f"*/{CONFIG_FILE}"):  # every iteration folder
        cfg = json.loads(cfg_path.read_text())
        cfg["model"]["mask_type"] = mask
        cfg_path.unlink()  # a hard link: never write through it into `src`
        cfg_path.write_text(json.dumps(cfg, indent=2))
        _relist(cfg_path)
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)


def _relist(cfg_path: Path) -> None:
    """The edited config's new size and checksum in its iteration folder's manifest (the other
    files keep their records: nothing else is read). The manifest is replaced, not written
    through its hard link into the source checkpoint."""
    folder = cfg_path.parent
    if not (folder / MANIFEST).is_file():
        return  # a checkpoint saved before manifests: nothing to update
    records = read_manifest(folder / MANIFEST)["files"]
    records.pop(CONFIG_FILE, None)
    write_manifest(folder, [*records, CONFIG_FILE], records=records)
