"""How the numba kernels of the CPU provider compute, and their shared helpers.

They work on three layouts of the canonical ``[N, G, K, S]`` view:

- **rows**: ``x [R, L]`` C-contiguous, ``R = N*G`` rows of ``L = K*S`` elements; the
  affine index of element ``(r, k*S + s)`` is ``(r % G)*K + k``. Per-sample norms take
  their statistics per row (``rows_*``); contiguous (NCHW) BatchNorm (``K == 1``) per
  channel ``r % C`` over the ``N`` planes (``channel_rows_*``).
- **cols**: ``x [M, C]`` C-contiguous, ``M = N*S`` rows of ``C`` channels (channels-last
  BatchNorm, or any ``S == 1`` input): statistics per column (``channel_cols_*``).
- **planes**: ``x [N, C, S]`` C-contiguous, statistics per channel over its ``N`` planes,
  channels in blocks (``planes_*``: NCHW BatchNorm with many channels, and the short rows
  of InstanceNorm/GroupNorm run as ``[1, N*C, S]``).

Every kernel is deterministic at any thread count: work is cut into a fixed, shape-only
set of pieces (rows, planes or row chunks), each piece writes its own partial result,
and partials are merged serially in a fixed order. Sums are accumulated in float64; the
variance is taken about a shift (the first pass's mean on long rows, the first value on
short rows and planes) with the shifted-data correction, and partial (mean, M2) pairs
are combined exactly with
``M2 = sum M2_i + sum n_i (mean_i - mean)^2``. Elementwise work stays in the data dtype
so it vectorizes at full width. ``fastmath`` allows reassociation (vector accumulators)
and contraction, not ``nnan``/``ninf``: NaN and Inf propagate as in torch.

Compile time is the cost of numba (seconds per kernel and dtype, then cached on disk; the cache
is keyed by the contents of this whole folder: the kernels inline these helpers), so
there are few kernels (rows, channel rows, channel cols and planes, forward and backward
each, and the running update), one or two ``prange`` loops each, and only ``prange`` is
parallelized (no implicit parfors from array expressions or allocations). All arrays of
a call share one dtype (float32 or float64) except the float64 scratch buffers: two
signatures per kernel. Flags are runtime arguments, not compile-time variants.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_FASTMATH = {"reassoc", "contract", "nsz"}


def _parallel_options() -> dict[str, bool]:
    # A fresh dict each time: numba consumes (pops) it.
    return {
        "prange": True, "comprehension": False, "reduction": False, "inplace_binop": False,
        "setitem": False, "numpy": False, "stencil": False, "fusion": False,
    }


def _jit(parallel: bool):  # noqa: ANN202
    # error_model="numpy": no ZeroDivisionError checks in the loops (they block vectorization).
    return njit(
        parallel=_parallel_options() if parallel else False,
        cache=True, nogil=True, fastmath=_FASTMATH, error_model="numpy",
    )


# Sums are accumulated in the data dtype over blocks of at most this many values (so they
# vectorize at full width and each lane adds only a few values), and the block sums in
# float64: the accuracy of float64 accumulation at the speed of the data dtype.
_BLOCK = 256
# Rows of at most this many values take one float64 pass for their moments (_moments).
_SHORT_ROW = 256
# float64 block accumulators, for data whose squares overflow its own dtype.
_FLOAT64_ZERO = np.zeros(1)
# Past this sum of squared deviations, some |x - mean| may exceed float32's range (each
# one is at most its square root): such a row or plane is normalized in float64.
_WIDE_M2 = float(np.finfo(np.float32).max) ** 2 / 4


@_jit(parallel=False)
def _chunk(index, pieces, total):
    """Start and stop of piece ``index`` of ``pieces`` near-equal pieces of ``range(total)``."""
    return index * total // pieces, (index + 1) * total // pieces


@_jit(parallel=False)
def _sum(v, zero):
    """float64 sum of the 1-D array ``v``, blocked (``zero``: a 1-element array of 0 in the
    data dtype, which types the block accumulators)."""
    total = 0.0
    for j0 in range(0, v.shape[0], _BLOCK):
        blk = v[j0:j0 + _BLOCK]
        acc = zero[0]
        for j in range(blk.shape[0]):
            acc += blk[j]
        total += acc
    return total


@_jit(parallel=False)
def _deviation_sums(v, m, zero):
    """float64 ``(sum(v - m), sum((v - m)^2))`` of the 1-D array ``v``, blocked; the
    differences are taken in ``zero``'s dtype."""
    s1 = 0.0
    s2 = 0.0
    for j0 in range(0, v.shape[0], _BLOCK):
        blk = v[j0:j0 + _BLOCK]
        a1 = zero[0]
        a2 = zero[0]
        for j in range(blk.shape[0]):
            d = zero.dtype.type(blk[j]) - m  # in the accumulators' dtype (a no-op cast)
            a1 += d
            a2 += d * d
        s1 += a1
        s2 += a2
    return s1, s2


