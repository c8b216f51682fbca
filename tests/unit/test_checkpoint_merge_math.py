"""The per-tensor merge math of `megatron_nvembed.conversion.merge` against plain torch.

Proves:
- `linear_merge` equals sum_i w_i theta_i computed in float64 in the test (fp32 inputs: max abs
  difference <= 1e-6), keeps dtype and shape, and `normalise_weights` divides by the sum,
  defaults to equal weights and refuses (naming `--weights`) a wrong count, NaN / inf, negative
  weights and a zero sum;
- `slerp` equals sin((1-t)Omega)/sin Omega a + sin(t Omega)/sin Omega b with Omega from
  `torch.acos` of the cosine in float64 (fp32: <= 1e-6; float64 inputs: <= 1e-12), at several t
  and angles; t = 0 / 1 give the ends; unit vectors stay unit; the ends' norms do not matter to
  the direction;
- colinear tensors (parallel, scaled, opposite, identical), tensors closer than the stated
  threshold and all-zero tensors fall back to (1-t) a + t b; a bf16 tensor comes back bf16;
- `check_slerp_t` refuses t outside [0, 1] or not finite, naming `--slerp-t`.

Run alone: pytest tests/unit/test_checkpoint_merge_math.py (about a second).
"""

import math

import pytest
import torch

from megatron_nvembed.conversion.merge import (
    COLINEAR_SIN,
    check_slerp_t,
    linear_merge,
    normalise_weights,
    slerp,
)


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _reference_slerp(a, b, t):
    """Slerp through the explicit angle: acos of the cosine, all in float64."""
    x, y = a.reshape(-1).double(), b.reshape(-1).double()
    cos = torch.clamp(torch.dot(x, y) / (x.norm() * y.norm()), -1.0, 1.0)
    omega = torch.acos(cos)
    s = torch.sin(omega)
    out = torch.sin((1 - t) * omega) / s * x + torch.sin(t * omega) / s * y
    return out.reshape(a.shape)


def test_linear_merge_equals_the_float64_weighted_sum():
    tensors = [_randn(7, 5, seed=i) for i in range(3)]
    weights = normalise_weights([1.0, 2.0, 5.0], 3)
    assert weights == pytest.approx([1 / 8, 2 / 8, 5 / 8], abs=1e-15)
    want = sum(w * t.double() for w, t in zip(weights, tensors))
    got = linear_merge(tensors, weights)
    assert got.dtype == torch.float32 and got.shape == (7, 5)
    assert (got.double() - want).abs().max().item() <= 1e-6
    # equal weights by default: the plain mean
    mean = linear_merge(tensors, normalise_weights(None, 3))
    assert (mean.double() - torch.stack(tensors).double().mean(0)).abs().max().item() <= 1e-6
    # bf16 parameters are summed in float32 and come back bf16
    low = [t.bfloat16() for t in tensors]
    got_bf16 = linear_merge(low, weights)
    want_bf16 = sum(w * t.double() for w, t in zip(weights, low)).bfloat16()
    assert got_bf16.dtype == torch.bfloat16
    assert (got_bf16.double() - want_bf16.double()).abs().max().item() <= 1e-2  # 1 bf16 ulp


@pytest.mark.parametrize(
    "weights, words",
    [
        ([1.0], "--weights: 1 weight for 2 --load checkpoints"),
        ([1.0, 2.0, 3.0], "--weights: 3 weights for 2 --load checkpoints"),
        ([1.0, float("nan")], "--weights: weight 2 is nan; every weight must be finite"),
        ([float("inf"), 1.0], "--weights: weight 1 is inf; every weight must be finite"),
        ([1.0, -0.5], "--weights: weight 2 is -0.5; weights must be >= 0"),
        ([0.0, 0.0], "--weights: the weights sum to 0"),
    ],
)
def test_weights_are_validated_naming_the_flag(weights, words):
    with pytest.raises(ValueError) as err:
        normalise_weights(weights, 2)
    assert words in str(err.value)


