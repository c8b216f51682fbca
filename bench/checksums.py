#!/usr/bin/env python3
"""Cost of checkpoint manifests: hashing at save, verifying at load, per GB.

  python bench/checksums.py [--layers 2] [--work-dir /tmp/checksums-bench]
        [--output bench/results/checksums-cpu.json]

A bf16 checkpoint of Mistral-7B's width (`convert.MISTRAL`) with L layers is saved by
`store.save_checkpoint` from a meta model (values from one random buffer, as import-hf streams
them), in this process (TP = PP = 1, one rank). Reported:

- save: wall time of the whole save, and the part spent computing checksums (each shard hashed
  by the writing rank right after it is written, the small files by rank 0 before the rename),
  both per GB of checkpoint;
- load check: `verify_checkpoint_folder` with the manifest (every byte hashed) and without it
  (the structural checks alone, as for a checkpoint saved before manifests); the difference is
  what the manifest costs at every load, per GB;
- raw XXH3-128 throughput of one shard read from the page cache.

Files are read back right after being written, so all reads come from the page cache; a cold
read costs the disk's read speed on top (the hash is not the limit: see `hash_gb_per_s`).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from convert import MISTRAL, _machine, folder_bytes, write_result


def _config(layers: int):
    from megatron_nvembed.testing import tiny_model_config

    cfg = tiny_model_config(pooling="mean", num_layers=layers, vocab_size=MISTRAL["vocab_size"])
    m = cfg.model
    m.hidden_size, m.ffn_hidden_size = MISTRAL["hidden_size"], MISTRAL["intermediate_size"]
    m.num_attention_heads = MISTRAL["num_attention_heads"]
    m.num_query_groups = MISTRAL["num_key_value_heads"]
    return cfg


class _Timed:
    """Wraps `file_checksum` where the save and the check call it; sums its time and bytes."""

    def __init__(self):
        from megatron_nvembed.checkpoint import manifest
        from megatron_nvembed.utils import checksums

        self.owners, self.real = (checksums, manifest), checksums.file_checksum
        self.seconds, self.bytes = 0.0, 0

    def __call__(self, path):
        t0 = time.perf_counter()
        record = self.real(path)
        self.seconds += time.perf_counter() - t0
        self.bytes += record["size"]
        return record

    def __enter__(self):
        for owner in self.owners:
            owner.file_checksum = self
        return self

    def __exit__(self, *exc):
        for owner in self.owners:
            owner.file_checksum = self.real


def bench(layers: int, work: Path) -> dict:
    import torch

    from megatron_nvembed.checkpoint.lazy import meta_model
    from megatron_nvembed.checkpoint.safety import verify_checkpoint_folder
    from megatron_nvembed.checkpoint.store import iteration_dir, save_checkpoint
    from megatron_nvembed.core.parallel import initialize_model_parallel
    from megatron_nvembed.utils.checksums import MANIFEST, file_checksum

    initialize_model_parallel(1, 1)
    cfg = _config(layers)
    model = meta_model(cfg, torch.bfloat16)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    buf = torch.randn(max(s.numel() for s in shapes.values()), generator=torch.Generator())
    buf = buf.mul_(0.02).to(torch.bfloat16)

    def value(name: str):
        return buf[: shapes[name].numel()].view(shapes[name])

    out = work / f"L{layers}"
    shutil.rmtree(out, ignore_errors=True)
    with _Timed() as hashing:
        t0 = time.perf_counter()
        save_checkpoint(model, cfg, out, iteration=0, values=value)
        save_s = time.perf_counter() - t0
    folder = iteration_dir(out, 0)
    gb = folder_bytes(folder) / 1e9
    with _Timed() as checking:
        t0 = time.perf_counter()
        verify_checkpoint_folder(folder)
        verify_s = time.perf_counter() - t0
    manifest = (folder / MANIFEST).read_bytes()
    (folder / MANIFEST).unlink()
    t0 = time.perf_counter()
    verify_checkpoint_folder(folder)  # structural checks only (a checkpoint without manifest)
    legacy_s = time.perf_counter() - t0
    (folder / MANIFEST).write_bytes(manifest)
    shard = max(folder.glob("*.distcp"), key=lambda p: p.stat().st_size)
    t0 = time.perf_counter()
    file_checksum(shard)
    hash_s = time.perf_counter() - t0
    shard_gb = shard.stat().st_size / 1e9
    shutil.rmtree(out)
    row = {
        "checkpoint_gb": round(gb, 3),
        "save_s": round(save_s, 2),
        "save_hash_s": round(hashing.seconds, 2),
        "save_hash_share": round(hashing.seconds / save_s, 3),
        "save_hash_s_per_gb": round(hashing.seconds / gb, 3),
        "load_check_s": round(verify_s, 2),
        "load_check_without_manifest_s": round(legacy_s, 2),
        "manifest_check_s_per_gb": round((verify_s - legacy_s) / gb, 3),
        "load_hash_s": round(checking.seconds, 2),
        "hash_gb_per_s": round(shard_gb / hash_s, 2),
    }
    print(f"  L={layers}: {row}", flush=True)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--layers", type=int, nargs="+", default=[2])
    p.add_argument("--work-dir", default="/tmp/checksums-bench")
    p.add_argument("--output", default=None, help="write the JSON result here")
    args = p.parse_args(argv)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    result = {"machine": _machine(), "shape": MISTRAL, "dtype": "bfloat16", "depths": {}}
    for layers in args.layers:
        result["depths"][layers] = bench(layers, work)
    write_result(result, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