@_jit(parallel=False)
def _grad_sums(g, v, m, zero):
    """float64 ``(sum(g), sum(g * (v - m)))`` of the 1-D arrays ``g``, ``v``, blocked."""
    s1 = 0.0
    s2 = 0.0
    for j0 in range(0, v.shape[0], _BLOCK):
        gb = g[j0:j0 + _BLOCK]
        vb = v[j0:j0 + _BLOCK]
        a1 = zero[0]
        a2 = zero[0]
        for j in range(vb.shape[0]):
            a1 += gb[j]
            a2 += gb[j] * (vb[j] - m)
        s1 += a1
        s2 += a2
    return s1, s2


@_jit(parallel=False)
def _moments(v, shift, i, center, zero):
    """Two-pass float64 ``(mean, M2)`` of the 1-D array ``v``. ``shift[i]`` receives the
    first-pass mean rounded to the data dtype, about which the second pass is taken; the
    shifted-data correction makes the result exact for that rounding."""
    n = v.shape[0]
    if center and n <= _SHORT_ROW:
        # Short rows: the blocked passes cost more in loop overhead than they read. One
        # float64 pass about the first value instead (see the planes kernels for why
        # that shift keeps the variance accurate).
        h = np.float64(v[0])
        s1 = 0.0
        s2 = 0.0
        for j in range(n):
            d = np.float64(v[j]) - h
            s1 += d
            s2 += d * d
        shift[i] = h
        return h + s1 / n, max(s2 - s1 * s1 / n, 0.0)
    total = _sum(v, zero) if center else 0.0
    if not np.isfinite(total):  # sums past the data dtype's range: float64 blocks
        total = _sum(v, _FLOAT64_ZERO)
    shift[i] = total / n
    m = shift[i]
    s1, s2 = _deviation_sums(v, m, zero)
    if not np.isfinite(s2):
        s1, s2 = _deviation_sums(v, m, _FLOAT64_ZERO)
    if not center:
        return 0.0, s2
    return m + s1 / n, s2 - s1 * s1 / n


# Activations fused into the kernels: the piecewise-linear ones, whose value and slope are
# a compare and a select, so the loops still vectorize. silu and gelu need exp/erf, which
# numba calls one value at a time (no vector math library: ~10-25 ns a value, 3-8x slower
# than torch's vectorized ones): they are not fused (docs/variants.md).
ACT_CODES = {"identity": 0, "relu": 1, "leaky_relu": 2}


@njit(inline="always", fastmath=_FASTMATH, error_model="numpy", cache=True)
def _act(v, code, slope, zero):
    """Activation ``code`` (``ACT_CODES``) of ``v``; ``slope``: leaky_relu's."""
    if code == 0 or v > zero:
        return v
    if code == 1:
        return zero  # not v * 0: relu(-inf) is 0, not NaN
    return v * slope


@njit(inline="always", fastmath=_FASTMATH, error_model="numpy", cache=True)
def _act_grad(v, code, slope, zero, one):
    """Derivative of ``_act`` at the pre-activation ``v``."""
    if code == 0 or v > zero:
        return one
    if code == 1:
        return zero
    return slope


@njit(inline="always", fastmath=_FASTMATH, error_model="numpy", cache=True)
def _normalize_run(xs, ys, mt, a, c, act, slope, zero):
    """``ys = act((xs - mt) * a + c)`` over one run of values sharing their coefficients
    (a plane, or one channel's values in a row); identity in a loop of its own, which
    the activation's branch would slow even when hoisted."""
    if act == 0:
        for s in range(xs.shape[0]):
            ys[s] = (xs[s] - mt) * a + c
    else:
        for s in range(xs.shape[0]):
            ys[s] = _act((xs[s] - mt) * a + c, act, slope, zero)


