"""Paths stay inside: links and '..' that leave an input folder are refused before reading.

A real checkpoint (saved in this process by `store.save_checkpoint`), a sentence-transformers
folder written by sentence-transformers' own `save()` and a BEIR folder are each given a file or
folder that resolves outside them (a symbolic link, a `modules.json` path "../outside"): the
read is refused with one error naming the path, before the file is opened. Links that stay
inside the folder (and huggingface_hub's cache layout, snapshot files linked to the same model's
`blobs/`) keep working.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from megatron_nvembed.testing import init_single_process_megatron
from megatron_nvembed.testing.data import _write_beir_split
from megatron_nvembed.testing.models import tiny_model_config
from megatron_nvembed.testing.st_folders import (
    build_qwen3_embedding_tokenizer,
    save_tiny_qwen3_embedding,
)

pytestmark = pytest.mark.faults


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny model saved as iteration 1, and its weights."""
    from megatron_nvembed.checkpoint.store import save_checkpoint
    from megatron_nvembed.model.build import build_model

    pg = init_single_process_megatron()
    cfg = tiny_model_config()
    model = build_model(cfg, pg).eval()
    root = tmp_path_factory.mktemp("paths") / "ckpt"
    save_checkpoint(model, cfg, root, 1)
    return root, cfg, pg, {k: v.clone() for k, v in model.state_dict().items() if v is not None}


def _copy(checkpoint, tmp_path: Path) -> Path:
    root = tmp_path / "ckpt"
    shutil.copytree(checkpoint[0], root)
    return root


def _load(checkpoint, root: Path):
    from megatron_nvembed.checkpoint.store import load_checkpoint
    from megatron_nvembed.model.build import build_model

    _, cfg, pg, _ = checkpoint
    model = build_model(cfg, pg).eval()
    load_checkpoint(model, root)
    return model


def test_checkpoint_links_out_of_the_folder_are_refused(checkpoint, tmp_path):
    """Fault: a checkpoint's shard, a subfolder of its iteration folder, the iteration folder itself or the tracker file is a symbolic link to a file outside the checkpoint folder.
    Happens: loading refuses it with one error naming the link and where it leads, before any file of it is read (`UnsafeCheckpointError`, exit code 2 in the tools).
    Do: copy the real files into the checkpoint folder (or load the folder the link points to)."""
    from megatron_nvembed.checkpoint.safety import UnsafeCheckpointError

    outside = tmp_path / "outside"
    outside.mkdir()
    root = _copy(checkpoint, tmp_path)
    it = root / "iter_0000001"
    shard = next(it.glob("*.distcp"))
    shutil.copy(shard, outside / shard.name)
    shard.unlink()
    shard.symlink_to(outside / shard.name)
    with pytest.raises(UnsafeCheckpointError, match="outside") as err:
        _load(checkpoint, root)
    assert str(shard) in str(err.value) and len(str(err.value).splitlines()) == 1

    shard.unlink()  # the shard back; a subfolder linked out instead
    shutil.copy(outside / shard.name, shard)
    (it / "rng").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnsafeCheckpointError, match="outside") as err:
        _load(checkpoint, root)
    assert str(it / "rng") in str(err.value)
    (it / "rng").unlink()

    moved = outside / "iter_0000001"  # the whole iteration folder linked out
    shutil.move(it, moved)
    it.symlink_to(moved, target_is_directory=True)
    with pytest.raises(UnsafeCheckpointError, match="outside") as err:
        _load(checkpoint, root)
    assert str(it) in str(err.value)
    it.unlink()
    shutil.move(moved, it)

    tracker = root / "latest_checkpointed_iteration.txt"  # the tracker linked out
    shutil.move(tracker, outside / tracker.name)
    tracker.symlink_to(outside / tracker.name)
    with pytest.raises(UnsafeCheckpointError, match="outside") as err:
        _load(checkpoint, root)
    assert str(tracker) in str(err.value)


def test_checkpoint_links_inside_the_folder_load(checkpoint, tmp_path):
    """Fault: a checkpoint's shard and its tracker are symbolic links to files inside the checkpoint folder.
    Happens: nothing is refused: the checkpoint loads the saved weights.
    Do: nothing."""
    root = _copy(checkpoint, tmp_path)
    it = root / "iter_0000001"
    shard = next(it.glob("*.distcp"))
    (it / "data").mkdir()
    shutil.move(shard, it / "data" / shard.name)
    shard.symlink_to(Path("data") / shard.name)
    tracker = root / "latest_checkpointed_iteration.txt"
    shutil.move(tracker, root / "tracker.txt")
    tracker.symlink_to("tracker.txt")
    model = _load(checkpoint, root)
    for key, value in checkpoint[3].items():
        if isinstance(value, torch.Tensor) and not key.endswith("_extra_state"):
            assert torch.equal(model.state_dict()[key], value), key


