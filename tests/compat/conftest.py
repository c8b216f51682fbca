"""Fixtures of the compatibility tests: the external artifacts they run against.

- `NVEMBED_REFERENCE_PYTHON`: a Python with transformers 4.42.4 / tokenizers 0.19.1 (what
  NV-Embed's released code imports under); `tests/install_and_run.sh` builds it in `.venv-ref/`.
- `NVEMBED_OFFICIAL_CODE`: the folder holding NVIDIA's released `modeling_nvembed.py` and
  `configuration_nvembed.py` (`.ci/run` points it at shared/reference/nvembed_official).
- The real Mistral-7B tokenizer: the SentencePiece model shipped in the PyPI package
  mistral-common (`mistral_common/data/tokenizer.model.v1`), turned into the model repository's
  tokenizer folder by transformers 4.42's own converter (see reference_client.py), with the
  repository's tokenizer settings (BOS on, EOS off, legacy true). What establishes that this is
  the tokenizer NV-Embed's users run: its `tokenizer.json` has the repository's structure
  (normaliser Prepend "▁" + Replace " " -> "▁", no pre-tokeniser, BOS template, byte fallback),
  and `test_token_ids_and_pool_masks_equal_nvidia_and_sentencepiece` checks that NV-Embed's own
  `encode` over it gives SentencePiece's own ids of the same model file on all 320 texts.

Without them the tests skip, saying which is missing; under CI (CI=true) they fail instead, so a
CI run can never pass without running them.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _require(what: str) -> None:
    message = f"compatibility test needs {what}"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message + " (CI=true: tests/install_and_run.sh and .ci/run provide it)")
    pytest.skip(message + " (bash tests/install_and_run.sh provides it)")


def reference_env(tmp: Path) -> dict:
    """Environment of a reference-client subprocess: offline, its own module cache."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    }
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp / "hf_home"), TOKENIZERS_PARALLELISM="false")
    return env


@pytest.fixture(scope="session")
def reference_python() -> str:
    path = os.environ.get("NVEMBED_REFERENCE_PYTHON")
    if not path or not Path(path).is_file():
        _require("NVEMBED_REFERENCE_PYTHON (a venv with transformers 4.42.4)")
    return path


@pytest.fixture(scope="session")
def official_code() -> Path:
    path = os.environ.get("NVEMBED_OFFICIAL_CODE")
    if not path or not (Path(path) / "modeling_nvembed.py").is_file():
        _require("NVEMBED_OFFICIAL_CODE (NVIDIA's released NV-Embed-v2 model files)")
    return Path(path)


@pytest.fixture(scope="session")
def mistral_tokenizer(reference_python, tmp_path_factory) -> Path:
    """Mistral-7B-v0.1's tokenizer folder (see the module docstring)."""
    try:
        from importlib.resources import files

        spm = files("mistral_common") / "data" / "tokenizer.model.v1"
    except ModuleNotFoundError:
        _require("the PyPI package mistral-common (the test extra installs it)")
    if not spm.is_file():
        _require(f"{spm} (mistral-common ships Mistral-7B-v0.1's SentencePiece model there)")
    out = tmp_path_factory.mktemp("mistral") / "tokenizer"
    proc = subprocess.run(
        [
            reference_python,
            str(HERE / "reference_client.py"),
            "build-tokenizer",
            str(spm),
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=reference_env(out.parent),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out
