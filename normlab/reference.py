"""NumPy float64 reference of the normalization family: the textbook formulas, written to be read.

This module is the test oracle of normlab. It favours clarity over speed: every function
converts its inputs to ``float64`` NumPy arrays and spells out the math.

The one formula
---------------
Every norm in the family computes, for an input ``x`` and a set of reduction axes::

    mean = mean(x, axes)                          # mu
    var  = mean((x - mean) ** 2, axes)            # biased variance (divide by M, not M - 1)
    xhat = (x - mean) / sqrt(var + eps)
    y    = gamma * xhat + beta                    # optional per-feature affine transform

RMSNorm skips the centring: ``xhat = x / sqrt(mean(x ** 2, axes) + eps)`` and has no beta.

The family is this one computation plus a choice of axes (``x`` is ``[N, C, *S]`` except for
LayerNorm/RMSNorm, where it is ``[*, *normalized_shape]``):

============  =========================  =======================  ======================
norm          statistics per             reduced over             gamma / beta shape
============  =========================  =======================  ======================
BatchNorm     channel ``c``              ``N, *S``                ``[C]``
InstanceNorm  sample ``n``, channel      ``*S``                   ``[C]``
GroupNorm     sample ``n``, group ``g``  ``C/G`` channels, ``*S`` ``[C]``
LayerNorm     every leading index        last ``k`` dims          ``normalized_shape``
RMSNorm       every leading index        last ``k`` dims, no mu   ``normalized_shape``
============  =========================  =======================  ======================

Running statistics (BatchNorm, InstanceNorm with ``track_running_stats``)
-------------------------------------------------------------------------
PyTorch normalizes with the *biased* batch variance but stores the *unbiased* one
(``var * M / (M - 1)``) in ``running_var``, and updates::

    running = (1 - momentum) * running + momentum * batch

so ``momentum`` is the weight of the *new* batch. Keras and Flax store the biased variance and
call the weight of the *old* value momentum: Keras ``momentum=0.99`` is torch ``momentum=0.01``.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import prod

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "moments",
    "normalize",
    "normalize_backward",
    "batch_stats",
    "update_running_stats",
    "batch_norm_forward",
    "batch_norm_backward",
    "batch_norm_eval",
    "batch_norm_eval_backward",
    "instance_norm_forward",
    "instance_norm_backward",
    "instance_norm_update_running_stats",
    "group_norm_forward",
    "group_norm_backward",
    "layer_norm_forward",
    "layer_norm_backward",
    "rms_norm_forward",
    "rms_norm_backward",
]

Axes = Sequence[int]


def _f64(a: ArrayLike) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _opt_f64(a: ArrayLike | None) -> np.ndarray | None:
    return None if a is None else _f64(a)


# --------------------------------------------------------------------------------------------
# Generic core: the whole family is these three functions plus a choice of axes.
# --------------------------------------------------------------------------------------------


def moments(x: ArrayLike, axes: Axes, center: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Mean and biased variance of ``x`` over ``axes`` (both with ``keepdims=True``).

    Two-pass on purpose: first the mean, then the mean of squared deviations, which stays
    accurate when the mean is large compared with the spread (``E[x^2] - E[x]^2`` does not).
    With ``center=False`` (RMSNorm) the mean is zeros and ``var`` is the mean of squares.
    """
    x = _f64(x)
    axes = tuple(axes)
    if center:
        mean = x.mean(axis=axes, keepdims=True)
    else:
        mean = np.zeros_like(x.sum(axis=axes, keepdims=True))
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    return mean, var


