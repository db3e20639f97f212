"""Fast CPU backend: fused, parallel numba kernels registered as ``torch.library`` ops.

Same contract as ``normlab.ops.torch_ops`` (read it first): ``normalize``,
``normalize_with_stats``, ``moments``, ``backward_reduce``, ``backward_apply`` on the
canonical view ``x4 = [N, G, K, S]``, and ``supports(x)``.

How it runs:

- Kernels (``normlab.ops._kernels``) work on three layouts: *rows* (``[N*G, K*S]``,
  contiguous input: per-sample norms and NCHW BatchNorm), *cols* (``[N*S, C]``:
  channels-last BatchNorm, or ``S == 1``) and *planes* (``[N, C, S]`` in channel blocks:
  NCHW BatchNorm with many channels, short per-sample rows). Any other strides are
  copied to contiguous.
- float32/float64 run natively; float16/bfloat16 are converted to float32 (the compute
  dtype), statistics are returned in it and the output converted back.
- The ops ``normlab::normalize``, ``normlab::normalize_with_stats``,
  ``normlab::normalize_backward``, ``normlab::moments``, ``normlab::backward_reduce`` and
  ``normlab::backward_apply`` have fake (meta) kernels and autograd formulas, so
  ``torch.compile(fullgraph=True)`` sees single ops. In eager mode the public functions
  call the same implementations through a ``torch.autograd.Function`` (the custom-op
  dispatcher costs tens of microseconds a call, which small tensors notice).
- Double backward (a backward run with ``create_graph=True``) is computed with the
  composite torch code, which autograd can differentiate again.
- numba's thread pool starts before the first parallel kernel (not at import); its
  threads follow ``torch.get_num_threads()`` (set before each call when they differ).
  Compiled kernels are cached on disk under ``$NUMBA_CACHE_DIR`` or, if it is unset,
  ``$XDG_CACHE_HOME/normlab/numba`` (``~/.cache/normlab/numba``), so a read-only install
  still caches and a second process does not compile again; ``os.environ`` and numba's
  config are left as they were.
- Per-channel statistics need ``K == 1`` (every BatchNorm); other per-channel views are
  delegated to the composite backend.
"""

from __future__ import annotations

import functools
import math
import os
import threading
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numba
import numpy as np
import torch
from numba.core import caching
from torch import Tensor

from normlab.ops import torch_ops
from normlab.ops.torch_ops import compute_dtype


def cache_dir() -> str:
    """Where the compiled kernels are cached: ``$NUMBA_CACHE_DIR`` if set, else a user dir."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return os.environ["NUMBA_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "normlab", "numba")


_CACHE_DIR = cache_dir()
_KERNELS_FILE = os.path.realpath(os.path.join(os.path.dirname(__file__), "_kernels.py"))


class _KernelCacheLocator(caching.UserProvidedCacheLocator):
    """Caches normlab's own kernels (``_kernels.py``) under :func:`cache_dir`, never next
    to the (possibly read-only) installed sources, without touching ``os.environ`` or
    numba's global config: a user's own numba functions cache where they did before."""

    def __init__(self, py_func: Callable, py_file: str) -> None:
        self._py_file = py_file
        self._lineno = py_func.__code__.co_firstlineno
        self._cache_path = os.path.join(_CACHE_DIR, self.get_suitable_cache_subpath(py_file))

    @classmethod
    def from_function(cls, py_func: Callable, py_file: str) -> _KernelCacheLocator | None:
        if os.path.realpath(py_file) != _KERNELS_FILE:
            return None
        # The source-file mixin's constructor (UserProvidedCacheLocator's would ask
        # numba.config.CACHE_DIR, which stays the user's).
        return super(caching.UserProvidedCacheLocator, cls).from_function(py_func, py_file)


if _KernelCacheLocator not in caching.CacheImpl._locator_classes:
    caching.CacheImpl._locator_classes.insert(0, _KernelCacheLocator)

# After the locator: numba picks a function's cache when its decorator runs.
from normlab.ops import _kernels as K  # noqa: E402

# numba's OpenMP layer links the system libgomp, a second OpenMP runtime beside the one
# torch bundles. Its idle threads spin (GOMP's default) on the cores torch's threads need
# next, and vice versa; on a loaded machine a spinning pool costs whole scheduler time
# slices (tens of ms) per call. libgomp reads OMP_WAIT_POLICY once, when it is loaded:
# start numba's pool now with a passive (sleeping) policy, then restore the environment,
# so torch's runtime and child processes keep theirs. NORMLAB_OMP_WAIT_POLICY chooses the
# policy ("keep": numba's default); an OMP_WAIT_POLICY set by the user always wins.
WAIT_POLICY_VAR = "NORMLAB_OMP_WAIT_POLICY"


_wait_policy = "default"


def numba_wait_policy() -> str:
    """The OMP_WAIT_POLICY numba's OpenMP pool started with (``"default"``: GOMP's);
    starts the pool if no kernel has yet."""
    _start_numba_threads()
    return _wait_policy


_pool_started = False


def _start_numba_threads() -> None:
    """Start numba's thread pool, once, before the first parallel kernel (not at import:
    a process that never runs one never starts it, and may fork freely)."""
    global _wait_policy, _pool_started
    if _pool_started:
        return
    _pool_started = True
    policy = os.environ.get(WAIT_POLICY_VAR, "PASSIVE").strip()
    if "OMP_WAIT_POLICY" in os.environ or policy.lower() in ("", "keep"):
        numba.get_num_threads()
        _wait_policy = os.environ.get("OMP_WAIT_POLICY", "default")
        return
    os.environ["OMP_WAIT_POLICY"] = policy
    try:
        numba.get_num_threads()  # loads the threading layer (and its libgomp) now
    finally:
        del os.environ["OMP_WAIT_POLICY"]
    _wait_policy = policy


# GNU OpenMP is not fork-safe: numba terminates a forked child (a DataLoader worker, a
# fork-started process, a forkserver's child) that launches its pool again. Such a
# process runs everything on the composite torch backend instead: the same results up to
# rounding (~1e-7 relative in float32), said once per process by FORKED_CHILD_WARNING.
_in_forked_child = False
_forked_child_warned = False
FORKED_CHILD_WARNING = (
    "normlab: this process was forked from one that started normlab's numba thread pool "
    "(e.g. a DataLoader worker), which is not fork-safe; normlab computes here on the "
    "composite 'torch' backend: the same results up to rounding (~1e-7 relative in "
    "float32), not bitwise the parent's. Start workers with multiprocessing context "
    "'spawn' or 'forkserver' to use the kernels."
)


def _mark_forked_child() -> None:
    global _in_forked_child, _forked_child_warned
    _in_forked_child = _in_forked_child or _pool_started  # a pool in this or an older parent
    _forked_child_warned = False


def _declines_forked_child() -> bool:
    """True in a forked child (warning once there), where the kernels cannot run."""
    global _forked_child_warned
    if not _in_forked_child:
        return False
    if not _forked_child_warned:
        _forked_child_warned = True
        warnings.warn(FORKED_CHILD_WARNING, RuntimeWarning, stacklevel=4)
    return True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_mark_forked_child)


NAME = "cpu"
ACT_CODES = K.ACT_CODES  # activations the per-channel kernels fuse, by name
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_MAX_THREADS = numba.config.NUMBA_NUM_THREADS
# Bytes per piece of the cols layout: small enough that the second pass over a piece
# hits the (512 KiB) L2 cache, large enough that the fixed cost of a piece (its partials,
# their merge: a few microseconds) stays small. 64 KiB pieces made the statistics of a
# (512, 1024) float32 input 2.2x slower than 256 KiB ones (32 pieces instead of 8).
_PIECE_BYTES = 256 * 1024
_ROW_PIECES = 32
# Below this many elements a kernel runs on the calling thread only.
SERIAL_BELOW = 32768


def supports(x: Tensor) -> bool:
    """True for strided CPU tensors of a floating dtype the kernels handle, in the process
    that started numba's thread pool (not in a child forked from it)."""
    return (
        x.is_cpu
        and x.dtype in _DTYPES
        and x.layout == torch.strided
        and not _declines_forked_child()
    )


