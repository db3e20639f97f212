"""Per-channel statistics (BatchNorm) on the rows layout ``x [N*C, S]`` and the cols layout ``x
[N*S, C]``. See ``common`` for the layouts and the numerics."""

from __future__ import annotations

import numpy as np
from numba import prange

from normlab.ops.cpu.kernels.common import (  # noqa: F401
    _chunk,
    _grad_sums,
    _jit,
    _merge_moments,
    _merge_sums,
    _moments,
    _scales,
)


@_jit(parallel=True)
def channel_rows_forward(x, w, b, stats, write, center, eps, y, mean, var, rstd, scratch, zero):
    """BatchNorm on the rows layout ``x [N*C, S]`` (NCHW): if ``stats``, per-channel
    ``mean, var, rstd [C]`` (outputs) from per-plane two-pass moments merged over ``n``
    in order; if ``write``, ``y = (x - mean) * rstd * w + b`` (with the given ``mean``
    and ``rstd`` when not ``stats``: eval mode). ``scratch [2, N*C]`` float64.
    """
    R, S = x.shape
    channels = mean.shape[0]
    batch = R // channels
    if stats:
        shift = np.empty(R, dtype=x.dtype)
        for r in prange(R):
            scratch[0, r], scratch[1, r] = _moments(x[r], shift, r, center, zero)
        _merge_moments(
            scratch[0].reshape(batch, channels), scratch[1].reshape(batch, channels),
            np.full(batch, float(S)), eps, mean, var, rstd,
        )
    if write:
        mul = np.empty(channels, dtype=x.dtype)
        sub = np.empty(channels, dtype=x.dtype)
        _scales(mean, rstd, w, mul, sub)
        for r in prange(R):
            c = r % channels
            s0 = sub[c]
            a = mul[c]
            bc = b[c]
            xr = x[r]
            yr = y[r]
            for s in range(S):
                yr[s] = (xr[s] - s0) * a + bc


_ROWS_PER_BLOCK = 32  # rows of the cols layout summed in the data dtype before float64


@_jit(parallel=True)
def channel_cols_forward(x, w, b, stats, write, center, eps, y, mean, var, rstd, scratch, zero):
    """BatchNorm on the cols layout ``x [M, C]`` (channels-last): as
    ``channel_rows_forward``, the statistics from two passes over each cache-sized piece
    of rows, merged over pieces in order. ``scratch [pieces, 2, C]`` float64.
    """
    M, C = x.shape
    pieces = scratch.shape[0]
    if stats:
        for p in prange(pieces):
            r0, r1 = _chunk(p, pieces, M)
            count = r1 - r0
            s1 = np.zeros(C)
            s2 = np.zeros(C)
            shift = np.zeros(C, dtype=x.dtype)
            t1 = np.empty(C, dtype=x.dtype)
            t2 = np.empty(C, dtype=x.dtype)
            if center:
                for q0 in range(r0, r1, _ROWS_PER_BLOCK):
                    t1[:] = zero[0]
                    for r in range(q0, min(q0 + _ROWS_PER_BLOCK, r1)):
                        xr = x[r]
                        for c in range(C):
                            t1[c] += xr[c]
                    for c in range(C):
                        s1[c] += t1[c]
                for c in range(C):
                    shift[c] = s1[c] / count
                    s1[c] = 0.0
            for q0 in range(r0, r1, _ROWS_PER_BLOCK):
                t1[:] = zero[0]
                t2[:] = zero[0]
                for r in range(q0, min(q0 + _ROWS_PER_BLOCK, r1)):
                    xr = x[r]
                    for c in range(C):
                        d = xr[c] - shift[c]
                        t1[c] += d
                        t2[c] += d * d
                for c in range(C):
                    s1[c] += t1[c]
                    s2[c] += t2[c]
            for c in range(C):  # this piece's (mean, M2)
                if center:
                    scratch[p, 0, c] = shift[c] + s1[c] / count
                    scratch[p, 1, c] = s2[c] - s1[c] * s1[c] / count
                else:
                    scratch[p, 0, c] = 0.0
                    scratch[p, 1, c] = s2[c]
        counts = np.empty(pieces)
        for p in range(pieces):
            r0, r1 = _chunk(p, pieces, M)
            counts[p] = r1 - r0
        _merge_moments(scratch[:, 0, :], scratch[:, 1, :], counts, eps, mean, var, rstd)
    if write:
        mul = np.empty(C, dtype=x.dtype)
        sub = np.empty(C, dtype=x.dtype)
        _scales(mean, rstd, w, mul, sub)
        for p in prange(pieces):
            r0, r1 = _chunk(p, pieces, M)
            for r in range(r0, r1):
                xr = x[r]
                yr = y[r]
                for c in range(C):
                    yr[c] = (xr[c] - sub[c]) * mul[c] + b[c]


