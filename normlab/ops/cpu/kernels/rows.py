"""Per-sample statistics on the rows layout ``x [N*G, K*S]``: one row per statistic. See
``common`` for the layouts and the numerics."""

from __future__ import annotations

import numpy as np
from numba import prange

from normlab.ops.cpu.kernels.common import (  # noqa: F401
    _BLOCK,
    _WIDE_M2,
    ACT_CODES,
    _act,
    _act_grad,
    _chunk,
    _grad_sums,
    _input_grad_run,
    _jit,
    _merge_sums,
    _moments,
    _normalize_run,
    _normalize_run_wide,
)


@_jit(parallel=True)
def rows_forward(x, w, b, groups, center, eps, y, mean, var, rstd, write, act, slope, zero):
    """Per-row statistics and (if ``write``) the normalized, affine output with the
    activation ``act`` (``ACT_CODES``; ``slope``: leaky_relu's), fused: the row is read
    from memory once and re-read from cache.

    x, y ``[R, L]``; w, b ``[G*K]``; mean, var, rstd ``[R]`` (outputs).
    """
    R, L = x.shape
    per_group = w.shape[0] // groups
    spatial = L // per_group
    zero_ = x.dtype.type(0.0)
    sl = x.dtype.type(slope)
    for r in prange(R):
        xr = x[r]
        m, m2 = _moments(xr, mean, r, center, zero)
        v = m2 / L
        mean[r] = m
        var[r] = v
        rstd[r] = 1.0 / np.sqrt(v + eps)
        if write:
            yr = y[r]
            mt = mean[r]
            rt = rstd[r]
            g0 = (r % groups) * per_group
            wg = w[g0:g0 + per_group]
            bg = b[g0:g0 + per_group]
            if m2 > _WIDE_M2:
                r64 = 1.0 / np.sqrt(v + eps)
                for k in range(per_group):
                    sl_k = slice(k * spatial, (k + 1) * spatial)
                    _normalize_run_wide(
                        xr[sl_k], yr[sl_k], mt, r64 * wg[k], bg[k], act, sl, zero_
                    )
            elif spatial == 1:
                if act == 0:
                    for k in range(per_group):
                        yr[k] = (xr[k] - mt) * (rt * wg[k]) + bg[k]
                else:
                    for k in range(per_group):
                        yr[k] = _act((xr[k] - mt) * (rt * wg[k]) + bg[k], act, sl, zero_)
            else:
                for k in range(per_group):
                    a = rt * wg[k]
                    c = bg[k]
                    sl_k = slice(k * spatial, (k + 1) * spatial)
                    _normalize_run(xr[sl_k], yr[sl_k], mt, a, c, act, sl, zero_)


