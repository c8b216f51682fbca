"""import-hf's head-size flags: they size a new pooling head and are refused where no head is new.

`tools/convert_checkpoint.py import-hf` of a tiny Mistral with `--pooling-num-latents 4
--pooling-num-attention-heads 2 --pooling-head-dim 8` writes a checkpoint whose
`nvembed_config.json` carries those sizes and whose export's latent array has 4 rows; importing that
checkpoint's NV-Embed export again with any of the flags is an error naming the flag (the source
has a head), exit code 2; `--pooling-num-latents` with a mean head is an error naming it.

Run alone: python3 -m pytest -q -n 0 tests/functional/test_import_head_size.py
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_nvembed.testing import build_word_tokenizer, save_tiny_hf_decoder

ROOT = Path(__file__).resolve().parents[2]


def _convert(*args):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.functional
def test_head_size_flags_size_a_new_head_and_are_refused_for_a_source_with_one(tmp_path):
    tokenizer = build_word_tokenizer(["how do plants make food", "the sky is blue"])
    src = save_tiny_hf_decoder(tmp_path / "mistral", tokenizer)
    ckpt = tmp_path / "ckpt"
    size = ["--pooling-num-latents", 4, "--pooling-num-attention-heads", 2]
    proc = _convert("import-hf", "--hf-dir", src, "--save", ckpt, *size, "--pooling-head-dim", 8)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (config,) = ckpt.glob("iter_*/nvembed_config.json")
    pooling = json.loads(config.read_text())["pooling"]
    assert (pooling["type"], pooling["num_latents"], pooling["num_heads"]) == ("latent", 4, 2)
    assert pooling["head_dim"] == 8

    export = tmp_path / "export"
    proc = _convert("export-hf", "--load", ckpt, "--hf-dir", export, "--dtype", "float32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors import safe_open

    (weights,) = export.glob("*.safetensors")
    with safe_open(str(weights), "pt") as f:
        latents = [k for k in f.keys() if k.endswith("latents")]
        assert latents and f.get_slice(latents[0]).get_shape()[0] == 4

    for flag, value in (("--pooling-num-latents", 16), ("--pooling-head-dim", 8)):
        proc = _convert("import-hf", "--hf-dir", export, "--save", tmp_path / "again", flag, value)
        assert proc.returncode == 2
        assert f"error: {flag} {value}: the source already has a 'latent' head" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert not (tmp_path / "again").exists()

    proc = _convert(
        "import-hf", "--hf-dir", src, "--save", tmp_path / "mean", "--pooling", "mean", *size[:2]
    )
    assert proc.returncode == 2
    assert "error: --pooling-num-latents: 'mean' pooling has no such setting" in proc.stderr
