"""Merging checkpoints of one model: weighted linear average or spherical interpolation (slerp).

The math works per parameter tensor, on the full (unsharded) tensor:
- linear: theta = sum_i w_i theta_i, with the `--weights` divided by their sum (each weight
  finite and >= 0, the sum > 0); accumulated in float32 (float64 for float64 tensors) and cast
  back to the parameter's dtype.
- slerp (two checkpoints, factor t in [0, 1]): with a, b the flattened tensors and Omega the
  angle between them, theta = sin((1-t) Omega) / sin Omega * a + sin(t Omega) / sin Omega * b,
  computed in float64 (Omega = 2 atan2(|a^ - b^|, |a^ + b^|) with a^, b^ the unit vectors,
  accurate at every angle). Where the tensors are (nearly) colinear, sin Omega < `COLINEAR_SIN`
  (parallel or opposite), or either is all zeros, the angle says nothing and the result is the
  linear interpolation (1-t) a + t b.

`merge_checkpoints` runs the whole merge in one process with megatron-core's parallel state at
TP = PP = 1 (the CLI, `tools/merge_checkpoints.py`, sets it up): every input is checked first
(`check_merge`: paths, configs, LoRA settings, weights; nothing is read but config files and
checkpoint metadata), then loaded one after the other into one model (any saved TP/PP layout
is resharded on load) and folded into a running result, so memory holds the model plus one
accumulator, whatever the number of inputs. The output is written beside and swapped in, like
every conversion output (`fileio.atomic_dir`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_nvembed.checkpoint.store import (
    CONFIG_FILE,
    LORA_FILE,
    TOKENIZER_DIR,
    TOKENIZER_FILES,
    TRACKER,
    is_checkpoint_dir,
    iteration_dir,
    latest_iteration,
    read_config,
    read_lora,
    store_tokenizer,
    tokenizer_dir,
)
from megatron_nvembed.core.config import EmbeddingModelConfig, ParallelConfig
from megatron_nvembed.core.logging_utils import get_logger
from megatron_nvembed.utils.fileio import atomic_dir, check_output_dir
from megatron_nvembed.utils.locking import output_lock

logger = get_logger(__name__)

METHODS = ("linear", "slerp")
# sin(Omega) below this: the two tensors are treated as colinear and interpolated linearly. At
# that angle slerp and linear interpolation differ by about Omega^2 / 6 ~ 2e-13 (relative).
COLINEAR_SIN = 1e-6
DEFAULT_SLERP_T = 0.5


# --------------------------------------------------------------------------------------------
# The math, per tensor


def normalise_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """The linear merge's weights, divided by their sum (None: equal weights).

    Raises:
        ValueError naming `--weights`: not one weight per input, a weight that is not finite or
            is negative, or weights that sum to 0.
    """
    if weights is None:
        return [1.0 / count] * count
    weights = [float(w) for w in weights]
    if len(weights) != count:
        raise ValueError(
            f"--weights: {len(weights)} weight{'s' if len(weights) != 1 else ''} for {count} "
            "--load checkpoints; give one weight per checkpoint, in the same order"
        )
    for i, w in enumerate(weights):
        if not math.isfinite(w):
            raise ValueError(f"--weights: weight {i + 1} is {w}; every weight must be finite")
        if w < 0:
            raise ValueError(
                f"--weights: weight {i + 1} is {w}; weights must be >= 0 (they are divided by "
                "their sum)"
            )
    total = math.fsum(weights)
    if total <= 0:
        raise ValueError("--weights: the weights sum to 0; at least one must be > 0")
    return [w / total for w in weights]


def check_slerp_t(t: float) -> float:
    """Raises ValueError naming `--slerp-t` unless `t` is a finite number in [0, 1]."""
    t = float(t)
    if not (math.isfinite(t) and 0.0 <= t <= 1.0):
        raise ValueError(f"--slerp-t must be a number in [0, 1], got {t}")
    return t


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def accumulate(acc: torch.Tensor | None, tensor: torch.Tensor, weight: float) -> torch.Tensor:
    """acc + weight * tensor, in float32 (float64 for float64 tensors); `acc` None starts it."""
    term = tensor.detach().to(_accumulation_dtype(tensor.dtype))
    if acc is None:
        return term * weight
    if acc.shape != tensor.shape:
        raise ValueError(f"shape {tuple(tensor.shape)} does not match {tuple(acc.shape)}")
    return acc.add_(term, alpha=weight)


def linear_merge(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_i weights[i] * tensors[i] (weights used as given), in the first tensor's dtype."""
    if len(tensors) != len(weights) or not tensors:
        raise ValueError(f"{len(tensors)} tensors for {len(weights)} weights")
    acc = None
    for tensor, weight in zip(tensors, weights):
        acc = accumulate(acc, tensor, weight)
    return acc.to(tensors[0].dtype)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical linear interpolation from `a` (t = 0) to `b` (t = 1) of the flattened tensors,
    in float64, returned in `a`'s dtype and shape; linear interpolation where they are colinear
    (sin Omega < `COLINEAR_SIN`) or either is all zeros."""
    if a.shape != b.shape:
        raise ValueError(f"shape {tuple(b.shape)} does not match {tuple(a.shape)}")
    x = a.detach().reshape(-1).to(torch.float64)
    y = b.detach().reshape(-1).to(torch.float64)
    nx, ny = torch.linalg.vector_norm(x), torch.linalg.vector_norm(y)
    ca, cb = 1.0 - t, t
    if nx > 0 and ny > 0:
        ux, uy = x / nx, y / ny
        omega = 2.0 * math.atan2(
            torch.linalg.vector_norm(ux - uy).item(), torch.linalg.vector_norm(ux + uy).item()
        )
        sin_omega = math.sin(omega)
        if sin_omega >= COLINEAR_SIN:
            ca = math.sin((1.0 - t) * omega) / sin_omega
            cb = math.sin(t * omega) / sin_omega
    return (ca * x + cb * y).reshape(a.shape).to(a.dtype)


# --------------------------------------------------------------------------------------------
# Checkpoints


@dataclass
class MergePlan:
    """What `check_merge` found: the inputs and output as given, the iteration of each input
    that was checked (and is merged), the resolved output folder, the model config and LoRA
    settings of the first input, and the method's factors."""

    loads: list[Path]
    iterations: list[int]
    save: Path
    final: Path
    method: str
    weights: list[float]  # linear: normalised weights; slerp: (1 - t, t)
    slerp_t: float | None
    cfg: EmbeddingModelConfig
    lora: dict | None


