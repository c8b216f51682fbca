"""PEFT adapters written by `merge-lora --peft-dir` reproduce the merged model, and adapters that
fit nothing fail loudly in our loader.

A tiny Mistral (SRC) is imported (BASE) and exported (fp32); a LoRA run is imitated on BASE: rank-4
adapters with random non-zero B and a perturbed pooling head (trained alongside LoRA), saved as a
LoRA checkpoint and exported merged (MERGED, fp32). Then, on token ids built with
`tokenize_for_embedding` (max |diff| <= 1e-5, fp32; the adapted and the merged weights differ only
by rounding of W + s B A):
- target "nvembed" (`merge_lora_checkpoint`): `PeftModel.from_pretrained(export of BASE,
  adapters)`, `AutoPeftModel.from_pretrained(adapters, trust_remote_code=True)` (base found
  through the recorded `base_model_name_or_path`; also after peft's `merge_and_unload`) and
  `load_peft_adapters` give MERGED's embeddings. The trained head travels as `modules_to_save` in
  peft's own key layout (`load_peft_adapters` checks the file's keys against the keys peft saves
  for that model); adapters without it are 2e-3 off, the bare export 0.5.
- target "mistral" (`tools/convert_checkpoint.py merge-lora --peft-target mistral`): a plain
  `MistralModel` of SRC with the adapters (`PeftModel`, `AutoPeftModel`), and the backbone of
  BASE's export with them (`load_peft_adapters`), give MERGED's backbone hidden states.
- `save_peft_adapters` at TP=2 (2 gloo processes, the LoRA checkpoint resharded on load) writes
  the same tensors as at TP=1 (exactly: gathering is concatenation) and the same config.
- mismatches: `load_peft_adapters` raises naming adapter_model.safetensors and the keys, both ways
  round; peft's own `PeftModel.from_pretrained` applies "nvembed" adapters to a plain MistralModel
  as a no-op (the documented limitation); `--peft-dir` without `--peft-base-model`, an unknown
  target and `--peft-target` without `--peft-dir` are refused before anything is written.

Run alone: pytest tests/functional/test_peft_adapters.py
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_nvembed.testing import (
    build_word_tokenizer,
    init_single_process_megatron,
    save_tiny_hf_decoder,
)

ROOT = Path(__file__).resolve().parents[2]
TEXTS = ["how do plants make food", "the sky is blue", "plants make the sky blue food"]
INSTRUCTION = "Instruct: find food\nQuery: "
TOL = 1e-5


def _embed(model, batch):
    with torch.no_grad():
        return model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pool_mask=batch["pool_mask"],
        )["sentence_embeddings"]


def _hidden(mistral, batch):
    """A MistralModel's last hidden states (its own causal mask) at the real tokens."""
    with torch.no_grad():
        out = mistral(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out.last_hidden_state[batch["attention_mask"].bool()]


def _max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def _hf_model(path):
    from transformers import AutoModel

    return AutoModel.from_pretrained(path, trust_remote_code=True).eval()


def _clean_env():
    """A fresh single-process job's environment (this process's rendezvous port is taken)."""
    drop = ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    return {k: v for k, v in os.environ.items() if k not in drop}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """SRC, BASE export, LoRA checkpoint, MERGED export, "nvembed" and "mistral" adapters,
    token ids."""
    from megatron_nvembed.checkpoint.store import load_checkpoint, read_config, save_checkpoint
    from megatron_nvembed.conversion.export_hf import export_hf
    from megatron_nvembed.conversion.import_hf import import_hf
    from megatron_nvembed.conversion.merge_lora import merge_lora_checkpoint
    from megatron_nvembed.data.tokenization import tokenize_for_embedding
    from megatron_nvembed.model.build import build_model
    from megatron_nvembed.model.lora import LoRAParallelLinear, apply_lora

    d = tmp_path_factory.mktemp("peft")
    tok = build_word_tokenizer(TEXTS + [INSTRUCTION])
    save_tiny_hf_decoder(d / "src", tok)
    import_hf(d / "src", d / "base")
    pg = init_single_process_megatron()
    export_hf(d / "base", d / "hf_base", dtype="float32")

    cfg = read_config(d / "base")
    model = build_model(cfg, pg)
    load_checkpoint(model, d / "base")
    apply_lora(model, rank=4, alpha=8.0)
    with torch.no_grad():  # as after training: non-zero B, and a head moved away from BASE's
        for i, m in enumerate(x for x in model.modules() if isinstance(x, LoRAParallelLinear)):
            m.lora_B.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(i))
        gen = torch.Generator().manual_seed(99)
        for name, p in model.named_parameters():
            if name.startswith("pooling."):
                p.add_(0.5 * p.abs().mean() * torch.randn(p.shape, generator=gen))
    save_checkpoint(model, cfg, d / "lora", lora={"rank": 4, "alpha": 8.0, "dropout": 0.0})
    shutil.copytree(d / "base" / "tokenizer", d / "lora" / "tokenizer")
    # The base model as its users name it (here a path; a hub id works the same way).
    merge_lora_checkpoint(
        d / "lora", d / "merged", d / "adapters", peft_base_model=str(d / "hf_base")
    )
    export_hf(d / "lora", d / "hf_merged", dtype="float32")
    proc = subprocess.run(  # target "mistral" through the CLI; SRC is BASE's backbone exactly
        [
            sys.executable,
            str(ROOT / "tools" / "convert_checkpoint.py"),
            "merge-lora",
            "--load",
            str(d / "lora"),
            "--save",
            str(d / "merged_m"),
            "--peft-dir",
            str(d / "adapters_m"),
            "--peft-base-model",
            str(d / "src"),
            "--peft-target",
            "mistral",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=_clean_env(),
    )
    assert proc.returncode == 0, proc.stderr

    batch, _ = tokenize_for_embedding(
        tok, TEXTS, [INSTRUCTION, "", INSTRUCTION], pad_to_multiple_of=None
    )
    return {"dir": d, "batch": batch}


@pytest.mark.functional
def test_nvembed_adapters_reproduce_merged_export(lora_run):
    from peft import AutoPeftModel, PeftModel

    from megatron_nvembed.conversion.peft_adapters import load_peft_adapters

    d, batch = lora_run["dir"], lora_run["batch"]
    config = json.loads((d / "adapters" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(d / "hf_base")
    assert config["modules_to_save"] == ["latent_attention_model"]
    merged = _embed(_hf_model(d / "hf_merged"), batch)
    assert _max_diff(_embed(_hf_model(d / "hf_base"), batch), merged) > 1e-2

    peft_model = PeftModel.from_pretrained(_hf_model(d / "hf_base"), str(d / "adapters")).eval()
    assert _max_diff(_embed(peft_model, batch), merged) <= TOL
    auto = AutoPeftModel.from_pretrained(str(d / "adapters"), trust_remote_code=True).eval()
    assert _max_diff(_embed(auto, batch), merged) <= TOL
    assert _max_diff(_embed(auto.merge_and_unload(), batch), merged) <= TOL
    # Ours also checks the file's keys against the keys peft saves for this model.
    ours = load_peft_adapters(_hf_model(d / "hf_base"), d / "adapters").eval()
    assert _max_diff(_embed(ours, batch), merged) <= TOL


@pytest.mark.functional
def test_mistral_adapters_reproduce_merged_backbone(lora_run):
    from peft import AutoPeftModel, PeftModel
    from safetensors import safe_open
    from transformers import MistralModel

    from megatron_nvembed.conversion.peft_adapters import load_peft_adapters

    d, batch = lora_run["dir"], lora_run["batch"]
    with safe_open(str(d / "adapters_m" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("base_model.model.layers.") for k in keys)
    config = json.loads((d / "adapters_m" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(d / "src")
    assert config["modules_to_save"] is None

    merged = _hidden(_hf_model(d / "hf_merged").embedding_model, batch)
    plain = MistralModel.from_pretrained(d / "src").eval()
    assert _max_diff(_hidden(plain, batch), merged) > 1e-2
    peft_model = PeftModel.from_pretrained(plain, str(d / "adapters_m")).eval()
    assert _max_diff(_hidden(peft_model, batch), merged) <= TOL
    auto = AutoPeftModel.from_pretrained(str(d / "adapters_m")).eval()
    assert isinstance(auto.get_base_model(), MistralModel)
    assert _max_diff(_hidden(auto, batch), merged) <= TOL
    # Without the original Mistral (e.g. a LoRA run on a fully trained stage-1 checkpoint): the
    # backbone of BASE's export is that MistralModel.
    backbone = _hf_model(d / "hf_base").embedding_model
    ours = load_peft_adapters(backbone, d / "adapters_m").eval()
    assert _max_diff(_hidden(ours, batch), merged) <= TOL


def _save_at_tp2(rank, world_size, lora_dir, out_dir, base_model):
    from megatron_nvembed.checkpoint.store import load_checkpoint, read_config, read_lora
    from megatron_nvembed.conversion.peft_adapters import save_peft_adapters
    from megatron_nvembed.core.config import ParallelConfig
    from megatron_nvembed.core.parallel import initialize_model_parallel
    from megatron_nvembed.model.build import build_model
    from megatron_nvembed.model.lora import apply_lora

    pg = initialize_model_parallel(2, 1)
    cfg, lora = read_config(lora_dir), read_lora(lora_dir)
    cfg.parallel = ParallelConfig(2, 1)
    model = build_model(cfg, pg)
    apply_lora(model, lora["rank"], lora["alpha"])
    load_checkpoint(model, lora_dir, merge_adapters=False)
    save_peft_adapters(
        model,
        cfg,
        out_dir,
        lora["rank"],
        lora["alpha"],
        lora["dropout"],
        base_model_name_or_path=base_model,
    )


@pytest.mark.functional
def test_tp2_adapters_equal_tp1(lora_run, tmp_path):
    from safetensors.torch import load_file

    from megatron_nvembed.testing import run_distributed

    d = lora_run["dir"]
    run_distributed(_save_at_tp2, 2, d / "lora", tmp_path / "tp2", str(d / "hf_base"))
    tp1 = load_file(d / "adapters" / "adapter_model.safetensors")
    tp2 = load_file(tmp_path / "tp2" / "adapter_model.safetensors")
    assert sorted(tp2) == sorted(tp1)
    assert any("latent_attention_model" in k for k in tp1)
    for key in tp1:
        assert torch.equal(tp2[key], tp1[key]), key
    config = (d / "adapters" / "adapter_config.json").read_text()
    assert (tmp_path / "tp2" / "adapter_config.json").read_text() == config


@pytest.mark.functional
def test_mismatched_adapters_fail_loudly(lora_run, tmp_path):
    from peft import PeftModel
    from transformers import MistralModel

    from megatron_nvembed.conversion.merge_lora import merge_lora_checkpoint
    from megatron_nvembed.conversion.peft_adapters import load_peft_adapters

    d, batch = lora_run["dir"], lora_run["batch"]
    plain = MistralModel.from_pretrained(d / "src").eval()
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors.*embedding_model\.layers"):
        load_peft_adapters(plain, d / "adapters")
    # peft's own loader only warns: the adapters are left at their initialisation (B = 0).
    bare = _hidden(MistralModel.from_pretrained(d / "src").eval(), batch)
    fresh = MistralModel.from_pretrained(d / "src").eval()
    with pytest.warns(UserWarning, match="Found missing adapter keys"):
        silent = PeftModel.from_pretrained(fresh, str(d / "adapters")).eval()
    assert _max_diff(_hidden(silent, batch), bare) == 0.0

    # The other way round: backbone-only adapters keyed for a plain MistralModel.
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors.*base_model\.model\.layers"):
        load_peft_adapters(_hf_model(d / "hf_base"), d / "adapters_m")

    with pytest.raises(ValueError, match="--peft-base-model"):
        merge_lora_checkpoint(d / "lora", tmp_path / "x", tmp_path / "y")
    with pytest.raises(ValueError, match="--peft-target"):
        merge_lora_checkpoint(
            d / "lora", tmp_path / "x", tmp_path / "y", peft_base_model="B", peft_target="llama"
        )
    with pytest.raises(ValueError, match="with --peft-dir only"):
        merge_lora_checkpoint(d / "lora", tmp_path / "x", peft_target="mistral")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