@njit(inline="always", fastmath=_FASTMATH, error_model="numpy", cache=True)
def _normalize_run_wide(xs, ys, mt, a, c, act, slope, zero):
    """:func:`_normalize_run` in float64, for values whose distance to the mean passes the
    data dtype's range (float32 data near its maximum): ``a`` is float64."""
    m = np.float64(mt)
    for s in range(xs.shape[0]):
        y = (np.float64(xs[s]) - m) * a + np.float64(c)
        ys[s] = _act(ys.dtype.type(y), act, slope, zero) if act != 0 else y


@njit(inline="always", fastmath=_FASTMATH, error_model="numpy", cache=True)
def _input_grad_run(gs, xs, ds, mt, a, c, k1, k0, act, slope, zero, one):
    """``ds = g * a + (xs - mt) * k1 + k0`` over one run, ``g = gs`` times, with an
    activation, its derivative at the recomputed pre-activation ``(xs - mt) * a + c``."""
    if act == 0:
        for s in range(xs.shape[0]):
            ds[s] = gs[s] * a + (xs[s] - mt) * k1 + k0
    else:
        for s in range(xs.shape[0]):
            d = xs[s] - mt
            g = gs[s] * _act_grad(d * a + c, act, slope, zero, one)
            ds[s] = g * a + d * k1 + k0


@_jit(parallel=False)
def _merge_moments(part_mean, part_m2, counts, eps, mean, var, rstd):
    """Exact merge of per-part ``(mean, M2) [P, C]`` over ``counts [P]`` values each, in
    part order: ``mean, var, rstd [C]`` (outputs). Parts outer, channels inner, so the
    loops run along contiguous rows."""
    parts, C = part_mean.shape
    total = counts.sum()
    acc = np.zeros(C)
    for p in range(parts):
        row = part_mean[p]
        for c in range(C):
            acc[c] += counts[p] * row[c]
    m = acc / total
    m2 = np.zeros(C)
    for p in range(parts):
        row = part_mean[p]
        rm2 = part_m2[p]
        for c in range(C):
            d = row[c] - m[c]
            m2[c] += rm2[c] + counts[p] * d * d
    for c in range(C):
        v = m2[c] / total
        mean[c] = m[c]
        var[c] = v
        rstd[c] = 1.0 / np.sqrt(v + eps)


@_jit(parallel=False)
def _merge_sums(part_dy, part_dyx, rstd, sum_dy, sum_dy_xhat):
    """Sums of the per-part ``[P, C]`` partials in part order; ``sum_dy_xhat`` is scaled
    by ``rstd`` (``[C]`` outputs)."""
    parts, C = part_dy.shape
    a = np.zeros(C)
    b = np.zeros(C)
    for p in range(parts):
        ra = part_dy[p]
        rb = part_dyx[p]
        for c in range(C):
            a[c] += ra[c]
            b[c] += rb[c]
    for c in range(C):
        sum_dy[c] = a[c]
        sum_dy_xhat[c] = b[c] * rstd[c]


@_jit(parallel=False)
def _scales(mean, rstd, w, mul, sub):
    """``mul = rstd * w`` and ``sub = mean``, rounded to the data dtype (``[C]``)."""
    for c in range(mean.shape[0]):
        mul[c] = rstd[c] * w[c]
        sub[c] = mean[c]


@_jit(parallel=False)
def running_update(running_mean, running_var, mean, var, correction, momentum):
    """In place, per channel: ``running = (1 - momentum) * running + momentum * batch``
    with the batch variance times ``correction`` (Bessel's); a channel whose batch
    statistics are not finite keeps its running values. Returns how many did."""
    kept = 0
    for c in range(mean.shape[0]):
        m = np.float64(mean[c])
        v = np.float64(var[c]) * correction
        if np.isfinite(m) and np.isfinite(v):
            running_mean[c] = (1.0 - momentum) * running_mean[c] + momentum * m
            running_var[c] = (1.0 - momentum) * running_var[c] + momentum * v
        else:
            kept += 1
    return kept