def _check_input(path: Path) -> None:
    if not path.is_dir():
        what = "is not a folder" if path.exists() else "does not exist"
        raise FileNotFoundError(f"--load {path}: {what}")
    if not is_checkpoint_dir(path):
        raise FileNotFoundError(f"--load {path}: not a megatron_nvembed checkpoint (no {TRACKER})")


def _first_difference(first: dict, other: dict) -> tuple[str, object, object] | None:
    """The first field (in config order) where two `to_dict()` configs differ, parallel layout
    left out: (section.field, value in `first`, value in `other`)."""
    for section in first:
        if section == "parallel":
            continue
        a, b = first[section], other.get(section, {})
        for key in list(a) + [k for k in b if k not in a]:
            if a.get(key) != b.get(key):
                return f"{section}.{key}", a.get(key), b.get(key)
    return None


def check_merge(
    loads: Sequence[str | os.PathLike],
    save: str | os.PathLike,
    *,
    method: str = "linear",
    weights: Sequence[float] | None = None,
    slerp_t: float | None = None,
    overwrite: bool = False,
) -> MergePlan:
    """Checks a merge before any weight is read (the CLI runs it before setting up megatron-core;
    `merge_checkpoints` runs it again).

    Reads the inputs' tracker, config and LoRA files only.

    Raises:
        FileNotFoundError / ValueError, naming the flag and path: fewer than 2 `--load`s; an
            input that is missing or no checkpoint; a config that differs from the first input's
            in anything but the parallel layout (the first differing field and both values);
            LoRA adapters in some inputs only, or of another rank / alpha; an unknown method;
            `--weights` with slerp or of the wrong count / values; `--slerp-t` with linear or
            outside [0, 1]; slerp with other than 2 inputs; an output refused by
            `check_output_dir` (non-empty without `overwrite`, an input, inside one or holding
            one).
    """
    loads = [Path(p) for p in loads]
    if len(loads) < 2:
        raise ValueError(f"--load: give at least 2 checkpoints to merge, got {len(loads)}")
    if method not in METHODS:
        raise ValueError(f"--method must be one of {METHODS}, got {method!r}")
    if method == "linear":
        if slerp_t is not None:
            raise ValueError("--slerp-t applies to --method slerp only; linear takes --weights")
        factors = normalise_weights(weights, len(loads))
    else:
        if len(loads) != 2:
            raise ValueError(
                f"--method slerp interpolates exactly 2 checkpoints, got {len(loads)} --load"
            )
        if weights is not None:
            raise ValueError(
                "--weights applies to --method linear only; slerp takes --slerp-t (the position "
                "between the first --load, t = 0, and the second, t = 1)"
            )
        slerp_t = check_slerp_t(DEFAULT_SLERP_T if slerp_t is None else slerp_t)
        factors = [1.0 - slerp_t, slerp_t]
    final = check_output_dir(save, "--save", [("--load", p) for p in loads], overwrite=overwrite)
    for path in loads:
        _check_input(path)
    iterations = [latest_iteration(path) for path in loads]
    cfg = read_config(loads[0], iterations[0])
    first = cfg.to_dict()
    lora = read_lora(loads[0], iterations[0])
    first_lora = iteration_dir(loads[0], iterations[0]) / LORA_FILE
    for path, it in zip(loads[1:], iterations[1:]):
        diff = _first_difference(first, read_config(path, it).to_dict())
        if diff is not None:
            field, mine, theirs = diff
            raise ValueError(
                f"--load {path}: {field} is {theirs!r} in {iteration_dir(path, it) / CONFIG_FILE} "
                f"but {mine!r} in the first --load {loads[0]}; only checkpoints of the same "
                "model merge (they may differ in their parallel layout only)"
            )
        other = read_lora(path, it)
        if (lora is None) != (other is None):
            with_, without = (loads[0], path) if other is None else (path, loads[0])
            raise ValueError(
                f"--load {path}: {with_} holds LoRA adapters ({LORA_FILE}) and {without} does "
                "not; merge-lora the LoRA checkpoint first (tools/convert_checkpoint.py "
                "merge-lora) and merge full weights"
            )
        if lora is not None:
            for key in ("rank", "alpha"):
                if lora[key] != other[key]:
                    raise ValueError(
                        f"--load {path}: LoRA {key} is {other[key]!r} in "
                        f"{iteration_dir(path, it) / LORA_FILE} but {lora[key]!r} in "
                        f"{first_lora}; only adapters of the same rank and alpha merge "
                        "(merge-lora each checkpoint first to merge full weights)"
                    )
    return MergePlan(
        loads=loads,
        iterations=iterations,
        save=Path(save),
        final=final,
        method=method,
        weights=factors,
        slerp_t=slerp_t if method == "slerp" else None,
        cfg=cfg,
        lora=lora,
    )


