"""numba kernels of the CPU backend, on two 2-D layouts of the canonical ``[N, G, K, S]`` view.

- **rows**: ``x [R, L]`` C-contiguous, ``R = N*G`` rows of ``L = K*S`` elements; the
  affine index of element ``(r, k*S + s)`` is ``(r % G)*K + k``. Per-sample norms take
  their statistics per row (``rows_*``); contiguous (NCHW) BatchNorm (``K == 1``) per
  channel ``r % C`` over the ``N`` planes (``channel_rows_*``).
- **cols**: ``x [M, C]`` C-contiguous, ``M = N*S`` rows of ``C`` channels (channels-last
  BatchNorm, or any ``S == 1`` input): statistics per column (``channel_cols_*``).

Every kernel is deterministic at any thread count: work is cut into a fixed, shape-only
set of pieces (rows, planes or row chunks), each piece writes its own partial result,
and partials are merged serially in a fixed order. Sums are accumulated in float64; the
variance is two-pass (a mean, then squared deviations from it with the shifted-data
correction), and partial (mean, M2) pairs are combined exactly with
``M2 = sum M2_i + sum n_i (mean_i - mean)^2``. Elementwise work stays in the data dtype
so it vectorizes at full width. ``fastmath`` allows reassociation (vector accumulators)
and contraction, not ``nnan``/``ninf``: NaN and Inf propagate as in torch.

Compile time is the cost of numba (seconds per kernel and dtype, then cached on disk), so
there are six kernels, one or two ``prange`` loops each, and only ``prange`` is
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


@_jit(parallel=False)
def _chunk(index, pieces, total):
    """Start and stop of piece ``index`` of ``pieces`` near-equal pieces of ``range(total)``."""
    return index * total // pieces, (index + 1) * total // pieces


@_jit(parallel=False)
def _row_moments(x, r, shift, center):
    """Two-pass ``(mean, M2)`` of row ``r`` in float64. ``shift[r]`` receives the first-pass
    mean rounded to the data dtype; the second pass, in the data dtype, is taken about it."""
    L = x.shape[1]
    if center:
        acc = 0.0
        for j in range(L):
            acc += x[r, j]
        shift[r] = acc / L
    else:
        shift[r] = 0.0
    m = shift[r]
    s1 = 0.0
    s2 = 0.0
    for j in range(L):
        d = x[r, j] - m
        s1 += d
        s2 += d * d
    if not center:
        return 0.0, s2
    # Shifted-data correction: exact mean and M2 although ``m`` was rounded.
    return m + s1 / L, s2 - s1 * s1 / L


@_jit(parallel=True)
def rows_forward(x, w, b, groups, center, eps, y, mean, var, rstd, write):
    """Per-row statistics and (if ``write``) the normalized, affine output, fused: the row
    is read from memory once and re-read from cache.

    x, y ``[R, L]``; w, b ``[G*K]``; mean, var, rstd ``[R]`` (outputs).
    """
    R, L = x.shape
    per_group = w.shape[0] // groups
    spatial = L // per_group
    for r in prange(R):
        m, m2 = _row_moments(x, r, mean, center)
        v = m2 / L
        mean[r] = m
        var[r] = v
        rstd[r] = 1.0 / np.sqrt(v + eps)
        if write:
            mt = mean[r]
            rt = rstd[r]
            base = (r % groups) * per_group
            if spatial == 1:
                for k in range(per_group):
                    y[r, k] = (x[r, k] - mt) * (rt * w[base + k]) + b[base + k]
            else:
                for k in range(per_group):
                    a = rt * w[base + k]
                    c = b[base + k]
                    off = k * spatial
                    for s in range(spatial):
                        y[r, off + s] = (x[r, off + s] - mt) * a + c


@_jit(parallel=True)
def rows_backward(dy, x, mean, rstd, w, groups, center, pdw, pdb, dx, dw, db):
    """Backward of ``rows_forward``: dx ``[R, L]``; dw, db ``[G*K]`` sums over rows, from
    the zeroed float64 partials ``pdw, pdb [pieces, G*K]`` (one row of them per piece).

    Per row: one pass accumulates ``sum dy*w``, ``sum dy*w*xhat`` and the piece's dw/db
    partials, a second writes ``dx = rstd*(dy*w - mean(dy*w) - xhat*mean(dy*w*xhat))``
    (without the ``mean(dy*w)`` term when not ``center``).
    """
    R, L = x.shape
    pieces, features = pdw.shape
    per_group = features // groups
    spatial = L // per_group
    for p in prange(pieces):
        r0, r1 = _chunk(p, pieces, R)
        coef = np.empty(2, dtype=x.dtype)  # rounds the per-row scalars to the data dtype
        for r in range(r0, r1):
            mt = mean[r]
            rt = rstd[r]
            base = (r % groups) * per_group
            sum_a = 0.0
            sum_b = 0.0
            if spatial == 1:
                for k in range(per_group):
                    g = dy[r, k]
                    xh = (x[r, k] - mt) * rt
                    gw = g * w[base + k]
                    sum_a += gw
                    sum_b += gw * xh
                    pdw[p, base + k] += g * xh
                    pdb[p, base + k] += g
            else:
                for k in range(per_group):
                    off = k * spatial
                    sd = 0.0
                    sdx = 0.0
                    for s in range(spatial):
                        g = dy[r, off + s]
                        sd += g
                        sdx += g * ((x[r, off + s] - mt) * rt)
                    wk = w[base + k]
                    sum_a += wk * sd
                    sum_b += wk * sdx
                    pdw[p, base + k] += sdx
                    pdb[p, base + k] += sd
            # dx = dy*w*rstd + (x - mean)*c1 + c2 with per-row scalars c1, c2.
            coef[0] = -rt * rt * (sum_b / L)
            coef[1] = -rt * (sum_a / L) if center else 0.0
            c1 = coef[0]
            c2 = coef[1]
            if spatial == 1:
                for k in range(per_group):
                    dx[r, k] = dy[r, k] * (w[base + k] * rt) + (x[r, k] - mt) * c1 + c2
            else:
                for k in range(per_group):
                    a = w[base + k] * rt
                    off = k * spatial
                    for s in range(spatial):
                        dx[r, off + s] = dy[r, off + s] * a + (x[r, off + s] - mt) * c1 + c2
    for f in range(features):
        acc_w = 0.0
        acc_b = 0.0
        for p in range(pieces):
            acc_w += pdw[p, f]
            acc_b += pdb[p, f]
        dw[f] = acc_w
        db[f] = acc_b


@_jit(parallel=False)
def _scales(mean, rstd, w, mul, m_out):
    """``mul = rstd * w`` and the mean, both rounded to the data dtype (``[C]``)."""
    for c in range(mean.shape[0]):
        mul[c] = rstd[c] * w[c]
        m_out[c] = mean[c]


@_jit(parallel=True)
def channel_rows_forward(x, w, b, stats, write, center, eps, y, mean, var, rstd, scratch):
    """BatchNorm on the rows layout ``x [N*C, S]`` (NCHW): if ``stats``, per-channel
    ``mean, var, rstd [C]`` (outputs) from per-plane two-pass moments merged over ``n``
    in order; if ``write``, ``y = (x - mean) * rstd * w + b`` (with the given ``mean``
    and ``rstd`` when not ``stats``: eval mode). ``scratch [3, N*C]`` float64.
    """
    R, S = x.shape
    channels = mean.shape[0]
    batch = R // channels
    if stats:
        shift = np.empty(R, dtype=x.dtype)
        for r in prange(R):
            scratch[0, r], scratch[1, r] = _row_moments(x, r, shift, center)
        for c in range(channels):
            total = 0.0
            for n in range(batch):
                total += scratch[0, n * channels + c]
            m = total / batch
            m2 = 0.0
            dev = 0.0
            for n in range(batch):
                d = scratch[0, n * channels + c] - m
                m2 += scratch[1, n * channels + c]
                dev += d * d
            v = (m2 + S * dev) / (batch * S)
            mean[c] = m
            var[c] = v
            rstd[c] = 1.0 / np.sqrt(v + eps)
    if write:
        mul = np.empty(channels, dtype=x.dtype)
        sub = np.empty(channels, dtype=x.dtype)
        _scales(mean, rstd, w, mul, sub)
        for r in prange(R):
            c = r % channels
            s0 = sub[c]
            a = mul[c]
            bc = b[c]
            for s in range(S):
                y[r, s] = (x[r, s] - s0) * a + bc


@_jit(parallel=True)
def channel_cols_forward(x, w, b, stats, write, center, eps, y, mean, var, rstd, scratch):
    """BatchNorm on the cols layout ``x [M, C]`` (channels-last): as
    ``channel_rows_forward``, the statistics from two passes over each cache-sized piece
    of rows, merged over pieces in order. ``scratch [pieces, 5, C]`` float64.
    """
    M, C = x.shape
    pieces = scratch.shape[0]
    if stats:
        for p in prange(pieces):
            r0, r1 = _chunk(p, pieces, M)
            count = r1 - r0
            acc = scratch[p, 0]
            s1 = scratch[p, 1]
            s2 = scratch[p, 2]
            shift = np.zeros(C, dtype=x.dtype)
            for c in range(C):
                acc[c] = 0.0
                s1[c] = 0.0
                s2[c] = 0.0
            if center:
                for r in range(r0, r1):
                    for c in range(C):
                        acc[c] += x[r, c]
                for c in range(C):
                    shift[c] = acc[c] / count
            for r in range(r0, r1):
                for c in range(C):
                    d = x[r, c] - shift[c]
                    s1[c] += d
                    s2[c] += d * d
            for c in range(C):  # this piece's (mean, M2) into rows 3 and 4
                if center:
                    scratch[p, 3, c] = shift[c] + s1[c] / count
                    scratch[p, 4, c] = s2[c] - s1[c] * s1[c] / count
                else:
                    scratch[p, 3, c] = 0.0
                    scratch[p, 4, c] = s2[c]
        for c in range(C):
            total = 0.0
            for p in range(pieces):
                r0, r1 = _chunk(p, pieces, M)
                total += (r1 - r0) * scratch[p, 3, c]
            m = total / M
            m2 = 0.0
            dev = 0.0
            for p in range(pieces):
                r0, r1 = _chunk(p, pieces, M)
                d = scratch[p, 3, c] - m
                m2 += scratch[p, 4, c]
                dev += (r1 - r0) * d * d
            v = (m2 + dev) / M
            mean[c] = m
            var[c] = v
            rstd[c] = 1.0 / np.sqrt(v + eps)
    if write:
        mul = np.empty(C, dtype=x.dtype)
        sub = np.empty(C, dtype=x.dtype)
        _scales(mean, rstd, w, mul, sub)
        for p in prange(pieces):
            r0, r1 = _chunk(p, pieces, M)
            for r in range(r0, r1):
                for c in range(C):
                    y[r, c] = (x[r, c] - sub[c]) * mul[c] + b[c]


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
    dy, x, mean, rstd, w, reduce, apply, count, sum_dy, sum_dy_xhat, dx, scratch
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
            mt = mean[r % channels]
            sd = 0.0
            sdx = 0.0
            for s in range(S):
                g = dy[r, s]
                sd += g
                sdx += g * (x[r, s] - mt)
            scratch[0, r] = sd
            scratch[1, r] = sdx
        for c in range(channels):
            sd = 0.0
            sdx = 0.0
            for n in range(batch):
                sd += scratch[0, n * channels + c]
                sdx += scratch[1, n * channels + c]
            sum_dy[c] = sd
            sum_dy_xhat[c] = sdx * rstd[c]
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
            for s in range(S):
                dx[r, s] = dy[r, s] * ac + (x[r, s] - mt) * bc + cc


@_jit(parallel=True)
def channel_cols_backward(
    dy, x, mean, rstd, w, reduce, apply, count, sum_dy, sum_dy_xhat, dx, scratch
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
            for c in range(C):
                part_dy[c] = 0.0
                part_dyx[c] = 0.0
            for r in range(r0, r1):
                for c in range(C):
                    g = dy[r, c]
                    part_dy[c] += g
                    part_dyx[c] += g * (x[r, c] - mean[c])
        for c in range(C):
            sd = 0.0
            sdx = 0.0
            for p in range(pieces):
                sd += scratch[p, 0, c]
                sdx += scratch[p, 1, c]
            sum_dy[c] = sd
            sum_dy_xhat[c] = sdx * rstd[c]
    if apply:
        a = np.empty(C, dtype=x.dtype)
        bco = np.empty(C, dtype=x.dtype)
        c0 = np.empty(C, dtype=x.dtype)
        sub = np.empty(C, dtype=x.dtype)
        _grad_coefficients(mean, rstd, w, sum_dy, sum_dy_xhat, count, a, bco, c0, sub)
        for p in prange(pieces):
            r0, r1 = _chunk(p, pieces, M)
            for r in range(r0, r1):
                for c in range(C):
                    dx[r, c] = dy[r, c] * a[c] + (x[r, c] - sub[c]) * bco[c] + c0[c]
