"""Base layer: typed model configs, process groups and megatron-core's CPU support, the local
launcher, logging, FLOP counts and hardware peaks, and the loss's per-batch inputs (`LossInputs`,
built by `data/`, read by `loss/`). Imports only `utils/`."""
