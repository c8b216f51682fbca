"""import-hf / export-hf on tiny checkpoints built in the test (no hub).

Proves:
- HF -> Megatron -> HF is bit-exact for a Mistral (`*ForCausalLM`), a Llama (bare `LlamaModel`)
  and an NV-Embed-format source;
- import at TP=2 then export equals import at TP=1 then export, bit for bit (resharding);
- the exported directory loads offline with `AutoModel.from_pretrained(trust_remote_code=True)`
  and its `encode(texts, instruction=...)` equals the plain transformers reference (fp32, 1e-5),
  and so does `SentenceTransformer(..., trust_remote_code=True).encode(texts, prompt=...)`;
- bad input (unknown architecture, missing shard, missing tokenizer, a tensor shape the config
  does not give) raises an error naming the file, and a failed conversion leaves no output directory;
- output folders: import-hf, export-hf and merge-lora (CLI `main`, in process) refuse an existing
  non-empty output without --overwrite (exit 2, one `error:` line naming the flag and path, the
  user's file untouched), and always refuse an output that is the source, lies inside it or
  holds it, or is a file; the source stays intact and loadable; with `overwrite=True` the
  output is replaced whole and nothing is left beside it.

Run alone: pytest tests/functional/test_conversion.py
"""

import hashlib
import json
import re
import runpy
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_nvembed.testing import (
    build_word_tokenizer,
    init_single_process_megatron,
    save_tiny_hf_decoder,
)

ROOT = Path(__file__).resolve().parents[2]
TEXTS = ["how do plants make food", "paris is the capital of france", "the sky is blue"]
INSTRUCTION = "Instruct: Given a question, retrieve passages that answer it\nQuery: "


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer(TEXTS + [INSTRUCTION])


def _tiny_decoder(tmp_path, tokenizer, kind):
    return save_tiny_hf_decoder(tmp_path / kind, tokenizer, kind)


def _read_weights(d):
    files = sorted(d.glob("*.safetensors"))
    state = {}
    for f in files:
        state.update(load_file(f))
    return state


def _convert(src, tmp_path, name, tp=1, pp=1, **kw):
    from megatron_nvembed.conversion.export_hf import export_hf
    from megatron_nvembed.conversion.import_hf import import_hf

    ckpt = tmp_path / f"{name}_ckpt"
    import_hf(src, ckpt, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, **kw)
    init_single_process_megatron()
    out = tmp_path / f"{name}_hf"
    export_hf(ckpt, out, dtype="float32")
    return out


@pytest.mark.functional
def test_round_trips_resharding_and_hf_loading(tmp_path, tokenizer):
    mistral = _tiny_decoder(tmp_path, tokenizer, "mistral")
    llama = _tiny_decoder(tmp_path, tokenizer, "llama")

    # Mistral *ForCausalLM: TP=2 and TP=1 imports export identically; backbone is bit-exact.
    out_tp2 = _convert(mistral, tmp_path, "m_tp2", tp=2)
    out_tp1 = _convert(mistral, tmp_path, "m_tp1", tp=1)
    a, b = _read_weights(out_tp2), _read_weights(out_tp1)
    assert set(a) == set(b)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    src = _read_weights(mistral)
    for k, v in src.items():
        if k.startswith("model."):
            assert torch.equal(a["embedding_model." + k[len("model.") :]], v), k

    # Llama (bare LlamaModel), PP=2.
    out_llama = _convert(llama, tmp_path, "llama", pp=2)
    got, src = _read_weights(out_llama), _read_weights(llama)
    for k, v in src.items():
        assert torch.equal(got["embedding_model." + k], v), k

    # NV-Embed-format source: head included; HF -> Megatron -> HF is bit-exact.
    again = _convert(out_tp2, tmp_path, "nv", tp=2)
    c = _read_weights(again)
    assert set(c) == set(a) and all(torch.equal(c[k], a[k]) for k in a)

    # Exported model loads offline and encodes like the plain reference.
    from transformers import AutoModel

    from megatron_nvembed.conversion.hf_config import config_from_hf_dir
    from megatron_nvembed.testing.reference import ReferenceEmbedder

    config = json.loads((out_tp2 / "config.json").read_text())
    assert config["text_config"]["_name_or_path"] == "."  # nothing outside the folder
    assert config["latent_attention_config"]["num_latents_value"] == 512
    hf_model = AutoModel.from_pretrained(out_tp2, trust_remote_code=True).eval()
    got = hf_model.encode(TEXTS, instruction=INSTRUCTION)
    cfg, _, _ = config_from_hf_dir(out_tp2)
    ref = ReferenceEmbedder(cfg).eval()
    ref.load_state_dict(a, strict=True)
    batch = tokenizer([INSTRUCTION + t + "</s>" for t in TEXTS], padding=True, return_tensors="pt")
    pool = batch["attention_mask"].clone()
    pool[:, : len(tokenizer.tokenize(INSTRUCTION))] = 0
    with torch.no_grad():
        want = ref(batch["input_ids"], batch["attention_mask"], pool)
    assert got.shape == (3, 64)
    assert (got - want).abs().max().item() <= 1e-5

    # A sharded export (index + several safetensors files) loads and encodes the same.
    from megatron_nvembed.conversion.export_hf import export_hf

    sharded = export_hf(
        tmp_path / "m_tp2_ckpt", tmp_path / "sharded_hf", dtype="float32", max_shard_bytes=200_000
    )
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    reloaded = AutoModel.from_pretrained(sharded, trust_remote_code=True).eval()
    assert (reloaded.encode(TEXTS, instruction=INSTRUCTION) - want).abs().max().item() <= 1e-5

    # ... and through sentence-transformers, the instruction given as the prompt.
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(out_tp2), trust_remote_code=True, device="cpu")
    st_emb = st.encode(TEXTS, prompt=INSTRUCTION, convert_to_tensor=True)
    assert (st_emb - want).abs().max().item() <= 1e-5
    st_docs = st.encode(TEXTS, prompt_name="document", convert_to_tensor=True)
    assert (st_docs - hf_model.encode(TEXTS)).abs().max().item() <= 1e-5
    # A Matryoshka width through sentence-transformers' own truncation: the renormalised prefix.
    st_short = st.encode(
        TEXTS,
        prompt=INSTRUCTION,
        convert_to_tensor=True,
        truncate_dim=16,
        normalize_embeddings=True,
    )
    prefix = torch.nn.functional.normalize(want[:, :16], dim=-1)
    assert st_short.shape[1] == 16 and (st_short - prefix).abs().max().item() <= 1e-5


