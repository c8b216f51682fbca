"""Loading a checkpoint runs no code from crafted files (megatron_nvembed.checkpoint.safety).

A small torch distributed checkpoint folder is written with `torch.distributed.checkpoint.save`
(one process, no process group: tensors, plus non-tensor values that become "bytes" items like
megatron-core's `_extra_state` shards), completed with the `metadata.json` / `common.pt`
megatron-core writes next to it. Each kind of file a load unpickles is then replaced by a
crafted one whose payload would create a marker file: the verifier refuses it with
UnsafeCheckpointError naming the file, and the marker never appears. Control tests show the
same files do run their payload through torch's own loaders. Missing / truncated / garbled
files raise CorruptCheckpointError naming the file. One test saves a real megatron-core
torch_dist checkpoint in a child process (8-10 s, mostly importing megatron-core).

Run alone: python3 -m pytest -q tests/unit/test_checkpoint_safety.py -p no:cacheprovider
"""

from __future__ import annotations

import builtins
import io
import json
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from megatron_nvembed.checkpoint.safety import (
    CorruptCheckpointError,
    UnsafeCheckpointError,
    load_rng_file,
    verify_checkpoint_folder,
)

ROOT = Path(__file__).resolve().parents[2]
# torch warns when a crafted file uses pickle protocol 4 (the weights-only loader refuses it)
pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol")
EXTRA = "layer._extra_state/shard_0_1"  # a bytes item, named like megatron-core's


class _Payload:
    """Pickles to a call that creates `marker` when unpickled."""

    def __init__(self, marker: Path, how: str = "exec") -> None:
        self.marker, self.how = str(marker), how

    def __reduce__(self):
        if self.how == "exec":
            return (builtins.exec, (f"open({self.marker!r}, 'w').close()",))
        if self.how == "system":
            return (os.system, (f"touch '{self.marker}'",))
        if self.how == "torch_save":  # a torch function, but not one a checkpoint names
            return (torch.save, ([1], self.marker))
        return (subprocess.check_call, (["touch", self.marker],))


def _state():
    g = torch.Generator().manual_seed(0)
    return {
        "embedding.weight": torch.randn(8, 4, generator=g),
        "norm.weight": torch.ones(4, dtype=torch.bfloat16),
        EXTRA: [None],
        "optimizer": {"step": 3},
    }


