"""Batch Renormalization (Ioffe, 2017): BatchNorm whose training output is corrected towards
the running statistics, so that training and inference compute the same function.

In training, with ``sigma_B = sqrt(var_B + eps)`` and ``sigma = sqrt(running_var + eps)``::

    r = clip(sigma_B / sigma, 1 / rmax, rmax)            # no gradient
    d = clip((mean_B - running_mean) / sigma, -dmax, dmax)  # no gradient
    y = weight * (xhat * r + d) + bias

then the running statistics are updated as BatchNorm does. Inference is plain BatchNorm.
Separate classes rather than a ``renorm=True`` flag on BatchNorm: the plain layers keep
exactly torch's constructor, the variant is an ``isinstance`` of ``BatchNormBase`` (so the
tools, ``freeze_batch_norm`` and ``fold`` see a BatchNorm), and its checkpoint is
BatchNorm's: ``rmax``/``dmax`` are plain attributes, not state.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from normlab import _checks
from normlab import functional as F
from normlab.nn.batchnorm import BatchNormBase

__all__ = [
    "BatchRenormBase",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "renorm_limits",
    "set_renorm_limits",
]


def _check_limit(name: str, value: float, low: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not value >= low:  # also rejects NaN
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return float(value)


class BatchRenormBase(BatchNormBase):
    """Batch Renormalization over ``input [N, C, *S]``; ``rmax >= 1`` and ``dmax >= 0``
    (keyword-only, settable at any time, e.g. by :func:`set_renorm_limits`).

    ``rmax=1, dmax=0`` is plain BatchNorm (the paper's warm-up). Renorm needs running
    statistics: with ``track_running_stats=False`` the layer is plain BatchNorm.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        rmax: float = 3.0,
        dmax: float = 5.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs
        )
        self.rmax = rmax
        self.dmax = dmax

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "rmax":
            value = _check_limit("rmax", value, 1.0)
        elif name == "dmax":
            value = _check_limit("dmax", value, 0.0)
        super().__setattr__(name, value)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rmax={self.rmax}, dmax={self.dmax}"

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        """Renormalized BatchNorm of ``input [N, C, *S]``; ``mask`` (bool ``[N, *S]``,
        ``True`` = valid): statistics, ``r``, ``d`` and the running update over the valid
        positions."""
        mask = self._check_input_dim(input, mask)
        if (
            not self.training
            or self.running_mean is None
            or self._stats_frozen(input, mask)
            or self._one_value(input, mask)
            or _checks.valid_per_channel(input, mask) == 0  # nothing to renormalize with
        ):
            return super().forward(input, mask)
        factor = self._average_factor()
        with torch.no_grad():
            mean_b, var_b = F.batch_stats(input, mask)
            sigma = torch.sqrt(self.running_var.to(var_b.dtype) + self.eps)
            r = (torch.sqrt(var_b + self.eps) / sigma).clamp(1.0 / self.rmax, self.rmax)
            d = ((mean_b - self.running_mean.to(var_b.dtype)) / sigma).clamp(-self.dmax, self.dmax)
        # weight * (xhat * r + d) + bias is BatchNorm with weight * r and weight * d + bias:
        # one kernel call, and autograd gives d/dweight = xhat * r + d with r, d constant.
        weight = self.weight if self.weight is not None else torch.ones_like(r)
        eff_weight = weight * r.to(weight.dtype)
        eff_bias = weight * d.to(weight.dtype)
        if self.bias is not None:
            eff_bias = eff_bias + self.bias
        return F._batch_norm(
            input, self.running_mean, self.running_var, eff_weight, eff_bias, True, factor,
            self.eps, mask=mask,
        )


class BatchRenorm1d(BatchRenormBase):
    """Batch Renormalization over ``[N, C]`` or ``[N, C, L]`` input."""

    _allowed_dims = (2, 3)


class BatchRenorm2d(BatchRenormBase):
    """Batch Renormalization over ``[N, C, H, W]`` input."""

    _allowed_dims = (4,)


class BatchRenorm3d(BatchRenormBase):
    """Batch Renormalization over ``[N, C, D, H, W]`` input."""

    _allowed_dims = (5,)


def renorm_limits(
    step: int,
    *,
    warmup_steps: int = 5000,
    rmax_steps: int = 40000,
    dmax_steps: int = 25000,
    rmax: float = 3.0,
    dmax: float = 5.0,
) -> tuple[float, float]:
    """The paper's schedule: ``(rmax, dmax)`` at training ``step``.

    ``(1, 0)`` (plain BatchNorm) up to ``warmup_steps``, then linear to ``rmax`` at
    ``rmax_steps`` and to ``dmax`` at ``dmax_steps``, constant afterwards. The defaults are
    the paper's (5k warm-up, ``rmax=3`` by 40k steps, ``dmax=5`` by 25k steps).
    """
    if not warmup_steps < min(rmax_steps, dmax_steps):
        raise ValueError(
            f"warmup_steps ({warmup_steps}) must be smaller than rmax_steps ({rmax_steps}) "
            f"and dmax_steps ({dmax_steps})"
        )

    def ramp(lo: float, hi: float, end: int) -> float:
        t = min(max((step - warmup_steps) / (end - warmup_steps), 0.0), 1.0)
        return lo + (hi - lo) * t

    return ramp(1.0, rmax, rmax_steps), ramp(0.0, dmax, dmax_steps)


def set_renorm_limits(model: nn.Module, rmax: float, dmax: float) -> int:
    """Set ``rmax``/``dmax`` on every Batch Renorm layer of ``model``; returns how many.

    In a training loop: ``set_renorm_limits(model, *renorm_limits(step))``.
    """
    layers = [m for m in model.modules() if isinstance(m, BatchRenormBase)]
    for layer in layers:
        layer.rmax, layer.dmax = rmax, dmax
    return len(layers)
