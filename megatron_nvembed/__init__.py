"""megatron_nvembed: train NV-Embed-style text embedding models on Megatron-core."""

__version__ = "0.1.0"