def _tokenizer_differs(first: Path, other: Path) -> bool:
    for name in TOKENIZER_FILES:
        a, b = first / TOKENIZER_DIR / name, other / TOKENIZER_DIR / name
        if a.is_file() != b.is_file() or (a.is_file() and a.read_bytes() != b.read_bytes()):
            return True
    return False


def _check_input_files(plan: MergePlan) -> None:
    """Every input's checkpoint files checked safe to load (`verify_checkpoint_folder`) before
    any weight is read; a warning for each input whose tokenizer files differ from the first's."""
    from megatron_nvembed.checkpoint.safety import verify_checkpoint_folder

    for path, it in zip(plan.loads, plan.iterations):
        verify_checkpoint_folder(iteration_dir(path, it))
        if (path / TOKENIZER_DIR).exists() or (path / TOKENIZER_DIR).is_symlink():
            tokenizer_dir(path)  # inside the checkpoint, its files as written
    for path in plan.loads[1:]:
        if _tokenizer_differs(plan.loads[0], path):
            logger.warning(
                "the tokenizer files of %s differ from those of %s; the output gets the first's",
                path,
                plan.loads[0],
            )


def _fold_inputs(model: torch.nn.Module, plan: MergePlan) -> int:
    """Loads each input into `model` in turn and folds it into the result, which `model` holds
    at the end (linear: the weighted sum; slerp: the interpolation). Returns the number of
    parameter tensors merged."""
    from megatron_nvembed.checkpoint.store import load_checkpoint

    params = dict(model.named_parameters())
    held: dict[str, torch.Tensor] = {}  # linear: the running sum; slerp: the first input
    for i, (path, it, weight) in enumerate(zip(plan.loads, plan.iterations, plan.weights)):
        load_checkpoint(model, path, it, merge_adapters=False, verified=True)  # up front
        saved = read_config(path, it).parallel
        logger.info(
            "loaded %d/%d: %s (iteration %d, saved at TP=%d PP=%d, weight %.6g)",
            i + 1,
            len(plan.loads),
            path,
            it,
            saved.tensor_model_parallel_size,
            saved.pipeline_model_parallel_size,
            weight,
        )
        with torch.no_grad():
            for name, p in params.items():
                if plan.method == "linear":
                    held[name] = accumulate(held.get(name), p, weight)
                elif i == 0:
                    held[name] = p.detach().clone()
                else:
                    p.copy_(slerp(held.pop(name), p, plan.slerp_t))
    if plan.method == "linear":
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(held.pop(name).to(p.dtype))
    return len(params)