def normalize(
    x: ArrayLike, axes: Axes, eps: float, center: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``xhat = (x - mean) * rstd`` with ``rstd = 1 / sqrt(var + eps)`` over ``axes``.

    Returns ``(xhat, mean, rstd)``; ``xhat`` has the shape of ``x``, ``mean`` and ``rstd``
    keep the reduced axes with size 1.
    """
    x = _f64(x)
    mean, var = moments(x, axes, center=center)
    rstd = 1.0 / np.sqrt(var + eps)
    return (x - mean) * rstd, mean, rstd


def normalize_backward(
    dxhat: ArrayLike,
    xhat: ArrayLike,
    rstd: ArrayLike,
    axes: Axes,
    center: bool = True,
) -> np.ndarray:
    """Gradient of the loss w.r.t. ``x`` given the gradient w.r.t. ``xhat = (x - mu) * r``.

    Derivation (``M`` elements per statistic, ``r = (var + eps)^(-1/2)``, means over ``axes``):
    ``d mu / d x_i = 1/M``, ``d var / d x_i = 2 (x_i - mu) / M`` (the ``mu`` term vanishes since
    ``sum(x - mu) = 0``), so ``d r / d x_i = -r^3 (x_i - mu) / M``. The chain rule over all
    ``j`` then gives, exactly and for any ``eps``::

        dx = r * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))

    Without centring (RMSNorm, ``xhat = x * r``, ``r = (mean(x^2) + eps)^(-1/2)``) there is no
    ``mu``, so the ``mean(dxhat)`` term drops::

        dx = r * (dxhat - xhat * mean(dxhat * xhat))
    """
    dxhat, xhat, rstd = _f64(dxhat), _f64(xhat), _f64(rstd)
    axes = tuple(axes)
    proj = xhat * (dxhat * xhat).mean(axis=axes, keepdims=True)
    if center:
        return rstd * (dxhat - dxhat.mean(axis=axes, keepdims=True) - proj)
    return rstd * (dxhat - proj)


def _affine(
    xhat: np.ndarray, weight: np.ndarray | None, bias: np.ndarray | None, shape: tuple[int, ...]
) -> np.ndarray:
    """``y = weight * xhat + bias`` with ``weight``/``bias`` reshaped to broadcast as ``shape``."""
    y = xhat
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


def _affine_backward(
    dy: np.ndarray,
    xhat: np.ndarray,
    weight: np.ndarray | None,
    shape: tuple[int, ...],
    param_shape: tuple[int, ...],
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Backward of ``y = weight * xhat + bias``: ``(dxhat, dweight, dbias)``.

    ``dweight = sum(dy * xhat)`` and ``dbias = sum(dy)`` over every axis where the parameter is
    broadcast (``shape`` has 1); both are ``None`` when ``weight`` is ``None`` (no affine).
    """
    if weight is None:
        return dy, None, None
    bcast = tuple(i for i, s in enumerate(shape) if s == 1)
    dweight = (dy * xhat).sum(axis=bcast).reshape(param_shape)
    dbias = dy.sum(axis=bcast).reshape(param_shape)
    return dy * weight.reshape(shape), dweight, dbias


def _channel_shape(x: np.ndarray, name: str = "x") -> tuple[int, ...]:
    """Broadcast shape ``(1, C, 1, ..., 1)`` of a per-channel parameter for ``x = [N, C, *S]``."""
    if x.ndim < 2:
        raise ValueError(f"{name} must have shape [N, C, *S] (ndim >= 2), got shape {x.shape}")
    return (1, x.shape[1]) + (1,) * (x.ndim - 2)


def _check_param(p: np.ndarray | None, size: tuple[int, ...], name: str) -> None:
    if p is not None and p.shape != size:
        raise ValueError(f"{name} must have shape {size}, got {p.shape}")


# --------------------------------------------------------------------------------------------
# BatchNorm: statistics per channel, reduced over N and the spatial axes.
# --------------------------------------------------------------------------------------------


def _bn_axes(x: np.ndarray) -> tuple[int, ...]:
    return (0,) + tuple(range(2, x.ndim))


def batch_stats(x: ArrayLike) -> tuple[np.ndarray, np.ndarray, int]:
    """Batch statistics of BatchNorm for ``x = [N, C, *S]``.

    Returns ``(mean[C], var[C], count)``: ``var`` is biased (divides by ``count``) and
    ``count = N * prod(S)`` is the number of values per channel (NaN statistics when 0).
    """
    x = _f64(x)
    _channel_shape(x)
    count = prod(x.shape) // x.shape[1] if x.shape[1] else 0
    if count == 0:
        # No values: the statistics are undefined (NaN); update_running_stats ignores them.
        nan = np.full(x.shape[1], np.nan)
        return nan, nan.copy(), 0
    mean, var = moments(x, _bn_axes(x))
    return mean.reshape(-1), var.reshape(-1), count


def update_running_stats(
    running_mean: ArrayLike,
    running_var: ArrayLike,
    batch_mean: ArrayLike,
    batch_var_biased: ArrayLike,
    count: int,
    momentum: float | None,
    num_batches_tracked: int,
) -> tuple[np.ndarray, np.ndarray, int]:
    """One train-step update of BatchNorm's buffers, with torch's semantics.

    ::

        num_batches_tracked += 1
        factor       = momentum                   if momentum is not None
                     = 1 / num_batches_tracked    otherwise (cumulative moving average)
        running_mean = (1 - factor) * running_mean + factor * batch_mean
        running_var  = (1 - factor) * running_var  + factor * batch_var * count / (count - 1)

    ``running_var`` stores the *unbiased* variance. A batch with ``count == 0`` (empty) leaves
    the running buffers unchanged but still counts, as torch does; ``count == 1`` raises, as
    torch does in training ("Expected more than 1 value per channel").
    Returns ``(new_running_mean, new_running_var, new_num_batches_tracked)``.
    """
    rm, rv = _f64(running_mean), _f64(running_var)
    bm, bv = _f64(batch_mean), _f64(batch_var_biased)
    if count == 1:
        raise ValueError("count must be > 1 to compute an unbiased variance, got 1")
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    nbt = int(num_batches_tracked) + 1
    if count == 0:
        return rm.copy(), rv.copy(), nbt
    factor = 1.0 / nbt if momentum is None else float(momentum)
    unbiased = bv * count / (count - 1)
    return (1 - factor) * rm + factor * bm, (1 - factor) * rv + factor * unbiased, nbt