@_jit(parallel=False)
def _grad_coefficients(mean, rstd, w, sum_dy, sum_dy_xhat, count, a, bco, c0, sub):
    """``dx = a*dy + bco*(x - sub) + c0`` per channel, from the sums over ``count``."""
    for c in range(mean.shape[0]):
        scale = w[c] * rstd[c]
        a[c] = scale
        bco[c] = -scale * rstd[c] * (sum_dy_xhat[c] / count)
        c0[c] = -scale * (sum_dy[c] / count)
        sub[c] = mean[c]


@_jit(parallel=True)
def channel_rows_backward(
    dy, x, mean, rstd, w, reduce, apply, count, sum_dy, sum_dy_xhat, dx, scratch, zero
):
    """BatchNorm backward on the rows layout ``[N*C, S]``.

    ``reduce``: per-channel ``sum_dy`` and ``sum_dy_xhat`` ``[C]`` (outputs) from
    per-plane partials (``scratch [2, N*C]`` float64) summed over ``n`` in order.
    ``apply``: ``dx = w*rstd*(dy - sum_dy/count - xhat*sum_dy_xhat/count)`` from those sums
    (given, when not ``reduce``).
    """
    R, S = x.shape
    channels = mean.shape[0]
    batch = R // channels
    if reduce:
        for r in prange(R):
            scratch[0, r], scratch[1, r] = _grad_sums(dy[r], x[r], mean[r % channels], zero)
        _merge_sums(
            scratch[0].reshape(batch, channels), scratch[1].reshape(batch, channels),
            rstd, sum_dy, sum_dy_xhat,
        )
    if apply:
        a = np.empty(channels, dtype=x.dtype)
        bco = np.empty(channels, dtype=x.dtype)
        c0 = np.empty(channels, dtype=x.dtype)
        sub = np.empty(channels, dtype=x.dtype)
        _grad_coefficients(mean, rstd, w, sum_dy, sum_dy_xhat, count, a, bco, c0, sub)
        for r in prange(R):
            c = r % channels
            ac = a[c]
            bc = bco[c]
            cc = c0[c]
            mt = sub[c]
            xr = x[r]
            gr = dy[r]
            dxr = dx[r]
            for s in range(S):
                dxr[s] = gr[s] * ac + (xr[s] - mt) * bc + cc


@_jit(parallel=True)
def channel_cols_backward(
    dy, x, mean, rstd, w, reduce, apply, count, sum_dy, sum_dy_xhat, dx, scratch, zero
):
    """BatchNorm backward on the cols layout ``[M, C]`` (see ``channel_rows_backward``);
    ``scratch [pieces, 2, C]`` float64 holds the per-piece partial sums."""
    M, C = x.shape
    pieces = scratch.shape[0]
    if reduce:
        for p in prange(pieces):
            r0, r1 = _chunk(p, pieces, M)
            part_dy = scratch[p, 0]
            part_dyx = scratch[p, 1]
            part_dy[:] = 0.0
            part_dyx[:] = 0.0
            sub = np.empty(C, dtype=x.dtype)
            sub[:] = mean
            t1 = np.empty(C, dtype=x.dtype)
            t2 = np.empty(C, dtype=x.dtype)
            for q0 in range(r0, r1, _ROWS_PER_BLOCK):
                t1[:] = zero[0]
                t2[:] = zero[0]
                for r in range(q0, min(q0 + _ROWS_PER_BLOCK, r1)):
                    xr = x[r]
                    gr = dy[r]
                    for c in range(C):
                        t1[c] += gr[c]
                        t2[c] += gr[c] * (xr[c] - sub[c])
                for c in range(C):
                    part_dy[c] += t1[c]
                    part_dyx[c] += t2[c]
        _merge_sums(scratch[:, 0, :], scratch[:, 1, :], rstd, sum_dy, sum_dy_xhat)
    if apply:
        a = np.empty(C, dtype=x.dtype)
        bco = np.empty(C, dtype=x.dtype)
        c0 = np.empty(C, dtype=x.dtype)
        sub = np.empty(C, dtype=x.dtype)
        _grad_coefficients(mean, rstd, w, sum_dy, sum_dy_xhat, count, a, bco, c0, sub)
        for p in prange(pieces):
            r0, r1 = _chunk(p, pieces, M)
            for r in range(r0, r1):
                xr = x[r]
                gr = dy[r]
                dxr = dx[r]
                for c in range(C):
                    dxr[c] = gr[c] * a[c] + (xr[c] - sub[c]) * bco[c] + c0[c]


# ---------------------------------------------------------------------------------------
# Per-channel BatchNorm with one channel per task ("planes" layout ``x [N, C, S]``,
# contiguous NCHW), optionally fused with an activation.
#
# A channel's N planes (``N*S`` values, a few hundred KiB at ResNet shapes) are read once
# from memory for the statistics and re-read from the core's L2 cache for the output, so
# the forward moves one read and one write of the tensor; the backward, one read of x
# and dy and one write of dx. Each channel is summed serially: deterministic at any
# thread count. The statistics are a single pass in float64 about a shift, the channel's
# first value: one value lies at most sqrt(n) standard deviations from the mean of n, so
# the cancellation in ``E[d^2] - E[d]^2`` loses at most a factor n of float64's precision.
