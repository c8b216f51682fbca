"""import-hf / export-hf on tiny checkpoints built in the test (no hub).

Proves:
- HF -> Megatron -> HF is bit-exact for a Mistral (`*ForCausalLM`), a Llama (bare `LlamaModel`)
  and an NV-Embed-format source;
- import at TP=2 then export equals import at TP=1 then export, bit for bit (resharding);
- the exported directory loads offline with `AutoModel.from_pretrained(trust_remote_code=True)`
  and its `encode(texts, instruction=...)` equals the plain transformers reference (fp32, 1e-5),
  and so does `SentenceTransformer(..., trust_remote_code=True).encode(texts, prompt=...)`;
- bad input (unknown architecture, missing shard, missing tokenizer) raises an error naming the
  file, and a failed conversion leaves no output directory.

Run alone: pytest tests/functional/test_conversion.py
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from megatron_nvembed.testing import (
    build_word_tokenizer,
    init_single_process_megatron,
    save_tiny_hf_decoder,
)

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
    from megatron_nvembed.conversion.convert import export_hf, import_hf

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
    from megatron_nvembed.reference import ReferenceEmbedder

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
    from megatron_nvembed.conversion.convert import export_hf

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


@pytest.mark.functional
def test_bad_inputs_name_the_file_and_leave_nothing(tmp_path, tokenizer):
    from megatron_nvembed.conversion.convert import import_hf

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
    # a failure inside the workers (a tensor of the wrong shape) leaves no output behind
    wrong = tmp_path / "wrong"
    shutil.copytree(src, wrong)
    cfg = json.loads((wrong / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (wrong / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Exception, match="shape mismatch"):
        import_hf(wrong, tmp_path / "out4")
    for name in ("out1", "out2", "out3", "out4", "out4.tmp"):
        assert not (tmp_path / name).exists()
