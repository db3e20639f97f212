"""The synchronized path in this process, on a 1-rank gloo group (collectives are
identities): float64 gradcheck of its autograd Function, and half-precision input."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from torch import nn

from normlab import distributed as D


@pytest.fixture(scope="module")
def group() -> Iterator[None]:
    if dist.is_initialized():  # another test left one: use it only if it is a 1-rank group
        if dist.get_world_size() != 1:
            pytest.fail("a process group of size > 1 is already initialized in this process")
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


CASES = [  # input shape, memory format, with weight/bias
    ((6, 3), None, True),
    ((4, 3, 5), None, False),
    ((3, 2, 3, 2), torch.channels_last, True),
    ((2, 2, 2, 3, 2), torch.channels_last_3d, True),
]


@pytest.mark.parametrize("shape, memory_format, affine", CASES)
def test_gradcheck_synced_path(group: None, backend: str, shape, memory_format, affine) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    x.requires_grad_(True)
    channels = shape[1]
    params = [
        torch.randn(channels, generator=gen, dtype=torch.float64, requires_grad=True)
        for _ in range(2 if affine else 0)
    ]

    def f(x: torch.Tensor, *wb: torch.Tensor) -> torch.Tensor:
        return D.sync_batch_norm(x, None, None, *wb, eps=1e-3)

    assert torch.autograd.gradcheck(f, (x, *params))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_input_matches_float32_batchnorm(group: None, backend: str, dtype) -> None:
    x = torch.randn(8, 4, 5, 5) * 3 + 2
    ref = nn.BatchNorm2d(4)
    mean, var = torch.zeros(4), torch.ones(4)
    y = D.sync_batch_norm(x.to(dtype), mean, var, ref.weight.detach(), ref.bias.detach())
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), ref(x).detach(), atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(mean, ref.running_mean, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(var, ref.running_var, atol=1e-3, rtol=1e-3)


def test_functional_rejects_bad_arguments(group: None) -> None:
    x = torch.randn(4, 3, 2)
    with pytest.raises(ValueError, match="weight must have shape"):
        D.sync_batch_norm(x, None, None, torch.ones(2))
    with pytest.raises(ValueError, match="given together"):
        D.sync_batch_norm(x, torch.zeros(3), None)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        D.sync_batch_norm(torch.randn(1, 3), None, None)


@pytest.mark.parametrize("shape, memory_format", [((6, 3), None), ((3, 3, 4, 2), None),
                                                  ((3, 3, 4, 2), torch.channels_last)])
def test_output_modified_in_place(group: None, backend: str, shape, memory_format) -> None:
    """``+= identity`` then ``relu_`` on the synchronized output (a ResNet block's end)
    are allowed, and the gradients are those of torch's batch_norm followed by the same
    in-place ops."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    identity = torch.randn(shape, generator=gen, dtype=torch.float64)
    grad = torch.randn(shape, generator=gen, dtype=torch.float64)
    channels = shape[1]
    weight = torch.rand(channels, generator=gen, dtype=torch.float64) + 0.5
    bias = torch.randn(channels, generator=gen, dtype=torch.float64)
    results = []
    for synced in (True, False):
        leaves = [t.clone().requires_grad_(True) for t in (x, identity, weight, bias)]
        xi, idi, wi, bi = leaves
        if synced:
            y = D.sync_batch_norm(xi, None, None, wi, bi)
        else:
            y = nn.functional.batch_norm(xi, None, None, wi, bi, training=True)
        y += idi  # the residual, then the block's ReLU(inplace=True)
        y.relu_()
        (y * grad).sum().backward()
        results.append([y.detach(), *(t.grad for t in leaves)])
    for ours, theirs in zip(*results, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