# numba's thread count is per calling thread; remember what we set on each (asking numba
# costs microseconds a call, which small steps notice).
_threads_set = threading.local()


def sync_threads(elements: int | None = None) -> int:
    """Set numba's thread count to torch's (capped by numba's pool size), or to 1 for
    inputs of fewer than ``SERIAL_BELOW`` elements, where waking a second thread costs
    more than it saves; returns the count."""
    if not _pool_started:
        _start_numba_threads()
    want = max(1, min(torch.get_num_threads(), _MAX_THREADS))
    if elements is not None and elements < SERIAL_BELOW:
        want = 1
    if getattr(_threads_set, "count", None) != want:
        numba.set_num_threads(want)
        _threads_set.count = want
    return want


# ---------------------------------------------------------------------------------------
# Layouts: turning [N, G, K, S] tensors into the kernels' C-contiguous 2-D arrays.


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


# Channels per task of the planes kernels: enough that memory is read in runs of at least
# _RUN_BYTES (short planes read one by one, 196 B at 7x7, defeat the prefetcher), few
# enough that a task's data stays in cache for the second pass (_TASK_BYTES per tensor:
# the L3's share of a core rather than its L2; measured cold, (128,512,7,7) forward +
# backward 5.3 -> 4.1 ms and (64,256,14,14) 4.4 -> 3.1 ms going from 10 and 5 channels
# per task to 32 and 16) and that there are _MIN_TASKS tasks to balance the threads.
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


# Per-sample statistics over rows of at most this many values (InstanceNorm at 7x7 or
# 8x8) run the planes kernels on the view [1, N*C, S]: blocks of adjacent rows read as one
# run, where the rows kernels pay a per-row reduction (128x512x7x7 forward 3.3 -> 2.5 ms,
# backward 4.8 -> 2.5 ms, cold); from 14x14 on the rows kernels are as fast or faster.
PLANES_MAX_ROW = 64


def _rows_by_planes(x4: Tensor) -> bool:
    """Whether per-sample statistics of ``x4 [N, G, K, S]`` run the planes kernels."""
    return x4.shape[2] == 1 and x4.shape[3] <= PLANES_MAX_ROW


def _check_per_channel(x4: Tensor, per_sample: bool) -> None:
    if not per_sample and x4.shape[2] != 1:
        raise ValueError(
            f"per-channel statistics need x4 [N, G, 1, S], got x4 of shape {tuple(x4.shape)}"
        )


