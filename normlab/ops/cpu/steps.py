"""The CPU provider's one-call steps: BatchNorm training (statistics, output with a
fused activation, running update: one kernel) and the per-row norms (LayerNorm, RMSNorm,
GroupNorm: one kernel each way), on the input as it comes.

Through the general ops a step costs 20-40 small torch ops and Python calls around the
kernels, which on cold caches took 0.8-1.8 ms of a 2-9 ms ResNet BatchNorm2d step; these
do the same work with a handful, all before the kernel call (docs/backends.md). Their
autograd is ``normlab.ops._library.StepFunction``: differentiable once with a fused
activation, to any order without (double backward through the composite code).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from normlab import running
from normlab.ops import _library
from normlab.ops.composite import activation
from normlab.ops.cpu import kernels as K
from normlab.ops.cpu.layouts import (
    _CHANNELS_LAST_FORMATS,
    _NO_RUNNING,
    _STEP_DTYPES,
    PLANES_MIN_CHANNELS,
    ROW_PIECES,
    _cols_np,
    _param_np,
    _pieces,
    _planes_block,
    _zero,
)
from normlab.ops.cpu.runtime import supports, sync_threads
from normlab.plan import Call, Plan

ACT_CODES = K.ACT_CODES  # the activations the kernels fuse, by name
# Below this many elements a fused activation saves less memory traffic than its fixed
# cost: the step runs without it and torch applies the activation.
FUSED_MIN_NUMEL = 1 << 16


def fused_code(plan: Plan, x: Tensor) -> int | None:
    """The kernels' code for the plan's activation where they fuse it for ``x``, else
    ``None`` (applied after the step)."""
    if x.numel() < FUSED_MIN_NUMEL:
        return 0 if plan.act == "identity" else None
    return ACT_CODES.get(plan.act)


def _plain_eager(x: Tensor) -> bool:
    """Non-empty float32/float64 CPU input outside tracing and torch.func transforms."""
    return (
        x.dtype in _STEP_DTYPES
        and x.numel() > 0
        and supports(x)
        and _library.eager(x)
        and not _library.composite_only(x)
    )


def run_step(
    kernels: Any,
    plan: Plan,
    code: int | None,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    args: tuple,
) -> Tensor:
    """A step's ``kernels.forward`` (through ``StepFunction`` when gradients are needed),
    then the plan's activation unless the kernels fused it (``code``)."""
    if _library.needs_grad(x, weight, bias):
        y = _library.StepFunction.apply(kernels, x, weight, bias, *args)
    else:
        y = kernels.forward(None, x, weight, bias, *args)
    return y if code is not None else activation(y, plan.act, plan.slope)


# --- BatchNorm training ------------------------------------------------------------------


def _step_layout(x: Tensor, act: int) -> str | None:
    """The kernels of the train step for ``x [N, C, *S]``: ``"planes"`` (contiguous NCHW
    with ``S > 1`` and at least ``PLANES_MIN_CHANNELS`` channels, or any contiguous input
    with a fused activation), ``"cols"`` (``[N, C]``-like or channels-last input, no
    activation), else ``None``."""
    c = x.shape[1]
    single_values = x.numel() == x.shape[0] * c  # S == 1: [N, C] or [N, C, 1, ...]
    if x.is_contiguous():
        if act or not (single_values or c < PLANES_MIN_CHANNELS):
            return "planes"
        return "cols" if single_values else None
    fmt = _CHANNELS_LAST_FORMATS.get(x.dim())
    if not act and fmt is not None and x.is_contiguous(memory_format=fmt):
        return "cols"
    return None


