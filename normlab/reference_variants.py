"""NumPy float64 reference of the BatchNorm variants: the papers' formulas, written to be read.

The test oracle of ``normlab.nn`` renorm / ghost / frozen / +activation layers, in the style of
:mod:`normlab.reference` (which it builds on). Every array is ``x = [N, C, *S]``; per-channel
vectors are ``[C]``. Running statistics follow torch: biased variance to normalize, unbiased
variance into ``running_var``, ``running = (1 - momentum) * running + momentum * batch``.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike

from normlab import reference as ref

__all__ = [
    "batch_renorm_forward",
    "batch_renorm_backward",
    "ghost_batch_norm_forward",
    "ghost_batch_norm_backward",
    "ghost_update_running_stats",
    "frozen_batch_norm",
    "activation_forward",
    "activation_backward",
]


def _f64(a: ArrayLike) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _bshape(x: np.ndarray) -> tuple[int, ...]:
    return (1, x.shape[1]) + (1,) * (x.ndim - 2)


def _bn_axes(x: np.ndarray) -> tuple[int, ...]:
    return (0,) + tuple(range(2, x.ndim))


def _ones_or(p: ArrayLike | None, c: int, fill: float) -> np.ndarray:
    return np.full(c, fill) if p is None else _f64(p)


# --------------------------------------------------------------------------------------------
# Batch Renormalization (Ioffe, 2017, Algorithm 1)
# --------------------------------------------------------------------------------------------


def _renorm_parts(
    x: np.ndarray, running_mean: np.ndarray, running_var: np.ndarray, rmax: float, dmax: float,
    eps: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(xhat, mean_B, var_B, rstd_B, r, d)`` of one training batch.

    ``sigma_B = sqrt(var_B + eps)`` and ``sigma = sqrt(running_var + eps)`` (the running
    variance is torch's unbiased one, so the layer's checkpoint is BatchNorm's)::

        r = clip(sigma_B / sigma, 1 / rmax, rmax)
        d = clip((mean_B - running_mean) / sigma, -dmax, dmax)
    """
    axes = _bn_axes(x)
    xhat, mean, rstd = ref.normalize(x, axes, eps)
    mean, rstd = mean.reshape(-1), rstd.reshape(-1)
    var = 1.0 / rstd**2 - eps
    sigma = np.sqrt(running_var + eps)
    r = np.clip((1.0 / rstd) / sigma, 1.0 / rmax, rmax)
    d = np.clip((mean - running_mean) / sigma, -dmax, dmax)
    return xhat, mean, var, rstd, r, d


def batch_renorm_forward(
    x: ArrayLike,
    running_mean: ArrayLike,
    running_var: ArrayLike,
    weight: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    rmax: float = 3.0,
    dmax: float = 5.0,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One training step of Batch Renorm: ``y = weight * (xhat * r + d) + bias``.

    ``r`` and ``d`` (see :func:`_renorm_parts`) use the running statistics *before* this
    batch's update and are constants for backpropagation. Returns ``(y, new_running_mean,
    new_running_var)``. With ``rmax=1, dmax=0`` it is plain BatchNorm.
    """
    x = _f64(x)
    rm, rv = _f64(running_mean), _f64(running_var)
    c = x.shape[1]
    w, b = _ones_or(weight, c, 1.0), _ones_or(bias, c, 0.0)
    xhat, mean, var, _, r, d = _renorm_parts(x, rm, rv, rmax, dmax, eps)
    shape = _bshape(x)
    y = w.reshape(shape) * (xhat * r.reshape(shape) + d.reshape(shape)) + b.reshape(shape)
    count = x.size // c
    new_rm, new_rv, _ = ref.update_running_stats(rm, rv, mean, var, count, momentum, 0)
    return y, new_rm, new_rv


def batch_renorm_backward(
    dy: ArrayLike,
    x: ArrayLike,
    running_mean: ArrayLike,
    running_var: ArrayLike,
    weight: ArrayLike | None = None,
    rmax: float = 3.0,
    dmax: float = 5.0,
    eps: float = 1e-5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(dx, dweight, dbias)`` of :func:`batch_renorm_forward`, ``r``/``d`` held constant::

        dxhat   = dy * weight * r
        dx      = rstd_B * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
        dweight = sum(dy * (xhat * r + d)),   dbias = sum(dy)
    """
    dy, x = _f64(dy), _f64(x)
    c = x.shape[1]
    w = _ones_or(weight, c, 1.0)
    xhat, _, _, rstd, r, d = _renorm_parts(x, _f64(running_mean), _f64(running_var), rmax,
                                           dmax, eps)
    shape, axes = _bshape(x), _bn_axes(x)
    dxhat = dy * (w * r).reshape(shape)
    dx = ref.normalize_backward(dxhat, xhat, rstd.reshape(shape), axes)
    dweight = (dy * (xhat * r.reshape(shape) + d.reshape(shape))).sum(axis=axes)
    return dx, dweight, dy.sum(axis=axes)


# --------------------------------------------------------------------------------------------
# Ghost BatchNorm (Hoffer et al., 2017): BatchNorm of each virtual batch
# --------------------------------------------------------------------------------------------


def _chunks(x: np.ndarray, virtual_batch_size: int) -> list[np.ndarray]:
    """Consecutive slices of ``virtual_batch_size`` samples (the last may be shorter)."""
    return [x[i : i + virtual_batch_size] for i in range(0, x.shape[0], virtual_batch_size)]


