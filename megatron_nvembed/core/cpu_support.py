"""Makes the parts of megatron-core this project uses run on CPU under a gloo process group.

Megatron-core assumes CUDA in a few places that the forward/backward of our model reaches:

* the tensor-parallel RNG tracker (`get_cuda_rng_tracker().add()/fork()`) reads and writes the CUDA
  generator, and activation recompute saves/restores it through `_get_cuda_rng_state` /
  `_set_cuda_rng_state`;
* `RotaryEmbedding.get_emb` and the attention scratch buffer (`GlobalMemoryBuffer`) place tensors on
  `torch.cuda.current_device()`;
* a few paths (pipeline communication, DDP buffers) call `torch.cuda.synchronize()` or create
  tensors with a literal `device="cuda"`.

`enable_cpu_support()` answers each of these for CPU, and nothing else: it is a no-op when CUDA is
available, so the GPU path is always megatron-core's own. Everything is patched in this one module
so that the differences between the CPU and GPU paths stay in one place.

Sequence parallelism (`--sequence-parallel`) needs nothing more: megatron-core's sequence-parallel
mappings call `all_gather_into_tensor` and `reduce_scatter_tensor`, which gloo implements (torch
2.13), and their scratch buffer follows the `current_device` answer below onto the CPU.

What remains CUDA-only in megatron-core (and so is replaced elsewhere on CPU, never here): gradient
clipping (`clip_grad_by_total_norm_fp32` asserts CUDA tensors) and the `DistributedOptimizer`.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
from torch.overrides import TorchFunctionMode

_ENABLED = False
_CPU = torch.device("cpu")


def cpu_mode() -> bool:
    """True when this process runs the model on CPU (no CUDA device available)."""
    return not torch.cuda.is_available()


class _CudaDeviceToCpu(TorchFunctionMode):
    """Rewrites a CUDA `device=` keyword of any torch call to the CPU.

    Megatron-core allocates some buffers with a literal `device="cuda"`; under this mode those land
    on the CPU. Only the `device` keyword is touched; tensors already created are unaffected.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # megatron-core's optimizers check `param.type() == "torch.cuda.FloatTensor"`;
            # answer as a CUDA tensor of the same dtype would.
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if ".cuda." not in name else name
        if func is torch.Tensor.cuda:
            return args[0]  # `tensor.cuda()` before a collective: stay on the CPU
        device = kwargs.get("device")
        if device is not None:
            dev = torch.device(device) if not isinstance(device, torch.device) else device
            if dev.type == "cuda":
                kwargs = dict(kwargs, device=_CPU)
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_allocations_on_cpu():
    """Context manager: megatron-core calls that allocate with `device="cuda"` allocate on CPU.

    Used around the few megatron-core entry points that need it (DDP buffer creation, pipeline
    communication); a no-op when CUDA is available.
    """
    if not cpu_mode():
        yield
        return
    with _CudaDeviceToCpu():
        yield


def _install_cpu_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mcore_random

    class CpuRNGStatesTracker(mcore_random.CudaRNGStatesTracker):
        """The model-parallel RNG tracker, keeping CPU generator states instead of CUDA ones."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise ValueError(f"RNG seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise ValueError(f"RNG state {name} already exists")
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name=mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise KeyError(f"RNG state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    mcore_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # Activation recompute saves and restores "the CUDA generator"; on CPU the CPU generator is the
    # one dropout draws from, and it is already saved separately, so these become cheap stand-ins.
    mcore_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda *a, **k: None


def enable_cpu_support() -> bool:
    """Patches megatron-core's CUDA assumptions for CPU runs. Idempotent.

    Returns:
        True if CPU support is active (no CUDA), False if CUDA is available and nothing was changed.
    """
    global _ENABLED
    if not cpu_mode():
        return False
    if _ENABLED:
        return True
    # Megatron-core places RoPE frequencies and its attention scratch buffer on
    # `torch.cuda.current_device()`; answering "cpu" keeps them on the CPU.
    torch.cuda.current_device = functools.wraps(torch.cuda.current_device)(lambda: _CPU)
    torch.cuda.synchronize = lambda *a, **k: None
    # Megatron-core warns on every sequence-parallel layer unless this CUDA stream setting is 1
    # (the launcher sets it on GPUs); CPU runs have no CUDA streams for it to order.
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    _install_cpu_rng_tracker()
    _ENABLED = True
    return True


def model_parallel_seed(seed: int, tp_rank: int) -> None:
    """Seeds the default generator and megatron-core's tensor-parallel RNG tracker.

    On CUDA this is megatron-core's `model_parallel_cuda_manual_seed`; on CPU the same three
    named states (data-parallel, tensor-parallel, expert) are kept for the CPU generator.
    """
    from megatron.core import tensor_parallel

    torch.manual_seed(seed)
    if cpu_mode():
        enable_cpu_support()
    tensor_parallel.model_parallel_cuda_manual_seed(seed, tp_rank=tp_rank, ep_rank=0, etp_rank=0)