def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    batch_mean: Tensor,
    batch_var: Tensor,
    correction: float,
    momentum: float,
) -> int | None:
    """``normlab.running.update_running_stats`` in one kernel call (eight small torch
    ops cost more than a whole normalization of a small tensor): returns how many channels
    kept their values (non-finite statistics), or ``None`` where it does not apply (the
    caller then runs the torch code): float32/float64 contiguous CPU vectors of one dtype,
    outside tracing."""
    dtype = batch_mean.dtype
    tensors = (running_mean, running_var, batch_mean, batch_var)
    if (
        dtype not in (torch.float32, torch.float64)
        or not _eager(batch_mean)
        or _composite_only(batch_mean)
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


# ---------------------------------------------------------------------------------------
# Implementations (plain tensors in, tensors out; no autograd).


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
    _check_per_channel(x4, per_sample)
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
    _check_per_channel(x4, per_sample)
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
        partials = np.zeros((2, min(n * g, _ROW_PIECES), g * k), dtype=_np(x2).dtype)
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
        return torch_ops.normalize_with_stats(x4, mean, var, weight, bias, eps=eps)
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
    _check_per_channel(x4, False)
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


# ---------------------------------------------------------------------------------------
# torch.library registration: what torch.compile and torch.export see.


def _stat_like(x4: Tensor, per_sample: bool) -> Tensor:
    shape = (x4.shape[0], x4.shape[1]) if per_sample else (x4.shape[1],)
    return x4.new_empty(shape, dtype=compute_dtype(x4.dtype))


@torch.library.custom_op("normlab::normalize", mutates_args=(), device_types="cpu")
def _normalize_op(
    x4: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    per_sample: bool,
    center: bool,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Train-mode normalization: ``(y4, mean, var, rstd)``."""
    return _forward_impl(x4, weight, bias, per_sample, center, eps, True)


@_normalize_op.register_fake
def _(x4, weight, bias, per_sample, center, eps):  # noqa: ANN001, ANN202
    _check_per_channel(x4, per_sample)
    stat = _stat_like(x4, per_sample)
    return torch.empty_like(x4), stat, torch.empty_like(stat), torch.empty_like(stat)


@torch.library.custom_op("normlab::normalize_backward", mutates_args=(), device_types="cpu")
def _normalize_backward_op(
    dy4: Tensor,
    x4: Tensor,
    mean: Tensor,
    rstd: Tensor,
    weight: Tensor | None,
    per_sample: bool,
    center: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx4, dweight, dbias)`` of ``normlab::normalize`` (parameter grads ``[G*K]``)."""
    return _backward_impl(dy4, x4, mean, rstd, weight, per_sample, center)


@_normalize_backward_op.register_fake
def _(dy4, x4, mean, rstd, weight, per_sample, center):  # noqa: ANN001, ANN202
    _check_per_channel(x4, per_sample)
    features = x4.shape[1] * x4.shape[2]
    grad = x4.new_empty((features,), dtype=compute_dtype(x4.dtype))
    return torch.empty_like(x4), grad, torch.empty_like(grad)


@torch.library.custom_op("normlab::normalize_with_stats", mutates_args=(), device_types="cpu")
def _normalize_with_stats_op(
    x4: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    """Eval-mode normalization with given statistics ``[G]``."""
    return _apply_impl(x4, mean, var, weight, bias, eps)


@_normalize_with_stats_op.register_fake
def _(x4, mean, var, weight, bias, eps):  # noqa: ANN001, ANN202
    return torch.empty_like(x4)


@torch.library.custom_op("normlab::moments", mutates_args=(), device_types="cpu")
def _moments_op(x4: Tensor, per_sample: bool, center: bool) -> tuple[Tensor, Tensor]:
    """Biased ``(mean, var)``, ``[G]`` or ``[N, G]``."""
    _, mean, var, _ = _forward_impl(x4, None, None, per_sample, center, 0.0, False)
    return mean, var


@_moments_op.register_fake
def _(x4, per_sample, center):  # noqa: ANN001, ANN202
    _check_per_channel(x4, per_sample)
    stat = _stat_like(x4, per_sample)
    return stat, torch.empty_like(stat)


@torch.library.custom_op("normlab::backward_reduce", mutates_args=(), device_types="cpu")
def _backward_reduce_op(
    dy4: Tensor, x4: Tensor, mean: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor]:
    """Per-channel ``(sum dy, sum dy * xhat)`` ``[G]``."""
    sum_dy, sum_dyx, _ = _channel_backward_impl(dy4, x4, mean, rstd, None, None, 1, False)
    return sum_dy, sum_dyx


@_backward_reduce_op.register_fake
def _(dy4, x4, mean, rstd):  # noqa: ANN001, ANN202
    _check_per_channel(x4, False)
    stat = _stat_like(x4, False)
    return stat, torch.empty_like(stat)


@torch.library.custom_op("normlab::backward_apply", mutates_args=(), device_types="cpu")
def _backward_apply_op(
    dy4: Tensor,
    x4: Tensor,
    mean: Tensor,
    rstd: Tensor,
    weight: Tensor | None,
    sum_dy: Tensor,
    sum_dy_xhat: Tensor,
    count: int,
) -> Tensor:
    """BatchNorm input gradient from per-channel sums over ``count`` elements."""
    _, _, dx4 = _channel_backward_impl(
        dy4, x4, mean, rstd, weight, (sum_dy, sum_dy_xhat), count, True
    )
    return dx4


@_backward_apply_op.register_fake
def _(dy4, x4, mean, rstd, weight, sum_dy, sum_dy_xhat, count):  # noqa: ANN001, ANN202
    _check_per_channel(x4, False)
    return torch.empty_like(x4)


# ---------------------------------------------------------------------------------------
# Autograd: one formula each, used by the registered ops (torch.compile) and by the eager
# fast path (torch.autograd.Function calling the implementations directly).


def _composite_grads(
    grad: Tensor,
    inputs: tuple[Tensor | None, ...],
    needs: tuple[bool, ...],
    forward: Callable[..., Tensor],
) -> tuple[Tensor | None, ...]:
    """Gradients by differentiating the composite torch code, with ``create_graph`` so
    they can be differentiated again (double backward)."""
    pairs = list(zip(inputs, needs, strict=True))
    wanted = [t for t, need in pairs if need and t is not None]
    with torch.enable_grad():
        out = forward(*inputs)
    got = iter(torch.autograd.grad(out, wanted, grad, create_graph=True, allow_unused=True))
    return tuple(next(got) if need and t is not None else None for t, need in pairs)


def _as_param_grad(grad: Tensor, param: Tensor | None, needed: bool) -> Tensor | None:
    if param is None or not needed:
        return None
    return grad.to(param.dtype).view(param.shape)


def _train_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    x4, weight, bias, per_sample, center, eps = inputs
    mean, var, rstd = output[1:4]
    ctx.save_for_backward(x4, weight, bias, mean, rstd)
    ctx.per_sample, ctx.center, ctx.eps = per_sample, center, eps
    ctx.mark_non_differentiable(mean, var, rstd)
    ctx.set_materialize_grads(False)


def _train_grads(ctx: Any, grad_y: Tensor | None, kernel: Callable) -> tuple:
    """``(dx, dweight, dbias)`` of a train-mode normalization, by ``kernel`` (the backward
    op or its implementation) or, under ``create_graph``, by the composite code."""
    x4, weight, bias, mean, rstd = ctx.saved_tensors
    needs = tuple(ctx.needs_input_grad[:3])
    if grad_y is None:
        return None, None, None
    if torch.is_grad_enabled():  # create_graph=True: the grads must be differentiable

        def forward(x: Tensor, w: Tensor | None, b: Tensor | None) -> Tensor:
            return torch_ops.normalize(
                x, w, b, per_sample=ctx.per_sample, center=ctx.center, eps=ctx.eps
            )[0]

        return _composite_grads(grad_y, (x4, weight, bias), needs, forward)
    dx, dw, db = kernel(grad_y, x4, mean, rstd, weight, ctx.per_sample, ctx.center)
    return (
        dx if needs[0] else None,
        _as_param_grad(dw, weight, needs[1]),
        _as_param_grad(db, bias, needs[2]),
    )


def _with_stats_setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
    x4, mean, var, weight, bias, eps = inputs
    ctx.save_for_backward(x4, mean, var, weight, bias)
    ctx.eps = eps
    ctx.set_materialize_grads(False)


def _with_stats_grads(ctx: Any, grad_y: Tensor | None, apply: Callable, reduce: Callable) -> tuple:
    """``(dx, dmean, dvar, dweight, dbias)`` of the eval-mode normalization: ``dx`` by
    ``apply`` (the eval kernel on ``dy`` with a zero mean gives ``dy * rstd * w``), the
    parameter grads by the per-channel ``reduce``; composite code for double backward
    and for gradients of the statistics themselves."""
    x4, mean, var, weight, bias = ctx.saved_tensors
    needs = tuple(ctx.needs_input_grad[:5])
    if grad_y is None:
        return None, None, None, None, None
    if torch.is_grad_enabled() or needs[1] or needs[2] or x4.shape[2] != 1:

        def forward(*args: Tensor | None) -> Tensor:
            return torch_ops.normalize_with_stats(*args, eps=ctx.eps)

        return _composite_grads(grad_y, (x4, mean, var, weight, bias), needs, forward)
    dx = dw = db = None
    if needs[0]:
        dx = apply(grad_y, torch.zeros_like(mean), var, weight, None, ctx.eps)
    if needs[3] or needs[4]:
        rstd = torch.rsqrt(var.to(compute_dtype(x4.dtype)) + ctx.eps)
        sum_dy, sum_dyx = reduce(grad_y, x4, mean, rstd)
        dw = _as_param_grad(sum_dyx, weight, needs[3])
        db = _as_param_grad(sum_dy, bias, needs[4])
    return dx, None, None, dw, db


def _reduce_impl(dy4: Tensor, x4: Tensor, mean: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    sum_dy, sum_dyx, _ = _channel_backward_impl(dy4, x4, mean, rstd, None, None, 1, False)
    return sum_dy, sum_dyx


def _normalize_op_backward(ctx: Any, grad_y: Tensor | None, *_: Tensor | None) -> tuple:
    return (*_train_grads(ctx, grad_y, torch.ops.normlab.normalize_backward), None, None, None)


def _with_stats_op_backward(ctx: Any, grad_y: Tensor | None) -> tuple:
    ops = torch.ops.normlab
    return (*_with_stats_grads(ctx, grad_y, ops.normalize_with_stats, ops.backward_reduce), None)


torch.library.register_autograd(
    "normlab::normalize", _normalize_op_backward, setup_context=_train_setup
)
torch.library.register_autograd(
    "normlab::normalize_with_stats", _with_stats_op_backward, setup_context=_with_stats_setup
)


class _NormalizeFunction(torch.autograd.Function):
    """Eager twin of ``normlab::normalize`` without the custom-op dispatch cost."""

    @staticmethod
    def forward(ctx: Any, *inputs: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        output = _forward_impl(*inputs, True)
        _train_setup(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor | None, *_: Tensor | None) -> tuple:
        return (*_train_grads(ctx, grad_y, _backward_impl), None, None, None)


class _WithStatsFunction(torch.autograd.Function):
    """Eager twin of ``normlab::normalize_with_stats``."""

    @staticmethod
    def forward(ctx: Any, *inputs: Any) -> Tensor:
        output = _apply_impl(*inputs)
        _with_stats_setup(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor | None) -> tuple:
        return (*_with_stats_grads(ctx, grad_y, _apply_impl, _reduce_impl), None)


def _eager(x4: Tensor) -> bool:
    """Whether to call the implementations directly rather than through the registered
    op: plain eager tensors, no torch.compile/export tracing, no dispatch mode active."""
    return (
        type(x4) is Tensor
        and not torch.compiler.is_compiling()
        and torch._C._len_torch_dispatch_stack() == 0
    )


def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _composite_only(x4: Tensor) -> bool:
    """functorch transforms (vmap, grad) know the composite code, not the kernels."""
    return torch._C._are_functorch_transforms_active()


# ---------------------------------------------------------------------------------------
# BatchNorm's whole train step in one call: the eager fast path of the layers.
#
# A step through the general contract (normalize, then the running update) costs 20-40
# small torch ops and Python calls around the kernels. On a machine whose kernels stream
# tens of MB between steps, each of them runs with cold caches (10-30 us for a reshape),
# and together they took 0.8-1.8 ms of a 2-9 ms ResNet BatchNorm2d step. This path does
# the same work with a handful: one output allocation, one [3, C] statistics tensor, the
# planes kernel and the running update, then, in backward, one kernel writing dx and the
# parameter grads.

_STEP_DTYPES = (torch.float32, torch.float64)


def _step_vector_ok(t: Tensor | None, size: tuple[int], dtype: torch.dtype) -> bool:
    return t is None or (
        t.dtype == dtype and t.shape == size and t.is_cpu and t.is_contiguous()
    )


# Axes that put the channels last, by rank: the cols layout's view of a channels-last
# (or [N, C]) tensor.
_CHANNELS_LAST_AXES = {2: (0, 1), 3: (0, 2, 1), 4: (0, 2, 3, 1), 5: (0, 2, 3, 4, 1)}
_CHANNELS_LAST_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}


def _step_layout(x: Tensor, act: int) -> str | None:
    """The kernels of the one-call train step for ``x [N, C, *S]``: ``"planes"``
    (contiguous NCHW with ``S > 1`` and at least ``PLANES_MIN_CHANNELS`` channels, or any
    contiguous input with a fused activation), ``"cols"`` (``[N, C]``-like or channels-last
    input, no activation), else ``None``."""
    c = x.shape[1]
    single_values = x.numel() == x.shape[0] * c  # S == 1: [N, C] or [N, C, 1, ...]
    if x.is_contiguous():
        if act or not (single_values or c < PLANES_MIN_CHANNELS):
            return "planes"
        return "cols" if single_values else None
    fmt = _CHANNELS_LAST_FORMATS.get(x.dim())
    if not act and fmt is not None and x.is_contiguous(memory_format=fmt):
        return "cols"
    return None


def _train_step_layout(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    act: int,
) -> str | None:
    """:func:`_step_layout` where :func:`batch_norm_train` applies, else ``None``."""
    dtype = x.dtype
    if (
        dtype not in _STEP_DTYPES
        or x.dim() < 2
        or x.numel() == 0
        or not supports(x)
        or not _eager(x)
        or _composite_only(x)
    ):
        return None
    layout = _step_layout(x, act)
    size = (x.shape[1],)
    ok = (
        layout is not None
        and _step_vector_ok(weight, size, dtype)
        and _step_vector_ok(bias, size, dtype)
        and _step_vector_ok(running_mean, size, dtype)
        and _step_vector_ok(running_var, size, dtype)
        and (running_mean is None or not (running_mean.requires_grad or running_var.requires_grad))
    )
    return layout if ok else None


def train_step_applies(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    act: int = 0,
) -> bool:
    """Whether :func:`batch_norm_train` runs ``x [N, C, *S]``: non-empty float32/float64
    CPU input in plain eager mode, in a layout of :func:`_step_layout`, with vectors
    ``[C]`` of its dtype (running buffers not requiring grad)."""
    return _train_step_layout(x, weight, bias, running_mean, running_var, act) is not None


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


def _train_step(
    ctx: Any,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float,
    eps: float,
    act: int,
    slope: float,
    layout: str,
) -> tuple[Tensor, int]:
    """``(y, kept)``: the output and how many channels' running statistics were kept
    (non-finite batch statistics). With an autograd ``ctx``, saves what backward needs:
    ``x``, the parameters and ``stats [3, C]`` = (mean, biased var, rstd).

    All bookkeeping comes before the kernel call: Python right after a kernel that
    streamed tens of MB runs with cold caches, each op costing 10-70 us."""
    n, c = x.shape[0], x.shape[1]
    dtype = x.dtype
    sync_threads(x.numel())
    y = torch.empty_like(x)
    stats = torch.empty(3, c, dtype=dtype)
    mean, var, rstd = stats.numpy()
    if ctx is not None:
        ctx.save_for_backward(x, weight, bias, stats)
        ctx.eps, ctx.act, ctx.slope, ctx.layout = eps, act, slope, layout
        ctx.shape4, ctx.per_sample, ctx.center = (n, c, 1, -1), False, True
        ctx.set_materialize_grads(False)
    update = running_mean is not None
    if update:
        # Written behind autograd's back: count the writes (see update_running_stats).
        torch.autograd.graph.increment_version((running_mean, running_var))
    w, b = _param_np(weight, c, dtype, 1.0), _param_np(bias, c, dtype, 0.0)
    rm = running_mean.numpy() if update else _NO_RUNNING[dtype]
    rv = running_var.numpy() if update else _NO_RUNNING[dtype]
    if layout == "cols":
        x2, y2 = _cols_np(x, c), _cols_np(y, c)
        scratch = np.empty((_pieces(x2.shape[0], c, x.element_size()), 2, c))
        K.channel_cols_forward(
            x2, w, b, True, True, True, eps, y2, mean, var, rstd, scratch, _zero(dtype)
        )
        count = x2.shape[0]
        kept = K.running_update(rm, rv, mean, var, count / (count - 1), momentum) if update else 0
        return y, kept
    s = x.numel() // (n * c)
    kept = K.planes_forward(
        x.detach().numpy().reshape(n, c, s), w, b, act, slope,
        _planes_block(n, c, s, x.element_size()), True, True, True, eps,
        y.numpy().reshape(n, c, s), mean, var, rstd, rm, rv, momentum,
    )
    return y, kept


def _train_step_backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    stats: Tensor,
    act: int,
    slope: float,
    layout: str,
    needs: tuple[bool, ...],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(dx, dweight, dbias)`` of :func:`_train_step`, ``None`` where ``needs`` (or a
    missing parameter) says no gradient; built before the kernel call, which fills them."""
    n, c = x.shape[0], x.shape[1]
    dtype = x.dtype
    if dy.dtype != dtype or dy.stride() != x.stride():
        dy = torch.empty_like(x).copy_(dy)  # the kernels read dy in x's layout
    sync_threads(x.numel())
    dx = torch.empty_like(x)
    grads = torch.empty(2, c, dtype=dtype)
    dweight, dbias = grads.unbind(0)
    dw, db = grads.numpy()
    st = stats.numpy()
    result = (
        dx if needs[0] else None,
        dweight if needs[1] and weight is not None else None,
        dbias if needs[2] and bias is not None else None,
    )
    w = _param_np(weight, c, dtype, 1.0)
    if layout == "cols":
        x2 = _cols_np(x, c)
        scratch = np.empty((_pieces(x2.shape[0], c, x.element_size()), 2, c))
        K.channel_cols_backward(
            _cols_np(dy, c), x2, st[0], st[2], w, True, True, x2.shape[0], db, dw,
            _cols_np(dx, c), scratch, _zero(dtype),
        )
        return result
    s = x.numel() // (n * c)
    K.planes_backward(
        dy.numpy().reshape(n, c, s), x.detach().numpy().reshape(n, c, s), st[0], st[2], w,
        _param_np(bias, c, dtype, 0.0), act, slope, _planes_block(n, c, s, x.element_size()),
        True, dx.numpy().reshape(n, c, s), dw, db,
    )
    return result


def _one_call_backward(ctx: Any, dy: Tensor | None, inputs: int, kernels: Callable) -> tuple:
    """Backward of the one-call steps (``_TrainStepFunction``, ``_RowsStepFunction``),
    whose forward saved ``x, weight, bias, stats`` and set ``ctx.shape4`` (the ``x4``
    view), ``ctx.per_sample``, ``ctx.center``, ``ctx.eps``, ``ctx.act``: ``(dx, dweight,
    dbias)`` by ``kernels(dy, x, weight, bias, stats, needs)``, then ``None`` for the other
    ``inputs - 3`` inputs. When the gradients are to be differentiated again
    (``create_graph=True``) they come from the composite code instead, or, with a fused
    activation, a RuntimeError (differentiable once)."""
    x, weight, bias, stats = ctx.saved_tensors
    needs = tuple(ctx.needs_input_grad[:3])
    rest = (None,) * (inputs - 3)
    if dy is None:
        return (None, None, None, *rest)
    if not torch.is_grad_enabled():
        return (*kernels(dy, x, weight, bias, stats, needs), *rest)
    if ctx.act:
        raise RuntimeError(
            "normlab: the fused norm + activation kernels are differentiable once; use "
            "backend='torch' for double backward"
        )

    def forward(x: Tensor, w: Tensor | None, b: Tensor | None) -> Tensor:
        y4 = torch_ops.normalize(
            x.reshape(ctx.shape4),
            None if w is None else w.reshape(-1),
            None if b is None else b.reshape(-1),
            per_sample=ctx.per_sample, center=ctx.center, eps=ctx.eps,
        )[0]
        return y4.view(x.shape)

    return (*_composite_grads(dy, (x, weight, bias), needs, forward), *rest)


class _TrainStepFunction(torch.autograd.Function):
    """Autograd of :func:`batch_norm_train`; differentiable once with an activation, and
    to any order without (double backward runs the composite code)."""

    @staticmethod
    def forward(ctx: Any, *inputs: Any) -> tuple[Tensor, int]:
        return _train_step(ctx, *inputs)

    @staticmethod
    def backward(ctx: Any, dy: Tensor | None, _kept: Any) -> tuple:
        def kernels(dy: Tensor, x: Tensor, w: Tensor | None, b: Tensor | None,
                    stats: Tensor, needs: tuple[bool, ...]) -> tuple:
            return _train_step_backward(
                dy, x, w, b, stats, ctx.act, ctx.slope, ctx.layout, needs
            )

        return _one_call_backward(ctx, dy, 10, kernels)


def batch_norm_train(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float,
    eps: float,
    act: int = 0,
    slope: float = 0.0,
) -> tuple[Tensor, int] | None:
    """Train-mode BatchNorm of ``x [N, C, *S]`` in one call: batch statistics, the output
    ``act(xhat * weight + bias)`` (``act``: ``ACT_CODES``, ``slope`` leaky_relu's) and, with
    running buffers, their update in place (``momentum``: the new batch's weight; the
    variance stored unbiased; non-finite channels keep their values). Returns ``(y,
    kept)``, ``kept`` the count of channels that kept theirs, or ``None`` where
    :func:`train_step_applies` says no (the caller takes the general path). Arguments are
    assumed checked (``normlab.functional.batch_norm``)."""
    layout = _train_step_layout(x, weight, bias, running_mean, running_var, act)
    if layout is None:
        return None
    args = (x, weight, bias, running_mean, running_var, float(momentum), float(eps), act,
            float(slope), layout)
    if _needs_grad(x, weight, bias):
        return _TrainStepFunction.apply(*args)
    return _train_step(None, *args)


# ---------------------------------------------------------------------------------------
# Per-sample norms (LayerNorm, GroupNorm, RMSNorm) in one call, for the same reason as
# the train step above: a handful of ops around one kernel each way, all before the call.


def rows_step_applies(
    x: Tensor, features: int, weight: Tensor | None, bias: Tensor | None
) -> bool:
    """Whether :func:`rows_norm` runs ``x``: non-empty contiguous float32/float64 CPU input
    in plain eager mode, ``weight``/``bias`` of ``features`` contiguous values of its dtype."""
    dtype = x.dtype
    return (
        dtype in _STEP_DTYPES
        and x.numel() > 0
        and x.is_contiguous()
        and supports(x)
        and _eager(x)
        and not _composite_only(x)
        and all(
            p is None
            or (p.dtype == dtype and p.numel() == features and p.is_cpu and p.is_contiguous())
            for p in (weight, bias)
        )
    )


def _rows_params(weight: Tensor | None, bias: Tensor | None, features: int, dtype: torch.dtype):  # noqa: ANN202
    """``_param_np`` of both, flat (LayerNorm's parameters have ``normalized_shape``)."""
    w = _param_np(weight, features, dtype, 1.0)
    b = _param_np(bias, features, dtype, 0.0)
    return w.reshape(features), b.reshape(features)


def _rows_step(
    ctx: Any,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    rows: int,
    groups: int,
    features: int,
    eps: float,
    center: bool,
    act: int,
    slope: float,
) -> Tensor:
    """The output of :func:`rows_norm`; with an autograd ``ctx``, saves ``x``, the
    parameters and ``stats [3, rows]`` = (mean, biased var, rstd)."""
    dtype = x.dtype
    sync_threads(x.numel())
    y = torch.empty_like(x)
    stats = torch.empty(3, rows, dtype=dtype)
    if ctx is not None:
        ctx.save_for_backward(x, weight, bias, stats)
        ctx.rows, ctx.groups, ctx.features = rows, groups, features
        ctx.eps, ctx.center, ctx.act, ctx.slope = eps, center, act, slope
        ctx.shape4 = (rows // groups, groups, features // groups, -1)
        ctx.per_sample = True
        ctx.set_materialize_grads(False)
    w, b = _rows_params(weight, bias, features, dtype)
    K.rows_forward(
        x.detach().numpy().reshape(rows, -1), w, b, groups, center, eps,
        y.numpy().reshape(rows, -1), *stats.numpy(), True, act, slope, _zero(dtype),
    )
    return y


def _rows_step_backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    stats: Tensor,
    ctx: Any,
    needs: tuple[bool, ...],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(dx, dweight, dbias)`` of :func:`_rows_step`, ``None`` where ``needs`` (or a
    missing parameter) says no gradient; built before the kernel call, which fills them."""
    dtype = x.dtype
    rows, features = ctx.rows, ctx.features
    if dy.dtype != dtype or not dy.is_contiguous():
        dy = dy.to(dtype).contiguous()
    sync_threads(x.numel())
    dx = torch.empty_like(x)
    grads = torch.empty(2, features, dtype=dtype)
    partials = np.zeros((2, min(rows, _ROW_PIECES), features), dtype=grads.numpy().dtype)
    result = (
        dx if needs[0] else None,
        grads[0].view(weight.shape) if needs[1] and weight is not None else None,
        grads[1].view(bias.shape) if needs[2] and bias is not None else None,
    )
    w, b = _rows_params(weight, bias, features, dtype)
    mean, _, rstd = stats.numpy()
    dw, db = grads.numpy()
    K.rows_backward(
        dy.numpy().reshape(rows, -1), x.detach().numpy().reshape(rows, -1), mean, rstd, w, b,
        ctx.groups, ctx.center, ctx.act, ctx.slope, *partials, dx.numpy().reshape(rows, -1),
        dw, db, _zero(dtype),
    )
    return result


class _RowsStepFunction(torch.autograd.Function):
    """Autograd of :func:`rows_norm`; differentiable once with an activation, and to any
    order without (double backward runs the composite code)."""

    @staticmethod
    def forward(ctx: Any, *inputs: Any) -> Tensor:
        return _rows_step(ctx, *inputs)

    @staticmethod
    def backward(ctx: Any, dy: Tensor | None) -> tuple:
        def kernels(dy: Tensor, x: Tensor, w: Tensor | None, b: Tensor | None,
                    stats: Tensor, needs: tuple[bool, ...]) -> tuple:
            return _rows_step_backward(dy, x, w, b, stats, ctx, needs)

        return _one_call_backward(ctx, dy, 10, kernels)


def rows_norm(
    x: Tensor,
    rows: int,
    groups: int,
    features: int,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    center: bool = True,
    act: int = 0,
    slope: float = 0.0,
) -> Tensor | None:
    """Per-sample normalization in one call: ``x`` (contiguous) viewed as ``[rows, L]``,
    statistics per row (mean-centred if ``center``, else RMS), output
    ``act(xhat * weight + bias)`` (``act``: ``ACT_CODES``, ``slope`` leaky_relu's). The
    affine parameters hold ``features = G*K`` values (any shape): row ``r`` uses group
    ``r % G``'s ``K``, each repeated over ``L / K`` consecutive elements.

    LayerNorm/RMSNorm: ``rows = numel / D``, ``groups = 1``, ``features = D``, parameters
    ``[*normalized_shape]``; GroupNorm of ``[N, C, *S]``: ``rows = N * G``, ``groups = G``,
    ``features = C``, parameters ``[C]``. Returns ``None`` where :func:`rows_step_applies`
    says no. Arguments are assumed checked."""
    if not rows_step_applies(x, features, weight, bias):
        return None
    args = (x, weight, bias, rows, groups, features, float(eps), center, act, float(slope))
    if _needs_grad(x, weight, bias):
        return _RowsStepFunction.apply(*args)
    return _rows_step(None, *args)


def layer_norm(
    x: Tensor,
    normalized_shape: tuple[int, ...],
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor | None:
    """LayerNorm of ``x`` by :func:`rows_norm`, or ``None`` where it does not apply."""
    features = math.prod(normalized_shape)
    return rows_norm(x, x.numel() // max(features, 1), 1, features, weight, bias, eps)


def rms_norm(
    x: Tensor, normalized_shape: tuple[int, ...], weight: Tensor | None, eps: float
) -> Tensor | None:
    """RMSNorm of ``x`` by :func:`rows_norm`, or ``None`` where it does not apply."""
    features = math.prod(normalized_shape)
    return rows_norm(x, x.numel() // max(features, 1), 1, features, weight, None, eps, False)


def group_norm(
    x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor | None:
    """GroupNorm of ``x [N, C, *S]`` by :func:`rows_norm`, or ``None`` where it does not
    apply (and for one channel per group, InstanceNorm's case: the general path gives short
    rows the planes kernels)."""
    channels = x.shape[1]
    if channels == num_groups:
        return None
    return rows_norm(x, x.shape[0] * num_groups, num_groups, channels, weight, bias, eps)


# ---------------------------------------------------------------------------------------
# The backend contract (see normlab.ops.torch_ops).


def normalize(
    x4: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    *,
    per_sample: bool,
    center: bool,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Train-mode normalization of ``x4 [N, G, K, S]``: ``(y4, mean, var)``, as
    ``torch_ops.normalize`` (statistics ``[G]`` or ``[N, G]`` in the compute dtype)."""
    if (not per_sample and x4.shape[2] != 1) or _composite_only(x4):
        return torch_ops.normalize(
            x4, weight, bias, per_sample=per_sample, center=center, eps=eps
        )
    args = (x4, weight, bias, per_sample, center, eps)
    if not _eager(x4):
        y4, mean, var, _ = torch.ops.normlab.normalize(*args)
    elif _needs_grad(x4, weight, bias):
        y4, mean, var, _ = _NormalizeFunction.apply(*args)
    else:
        y4, mean, var, _ = _forward_impl(*args, True)
    return y4, mean, var


def normalize_with_stats(
    x4: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    *,
    eps: float,
) -> Tensor:
    """Eval-mode normalization of ``x4 [N, G, K, S]`` with statistics ``[G]``."""
    if _composite_only(x4):
        return torch_ops.normalize_with_stats(x4, mean, var, weight, bias, eps=eps)
    args = (x4, mean, var, weight, bias, eps)
    if not _eager(x4):
        return torch.ops.normlab.normalize_with_stats(*args)
    if _needs_grad(x4, mean, var, weight, bias):
        return _WithStatsFunction.apply(*args)
    return _apply_impl(*args)


def moments(x4: Tensor, *, per_sample: bool, center: bool) -> tuple[Tensor, Tensor]:
    """Biased ``(mean, var)`` of ``x4 [N, G, K, S]``, ``[G]`` or ``[N, G]`` (not
    differentiable: SyncBatchNorm wraps these pieces in its own autograd function)."""
    if (not per_sample and x4.shape[2] != 1) or _composite_only(x4):
        return torch_ops.moments(x4, per_sample=per_sample, center=center)
    if not _eager(x4):
        return torch.ops.normlab.moments(x4, per_sample, center)
    _, mean, var, _ = _forward_impl(x4, None, None, per_sample, center, 0.0, False)
    return mean, var


def backward_reduce(
    dy4: Tensor, x4: Tensor, mean: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor]:
    """Per-channel ``(sum dy, sum dy * xhat)`` over ``(N, K, S)``, ``[G]``."""
    if x4.shape[2] != 1 or _composite_only(x4):
        return torch_ops.backward_reduce(dy4, x4, mean, rstd)
    if not _eager(x4):
        return torch.ops.normlab.backward_reduce(dy4, x4, mean, rstd)
    return _reduce_impl(dy4, x4, mean, rstd)


def backward_apply(
    dy4: Tensor,
    x4: Tensor,
    mean: Tensor,
    rstd: Tensor,
    weight: Tensor | None,
    sum_dy: Tensor,
    sum_dy_xhat: Tensor,
    count: int,
) -> Tensor:
    """BatchNorm ``dx = w * rstd * (dy - sum_dy / count - xhat * sum_dy_xhat / count)``."""
    args = (dy4, x4, mean, rstd, weight, sum_dy, sum_dy_xhat, count)
    if x4.shape[2] != 1 or _composite_only(x4):
        return torch_ops.backward_apply(*args)
    if not _eager(x4):
        return torch.ops.normlab.backward_apply(*args)
    sums = (sum_dy, sum_dy_xhat)
    return _channel_backward_impl(dy4, x4, mean, rstd, weight, sums, count, True)[2]


# ---------------------------------------------------------------------------------------
# "auto" on CPU: the kernels, except where torch's own native kernels measured faster.


def _same_dtype(x: Tensor, *params: Tensor | None) -> bool:
    dtype = x.dtype
    if dtype not in _STEP_DTYPES:
        return False
    for p in params:
        if p is not None and p.dtype != dtype:
            return False
    return True


def _native_eval(
    x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None
) -> bool:
    """Whether eval-mode BatchNorm of ``x [N, C, *S]`` with statistics ``[C]`` runs
    ``torch.batch_norm``: float32/float64 throughout, non-empty, statistics not
    differentiated, and the batch dimension outermost in memory. torch 2.13's CPU
    backward misreads a batch of one whose batch stride is below another dimension's
    (the ``[1, C, 1, S]`` view of a channels-last plane, strides ``(C, 1, C*S, C)``):
    right output, wrong gradients. The kernels take any strides."""
    return (
        x.numel() > 0
        and _same_dtype(x, mean, var, weight, bias)
        and not (mean.requires_grad or var.requires_grad)
        and x.stride(0) >= max(x.stride())
    )


def native_route(
    x4: Tensor, weight: Tensor | None, bias: Tensor | None, per_sample: bool, center: bool
) -> str | None:
    """Which torch native kernel ``"auto"`` uses for a train-mode ``normalize`` of ``x4``
    (``"layer_norm"``, ``"group_norm"``), or ``None`` for the numba kernels.

    Per-channel statistics (BatchNorm and the variants built on ``normalize``) always run
    the kernels: they give a channel that saw one value exactly ``bias`` (torch's rounding
    of ``x - mean`` is amplified by ``1/sqrt(eps)`` there), and plain BatchNorm takes the
    one-call train step before it gets here.

    LayerNorm (``x4 [rows, 1, F, 1]``) and GroupNorm (``K > 1``, ``S > 1``) are memory
    bound and torch's native kernels already reach the copy bandwidth there, with less
    per-call cost than the kernels' Python wrapper (``normlab bench``: 0.7-1.0x). Only
    float32/float64 with parameters of the input's dtype, and non-empty inputs.
    """
    if not (center and per_sample) or x4.numel() == 0 or not _same_dtype(x4, weight, bias):
        return None
    _, g, k, s = x4.shape
    if g == 1 and s == 1 and k > 1:  # one element: the kernels (AutoBackend.layer_norm)
        return "layer_norm"
    if k > 1 and s > 1 and not _group_norm_crashes(x4, weight, bias):
        return "group_norm"
    return None


def _group_norm_crashes(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> bool:
    """Whether torch 2.13's CPU GroupNorm would crash on ``x``: its backward segfaults
    (the process dies) for a non-contiguous (channels-last) input that needs no gradient
    while ``weight`` or ``bias`` do. The kernels take such input instead."""
    return not x.is_contiguous() and not x.requires_grad and _needs_grad(weight, bias)


def _native_normalize(
    route: str,
    x4: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(y4, mean, var)`` by ``torch.native_layer_norm``/``native_group_norm``; ``var``
    is recovered from their ``rstd`` (``rstd**-2 - eps``; the layers routed here do not
    use it) and the statistics are not differentiable, as with the kernels."""
    n, g, k, s = x4.shape
    if route == "layer_norm":
        y, mean, rstd = torch.native_layer_norm(x4.reshape(n, k), (k,), weight, bias, eps)
    else:
        y, mean, rstd = torch.native_group_norm(
            x4.reshape(n, g * k, s), weight, bias, n, g * k, s, g, eps
        )
    mean = mean.detach().reshape(n, g)
    var = rstd.detach().reshape(n, g).pow(-2) - eps
    return y.view(x4.shape), mean, var


class AutoBackend(ModuleType):
    """The ``"auto"`` choice for CPU tensors: this module's kernels, except train-mode
    LayerNorm and GroupNorm (``native_route``) and eval-mode BatchNorm/InstanceNorm with
    given statistics, which run torch's native kernels (measured faster: the kernels'
    eval pass is no faster than torch's and its Python wrapper costs more per call).
    Beyond the contract it offers whole-call entry points that ``normlab.functional``
    tries first, so these routes cost no more Python than torch's own:
    ``batch_norm_train`` (the one-call train step), ``rms_norm`` (the one-call rows
    step), ``batch_norm_eval``, ``layer_norm`` and ``group_norm`` (torch's native function
    on the input as it comes); each returns ``None`` where it does not apply.
    ``backend="cpu"`` always runs the kernels (its ``layer_norm``/``group_norm`` entry
    points are the rows step)."""

    NAME = NAME

    @staticmethod
    def supports(x: Tensor) -> bool:
        return supports(x)

    @staticmethod
    def normalize(
        x4: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        *,
        per_sample: bool,
        center: bool,
        eps: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        route = native_route(x4, weight, bias, per_sample, center)
        if route is not None:
            return _native_normalize(route, x4, weight, bias, eps)
        return normalize(x4, weight, bias, per_sample=per_sample, center=center, eps=eps)

    @staticmethod
    def normalize_with_stats(
        x4: Tensor,
        mean: Tensor,
        var: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        *,
        eps: float,
    ) -> Tensor:
        if x4.shape[2] == 1 and _native_eval(x4, mean, var, weight, bias):
            return torch.batch_norm(x4, weight, bias, mean, var, False, 0.0, eps, False)
        return normalize_with_stats(x4, mean, var, weight, bias, eps=eps)

    @staticmethod
    def layer_norm(
        x: Tensor,
        normalized_shape: tuple[int, ...],
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
    ) -> Tensor | None:
        """LayerNorm of ``x`` as it comes by ``torch.layer_norm`` (``native_route``), or
        ``None`` where the kernels run instead: also over a single element, whose exact
        input gradient is 0 and torch's is its rounding times ``1/sqrt(eps)``."""
        if x.numel() == 0 or not _same_dtype(x, weight, bias) or math.prod(normalized_shape) == 1:
            return None
        return torch.layer_norm(x, normalized_shape, weight, bias, eps)

    @staticmethod
    def group_norm(
        x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float
    ) -> Tensor | None:
        """GroupNorm of ``x [N, C, *S]`` by ``torch.group_norm`` where ``native_route``
        takes it (more than one channel per group, ``S > 1``), else ``None``."""
        channels = x.shape[1]
        spatial = x.numel() // (x.shape[0] * channels) if x.numel() else 0
        if (
            spatial <= 1
            or channels == num_groups
            or not _same_dtype(x, weight, bias)
            or _group_norm_crashes(x, weight, bias)
        ):
            return None
        return torch.group_norm(x, num_groups, weight, bias, eps)

    @staticmethod
    def batch_norm_eval(
        x: Tensor,
        mean: Tensor,
        var: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
    ) -> Tensor | None:
        """Eval-mode BatchNorm of ``x [N, C, *S]`` as it comes (no ``x4`` view: small
        calls feel each op) by ``torch.batch_norm``, or ``None`` where it does not apply."""
        if _native_eval(x, mean, var, weight, bias):
            return torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, False)
        return None

    batch_norm_train = staticmethod(batch_norm_train)
    rms_norm = staticmethod(rms_norm)
    moments = staticmethod(moments)
    backward_reduce = staticmethod(backward_reduce)
    backward_apply = staticmethod(backward_apply)


AUTO = AutoBackend(__name__ + ".auto", AutoBackend.__doc__)
