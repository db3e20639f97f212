"""Composite backend: plain differentiable torch code.

Runs on any device and dtype, and autograd differentiates it to any order, so it is
also what the fast backends fall back to for double backward and non-CPU tensors.

Every backend works on the canonical view ``x4 = [N, G, K, S]`` of the input (see
``normlab.functional``): the affine parameters are ``[G*K]``, broadcast as
``(1, G, K, 1)``; statistics are per ``G`` (reduced over ``N, K, S``) or, with
``per_sample=True``, per ``(N, G)`` (reduced over ``K, S``).
"""

from __future__ import annotations

import torch
from torch import Tensor

NAME = "torch"


def supports(x: Tensor) -> bool:
    """Composite torch code runs on every device and floating dtype."""
    return True


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are accumulated in at least float32 (float64 stays float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _reduce_dims(per_sample: bool) -> tuple[int, ...]:
    return (2, 3) if per_sample else (0, 2, 3)


def _stat_shape(x4: Tensor, per_sample: bool) -> tuple[int, ...]:
    return (x4.shape[0], x4.shape[1]) if per_sample else (x4.shape[1],)


def _broadcast_stats(stat: Tensor, per_sample: bool) -> Tensor:
    """[G] or [N, G] -> a shape that broadcasts against [N, G, K, S]."""
    return stat[:, :, None, None] if per_sample else stat[None, :, None, None]


def _affine(xhat: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    groups, per_group = xhat.shape[1], xhat.shape[2]
    if weight is not None:
        xhat = xhat * weight.to(xhat.dtype).reshape(1, groups, per_group, 1)
    if bias is not None:
        xhat = xhat + bias.to(xhat.dtype).reshape(1, groups, per_group, 1)
    return xhat


def normalize(
    x4: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    *,
    per_sample: bool,
    center: bool,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Train-mode normalization of ``x4 [N, G, K, S]`` with its own statistics.

    Returns ``(y4, mean, var)``: ``y4`` has ``x4``'s shape and dtype; ``mean`` and the
    biased ``var`` (mean of squares when ``center=False``) are ``[G]`` or ``[N, G]`` in
    the compute dtype.
    """
    xc = x4.to(compute_dtype(x4.dtype))
    dims = _reduce_dims(per_sample)
    if xc.numel() == 0:
        # No elements to average: statistics are undefined (NaN), output is empty.
        shape = _stat_shape(x4, per_sample)
        nan = torch.full(shape, float("nan"), dtype=xc.dtype, device=xc.device)
        return _affine(xc, weight, bias).to(x4.dtype), nan, nan.clone()
    if center:
        # torch.var_mean reduces with Welford/two-pass merges: no E[x^2] - E[x]^2 cancellation.
        var, mean = torch.var_mean(xc, dim=dims, correction=0)
        xhat = (xc - _broadcast_stats(mean, per_sample)) * _broadcast_stats(
            torch.rsqrt(var + eps), per_sample
        )
    else:
        var = xc.square().mean(dim=dims)
        mean = torch.zeros_like(var)
        xhat = xc * _broadcast_stats(torch.rsqrt(var + eps), per_sample)
    return _affine(xhat, weight, bias).to(x4.dtype), mean, var


def normalize_with_stats(
    x4: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    *,
    eps: float,
) -> Tensor:
    """Eval-mode normalization of ``x4 [N, G, K, S]`` with given statistics ``[G]``."""
    xc = x4.to(compute_dtype(x4.dtype))
    mean = mean.to(xc.dtype)
    rstd = torch.rsqrt(var.to(xc.dtype) + eps)
    xhat = (xc - _broadcast_stats(mean, False)) * _broadcast_stats(rstd, False)
    return _affine(xhat, weight, bias).to(x4.dtype)


# Split-phase BatchNorm pieces: SyncBatchNorm combines statistics across processes between
# the local reductions and the elementwise passes, so it needs them apart.


def moments(x4: Tensor, *, per_sample: bool, center: bool) -> tuple[Tensor, Tensor]:
    """Biased ``(mean, var)`` of ``x4 [N, G, K, S]``, ``[G]`` or ``[N, G]``, compute dtype."""
    xc = x4.to(compute_dtype(x4.dtype))
    dims = _reduce_dims(per_sample)
    if center:
        var, mean = torch.var_mean(xc, dim=dims, correction=0)
        return mean, var
    var = xc.square().mean(dim=dims)
    return torch.zeros_like(var), var


def backward_reduce(
    dy4: Tensor, x4: Tensor, mean: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor]:
    """Per-channel ``(sum dy, sum dy * xhat)`` over ``(N, K, S)`` for BatchNorm statistics
    ``mean``/``rstd`` ``[G]``; these give ``dbias`` and ``dweight`` directly."""
    work = compute_dtype(x4.dtype)
    dy = dy4.to(work)
    xhat = (x4.to(work) - _broadcast_stats(mean, False)) * _broadcast_stats(rstd, False)
    return dy.sum(dim=(0, 2, 3)), (dy * xhat).sum(dim=(0, 2, 3))


def backward_apply(
    dy4: Tensor,
    x4: Tensor,
    mean: Tensor,
    rstd: Tensor,
    weight: Tensor | None,
    sum_dy: Tensor,
    sum_dy_xhat: Tensor,
    count: int,
) -> Tensor:
    """BatchNorm input gradient from (possibly globally summed) reductions over ``count``
    elements per channel: ``dx = w * rstd * (dy - sum_dy / count - xhat * sum_dy_xhat / count)``.
    """
    work = compute_dtype(x4.dtype)
    xhat = (x4.to(work) - _broadcast_stats(mean, False)) * _broadcast_stats(rstd, False)
    scale = rstd if weight is None else rstd * weight.to(work)
    dx = dy4.to(work) - _broadcast_stats(sum_dy / count, False)
    dx = dx - xhat * _broadcast_stats(sum_dy_xhat / count, False)
    return (dx * _broadcast_stats(scale, False)).to(x4.dtype)
