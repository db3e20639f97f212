"""The CPU provider's masked steps: BatchNorm (``MaskedBatchStep``) and InstanceNorm /
GroupNorm (``MaskedRowsStep``) with statistics over the valid positions of a mask, in one
kernel each way (``kernels.masked``) on contiguous input, the running update after it.
Their autograd is ``_library.StepFunction`` (double backward through the composite code,
masked as well)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from normlab import running
from normlab.ops import _library
from normlab.ops.cpu import kernels as K
from normlab.ops.cpu.layouts import _STEP_DTYPES, _param_np
from normlab.ops.cpu.runtime import supports, sync_threads
from normlab.ops.cpu.steps import run_step
from normlab.plan import Call, Plan


def _masked_forward(
    ctx: Any,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mask: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float,
    eps: float,
) -> Tensor:
    """The output of masked BatchNorm and the running update over the valid count; with
    an autograd ``ctx``, saves ``x``, the parameters, ``stats [3, C]`` and the mask."""
    n, c = x.shape[0], x.shape[1]
    s, dtype = x.numel() // (n * c), x.dtype
    valid = mask.reshape(n, s).contiguous()
    count = int(valid.sum())
    sync_threads(x.numel())
    y = torch.empty_like(x)
    stats = torch.empty(3, c, dtype=dtype)
    mean, var, rstd = stats.numpy()
    if ctx is not None:
        ctx.save_for_backward(x, weight, bias, stats)
        ctx.valid, ctx.count = valid, count
        ctx.mask4 = valid.view(n, 1, 1, s)
        ctx.eps, ctx.act, ctx.shape4 = eps, 0, (n, c, 1, -1)
        ctx.per_sample, ctx.center = False, True
        ctx.set_materialize_grads(False)
    K.masked_planes_forward(
        x.detach().numpy().reshape(n, c, s), valid.numpy().view(np.uint8),
        _param_np(weight, c, dtype, 1.0), _param_np(bias, c, dtype, 0.0), eps, count,
        y.numpy().reshape(n, c, s), mean, var, rstd,
    )
    if running_mean is not None and count > 0:
        # Written behind autograd's back: count the writes (see impl.running_update).
        torch.autograd.graph.increment_version((running_mean, running_var))
        kept = K.running_update(
            running_mean.numpy(), running_var.numpy(), mean, var, running.bessel(count),
            momentum,
        )
        if kept:
            running.warn_non_finite()
    return y


def _masked_backward(
    ctx: Any,
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    stats: Tensor,
    needs: tuple[bool, ...],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(dx, dweight, dbias)`` of :func:`_masked_forward`."""
    n, c = x.shape[0], x.shape[1]
    s, dtype = x.numel() // (n * c), x.dtype
    if dy.dtype != dtype or not dy.is_contiguous():
        dy = dy.to(dtype).contiguous()
    sync_threads(x.numel())
    dx = torch.empty_like(x)
    grads = torch.empty(2, c, dtype=dtype)
    dw, db = grads.numpy()
    st = stats.numpy()
    K.masked_planes_backward(
        dy.numpy().reshape(n, c, s), x.detach().numpy().reshape(n, c, s),
        ctx.valid.numpy().view(np.uint8), st[0], st[2], _param_np(weight, c, dtype, 1.0),
        ctx.count, dx.numpy().reshape(n, c, s), dw, db,
    )
    return (
        dx if needs[0] else None,
        grads[0] if needs[1] and weight is not None else None,
        grads[1] if needs[2] and bias is not None else None,
    )


def _masked_step_applies(plan: Plan, call: Call) -> bool:
    """A masked training plan on non-empty contiguous float32/float64 CPU input in plain
    eager mode, with contiguous affine parameters."""
    x = call.x
    if not (plan.masked and plan.batch_stats and x.dtype in _STEP_DTYPES):
        return False
    if not (x.numel() > 0 and x.is_contiguous() and supports(x) and _library.eager(x)):
        return False
    return not _library.composite_only(x) and all(
        v is None or v.is_contiguous() for v in (call.weight, call.bias)
    )


class _MaskedKernels:
    forward = staticmethod(_masked_forward)
    backward = staticmethod(_masked_backward)


_MASKED = _MaskedKernels()


