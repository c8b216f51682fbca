"""Conversions that hold one parameter at a time: the same bytes as a model held whole, the dtype
kept, and nothing kept alive between parameters.

References are independent of the streaming code: a real model filled by `load_hf_into_model`
and saved by megatron-core's own save, read back with megatron-core's whole-model load
(`store.load_checkpoint`); the HF tensors of a loaded model through `megatron_to_hf`; the source
files read with `safetensors`. Everything is compared bit for bit (`torch.equal`).

Run alone: pytest tests/functional/test_streaming_conversion.py
"""

import gc
import json
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_nvembed.testing import (
    build_word_tokenizer,
    init_single_process_megatron,
    save_tiny_hf_decoder,
)

TEXTS = ["how do plants make food", "paris is the capital of france", "the sky is blue"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A tiny Mistral (fp32, as transformers saves it) and the same weights in bf16."""
    root = tmp_path_factory.mktemp("sources")
    tok = build_word_tokenizer(TEXTS)
    fp32 = save_tiny_hf_decoder(root / "fp32", tok, "mistral")
    bf16 = root / "bf16"
    bf16.mkdir()
    for f in fp32.iterdir():
        if f.suffix != ".safetensors":
            (bf16 / f.name).write_bytes(f.read_bytes())
    state = {k: v.to(torch.bfloat16) for k, v in load_file(fp32 / "model.safetensors").items()}
    save_file(state, str(bf16 / "model.safetensors"), metadata={"format": "pt"})
    return {"fp32": fp32, "bf16": bf16}


def _loaded(ckpt, dtype=torch.float32):
    """Every parameter of `ckpt` through megatron-core's whole-model load at TP = PP = 1."""
    from megatron_nvembed.checkpoint.store import load_checkpoint, read_config
    from megatron_nvembed.core.config import ParallelConfig
    from megatron_nvembed.model.build import build_model

    init_single_process_megatron()
    cfg = read_config(ckpt)
    cfg.parallel = ParallelConfig(1, 1)
    model = build_model(cfg, params_dtype=dtype)
    load_checkpoint(model, ckpt)
    return model, {n: p.detach().clone() for n, p in model.named_parameters()}


def _saved_dtypes(ckpt) -> set:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = FileSystemReader(str(Path(ckpt) / "iter_0000000")).read_metadata()
    return {
        v.properties.dtype
        for v in meta.state_dict_metadata.values()
        if isinstance(v, TensorStorageMetadata)
    }


@pytest.mark.functional
def test_imports_at_every_layout_equal_a_save_of_the_model_held_whole(tmp_path, sources):
    """The backbone against a save of the whole model filled by `load_hf_into_model`; the new
    (seeded) head against the TP=1 import's."""
    from megatron_nvembed.checkpoint.store import save_checkpoint
    from megatron_nvembed.conversion.hf_config import config_from_hf_dir
    from megatron_nvembed.conversion.hf_mapping import load_hf_into_model
    from megatron_nvembed.conversion.hf_weights import LazyHFState
    from megatron_nvembed.conversion.import_hf import import_hf
    from megatron_nvembed.model.build import build_model

    src = sources["fp32"]
    head = dict(num_latents=8, num_heads=2, head_dim=16)
    init_single_process_megatron()
    cfg, _, _ = config_from_hf_dir(src)
    cfg.pooling.num_latents, cfg.pooling.num_heads, cfg.pooling.head_dim = 8, 2, 16
    model = build_model(cfg)
    load_hf_into_model(
        model, LazyHFState(src), cfg, 0, 0, backbone_prefix="model.", include_head=False
    )
    save_checkpoint(model, cfg, tmp_path / "reference")
    _, want = _loaded(tmp_path / "reference")

    heads = []
    for tp, pp in ((1, 1), (2, 1), (1, 2)):
        out = tmp_path / f"tp{tp}pp{pp}"
        import_hf(src, out, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, **head)
        _, got = _loaded(out)
        assert set(got) == set(want)
        backbone = [n for n in want if not n.startswith("pooling.")]
        assert [n for n in backbone if not torch.equal(got[n], want[n])] == [], (tp, pp)
        heads.append({n: v for n, v in got.items() if n.startswith("pooling.")})
    assert heads[0]["pooling.latents"].std() > 0.5  # standard normal, not left empty
    assert heads[0]["pooling.to_kv.weight"].std() > 0
    for other in heads[1:]:
        assert [n for n in other if not torch.equal(other[n], heads[0][n])] == []


@pytest.mark.functional
def test_a_bf16_source_stays_bf16_through_import_and_export(tmp_path, sources):
    from megatron_nvembed.conversion.export_hf import export_hf
    from megatron_nvembed.conversion.import_hf import import_hf

    src = load_file(sources["bf16"] / "model.safetensors")
    ckpt = tmp_path / "ckpt"
    import_hf(sources["bf16"], ckpt, pooling="eos", mask_type="causal")
    assert _saved_dtypes(ckpt) == {torch.bfloat16}
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(ckpt / "iter_0000000")).read_metadata().state_dict_metadata
    saved_bytes = sum(
        v.size.numel() * v.properties.dtype.itemsize
        for v in meta.values()
        if hasattr(v, "properties")
    )
    padding_rows = 128 - src["model.embed_tokens.weight"].shape[0]  # the padded vocabulary
    source_bytes = sum(v.numel() * v.element_size() for k, v in src.items() if "lm_head" not in k)
    assert saved_bytes == source_bytes + padding_rows * 64 * 2

    # Loaded into a float32 model (a CPU training run): the exact upcast.
    _, got32 = _loaded(ckpt)
    assert got32["embedding.word_embeddings.weight"].dtype == torch.float32
    assert torch.equal(
        got32["decoder.layers.1.mlp.linear_fc2.weight"],
        src["model.layers.1.mlp.down_proj.weight"].float(),
    )

    init_single_process_megatron()
    out = export_hf(ckpt, tmp_path / "export")  # default: the checkpoint's dtype
    exported = load_file(out / "model.safetensors")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    for k, v in src.items():
        if k.startswith("model."):
            got = exported["embedding_model." + k[len("model.") :]]
            assert got.dtype == torch.bfloat16 and torch.equal(got, v), k

    # --dtype float32 on import: the exact upcast, stored as float32.
    ckpt32 = tmp_path / "ckpt32"
    import_hf(sources["bf16"], ckpt32, pooling="eos", mask_type="causal", dtype="float32")
    assert _saved_dtypes(ckpt32) == {torch.float32}
    _, again = _loaded(ckpt32)
    assert [n for n in got32 if not torch.equal(got32[n], again[n])] == []


