"""numba's runtime for the CPU provider: the kernels' disk cache, the thread pool (its
size, its OpenMP wait policy, started at the first kernel), the fork guard and the
one-line notice of a first compilation.

Importing this module changes nothing in the process: ``os.environ`` and numba's config
stay as they were, no thread starts, nothing compiles.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import numba
import torch
from numba.core import caching
from torch import Tensor


def cache_dir() -> str:
    """Where the compiled kernels are cached: ``$NUMBA_CACHE_DIR`` if set, else a user dir."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return os.environ["NUMBA_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "normlab", "numba")


_CACHE_DIR = cache_dir()
_KERNELS_DIR = Path(__file__).resolve().parent / "kernels"


def _kernels_digest() -> str:
    """A digest of every kernel source: the kernels inline helpers from other files, whose
    changes numba's per-file check would miss."""
    digest = hashlib.sha256()
    for path in sorted(_KERNELS_DIR.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


_KERNELS_DIGEST = _kernels_digest()


class _KernelCacheLocator(caching.UserProvidedCacheLocator):
    """Caches normlab's own kernels under :func:`cache_dir` (never next to the possibly
    read-only installed sources), in a folder per version of the kernel sources, without
    touching ``os.environ`` or numba's global config: a user's own numba functions cache
    where they did before."""

    def __init__(self, py_func: Callable, py_file: str) -> None:
        self._py_file = py_file
        self._lineno = py_func.__code__.co_firstlineno
        subpath = self.get_suitable_cache_subpath(py_file)
        self._cache_path = os.path.join(_CACHE_DIR, _KERNELS_DIGEST, subpath)

    @classmethod
    def from_function(cls, py_func: Callable, py_file: str) -> _KernelCacheLocator | None:
        if Path(py_file).resolve().parent != _KERNELS_DIR:
            return None
        # The source-file mixin's constructor (UserProvidedCacheLocator's would ask
        # numba.config.CACHE_DIR, which stays the user's).
        return super(caching.UserProvidedCacheLocator, cls).from_function(py_func, py_file)


if _KernelCacheLocator not in caching.CacheImpl._locator_classes:
    caching.CacheImpl._locator_classes.insert(0, _KernelCacheLocator)


# --- the thread pool -----------------------------------------------------------------
# numba's OpenMP layer links the system libgomp, a second OpenMP runtime beside torch's.
# Its idle threads spin (GOMP's default) on the cores torch's threads need next; libgomp
# reads OMP_WAIT_POLICY once, when it loads. The pool starts at the first kernel with a
# passive policy, then the environment is restored. NORMLAB_OMP_WAIT_POLICY chooses it
# ("keep": numba's default); an OMP_WAIT_POLICY set by the user always wins.
WAIT_POLICY_VAR = "NORMLAB_OMP_WAIT_POLICY"
_wait_policy = "default"
_pool_started = False
_MAX_THREADS = numba.config.NUMBA_NUM_THREADS
# Below this many elements a kernel runs on the calling thread only: waking a second
# thread costs more than it saves.
SERIAL_BELOW = 32768


def numba_wait_policy() -> str:
    """The OMP_WAIT_POLICY numba's pool started with (``"default"``: GOMP's); starts the
    pool if no kernel has yet."""
    _start_numba_threads()
    return _wait_policy


def _start_numba_threads() -> None:
    """Start numba's thread pool, once (a process that runs no kernel never starts it,
    and may fork freely)."""
    global _wait_policy, _pool_started
    if _pool_started:
        return
    _pool_started = True
    announce_compile()
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


# numba's thread count is per calling thread; remember what was set on each.
_threads_set = threading.local()


def sync_threads(elements: int | None = None) -> int:
    """Set numba's thread count to torch's (capped by numba's pool size), or to 1 below
    ``SERIAL_BELOW`` elements; returns the count."""
    if not _pool_started:
        _start_numba_threads()
    want = max(1, min(torch.get_num_threads(), _MAX_THREADS))
    if elements is not None and elements < SERIAL_BELOW:
        want = 1
    if getattr(_threads_set, "count", None) != want:
        numba.set_num_threads(want)
        _threads_set.count = want
    return want


# --- fork ------------------------------------------------------------------------------
# GNU OpenMP is not fork-safe: numba terminates a forked child (a DataLoader worker) that
# launches its pool again. Such a process computes on the composite provider instead,
# said once per process by FORKED_CHILD_WARNING.
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


def declines_forked_child() -> bool:
    """True in a forked child (warning once there), where the kernels cannot run."""
    global _forked_child_warned
    if not _in_forked_child:
        return False
    if not _forked_child_warned:
        _forked_child_warned = True
        warnings.warn(FORKED_CHILD_WARNING, RuntimeWarning, stacklevel=5)
    return True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_mark_forked_child)


_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def supports(x: Tensor) -> bool:
    """True for strided CPU tensors of a floating dtype the kernels handle, in the process
    that started numba's thread pool (not in a child forked from it)."""
    return (
        x.is_cpu
        and x.dtype in _DTYPES
        and x.layout == torch.strided
        and not (_in_forked_child and declines_forked_child())
    )


# --- first compilation -----------------------------------------------------------------
COMPILE_NOTICE = (
    "normlab: compiling the CPU kernels on first use (once per version: about 5-15 s, then "
    "cached in {where})"
)


def announce_compile() -> None:
    """Say on stderr, once, that the kernels compile now (seconds) rather than load from
    the disk cache (milliseconds): when this version of the kernels has no cache yet."""
    where = Path(_CACHE_DIR, _KERNELS_DIGEST)  # made at import, filled by compilations
    if not any(where.rglob("*.nbi")):
        print(COMPILE_NOTICE.format(where=where), file=sys.stderr, flush=True)
