"""NumPy float64 reference of masked normalization: statistics over the valid positions only.

A padded, variable-length batch ``x = [N, C, *S]`` comes with ``mask = [N, *S]`` (``True``:
a valid position, the same for every channel). With ``V`` the valid positions and
``M = |V|`` their number (per channel: the mask has no channel axis)::

    mean = sum_V(x) / M
    var  = sum_V((x - mean) ** 2) / M              # biased, as BatchNorm's
    y    = gamma * (x - mean) / sqrt(var + eps) + beta    # at EVERY position (Flax)

so padding does not move the statistics, and the caller masks the output downstream as
usual. The running variance stores ``var * M / (M - 1)``. A batch with no valid position
has no statistics: its output is ``beta`` (``xhat = 0``) and nothing is recorded.

Backward: every output depends on the statistics, but only valid inputs enter them. With
``r = 1 / sqrt(var + eps)``, ``xhat = (x - mean) * r`` and sums over *all* positions::

    dx_i = gamma * r * (dy_i - sum(dy) / M - xhat_i * sum(dy * xhat) / M)   i in V
    dx_p = gamma * r * dy_p                                                   p not in V

InstanceNorm and GroupNorm are the same with their own axes (``*S``; a group's channels
and ``*S``), ``M`` then per sample: ``masked_instance_norm_*`` and ``masked_group_norm_*``
(InstanceNorm's running statistics: each instance's unbiased variance over its own valid
count, averaged over the instances with at least two valid positions).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "masked_batch_stats",
    "masked_batch_norm_forward",
    "masked_batch_norm_backward",
    "masked_instance_norm_forward",
    "masked_instance_norm_backward",
    "masked_instance_norm_running",
    "masked_group_norm_forward",
    "masked_group_norm_backward",
    "concatenated_valid",
]


def _valid(x: np.ndarray, mask: ArrayLike) -> np.ndarray:
    """``mask [N, *S]`` broadcast to ``x [N, C, *S]`` as a float64 0/1 array."""
    m = np.asarray(mask, dtype=bool)
    m = np.broadcast_to(m, (x.shape[0],) + x.shape[2:])
    return np.broadcast_to(m[:, None], x.shape).astype(np.float64)


def _axes(x: np.ndarray) -> tuple[int, ...]:
    return (0,) + tuple(range(2, x.ndim))


def masked_batch_stats(x: ArrayLike, mask: ArrayLike) -> tuple[np.ndarray, np.ndarray, int]:
    """``(mean [C], biased var [C], M)`` over the valid positions (zeros when ``M == 0``)."""
    x = np.asarray(x, dtype=np.float64)
    v = _valid(x, mask)
    axes = _axes(x)
    count = int(v.sum(axis=axes)[0]) if x.shape[1] else 0
    if count == 0:
        return np.zeros(x.shape[1]), np.zeros(x.shape[1]), 0
    mean = (x * v).sum(axis=axes) / count
    shape = (1, -1) + (1,) * (x.ndim - 2)
    var = (((x - mean.reshape(shape)) * v) ** 2).sum(axis=axes) / count
    return mean, var, count


def _xhat(x: np.ndarray, mask: ArrayLike, eps: float) -> tuple[np.ndarray, np.ndarray, int]:
    mean, var, count = masked_batch_stats(x, mask)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    rstd = np.zeros_like(var) if count == 0 else 1.0 / np.sqrt(var + eps)
    return (x - mean.reshape(shape)) * rstd.reshape(shape), rstd.reshape(shape), count


def masked_batch_norm_forward(
    x: ArrayLike,
    mask: ArrayLike,
    weight: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    eps: float = 1e-5,
) -> np.ndarray:
    """Train-mode masked BatchNorm of ``x [N, C, *S]``: output at every position."""
    x = np.asarray(x, dtype=np.float64)
    xhat, _, _ = _xhat(x, mask, eps)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    y = xhat if weight is None else xhat * np.asarray(weight, np.float64).reshape(shape)
    return y if bias is None else y + np.asarray(bias, np.float64).reshape(shape)


def masked_batch_norm_backward(
    dy: ArrayLike, x: ArrayLike, mask: ArrayLike, weight: ArrayLike | None = None,
    eps: float = 1e-5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(dx [N, C, *S], dweight [C], dbias [C])`` of the masked forward (module doc)."""
    x, dy = np.asarray(x, dtype=np.float64), np.asarray(dy, dtype=np.float64)
    xhat, rstd, count = _xhat(x, mask, eps)
    v = _valid(x, mask)
    axes = _axes(x)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    w = np.ones(x.shape[1]) if weight is None else np.asarray(weight, np.float64)
    dbias, dweight = dy.sum(axis=axes), (dy * xhat).sum(axis=axes)
    scale = w.reshape(shape) * rstd
    if count == 0:
        return scale * dy, dweight, dbias
    through_stats = (dbias.reshape(shape) + xhat * dweight.reshape(shape)) / count
    return scale * (dy - v * through_stats), dweight, dbias


def concatenated_valid(x: ArrayLike, mask: ArrayLike) -> np.ndarray:
    """The valid values of ``x [N, C, *S]`` per channel as ``[M, C]``: the unmasked batch
    that masked BatchNorm must agree with."""
    x = np.asarray(x, dtype=np.float64)
    m = np.broadcast_to(np.asarray(mask, dtype=bool), (x.shape[0],) + x.shape[2:])
    return np.moveaxis(x, 1, -1)[m]


# --- the same over other axes: InstanceNorm (*S), GroupNorm (a group's channels and *S) --


