"""Per-channel statistics on the planes layout ``x [N, C, S]``, channels in blocks. See
``common`` for the layouts and the numerics."""

from __future__ import annotations

import numpy as np
from numba import prange

from normlab.ops.cpu.kernels.common import (  # noqa: F401
    _WIDE_M2,
    _act_grad,
    _input_grad_run,
    _jit,
    _normalize_run,
    _normalize_run_wide,
    running_update,
)


@_jit(parallel=True)
def planes_forward(
    x, w, b, act, slope, block, stats, write, center, eps, y, mean, var, rstd,
    running_mean, running_var, momentum,
):
    """Per-channel statistics of ``x [N, C, S]`` (if ``stats``; else the given ``mean``,
    ``rstd`` are used) and, if ``write``, ``y = act((x - mean) * rstd * w + b)``.
    ``mean, var, rstd [C]`` and ``w, b [C']``, ``C'`` dividing ``C`` (channel ``c`` takes
    ``w[c % C']``: InstanceNorm runs its ``N*C`` planes as ``[1, N*C, S]``), all in the
    data dtype. With statistics and
    ``running_mean``, ``running_var`` of ``C`` values (else pass empty arrays), updates
    them as ``running_update`` does and returns how many channels kept theirs. A task is
    ``block`` adjacent channels, so that memory is read in runs of ``block * S`` values
    (short planes, read one by one, defeat the hardware prefetcher); each channel is
    still summed in the same order whatever the block."""
    N, C, S = x.shape
    wc = w.shape[0]
    count = N * S
    update = stats and running_mean.shape[0] == C
    correction = count / (count - 1) if count > 1 else 1.0
    zero = x.dtype.type(0.0)
    sl = x.dtype.type(slope)
    kept = 0
    for task in prange((C + block - 1) // block):
        c0 = task * block
        c1 = min(C, c0 + block)
        wide = np.zeros(c1 - c0)  # float64 rstd of the channels normalized in float64, or 0
        if stats:
            shift = np.zeros(c1 - c0)
            s1 = np.zeros(c1 - c0)
            s2 = np.zeros(c1 - c0)
            if center:
                for c in range(c0, c1):
                    shift[c - c0] = x[0, c, 0]
            for n in range(N):
                for c in range(c0, c1):
                    xs = x[n, c]
                    h = shift[c - c0]
                    a1 = 0.0
                    a2 = 0.0
                    for s in range(S):
                        d = np.float64(xs[s]) - h
                        a1 += d
                        a2 += d * d
                    s1[c - c0] += a1
                    s2[c - c0] += a2
            for c in range(c0, c1):
                i = c - c0
                if center:
                    md = s1[i] / count
                    v = max(s2[i] / count - md * md, 0.0)
                    mean[c] = shift[i] + md
                else:
                    v = s2[i] / count
                    mean[c] = 0.0
                var[c] = v
                rstd[c] = 1.0 / np.sqrt(v + eps)
                if v * count > _WIDE_M2:
                    wide[i] = 1.0 / np.sqrt(v + eps)
            if update:
                kept += running_update(
                    running_mean[c0:c1], running_var[c0:c1], mean[c0:c1], var[c0:c1],
                    correction, momentum,
                )
        if write:
            for n in range(N):
                for c in range(c0, c1):
                    mt = mean[c]
                    bc = b[c % wc]
                    if wide[c - c0] > 0.0:
                        a64 = wide[c - c0] * w[c % wc]
                        _normalize_run_wide(x[n, c], y[n, c], mt, a64, bc, act, sl, zero)
                    else:
                        a = rstd[c] * w[c % wc]
                        _normalize_run(x[n, c], y[n, c], mt, a, bc, act, sl, zero)
    return kept


@_jit(parallel=True)
def planes_backward(dy, x, mean, rstd, w, b, act, slope, block, center, dx, dw, db):
    """Backward of ``planes_forward`` in training: ``dx [N, C, S]`` and the parameter
    grads ``dw, db [C]`` (per plane of ``[1, N*C, S]``: the caller sums them over ``N``).
    The pre-activation is recomputed from ``x`` (bit for bit as the
    forward computed it), so nothing but ``x`` and the statistics is saved."""
    N, C, S = x.shape
    wc = w.shape[0]
    count = N * S
    one = x.dtype.type(1.0)
    zero = x.dtype.type(0.0)
    sl = x.dtype.type(slope)
    for task in prange((C + block - 1) // block):
        c0 = task * block
        c1 = min(C, c0 + block)
        s1 = np.zeros(c1 - c0)
        s2 = np.zeros(c1 - c0)
        # Identity gets its own loops: the activation's branch costs up to 1.4x on short
        # planes (7x7) even when the compiler hoists it.
        for n in range(N):
            for c in range(c0, c1):
                mt = mean[c]
                xs = x[n, c]
                gs = dy[n, c]
                a1 = 0.0
                a2 = 0.0
                if act == 0:
                    for s in range(S):
                        g = gs[s]
                        a1 += g
                        a2 += np.float64(g * (xs[s] - mt))
                else:
                    a = rstd[c] * w[c % wc]
                    bc = b[c % wc]
                    for s in range(S):
                        d = xs[s] - mt
                        g = gs[s] * _act_grad(d * a + bc, act, sl, zero, one)
                        a1 += g
                        a2 += np.float64(g * d)
                s1[c - c0] += a1
                s2[c - c0] += a2
        k1 = np.empty(c1 - c0, dtype=x.dtype)
        k0 = np.empty(c1 - c0, dtype=x.dtype)
        for c in range(c0, c1):
            i = c - c0
            r = np.float64(rstd[c])
            a = np.float64(rstd[c] * w[c % wc])
            db[c] = s1[i]
            dw[c] = s2[i] * r
            # dx = g * a + (x - mean) * k1 + k0 with per-channel k1, k0.
            k1[i] = -a * r * r * (s2[i] / count)
            k0[i] = -a * (s1[i] / count) if center else 0.0
        if center and count == 1:
            # One value per plane normalizes to exactly 0 whatever x is, so dx is 0 (NaN
            # where x or dy is not finite, as torch's); the formula leaves its rounding
            # times rstd (1/sqrt(eps)) instead.
            for c in range(c0, c1):
                dx[0, c, 0] = (dy[0, c, 0] + (x[0, c, 0] - mean[c])) * zero
        else:
            for n in range(N):
                for c in range(c0, c1):
                    a = rstd[c] * w[c % wc]
                    mt = mean[c]
                    bc = b[c % wc]
                    c1_ = k1[c - c0]
                    c0_ = k0[c - c0]
                    _input_grad_run(
                        dy[n, c], x[n, c], dx[n, c], mt, a, bc, c1_, c0_, act, sl, zero, one
                    )