@pytest.mark.functional
def test_export_and_merge_lora_equal_the_model_held_whole(tmp_path, sources):
    """export-hf and merge-lora of a TP=2-saved LoRA checkpoint against the loaded model's own
    merge (`merge_lora`) and mapping (`megatron_to_hf`)."""
    from megatron_nvembed.checkpoint.store import save_checkpoint
    from megatron_nvembed.conversion.export_hf import export_hf
    from megatron_nvembed.conversion.hf_mapping import megatron_to_hf, model_to_hf_shard
    from megatron_nvembed.conversion.import_hf import import_hf
    from megatron_nvembed.conversion.merge_lora import merge_lora_checkpoint
    from megatron_nvembed.model.lora import apply_lora, merge_lora

    ckpt = tmp_path / "ckpt"
    import_hf(sources["fp32"], ckpt, pooling="latent", num_latents=8, num_heads=2, head_dim=16)
    model, _ = _loaded(ckpt)
    apply_lora(model, rank=4, alpha=8.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0.0, 0.05)
    lora = {"rank": 4, "alpha": 8.0, "dropout": 0.0}
    save_checkpoint(model, model.model_config, tmp_path / "lora", lora=lora)
    (tmp_path / "lora" / "tokenizer").mkdir()
    for f in (ckpt / "tokenizer").iterdir():
        (tmp_path / "lora" / "tokenizer" / f.name).write_bytes(f.read_bytes())
    merge_lora(model)
    want = {n: p.detach().clone() for n, p in model.named_parameters()}
    want_hf = megatron_to_hf(
        [[model_to_hf_shard(model)]], model.model_config, backbone_prefix="embedding_model."
    )

    init_single_process_megatron()
    out = export_hf(tmp_path / "lora", tmp_path / "export", max_shard_bytes=60_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # several files, written one by one
    got_hf = {}
    for f in sorted(out.glob("*.safetensors")):
        got_hf.update(load_file(f))
    assert set(got_hf) == set(want_hf)
    assert [k for k in want_hf if not torch.equal(got_hf[k], want_hf[k])] == []

    merge_lora_checkpoint(tmp_path / "lora", tmp_path / "merged")
    _, got = _loaded(tmp_path / "merged")
    assert set(got) == set(want)
    assert [n for n in want if not torch.equal(got[n], want[n])] == []


@pytest.mark.functional
def test_a_streamed_save_and_export_hold_one_value_at_a_time(tmp_path):
    """A save asks for each value while holding at most the one being written, an export file
    none (weak references to every value produced: one kept alive would stay reachable)."""
    from megatron_nvembed.checkpoint.lazy import meta_model
    from megatron_nvembed.checkpoint.store import load_checkpoint, save_checkpoint
    from megatron_nvembed.conversion.hf_weights import write_safetensors_shards
    from megatron_nvembed.model.build import build_model
    from megatron_nvembed.testing import tiny_model_config

    init_single_process_megatron()
    cfg = tiny_model_config()
    torch.manual_seed(0)
    real = dict(build_model(cfg).named_parameters())
    produced: list[weakref.ref] = []
    alive_at_call: list[int] = []

    def value(name: str) -> torch.Tensor:
        gc.collect()
        alive_at_call.append(sum(ref() is not None for ref in produced))
        tensor = real[name].detach().clone()
        produced.append(weakref.ref(tensor))
        return tensor

    save_checkpoint(meta_model(cfg, torch.float32), cfg, tmp_path / "ckpt", values=value)
    assert len(alive_at_call) == len(real)  # each parameter produced once
    # At most the value being written (megatron-core's write loop holds it until its next item)
    assert max(alive_at_call) <= 1
    loaded = build_model(cfg)
    load_checkpoint(loaded, tmp_path / "ckpt")
    assert all(torch.equal(p, real[n]) for n, p in loaded.named_parameters())

    produced.clear()
    alive_at_call.clear()
    layout = {n: torch.empty(p.shape, dtype=p.dtype, device="meta") for n, p in real.items()}
    write_safetensors_shards(layout, tmp_path, 20_000, value)
    assert max(alive_at_call) == 0
    files = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(files) > 1
    back = {}
    for f in files:
        back.update(load_file(f))
    assert set(back) == set(real) and all(torch.equal(back[n], real[n]) for n in real)
