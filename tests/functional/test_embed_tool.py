"""tools/embed.py under torchrun: TP=2 and DP=2 give the exported HF model's embeddings, in order.

A tiny Mistral is imported (TP=1) and exported (fp32); `torchrun --nproc_per_node 2 tools/embed.py`
then embeds a JSONL of queries (with instructions) and documents (without), at TP=2 (resharded on
load) and at DP=2. Each output row must equal `AutoModel(...).encode` of that line within 1e-5.
A malformed input line is an error naming the file and line.

Run alone: pytest tests/functional/test_embed_tool.py
"""

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
    save_tiny_hf_decoder,
)

ROOT = Path(__file__).resolve().parents[2]
INSTRUCTION = "Instruct: Given a question, retrieve passages that answer it\nQuery: "
ROWS = [
    {"text": "how do plants make food", "instruction": INSTRUCTION},
    {"text": "paris is the capital of france"},
    {"text": "why is the sky blue", "instruction": INSTRUCTION},
    {"text": "plants make food from light"},
    {"text": "the sky is blue because air scatters blue light"},
]


def _torchrun(*args):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--standalone",
        str(ROOT / "tools" / "embed.py"),
        *map(str, args),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.mark.functional
def test_embed_tool_matches_exported_model(tmp_path):
    from transformers import AutoModel

    from megatron_nvembed.conversion.convert import export_hf, import_hf

    tok = build_word_tokenizer([r["text"] for r in ROWS] + [INSTRUCTION])
    src = save_tiny_hf_decoder(tmp_path / "src", tok)
    ckpt = tmp_path / "ckpt"
    import_hf(src, ckpt)
    init_single_process_megatron()
    export_hf(ckpt, tmp_path / "hf", dtype="float32")
    hf = AutoModel.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    want = torch.stack(
        [hf.encode([r["text"]], instruction=r.get("instruction", ""))[0] for r in ROWS]
    ).numpy()

    inp = tmp_path / "texts.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    for tp in (2, 1):  # TP=2, then DP=2 (TP=1 on 2 processes)
        out = tmp_path / f"emb_tp{tp}.npy"
        proc = _torchrun(
            "--load",
            ckpt,
            "--input",
            inp,
            "--output",
            out,
            "--tensor-model-parallel-size",
            tp,
            "--batch-size",
            2,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        got = np.load(out)
        assert got.dtype == np.float32 and got.shape == (len(ROWS), 64)
        assert np.abs(got - want).max() <= 1e-5, f"TP={tp}"

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    proc = _torchrun("--load", ckpt, "--input", bad, "--output", tmp_path / "x.npy")
    assert proc.returncode != 0
    assert "bad.jsonl:2" in proc.stderr
    assert not (tmp_path / "x.npy").exists()
