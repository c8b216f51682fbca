"""Training: recipes, the command line, the loop (DDP, distributed optimizer, GradCache, LoRA),
training checkpoints with exact resume, in-training validation."""

from megatron_nvembed.training.config import LoRAConfig, TrainingConfig
from megatron_nvembed.training.recipes import RECIPES, get_recipe

__all__ = ["RECIPES", "LoRAConfig", "TrainingConfig", "get_recipe"]