@pytest.mark.functional
def test_bad_inputs_name_the_file_and_leave_nothing(tmp_path, tokenizer):
    from megatron_nvembed.conversion.import_hf import import_hf

    src = _tiny_decoder(tmp_path, tokenizer, "mistral")
    # unknown architecture
    bad = tmp_path / "bad_arch"
    shutil.copytree(src, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config.json.*gpt2"):
        import_hf(bad, tmp_path / "out1")
    # missing shard named in the index
    sharded = tmp_path / "sharded"
    shutil.copytree(src, sharded)
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"model.embed_tokens.weight": "model-00002-of-00002.safetensors"}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        import_hf(sharded, tmp_path / "out2")
    # missing tokenizer
    notok = tmp_path / "notok"
    shutil.copytree(src, notok)
    (notok / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        import_hf(notok, tmp_path / "out3")
    # a tensor of the wrong shape: refused from the weight file's header, before any process
    # (test_import_sizes.py has the other size checks)
    wrong = tmp_path / "wrong"
    shutil.copytree(src, wrong)
    cfg = json.loads((wrong / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (wrong / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"model.safetensors: .*config.json gives .*intermediate"):
        import_hf(wrong, tmp_path / "out4")
    for name in ("out1", "out2", "out3", "out4"):
        assert not (tmp_path / name).exists()
    assert not list(tmp_path.glob("*out*.*tmp*"))


def _cli(capsys, *argv):
    """`tools/convert_checkpoint.py` in this process: (exit code, its `error:` lines)."""
    main = runpy.run_path(str(ROOT / "tools" / "convert_checkpoint.py"))["main"]
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.startswith("error:")]


def _snapshot(d):
    """{relative path: sha256} of every file under `d`."""
    return {
        str(f.relative_to(d)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(d.rglob("*"))
        if f.is_file()
    }


def _user_folder(path):
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("mine")
    return path


@pytest.mark.functional
def test_outputs_refused_before_anything_is_read(tmp_path, tokenizer, capsys):
    src = _tiny_decoder(tmp_path, tokenizer, "mistral")
    before = _snapshot(src)
    fake_ckpt = _user_folder(tmp_path / "ckpt")  # never read: every refusal comes first
    dst = _user_folder(tmp_path / "dst")

    # a non-empty output, each command: refused, the user's file untouched
    for argv, flag in (
        (("import-hf", "--hf-dir", src, "--save", dst), "--save"),
        (("export-hf", "--load", fake_ckpt, "--hf-dir", dst), "--hf-dir"),
        (("merge-lora", "--load", fake_ckpt, "--save", dst), "--save"),
        (
            ("merge-lora", "--load", fake_ckpt, "--save", tmp_path / "new", "--peft-dir", dst),
            "--peft-dir",
        ),
    ):
        code, errors = _cli(capsys, *argv)
        assert code == 2 and len(errors) == 1, (argv, errors)
        assert f"{flag} {dst}: exists and is not empty (1 entry)" in errors[0]
        assert "--overwrite" in errors[0]
        assert (dst / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "new").exists()

    # the source itself, inside it, around it: refused even with --overwrite
    for argv, words in (
        (
            ("import-hf", "--hf-dir", src, "--save", src),
            f"--save {src} is the same folder as --hf-dir {src}",
        ),
        (
            ("import-hf", "--hf-dir", src, "--save", src / "sub"),
            f"--save {src / 'sub'} is inside --hf-dir {src}",
        ),
        (
            ("import-hf", "--hf-dir", src, "--save", tmp_path),
            f"--save {tmp_path} contains --hf-dir {src}",
        ),
        (
            ("export-hf", "--load", fake_ckpt, "--hf-dir", fake_ckpt / ".." / "ckpt"),
            "is the same folder as --load",
        ),
        (
            ("merge-lora", "--load", fake_ckpt, "--save", fake_ckpt / "merged"),
            f"--save {fake_ckpt / 'merged'} is inside --load {fake_ckpt}",
        ),
        (
            ("merge-lora", "--load", fake_ckpt, "--save", dst, "--peft-dir", dst / "adapters"),
            f"--peft-dir {dst / 'adapters'} is inside --save {dst}",
        ),
        (  # --save inside --peft-dir: replacing --peft-dir would take the new --save with it
            ("merge-lora", "--load", fake_ckpt, "--save", dst / "m", "--peft-dir", dst),
            f"--peft-dir {dst} contains --save {dst / 'm'}",
        ),
        (
            ("export-hf", "--load", fake_ckpt, "--hf-dir", dst / "notes.txt"),
            f"--hf-dir {dst / 'notes.txt'}: exists and is not a folder",
        ),
    ):
        code, errors = _cli(capsys, *argv, "--overwrite")
        assert code == 2 and len(errors) == 1, (argv, errors)
        assert words in errors[0], errors[0]
    assert _snapshot(src) == before and not (src / "sub").exists()
    assert _snapshot(fake_ckpt) == {"notes.txt": hashlib.sha256(b"mine").hexdigest()}
    assert (dst / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "dst", "mistral"]

    # the library says the same without the CLI
    from megatron_nvembed.conversion.export_hf import export_hf
    from megatron_nvembed.conversion.import_hf import import_hf
    from megatron_nvembed.conversion.merge_lora import merge_lora_checkpoint

    with pytest.raises(ValueError, match="pass --overwrite"):
        import_hf(src, dst)
    with pytest.raises(ValueError, match="is the same folder as --load"):
        export_hf(fake_ckpt, fake_ckpt, overwrite=True)
    with pytest.raises(ValueError, match="pass --overwrite"):
        merge_lora_checkpoint(fake_ckpt, dst)
    assert _snapshot(src) == before and (dst / "notes.txt").read_text() == "mine"


@pytest.mark.functional
def test_overwrite_replaces_and_a_refused_source_stays_loadable(tmp_path, tokenizer):
    from megatron_nvembed.conversion.export_hf import export_hf
    from megatron_nvembed.conversion.import_hf import import_hf

    src = _tiny_decoder(tmp_path, tokenizer, "mistral")
    ckpt = _user_folder(tmp_path / "ckpt")
    import_hf(src, ckpt, overwrite=True)
    assert not (ckpt / "notes.txt").exists() and (ckpt / "tokenizer").is_dir()
    init_single_process_megatron()
    ckpt_files = _snapshot(ckpt)
    with pytest.raises(ValueError, match=re.escape(f"--hf-dir {ckpt} is the same folder as")):
        export_hf(ckpt, ckpt, overwrite=True)
    assert _snapshot(ckpt) == ckpt_files
    out = _user_folder(tmp_path / "hf")
    export_hf(ckpt, out, dtype="float32", overwrite=True)  # the refused source still loads
    assert not (out / "notes.txt").exists() and (out / "config.json").is_file()
    weights = _read_weights(out)
    assert torch.equal(
        weights["embedding_model.embed_tokens.weight"],
        _read_weights(src)["model.embed_tokens.weight"],
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    export_hf(ckpt, empty, dtype="float32")  # an empty folder needs no --overwrite
    assert (empty / "config.json").is_file()
    # beside the outputs only their lock files (utils.locking), released: owner cleared
    locks = sorted(p.name for p in tmp_path.glob(".*.nvembed-lock"))
    assert locks == [".ckpt.nvembed-lock", ".empty.nvembed-lock", ".hf.nvembed-lock"]
    assert all((tmp_path / name).read_text() == "" for name in locks)
    left = sorted(p.name for p in tmp_path.iterdir() if p.name not in locks)
    assert left == ["ckpt", "empty", "hf", "mistral"]
