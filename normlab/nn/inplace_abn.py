"""In-place activated BatchNorm (Rota Bulo, Porzi & Kontschieder, CVPR 2018).

``InPlaceABN`` computes ``z = act(BatchNorm(x))`` and keeps only ``z`` (written over ``x``'s
storage when ``inplace``) plus two ``[C]`` vectors for the backward pass, which recovers
what it needs by inverting the activation and the affine map:

    y    = act^{-1}(z)                  leaky_relu: z / slope where z < 0;  elu: log1p(z / alpha)
    xhat = (y - bias) / weight
    dy   = dz * act'(y)                 from z alone: slope (leaky_relu), z + alpha (elu)
    dx   = weight * rstd * (dy - mean(dy) - xhat * mean(dy * xhat))

Torch eager Conv-BN-act saves the conv output (for BN), the BN output (for the
activation) and the activation output (for the next conv); here the one tensor the next
conv saves anyway is enough. The activation must be invertible: ``leaky_relu`` needs
``slope > 0``, ``elu`` needs ``alpha > 0``; ``weight`` must have no zero entry (``xhat``
cannot be recovered from ``y`` there). The checkpoint is BatchNorm's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as TF

from normlab import _checks, ops
from normlab import functional as F
from normlab.nn.batchnorm import BatchNormBase
from normlab.running import update_running_stats

__all__ = ["InPlaceABN", "ABN_ACTIVATIONS"]

ABN_ACTIVATIONS = ("leaky_relu", "elu", "identity")


def _check_abn_activation(name: str, param: float) -> tuple[str, float]:
    if name not in ABN_ACTIVATIONS:
        raise ValueError(f"activation must be one of {ABN_ACTIVATIONS}, got {name!r}")
    if isinstance(param, bool) or not isinstance(param, (int, float)):
        raise TypeError(f"activation_param must be a float, got {type(param).__name__}")
    if name in ("leaky_relu", "elu") and not param > 0:
        raise ValueError(
            f"activation_param must be > 0 for {name} (the activation must be invertible to "
            f"recompute its input in backward), got {param}"
        )
    return name, float(param)


def _apply_(y: Tensor, name: str, param: float) -> Tensor:
    """The activation, in place on ``y``."""
    if name == "leaky_relu":
        return TF.leaky_relu_(y, param)
    if name == "elu":
        return TF.elu_(y, param)
    return y


def _check_overwritable(input: Tensor) -> None:
    """Autograd refuses an in-place write to a leaf that requires grad, or to a view of
    one; say so before anything (the input, the running statistics) has changed."""
    base = input if input._base is None else input._base
    if torch.is_grad_enabled() and base.is_leaf and base.requires_grad:
        raise ValueError(
            "InPlaceABN(inplace=True) writes its output over input, which is a leaf tensor "
            "that requires grad (or a view of one); pass the output of another layer, "
            "input.clone(), or build the layer with inplace=False"
        )


class _InPlaceABNFunction(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        name: str,
        param: float,
        inplace: bool,
        mask: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        y, mean, var = F.stats_and_output(x, weight, bias, eps, mask=mask)
        z = _apply_(y, name, param)
        if inplace:
            x.copy_(z)
            ctx.mark_dirty(x)
            out = x
        else:
            out = z
        ctx.save_for_backward(out, weight, bias, var)
        ctx.eps, ctx.name, ctx.param, ctx.mask = eps, name, param, mask
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, dz: Tensor, _dmean: Tensor, _dvar: Tensor
    ) -> tuple[Tensor | None, ...]:
        z, weight, bias, var = ctx.saved_tensors
        n, c = z.shape[0], z.shape[1]
        view = (n, c, 1, -1)
        mask = ctx.mask
        mask4 = None if mask is None else mask.reshape(n, 1, 1, -1)
        # a mask's valid count stays a tensor off the CPU (reading it would sync)
        count = z.numel() // c if mask is None else (
            int(mask.sum()) if mask.is_cpu else mask.sum())
        dx4, sum_dy, sum_dy_xhat = ops.pieces(z).backward_from_output(
            dz.reshape(view), z.reshape(view), weight, bias, torch.rsqrt(var + ctx.eps), count,
            ctx.name, ctx.param, mask4,
        )
        dweight = None if weight is None else sum_dy_xhat.to(weight.dtype)
        dbias = None if bias is None else sum_dy.to(bias.dtype)
        return dx4.reshape(z.shape), dweight, dbias, None, None, None, None, None


class InPlaceABN(BatchNormBase):
    """In-place activated BatchNorm over ``input [N, C, *S]`` (2-D to 5-D).

    Keyword-only: ``activation`` (``"leaky_relu"``, ``"elu"`` or ``"identity"``),
    ``activation_param`` (leaky_relu's slope or elu's alpha, > 0) and ``inplace`` (write
    the output over the input, which must then be a contiguous non-leaf tensor that no
    other op saved for backward). Training uses the memory-saving autograd function; eval
    (and the ``freeze_stats``/``small_batch`` paths) is BatchNorm then the activation.
    """

    _allowed_dims = (2, 3, 4, 5)

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
        activation: str = "leaky_relu",
        activation_param: float = 0.01,
        inplace: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs
        )
        self.activation, self.activation_param = _check_abn_activation(
            activation, activation_param
        )
        self.inplace = inplace

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, activation={self.activation!r}, "
            f"activation_param={self.activation_param}, inplace={self.inplace}"
        )

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        """``act(BatchNorm(input))``, in place when ``inplace``; ``mask`` (bool ``[N, *S]``,
        ``True`` = valid): the statistics over the valid positions."""
        mask = self._check_input_dim(input, mask)
        on_device = mask is not None and not mask.is_cpu  # counting it would read the device
        count = mask.sum() if on_device else _checks.valid_per_channel(input, mask)
        if (
            not self.training
            or self._stats_frozen(input, mask)
            or (not on_device and count <= 1)  # one value per channel, or none at all
        ):
            y = super().forward(input, mask)
            return F.activation(y, self.activation, self.activation_param)
        # Checked on CPU only: on other devices reading the answer would stall the queue
        # (a zero weight there makes the input gradient non-finite).
        if self.weight is not None and self.weight.is_cpu and bool((self.weight == 0).any()):
            raise ValueError(
                "InPlaceABN needs weight without zero entries in training (backward divides "
                "by weight to recover the normalized input)"
            )
        inplace = self.inplace and input.is_contiguous()
        if inplace:
            _check_overwritable(input)
        factor = self._average_factor()
        out, mean, var = _InPlaceABNFunction.apply(
            input, self.weight, self.bias, self.eps, self.activation, self.activation_param,
            inplace, mask,
        )
        if self.track_running_stats:
            update_running_stats(self.running_mean, self.running_var, mean, var, count, factor)
        return out
