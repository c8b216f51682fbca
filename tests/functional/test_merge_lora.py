"""LoRA training checkpoints: saved with their adapters, merged by `merge-lora`, merged on
export, and loaded merged wherever a plain model reads them.

A tiny Mistral is imported; the model gets rank-4 adapters with random non-zero B (as after
training) and is saved with them. Then, against that model's own embeddings (max |diff| <= 1e-5):
`merge_lora_checkpoint`'s output loaded into a plain model; the LoRA checkpoint loaded directly
into a plain model (merged on load); `export_hf` of the LoRA checkpoint through transformers'
`AutoModel.encode`. `merge-lora` on a checkpoint without adapters fails naming lora.json; over an
existing output it needs `--overwrite`.
(`--peft-dir` adapters: tests/functional/test_peft_adapters.py.)

Run alone: pytest tests/functional/test_merge_lora.py
"""

import os
import re
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
TEXTS = ["how do plants make food", "the sky is blue"]


@pytest.mark.functional
def test_lora_checkpoint_merge_and_export(tmp_path):
    from transformers import AutoModel

    from megatron_nvembed.checkpoint.store import (
        load_checkpoint,
        read_config,
        read_lora,
        save_checkpoint,
    )
    from megatron_nvembed.conversion.export_hf import export_hf
    from megatron_nvembed.conversion.import_hf import import_hf
    from megatron_nvembed.conversion.merge_lora import merge_lora_checkpoint
    from megatron_nvembed.data.tokenization import tokenize_for_embedding
    from megatron_nvembed.model.build import build_model
    from megatron_nvembed.model.lora import LoRAParallelLinear, apply_lora, has_lora

    tok = build_word_tokenizer(TEXTS)
    src = save_tiny_hf_decoder(tmp_path / "src", tok)
    import_hf(src, tmp_path / "base")
    pg = init_single_process_megatron()
    cfg = read_config(tmp_path / "base")
    model = build_model(cfg, pg)
    load_checkpoint(model, tmp_path / "base")
    apply_lora(model, rank=4, alpha=8.0)
    with torch.no_grad():
        for i, m in enumerate(x for x in model.modules() if isinstance(x, LoRAParallelLinear)):
            m.lora_B.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(i))
    model.eval()
    batch, _ = tokenize_for_embedding(tok, TEXTS, pad_to_multiple_of=None)
    with torch.no_grad():
        ours = model(**batch)

    lora = {"rank": 4, "alpha": 8.0, "dropout": 0.1}
    save_checkpoint(model, cfg, tmp_path / "lora", lora=lora)
    shutil.copytree(tmp_path / "base" / "tokenizer", tmp_path / "lora" / "tokenizer")
    assert read_lora(tmp_path / "lora") == lora

    merged_settings = merge_lora_checkpoint(tmp_path / "lora", tmp_path / "merged")
    assert merged_settings == lora
    assert read_lora(tmp_path / "merged") is None
    assert (tmp_path / "merged" / "tokenizer").is_dir()
    # an existing output is replaced only with overwrite=True (--overwrite), and then whole
    with pytest.raises(ValueError, match=re.escape(f"--save {tmp_path / 'merged'}: exists")):
        merge_lora_checkpoint(tmp_path / "lora", tmp_path / "merged")
    (tmp_path / "merged" / "notes.txt").write_text("stale")
    merge_lora_checkpoint(tmp_path / "lora", tmp_path / "merged", overwrite=True)
    assert not (tmp_path / "merged" / "notes.txt").exists()
    # no temporary or old folder left beside, only the output's released lock (utils.locking)
    assert [p.name for p in tmp_path.glob("*merged.*")] == [".merged.nvembed-lock"]
    assert (tmp_path / ".merged.nvembed-lock").read_text() == ""

    for source in ("merged", "lora"):  # merge-lora output; LoRA checkpoint merged on load
        plain = build_model(read_config(tmp_path / source), pg)
        load_checkpoint(plain, tmp_path / source)
        assert not has_lora(plain)
        plain.eval()
        with torch.no_grad():
            assert (plain(**batch) - ours).abs().max().item() <= 1e-5, source

    export_hf(tmp_path / "lora", tmp_path / "hf", dtype="float32")
    hf = AutoModel.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    assert (hf.encode(TEXTS) - ours).abs().max().item() <= 1e-5

    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "convert_checkpoint.py"),
            "merge-lora",
            "--load",
            str(tmp_path / "base"),
            "--save",
            str(tmp_path / "nothing"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        # a fresh single-process job (this test process's rendezvous port is taken)
        env={
            k: v
            for k, v in os.environ.items()
            if k not in ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK")
        },
    )
    assert proc.returncode == 2 and "lora.json" in proc.stderr
    assert not (tmp_path / "nothing").exists()
