"""Norm + activation layers: ``act(norm(x))`` in one layer (timm's convention).

Each subclasses the plain normlab layer, so parameters, buffers and state_dict keys are the
plain layer's: a ``BatchNorm2d`` checkpoint loads into ``BatchNormAct2d`` and back. ``act``
is one of ``relu``, ``leaky_relu`` (with ``slope``), ``silu``, ``gelu`` (exact), ``identity``.

The activation travels in the call's plan (``normlab.functional``'s ``act=``): on a
contiguous float32/float64 CPU tensor with the ``auto`` or ``cpu`` backend and a
``relu``/``leaky_relu`` activation, ``BatchNormAct*d`` (in training), ``GroupNormAct`` and
``LayerNormAct`` run fused kernels (one pass forward, two per channel or row backward,
only the input saved); elsewhere the norm's provider applies the activation after it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from normlab.functional import check_activation
from normlab.nn.batchnorm import BatchNormBase
from normlab.nn.normalization import GroupNorm, LayerNorm

__all__ = [
    "BatchNormActBase",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "GroupNormAct",
    "LayerNormAct",
]


class _ActMixin:
    # Defined here, not only per instance: a layer class that sets its own activation
    # computes something else than its plain norm (normlab.nn._script.computes_like).
    act: str = "relu"
    slope: float = 0.01

    def _set_act(self, act: str, slope: float) -> None:
        self.act, self.slope = check_activation(act, slope)

    def _act_repr(self) -> str:
        return f", act={self.act!r}" + (f", slope={self.slope}" if self.act == "leaky_relu" else "")


class BatchNormActBase(_ActMixin, BatchNormBase):
    """``act(BatchNorm(input [N, C, *S]))``; keyword-only ``act`` and ``slope``."""

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
        act: str = "relu",
        slope: float = 0.01,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs
        )
        self._set_act(act, slope)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._act_repr()


class BatchNormAct1d(BatchNormActBase):
    """BatchNorm1d + activation over ``[N, C]`` or ``[N, C, L]`` input."""

    _allowed_dims = (2, 3)


class BatchNormAct2d(BatchNormActBase):
    """BatchNorm2d + activation over ``[N, C, H, W]`` input."""

    _allowed_dims = (4,)


class BatchNormAct3d(BatchNormActBase):
    """BatchNorm3d + activation over ``[N, C, D, H, W]`` input."""

    _allowed_dims = (5,)


class GroupNormAct(_ActMixin, GroupNorm):
    """``act(GroupNorm(input [N, C, *S]))``; torch's GroupNorm arguments plus ``act``/``slope``."""

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
        act: str = "relu",
        slope: float = 0.01,
    ) -> None:
        super().__init__(num_groups, num_channels, eps, affine, device, dtype, bias=bias)
        self._set_act(act, slope)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._act_repr()



class LayerNormAct(_ActMixin, LayerNorm):
    """``act(LayerNorm(input [*, *normalized_shape]))``; plus ``act``/``slope``."""

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        act: str = "relu",
        slope: float = 0.01,
    ) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)
        self._set_act(act, slope)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._act_repr()
