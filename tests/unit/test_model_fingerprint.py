"""`evaluation.encoder.model_fingerprint`: a model folder's weight bytes, not its paths or times."""

import os
import shutil

from megatron_nvembed.evaluation.encoder import model_fingerprint


def _folder(path, weights: bytes):
    (path / "2_Dense").mkdir(parents=True)
    (path / "model.safetensors").write_bytes(weights)
    (path / "2_Dense" / "model.safetensors").write_bytes(b"dense")
    (path / "config.json").write_text("{}")
    (path / "onnx").mkdir()
    (path / "onnx" / "model.bin").write_bytes(b"another runtime's copy")
    return path


def test_fingerprint_follows_the_weight_bytes_only(tmp_path):
    a = model_fingerprint(_folder(tmp_path / "a", b"w" * 100), "hf")
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "a", copy)
    os.utime(copy / "model.safetensors", ns=(1, 1))
    (copy / "README.md").write_text("notes")
    (copy / "onnx" / "model.bin").write_bytes(b"changed")  # not loaded by these formats
    assert model_fingerprint(copy, "sentence-transformers") == a

    flipped = bytearray(b"w" * 100)
    flipped[50] ^= 1
    (copy / "model.safetensors").write_bytes(bytes(flipped))  # same size, other bytes
    assert model_fingerprint(copy, "hf") != a
    (copy / "model.safetensors").write_bytes(b"w" * 100)
    (copy / "2_Dense" / "model.safetensors").write_bytes(b"dens3")  # a module's weights count
    assert model_fingerprint(copy, "hf") != a
