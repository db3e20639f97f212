"""Per-sample norms: GroupNorm, LayerNorm and RMSNorm."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from normlab import _checks
from normlab import functional as F
from normlab.nn._script import ScriptableMixin
from normlab.nn.base import CheckedHyperparameters


class GroupNorm(ScriptableMixin, CheckedHyperparameters):
    """Group Normalization (Wu & He, 2018) over ``input [N, C, *S]``.

    Statistics per sample over each group of ``C / num_groups`` channels and ``*S``; the
    affine ``weight``/``bias`` are per channel ``[C]``. Independent of the batch size.
    """

    __constants__ = ["num_groups", "num_channels", "eps", "affine"]
    act: str = "identity"  # the fused activation (GroupNormAct sets its own)
    slope: float = 0.01

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__()
        _checks.check_positive_int(num_groups, "num_groups")
        _checks.check_positive_int(num_channels, "num_channels")
        if num_channels % num_groups:
            raise ValueError(
                f"num_groups ({num_groups}) must divide num_channels ({num_channels})"
            )
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = _checks.check_eps(eps)
        self.affine = affine
        factory = {"device": device, "dtype": dtype}
        if affine:
            self.weight = nn.Parameter(torch.empty(num_channels, **factory))
            self.bias = nn.Parameter(torch.empty(num_channels, **factory)) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def _check_input(self, input: Tensor) -> None:
        _checks.check_tensor(input)
        _checks.check_min_dim(input, 2, "[N, C, *]")
        if input.shape[1] != self.num_channels:
            raise ValueError(
                f"expected input with num_channels={self.num_channels} channels at dim 1, "
                f"got input of shape {tuple(input.shape)}"
            )

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        """Normalize ``input [N, C, *S]``; ``mask`` (bool, broadcastable to ``[N, *S]``,
        ``True`` = valid): statistics over the valid positions only."""
        params, groups = self._parameters, self.num_groups
        weight, bias = params.get("weight"), params.get("bias")
        if mask is None and _checks.fits(input, (self.num_channels,), weight, bias, at=1) and (
            input.numel() // groups != 1
        ):
            return F._group_norm(input, groups, weight, bias, self.eps, self.act, self.slope)
        self._check_input(input)
        return F.group_norm(
            input, groups, weight, bias, self.eps, act=self.act, slope=self.slope, mask=mask
        )

    def extra_repr(self) -> str:
        return (
            f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, "
            f"bias={self.bias is not None}"
        )


class _TrailingNorm(ScriptableMixin, CheckedHyperparameters):
    """Shared parameters of the norms over the trailing ``normalized_shape`` dimensions."""

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        elementwise_affine: bool,
        bias: bool,
        device: Any,
        dtype: torch.dtype | None,
    ) -> None:
        super().__init__()
        self.normalized_shape = _checks.normalized_shape_tuple(normalized_shape)
        self.elementwise_affine = elementwise_affine
        factory = {"device": device, "dtype": dtype}
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(self.normalized_shape, **factory))
            if bias:
                self.bias = nn.Parameter(torch.empty(self.normalized_shape, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.elementwise_affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)


class LayerNorm(_TrailingNorm):
    """Layer Normalization (Ba et al., 2016) over the trailing ``normalized_shape`` dims.

    Input ``[*, *normalized_shape]``; ``weight``/``bias`` have shape ``normalized_shape``.
    """

    __constants__ = ["normalized_shape", "eps", "elementwise_affine"]
    act: str = "identity"  # the fused activation (LayerNormAct sets its own)
    slope: float = 0.01

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.eps = _checks.check_eps(eps)
        super().__init__(normalized_shape, elementwise_affine, bias, device, dtype)

    def forward(self, input: Tensor) -> Tensor:
        params, shape = self._parameters, self.normalized_shape
        weight, bias = params.get("weight"), params.get("bias")
        if _checks.fits(input, shape, weight, bias):
            return F._layer_norm(input, shape, weight, bias, self.eps, self.act, self.slope)
        return F.layer_norm(
            input, shape, weight, bias, self.eps, act=self.act, slope=self.slope
        )

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, "
            f"elementwise_affine={self.elementwise_affine}, bias={self.bias is not None}"
        )


class RMSNorm(_TrailingNorm):
    """Root-mean-square normalization (Zhang & Sennrich, 2019): LayerNorm without centering.

    ``y = x / sqrt(mean(x^2) + eps) * weight`` over the trailing ``normalized_shape`` dims;
    ``eps=None`` means the machine epsilon of the computation's dtype, as in torch
    (float32's for float16/bfloat16 input, float64's for float64).
    """

    __constants__ = ["normalized_shape", "eps", "elementwise_affine"]
    eps_optional = True

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float | None = None,
        elementwise_affine: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.eps = None if eps is None else _checks.check_eps(eps)
        super().__init__(normalized_shape, elementwise_affine, False, device, dtype)

    def forward(self, input: Tensor) -> Tensor:
        shape, weight = self.normalized_shape, self._parameters.get("weight")
        if _checks.fits(input, shape, weight):
            return F._rms_norm(input, shape, weight, self.eps)
        return F.rms_norm(input, shape, weight, self.eps)

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, "
            f"elementwise_affine={self.elementwise_affine}"
        )