def _train_forward(
    ctx: Any,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float,
    eps: float,
    act: int,
    slope: float,
    layout: str,
) -> tuple[Tensor, int]:
    """The output of the BatchNorm train step; the running buffers updated in the
    kernel (a channel with non-finite statistics keeps its values, with the warning).
    With an autograd ``ctx``, saves ``x``, the parameters and ``stats [3, C]`` = (mean,
    biased var, rstd). All bookkeeping comes before the kernel call, while caches are warm."""
    n, c = x.shape[0], x.shape[1]
    dtype = x.dtype
    sync_threads(x.numel())
    y = torch.empty_like(x)
    stats = torch.empty(3, c, dtype=dtype)
    mean, var, rstd = stats.numpy()
    if ctx is not None:
        ctx.save_for_backward(x, weight, bias, stats)
        ctx.eps, ctx.act, ctx.slope, ctx.layout = eps, act, slope, layout
        ctx.shape4, ctx.per_sample, ctx.center = (n, c, 1, -1), False, True
        ctx.set_materialize_grads(False)
    update = running_mean is not None
    if update:
        # Written behind autograd's back: count the writes (see impl.running_update).
        torch.autograd.graph.increment_version((running_mean, running_var))
    w, b = _param_np(weight, c, dtype, 1.0), _param_np(bias, c, dtype, 0.0)
    rm = running_mean.numpy() if update else _NO_RUNNING[dtype]
    rv = running_var.numpy() if update else _NO_RUNNING[dtype]
    if layout == "cols":
        x2, y2 = _cols_np(x, c), _cols_np(y, c)
        scratch = np.empty((_pieces(x2.shape[0], c, x.element_size()), 2, c))
        K.channel_cols_forward(
            x2, w, b, True, True, True, eps, y2, mean, var, rstd, scratch, _zero(dtype)
        )
        count = x2.shape[0]
        kept = K.running_update(rm, rv, mean, var, count / (count - 1), momentum) if update else 0
    else:
        s = x.numel() // (n * c)
        kept = K.planes_forward(
            x.detach().numpy().reshape(n, c, s), w, b, act, slope,
            _planes_block(n, c, s, x.element_size()), True, True, True, eps,
            y.numpy().reshape(n, c, s), mean, var, rstd, rm, rv, momentum,
        )
    if kept:
        running.warn_non_finite()
    return y