@pytest.fixture(scope="module")
def st_folder(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("st")
    texts = ["how do plants make food", "the sky is blue", "paris is in france"]
    build_qwen3_embedding_tokenizer(texts, tmp / "tok")
    return save_tiny_qwen3_embedding(tmp / "model", tmp / "tok")


def _embed(tmp_path: Path, load: Path, capsys) -> tuple[int, str]:
    import tools.embed as embed_tool

    data = tmp_path / "in.jsonl"
    data.write_text('{"text": "plants make food"}\n')
    code = embed_tool.main(["--load", str(load), "--input", str(data), "--output",
                            str(tmp_path / "out.npy")])  # fmt: skip
    return code, capsys.readouterr().err


def test_sentence_transformers_folder_leading_out_is_refused(st_folder, tmp_path, capsys):
    """Fault: a sentence-transformers folder's modules.json gives a module the path "../outside", or its weights file is a symbolic link to a file outside the folder.
    Happens: tools/embed.py (and import-hf) refuse the folder with one `error:` line naming modules.json and the module, or the link, before the model loads; exit code 2, no traceback.
    Do: put the module's files inside the model folder and give its path relative to it."""
    folder = tmp_path / "model"
    shutil.copytree(st_folder, folder)
    (tmp_path / "outside").mkdir()
    modules = json.loads((folder / "modules.json").read_text())
    original = json.dumps(modules)
    modules[1]["path"] = "../outside"
    (folder / "modules.json").write_text(json.dumps(modules))
    code, err = _embed(tmp_path, folder, capsys)
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert str(folder / "modules.json") in lines[0] and "module 1" in lines[0], err
    assert "'../outside'" in lines[0] and "outside" in lines[0]

    (folder / "modules.json").write_text(original)
    weights = folder / "model.safetensors"
    shutil.move(weights, tmp_path / "outside" / weights.name)
    weights.symlink_to(tmp_path / "outside" / weights.name)
    code, err = _embed(tmp_path, folder, capsys)
    assert code == 2 and "Traceback" not in err, err
    assert f"error: --load: {weights}: resolves to" in err, err

    from megatron_nvembed.conversion.import_hf import import_hf

    with pytest.raises(ValueError, match="outside") as raised:
        import_hf(folder, tmp_path / "imported")
    assert str(weights) in str(raised.value)
    assert not (tmp_path / "imported").exists()


def test_sentence_transformers_links_inside_and_hub_cache_load(st_folder, tmp_path):
    """Fault: a sentence-transformers folder's files are symbolic links inside it, or it is a huggingface_hub cache snapshot whose files link into the same model's `blobs/`.
    Happens: nothing is refused: the folder loads and embeds.
    Do: nothing."""
    from megatron_nvembed.evaluation.encoder import detect_model_format, load_embedder

    folder = tmp_path / "model"
    shutil.copytree(st_folder, folder)
    weights = folder / "model.safetensors"
    shutil.move(weights, folder / "weights.bin")
    weights.symlink_to("weights.bin")
    embedder = load_embedder(folder, show_progress=False)
    assert embedder.dim > 0

    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    for f in sorted(p for p in st_folder.rglob("*") if p.is_file()):
        rel = f.relative_to(st_folder)
        blob = repo / "blobs" / str(rel).replace("/", "_")
        shutil.copy(f, blob)
        (snapshot / rel).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / rel).symlink_to(os.path.relpath(blob, (snapshot / rel).parent))
    assert detect_model_format(snapshot) == "sentence-transformers"


def test_beir_file_linked_out_is_refused(tmp_path):
    """Fault: a BEIR folder's corpus.jsonl is a symbolic link to a file outside the folder.
    Happens: the evaluation refuses the folder with one error naming corpus.jsonl and where it leads, before reading any file of it; a link to a file inside the folder is read as usual.
    Do: copy the corpus into the BEIR folder."""
    from megatron_nvembed.evaluation.beir import load_beir

    folder = tmp_path / "beir"
    _write_beir_split(
        folder,
        [{"_id": "d1", "text": "plants make food"}, {"_id": "d2", "text": "the sky is blue"}],
        [{"_id": "q1", "text": "how do plants eat"}],
        [("q1", "d1")],
    )
    (tmp_path / "outside").mkdir()
    corpus = folder / "corpus.jsonl"
    shutil.move(corpus, tmp_path / "outside" / "corpus.jsonl")
    corpus.symlink_to(tmp_path / "outside" / "corpus.jsonl")
    with pytest.raises(ValueError, match="outside") as err:
        load_beir(folder)
    assert str(corpus) in str(err.value) and len(str(err.value).splitlines()) == 1

    corpus.unlink()
    (folder / "data").mkdir()
    shutil.move(tmp_path / "outside" / "corpus.jsonl", folder / "data" / "corpus.jsonl")
    corpus.symlink_to(Path("data") / "corpus.jsonl")
    assert load_beir(folder).corpus_ids == ["d1", "d2"]


def test_links_inside_helper_names_the_link(tmp_path):
    """Fault: a file of an input folder is reached through `..` or a chain of symbolic links that ends outside the folder.
    Happens: `fileio.check_links_inside` and `fileio.resolve_inside` refuse it, naming the path and its target; a chain that stays inside passes.
    Do: replace the link by the file itself."""
    from megatron_nvembed.utils.fileio import check_links_inside, resolve_inside

    folder, outside = tmp_path / "in", tmp_path / "out"
    (folder / "sub").mkdir(parents=True)
    outside.mkdir()
    (folder / "a.txt").write_text("a")
    (folder / "sub" / "b").symlink_to("../a.txt")  # inside, through '..'
    (folder / "c").symlink_to("sub/b")  # a chain that stays inside
    check_links_inside(folder)
    assert resolve_inside(folder / "c", folder) == (folder / "a.txt").resolve()
    with pytest.raises(ValueError, match="outside") as err:
        resolve_inside(folder / "sub" / ".." / ".." / "out", folder)
    assert str(outside) in str(err.value)
    (outside / "x").write_text("x")
    (folder / "sub" / "d").symlink_to("../../out/x")  # '..' leading out
    (folder / "e").symlink_to("sub/d")  # a chain through it
    with pytest.raises(ValueError, match="outside") as err:
        check_links_inside(folder)
    assert str(folder / "e") in str(err.value) or str(folder / "sub" / "d") in str(err.value)