def _write_merged(model: torch.nn.Module, plan: MergePlan, overwrite: bool) -> None:
    """Saves the merged `model` (iteration 0, the first input's LoRA settings) with the first
    input's tokenizer files beside `plan.final`, then swaps it in."""
    from megatron_nvembed.checkpoint.store import save_checkpoint

    size = sum(p.numel() * p.element_size() for p in model.parameters())
    with atomic_dir(plan.final, overwrite=overwrite, flag="--save", size=size) as tmp:
        save_checkpoint(model, plan.cfg, tmp, iteration=0, lora=plan.lora)
        copied = store_tokenizer(plan.loads[0] / TOKENIZER_DIR, tmp / TOKENIZER_DIR)
        if copied == 0:
            (tmp / TOKENIZER_DIR).rmdir()
            logger.warning(
                "%s holds no tokenizer files; the output has none (export-hf needs them)",
                plan.loads[0] / TOKENIZER_DIR,
            )


def _method_summary(plan: MergePlan) -> str:
    """The merge method and its factors, for the log ("slerp t=0.5" / "linear, weights 0.25
    0.75")."""
    if plan.method == "slerp":
        return f"slerp t={plan.slerp_t:g}"
    return "linear, weights " + " ".join(f"{w:.6g}" for w in plan.weights)


def merge_checkpoints(
    loads: Sequence[str | os.PathLike],
    save: str | os.PathLike,
    *,
    method: str = "linear",
    weights: Sequence[float] | None = None,
    slerp_t: float | None = None,
    overwrite: bool = False,
) -> MergePlan:
    """Merges checkpoints of one model into a new checkpoint at `save`.

    Must run in one process with megatron-core's parallel state at TP = PP = 1 (the CLI does
    this); each input may be saved at any TP/PP layout. The output is iteration 0 at TP = PP = 1
    without optimizer state, with the first input's model config and tokenizer files. Inputs
    with LoRA adapters (same rank and alpha) merge as stored, base weights and adapter factors
    alike, and the output keeps the adapters (`lora.json` of the first input).

    Args:
        loads: two or more checkpoint folders.
        save: the output folder; new or empty unless `overwrite` (then replaced whole, swapped
            in once written); never an input, inside one or holding one.
        method: "linear" (weighted average) or "slerp" (exactly 2 inputs).
        weights: linear: one weight per input, divided by their sum (None: equal).
        slerp_t: slerp: the factor t in [0, 1] (None: 0.5); t = 0 gives the first input.

    Returns:
        The checked plan (normalised weights included).

    Raises:
        See `check_merge` (before any weight is read); the loader's errors for a checkpoint
        that does not load (`load_checkpoint`).
    """
    from megatron_nvembed.model.build import build_model
    from megatron_nvembed.model.lora import apply_lora

    plan = check_merge(
        loads, save, method=method, weights=weights, slerp_t=slerp_t, overwrite=overwrite
    )
    _check_input_files(plan)
    # After the checks, before the inputs are read: held until the output is in place.
    with output_lock(plan.final, "--save"):
        start = time.perf_counter()
        plan.cfg.parallel = ParallelConfig(1, 1)
        model = build_model(plan.cfg)
        if plan.lora is not None:
            apply_lora(model, plan.lora["rank"], plan.lora["alpha"], 0.0)
        count = _fold_inputs(model, plan)
        _write_merged(model, plan, overwrite)
        logger.info(
            "merged %d tensors of %d checkpoints (%s%s) into %s in %.1fs",
            count,
            len(plan.loads),
            _method_summary(plan),
            f", LoRA rank {plan.lora['rank']} kept" if plan.lora is not None else "",
            plan.save,
            time.perf_counter() - start,
        )
        return plan