def _train_backward(
    ctx: Any,
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    stats: Tensor,
    needs: tuple[bool, ...],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(dx, dweight, dbias)`` of :func:`_train_forward`, ``None`` where ``needs`` (or a
    missing parameter) says no gradient; built before the kernel call, which fills them."""
    n, c = x.shape[0], x.shape[1]
    dtype, act, slope, layout = x.dtype, ctx.act, ctx.slope, ctx.layout
    if dy.dtype != dtype or dy.stride() != x.stride():
        dy = torch.empty_like(x).copy_(dy)  # the kernels read dy in x's layout
    sync_threads(x.numel())
    dx = torch.empty_like(x)
    grads = torch.empty(2, c, dtype=dtype)
    dweight, dbias = grads.unbind(0)
    dw, db = grads.numpy()
    st = stats.numpy()
    result = (
        dx if needs[0] else None,
        dweight if needs[1] and weight is not None else None,
        dbias if needs[2] and bias is not None else None,
    )
    w = _param_np(weight, c, dtype, 1.0)
    if layout == "cols":
        x2 = _cols_np(x, c)
        scratch = np.empty((_pieces(x2.shape[0], c, x.element_size()), 2, c))
        K.channel_cols_backward(
            _cols_np(dy, c), x2, st[0], st[2], w, True, True, x2.shape[0], db, dw,
            _cols_np(dx, c), scratch, _zero(dtype),
        )
        return result
    s = x.numel() // (n * c)
    K.planes_backward(
        dy.numpy().reshape(n, c, s), x.detach().numpy().reshape(n, c, s), st[0], st[2], w,
        _param_np(bias, c, dtype, 0.0), act, slope, _planes_block(n, c, s, x.element_size()),
        True, dx.numpy().reshape(n, c, s), dw, db,
    )
    return result


class BatchStep:
    """BatchNorm training in one call: non-empty float32/float64 CPU input in plain eager
    mode, in a layout of :func:`_step_layout`, contiguous vectors (running buffers not
    requiring grad). The functional layer has checked the arguments: vectors ``[C]`` on
    the input's device, of its dtype (float32/float64 input takes no other)."""

    name = "cpu"
    kinds = frozenset(("batch",))

    @staticmethod
    def applies(plan: Plan, call: Call) -> bool:
        x, weight, bias, running_mean, running_var, _ = call
        if not plan.batch_stats or not _plain_eager(x):
            return False
        if _step_layout(x, fused_code(plan, x) or 0) is None:
            return False
        for vector in (weight, bias):
            if vector is not None and not vector.is_contiguous():
                return False
        return running_mean is None or (
            running_mean.is_contiguous() and running_var.is_contiguous()
            and not (running_mean.requires_grad or running_var.requires_grad)
        )

    @staticmethod
    def forward(plan: Plan, call: Call) -> Tensor:
        x, weight, bias, running_mean, running_var, _ = call
        code = fused_code(plan, x)
        layout = _step_layout(x, code or 0)
        args = (running_mean, running_var, float(plan.momentum), float(plan.eps), code or 0,
                float(plan.slope), layout)
        return run_step(_BATCH, plan, code, x, weight, bias, args)


class _BatchKernels:
    forward = staticmethod(_train_forward)
    backward = staticmethod(_train_backward)


_BATCH = _BatchKernels()


# --- per-row norms -------------------------------------------------------------------------


def _rows_params(weight: Tensor | None, bias: Tensor | None, features: int, dtype: torch.dtype):  # noqa: ANN202
    """``_param_np`` of both, flat (LayerNorm's parameters have ``normalized_shape``)."""
    w = _param_np(weight, features, dtype, 1.0)
    b = _param_np(bias, features, dtype, 0.0)
    return w.reshape(features), b.reshape(features)


def _rows_forward(
    ctx: Any,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    rows: int,
    groups: int,
    features: int,
    eps: float,
    center: bool,
    act: int,
    slope: float,
) -> Tensor:
    """The output of the per-row step; with an autograd ``ctx``, saves ``x``, the
    parameters and ``stats [3, rows]`` = (mean, biased var, rstd)."""
    dtype = x.dtype
    sync_threads(x.numel())
    y = torch.empty_like(x)
    stats = torch.empty(3, rows, dtype=dtype)
    if ctx is not None:
        ctx.save_for_backward(x, weight, bias, stats)
        ctx.rows, ctx.groups, ctx.features = rows, groups, features
        ctx.eps, ctx.center, ctx.act, ctx.slope = eps, center, act, slope
        ctx.shape4 = (rows // groups, groups, features // groups, -1)
        ctx.per_sample = True
        ctx.set_materialize_grads(False)
    w, b = _rows_params(weight, bias, features, dtype)
    K.rows_forward(
        x.detach().numpy().reshape(rows, -1), w, b, groups, center, eps,
        y.numpy().reshape(rows, -1), *stats.numpy(), True, act, slope, _zero(dtype),
    )
    return y


def _rows_backward(
    ctx: Any,
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    stats: Tensor,
    needs: tuple[bool, ...],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(dx, dweight, dbias)`` of :func:`_rows_forward`, ``None`` where ``needs`` (or a
    missing parameter) says no gradient; built before the kernel call, which fills them."""
    dtype = x.dtype
    rows, features = ctx.rows, ctx.features
    if dy.dtype != dtype or not dy.is_contiguous():
        dy = dy.to(dtype).contiguous()
    sync_threads(x.numel())
    dx = torch.empty_like(x)
    grads = torch.empty(2, features, dtype=dtype)
    partials = np.zeros((2, min(rows, ROW_PIECES), features), dtype=grads.numpy().dtype)
    result = (
        dx if needs[0] else None,
        grads[0].view(weight.shape) if needs[1] and weight is not None else None,
        grads[1].view(bias.shape) if needs[2] and bias is not None else None,
    )
    w, b = _rows_params(weight, bias, features, dtype)
    mean, _, rstd = stats.numpy()
    dw, db = grads.numpy()
    K.rows_backward(
        dy.numpy().reshape(rows, -1), x.detach().numpy().reshape(rows, -1), mean, rstd, w, b,
        ctx.groups, ctx.center, ctx.act, ctx.slope, *partials, dx.numpy().reshape(rows, -1),
        dw, db, _zero(dtype),
    )
    return result


class RowsStep:
    """LayerNorm, RMSNorm and GroupNorm in one call per direction: non-empty contiguous
    float32/float64 CPU input in plain eager mode, parameters of ``G*K`` contiguous values
    of its dtype. ``fused_only``: only where the activation is fused (an entry before
    torch's native norms); otherwise GroupNorm with one channel per group is left to the
    general kernels (short rows: the planes kernels)."""

    name = "cpu"
    kinds = frozenset(("group", "layer", "rms"))

    def __init__(self, fused_only: bool) -> None:
        self.fused_only = self.only_activated = fused_only

    def applies(self, plan: Plan, call: Call) -> bool:
        x, weight, bias = call.x, call.weight, call.bias
        if self.fused_only:
            if plan.act == "identity" or not fused_code(plan, x):
                return False
        elif plan.kind == "group" and plan.view[2] == 1:
            return False
        if not x.is_contiguous():
            return False
        if not _plain_eager(x):
            return False
        features, dtype = plan.features, x.dtype
        return all(
            p is None
            or (p.dtype == dtype and p.numel() == features and p.is_cpu and p.is_contiguous())
            for p in (weight, bias)
        )

    @staticmethod
    def forward(plan: Plan, call: Call) -> Tensor:
        x, weight, bias = call.x, call.weight, call.bias
        n, groups, k, _ = plan.view
        code = fused_code(plan, x)
        args = (n * groups, groups, groups * k, float(plan.eps), plan.center, code or 0,
                float(plan.slope))
        return run_step(_ROWS, plan, code, x, weight, bias, args)


class _RowsKernels:
    forward = staticmethod(_rows_forward)
    backward = staticmethod(_rows_backward)


_ROWS = _RowsKernels()
