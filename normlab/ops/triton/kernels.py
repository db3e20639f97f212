"""Triton kernels of the normalization family, on the plan's view ``x4 [N, G, K, S]``
with any strides (contiguous, channels-last, sliced), and the functions that launch them.

One program covers row ``(n, g)``, a block of ``K`` and a chunk of ``S``, as a tile
``[BLOCK_K, BLOCK_S]`` walked along ``S``. Statistics are merged in two stages, never as
``E[x^2] - E[x]^2``: each program merges its tiles' ``(count, mean, M2)`` (Chan et al.)
into one partial, a second kernel merges a statistic's partials exactly (weighted mean,
then ``sum M2 + count * (mean_i - mean)^2``). Per-channel statistics (BatchNorm: ``K =
1``) gather the partials of every ``n``; per-sample ones (InstanceNorm, GroupNorm,
LayerNorm) those of their row.

The backward recomputes ``xhat`` and the activation's input from ``x`` and the statistics
(nothing else is saved): one kernel sums ``dy'`` and ``dy' * xhat`` per ``(n, feature)``
(``dy' = dy * act'(z)``), torch adds those up into the parameter gradients and the two
per-statistic terms, a second kernel writes ``dx``.

Written for ``TRITON_INTERPRET=1`` as well as GPUs: ``tl.math`` only (no libdevice), no
autotune (tile sizes by :func:`tiles`), no atomics, the accumulator dtype a parameter
(float64 for float64 input, so gradcheck runs), every program independent of the others.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

_TILE = 1024  # elements a program holds at a time
_TARGET_PROGRAMS = 512  # enough to fill a large GPU; partials stay few for the merge


@triton.jit
def _activate(z, ACT: tl.constexpr, slope):
    out = z
    if ACT == 1:  # NaN stays NaN, as torch's
        out = tl.where(z < 0, 0.0, z)
    if ACT == 2:
        out = tl.where(z < 0, z * slope, z)
    if ACT == 3:
        out = z * tl.sigmoid(z)
    if ACT == 4:
        out = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    return out


@triton.jit
def _activation_grad(z, dy, ACT: tl.constexpr, slope):
    """``dy * act'(z)`` (``dy`` where there is no activation)."""
    out = dy
    if ACT == 1:
        out = tl.where(z > 0, dy, 0.0)
    if ACT == 2:
        out = tl.where(z > 0, dy, dy * slope)
    if ACT == 3:
        sig = tl.sigmoid(z)
        out = dy * sig * (1.0 + z * (1.0 - sig))
    if ACT == 4:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
        out = dy * (cdf + z * pdf)
    return out


@triton.jit
def _recover(z, dz, w, b, ACT: tl.constexpr, alpha):
    """In-place ABN's backward from the output ``z = act(xhat * w + b)``: ``(xhat,
    dz * act'(y))``, inverting leaky_relu (code 2), elu (code 5) or nothing."""
    y = z
    grad = dz
    if ACT == 2:
        y = tl.where(z < 0, z / alpha, z)
        grad = tl.where(z < 0, dz * alpha, dz)
    if ACT == 5:  # z = alpha * (exp(y) - 1) below 0: y = log(1 + z / alpha), dz/dy = z + alpha
        y = tl.where(z < 0, tl.log(1.0 + z / alpha), z)
        grad = tl.where(z < 0, dz * (z + alpha), dz)
    return (y - b) / w, grad


@triton.jit
def _rounded(y, BF16: tl.constexpr):
    """``y`` rounded to the nearest bfloat16 (ties to even) when the output is bfloat16:
    the interpreter's float32 -> bfloat16 store truncates; a value already representable
    is stored exactly either way."""
    out = y
    if BF16:
        bits = y.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        out = bits.to(tl.float32, bitcast=True)
    return out


@triton.jit
def _stat_index(row, g, k, K, PER_SAMPLE: tl.constexpr, STAT_PER_K: tl.constexpr):
    """A tile's statistic: per (n, g) row, per group ``g``, or per feature ``g*K + k``."""
    stat = g + k * 0
    if PER_SAMPLE:
        stat = row + k * 0
    if STAT_PER_K:
        stat = g * K + k
    return stat


@triton.jit
def _tile_offsets(row, kb, G, K, BLOCK_K: tl.constexpr):
    n = row // G
    g = row % G
    k = kb * BLOCK_K + tl.arange(0, BLOCK_K)[:, None]
    return n, g, k


