"""Property tests: random shapes and dtypes, every layer against the NumPy reference."""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import normlab
from normlab import reference as ref

SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@st.composite
def layer_and_input(draw: st.DrawFn) -> tuple[str, torch.nn.Module, torch.Tensor]:
    kind = draw(st.sampled_from(["batch", "instance", "group", "layer", "rms"]))
    spatial_rank = draw(st.integers(0 if kind in ("batch", "group") else 1, 3))
    groups = draw(st.integers(1, 3))
    channels = groups * draw(st.integers(1, 3))
    spatial = tuple(draw(st.integers(1, 4)) for _ in range(spatial_rank))
    batch = draw(st.integers(2 if kind == "batch" else 1, 5))
    if kind == "instance" and math.prod(spatial) == 1:
        spatial = (*spatial[:-1], 2)
    if kind == "group" and batch * (channels // groups) * math.prod(spatial) == 1:
        batch = 2  # one value per group in a batch of one is refused, as torch does
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    affine = draw(st.booleans())
    shape = (batch, channels, *spatial)
    if kind == "batch":
        layer = [
            normlab.BatchNorm1d,
            normlab.BatchNorm1d,
            normlab.BatchNorm2d,
            normlab.BatchNorm3d,
        ][spatial_rank](channels, affine=affine, dtype=dtype)
    elif kind == "instance":
        cls = [normlab.InstanceNorm1d, normlab.InstanceNorm2d, normlab.InstanceNorm3d]
        layer = cls[spatial_rank - 1](channels, affine=affine, dtype=dtype)
    elif kind == "group":
        layer = normlab.GroupNorm(groups, channels, affine=affine, dtype=dtype)
    else:
        trailing = shape[-draw(st.integers(1, len(shape) - 1)) :]
        cls = normlab.LayerNorm if kind == "layer" else normlab.RMSNorm
        layer = cls(trailing, elementwise_affine=affine, dtype=dtype)
    if affine:
        with torch.no_grad():
            for param in layer.parameters():
                param.uniform_(-2, 2)
    scale = draw(st.sampled_from([1e-2, 1.0, 1e2]))
    offset = draw(st.sampled_from([0.0, 3.0, -50.0]))
    seed = draw(st.integers(0, 2**16))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return kind, layer, x * scale + offset


def _expected(kind: str, layer: torch.nn.Module, x: np.ndarray, eps: float) -> np.ndarray:
    weight = None if layer.weight is None else layer.weight.detach().double().numpy()
    bias = getattr(layer, "bias", None)
    bias = None if bias is None else bias.detach().double().numpy()
    if kind == "batch":
        return ref.batch_norm_forward(x, weight, bias, eps)
    if kind == "instance":
        return ref.instance_norm_forward(x, weight, bias, eps)
    if kind == "group":
        return ref.group_norm_forward(x, layer.num_groups, weight, bias, eps)
    if kind == "layer":
        return ref.layer_norm_forward(x, layer.normalized_shape, weight, bias, eps)
    return ref.rms_norm_forward(x, layer.normalized_shape, weight, eps)


@SETTINGS
@given(case=layer_and_input())
def test_layers_match_reference_on_random_shapes(case, backend: str) -> None:
    kind, layer, x = case
    eps = layer.eps if layer.eps is not None else torch.finfo(x.dtype).eps
    y = layer(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    expected = _expected(kind, layer, x.double().numpy(), eps)
    # float32 loses relative precision in x - mean when the offset dwarfs the spread.
    spread = float(x.double().std()) if x.numel() > 1 else 1.0
    rel = abs(float(x.double().mean())) / max(spread, 1e-30)
    atol = 1e-9 if x.dtype == torch.float64 else 1e-4 * (1 + rel)
    np.testing.assert_allclose(y.detach().double().numpy(), expected, atol=atol, rtol=1e-4)
