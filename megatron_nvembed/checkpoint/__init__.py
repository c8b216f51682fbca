"""Checkpoints: `store` saves and loads them at any TP/PP (megatron-core distributed
checkpointing, re-saves that never leave the folder without a checkpoint); `safety` checks a
folder holds only data and complete shards before anything is loaded, with `unpickling`'s
allow-listed and weights-only readers."""