class MaskedBatchStep:
    """Masked BatchNorm training: contiguous float32/float64 CPU input in plain eager
    mode, contiguous vectors (running buffers not requiring grad)."""

    name = "cpu"
    kinds = frozenset(("batch",))
    masks = True

    @staticmethod
    def applies(plan: Plan, call: Call) -> bool:
        running_mean, running_var = call.running_mean, call.running_var
        return _masked_step_applies(plan, call) and (
            running_mean is None
            or (running_mean.is_contiguous() and running_var.is_contiguous()
                and not (running_mean.requires_grad or running_var.requires_grad))
        )

    @staticmethod
    def forward(plan: Plan, call: Call) -> Tensor:
        x, weight, bias, running_mean, running_var, mask = call
        args = (mask, running_mean, running_var, float(plan.momentum), float(plan.eps))
        return run_step(_MASKED, plan, None, x, weight, bias, args)


def _masked_rows_forward(
    ctx: Any,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mask: Tensor,
    plan: Plan,
    running_mean: Tensor | None,
    running_var: Tensor | None,
) -> Tensor:
    """The output of masked InstanceNorm/GroupNorm on the plan's ``[N, G, K, S]`` view and
    InstanceNorm's running update over each instance's valid count; with an autograd
    ``ctx``, saves ``x``, the parameters, ``stats [3, N, G]`` and the mask."""
    n, groups, k, s = plan.view
    dtype = x.dtype
    valid = mask.reshape(n, s).contiguous()
    sync_threads(x.numel())
    y = torch.empty_like(x)
    stats = torch.empty(3, n, groups, dtype=dtype)
    mean, var, rstd = stats.numpy()
    if ctx is not None:
        ctx.save_for_backward(x, weight, bias, stats)
        ctx.valid, ctx.mask4, ctx.shape4 = valid, valid.view(n, 1, 1, s), plan.view
        ctx.eps, ctx.act, ctx.per_sample, ctx.center = plan.eps, 0, True, True
        ctx.set_materialize_grads(False)
    features = groups * k
    K.masked_rows_forward(
        x.detach().numpy().reshape(plan.view), valid.numpy().view(np.uint8),
        _param_np(weight, features, dtype, 1.0).reshape(features),
        _param_np(bias, features, dtype, 0.0).reshape(features), plan.eps,
        y.numpy().reshape(plan.view), mean, var, rstd,
    )
    if running_mean is not None:
        counts = valid.sum(1)
        running.record(plan, running_mean, running_var, stats[0], stats[1], None, None, counts)
    return y


def _masked_rows_backward(
    ctx: Any,
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    stats: Tensor,
    needs: tuple[bool, ...],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(dx, dweight, dbias)`` of :func:`_masked_rows_forward`; the parameter gradients
    are each sample's shares summed in sample order (deterministic)."""
    n, groups, k, s = ctx.shape4
    dtype, features = x.dtype, groups * k
    if dy.dtype != dtype or not dy.is_contiguous():
        dy = dy.to(dtype).contiguous()
    sync_threads(x.numel())
    dx = torch.empty_like(x)
    rows = np.empty((2, n, features))
    st = stats.numpy()
    K.masked_rows_backward(
        dy.numpy().reshape(ctx.shape4), x.detach().numpy().reshape(ctx.shape4),
        ctx.valid.numpy().view(np.uint8), st[0], st[2],
        _param_np(weight, features, dtype, 1.0).reshape(features), dx.numpy().reshape(ctx.shape4),
        rows[0], rows[1],
    )
    grads = torch.from_numpy(rows.sum(axis=1)).to(dtype)  # [2, G*K]: dweight, dbias
    return (
        dx if needs[0] else None,
        grads[0].view(weight.shape) if needs[1] and weight is not None else None,
        grads[1].view(bias.shape) if needs[2] and bias is not None else None,
    )


class _MaskedRowsKernels:
    forward = staticmethod(_masked_rows_forward)
    backward = staticmethod(_masked_rows_backward)


_MASKED_ROWS = _MaskedRowsKernels()


class MaskedRowsStep:
    """Masked InstanceNorm and GroupNorm training: contiguous float32/float64 CPU input in
    plain eager mode, contiguous parameters; InstanceNorm's running buffers of the input's
    dtype, contiguous (others go to the composite code)."""

    name = "cpu"
    kinds = frozenset(("instance", "group"))
    masks = True

    @staticmethod
    def applies(plan: Plan, call: Call) -> bool:
        x, running_mean, running_var = call.x, call.running_mean, call.running_var
        return _masked_step_applies(plan, call) and (
            running_mean is None
            or (running_mean.dtype == x.dtype and running_var.dtype == x.dtype
                and not (running_mean.requires_grad or running_var.requires_grad))
        )

    @staticmethod
    def forward(plan: Plan, call: Call) -> Tensor:
        x, weight, bias, running_mean, running_var, mask = call
        return run_step(_MASKED_ROWS, plan, None, x, weight, bias,
                        (mask, plan, running_mean, running_var))
