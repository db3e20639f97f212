"""The CPU provider's implementations of the ops of ``normlab.ops._library`` on the
``[N, G, K, S]`` view: layouts chosen per call, kernels run, float16/bfloat16 computed in
float32. Registered for device ``"cpu"`` at import."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from normlab.ops import _library
from normlab.ops.composite import normalize_with_stats as composite_normalize_with_stats
from normlab.ops.cpu import kernels as K
from normlab.ops.cpu.layouts import (
    _NO_RUNNING,
    ROW_PIECES,
    _by_planes,
    _channel_scratch,
    _is_cols,
    _np,
    _planes_block,
    _rows_by_planes,
    _source,
    _stat_np,
    _Target,
    _vector,
    _zero,
)
from normlab.ops.cpu.runtime import sync_threads
from normlab.plan import compute_dtype


def running_update(
    running_mean: Tensor,
    running_var: Tensor,
    batch_mean: Tensor,
    batch_var: Tensor,
    correction: float,
    momentum: float,
) -> int | None:
    """The arithmetic of ``normlab.running.update_running_stats`` in one kernel call (its
    ``kernel``; eight small torch ops cost more than a whole normalization of a small
    tensor): how many channels kept their values (non-finite statistics), or ``None``
    where it does not apply (float32/float64 contiguous CPU vectors of one dtype, outside
    tracing and torch.func transforms)."""
    dtype = batch_mean.dtype
    tensors = (running_mean, running_var, batch_mean, batch_var)
    if (
        dtype not in (torch.float32, torch.float64)
        or not _library.eager(batch_mean)
        or _library.composite_only(batch_mean)
    ) or not all(
        t.device.type == "cpu" and t.dtype == dtype and t.is_contiguous() for t in tensors
    ):
        return None
    rm, rv, bm, bv = (t.detach().numpy() for t in tensors)
    kept = K.running_update(rm, rv, bm, bv, correction, momentum)
    # Written behind autograd's back: count the writes, so a graph that saved a buffer
    # (an eval-mode step) raises at backward instead of using the new values silently.
    torch.autograd.graph.increment_version((running_mean, running_var))
    return kept



def _forward_impl(
    x4: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    per_sample: bool,
    center: bool,
    eps: float,
    write: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Statistics ``(mean, var, rstd)`` of ``x4`` and (if ``write``) ``y4``, empty-like x4."""
    _library.check_per_channel(x4, per_sample)
    n, g, k, s = x4.shape
    work = compute_dtype(x4.dtype)
    shape = (n, g) if per_sample else (g,)
    y4 = torch.empty_like(x4) if write else x4.new_empty((0,))
    mean, var, rstd = (torch.empty(shape, dtype=work) for _ in range(3))
    if x4.numel() == 0:
        # No elements to average: statistics are undefined (NaN), the output is empty.
        for stat in (mean, var, rstd):
            stat.fill_(float("nan"))
        return y4, mean, var, rstd
    sync_threads(x4.numel())
    w = _vector(weight, g * k, work, 1.0)
    b = _vector(bias, g * k, work, 0.0)
    cols = not per_sample and _is_cols(x4)
    x2 = _source(x4, work, cols)
    out = _Target(y4, work, cols) if write else None
    y2 = _np(out.buf) if out is not None else _np(x2)  # not written when write=False
    stats = (_np(mean).reshape(-1), _np(var).reshape(-1), _np(rstd).reshape(-1))
    if per_sample and _rows_by_planes(x4):
        r = n * g
        block = _planes_block(1, r, s, x2.element_size())
        K.planes_forward(
            _np(x2).reshape(1, r, s), _np(w), _np(b), 0, 0.0, block, True, write, center, eps,
            y2.reshape(1, r, s), *stats, _NO_RUNNING[work], _NO_RUNNING[work], 0.0,
        )
    elif per_sample:
        K.rows_forward(
            _np(x2), _np(w), _np(b), g, center, eps, y2, *stats, write, 0, 0.0, _zero(work)
        )
    elif _by_planes(x4, cols):
        x3 = _np(x2).reshape(n, g, s)
        y3 = y2.reshape(n, g, s) if write else np.empty((n, g, 0), dtype=x3.dtype)
        block = _planes_block(n, g, s, x2.element_size())
        K.planes_forward(
            x3, _np(w), _np(b), 0, 0.0, block, True, write, center, eps, y3, *stats,
            _NO_RUNNING[work], _NO_RUNNING[work], 0.0,
        )
    else:
        kernel = K.channel_cols_forward if cols else K.channel_rows_forward
        scratch = _channel_scratch(x2, cols, 2, 2)
        kernel(
            _np(x2), _np(w), _np(b), True, write, center, eps, y2, *stats, scratch,
            _zero(work),
        )
    if out is not None:
        out.finish()
    return y4, mean, var, rstd


