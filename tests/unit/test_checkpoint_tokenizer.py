"""A checkpoint's tokenizer folder is written with its manifest (`store_tokenizer`) and checked
before it is read (`tokenizer_dir`): inside the checkpoint, its files as written."""

from __future__ import annotations

import json

import pytest

from megatron_nvembed.checkpoint.safety import UnsafeCheckpointError
from megatron_nvembed.checkpoint.store import TOKENIZER_DIR, store_tokenizer, tokenizer_dir
from megatron_nvembed.utils.checksums import MANIFEST, ManifestError


@pytest.fixture
def ckpt(tmp_path):
    src = tmp_path / "hf"
    src.mkdir()
    (src / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0, "b": 1}}}))
    (src / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 512}))
    (src / "model.safetensors").write_bytes(b"not a tokenizer file")  # not copied
    root = tmp_path / "ckpt"
    assert store_tokenizer(src, root / TOKENIZER_DIR) == 2
    return root


def test_stored_tokenizer_has_its_manifest_and_is_read(ckpt):
    tok = tokenizer_dir(ckpt)
    listed = json.loads((tok / MANIFEST).read_text())["files"]
    assert sorted(listed) == ["tokenizer.json", "tokenizer_config.json"]
    assert tok == ckpt / TOKENIZER_DIR


def test_a_tokenizer_folder_without_manifest_is_read_as_it_is(ckpt):
    (ckpt / TOKENIZER_DIR / MANIFEST).unlink()
    assert tokenizer_dir(ckpt) == ckpt / TOKENIZER_DIR


def test_a_missing_tokenizer_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer: missing"):
        tokenizer_dir(tmp_path)


@pytest.mark.faults
def test_a_changed_tokenizer_file_is_refused_naming_it(ckpt):
    """Fault: A file of a checkpoint's `tokenizer/` folder changed after the save (a flipped
        byte), or a file added there.
    Happens: Refused before the tokenizer is read (training from the checkpoint, embed,
        export-hf, merges), naming the file; exit 2 in the tools.
    Do: Restore the tokenizer files of that checkpoint (they are the imported model's, byte for
        byte)."""
    path = ckpt / TOKENIZER_DIR / "tokenizer.json"
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(ManifestError, match="tokenizer.json: damaged"):
        tokenizer_dir(ckpt)
    raw[-3] ^= 0x01
    path.write_bytes(bytes(raw))
    (ckpt / TOKENIZER_DIR / "added_tokens.json").write_text("{}")
    with pytest.raises(ManifestError, match="added_tokens.json: not listed"):
        tokenizer_dir(ckpt)


@pytest.mark.faults
@pytest.mark.parametrize("what", ["folder", "file"])
def test_a_tokenizer_linked_out_of_the_checkpoint_is_refused(ckpt, tmp_path, what):
    """Fault: A checkpoint's `tokenizer/` folder, or a file in it, is a symbolic link leading out
        of the checkpoint.
    Happens: Refused before anything of it is read, naming the link and where it leads; exit 2
        in the tools.
    Do: Copy the real files into the checkpoint's `tokenizer/` folder."""
    outside = tmp_path / "elsewhere"
    (ckpt / TOKENIZER_DIR).rename(outside)
    if what == "folder":
        (ckpt / TOKENIZER_DIR).symlink_to(outside, target_is_directory=True)
        named = TOKENIZER_DIR
    else:
        (ckpt / TOKENIZER_DIR).mkdir()
        for f in outside.iterdir():
            (ckpt / TOKENIZER_DIR / f.name).symlink_to(f)
        named = f"{TOKENIZER_DIR}/"  # the first link found (each one leads out)
    with pytest.raises(UnsafeCheckpointError, match=str(outside)) as err:
        tokenizer_dir(ckpt)
    assert named in str(err.value)
    # a link that stays inside the checkpoint is fine
    if what == "folder":
        (ckpt / TOKENIZER_DIR).unlink()
        outside.rename(ckpt / "tok_real")
        (ckpt / TOKENIZER_DIR).symlink_to(ckpt / "tok_real", target_is_directory=True)
        assert tokenizer_dir(ckpt) == ckpt / TOKENIZER_DIR
