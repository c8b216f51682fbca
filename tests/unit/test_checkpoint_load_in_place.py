"""A parameter saved as halves (megatron-core's SwiGLU factory) loads into itself, not into a
concatenated copy: the merge returns the parameter when the loaded halves are exactly its
consecutive parts, and otherwise concatenates as megatron-core does.

Run alone: pytest tests/unit/test_checkpoint_load_in_place.py
"""

import torch

from megatron_nvembed.checkpoint.streaming import parameter_if_parts


def test_consecutive_halves_of_the_parameter_merge_into_the_parameter_itself():
    param = torch.arange(24.0).reshape(6, 4)
    merge = parameter_if_parts(torch.cat, param)
    halves = list(torch.chunk(param, 2))
    assert merge(halves) is param


def test_anything_else_is_concatenated():
    param = torch.arange(24.0).reshape(6, 4)
    merge = parameter_if_parts(torch.cat, param)
    first, second = torch.chunk(param, 2)
    swapped = merge([second, first])  # not in the parameter's order
    assert swapped is not param and torch.equal(swapped, torch.cat([second, first]))
    copies = merge([first.clone(), second.clone()])  # loaded elsewhere
    assert copies is not param and torch.equal(copies, param)
    part = merge([first])  # not the whole parameter
    assert part is not param and torch.equal(part, first)
