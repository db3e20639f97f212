"""Layouts: the ``[N, G, K, S]`` view of a plan as the kernels' C-contiguous arrays
(rows ``[N*G, K*S]``, cols ``[N*S, C]``, planes ``[N, C, S]``), the parameters as
vectors, scratch buffers and the shape-only block sizes (so results do not depend on the
thread count)."""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor

# Bytes per piece of the cols layout: small enough that the second pass over a piece hits
# the L2 cache, large enough that a piece's fixed cost (partials, merge) stays small.
_PIECE_BYTES = 256 * 1024
ROW_PIECES = 32  # row pieces of the rows backward's parameter-gradient partials


def _is_cols(x4: Tensor) -> bool:
    """Whether to use the cols layout ``[N*S, C]``: channels-last input, and every
    ``S == 1`` input (``[N, C]``), even a non-contiguous one that must be copied: the rows
    layout would be ``[N*C, 1]``, one-element rows, the slowest case of its kernels."""
    if x4.shape[2] != 1:
        return False
    return x4.shape[3] == 1 or x4.permute(0, 3, 1, 2).is_contiguous()


def _source(t4: Tensor, dtype: torch.dtype, cols: bool) -> Tensor:
    """``t4 [N, G, K, S]`` as a C-contiguous 2-D tensor of ``dtype`` in the given layout
    (a view when the strides already fit, a copy otherwise)."""
    n, g, k, s = t4.shape
    t4 = t4.detach()
    if t4.dtype != dtype:
        t4 = t4.to(dtype)
    if cols and s == 1 and t4.is_contiguous():  # [N, C, 1, 1]: already rows of C
        return t4.view(n, g * k)
    if cols:
        return t4.permute(0, 3, 1, 2).contiguous().view(n * s, g * k)
    return t4.contiguous().view(n * g, k * s)


class _Target:
    """The 2-D buffer a kernel writes, aliasing ``out4`` when its layout and dtype allow
    it, a scratch tensor copied back by ``finish()`` otherwise."""

    def __init__(self, out4: Tensor, dtype: torch.dtype, cols: bool) -> None:
        n, g, k, s = out4.shape
        self.out4, self.cols = out4, cols
        view = out4.permute(0, 3, 1, 2) if cols else out4
        shape = (n * s, g * k) if cols else (n * g, k * s)
        self.direct = out4.dtype == dtype and view.is_contiguous()
        self.buf = view.view(shape) if self.direct else torch.empty(shape, dtype=dtype)

    def finish(self) -> Tensor:
        if not self.direct:
            n, g, k, s = self.out4.shape
            if self.cols:
                self.out4.permute(0, 3, 1, 2).copy_(self.buf.view(n, s, g, k))
            else:
                self.out4.copy_(self.buf.view(n, g, k, s))
        return self.out4


def _vector(param: Tensor | None, size: int, dtype: torch.dtype, fill: float) -> Tensor:
    """An affine parameter as a contiguous ``[size]`` tensor (``fill`` when absent)."""
    if param is None:
        return _constant(size, dtype, fill)
    param = param.detach()
    if param.dtype != dtype or not param.is_contiguous():
        param = param.to(dtype).contiguous()
    return param if param.dim() == 1 else param.view(size)


# Constants of at most this many elements are cached: a cache of 64 full-size vectors
# for wide rows (LayerNorm(2**24) without affine) would hold gigabytes for good, while a
# large call does not notice one allocation beside its own traffic.
_CACHED_CONSTANT_MAX = 1 << 16


def _constant(size: int, dtype: torch.dtype, fill: float) -> Tensor:
    """A read-only ``[size]`` vector of ``fill`` for the kernels."""
    if size > _CACHED_CONSTANT_MAX:
        return torch.full((size,), fill, dtype=dtype)
    return _cached_constant(size, dtype, fill)


@functools.lru_cache(maxsize=64)
def _cached_constant(size: int, dtype: torch.dtype, fill: float) -> Tensor:
    # Cached: the kernels only read it, and small calls feel every allocation.
    return torch.full((size,), fill, dtype=dtype)


def _stat_np(t: Tensor, dtype: torch.dtype):  # noqa: ANN202  (numpy array)
    """Statistics ``[G]`` or ``[N, G]`` as a contiguous flat array of ``dtype``."""
    t = t.detach()
    if t.dtype != dtype or not t.is_contiguous():
        t = t.to(dtype).contiguous()
    return t.numpy().reshape(-1)


def _np(t: Tensor):  # noqa: ANN202  (numpy array)
    # Every tensor handed to the kernels is already detached (_source, _vector, the
    # implementations' own outputs): no detach() per argument, small calls feel each op.
    return t.numpy()


