"""Entries that run torch's own native kernels (cuDNN or torch's CUDA kernels on a GPU) with
normlab's semantics, on any device: the routes of devices without a normlab provider (CUDA
today; ``meta`` too, which proves they read nothing back to the host).

- BatchNorm training: ``torch.batch_norm`` on copies of the running buffers (torch's own
  update: unbiased variance, momentum), then the non-finite guard on the device
  (``torch.where``; the kept channels counted by ``normlab.running``), no host sync;
- eval with running statistics (BatchNorm, InstanceNorm): ``torch.batch_norm``;
- LayerNorm, GroupNorm, RMSNorm: ``torch.layer_norm``, ``torch.group_norm``,
  ``torch.rms_norm``.

Everything else (InstanceNorm training, masks, half-precision parameters of another dtype)
stays on the composite provider. The activation of the plan is applied after.
"""

from __future__ import annotations

import torch
from torch import Tensor

from normlab import running
from normlab.ops.composite import activation
from normlab.plan import Call, Plan

NAME = "native"


def _params_match(x: Tensor, *params: Tensor | None) -> bool:
    dtype = x.dtype
    return all(p is None or p.dtype == dtype for p in params)


class NativeBatchTrain:
    """BatchNorm training by ``torch.batch_norm``, the running update guarded on the device."""

    name = NAME
    kinds = frozenset(("batch",))

    @staticmethod
    def applies(plan: Plan, call: Call) -> bool:
        x = call.x
        return plan.batch_stats and x.numel() > 0 and _params_match(
            x, call.weight, call.bias, call.running_mean, call.running_var
        )

    @staticmethod
    def forward(plan: Plan, call: Call) -> Tensor:
        x, weight, bias, running_mean, running_var, _ = call
        if running_mean is None:
            y = torch.batch_norm(x, weight, bias, None, None, True, 0.0, plan.eps, True)
            return activation(y, plan.act, plan.slope)
        new_mean, new_var = running_mean.detach().clone(), running_var.detach().clone()
        y = torch.batch_norm(x, weight, bias, new_mean, new_var, True, plan.momentum, plan.eps,
                             True)
        with torch.no_grad():
            finite = torch.isfinite(new_mean).logical_and_(torch.isfinite(new_var))
            running_mean.copy_(torch.where(finite, new_mean, running_mean))
            running_var.copy_(torch.where(finite, new_var, running_var))
            running.count_kept(finite)
        return activation(y, plan.act, plan.slope)


class NativeEval:
    """Eval with the running statistics (BatchNorm, InstanceNorm) by ``torch.batch_norm``."""

    name = NAME
    kinds = frozenset(("batch", "instance"))

    @staticmethod
    def applies(plan: Plan, call: Call) -> bool:
        return not plan.batch_stats and _params_match(
            call.x, call.weight, call.bias, call.running_mean, call.running_var
        )

    @staticmethod
    def forward(plan: Plan, call: Call) -> Tensor:
        x, weight, bias, running_mean, running_var, _ = call
        y = torch.batch_norm(x, weight, bias, running_mean, running_var, False, 0.0, plan.eps,
                             True)
        return activation(y, plan.act, plan.slope)


class NativeNorm:
    """LayerNorm, GroupNorm and RMSNorm by torch's functions, on the input as it comes."""

    name = NAME
    kinds = frozenset(("layer", "group", "rms"))

    @staticmethod
    def applies(plan: Plan, call: Call) -> bool:
        return call.x.numel() > 0 and _params_match(call.x, call.weight, call.bias)

    @staticmethod
    def forward(plan: Plan, call: Call) -> Tensor:
        x, weight, bias = call.x, call.weight, call.bias
        if plan.kind == "layer":
            y = torch.layer_norm(x, plan.trailing, weight, bias, plan.eps)
        elif plan.kind == "rms":
            y = torch.rms_norm(x, plan.trailing, weight, plan.eps)
        else:
            y = torch.group_norm(x, plan.view[1], weight, bias, plan.eps)
        return activation(y, plan.act, plan.slope)


ROUTES = {"train": (NativeBatchTrain(), NativeNorm()), "eval": (NativeEval(),)}
DEVICE_TYPES = ("cuda", "meta")
