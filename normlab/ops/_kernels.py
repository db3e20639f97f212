"""numba kernels of the CPU backend, on three layouts of the canonical ``[N, G, K, S]`` view.

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

Compile time is the cost of numba (seconds per kernel and dtype, then cached on disk), so
there are few kernels (rows, channel rows, channel cols and planes, forward and backward
each, and the running update), one or two ``prange`` loops each, and only ``prange`` is
parallelized (no implicit parfors from array expressions or allocations). All arrays of
a call share one dtype (float32 or float64) except the float64 scratch buffers: two
signatures per kernel. Flags are runtime arguments, not compile-time variants.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

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
# than torch's vectorized ones): they are not fused (see normlab.ops.fused_act).
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
