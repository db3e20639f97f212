"""Entries of the CPU routes that run torch's own native kernels, where they measured
faster than normlab's (docs/backends.md) and compute the same thing: eval-mode
BatchNorm/InstanceNorm with given statistics (``torch.batch_norm``), LayerNorm and
GroupNorm (memory bound, where torch's kernels reach the copy bandwidth with less
per-call cost). Each steers around torch 2.13's known faults on CPU. Only ``"auto"``
takes them (``backend="cpu"`` always runs normlab's kernels)."""

from __future__ import annotations

import torch
from torch import Tensor

from normlab.ops import _library
from normlab.ops.composite import activation
from normlab.ops.cpu.layouts import _STEP_DTYPES
from normlab.ops.cpu.runtime import supports
from normlab.plan import Call, Plan

NAME = "native"


def _same_dtype(x: Tensor, *params: Tensor | None) -> bool:
    dtype = x.dtype
    if dtype not in _STEP_DTYPES:
        return False
    for p in params:
        if p is not None and p.dtype != dtype:
            return False
    return True


def _native_eval(
    x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None
) -> bool:
    """Whether eval-mode normalization of ``x [N, C, *S]`` with statistics ``[C]`` runs
    ``torch.batch_norm``: float32/float64 throughout, non-empty, statistics not
    differentiated, and the batch dimension outermost in memory. torch 2.13's CPU
    backward misreads a batch of one whose batch stride is below another dimension's
    (the ``[1, C, 1, S]`` view of a channels-last plane): right output, wrong gradients."""
    return (
        x.numel() > 0
        and _same_dtype(x, mean, var, weight, bias)
        and not (mean.requires_grad or var.requires_grad)
        and x.stride(0) >= max(x.stride())
    )


def group_norm_crashes(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> bool:
    """Whether torch 2.13's CPU GroupNorm would crash on ``x``: its backward segfaults
    for a non-contiguous (channels-last) input that needs no gradient while ``weight`` or
    ``bias`` do."""
    return not x.is_contiguous() and not x.requires_grad and _library.needs_grad(weight, bias)


class NativeEval:
    """``torch.batch_norm`` with the running statistics (BatchNorm and InstanceNorm in
    eval), on the input as it comes."""

    name = NAME
    kinds = frozenset(("batch", "instance"))

    @staticmethod
    def applies(plan: Plan, call: Call) -> bool:
        x, weight, bias, running_mean, running_var, _ = call
        return (
            not plan.batch_stats
            and supports(x)
            and _native_eval(x, running_mean, running_var, weight, bias)
        )

    @staticmethod
    def forward(plan: Plan, call: Call) -> Tensor:
        x, weight, bias, running_mean, running_var, _ = call
        y = torch.batch_norm(x, weight, bias, running_mean, running_var, False, 0.0, plan.eps,
                             False)
        return activation(y, plan.act, plan.slope)


class NativeNorm:
    """``torch.layer_norm`` (more than one element per row: over a single one the exact
    input gradient is 0, torch's its rounding times ``1/sqrt(eps)``) and
    ``torch.group_norm`` (more than one channel per group and ``S > 1``, not into the
    crash above): float32/float64 with parameters of the input's dtype, non-empty."""

    name = NAME
    kinds = frozenset(("layer", "group"))

    @staticmethod
    def applies(plan: Plan, call: Call) -> bool:
        x, weight, bias = call.x, call.weight, call.bias
        kind = plan.kind
        if plan.view[2] == 1 or (kind == "group" and plan.view[3] <= 1):
            return False
        return (
            x.numel() > 0
            and _same_dtype(x, weight, bias)
            and supports(x)
            and not (kind == "group" and group_norm_crashes(x, weight, bias))
        )

    @staticmethod
    def forward(plan: Plan, call: Call) -> Tensor:
        x, weight, bias = call.x, call.weight, call.bias
        if plan.kind == "layer":
            y = torch.layer_norm(x, plan.trailing, weight, bias, plan.eps)
        else:
            y = torch.group_norm(x, plan.view[1], weight, bias, plan.eps)
        return activation(y, plan.act, plan.slope)