@triton.jit
def _tile_setup(
    mean_ptr, rstd_ptr, w_ptr, b_ptr, G, K, PER_SAMPLE: tl.constexpr,
    STAT_PER_K: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """This program's ``(n, g, k, stat, mean, rstd, w, b)``: its tile's indices, the
    statistic it normalizes with, and the affine parameters of its features (1 and 0
    without them), each ``[BLOCK_K, 1]``."""
    row = tl.program_id(0)
    n, g, k = _tile_offsets(row, tl.program_id(1), G, K, BLOCK_K)
    stat = _stat_index(row, g, k, K, PER_SAMPLE, STAT_PER_K)
    mean = tl.load(mean_ptr + stat, mask=k < K, other=0.0).to(ACC)
    rstd = tl.load(rstd_ptr + stat, mask=k < K, other=0.0).to(ACC)
    feature = g * K + k
    w = tl.zeros((BLOCK_K, 1), dtype=ACC) + 1.0
    b = tl.zeros((BLOCK_K, 1), dtype=ACC)
    if HAS_W:
        w = tl.load(w_ptr + feature, mask=k < K, other=0.0).to(ACC)
    if HAS_B:
        b = tl.load(b_ptr + feature, mask=k < K, other=0.0).to(ACC)
    return n, g, k, stat, mean, rstd, w, b


@triton.jit
def _base(ptr, n, g, k, sN, sG, sK):
    """A tensor's address of ``(n, g, k, s=0)``."""
    return ptr + n.to(tl.int64) * sN + g.to(tl.int64) * sG + k.to(tl.int64) * sK


@triton.jit
def _normalized_and_grad(x, dy, mean, rstd, w, b, ACT: tl.constexpr, slope,
                         FROM_OUTPUT: tl.constexpr):
    """``(xhat, dy * act'(z))`` from the input and its statistics, or (``FROM_OUTPUT``)
    from in-place ABN's output (:func:`_recover`)."""
    if FROM_OUTPUT:
        xhat, grad = _recover(x, dy, w, b, ACT, slope)
    else:
        xhat = (x - mean) * rstd
        grad = _activation_grad(xhat * w + b, dy, ACT, slope)
    return xhat, grad


@triton.jit
def _partial_moments(
    x_ptr, mask_ptr, cnt_ptr, mean_ptr, m2_ptr,
    N, G, K, S, sN, sG, sK, sS, mN, mS, KB, SC, S_PER_PROG,
    PER_SAMPLE: tl.constexpr, STAT_PER_K: tl.constexpr, MASKED: tl.constexpr,
    ACC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Stage 1: ``(count, mean, M2)`` of a program's (valid) values, per ``k`` of its
    block (``STAT_PER_K``: channels along ``K``) or merged over the block."""
    row = tl.program_id(0)
    kb = tl.program_id(1)
    sc = tl.program_id(2)
    n, g, k = _tile_offsets(row, kb, G, K, BLOCK_K)
    base = _base(x_ptr, n, g, k, sN, sG, sK)
    s_begin = sc * S_PER_PROG
    s_end = tl.minimum(s_begin + S_PER_PROG, S)
    count = tl.zeros((BLOCK_K,), dtype=ACC)
    mean = tl.zeros((BLOCK_K,), dtype=ACC)
    m2 = tl.zeros((BLOCK_K,), dtype=ACC)
    for start in range(0, S_PER_PROG, BLOCK_S):
        s = s_begin + start + tl.arange(0, BLOCK_S)[None, :]
        ok = (k < K) & (s < s_end)
        x = tl.load(base + s.to(tl.int64) * sS, mask=ok, other=0.0).to(ACC)
        if MASKED:
            keep = tl.load(mask_ptr + n.to(tl.int64) * mN + s.to(tl.int64) * mS,
                           mask=s < s_end, other=0)
            ok = ok & (keep != 0)
        valid = ok.to(ACC)
        tile_count = tl.sum(valid, axis=1)
        tile_mean = tl.sum(x * valid, axis=1) / tl.maximum(tile_count, 1.0)
        centred = (x - tile_mean[:, None]) * valid
        tile_m2 = tl.sum(centred * centred, axis=1)
        total = count + tile_count
        delta = tile_mean - mean
        share = tile_count / tl.maximum(total, 1.0)
        mean = mean + delta * share
        m2 = m2 + tile_m2 + delta * delta * count * share
        count = total
    kk = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    if STAT_PER_K:
        partials = N * SC
        index = (g * K + kk).to(tl.int64) * partials + n * SC + sc
        tl.store(cnt_ptr + index, count, mask=kk < K)
        tl.store(mean_ptr + index, mean, mask=kk < K)
        tl.store(m2_ptr + index, m2, mask=kk < K)
    else:  # the block's k merged exactly, as stage 2 merges programs
        total = tl.sum(count)
        merged = tl.sum(count * mean) / tl.maximum(total, 1.0)
        spread = tl.sum(m2 + count * (mean - merged) * (mean - merged))
        if PER_SAMPLE:
            partials = KB * SC
            index = row * partials + kb * SC + sc
        else:
            partials = N * KB * SC
            index = g * partials + (n * KB + kb) * SC + sc
        tl.store(cnt_ptr + index, total)
        tl.store(mean_ptr + index, merged)
        tl.store(m2_ptr + index, spread)


@triton.jit
def _merge_moments(
    cnt_ptr, mean_ptr, m2_ptr, out_mean, out_var, out_rstd, out_count, P, eps,
    CENTER: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Stage 2: a statistic's partials merged exactly; ``rstd = 0`` with no value."""
    r = tl.program_id(0)
    base = r.to(tl.int64) * P
    total = tl.zeros((), dtype=ACC)
    weighted = tl.zeros((), dtype=ACC)
    for start in range(0, P, BLOCK_P):
        p = start + tl.arange(0, BLOCK_P)
        c = tl.load(cnt_ptr + base + p, mask=p < P, other=0.0)
        m = tl.load(mean_ptr + base + p, mask=p < P, other=0.0)
        total += tl.sum(c)
        weighted += tl.sum(c * m)
    mean = weighted / tl.maximum(total, 1.0)
    m2 = tl.zeros((), dtype=ACC)
    for start in range(0, P, BLOCK_P):
        p = start + tl.arange(0, BLOCK_P)
        c = tl.load(cnt_ptr + base + p, mask=p < P, other=0.0)
        m = tl.load(mean_ptr + base + p, mask=p < P, other=0.0)
        q = tl.load(m2_ptr + base + p, mask=p < P, other=0.0)
        m2 += tl.sum(q + c * (m - mean) * (m - mean))
    var = m2 / tl.maximum(total, 1.0)
    if not CENTER:  # RMS: the mean of squares, no centring
        var = var + mean * mean
        mean = mean * 0.0
    rstd = tl.where(total > 0, tl.math.rsqrt(var + eps), 0.0)
    tl.store(out_mean + r, mean)
    tl.store(out_var + r, var)
    tl.store(out_rstd + r, rstd)
    tl.store(out_count + r, total)


@triton.jit
def _normalize(
    x_ptr, y_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr,
    G, K, S, sN, sG, sK, sS, yN, yG, yK, yS, S_PER_PROG, slope,
    PER_SAMPLE: tl.constexpr, STAT_PER_K: tl.constexpr, HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    ACT: tl.constexpr, ACC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
    BF16: tl.constexpr,
):
    """``y = act((x - mean) * rstd * w + b)`` (``xhat`` first, then the affine: torch's
    order of roundings, so half-precision outputs match torch's to the last bit)."""
    n, g, k, _, mean, rstd, w, b = _tile_setup(
        mean_ptr, rstd_ptr, w_ptr, b_ptr, G, K, PER_SAMPLE, STAT_PER_K, HAS_W, HAS_B, ACC,
        BLOCK_K)
    sc = tl.program_id(2)
    x_base = _base(x_ptr, n, g, k, sN, sG, sK)
    y_base = _base(y_ptr, n, g, k, yN, yG, yK)
    s_begin = sc * S_PER_PROG
    s_end = tl.minimum(s_begin + S_PER_PROG, S)
    for start in range(0, S_PER_PROG, BLOCK_S):
        s = (s_begin + start + tl.arange(0, BLOCK_S)[None, :]).to(tl.int64)
        ok = (k < K) & (s < s_end)
        x = tl.load(x_base + s * sS, mask=ok, other=0.0).to(ACC)
        y = _activate((x - mean) * rstd * w + b, ACT, slope)
        tl.store(y_base + s * yS, _rounded(y, BF16), mask=ok)


@triton.jit
def _grad_sums(
    dy_ptr, x_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, u_ptr, v_ptr,
    G, K, S, sN, sG, sK, sS, dN, dG, dK, dS, SC, S_PER_PROG, slope,
    PER_SAMPLE: tl.constexpr, STAT_PER_K: tl.constexpr, HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    ACT: tl.constexpr, ACC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
    FROM_OUTPUT: tl.constexpr,
):
    """Per ``(n, feature, chunk)``: ``sum dy'`` and ``sum dy' * xhat`` over its ``S``
    (``FROM_OUTPUT``: ``x_ptr`` holds in-place ABN's output, see :func:`_recover`)."""
    n, g, k, _, mean, rstd, w, b = _tile_setup(
        mean_ptr, rstd_ptr, w_ptr, b_ptr, G, K, PER_SAMPLE, STAT_PER_K, HAS_W, HAS_B, ACC,
        BLOCK_K)
    kb = tl.program_id(1)
    sc = tl.program_id(2)
    x_base = _base(x_ptr, n, g, k, sN, sG, sK)
    d_base = _base(dy_ptr, n, g, k, dN, dG, dK)
    sum_g = tl.zeros((BLOCK_K,), dtype=ACC)
    sum_gx = tl.zeros((BLOCK_K,), dtype=ACC)
    s_begin = sc * S_PER_PROG
    s_end = tl.minimum(s_begin + S_PER_PROG, S)
    for start in range(0, S_PER_PROG, BLOCK_S):
        s = (s_begin + start + tl.arange(0, BLOCK_S)[None, :]).to(tl.int64)
        ok = (k < K) & (s < s_end)
        x = tl.load(x_base + s * sS, mask=ok, other=0.0).to(ACC)
        dy = tl.load(d_base + s * dS, mask=ok, other=0.0).to(ACC)
        xhat, grad = _normalized_and_grad(x, dy, mean, rstd, w, b, ACT, slope, FROM_OUTPUT)
        sum_g += tl.sum(tl.where(ok, grad, 0.0), axis=1)
        sum_gx += tl.sum(tl.where(ok, grad * xhat, 0.0), axis=1)
    kk = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    index = ((n * G + g) * K + kk).to(tl.int64) * SC + sc
    tl.store(u_ptr + index, sum_g, mask=kk < K)
    tl.store(v_ptr + index, sum_gx, mask=kk < K)


@triton.jit
def _grad_input(
    dy_ptr, x_ptr, dx_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, a_ptr, c_ptr, cnt_ptr, mask_ptr,
    G, K, S, sN, sG, sK, sS, dN, dG, dK, dS, oN, oG, oK, oS, mN, mS, S_PER_PROG, slope,
    PER_SAMPLE: tl.constexpr, STAT_PER_K: tl.constexpr, HAS_W: tl.constexpr,
    HAS_B: tl.constexpr, ACT: tl.constexpr,
    BATCH_STATS: tl.constexpr, CENTER: tl.constexpr, MASKED: tl.constexpr,
    ACC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr, BF16: tl.constexpr,
    FROM_OUTPUT: tl.constexpr,
):
    """``dx = rstd * (dy' * w - valid * (A + xhat * B) / count)`` with the statistic's
    ``A = sum dy' * w`` and ``B = sum dy' * w * xhat`` (``rstd * dy' * w`` with given
    statistics)."""
    n, g, k, stat, mean, rstd, w, b = _tile_setup(
        mean_ptr, rstd_ptr, w_ptr, b_ptr, G, K, PER_SAMPLE, STAT_PER_K, HAS_W, HAS_B, ACC,
        BLOCK_K)
    sc = tl.program_id(2)
    through_a = tl.zeros((), dtype=ACC)
    through_b = tl.zeros((), dtype=ACC)
    if BATCH_STATS:  # (with given statistics no term: an infinite x must not reach dx)
        per = 1.0 / tl.maximum(tl.load(cnt_ptr + stat, mask=k < K, other=1.0).to(ACC), 1.0)
        through_b = tl.load(c_ptr + stat, mask=k < K, other=0.0).to(ACC) * per
        if CENTER:
            through_a = tl.load(a_ptr + stat, mask=k < K, other=0.0).to(ACC) * per
    x_base = _base(x_ptr, n, g, k, sN, sG, sK)
    d_base = _base(dy_ptr, n, g, k, dN, dG, dK)
    o_base = _base(dx_ptr, n, g, k, oN, oG, oK)
    s_begin = sc * S_PER_PROG
    s_end = tl.minimum(s_begin + S_PER_PROG, S)
    for start in range(0, S_PER_PROG, BLOCK_S):
        s = (s_begin + start + tl.arange(0, BLOCK_S)[None, :]).to(tl.int64)
        ok = (k < K) & (s < s_end)
        x = tl.load(x_base + s * sS, mask=ok, other=0.0).to(ACC)
        dy = tl.load(d_base + s * dS, mask=ok, other=0.0).to(ACC)
        xhat, grad = _normalized_and_grad(x, dy, mean, rstd, w, b, ACT, slope, FROM_OUTPUT)
        dx = grad * w
        if BATCH_STATS:
            correction = through_a + xhat * through_b
            if MASKED:
                keep = tl.load(mask_ptr + n.to(tl.int64) * mN + s * mS, mask=s < s_end,
                               other=0)
                correction = tl.where(keep != 0, correction, 0.0)
            dx = dx - correction
        dx = rstd * dx
        tl.store(o_base + s * oS, _rounded(dx, BF16), mask=ok)


@triton.jit
def _rows_forward(
    x_ptr, y_ptr, w_ptr, b_ptr, stats_ptr, R, D, sR, sD, yR, yD, ROWS_PER_PROG, eps, slope,
    CENTER: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
    ACC: tl.constexpr, BLOCK_D: tl.constexpr, BF16: tl.constexpr,
):
    """LayerNorm/RMSNorm rows that fit one program: statistics (two passes over the row
    in registers) and output in one read and one write; ``stats [4, R]`` as
    :func:`moments` writes it."""
    d = tl.arange(0, BLOCK_D)
    ok = d < D
    w = tl.zeros((BLOCK_D,), dtype=ACC) + 1.0
    b = tl.zeros((BLOCK_D,), dtype=ACC)
    if HAS_W:
        w = tl.load(w_ptr + d, mask=ok, other=0.0).to(ACC)
    if HAS_B:
        b = tl.load(b_ptr + d, mask=ok, other=0.0).to(ACC)
    first = tl.program_id(0) * ROWS_PER_PROG
    for i in range(0, ROWS_PER_PROG):
        r = first + i
        if r < R:
            x = tl.load(x_ptr + r.to(tl.int64) * sR + d * sD, mask=ok, other=0.0).to(ACC)
            mean = tl.zeros((), dtype=ACC)
            if CENTER:
                mean = tl.sum(x) / D
            centred = tl.where(ok, x - mean, 0.0)
            var = tl.sum(centred * centred) / D
            rstd = tl.math.rsqrt(var + eps)
            y = _activate(centred * rstd * w + b, ACT, slope)
            tl.store(y_ptr + r.to(tl.int64) * yR + d * yD, _rounded(y, BF16), mask=ok)
            tl.store(stats_ptr + r, mean)
            tl.store(stats_ptr + R + r, var)
            tl.store(stats_ptr + 2 * R + r, rstd)
            tl.store(stats_ptr + 3 * R + r, D + mean * 0)


@triton.jit
def _rows_backward(
    dy_ptr, x_ptr, dx_ptr, w_ptr, b_ptr, stats_ptr, dw_ptr, db_ptr, R, D, sR, sD, dR, dD,
    oR, oD, ROWS_PER_PROG, slope,
    CENTER: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
    ACC: tl.constexpr, BLOCK_D: tl.constexpr, BF16: tl.constexpr,
):
    """The backward of :func:`_rows_forward` in one pass per row (``x`` and ``dy`` read
    once, ``dx`` written once); the parameter gradients summed over the program's rows
    in registers, one partial row per program."""
    d = tl.arange(0, BLOCK_D)
    ok = d < D
    w = tl.zeros((BLOCK_D,), dtype=ACC) + 1.0
    b = tl.zeros((BLOCK_D,), dtype=ACC)
    if HAS_W:
        w = tl.load(w_ptr + d, mask=ok, other=0.0).to(ACC)
    if HAS_B:
        b = tl.load(b_ptr + d, mask=ok, other=0.0).to(ACC)
    dw = tl.zeros((BLOCK_D,), dtype=ACC)
    db = tl.zeros((BLOCK_D,), dtype=ACC)
    first = tl.program_id(0) * ROWS_PER_PROG
    for i in range(0, ROWS_PER_PROG):
        r = first + i
        if r < R:
            x = tl.load(x_ptr + r.to(tl.int64) * sR + d * sD, mask=ok, other=0.0).to(ACC)
            dy = tl.load(dy_ptr + r.to(tl.int64) * dR + d * dD, mask=ok, other=0.0).to(ACC)
            mean = tl.load(stats_ptr + r).to(ACC)
            rstd = tl.load(stats_ptr + 2 * R + r).to(ACC)
            xhat = tl.where(ok, (x - mean) * rstd, 0.0)
            grad = tl.where(ok, _activation_grad(xhat * w + b, dy, ACT, slope), 0.0)
            scaled = grad * w
            through_b = tl.sum(scaled * xhat) / D
            dx = scaled - xhat * through_b
            if CENTER:
                dx = dx - tl.sum(scaled) / D
            tl.store(dx_ptr + r.to(tl.int64) * oR + d * oD, _rounded(rstd * dx, BF16), mask=ok)
            dw += grad * xhat
            db += grad
    tl.store(dw_ptr + tl.program_id(0).to(tl.int64) * D + d, dw, mask=ok)
    tl.store(db_ptr + tl.program_id(0).to(tl.int64) * D + d, db, mask=ok)


# --- launching ------------------------------------------------------------------------------


def accumulator(dtype: torch.dtype) -> tuple[torch.dtype, tl.dtype]:
    """The accumulator dtype for input of ``dtype`` (float64 stays float64)."""
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


def tiles(view: tuple[int, int, int, int], max_k: int = _TILE
          ) -> tuple[int, int, int, int, int]:
    """``(BLOCK_K, BLOCK_S, k_blocks, s_chunks, s_per_program)`` for ``view``: a tile of
    about ``_TILE`` elements shaped to ``K`` (at most ``max_k`` wide) and ``S``, and ``S``
    cut into chunks until the grid has about ``_TARGET_PROGRAMS`` programs."""
    n, g, k, s = view
    block_k = min(triton.next_power_of_2(k), max_k)
    block_s = min(triton.next_power_of_2(s), max(1, _TILE // block_k))
    k_blocks = triton.cdiv(k, block_k)
    s_tiles = triton.cdiv(s, block_s)
    rows = max(1, n * g * k_blocks)
    chunks = min(s_tiles, max(1, math.ceil(_TARGET_PROGRAMS / rows)), 65535)
    tiles_per_chunk = triton.cdiv(s_tiles, chunks)
    chunks = triton.cdiv(s_tiles, tiles_per_chunk)
    return block_k, block_s, k_blocks, chunks, tiles_per_chunk * block_s


# Channels along K: wide enough for whole memory transactions, narrow enough that a tile
# still walks many positions of S.
_CHANNEL_BLOCK = 64


class _Launch:
    """How a plan's ``x4 [N, G, K, S]`` is launched, the same relabelling of axes for
    every tensor of the call (only indices change, so any strides stay valid):

    - per-channel statistics (``K = 1``) whose channels are contiguous in memory
      (channels-last, ``[N, C]``) put the channels on the ``K`` axis (``per_k``): a tile's
      rows are neighbouring channels, read in whole transactions, each its own statistic;
    - per-channel statistics of one value per sample (``S = 1``) walk ``N`` as their
      ``S`` axis (``swap``), so a program covers many samples instead of one."""

    def __init__(self, x4: Tensor, per_sample: bool) -> None:
        n, g, k, s = x4.shape
        self.per_sample = per_sample
        self.per_k = not per_sample and k == 1 and g > 1 and x4.stride(1) == 1
        if self.per_k:
            g, k = 1, g
        self.swap = not per_sample and s == 1 and n > 1
        if self.swap:
            n, s = 1, n
        self.view = (n, g, k, s)
        self.tiles = tiles(self.view, _CHANNEL_BLOCK if self.per_k else _TILE)

    def strides(self, t: Tensor) -> tuple[int, int, int, int]:
        sn, sg, sk, ss = t.stride()
        if self.per_k:
            sg, sk = 0, sg
        if self.swap:
            sn, ss = 0, sn
        return sn, sg, sk, ss

    def mask(self, mask4: Tensor | None) -> tuple[Tensor | None, int, int]:
        if mask4 is None:
            return None, 0, 0
        as_bytes = mask4.view(torch.uint8) if mask4.dtype == torch.bool else mask4
        if self.swap:
            return as_bytes, 0, as_bytes.stride(0)
        return as_bytes, as_bytes.stride(0), as_bytes.stride(3)

    def grid(self) -> tuple[int, int, int]:
        n, g, _, _ = self.view
        _, _, k_blocks, chunks, _ = self.tiles
        return n * g, k_blocks, chunks

    def flags(self) -> dict[str, object]:
        block_k, block_s = self.tiles[:2]
        return {"PER_SAMPLE": self.per_sample, "STAT_PER_K": self.per_k, "BLOCK_K": block_k,
                "BLOCK_S": block_s}


def moments(
    x4: Tensor, mask4: Tensor | None, *, per_sample: bool, center: bool, eps: float
) -> Tensor:
    """``stats [4, R]``: mean, biased var, rstd and count per statistic (``R = G``, or
    ``N*G`` per sample), accumulator dtype (mean 0 and var the mean of squares without
    ``center``; over ``mask4``'s valid positions)."""
    launch = _Launch(x4, per_sample)
    n, g, k, s = launch.view
    _, _, k_blocks, chunks, s_per = launch.tiles
    acc, acc_tl = accumulator(x4.dtype)
    stats = x4.shape[0] * x4.shape[1] if per_sample else x4.shape[1]
    if launch.per_k:
        partials = n * chunks
    else:
        partials = k_blocks * chunks * (1 if per_sample else n)
    parts = torch.empty(3, stats, partials, dtype=acc, device=x4.device)
    mask, m_n, m_s = launch.mask(mask4)
    _partial_moments[launch.grid()](
        x4, mask, parts[0], parts[1], parts[2],
        n, g, k, s, *launch.strides(x4), m_n, m_s, k_blocks, chunks, s_per,
        MASKED=mask is not None, ACC=acc_tl, **launch.flags(),
    )
    out = torch.empty(4, stats, dtype=acc, device=x4.device)
    _merge_moments[(stats,)](
        parts[0], parts[1], parts[2], out[0], out[1], out[2], out[3], partials, eps,
        CENTER=center, ACC=acc_tl, BLOCK_P=min(triton.next_power_of_2(partials), 1024),
    )
    return out


def normalize(
    x4: Tensor, y4: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor | None,
    bias: Tensor | None, *, per_sample: bool, act: int, slope: float,
) -> None:
    """Writes ``act((x4 - mean) * rstd * weight + bias)`` into ``y4``."""
    launch = _Launch(x4, per_sample)
    _, g, k, s = launch.view
    _, acc_tl = accumulator(x4.dtype)
    _normalize[launch.grid()](
        x4, y4, mean, rstd, weight, bias, g, k, s, *launch.strides(x4), *launch.strides(y4),
        launch.tiles[4], float(slope), HAS_W=weight is not None, HAS_B=bias is not None,
        ACT=act, ACC=acc_tl, BF16=y4.dtype == torch.bfloat16, **launch.flags(),
    )


def grad_sums(
    dy4: Tensor, x4: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor | None,
    bias: Tensor | None, *, per_sample: bool, act: int, slope: float,
    from_output: bool = False,
) -> tuple[Tensor, Tensor]:
    """``(sum dy', sum dy' * xhat)`` per ``(n, feature)``: ``[N, G*K]`` (``[1, C]`` for
    ``[N, C]``-like per-channel input), accumulator dtype. ``from_output``: ``x4`` is
    in-place ABN's output (act 2 leaky_relu, 5 elu, 0 none; ``slope`` its parameter)."""
    launch = _Launch(x4, per_sample)
    n, g, k, s = launch.view
    chunks, s_per = launch.tiles[3:]
    acc, acc_tl = accumulator(x4.dtype)
    sums = torch.empty(2, n, g * k, chunks, dtype=acc, device=x4.device)
    _grad_sums[launch.grid()](
        dy4, x4, mean, rstd, weight, bias, sums[0], sums[1], g, k, s, *launch.strides(x4),
        *launch.strides(dy4), chunks, s_per, float(slope), HAS_W=weight is not None,
        HAS_B=bias is not None, ACT=act, ACC=acc_tl, FROM_OUTPUT=from_output,
        **launch.flags(),
    )
    total = sums.sum(3)
    return total[0], total[1]


def grad_input(
    dy4: Tensor, x4: Tensor, dx4: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor | None,
    bias: Tensor | None, through: tuple[Tensor, Tensor, Tensor] | None,
    mask4: Tensor | None, *, per_sample: bool, center: bool, act: int, slope: float,
    from_output: bool = False,
) -> None:
    """Writes the input gradient into ``dx4``; ``through = (A, B, count)`` per statistic
    for batch statistics, ``None`` for given ones."""
    launch = _Launch(x4, per_sample)
    _, g, k, s = launch.view
    _, acc_tl = accumulator(x4.dtype)
    mask, m_n, m_s = launch.mask(mask4)
    a, b, count = through if through is not None else (mean, mean, mean)
    _grad_input[launch.grid()](
        dy4, x4, dx4, mean, rstd, weight, bias, a, b, count, mask, g, k, s,
        *launch.strides(x4), *launch.strides(dy4), *launch.strides(dx4), m_n, m_s,
        launch.tiles[4], float(slope), HAS_W=weight is not None, HAS_B=bias is not None,
        ACT=act, BATCH_STATS=through is not None, CENTER=center, MASKED=mask is not None,
        ACC=acc_tl, BF16=dx4.dtype == torch.bfloat16, FROM_OUTPUT=from_output,
        **launch.flags(),
    )


# Rows up to this many values are normalized in one program each way (in registers).
ROW_LIMIT = 8192


def fits_rows(x4: Tensor, per_sample: bool) -> bool:
    """Whether ``x4 [R, 1, D, 1]`` (LayerNorm, RMSNorm) takes the one-program-per-row
    kernels."""
    _, g, d, s = x4.shape
    return per_sample and g == 1 and s == 1 and 0 < d <= ROW_LIMIT


def _row_warps(block_d: int) -> int:
    """Warps for a row of ``block_d`` values: about 8 values a thread, so a long row
    stays in registers."""
    return min(32, max(4, block_d // 256))


def _row_programs(rows: int) -> tuple[int, int]:
    programs = min(rows, _TARGET_PROGRAMS)
    per = triton.cdiv(rows, programs)
    return triton.cdiv(rows, per), per


def rows_forward(
    x4: Tensor, y4: Tensor, weight: Tensor | None, bias: Tensor | None, *, center: bool,
    eps: float, act: int, slope: float,
) -> Tensor:
    """Writes ``y4`` and returns ``stats [4, R]`` (see :func:`fits_rows`)."""
    rows, _, d, _ = x4.shape
    acc, acc_tl = accumulator(x4.dtype)
    stats = torch.empty(4, rows, dtype=acc, device=x4.device)
    programs, per = _row_programs(rows)
    _rows_forward[(programs,)](
        x4, y4, weight, bias, stats, rows, d, x4.stride(0), x4.stride(2), y4.stride(0),
        y4.stride(2), per, eps, float(slope), CENTER=center, HAS_W=weight is not None,
        HAS_B=bias is not None, ACT=act, ACC=acc_tl, BLOCK_D=triton.next_power_of_2(d),
        BF16=y4.dtype == torch.bfloat16, num_warps=_row_warps(triton.next_power_of_2(d)),
    )
    return stats


def rows_backward(
    dy4: Tensor, x4: Tensor, dx4: Tensor, weight: Tensor | None, bias: Tensor | None,
    stats: Tensor, *, center: bool, act: int, slope: float,
) -> tuple[Tensor, Tensor]:
    """Writes ``dx4``; returns ``(dweight, dbias)`` ``[D]`` in the accumulator dtype."""
    rows, _, d, _ = x4.shape
    acc, acc_tl = accumulator(x4.dtype)
    programs, per = _row_programs(rows)
    partial = torch.empty(2, programs, d, dtype=acc, device=x4.device)
    _rows_backward[(programs,)](
        dy4, x4, dx4, weight, bias, stats, partial[0], partial[1], rows, d, x4.stride(0),
        x4.stride(2), dy4.stride(0), dy4.stride(2), dx4.stride(0), dx4.stride(2), per,
        float(slope), CENTER=center, HAS_W=weight is not None, HAS_B=bias is not None,
        ACT=act, ACC=acc_tl, BLOCK_D=triton.next_power_of_2(d),
        BF16=dx4.dtype == torch.bfloat16, num_warps=_row_warps(triton.next_power_of_2(d)),
    )
    total = partial.sum(1)
    return total[0], total[1]