def _backward_impl(
    dy4: Tensor,
    x4: Tensor,
    mean: Tensor,
    rstd: Tensor,
    weight: Tensor | None,
    per_sample: bool,
    center: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx4, dweight, dbias)`` of the train-mode normalization; dweight/dbias are
    ``[G*K]`` sums in the compute dtype (returned even without weight/bias)."""
    _library.check_per_channel(x4, per_sample)
    n, g, k, s = x4.shape
    work = compute_dtype(x4.dtype)
    dx4 = torch.empty_like(x4)
    dw = torch.zeros(g * k, dtype=work)
    db = torch.zeros(g * k, dtype=work)
    if x4.numel() == 0:
        return dx4, dw, db
    sync_threads(x4.numel())
    w = _vector(weight, g * k, work, 1.0)
    mean_c = _stat_np(mean, work)
    rstd_c = _stat_np(rstd, work)
    cols = not per_sample and _is_cols(x4)
    x2 = _source(x4, work, cols)
    dy2 = _source(dy4, work, cols)
    out = _Target(dx4, work, cols)
    args = (_np(dy2), _np(x2), mean_c, rstd_c, _np(w))
    if per_sample and _rows_by_planes(x4):
        r = n * g
        planes = (_np(dy2).reshape(1, r, s), _np(x2).reshape(1, r, s))
        per_plane = np.empty((2, r), dtype=_np(x2).dtype)
        K.planes_backward(
            *planes, mean_c, rstd_c, _np(w), _np(_vector(None, g, work, 0.0)), 0, 0.0,
            _planes_block(1, r, s, x2.element_size()), center,
            _np(out.buf).reshape(1, r, s), per_plane[0], per_plane[1],
        )
        # Each channel's sum over the samples, in float64 and in order: deterministic.
        _np(dw)[:] = per_plane[0].reshape(n, g).sum(0, dtype=np.float64)
        _np(db)[:] = per_plane[1].reshape(n, g).sum(0, dtype=np.float64)
    elif per_sample:
        partials = np.zeros((2, min(n * g, ROW_PIECES), g * k), dtype=_np(x2).dtype)
        K.rows_backward(
            *args, _np(w), g, center, 0, 0.0, *partials, _np(out.buf), _np(dw), _np(db),
            _zero(work),
        )
    elif _by_planes(x4, cols):
        planes = (_np(dy2).reshape(n, g, s), _np(x2).reshape(n, g, s))
        b = _np(_vector(None, g, work, 0.0))
        block = _planes_block(n, g, s, x2.element_size())
        K.planes_backward(
            *planes, mean_c, rstd_c, _np(w), b, 0, 0.0, block, center,
            _np(out.buf).reshape(n, g, s), _np(dw), _np(db),
        )
    else:
        kernel = K.channel_cols_backward if cols else K.channel_rows_backward
        scratch = _channel_scratch(x2, cols, 2, 2)
        z = _zero(work)
        if center:
            kernel(*args, True, True, n * s, _np(db), _np(dw), _np(out.buf), scratch, z)
        else:
            # Without centering, dx has no sum(dy) term: reduce, then apply with it zeroed.
            kernel(*args, True, False, n * s, _np(db), _np(dw), _np(out.buf), scratch, z)
            zero = np.zeros(g, dtype=_np(dw).dtype)
            kernel(*args, False, True, n * s, zero, _np(dw), _np(out.buf), scratch, z)
    out.finish()
    return dx4, dw, db


def _apply_impl(
    x4: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    """Eval mode: ``(x4 - mean) * rsqrt(var + eps) * weight + bias`` with stats ``[G]``
    (``K > 1``, which no layer uses, is delegated to the composite code)."""
    n, g, k, s = x4.shape
    work = compute_dtype(x4.dtype)
    y4 = torch.empty_like(x4)
    if x4.numel() == 0:
        return y4
    if k != 1:
        return composite_normalize_with_stats(x4, mean, var, weight, bias, eps=eps)
    sync_threads(x4.numel())
    rstd = torch.rsqrt(var.detach().to(work) + eps).contiguous()
    mean_c = mean.detach().to(work).contiguous()
    w = _vector(weight, g, work, 1.0)
    b = _vector(bias, g, work, 0.0)
    cols = _is_cols(x4)
    x2 = _source(x4, work, cols)
    out = _Target(y4, work, cols)
    kernel = K.channel_cols_forward if cols else K.channel_rows_forward
    scratch = _channel_scratch(x2, cols, 1, 1)
    stats = (_np(mean_c), _np(rstd), _np(rstd))  # (mean, var, rstd): var is not read
    kernel(
        _np(x2), _np(w), _np(b), False, True, True, eps, _np(out.buf), *stats, scratch,
        _zero(work),
    )
    return out.finish()


def _channel_backward_impl(
    dy4: Tensor,
    x4: Tensor,
    mean: Tensor,
    rstd: Tensor,
    weight: Tensor | None,
    sums: tuple[Tensor, Tensor] | None,
    count: int,
    apply: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel ``(sum_dy, sum_dy_xhat, dx4)``: the sums are computed unless given in
    ``sums``; ``dx4`` is written when ``apply`` (else it is an empty tensor)."""
    _library.check_per_channel(x4, False)
    n, g, k, s = x4.shape
    work = compute_dtype(x4.dtype)
    reduce = sums is None
    if reduce:
        sum_dy = torch.zeros(g, dtype=work)
        sum_dyx = torch.zeros(g, dtype=work)
    else:
        sum_dy, sum_dyx = (t.detach().to(work).contiguous() for t in sums)
    dx4 = torch.empty_like(x4) if apply else x4.new_empty((0,))
    if x4.numel() == 0:
        return sum_dy, sum_dyx, dx4
    sync_threads(x4.numel())
    cols = _is_cols(x4)
    x2 = _source(x4, work, cols)
    dy2 = _source(dy4, work, cols)
    out = _Target(dx4, work, cols) if apply else None
    dx2 = _np(out.buf) if out is not None else _np(x2)
    args = (
        _np(dy2), _np(x2), _stat_np(mean, work), _stat_np(rstd, work),
        _np(_vector(weight, g, work, 1.0)),
    )
    kernel = K.channel_cols_backward if cols else K.channel_rows_backward
    scratch = _channel_scratch(x2, cols, 2, 2)
    kernel(*args, reduce, apply, count, _np(sum_dy), _np(sum_dyx), dx2, scratch, _zero(work))
    if out is not None:
        out.finish()
    return sum_dy, sum_dyx, dx4


_library.register(
    "cpu",
    _library.Implementations(_forward_impl, _backward_impl, _apply_impl, _channel_backward_impl),
)