def _normalize(x: np.ndarray, v: np.ndarray, axes: tuple[int, ...], eps: float):  # noqa: ANN202
    """``(xhat, rstd, count)`` with statistics over ``axes`` at the valid positions ``v``."""
    count = v.sum(axis=axes, keepdims=True)
    per = np.maximum(count, 1)
    mean = (x * v).sum(axis=axes, keepdims=True) / per
    var = (((x - mean) * v) ** 2).sum(axis=axes, keepdims=True) / per
    rstd = np.where(count > 0, 1.0 / np.sqrt(var + eps), 0.0)
    return (x - mean) * rstd, rstd, count


def _normalize_backward(dxhat, xhat, rstd, v, count, axes):  # noqa: ANN001, ANN202
    per = np.maximum(count, 1)
    through_stats = (dxhat.sum(axis=axes, keepdims=True)
                     + xhat * (dxhat * xhat).sum(axis=axes, keepdims=True)) / per
    return rstd * (dxhat - v * through_stats)


def _affine(xhat, weight, bias):  # noqa: ANN001, ANN202
    shape = (1, -1) + (1,) * (xhat.ndim - 2)
    y = xhat if weight is None else xhat * np.asarray(weight, np.float64).reshape(shape)
    return y if bias is None else y + np.asarray(bias, np.float64).reshape(shape)


def _grads(dy, xhat, weight):  # noqa: ANN001, ANN202
    """``(dxhat, dweight, dbias)`` of the per-channel affine map."""
    axes = (0,) + tuple(range(2, dy.ndim))
    shape = (1, -1) + (1,) * (dy.ndim - 2)
    w = np.ones(dy.shape[1]) if weight is None else np.asarray(weight, np.float64)
    return dy * w.reshape(shape), (dy * xhat).sum(axis=axes), dy.sum(axis=axes)


def masked_instance_norm_forward(x, mask, weight=None, bias=None, eps=1e-5):  # noqa: ANN001, ANN201
    """InstanceNorm of ``x [N, C, *S]`` with statistics per (n, c) over the valid ``*S``."""
    x = np.asarray(x, dtype=np.float64)
    xhat, _, _ = _normalize(x, _valid(x, mask), tuple(range(2, x.ndim)), eps)
    return _affine(xhat, weight, bias)


def masked_instance_norm_backward(dy, x, mask, weight=None, eps=1e-5):  # noqa: ANN001, ANN201
    """``(dx, dweight, dbias)`` of :func:`masked_instance_norm_forward`."""
    x, dy = np.asarray(x, dtype=np.float64), np.asarray(dy, dtype=np.float64)
    v, axes = _valid(x, mask), tuple(range(2, x.ndim))
    xhat, rstd, count = _normalize(x, v, axes, eps)
    dxhat, dweight, dbias = _grads(dy, xhat, weight)
    return _normalize_backward(dxhat, xhat, rstd, v, count, axes), dweight, dbias


def masked_instance_norm_running(running_mean, running_var, x, mask, momentum):  # noqa: ANN001, ANN201
    """InstanceNorm's running update: per-instance mean and unbiased variance over its valid
    count, averaged over the instances with at least two valid positions (none: unchanged)."""
    x = np.asarray(x, dtype=np.float64)
    v, axes = _valid(x, mask), tuple(range(2, x.ndim))
    count = v.sum(axis=axes)  # [N, C], equal across C
    per = np.maximum(count, 1)
    mean = (x * v).sum(axis=axes) / per
    var = (((x - mean.reshape(mean.shape + (1,) * len(axes))) * v) ** 2).sum(axis=axes) / per
    used = count[:, 0] >= 2
    rm, rv = np.asarray(running_mean, np.float64), np.asarray(running_var, np.float64)
    if not used.any():
        return rm.copy(), rv.copy()
    unbiased = var[used] * count[used] / (count[used] - 1)
    return ((1 - momentum) * rm + momentum * mean[used].mean(axis=0),
            (1 - momentum) * rv + momentum * unbiased.mean(axis=0))


def _grouped(x: np.ndarray, v: np.ndarray, groups: int):  # noqa: ANN202
    shape = (x.shape[0], groups, x.shape[1] // groups) + x.shape[2:]
    return x.reshape(shape), v.reshape(shape), tuple(range(2, len(shape)))


def masked_group_norm_forward(x, mask, num_groups, weight=None, bias=None, eps=1e-5):  # noqa: ANN001, ANN201
    """GroupNorm of ``x [N, C, *S]``: statistics per (n, group) over its valid positions."""
    x = np.asarray(x, dtype=np.float64)
    xg, vg, axes = _grouped(x, _valid(x, mask), num_groups)
    xhat, _, _ = _normalize(xg, vg, axes, eps)
    return _affine(xhat.reshape(x.shape), weight, bias)


def masked_group_norm_backward(dy, x, mask, num_groups, weight=None, eps=1e-5):  # noqa: ANN001, ANN201
    """``(dx, dweight, dbias)`` of :func:`masked_group_norm_forward`."""
    x, dy = np.asarray(x, dtype=np.float64), np.asarray(dy, dtype=np.float64)
    xg, vg, axes = _grouped(x, _valid(x, mask), num_groups)
    xhat, rstd, count = _normalize(xg, vg, axes, eps)
    dxhat, dweight, dbias = _grads(dy, xhat.reshape(x.shape), weight)
    dx = _normalize_backward(dxhat.reshape(xg.shape), xhat, rstd, vg, count, axes)
    return dx.reshape(x.shape), dweight, dbias
