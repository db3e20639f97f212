"""The composite provider (backend ``"torch"``): plain differentiable torch code.

Runs on any device and dtype, and autograd differentiates it to any order, so it is the
last entry of every route, the oracle the kernels are tested against and what they fall
back to for double backward.

The functions work on the view ``x4 = [N, G, K, S]`` of a plan (``normlab.plan``): the
affine parameters are ``[G*K]``, broadcast as ``(1, G, K, 1)``; statistics are per ``G``
(reduced over ``N, K, S``) or, with ``per_sample=True``, per ``(N, G)`` (over ``K, S``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn import functional as TF

from normlab import running
from normlab.plan import KINDS, Call, Plan, compute_dtype

NAME = "torch"


def activation(x: Tensor, act: str, slope: float) -> Tensor:
    """``act(x)`` with torch's definitions (gelu the exact, erf-based one); ``slope`` is
    leaky_relu's negative slope or elu's alpha. The one table of the fused layers'
    activations (TorchScript compiles it too: builtin annotations, no f-string)."""
    if act == "identity":
        return x
    if act == "relu":
        return torch.relu(x)
    if act == "leaky_relu":
        return TF.leaky_relu(x, slope)
    if act == "silu":
        return TF.silu(x)
    if act == "gelu":
        return TF.gelu(x)
    if act == "elu":
        return TF.elu(x, slope)
    raise ValueError("act must be one of relu, leaky_relu, silu, gelu, elu, identity, got " + act)


def run(
    plan: Plan,
    call: Call,
    train: Callable[..., tuple[Tensor, Tensor, Tensor]],
    given: Callable[..., Tensor],
    update: running.UpdateKernel | None = None,
) -> Tensor:
    """A plan on the ``x4`` view with a provider's ``train`` (``normalize``) and ``given``
    (``normalize_with_stats``) functions: output, running update, activation. A masked
    plan's statistics are over ``call.mask``'s valid positions (composite ``train``)."""
    x, _, _, running_mean, running_var, mask = call
    x4, weight, bias = plan.x4(x), plan.flat(call.weight), plan.flat(call.bias)
    if plan.batch_stats:
        stats_of = {"per_sample": plan.per_sample, "center": plan.center, "eps": plan.eps}
        if plan.masked:
            stats_of["mask4"] = plan.mask4(mask)
        y4, mean, var = train(x4, weight, bias, **stats_of)
        if running_mean is not None and not plan.masked:
            running.record(plan, running_mean, running_var, mean, var, update)
        elif running_mean is not None:  # over the valid positions
            if plan.per_sample:
                counts = mask.reshape(plan.view[0], -1).sum(1)
                running.record(plan, running_mean, running_var, mean, var, update, None, counts)
            else:
                running.record(plan, running_mean, running_var, mean, var, update,
                               mask.sum())
    else:
        y4 = given(x4, running_mean, running_var, weight, bias, eps=plan.eps)
    return activation(y4.reshape(x.shape), plan.act, plan.slope)


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
    mask4: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Train-mode normalization of ``x4 [N, G, K, S]`` with its own statistics.

    Returns ``(y4, mean, var)``: ``y4`` has ``x4``'s shape and dtype; ``mean`` and the
    biased ``var`` (mean of squares when ``center=False``) are ``[G]`` or ``[N, G]`` in
    the compute dtype. With ``mask4`` (bool ``[N, 1, 1, S]``, ``True`` = valid) the
    statistics are over the valid positions only and the output is made everywhere; a
    statistic with no valid position gives ``xhat = 0`` (the output is ``bias``).
    """
    xc = x4.to(compute_dtype(x4.dtype))
    dims = _reduce_dims(per_sample)
    if mask4 is not None:
        return _masked_normalize(xc, mask4, weight, bias, dims, per_sample, center, eps,
                                 x4.dtype)
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


