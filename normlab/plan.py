"""The plan of a normalization call: what to compute, before any choice of how.

Every norm of the family is one computation on the view ``x4 = [N, G, K, S]`` of its
input (see ``shared/DESIGN.md``): statistics per ``G`` over ``(N, K, S)`` (per channel)
or per ``(N, G)`` over ``(K, S)`` (per sample), mean-centred or not (RMS), then
``act(xhat * weight + bias)`` with the affine parameters flattened to ``[G*K]``.

==============  ==========================  ===========  ===========
constructor     x4 view of ``[N, C, *S]``   statistics   affine per
==============  ==========================  ===========  ===========
``batch``       ``(N, C, 1, prod(S))``      per ``C``    channel
``instance``    ``(N, C, 1, prod(S))``      per (n, c)   channel
``group``       ``(N, G, C/G, prod(S))``    per (n, g)   channel
``layer``       ``(rows, 1, D, 1)``         per row      element
``rms``         ``(rows, 1, D, 1)``         per row      element
==============  ==========================  ===========  ===========

(``D = prod(normalized_shape)``, ``rows`` the product of the leading dimensions). This
module is the only place these views and the compute dtype are made; the providers in
``normlab.ops`` receive a :class:`Plan` and the tensors as they came.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["Plan", "Call", "ACTIVATIONS", "KINDS", "compute_dtype", "batch", "instance", "group",
           "layer", "rms"]

KINDS = ("batch", "instance", "group", "layer", "rms")

# Activations a plan may carry (the fused norm + activation layers); "elu" only for
# InPlaceABN, which applies it itself.
ACTIVATIONS = ("relu", "leaky_relu", "silu", "gelu", "identity")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are accumulated in at least float32 (float64 stays float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class Plan(NamedTuple):
    """One call, described: ``kind`` (``"batch"``, ``"instance"``, ``"group"``,
    ``"layer"``, ``"rms"``), the ``view`` ``(N, G, K, S)``, statistics ``per_sample`` or
    per channel, ``center`` (False: RMS), ``batch_stats`` (normalize with the input's own
    statistics; False: with given running ones), ``eps``, ``momentum`` (the new batch's
    weight in the running average), the fused activation ``act`` and its ``slope``, and
    (LayerNorm, RMSNorm) the ``trailing`` normalized shape; ``masked``: statistics over
    the valid positions of a mask given with the call."""

    kind: str
    view: tuple[int, int, int, int]
    per_sample: bool
    center: bool
    batch_stats: bool
    eps: float
    momentum: float = 0.0
    act: str = "identity"
    slope: float = 0.0
    trailing: tuple[int, ...] = ()
    masked: bool = False

    @property
    def values(self) -> int:
        """Values behind each statistic: ``K*S`` per sample, ``N*K*S`` per channel."""
        n, _, k, s = self.view
        return k * s if self.per_sample else n * k * s

    @property
    def features(self) -> int:
        """Affine parameters: ``G*K``."""
        return self.view[1] * self.view[2]

    def x4(self, t: Tensor) -> Tensor:
        """``t`` (the input, its gradient, an output) as ``[N, G, K, S]``, a view where
        its strides allow."""
        return t.reshape(self.view)

    def mask4(self, mask: Tensor) -> Tensor:
        """A validity mask broadcast to ``[N, *S]`` as ``[N, 1, 1, S]``."""
        return mask.reshape(self.view[0], 1, 1, self.view[3])

    def flat(self, param: Tensor | None) -> Tensor | None:
        """An affine parameter as ``[G*K]``."""
        return param if param is None or param.dim() == 1 else param.reshape(self.features)


class Call(NamedTuple):
    """The tensors of one call, as the functional layer checked them: the input ``x``, the
    affine parameters, the running buffers and, for a masked plan, the validity ``mask``
    broadcast to ``[N, *S]``."""

    x: Tensor
    weight: Tensor | None = None
    bias: Tensor | None = None
    running_mean: Tensor | None = None
    running_var: Tensor | None = None
    mask: Tensor | None = None


def _by_shape(build: Callable[..., Plan]) -> Callable[..., Plan]:
    """A constructor taking the input tensor, whose plan depends only on its shape and the
    other arguments: memoized per shape (a layer sees the same few shapes, and small calls
    feel each microsecond), except under tracing, where shapes may be symbolic."""
    cached = functools.lru_cache(maxsize=512)(build)

    @functools.wraps(build)
    def make(x: Tensor, *args: object, **kwargs: object) -> Plan:
        if torch.compiler.is_compiling():
            return build(x.shape, *args, **kwargs)
        return cached(x.shape, *args, **kwargs)

    return make


def _spatial(shape: tuple[int, ...]) -> int:
    return math.prod(shape[2:]) if len(shape) > 2 else 1


@_by_shape
def batch(
    shape: tuple[int, ...],
    batch_stats: bool,
    eps: float,
    momentum: float = 0.0,
    act: str = "identity",
    slope: float = 0.0,
    masked: bool = False,
) -> Plan:
    """BatchNorm of ``x [N, C, *S]``: statistics per channel (over the valid positions of
    a mask if ``masked``)."""
    view = (shape[0], shape[1], 1, _spatial(shape))
    return Plan("batch", view, False, True, batch_stats, eps, momentum, act, slope, (),
                masked and batch_stats)


@_by_shape
def instance(
    shape: tuple[int, ...], batch_stats: bool, eps: float, momentum: float = 0.0,
    masked: bool = False,
) -> Plan:
    """InstanceNorm of ``x [N, C, *S]``: statistics per sample and channel (``batch_stats``
    False: normalized with given per-channel running statistics, as BatchNorm in eval)."""
    view = (shape[0], shape[1], 1, _spatial(shape))
    return Plan("instance", view, batch_stats, True, batch_stats, eps, momentum, "identity",
                0.0, (), masked and batch_stats)


@_by_shape
def group(
    shape: tuple[int, ...], num_groups: int, eps: float, act: str = "identity",
    slope: float = 0.0, masked: bool = False,
) -> Plan:
    """GroupNorm of ``x [N, C, *S]``: statistics per sample over each group of channels."""
    view = (shape[0], num_groups, shape[1] // num_groups, _spatial(shape))
    return Plan("group", view, True, True, True, eps, 0.0, act, slope, (), masked)


def _rows(shape: tuple[int, ...], normalized_shape: tuple[int, ...]) -> tuple[int, ...]:
    features = math.prod(normalized_shape)
    return (math.prod(shape[: len(shape) - len(normalized_shape)]), 1, features, 1)


@_by_shape
def layer(
    shape: tuple[int, ...],
    normalized_shape: tuple[int, ...],
    eps: float,
    act: str = "identity",
    slope: float = 0.0,
) -> Plan:
    """LayerNorm over the trailing ``normalized_shape`` dimensions of ``x``."""
    return Plan("layer", _rows(shape, normalized_shape), True, True, True, eps, 0.0, act,
                slope, normalized_shape)


@_by_shape
def rms(shape: tuple[int, ...], normalized_shape: tuple[int, ...], eps: float) -> Plan:
    """RMSNorm over the trailing ``normalized_shape`` dimensions of ``x``: no centering."""
    return Plan("rms", _rows(shape, normalized_shape), True, False, True, eps, 0.0, "identity",
                0.0, normalized_shape)