def ghost_batch_norm_forward(
    x: ArrayLike,
    virtual_batch_size: int,
    weight: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    eps: float = 1e-5,
) -> np.ndarray:
    """Training output: each run of ``virtual_batch_size`` samples normalized with its own
    statistics, one shared ``weight``/``bias``."""
    x = _f64(x)
    parts = [ref.batch_norm_forward(p, weight, bias, eps) for p in _chunks(x, virtual_batch_size)]
    return np.concatenate(parts, axis=0)


def ghost_batch_norm_backward(
    dy: ArrayLike,
    x: ArrayLike,
    virtual_batch_size: int,
    weight: ArrayLike | None = None,
    eps: float = 1e-5,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """``(dx, dweight, dbias)``: per-chunk BatchNorm backward, parameter gradients summed."""
    dy, x = _f64(dy), _f64(x)
    outs = [
        ref.batch_norm_backward(g, p, weight, eps)
        for g, p in zip(_chunks(dy, virtual_batch_size), _chunks(x, virtual_batch_size),
                        strict=True)
    ]
    dx = np.concatenate([o[0] for o in outs], axis=0)
    if weight is None:
        return dx, None, None
    return dx, sum(o[1] for o in outs), sum(o[2] for o in outs)


def ghost_update_running_stats(
    x: ArrayLike,
    virtual_batch_size: int,
    running_mean: ArrayLike,
    running_var: ArrayLike,
    momentum: float,
    running_update: str = "mean",
) -> tuple[np.ndarray, np.ndarray]:
    """The running statistics after one training step of Ghost BatchNorm.

    - ``"mean"`` (tf.keras): one update with the average over the virtual batches of their
      means and of their *unbiased* variances;
    - ``"sequential"``: one update per virtual batch, in order, as plain BatchNorm applied
      chunk by chunk would do.
    """
    x = _f64(x)
    rm, rv = _f64(running_mean), _f64(running_var)
    stats = [ref.batch_stats(p) for p in _chunks(x, virtual_batch_size)]
    if running_update == "sequential":
        for mean, var, count in stats:
            rm, rv, _ = ref.update_running_stats(rm, rv, mean, var, count, momentum, 0)
        return rm, rv
    means = np.mean([m for m, _, _ in stats], axis=0)
    unbiased = np.mean([v * n / (n - 1) for _, v, n in stats], axis=0)
    return (1 - momentum) * rm + momentum * means, (1 - momentum) * rv + momentum * unbiased


# --------------------------------------------------------------------------------------------
# Frozen BatchNorm and the activations of the fused layers
# --------------------------------------------------------------------------------------------


def frozen_batch_norm(
    x: ArrayLike,
    weight: ArrayLike,
    bias: ArrayLike,
    running_mean: ArrayLike,
    running_var: ArrayLike,
    eps: float = 1e-5,
) -> np.ndarray:
    """``y = x * scale + shift`` with ``scale = weight / sqrt(running_var + eps)`` and
    ``shift = bias - running_mean * scale``: eval-mode BatchNorm as a fixed affine map."""
    x = _f64(x)
    scale = _f64(weight) / np.sqrt(_f64(running_var) + eps)
    shift = _f64(bias) - _f64(running_mean) * scale
    return x * scale.reshape(_bshape(x)) + shift.reshape(_bshape(x))


_SQRT2 = math.sqrt(2.0)


def _erf(v: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf, otypes=[np.float64])(v)


def activation_forward(v: ArrayLike, act: str, slope: float = 0.01, alpha: float = 1.0
                       ) -> np.ndarray:
    """relu, leaky_relu (``slope``), elu (``alpha``), silu, gelu (exact, erf) or identity."""
    v = _f64(v)
    if act == "relu":
        return np.maximum(v, 0.0)
    if act == "leaky_relu":
        return np.where(v > 0, v, slope * v)
    if act == "elu":
        return np.where(v > 0, v, alpha * np.expm1(np.minimum(v, 0.0)))
    if act == "silu":
        return v / (1.0 + np.exp(-v))
    if act == "gelu":
        return 0.5 * v * (1.0 + _erf(v / _SQRT2))
    if act == "identity":
        return v
    raise ValueError(f"unknown act {act!r}")


def activation_backward(dy: ArrayLike, v: ArrayLike, act: str, slope: float = 0.01,
                        alpha: float = 1.0) -> np.ndarray:
    """``dy * act'(v)`` at the pre-activation ``v``."""
    dy, v = _f64(dy), _f64(v)
    if act == "relu":
        return dy * (v > 0)
    if act == "leaky_relu":
        return dy * np.where(v > 0, 1.0, slope)
    if act == "elu":
        return dy * np.where(v > 0, 1.0, alpha * np.exp(np.minimum(v, 0.0)))
    if act == "silu":
        s = 1.0 / (1.0 + np.exp(-v))
        return dy * s * (1.0 + v * (1.0 - s))
    if act == "gelu":
        pdf = np.exp(-0.5 * v * v) / math.sqrt(2.0 * math.pi)
        return dy * (0.5 * (1.0 + _erf(v / _SQRT2)) + v * pdf)
    if act == "identity":
        return dy
    raise ValueError(f"unknown act {act!r}")

