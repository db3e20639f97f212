"""Masked BatchNorm on the planes layout ``x [N, C, S]`` with a validity mask ``[N, S]``
(uint8, 1 = valid; one byte per position, the same for every channel): per-channel
statistics over the valid positions, the output at every position. See ``common`` for the
numerics; each channel is one task, summed in a fixed order (deterministic at any thread
count), in float64."""

from __future__ import annotations

import numpy as np
from numba import prange

from normlab.ops.cpu.kernels.common import _jit


@_jit(parallel=True)
def masked_planes_forward(x, mask, w, b, eps, count, y, mean, var, rstd):
    """``mean, var, rstd [C]`` (outputs) over the ``count`` valid positions per channel,
    two passes; ``y = (x - mean) * rstd * w + b`` everywhere (``rstd = 0`` when
    ``count == 0``: the output is ``b``)."""
    n, channels, spatial = x.shape
    for c in prange(channels):
        total = 0.0
        for i in range(n):
            xr = x[i, c]
            mr = mask[i]
            for j in range(spatial):
                total += np.float64(xr[j]) * mr[j]
        m = total / count if count > 0 else 0.0
        m2 = 0.0
        for i in range(n):
            xr = x[i, c]
            mr = mask[i]
            for j in range(spatial):
                d = (np.float64(xr[j]) - m) * mr[j]
                m2 += d * d
        v = m2 / count if count > 0 else 0.0
        r = 1.0 / np.sqrt(v + eps) if count > 0 else 0.0
        mean[c], var[c], rstd[c] = m, v, r
        a = r * w[c]
        shift = b[c] - m * a
        for i in range(n):
            xr = x[i, c]
            yr = y[i, c]
            for j in range(spatial):
                yr[j] = xr[j] * a + shift


@_jit(parallel=True)
def masked_planes_backward(dy, x, mask, mean, rstd, w, count, dx, dw, db):
    """``dx`` (output, every position) and the parameter gradients ``dw, db [C]`` of
    :func:`masked_planes_forward`: the sums run over all positions (every output depends
    on the statistics), the statistics' terms reach the valid inputs only."""
    n, channels, spatial = x.shape
    for c in prange(channels):
        m, r = mean[c], rstd[c]
        sum_dy = 0.0
        sum_dy_x = 0.0
        for i in range(n):
            dyr = dy[i, c]
            xr = x[i, c]
            for j in range(spatial):
                g = np.float64(dyr[j])
                sum_dy += g
                sum_dy_x += g * (np.float64(xr[j]) - m)
        sum_dy_xhat = sum_dy_x * r
        db[c], dw[c] = sum_dy, sum_dy_xhat
        scale = r * w[c]
        k1 = sum_dy / count if count > 0 else 0.0
        k2 = sum_dy_xhat / count * r if count > 0 else 0.0
        for i in range(n):
            dyr = dy[i, c]
            xr = x[i, c]
            mr = mask[i]
            dxr = dx[i, c]
            for j in range(spatial):
                through_stats = k1 + (np.float64(xr[j]) - m) * k2
                dxr[j] = scale * (dyr[j] - mr[j] * through_stats)


@_jit(parallel=True)
def masked_rows_forward(x, mask, w, b, eps, y, mean, var, rstd):
    """Per-sample statistics over the valid positions: ``x [N, G, K, S]``, ``mask [N, S]``;
    ``mean, var, rstd [N, G]`` (outputs) per (n, g) over its ``K`` channels and the valid
    ``S`` (``rstd = 0`` without any: the output is ``b``); ``y`` everywhere, the affine
    parameters ``[G*K]``."""
    n, groups, k, spatial = x.shape
    for row in prange(n * groups):
        i, g = row // groups, row % groups
        mr = mask[i]
        valid = 0.0
        for j in range(spatial):
            valid += mr[j]
        count = valid * k
        total = 0.0
        for c in range(k):
            xr = x[i, g, c]
            for j in range(spatial):
                total += np.float64(xr[j]) * mr[j]
        m = total / count if count > 0 else 0.0
        m2 = 0.0
        for c in range(k):
            xr = x[i, g, c]
            for j in range(spatial):
                d = (np.float64(xr[j]) - m) * mr[j]
                m2 += d * d
        v = m2 / count if count > 0 else 0.0
        r = 1.0 / np.sqrt(v + eps) if count > 0 else 0.0
        mean[i, g], var[i, g], rstd[i, g] = m, v, r
        for c in range(k):
            a = r * w[g * k + c]
            shift = b[g * k + c] - m * a
            xr = x[i, g, c]
            yr = y[i, g, c]
            for j in range(spatial):
                yr[j] = xr[j] * a + shift


@_jit(parallel=True)
def masked_rows_backward(dy, x, mask, mean, rstd, w, dx, dw_rows, db_rows):
    """``dx`` (every position) of :func:`masked_rows_forward`, and each sample's share of
    the parameter gradients ``dw_rows, db_rows [N, G*K]`` (outputs; the caller sums them
    over ``N`` in order)."""
    n, groups, k, spatial = x.shape
    for row in prange(n * groups):
        i, g = row // groups, row % groups
        mr = mask[i]
        valid = 0.0
        for j in range(spatial):
            valid += mr[j]
        count = valid * k
        m, r = mean[i, g], rstd[i, g]
        sum_g = 0.0  # sum of dxhat = dy * w over the row
        sum_gx = 0.0  # sum of dxhat * xhat
        for c in range(k):
            wc = w[g * k + c]
            dyr = dy[i, g, c]
            xr = x[i, g, c]
            s_dy = 0.0
            s_dyx = 0.0
            for j in range(spatial):
                gj = np.float64(dyr[j])
                s_dy += gj
                s_dyx += gj * (np.float64(xr[j]) - m)
            db_rows[i, g * k + c] = s_dy
            dw_rows[i, g * k + c] = s_dyx * r
            sum_g += wc * s_dy
            sum_gx += wc * s_dyx * r
        k1 = sum_g / count if count > 0 else 0.0
        k2 = sum_gx / count if count > 0 else 0.0
        for c in range(k):
            wc = w[g * k + c]
            dyr = dy[i, g, c]
            xr = x[i, g, c]
            dxr = dx[i, g, c]
            for j in range(spatial):
                xhat = (np.float64(xr[j]) - m) * r
                dxr[j] = r * (wc * dyr[j] - mr[j] * (k1 + xhat * k2))