def _save_dcp(folder: Path, state: dict) -> Path:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... single process"
        dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    (folder / "metadata.json").write_text(
        json.dumps(
            {
                "sharded_backend": "torch_dist",
                "sharded_backend_version": 1,
                "common_backend": "torch",
                "common_backend_version": 1,
            }
        )
    )
    torch.save(
        {"optimizer": {"param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999)}]}}, folder / "common.pt"
    )
    return folder


@pytest.fixture
def folder(tmp_path):
    return _save_dcp(tmp_path / "iter_0000004", _state())


@pytest.fixture
def marker(tmp_path):
    return tmp_path / "PWNED"


def _metadata(folder: Path):
    return pickle.loads((folder / ".metadata").read_bytes())  # our own clean test file


def _write_metadata(folder: Path, meta) -> None:
    (folder / ".metadata").write_bytes(pickle.dumps(meta))


def _storage(folder: Path, fqn: str):
    from torch.distributed.checkpoint.metadata import MetadataIndex

    meta = _metadata(folder)
    return meta, meta.storage_data[MetadataIndex(fqn)]


def _plant_bytes_item(folder: Path, fqn: str, raw: bytes) -> Path:
    """Appends `raw` to the item's shard file and points the item's record at it."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import MetadataIndex

    meta, info = _storage(folder, fqn)
    shard = folder / info.relative_path
    offset = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(raw)
    meta.storage_data[MetadataIndex(fqn)] = _StorageInfo(info.relative_path, offset, len(raw))
    _write_metadata(folder, meta)
    return shard


def _torch_save_bytes(obj, **kwargs) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, **kwargs)
    return buf.getvalue()


def _crafted(marker: Path, kind: str) -> bytes:
    """A file whose payload runs when read with `torch.load(weights_only=False)`."""
    payload = [_Payload(marker)]
    if kind == "torch_save":  # zip format, protocol 2: the weights-only loader names the global
        return _torch_save_bytes(payload)
    if kind == "torch_save_protocol4":  # FRAME / STACK_GLOBAL: the weights-only loader stops early
        return _torch_save_bytes(payload, pickle_protocol=4)
    if kind == "legacy":
        return _torch_save_bytes(payload, _use_new_zipfile_serialization=False)
    return pickle.dumps(payload, protocol=4)  # a bare pickle


def _rng_state() -> dict:
    return {
        "cpu": torch.get_rng_state(),
        "cuda": None,
        "tracker": {"model-parallel-rng": torch.get_rng_state()},
    }


# ----------------------------------------------------------------------------- clean input


def test_clean_folder_passes(folder):
    meta = _metadata(folder)
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    assert isinstance(meta.state_dict_metadata[EXTRA], BytesStorageMetadata)
    assert verify_checkpoint_folder(folder) is None
    assert verify_checkpoint_folder(str(folder)) is None


def test_protocol_2_and_legacy_megatron_core_metadata_pass(folder):
    # megatron-core 0.15 checkpoints name its (now empty) MCoreMetadata class
    data = pickle.dumps(_metadata(folder), protocol=2)  # GLOBAL opcodes: module and name as text
    (folder / ".metadata").write_bytes(data)
    verify_checkpoint_folder(folder)
    old = b"torch.distributed.checkpoint.metadata\nMetadata\n"
    assert data.count(old) == 1
    new = b"megatron.core.dist_checkpointing.strategies.torch\nMCoreMetadata\n"
    (folder / ".metadata").write_bytes(data.replace(old, new))
    verify_checkpoint_folder(folder)


def test_bytes_item_holding_bytesio_passes_where_megatron_core_allows_it(tmp_path):
    # Transformer Engine's older extra states are io.BytesIO; megatron-core registers BytesIO
    # with torch.serialization.add_safe_globals when imported (as in every training process).
    folder = _save_dcp(tmp_path / "ckpt", {**_state(), EXTRA: [io.BytesIO(b"fp8 meta")]})
    with torch.serialization.safe_globals([io.BytesIO]):
        verify_checkpoint_folder(folder)


def test_rng_file_round_trip(tmp_path):
    state = _rng_state()
    torch.save(state, tmp_path / "rank_00000.pt")
    loaded = load_rng_file(tmp_path / "rank_00000.pt")
    assert torch.equal(loaded["cpu"], state["cpu"]) and loaded["cuda"] is None
    assert torch.equal(
        loaded["tracker"]["model-parallel-rng"], state["tracker"]["model-parallel-rng"]
    )


# ----------------------------------------------------------------------------- crafted input


@pytest.mark.parametrize(
    "how, global_name",
    [
        ("exec", "builtins.exec"),
        ("system", ".system"),
        ("check_call", "subprocess.check_call"),
        ("torch_save", "torch.serialization.save"),
    ],
)
def test_crafted_metadata_is_refused(folder, marker, how, global_name):
    meta = _metadata(folder)
    meta.storage_meta.save_id = _Payload(marker, how)  # deep inside a genuine Metadata
    _write_metadata(folder, meta)
    with pytest.raises(UnsafeCheckpointError) as err:
        verify_checkpoint_folder(folder)
    msg = str(err.value)
    assert str(folder / ".metadata") in msg and global_name in msg
    assert "which a checkpoint never holds" in msg
    assert not marker.exists()


def test_metadata_that_is_only_a_payload_is_refused(folder, marker):
    (folder / ".metadata").write_bytes(pickle.dumps(_Payload(marker), protocol=0))
    with pytest.raises(UnsafeCheckpointError, match=r"\.metadata: refers to builtins\.exec"):
        verify_checkpoint_folder(folder)  # protocol 0 writes Python 2's __builtin__
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["torch_save", "torch_save_protocol4", "legacy", "pickle"])
def test_crafted_bytes_item_is_refused(folder, marker, kind):
    shard = _plant_bytes_item(folder, EXTRA, _crafted(marker, kind))
    with pytest.raises(UnsafeCheckpointError) as err:
        verify_checkpoint_folder(folder)
    msg = str(err.value)
    assert str(shard) in msg and repr(EXTRA) in msg and "builtins.exec" in msg
    assert not marker.exists()


def test_crafted_bytes_item_over_the_original_range_is_refused(folder, marker):
    # Only the shard changes: a bare pickle (full pickle stops at its STOP) padded to the length.
    _, info = _storage(folder, EXTRA)
    shard = folder / info.relative_path
    raw = _crafted(marker, "pickle")
    assert len(raw) < info.length
    data = bytearray(shard.read_bytes())
    data[info.offset : info.offset + info.length] = raw + b"\0" * (info.length - len(raw))
    shard.write_bytes(bytes(data))
    with pytest.raises(UnsafeCheckpointError, match=r"refers to builtins\.exec") as err:
        verify_checkpoint_folder(folder)
    assert str(shard) in str(err.value) and repr(EXTRA) in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["torch_save", "torch_save_protocol4", "pickle"])
def test_crafted_common_pt_is_refused(folder, marker, kind):
    (folder / "common.pt").write_bytes(_crafted(marker, kind))
    with pytest.raises(UnsafeCheckpointError) as err:
        verify_checkpoint_folder(folder)
    assert str(folder / "common.pt") in str(err.value) and "builtins.exec" in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["torch_save", "pickle"])
def test_crafted_rng_file_is_refused(tmp_path, marker, kind):
    path = tmp_path / "rank_00000.pt"
    if kind == "torch_save":
        path.write_bytes(_torch_save_bytes({**_rng_state(), "tracker": _Payload(marker)}))
    else:
        path.write_bytes(_crafted(marker, kind))
    with pytest.raises(UnsafeCheckpointError) as err:
        load_rng_file(path)
    assert str(path) in str(err.value) and "builtins.exec" in str(err.value)
    assert not marker.exists()


def test_shard_file_outside_the_folder_is_refused(folder, tmp_path):
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import MetadataIndex

    (tmp_path / "elsewhere.distcp").write_bytes(_torch_save_bytes([None]))
    meta = _metadata(folder)
    meta.storage_data[MetadataIndex(EXTRA)] = _StorageInfo("../elsewhere.distcp", 0, 10)
    _write_metadata(folder, meta)
    with pytest.raises(UnsafeCheckpointError, match="outside the checkpoint folder"):
        verify_checkpoint_folder(folder)


# The crafted files are live: torch's own loaders run their payloads (what the check prevents).


def test_control_crafted_files_run_code_through_torchs_loaders(folder, tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    bytes_marker = tmp_path / "from_bytes_item"
    _plant_bytes_item(folder, EXTRA, _crafted(bytes_marker, "torch_save"))
    request = {
        "embedding.weight": torch.zeros(8, 4),
        "norm.weight": torch.zeros(4, dtype=torch.bfloat16),
        EXTRA: None,
        "optimizer": {"step": 0},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(request, checkpoint_id=str(folder), no_dist=True)
    assert bytes_marker.exists()

    meta_marker = tmp_path / "from_metadata"
    (folder / ".metadata").write_bytes(pickle.dumps(_Payload(meta_marker)))
    with pytest.raises(AttributeError):  # the payload ran, then torch finds no Metadata
        FileSystemReader(str(folder)).read_metadata()
    assert meta_marker.exists()

    rng_marker = tmp_path / "from_rng"
    (tmp_path / "rank.pt").write_bytes(_crafted(rng_marker, "torch_save"))
    torch.load(tmp_path / "rank.pt", weights_only=False)  # how RNG files were read
    assert rng_marker.exists()


# ----------------------------------------------------------------------------- damaged input


def test_missing_metadata(folder):
    (folder / ".metadata").unlink()
    with pytest.raises(CorruptCheckpointError, match=r"\.metadata: missing"):
        verify_checkpoint_folder(folder)


@pytest.mark.parametrize("damage", ["truncated", "garbled", "empty"])
def test_damaged_metadata(folder, damage):
    path = folder / ".metadata"
    data = path.read_bytes()
    path.write_bytes(
        {"truncated": data[: len(data) // 2], "garbled": data[:40] + b"\xff" * 60, "empty": b""}[
            damage
        ]
    )
    with pytest.raises(CorruptCheckpointError) as err:
        verify_checkpoint_folder(folder)
    assert str(path) in str(err.value)


def test_truncated_shard_file(folder):
    meta = _metadata(folder)
    rel = next(iter(meta.storage_data.values())).relative_path
    need = max(i.offset + i.length for i in meta.storage_data.values() if i.relative_path == rel)
    shard = folder / rel
    shard.write_bytes(shard.read_bytes()[: need - 100])
    with pytest.raises(CorruptCheckpointError) as err:
        verify_checkpoint_folder(folder)
    assert str(err.value) == f"{shard}: truncated: {need - 100} bytes, the metadata needs {need}"


def test_missing_shard_file(folder):
    _, info = _storage(folder, EXTRA)
    (folder / info.relative_path).unlink()
    with pytest.raises(CorruptCheckpointError, match=f"{info.relative_path}: missing"):
        verify_checkpoint_folder(folder)


def test_garbled_bytes_item(folder):
    _, info = _storage(folder, EXTRA)
    shard = folder / info.relative_path
    data = bytearray(shard.read_bytes())
    data[info.offset : info.offset + info.length] = b"\x00" * info.length
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError) as err:
        verify_checkpoint_folder(folder)
    assert str(shard) in str(err.value) and repr(EXTRA) in str(err.value)


def test_unknown_stream_transform(folder):
    from torch.distributed.checkpoint.metadata import MetadataIndex

    meta, info = _storage(folder, EXTRA)
    info.transform_descriptors = ["stream.unknown/1"]
    meta.storage_data[MetadataIndex(EXTRA)] = info
    _write_metadata(folder, meta)
    with pytest.raises(CorruptCheckpointError, match="stream.unknown"):
        verify_checkpoint_folder(folder)


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_damaged_common_pt(folder, damage):
    path = folder / "common.pt"
    if damage == "missing":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CorruptCheckpointError) as err:
        verify_checkpoint_folder(folder)
    assert str(path) in str(err.value)


def test_metadata_json_missing_or_other_backend(folder):
    (folder / "metadata.json").write_text(json.dumps({"sharded_backend": "zarr"}))
    with pytest.raises(CorruptCheckpointError, match="sharded_backend is 'zarr'"):
        verify_checkpoint_folder(folder)
    (folder / "metadata.json").unlink()
    with pytest.raises(CorruptCheckpointError, match=r"metadata\.json: missing"):
        verify_checkpoint_folder(folder)


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such"):
        verify_checkpoint_folder(tmp_path / "no_such")


@pytest.mark.parametrize("damage", ["truncated", "garbled", "empty", "not_rng"])
def test_damaged_rng_file(tmp_path, damage):
    path = tmp_path / "rank_00001.pt"
    data = _torch_save_bytes(_rng_state())
    path.write_bytes(
        {
            "truncated": data[: len(data) // 2],
            "garbled": bytes(range(256)) * 4,
            "empty": b"",
            "not_rng": _torch_save_bytes({"weights": torch.zeros(2)}),
        }[damage]
    )
    with pytest.raises(CorruptCheckpointError) as err:
        load_rng_file(path)
    assert str(path) in str(err.value)


# ----------------------------------------------------------------------------- megatron-core

_MCORE_SAVE = """
import sys, torch
from megatron_nvembed.testing import init_single_process_megatron
from megatron_nvembed.core.cpu_support import cuda_allocations_on_cpu
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor
init_single_process_megatron()
state = {
    "decoder.weight": ShardedTensor.from_rank_offsets("decoder.weight", torch.randn(6, 4)),
    "decoder.bias": ShardedTensor.from_rank_offsets("decoder.bias", torch.zeros(6)),
    "decoder._extra_state": ShardedObject("decoder._extra_state", None, (1,), (0,), replica_id=0),
    "optimizer": {"param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999)}]},
}
# the project's way of writing the shards (in this process)
from megatron_nvembed.checkpoint.streaming import writes_in_this_process as writes_here
with cuda_allocations_on_cpu(), writes_here():
    dist_checkpointing.save(state, sys.argv[1])
"""


def test_genuine_megatron_core_checkpoint_passes(tmp_path):
    pytest.importorskip("megatron.core")
    folder = tmp_path / "iter_0000001"
    folder.mkdir()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    }
    proc = subprocess.run(
        [sys.executable, "-c", _MCORE_SAVE, str(folder)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {".metadata", "common.pt", "metadata.json"} <= {p.name for p in folder.iterdir()}
    meta = _metadata(folder)
    assert any(k.startswith("decoder._extra_state/shard_") for k in meta.state_dict_metadata)
    assert getattr(meta, "all_local_plans", None)  # megatron-core's plan cache is checked too
    verify_checkpoint_folder(folder)
