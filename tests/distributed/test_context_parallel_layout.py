"""The CPU-testable parts of `--context-parallel-size` (the attention itself is Transformer
Engine's: tests/gpu/test_context_parallel.py).

- `cp_token_positions`: the CP ranks' positions partition every padded text, and for one text they
  are exactly the tokens megatron-core's own `get_batch_on_this_cp_rank` gives each rank.
- `gather_context_parallel` (2 gloo processes): every rank gets the whole stream back in order;
  the backward returns this rank's positions of the gradient times CP.
- Refusals: CP with the sdpa or local backend is refused naming the backend and the flag, in the
  config and when the model is built with `--attention-backend auto` on a machine without TE.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_nvembed.model.context_parallel import cp_layout, cp_token_positions
from megatron_nvembed.testing import run_distributed


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_cp_positions_partition_each_text_as_megatron_core_splits_one(cp, monkeypatch):
    from megatron.core import utils as mcore_utils

    # megatron-core's split reads the group's size and rank only once torch.distributed is up
    monkeypatch.setattr(dist, "is_initialized", lambda: True)

    lengths = torch.tensor([5, 17, 1, 8])
    text = torch.repeat_interleave(torch.arange(4), lengths)
    pos = torch.cat([torch.arange(n) for n in lengths.tolist()])
    layout = cp_layout(lengths, text, pos, cp, 2 * cp)
    padded = (layout.cu_seqlens_padded[1:] - layout.cu_seqlens_padded[:-1]).tolist()
    assert all(p % (2 * cp) == 0 and p >= n for p, n in zip(padded, lengths.tolist()))
    every = torch.cat(layout.ranks).sort().values
    assert torch.equal(every, torch.arange(layout.total))  # a partition of the stream
    assert all(r.numel() == layout.total // cp for r in layout.ranks)
    # the real tokens sit at the start of each padded text, in order
    starts = layout.cu_seqlens_padded[:-1].long()
    assert torch.equal(layout.real, starts[text] + pos)
    # one text: the positions are megatron-core's own split of a sequence over CP ranks
    seq = torch.arange(24)[None]
    for rank in range(cp):
        group = _FakeGroup(cp, rank)
        want = mcore_utils.get_batch_on_this_cp_rank({"tokens": seq.clone()}, cp_group=group)
        got = cp_token_positions(torch.tensor([0, 24], dtype=torch.int32), cp, rank)
        assert torch.equal(got, want["tokens"][0]), rank


class _FakeGroup:
    """The size and rank that megatron-core's split asks a process group for."""

    def __init__(self, size, rank):
        self._size, self._rank = size, rank

    def size(self):
        return self._size

    def rank(self):
        return self._rank


def test_cp_positions_refuse_a_length_that_does_not_split():
    with pytest.raises(ValueError, match="--context-parallel-size"):
        cp_token_positions(torch.tensor([0, 6], dtype=torch.int32), 2, 0)


def _gather_worker(rank, world):
    from megatron_nvembed.model.context_parallel import gather_context_parallel

    lengths = torch.tensor([3, 9])
    text = torch.repeat_interleave(torch.arange(2), lengths)
    pos = torch.cat([torch.arange(n) for n in lengths.tolist()])
    layout = cp_layout(lengths, text, pos, world, 2 * world)
    full = torch.randn(layout.total, 1, 4, generator=torch.Generator().manual_seed(3))
    local = full[layout.ranks[rank]].clone().requires_grad_(True)
    got = gather_context_parallel(local, layout, dist.group.WORLD)
    assert torch.equal(got, full), f"rank {rank}: gathered stream differs"
    weight = torch.randn(layout.total, 1, 4, generator=torch.Generator().manual_seed(4))
    (got * weight).sum().backward()
    assert torch.equal(local.grad, weight[layout.ranks[rank]] * world), rank


@pytest.mark.distributed
def test_gather_context_parallel_returns_the_stream_and_scales_the_gradient():
    run_distributed(_gather_worker, 2)


def test_context_parallel_on_sdpa_or_local_is_refused_naming_the_backend():
    from megatron_nvembed.testing import tiny_model_config

    for backend in ("sdpa", "local"):
        cfg = tiny_model_config(backend=backend)
        cfg.parallel.context_parallel_size = 2
        with pytest.raises(
            ValueError, match=f"Transformer Engine.*--attention-backend is {backend}"
        ):
            cfg.validate()


def _auto_worker(rank, world):
    from megatron_nvembed.core.parallel import initialize_model_parallel
    from megatron_nvembed.model.build import build_model
    from megatron_nvembed.testing import tiny_model_config

    pg = initialize_model_parallel(1, 1, context_parallel_size=2)
    assert pg.cp.size() == 2
    cfg = tiny_model_config(backend="auto")
    cfg.parallel.context_parallel_size = 2
    with pytest.raises(ValueError, match="needs the Transformer Engine backend.*is sdpa"):
        build_model(cfg, pg)


@pytest.mark.distributed
@pytest.mark.skipif(torch.cuda.is_available(), reason="auto resolves to sdpa without CUDA only")
def test_context_parallel_with_auto_backend_without_te_is_refused_at_build():
    run_distributed(_auto_worker, 2)
