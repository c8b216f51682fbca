"""import-hf checks a source's sizes before anything is built or written (issue 32).

Proves, on a tiny Mistral folder (`save_tiny_hf_decoder`: 2 layers, hidden 64, 4 heads of 16,
2 KV heads, intermediate 96), each refusal one line naming the file and the field or key:
- config.json sizes that are not positive integers (zero, negative, fractional, string, bool),
  a hidden size the heads do not divide (no head_dim), heads the KV heads do not divide;
- config.json against the weight files' headers: num_hidden_layers 1000000 refused at once,
  naming config.json and the field, nothing written (also through the CLI: exit 2, one `error:`
  line); a missing layer, a missing key, a vocab_size / intermediate_size the tensors do not
  have; a safetensors header claiming more bytes than the file holds;
- a sharded source: an index naming a key its shard lacks, or lacking a key the config needs;
- tokenizer.json: invalid JSON, JSON the `tokenizers` library cannot load, and a vocabulary
  (added tokens included) larger than the embedding's rows.

Run alone: pytest tests/functional/test_import_sizes.py
"""

import json
import runpy
import shutil
import struct
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from megatron_nvembed.conversion.import_hf import _read_source, import_hf
from megatron_nvembed.testing import build_word_tokenizer, save_tiny_hf_decoder

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.functional


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tok = build_word_tokenizer(["how do plants make food", "paris is the capital of france"])
    return save_tiny_hf_decoder(tmp_path_factory.mktemp("src") / "mistral", tok, "mistral")


@pytest.fixture
def src(tiny, tmp_path):
    return Path(shutil.copytree(tiny, tmp_path / "src"))


def _edit_config(src, **changes):
    cfg = json.loads((src / "config.json").read_text())
    for key, value in changes.items():
        if value is ...:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (src / "config.json").write_text(json.dumps(cfg))


def _edit_weights(src, drop):
    path = src / "model.safetensors"
    state = {k: v for k, v in load_file(path).items() if not drop(k)}
    save_file(state, path, metadata={"format": "pt"})


def _refusal(src, exc=ValueError):
    """`_read_source`'s message (one line)."""
    with pytest.raises(exc) as err:
        _read_source(src)
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


@pytest.mark.faults
def test_absurd_layer_count_refused_at_once_and_nothing_written(src, tmp_path):
    """Fault: import-hf of a folder whose config.json says `num_hidden_layers: 1000000` for 2 layers
        of weights.
    Happens: Refused before any allocation in one error naming config.json, the field and what the
        weight file holds; nothing is written.
    Do: Fix config.json (or the weight files) so they describe the same model."""
    _edit_config(src, num_hidden_layers=1_000_000)
    with pytest.raises(ValueError) as err:
        import_hf(src, tmp_path / "out")
    msg = str(err.value)
    assert msg == (
        f"{src / 'config.json'}: num_hidden_layers is 1000000, but {src / 'model.safetensors'} "
        "holds 2 decoder layer(s) (model.layers.N keys up to N = 1)"
    )
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_cli_refusal_is_exit_2_and_one_error_line(src, tmp_path, capsys):
    _edit_config(src, num_hidden_layers=1_000_000)
    main = runpy.run_path(str(ROOT / "tools" / "convert_checkpoint.py"))["main"]
    code = main(["import-hf", "--hf-dir", str(src), "--save", str(tmp_path / "out")])
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(errors) == 1, errors
    assert "config.json: num_hidden_layers is 1000000" in errors[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "field, value",
    [
        ("num_hidden_layers", 0),
        ("hidden_size", -64),
        ("intermediate_size", 96.5),
        ("vocab_size", "268"),
        ("num_attention_heads", True),
        ("num_key_value_heads", 0),
        ("head_dim", -16),
    ],
)
def test_sizes_that_are_not_positive_integers(src, field, value):
    _edit_config(src, **{field: value})
    msg = _refusal(src)
    assert msg == f"{src / 'config.json'}: {field} must be a positive integer, got {value!r}"


def test_heads_that_do_not_divide(src):
    _edit_config(src, num_attention_heads=5, num_key_value_heads=1, head_dim=...)
    assert _refusal(src) == (
        f"{src / 'config.json'}: hidden_size 64 is not divisible by num_attention_heads 5 "
        "(and no head_dim is given)"
    )
    _edit_config(src, num_attention_heads=4, num_key_value_heads=3, head_dim=16)
    assert _refusal(src) == (
        f"{src / 'config.json'}: num_attention_heads 4 is not divisible by num_key_value_heads 3"
    )