@_jit(parallel=True)
def rows_backward(
    dy, x, mean, rstd, w, b, groups, center, act, slope, pdw, pdb, dx, dw, db, zero
):
    """Backward of ``rows_forward``: dx ``[R, L]``; dw, db ``[G*K]`` sums over rows, from the
    zeroed partials ``pdw, pdb [pieces, G*K]`` (data dtype, one row of them per piece of
    rows; merged in float64). ``b`` is read only to recompute the pre-activation of a
    fused activation ``act`` (then ``g = dy * act'(pre)`` stands for ``dy`` below).

    Per row: one pass accumulates ``sum dy*w``, ``sum dy*w*xhat`` and the piece's dw/db
    partials, a second writes ``dx = rstd*(dy*w - mean(dy*w) - xhat*mean(dy*w*xhat))``
    (without the ``mean(dy*w)`` term when not ``center``).
    """
    R, L = x.shape
    pieces, features = pdw.shape
    per_group = features // groups
    spatial = L // per_group
    one = x.dtype.type(1.0)
    zero_ = x.dtype.type(0.0)
    sl = x.dtype.type(slope)
    for p in prange(pieces):
        r0, r1 = _chunk(p, pieces, R)
        coef = np.empty(2, dtype=x.dtype)  # rounds per-row scalars to the data dtype
        for r in range(r0, r1):
            xr = x[r]
            dyr = dy[r]
            dxr = dx[r]
            mt = mean[r]
            rt = rstd[r]
            g0 = (r % groups) * per_group
            wg = w[g0:g0 + per_group]
            bg = b[g0:g0 + per_group]
            pw = pdw[p, g0:g0 + per_group]
            pb = pdb[p, g0:g0 + per_group]
            sum_a = 0.0
            sum_b = 0.0
            if spatial == 1:
                for k0 in range(0, per_group, _BLOCK):
                    k1 = min(k0 + _BLOCK, per_group)
                    gb = dyr[k0:k1]
                    xb = xr[k0:k1]
                    wb = wg[k0:k1]
                    bb = bg[k0:k1]
                    pwb = pw[k0:k1]
                    pbb = pb[k0:k1]
                    a1 = zero[0]
                    a2 = zero[0]
                    if act == 0:
                        for k in range(k1 - k0):
                            g = gb[k]
                            xh = (xb[k] - mt) * rt
                            gw = g * wb[k]
                            a1 += gw
                            a2 += gw * xh
                            pwb[k] += g * xh
                            pbb[k] += g
                    else:
                        for k in range(k1 - k0):
                            pre = (xb[k] - mt) * (rt * wb[k]) + bb[k]
                            g = gb[k] * _act_grad(pre, act, sl, zero_, one)
                            xh = (xb[k] - mt) * rt
                            gw = g * wb[k]
                            a1 += gw
                            a2 += gw * xh
                            pwb[k] += g * xh
                            pbb[k] += g
                    sum_a += a1
                    sum_b += a2
            else:
                for k in range(per_group):
                    sl_k = slice(k * spatial, (k + 1) * spatial)
                    if act == 0 and spatial <= _BLOCK:
                        # Short spatial runs (GroupNorm at 7x7): one block, inline; the
                        # blocked helper's slicing cost more than the values it read.
                        k0 = k * spatial
                        a1 = zero[0]
                        a2 = zero[0]
                        for s in range(spatial):
                            g = dyr[k0 + s]
                            a1 += g
                            a2 += g * (xr[k0 + s] - mt)
                        sd = np.float64(a1)
                        sdx = np.float64(a2)
                    elif act == 0:
                        sd, sdx = _grad_sums(dyr[sl_k], xr[sl_k], mt, zero)
                    else:
                        a = rt * wg[k]
                        c = bg[k]
                        xs = xr[sl_k]
                        gs = dyr[sl_k]
                        sd = 0.0
                        sdx = 0.0
                        for s in range(spatial):
                            d = xs[s] - mt
                            g = gs[s] * _act_grad(d * a + c, act, sl, zero_, one)
                            sd += g
                            sdx += np.float64(g * d)
                    sdx *= rt
                    sum_a += wg[k] * sd
                    sum_b += wg[k] * sdx
                    pw[k] += sdx
                    pb[k] += sd
            if center and L == 1:
                # A row of one value normalizes to exactly 0 whatever x is, so dx is 0 (NaN
                # where x or dy is not finite, as torch's); the formula below leaves its
                # rounding times rstd (1/sqrt(eps)) instead.
                dxr[0] = (dyr[0] + (xr[0] - mt)) * zero_
                continue
            # dx = g*w*rstd + (x - mean)*c1 + c2 with per-row scalars c1, c2.
            coef[0] = -rt * rt * (sum_b / L)
            coef[1] = -rt * (sum_a / L) if center else 0.0
            c1 = coef[0]
            c2 = coef[1]
            if spatial == 1:
                if act == 0:
                    for k in range(per_group):
                        dxr[k] = dyr[k] * (wg[k] * rt) + (xr[k] - mt) * c1 + c2
                else:
                    for k in range(per_group):
                        pre = (xr[k] - mt) * (rt * wg[k]) + bg[k]
                        g = dyr[k] * _act_grad(pre, act, sl, zero_, one)
                        dxr[k] = g * (wg[k] * rt) + (xr[k] - mt) * c1 + c2
            else:
                for k in range(per_group):
                    a = wg[k] * rt
                    c = bg[k]
                    sl_k = slice(k * spatial, (k + 1) * spatial)
                    _input_grad_run(
                        dyr[sl_k], xr[sl_k], dxr[sl_k], mt, a, c, c1, c2, act, sl, zero_, one
                    )
    # Merge the pieces in order; the partials of dw are already scaled by rstd (factor 1).
    _merge_sums(pdb, pdw, np.ones(features), db, dw)