def _masked_normalize(
    xc: Tensor,
    mask4: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    dims: tuple[int, ...],
    per_sample: bool,
    center: bool,
    eps: float,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`normalize` over the valid positions of ``mask4``: padding adds nothing to the
    statistics, so its gradient is only through its own output."""
    mean, var, count = _masked_moments(xc, mask4, dims, per_sample, center)
    rstd = torch.where(count > 0, torch.rsqrt(var + eps), torch.zeros_like(var))
    xhat = (xc - _broadcast_stats(mean, per_sample)) * _broadcast_stats(rstd, per_sample)
    return _affine(xhat, weight, bias).to(dtype), mean, var


def _masked_moments(
    xc: Tensor, mask4: Tensor, dims: tuple[int, ...], per_sample: bool, center: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """``(mean, biased var, count)`` over the valid positions (zeros where there is none)."""
    valid = mask4.to(xc.dtype).expand_as(xc)
    count = valid.sum(dim=dims)
    per = count.clamp_min(1)
    mean = (xc * valid).sum(dim=dims) / per if center else torch.zeros_like(count)
    centred = xc - _broadcast_stats(mean, per_sample)
    var = (centred * valid).square().sum(dim=dims) / per
    return mean, var, count


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


def moments(
    x4: Tensor, *, per_sample: bool, center: bool, mask4: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Biased ``(mean, var)`` of ``x4 [N, G, K, S]``, ``[G]`` or ``[N, G]``, compute dtype
    (over the valid positions of ``mask4 [N, 1, 1, S]``: zeros where there is none)."""
    xc = x4.to(compute_dtype(x4.dtype))
    dims = _reduce_dims(per_sample)
    if mask4 is not None:
        mean, var, _ = _masked_moments(xc, mask4, dims, per_sample, center)
        return mean, var
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
    count: int | Tensor,
    mask4: Tensor | None = None,
) -> Tensor:
    """BatchNorm input gradient from (possibly globally summed) reductions over ``count``
    elements per channel: ``dx = w * rstd * (dy - sum_dy / count - xhat * sum_dy_xhat / count)``
    (with ``mask4``, the statistics' terms at the valid positions only).
    """
    work = compute_dtype(x4.dtype)
    xhat = (x4.to(work) - _broadcast_stats(mean, False)) * _broadcast_stats(rstd, False)
    scale = rstd if weight is None else rstd * weight.to(work)
    count = count.clamp_min(1) if isinstance(count, Tensor) else max(count, 1)
    through_stats = _broadcast_stats(sum_dy / count, False) + xhat * _broadcast_stats(
        sum_dy_xhat / count, False
    )
    if mask4 is not None:
        through_stats = through_stats * mask4.to(work)
    dx = dy4.to(work) - through_stats
    return (dx * _broadcast_stats(scale, False)).to(x4.dtype)


def backward_from_output(
    dz4: Tensor,
    z4: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    rstd: Tensor,
    count: int | Tensor,
    act: str,
    param: float,
    mask4: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """In-place ABN's backward from its output ``z4 = act(xhat * w + b)`` ``[N, C, 1, S]``
    alone: ``(dx4, sum dy, sum dy * xhat)``, inverting the activation (``leaky_relu`` with
    slope ``param``, ``elu`` with alpha ``param``, or ``identity``) and the affine map;
    ``count``: the values (valid ones, with ``mask4``) behind each channel's statistics."""
    work = rstd.dtype
    z = z4.to(work)
    dz = dz4.to(work)
    positive = z > 0
    if act == "leaky_relu":
        y = torch.where(positive, z, z / param)
        dy = torch.where(positive, dz, dz * param)
    elif act == "elu":
        # z = alpha * (exp(y) - 1) < 0  =>  y = log1p(z / alpha), dz/dy = z + alpha
        y = torch.where(positive, z, torch.log1p(z / param))
        dy = torch.where(positive, dz, dz * (z + param))
    else:
        y, dy = z, dz
    shape = (1, -1, 1, 1)
    w = torch.ones_like(rstd) if weight is None else weight.to(work)
    b = torch.zeros_like(rstd) if bias is None else bias.to(work)
    xhat = (y - b.reshape(shape)) / w.reshape(shape)
    sum_dy, sum_dy_xhat = dy.sum(dim=(0, 2, 3)), (dy * xhat).sum(dim=(0, 2, 3))
    # Padded positions enter no statistic: the statistics' terms reach the valid ones
    # only, over their count; the sums still run over every output.
    through_stats = (sum_dy / count).reshape(shape) + xhat * (sum_dy_xhat / count).reshape(shape)
    if mask4 is not None:
        through_stats = through_stats * mask4.to(work)
    dx = (dy - through_stats) * (w * rstd).reshape(shape)
    return dx.to(z4.dtype), sum_dy, sum_dy_xhat


class Composite:
    """The provider every route ends with: applies to every plan and tensor; also
    SyncBatchNorm's split-phase pieces on any device."""

    name = NAME
    kinds = frozenset(KINDS)
    masks = True  # takes masked plans (the statistics over valid positions)

    @staticmethod
    def applies(plan: Plan, call: Call) -> bool:
        return True

    @staticmethod
    def forward(plan: Plan, call: Call) -> Tensor:
        return run(plan, call, normalize, normalize_with_stats)

    normalize = staticmethod(normalize)
    normalize_with_stats = staticmethod(normalize_with_stats)
    moments = staticmethod(moments)
    backward_reduce = staticmethod(backward_reduce)
    backward_apply = staticmethod(backward_apply)
    backward_from_output = staticmethod(backward_from_output)


PROVIDER = Composite()
