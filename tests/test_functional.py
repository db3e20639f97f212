"""The functional API: gradients (first and second order), equivalences between norms,
numerics with a large mean, and the running-statistics guard."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import normlab
import normlab.functional as F
from normlab import reference as ref


def _params(channels: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(channels, generator=g, dtype=torch.float64) + 1).requires_grad_(True)
    bias = torch.randn(channels, generator=g, dtype=torch.float64).requires_grad_(True)
    return weight, bias


def _input(*shape: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randn(shape, generator=g, dtype=torch.float64).requires_grad_(True)


# name -> (function of (x, weight, bias), input shape, number of affine features)
GRAD_CASES: dict[str, tuple[Callable, tuple[int, ...], int]] = {
    "batch_norm-train": (
        lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True),
        (4, 3, 5),
        3,
    ),
    "batch_norm-train-running": (
        lambda x, w, b: F.batch_norm(
            x, torch.zeros(3, dtype=x.dtype), torch.ones(3, dtype=x.dtype), w, b, training=True
        ),
        (4, 3, 2, 2),
        3,
    ),
    "batch_norm-eval": (
        lambda x, w, b: F.batch_norm(
            x, torch.full((3,), 0.2, dtype=x.dtype), torch.full((3,), 1.5, dtype=x.dtype), w, b
        ),
        (4, 3, 5),
        3,
    ),
    "instance_norm": (lambda x, w, b: F.instance_norm(x, weight=w, bias=b), (2, 3, 6), 3),
    "group_norm": (lambda x, w, b: F.group_norm(x, 2, w, b), (3, 4, 5), 4),
    "layer_norm": (lambda x, w, b: F.layer_norm(x, (6,), w, b), (4, 6), 6),
    "rms_norm": (lambda x, w, b: F.rms_norm(x, (6,), w, eps=1e-5), (4, 6), 6),
}


@pytest.mark.parametrize("name", list(GRAD_CASES))
def test_gradcheck_and_gradgradcheck(name: str, backend: str) -> None:
    fn, shape, features = GRAD_CASES[name]
    weight, bias = _params(features, 1)
    args = (_input(*shape), weight, bias)
    assert gradcheck(fn, args, eps=1e-6, atol=1e-6)
    assert gradgradcheck(fn, args, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("shape", [(4, 6, 5), (3, 6, 2, 3), (2, 6)])
def test_group_norm_extremes_equal_layer_and_instance_norm(shape: tuple[int, ...]) -> None:
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(F.group_norm(x, 1), F.layer_norm(x, shape[1:]))
    if len(shape) > 2:
        torch.testing.assert_close(F.group_norm(x, shape[1]), F.instance_norm(x))


@pytest.mark.parametrize("num_groups", [1, 2, 3, 6])
def test_group_norm_output_is_standardized_per_group(num_groups: int, backend: str) -> None:
    x = torch.randn(5, 6, 7, dtype=torch.float64) * 4 + 3
    y = F.group_norm(x, num_groups, eps=1e-12).reshape(5, num_groups, -1)
    torch.testing.assert_close(
        y.mean(-1), torch.zeros(5, num_groups, dtype=x.dtype), atol=1e-12, rtol=0
    )
    torch.testing.assert_close(y.var(-1, correction=0), torch.ones(5, num_groups, dtype=x.dtype))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_batch_variance_survives_a_large_mean(layout: str, backend: str) -> None:
    """fp32 ``1e4 + N(0, 1e-2)``: E[x^2] - E[x]^2 in fp32 would lose every digit."""
    g = torch.Generator().manual_seed(3)
    x = 1e4 + 1e-2 * torch.randn(16, 4, 8, 8, generator=g)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    running_mean, running_var = torch.zeros(4), torch.zeros(4)
    F.batch_norm(x, running_mean, running_var, training=True, momentum=1.0)
    _, var, count = ref.batch_stats(x.double().numpy())
    expected = torch.as_tensor(var * count / (count - 1))
    torch.testing.assert_close(running_var.double(), expected, rtol=1e-3, atol=0)


def test_nan_batch_keeps_running_buffers_finite(backend: str) -> None:
    bn = normlab.BatchNorm2d(3)
    bn(torch.randn(4, 3, 2, 2))
    before = (bn.running_mean.clone(), bn.running_var.clone())
    x = torch.randn(4, 3, 2, 2)
    x[0, 1, 0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite statistics"):
        y = bn(x)
    assert torch.isnan(y[:, 1]).all() and torch.isfinite(y[:, [0, 2]]).all()  # output follows torch
    assert torch.isfinite(bn.running_mean).all() and torch.isfinite(bn.running_var).all()
    assert torch.equal(bn.running_mean[1], before[0][1]) and torch.equal(
        bn.running_var[1], before[1][1]
    )
    assert not torch.equal(bn.running_mean[0], before[0][0])  # healthy channels still update


def test_inf_batch_under_instance_norm_keeps_buffers(backend: str) -> None:
    layer = normlab.InstanceNorm1d(2, track_running_stats=True)
    x = torch.randn(3, 2, 5)
    x[1, 0, 2] = float("inf")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer(x)
    assert any("non-finite" in str(w.message) for w in caught)
    assert torch.isfinite(layer.running_mean).all() and torch.isfinite(layer.running_var).all()


def test_empty_instance_norm_with_affine_returns_empty() -> None:
    """torch 2.13 raises IndexError here; an empty batch is simply empty."""
    layer = normlab.InstanceNorm2d(3, affine=True, track_running_stats=True)
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape
    assert torch.equal(layer.running_mean, torch.zeros(3))
    assert torch.equal(layer.running_var, torch.ones(3))