def _pieces(rows: int, row_elements: int, itemsize: int) -> int:
    """Fixed (shape- and dtype-only, thread-independent) number of pieces of the cols
    layout."""
    wanted = -(-rows * row_elements * itemsize // _PIECE_BYTES)
    return max(1, min(rows, max(wanted, 8)))


_ZEROS = {torch.float32: np.zeros(1, np.float32), torch.float64: np.zeros(1, np.float64)}
# Running buffers of no channel: the planes kernels' "no running update".
_NO_RUNNING = {torch.float32: np.zeros(0, np.float32), torch.float64: np.zeros(0, np.float64)}


def _zero(dtype: torch.dtype):  # noqa: ANN202
    """A 1-element zero array of the compute dtype: it types the kernels' accumulators."""
    return _ZEROS[dtype]


def _channel_scratch(x2: Tensor, cols: bool, per_piece: int, per_plane: int):  # noqa: ANN202
    """Float64 scratch of the channel kernels: ``[pieces, per_piece, C]`` (cols layout)
    or ``[per_plane, N*C]`` (rows layout)."""
    rows, cols_ = x2.shape
    if cols:
        return np.empty((_pieces(rows, cols_, x2.element_size()), per_piece, cols_))
    return np.empty((per_plane, rows))


# BatchNorm with at least this many channels runs one channel per task (the "planes"
# kernels: statistics and output while the channel is in cache); fewer channels cannot
# keep the threads busy and run the plane-parallel kernels instead.
PLANES_MIN_CHANNELS = 8


def _by_planes(x4: Tensor, cols: bool) -> bool:
    """Whether per-channel statistics run on the planes kernels: with enough channels."""
    return not cols and x4.shape[1] >= PLANES_MIN_CHANNELS


# Channels per task of the planes kernels: runs of at least _RUN_BYTES (short planes read
# one by one defeat the prefetcher), a task's data in cache for the second pass
# (_TASK_BYTES), and _MIN_TASKS tasks to balance the threads (docs/backends.md).
_RUN_BYTES = 32 * 1024
_TASK_BYTES = 1024 * 1024
_MIN_TASKS = 16


@functools.lru_cache(maxsize=256)
def _planes_block(n: int, channels: int, spatial: int, itemsize: int) -> int:
    """Channels per task (shape-only; each channel is summed in the same order whatever
    the block, so results do not depend on it)."""
    plane = spatial * itemsize
    block = -(-_RUN_BYTES // plane)
    block = min(block, max(1, _TASK_BYTES // (n * plane)), max(1, channels // _MIN_TASKS))
    return max(1, block)


# Per-sample statistics over rows of at most this many values (InstanceNorm at 7x7, 8x8)
# run the planes kernels on the view [1, N*C, S]: adjacent rows read as one run instead of
# a reduction per row (docs/backends.md).
PLANES_MAX_ROW = 64


def _rows_by_planes(x4: Tensor) -> bool:
    """Whether per-sample statistics of ``x4 [N, G, K, S]`` run the planes kernels."""
    return x4.shape[2] == 1 and x4.shape[3] <= PLANES_MAX_ROW


_STEP_DTYPES = (torch.float32, torch.float64)


# Axes that put the channels last, by rank: the cols layout's view of a channels-last
# (or [N, C]) tensor.
_CHANNELS_LAST_AXES = {2: (0, 1), 3: (0, 2, 1), 4: (0, 2, 3, 1), 5: (0, 2, 3, 4, 1)}
_CHANNELS_LAST_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}


def _cols_np(t: Tensor, channels: int):  # noqa: ANN202  (numpy array)
    """``t [N, C, *S]`` (channels-last or ``[N, C]``-like) as a ``[N*S, C]`` numpy view."""
    a = t.detach().numpy().transpose(_CHANNELS_LAST_AXES[t.dim()]).view()
    a.shape = (-1, channels)  # raises rather than copy: the kernels write through views
    return a


def _constant_np(size: int, dtype: torch.dtype, fill: float):  # noqa: ANN202
    if size > _CACHED_CONSTANT_MAX:
        return _constant(size, dtype, fill).numpy()
    return _cached_constant_np(size, dtype, fill)


@functools.lru_cache(maxsize=64)
def _cached_constant_np(size: int, dtype: torch.dtype, fill: float):  # noqa: ANN202
    return _cached_constant(size, dtype, fill).numpy()


def _param_np(param: Tensor | None, size: int, dtype: torch.dtype, fill: float):  # noqa: ANN202
    return _constant_np(size, dtype, fill) if param is None else param.detach().numpy()