@pytest.mark.parametrize("t", [0.0, 0.1, 0.3, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("angle_seed", [0, 1, 2])
def test_slerp_matches_the_explicit_angle_formula(t, angle_seed):
    a = _randn(16, 12, seed=10 + angle_seed)
    # b: a mixed with an independent draw, so the angles differ from seed to seed
    mix = [0.2, 1.0, 5.0][angle_seed]
    b = 1.7 * (a + mix * _randn(16, 12, seed=20 + angle_seed))
    got = slerp(a, b, t)
    assert got.dtype == a.dtype and got.shape == a.shape
    assert (got.double() - _reference_slerp(a, b, t)).abs().max().item() <= 1e-6
    got64 = slerp(a.double(), b.double(), t)
    assert (got64 - _reference_slerp(a, b, t)).abs().max().item() <= 1e-12


def test_slerp_ends_and_unit_sphere():
    a, b = _randn(40, seed=1), _randn(40, seed=2)
    assert (slerp(a, b, 0.0) - a).abs().max().item() <= 1e-6
    assert (slerp(a, b, 1.0) - b).abs().max().item() <= 1e-6
    ua, ub = a.double() / a.double().norm(), b.double() / b.double().norm()
    for t in (0.25, 0.5, 0.75):
        mid = slerp(ua, ub, t)
        assert abs(mid.norm().item() - 1.0) <= 1e-12  # stays on the sphere, unlike lerp
        # equal angular steps: the angle to a is t * Omega
        omega = torch.acos(torch.dot(ua, ub)).item()
        assert abs(torch.acos(torch.dot(ua, mid).clamp(-1, 1)).item() - t * omega) <= 1e-7
    assert abs(((1 - 0.5) * ua + 0.5 * ub).norm().item() - 1.0) > 1e-3  # what lerp would do


@pytest.mark.parametrize(
    "make_b",
    [
        lambda a: a.clone(),  # identical
        lambda a: 2.5 * a,  # parallel, another norm
        lambda a: -0.5 * a,  # opposite
        lambda a: torch.zeros_like(a),  # all zeros
    ],
    ids=["identical", "parallel", "opposite", "zeros"],
)
def test_colinear_tensors_fall_back_to_linear_interpolation(make_b):
    a = _randn(8, 8, seed=3)
    b = make_b(a)
    for t in (0.0, 0.3, 1.0):
        want = (1 - t) * a.double() + t * b.double()
        assert (slerp(a, b, t).double() - want).abs().max().item() <= 1e-6
    zero = torch.zeros(8, 8)
    assert torch.equal(slerp(zero, zero, 0.4), zero)


def test_the_colinear_threshold():
    # two unit vectors at an angle below and above the threshold (sin Omega vs COLINEAR_SIN)
    x = torch.zeros(3, dtype=torch.float64)
    x[0] = 1.0
    t = 0.3
    for omega, linear in ((0.5 * COLINEAR_SIN, True), (50 * COLINEAR_SIN, False), (1.0, False)):
        y = torch.tensor([math.cos(omega), math.sin(omega), 0.0], dtype=torch.float64)
        got = slerp(x, y, t)
        lerp = (1 - t) * x + t * y
        sl = torch.tensor([math.cos(t * omega), math.sin(t * omega), 0.0], dtype=torch.float64)
        assert (got - (lerp if linear else sl)).abs().max().item() <= 1e-15
    # near the threshold the two agree to ~Omega^2: the fallback changes nothing measurable
    y = torch.tensor([math.cos(2e-6), math.sin(2e-6), 0.0], dtype=torch.float64)
    assert (slerp(x, y, t) - ((1 - t) * x + t * y)).abs().max().item() <= 1e-12


def test_slerp_in_bf16_returns_bf16():
    a, b = _randn(64, seed=5).bfloat16(), _randn(64, seed=6).bfloat16()
    got = slerp(a, b, 0.3)
    assert got.dtype == torch.bfloat16
    want = _reference_slerp(a, b, 0.3).bfloat16()
    assert (got.double() - want.double()).abs().max().item() <= 1e-2  # 1 bf16 ulp


@pytest.mark.parametrize("t", [-0.1, 1.5, float("nan"), float("inf")])
def test_slerp_t_outside_the_unit_interval_is_refused(t):
    with pytest.raises(ValueError, match="--slerp-t must be a number in"):
        check_slerp_t(t)
    assert check_slerp_t(0) == 0.0 and check_slerp_t(1) == 1.0
