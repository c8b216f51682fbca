"""Inputs of 8k+ tokens end to end (CPU, tiny models, a word-level tokenizer: one word a token).

- `tools/embed.py --max-length 8192` on texts of 9000, 8000 and 5 words: the embeddings equal the
  exported model's own `encode` (transformers) at the same `max_length` within 1e-5; the
  9000-word text is cut to 8192 tokens (the tool says so), and the other two are not cut.
- `--max-length` above the positions the model was trained for is refused naming the flag and
  the positions, exit 2, before the model loads, for the checkpoint and for its NV-Embed-format
  export; so is `--seq-length` in training.
- Training at `--seq-length 8192` on records whose positives are 9000 words, TP=2 with
  `--sequence-parallel`, `--pack-sequences` and full recompute (2 gloo processes): two steps
  with finite losses, and the model's forward saw 8192-token texts (the longest text of its
  packed layout).

Run alone: pytest tests/functional/test_long_inputs.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_nvembed.testing import (
    build_word_tokenizer,
    init_single_process_megatron,
    run_distributed,
    save_tiny_hf_decoder,
    tiny_training_config,
    write_synthetic_retrieval,
)

ROOT = Path(__file__).resolve().parents[2]
WORDS = [f"w{i}" for i in range(50)]


def _words(n: int, start: int = 0) -> str:
    return " ".join(WORDS[(start + i) % len(WORDS)] for i in range(n))


@pytest.mark.functional
def test_embed_tool_at_8k_tokens_matches_the_export_and_refuses_beyond_positions(tmp_path):
    from transformers import AutoModel

    from megatron_nvembed.conversion.export_hf import export_hf
    from megatron_nvembed.conversion.import_hf import import_hf

    rows = [{"text": _words(9000)}, {"text": _words(8000, 7)}, {"text": _words(5, 3)}]
    tok = build_word_tokenizer(WORDS)
    src = save_tiny_hf_decoder(tmp_path / "src", tok, kind="qwen3")  # 4096 positions
    cfg = json.loads((src / "config.json").read_text())
    cfg["max_position_embeddings"] = 16384
    (src / "config.json").write_text(json.dumps(cfg))
    ckpt = tmp_path / "ckpt"
    import_hf(src, ckpt)
    init_single_process_megatron()
    export_hf(ckpt, tmp_path / "hf", dtype="float32")
    hf = AutoModel.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    with torch.no_grad():
        want = torch.cat([hf.encode([r["text"]], max_length=8192) for r in rows]).numpy()
    assert len(tok(rows[0]["text"])["input_ids"]) > 8192 > len(tok(rows[1]["text"])["input_ids"])

    inp, out = tmp_path / "long.jsonl", tmp_path / "long.npy"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tool = [sys.executable, str(ROOT / "tools" / "embed.py"), "--load", str(ckpt), "--input"]
    proc = subprocess.run(
        [*tool, str(inp), "--output", str(out), "--max-length", "8192", "--batch-size", "2"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 truncated to 8192 tokens" in proc.stdout + proc.stderr
    got = np.load(out)
    assert got.shape == (3, 64) and np.abs(got - want).max() <= 1e-5

    proc = subprocess.run(
        [*tool, str(inp), "--output", str(tmp_path / "x.npy"), "--max-length", "20000"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "--max-length 20000 exceeds the 16384 positions" in proc.stderr
    assert not (tmp_path / "x.npy").exists()
    # the same for the export (NV-Embed format): its text_config carries the positions
    tool[tool.index(str(ckpt))] = str(tmp_path / "hf")
    proc = subprocess.run(
        [*tool, str(inp), "--output", str(tmp_path / "x.npy"), "--max-length", "20000"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "--max-length 20000 exceeds the 16384 positions" in proc.stderr
    assert not (tmp_path / "x.npy").exists()


def _long_records(data: dict, out: Path) -> Path:
    """The synthetic training records with every positive lengthened to 9000 words."""
    lines = Path(data["train"]).read_text().splitlines()
    with out.open("w") as f:
        for line in lines[:8]:
            rec = json.loads(line)
            rec["pos"] = [" ".join([p] * (9000 // max(1, len(p.split())) + 1)) for p in rec["pos"]]
            f.write(json.dumps(rec) + "\n")
    return out


def _train_long_worker(rank, world, data, records):
    from megatron_nvembed.model.nvembed_model import NVEmbedModel, packed_layout
    from megatron_nvembed.training.trainer import train

    longest, original = [], NVEmbedModel.forward

    def recording(self, input_ids, attention_mask, pool_mask=None, segment_ids=None, layout=None):
        seen = layout or (packed_layout(segment_ids) if segment_ids is not None else None)
        longest.append(seen.max_len if seen else int(attention_mask.sum(1).max()))
        return original(self, input_ids, attention_mask, pool_mask, segment_ids, layout)

    NVEmbedModel.forward = recording
    try:
        cfg = tiny_training_config(
            data, train_iters=2, seq_length=8192, pack_sequences=True, sequence_parallel=True,
            global_batch_size=2, micro_batch_size=1, num_negatives=1, train_data=[str(records)],
            **{"model.parallel.tensor_model_parallel_size": 2,
               "model.model.recompute_granularity": "full"},
        )  # fmt: skip
        losses = train(cfg).losses
    finally:
        NVEmbedModel.forward = original
    assert sorted(losses) == [1, 2] and all(np.isfinite(v) for v in losses.values()), losses
    assert max(longest) == 8192, f"rank {rank}: longest text seen {max(longest)}"


@pytest.mark.functional
@pytest.mark.distributed
def test_training_at_8k_tokens_with_sp_packing_and_recompute(tmp_path):
    data = write_synthetic_retrieval(tmp_path / "syn", num_topics=8, train_per_topic=2)
    records = _long_records(data, tmp_path / "long.jsonl")
    run_distributed(_train_long_worker, 2, data, records)


def test_seq_length_beyond_the_positions_is_refused(tmp_path):
    from megatron_nvembed.training.trainer import train

    data = write_synthetic_retrieval(tmp_path / "syn", num_topics=8, train_per_topic=2)
    cfg = tiny_training_config(data, seq_length=40000)
    with pytest.raises(ValueError, match="--seq-length 40000 exceeds the 32768 positions"):
        train(cfg)
