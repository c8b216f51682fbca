#!/usr/bin/env python3
"""Training entry point (launched by examples/pretrain_nvembed.sh under torchrun).

  python examples/pretrain_nvembed.py --recipe nvembed_mistral_7b_stage1 \
      --pretrained-checkpoint ckpt/mistral-7b-tp2 --tensor-model-parallel-size 2 \
      --train-data 0.5 msmarco.jsonl 0.5 nq.jsonl --save ckpt/stage1 --load ckpt/stage1

Flags: `python examples/pretrain_nvembed.py --help`; recipes: megatron_nvembed/training/recipes.py.
"""

import sys

from megatron_nvembed.training.cli import main

if __name__ == "__main__":
    sys.exit(main())