@pytest.mark.parametrize(
    "field, value, key, fields",
    [
        ("vocab_size", 1000, "model.embed_tokens.weight", "vocab_size x hidden_size"),
        ("intermediate_size", 128, "model.layers.0.mlp.gate_proj.weight", "intermediate_size"),
        ("num_key_value_heads", 4, "model.layers.0.self_attn.k_proj.weight", "num_key_value_heads"),
    ],
)
@pytest.mark.faults
def test_config_sizes_the_tensors_do_not_have(src, field, value, key, fields):
    """Fault: A config.json size (vocab_size, intermediate_size, num_key_value_heads) the weight
        tensors do not have.
    Happens: Refused before loading, naming the weight file, the tensor and its shape, and
        config.json's fields.
    Do: Fix config.json or use the weights it was written for."""
    _edit_config(src, **{field: value})
    msg = _refusal(src)
    assert msg.startswith(f"{src / 'model.safetensors'}: {key!r} has shape "), msg
    assert f"{src / 'config.json'} gives" in msg and fields in msg


def test_missing_layers_and_keys(tiny, src):
    _edit_weights(src, lambda k: k.startswith("model.layers.1."))
    assert _refusal(src) == (
        f"{src / 'config.json'}: num_hidden_layers is 2, but {src / 'model.safetensors'} "
        "holds 1 decoder layer(s) (model.layers.N keys up to N = 0)"
    )
    _edit_config(src, num_hidden_layers=3)
    save_tiny = load_file(src / "model.safetensors")
    save_file(
        {
            **save_tiny,
            **{k.replace(".0.", ".2."): v.clone() for k, v in save_tiny.items() if ".0." in k},
        },
        src / "model.safetensors",
        metadata={"format": "pt"},
    )
    assert _refusal(src) == (
        f"{src / 'model.safetensors'}: no model.layers.1.* keys, a layer that "
        f"{src / 'config.json'}'s num_hidden_layers 3 needs"
    )
    _edit_config(src, num_hidden_layers=2)
    shutil.copy(tiny / "model.safetensors", src / "model.safetensors")
    _edit_weights(src, lambda k: k == "model.layers.0.mlp.up_proj.weight")
    assert _refusal(src) == (
        f"{src / 'model.safetensors'}: missing key 'model.layers.0.mlp.up_proj.weight' "
        "(expected shape (96, 64))"
    )


@pytest.mark.faults
def test_header_claiming_bytes_the_file_lacks(src):
    """Fault: A safetensors header claiming a tensor larger than the file (a 256 GB embedding in a
        small file).
    Happens: Refused from the header alone, naming the file, the tensor and its claimed shape;
        nothing is allocated.
    Do: Re-download or re-save the weight file."""
    path = src / "model.safetensors"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header["model.embed_tokens.weight"]["shape"] = [10**9, 64]  # a 256 GB claim
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])
    msg = _refusal(src)
    assert msg.startswith(f"{path}: 'model.embed_tokens.weight' of shape [1000000000, 64]"), msg


@pytest.mark.faults
def test_tokenizer_json_checked(src):
    """Fault: A `tokenizer.json` that is not valid JSON, not a tokenizer, or has more tokens than the
        embedding has rows.
    Happens: import-hf refuses it naming the file and the cause (for the vocabulary: its size
        against the embedding's rows) before any weight is read.
    Do: Use the tokenizer the model was trained with."""
    from tokenizers import Tokenizer

    path = src / "tokenizer.json"
    good = path.read_text()
    rows = load_file(src / "model.safetensors")["model.embed_tokens.weight"].shape[0]

    path.write_text(good[: len(good) // 2])
    assert _refusal(src).startswith(f"{path}: invalid JSON (")
    path.write_text(json.dumps({"model": 3}))
    assert _refusal(src).startswith(f"{path}: not a tokenizer the tokenizers library loads (")

    path.write_text(good)
    tok = Tokenizer.from_file(str(path))
    tok.add_tokens([f"extra{i}" for i in range(rows)])
    tok.save(str(path))
    size = max(tok.get_vocab(with_added_tokens=True).values()) + 1
    assert size > rows
    assert _refusal(src) == (
        f"{path}: vocabulary of {size} tokens (largest id {size - 1}, added tokens included) "
        f"exceeds the embedding's {rows} rows (embed_tokens.weight)"
    )


def test_the_untouched_source_passes(src):
    cfg, has_head, prefix = _read_source(src)
    assert (cfg.model.num_layers, has_head, prefix) == (2, False, "model.")


def test_sharded_index_checked_against_its_shards(src):
    from safetensors import safe_open

    shard = src / "model-00001-of-00001.safetensors"
    (src / "model.safetensors").rename(shard)
    with safe_open(str(shard), framework="pt") as f:
        weight_map = {k: shard.name for k in f.keys()}
    index = src / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {**weight_map, "model.extra": shard.name}}))
    assert _refusal(src) == (
        f"{index}: weight_map names 'model.extra' in {shard.name}, which lacks it"
    )
    del weight_map["model.layers.1.self_attn.o_proj.weight"]
    index.write_text(json.dumps({"weight_map": weight_map}))
    assert _refusal(src) == (
        f"{index}: missing key 'model.layers.1.self_attn.o_proj.weight' (expected shape (64, 64))"
    )