def batch_norm_forward(
    x: ArrayLike,
    weight: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    eps: float = 1e-5,
) -> np.ndarray:
    """Train-mode BatchNorm of ``x = [N, C, *S]`` with batch statistics; ``weight``/``bias`` [C]."""
    x, weight, bias = _f64(x), _opt_f64(weight), _opt_f64(bias)
    shape = _channel_shape(x)
    _check_param(weight, (x.shape[1],), "weight")
    _check_param(bias, (x.shape[1],), "bias")
    if x.size == 0:
        return np.empty_like(x)  # no values per channel: nothing to normalize
    xhat, _, _ = normalize(x, _bn_axes(x), eps)
    return _affine(xhat, weight, bias, shape)


def batch_norm_backward(
    dy: ArrayLike, x: ArrayLike, weight: ArrayLike | None = None, eps: float = 1e-5
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Train-mode BatchNorm backward: ``(dx [N, C, *S], dweight [C], dbias [C])``.

    The gradient flows through the batch statistics (see :func:`normalize_backward`).
    ``dweight``/``dbias`` are ``None`` when ``weight`` is ``None``.
    """
    dy, x, weight = _f64(dy), _f64(x), _opt_f64(weight)
    shape = _channel_shape(x)
    if x.size == 0:
        # Sums over no values are zero, as in torch.
        dparam = None if weight is None else np.zeros(x.shape[1])
        return np.empty_like(x), dparam, None if dparam is None else dparam.copy()
    axes = _bn_axes(x)
    xhat, _, rstd = normalize(x, axes, eps)
    dxhat, dweight, dbias = _affine_backward(dy, xhat, weight, shape, (x.shape[1],))
    return normalize_backward(dxhat, xhat, rstd, axes), dweight, dbias


def batch_norm_eval(
    x: ArrayLike,
    running_mean: ArrayLike,
    running_var: ArrayLike,
    weight: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    eps: float = 1e-5,
) -> np.ndarray:
    """Eval-mode BatchNorm: ``y = weight * (x - running_mean) / sqrt(running_var + eps) + bias``.

    The running statistics are constants here, so the map is affine per channel.
    """
    x, weight, bias = _f64(x), _opt_f64(weight), _opt_f64(bias)
    shape = _channel_shape(x)
    rm = _f64(running_mean).reshape(shape)
    rv = _f64(running_var).reshape(shape)
    return _affine((x - rm) / np.sqrt(rv + eps), weight, bias, shape)


def batch_norm_eval_backward(
    dy: ArrayLike,
    x: ArrayLike,
    running_mean: ArrayLike,
    running_var: ArrayLike,
    weight: ArrayLike | None = None,
    eps: float = 1e-5,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Eval-mode BatchNorm backward: ``dx = dy * weight / sqrt(running_var + eps)``.

    No gradient flows through the (constant) running statistics. Returns
    ``(dx, dweight, dbias)``; ``dweight = sum(dy * xhat)``, ``dbias = sum(dy)`` over ``N, *S``.
    """
    dy, x, weight = _f64(dy), _f64(x), _opt_f64(weight)
    shape = _channel_shape(x)
    rstd = 1.0 / np.sqrt(_f64(running_var).reshape(shape) + eps)
    xhat = (x - _f64(running_mean).reshape(shape)) * rstd
    dxhat, dweight, dbias = _affine_backward(dy, xhat, weight, shape, (x.shape[1],))
    return dxhat * rstd, dweight, dbias


# --------------------------------------------------------------------------------------------
# InstanceNorm: statistics per (sample, channel), reduced over the spatial axes.
# --------------------------------------------------------------------------------------------


def _in_axes(x: np.ndarray) -> tuple[int, ...]:
    if x.ndim < 3:
        raise ValueError(
            f"x must have shape [N, C, *S] with at least one spatial dim, got shape {x.shape}"
        )
    return tuple(range(2, x.ndim))


def instance_norm_forward(
    x: ArrayLike,
    weight: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    eps: float = 1e-5,
) -> np.ndarray:
    """InstanceNorm of ``x = [N, C, *S]`` with per-(n, c) statistics; ``weight``/``bias`` [C]."""
    x, weight, bias = _f64(x), _opt_f64(weight), _opt_f64(bias)
    axes = _in_axes(x)
    shape = _channel_shape(x)
    _check_param(weight, (x.shape[1],), "weight")
    _check_param(bias, (x.shape[1],), "bias")
    xhat, _, _ = normalize(x, axes, eps)
    return _affine(xhat, weight, bias, shape)


def instance_norm_backward(
    dy: ArrayLike, x: ArrayLike, weight: ArrayLike | None = None, eps: float = 1e-5
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """InstanceNorm backward: ``(dx [N, C, *S], dweight [C], dbias [C])``."""
    dy, x, weight = _f64(dy), _f64(x), _opt_f64(weight)
    axes = _in_axes(x)
    shape = _channel_shape(x)
    xhat, _, rstd = normalize(x, axes, eps)
    dxhat, dweight, dbias = _affine_backward(dy, xhat, weight, shape, (x.shape[1],))
    return normalize_backward(dxhat, xhat, rstd, axes), dweight, dbias


def instance_norm_update_running_stats(
    running_mean: ArrayLike,
    running_var: ArrayLike,
    x: ArrayLike,
    momentum: float | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Running-statistics update of InstanceNorm with ``track_running_stats=True`` (torch).

    torch computes the mean and the *unbiased* variance per (n, c) over ``*S`` (``M = prod(S)``
    values), applies the momentum update to each, then averages over ``n``; since the update
    is linear that is::

        running_mean = (1 - m) * running_mean + m * mean_n(mean_nc)
        running_var  = (1 - m) * running_var  + m * mean_n(var_nc * M / (M - 1))

    torch's InstanceNorm modules pass ``momentum=None`` as ``0.0``: no update at all (there is
    no cumulative average and no ``num_batches_tracked`` use). This function does the same.
    Returns ``(new_running_mean [C], new_running_var [C])``.
    """
    x = _f64(x)
    axes = _in_axes(x)
    m = 0.0 if momentum is None else float(momentum)
    count = prod(x.shape[2:])
    if count == 1:
        raise ValueError("x must have more than 1 spatial value per channel, got 1")
    rm, rv = _f64(running_mean), _f64(running_var)
    if x.shape[0] == 0 or count == 0:
        return rm.copy(), rv.copy()
    mean, var = moments(x, axes)  # [N, C, 1, ...]
    unbiased = var * count / (count - 1)
    batch_mean = mean.reshape(x.shape[:2]).mean(axis=0)
    batch_var = unbiased.reshape(x.shape[:2]).mean(axis=0)
    return (1 - m) * rm + m * batch_mean, (1 - m) * rv + m * batch_var


# --------------------------------------------------------------------------------------------
# GroupNorm: statistics per (sample, group), reduced over the group's channels and *S.
# --------------------------------------------------------------------------------------------


def _grouped(x: np.ndarray, num_groups: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """View ``x = [N, C, *S]`` as ``[N, G, C/G, *S]`` and return it with its reduction axes."""
    _channel_shape(x)
    if num_groups <= 0 or x.shape[1] % num_groups:
        raise ValueError(
            f"num_groups must be positive and divide the channels C={x.shape[1]}, got {num_groups}"
        )
    xg = x.reshape((x.shape[0], num_groups, x.shape[1] // num_groups) + x.shape[2:])
    return xg, tuple(range(2, xg.ndim))


def group_norm_forward(
    x: ArrayLike,
    num_groups: int,
    weight: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    eps: float = 1e-5,
) -> np.ndarray:
    """GroupNorm of ``x = [N, C, *S]`` in ``num_groups`` groups; ``weight``/``bias`` [C]."""
    x, weight, bias = _f64(x), _opt_f64(weight), _opt_f64(bias)
    shape = _channel_shape(x)
    _check_param(weight, (x.shape[1],), "weight")
    _check_param(bias, (x.shape[1],), "bias")
    xg, axes = _grouped(x, num_groups)
    xhat, _, _ = normalize(xg, axes, eps)
    return _affine(xhat.reshape(x.shape), weight, bias, shape)


def group_norm_backward(
    dy: ArrayLike,
    x: ArrayLike,
    num_groups: int,
    weight: ArrayLike | None = None,
    eps: float = 1e-5,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """GroupNorm backward: ``(dx [N, C, *S], dweight [C], dbias [C])``."""
    dy, x, weight = _f64(dy), _f64(x), _opt_f64(weight)
    shape = _channel_shape(x)
    xg, axes = _grouped(x, num_groups)
    xhat_g, _, rstd = normalize(xg, axes, eps)
    xhat = xhat_g.reshape(x.shape)
    dxhat, dweight, dbias = _affine_backward(dy, xhat, weight, shape, (x.shape[1],))
    dx = normalize_backward(dxhat.reshape(xg.shape), xhat_g, rstd, axes)
    return dx.reshape(x.shape), dweight, dbias


# --------------------------------------------------------------------------------------------
# LayerNorm / RMSNorm: statistics per leading index, reduced over the last k dims.
# --------------------------------------------------------------------------------------------


def _trailing(
    x: np.ndarray, normalized_shape: int | Sequence[int]
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """``(normalized_shape, reduction axes, broadcast shape)`` of the trailing dims of ``x``."""
    ns = (
        (int(normalized_shape),)
        if np.isscalar(normalized_shape)
        else tuple(int(d) for d in normalized_shape)
    )
    k = len(ns)
    if k == 0 or x.ndim < k or x.shape[x.ndim - k :] != ns:
        raise ValueError(f"normalized_shape {ns} must be a non-empty suffix of x's shape {x.shape}")
    axes = tuple(range(x.ndim - k, x.ndim))
    return ns, axes, (1,) * (x.ndim - k) + ns


def layer_norm_forward(
    x: ArrayLike,
    normalized_shape: int | Sequence[int],
    weight: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    eps: float = 1e-5,
) -> np.ndarray:
    """LayerNorm of ``x = [*, *normalized_shape]``; ``weight``/``bias`` are ``normalized_shape``."""
    x, weight, bias = _f64(x), _opt_f64(weight), _opt_f64(bias)
    ns, axes, shape = _trailing(x, normalized_shape)
    _check_param(weight, ns, "weight")
    _check_param(bias, ns, "bias")
    xhat, _, _ = normalize(x, axes, eps)
    return _affine(xhat, weight, bias, shape)


def layer_norm_backward(
    dy: ArrayLike,
    x: ArrayLike,
    normalized_shape: int | Sequence[int],
    weight: ArrayLike | None = None,
    eps: float = 1e-5,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """LayerNorm backward: ``(dx, dweight, dbias)``; parameter grads are ``normalized_shape``."""
    dy, x, weight = _f64(dy), _f64(x), _opt_f64(weight)
    ns, axes, shape = _trailing(x, normalized_shape)
    xhat, _, rstd = normalize(x, axes, eps)
    dxhat, dweight, dbias = _affine_backward(dy, xhat, weight, shape, ns)
    return normalize_backward(dxhat, xhat, rstd, axes), dweight, dbias


def _rms_eps(eps: float | None) -> float:
    # torch uses finfo(input.dtype).eps; the reference always works in float64, so callers
    # comparing with float32/half inputs must pass that dtype's eps explicitly.
    return float(np.finfo(np.float64).eps) if eps is None else float(eps)


def rms_norm_forward(
    x: ArrayLike,
    normalized_shape: int | Sequence[int],
    weight: ArrayLike | None = None,
    eps: float | None = None,
) -> np.ndarray:
    """RMSNorm: ``y = weight * x / sqrt(mean(x^2) + eps)`` over the trailing dims.

    ``eps=None`` means ``np.finfo(np.float64).eps`` (torch: ``finfo(input.dtype).eps``, so pass
    ``eps`` explicitly when comparing with float32 inputs).
    """
    x, weight = _f64(x), _opt_f64(weight)
    ns, axes, shape = _trailing(x, normalized_shape)
    _check_param(weight, ns, "weight")
    xhat, _, _ = normalize(x, axes, _rms_eps(eps), center=False)
    return _affine(xhat, weight, None, shape)


def rms_norm_backward(
    dy: ArrayLike,
    x: ArrayLike,
    normalized_shape: int | Sequence[int],
    weight: ArrayLike | None = None,
    eps: float | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """RMSNorm backward: ``(dx, dweight)`` (no bias); ``dweight`` is ``None`` without weight."""
    dy, x, weight = _f64(dy), _f64(x), _opt_f64(weight)
    ns, axes, shape = _trailing(x, normalized_shape)
    xhat, _, rstd = normalize(x, axes, _rms_eps(eps), center=False)
    dxhat, dweight, _ = _affine_backward(dy, xhat, weight, shape, ns)
    return normalize_backward(dxhat, xhat, rstd, axes, center=False), dweight
