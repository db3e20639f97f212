"""Providers behind one interface, and the routing table that picks one per call.

A **provider** (an entry of the table) implements :class:`Provider`: ``kinds`` names the
plan kinds it serves, ``applies(plan, call)`` says whether it runs that call (the
tensors, ``normlab.plan.Call``) of the plan
(``normlab.plan``), ``forward(...)`` runs it: the output ``act(xhat * weight + bias)`` in
``x``'s shape and, in training with running buffers, their update
(``normlab.running``). Its ``name`` is the backend it belongs to: ``"cpu"`` (normlab's
numba kernels), ``"native"`` (torch's own kernels, taken by ``"auto"`` only) or
``"triton"`` (``normlab.ops.triton``: GPU kernels, and CPU tensors under the interpreter
when asked for by name) or ``"torch"`` (the composite code, last entry of every route).
CUDA (and ``meta``) tensors take the Triton provider for fused activations and masks and
torch's native kernels with normlab's semantics (``normlab.ops.torch_native``) otherwise.

The **routing table** lists, per device type and mode (``"train"``: batch statistics;
``"eval"``: given ones), the entries fastest first; a call takes the first whose
``applies`` holds. The backend asked for (``backend=`` of a functional call, else the
innermost :func:`use_backend`, else the ``NORMLAB_BACKEND`` environment variable, else
``"auto"``) filters the table: ``"auto"`` keeps every entry but those marked
``explicit_only``, a backend's name its own entries, ``"torch"`` only the composite one. A
device no provider registered for routes to the composite provider.

SyncBatchNorm combines statistics across processes between the local reductions and the
elementwise passes, so it uses :class:`Pieces` instead (:func:`pieces`).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Protocol

import torch
from torch import Tensor

from normlab.ops.composite import PROVIDER as COMPOSITE
from normlab.plan import Call, Plan

CHOICES = ("auto", "cpu", "triton", "torch")
ENV_VAR = "NORMLAB_BACKEND"


class Provider(Protocol):
    """An entry of the routing table (see the module doc)."""

    name: str
    kinds: frozenset[str]  # the plan kinds it may take ("batch", "instance", ...)

    def applies(self, plan: Plan, call: Call) -> bool: ...

    def forward(self, plan: Plan, call: Call) -> Tensor:
        """The output (a provider with ``masks = True`` also runs plans with ``masked``
        set, the mask in ``call.mask``)."""


class Pieces(Protocol):
    """Split-phase BatchNorm on ``x4 [N, C, 1, S]`` (statistics ``[C]`` in the compute
    dtype), for SyncBatchNorm and the variants that need the statistics themselves."""

    name: str

    def normalize(
        self, x4: Tensor, weight: Tensor | None, bias: Tensor | None, *, per_sample: bool,
        center: bool, eps: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(y4, mean, biased var)`` with the batch's statistics."""

    def normalize_with_stats(
        self, x4: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None,
        bias: Tensor | None, *, eps: float,
    ) -> Tensor:
        """``y4`` with the given statistics."""

    def moments(self, x4: Tensor, *, per_sample: bool, center: bool) -> tuple[Tensor, Tensor]:
        """``(mean, biased var)``, not differentiable."""

    def backward_reduce(
        self, dy4: Tensor, x4: Tensor, mean: Tensor, rstd: Tensor
    ) -> tuple[Tensor, Tensor]:
        """``(sum dy, sum dy * xhat)`` per channel."""

    def backward_apply(
        self, dy4: Tensor, x4: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor | None,
        sum_dy: Tensor, sum_dy_xhat: Tensor, count: int,
    ) -> Tensor:
        """``dx = w * rstd * (dy - sum_dy / count - xhat * sum_dy_xhat / count)``."""

    def backward_from_output(
        self, dz4: Tensor, z4: Tensor, weight: Tensor | None, bias: Tensor | None,
        rstd: Tensor, count: int | Tensor, act: str, param: float, mask4: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """In-place ABN's ``(dx4, sum dy, sum dy * xhat)`` from its output ``z4`` alone."""


# --- the table --------------------------------------------------------------------------

_ROUTES: dict[tuple[str, str], tuple[Provider, ...]] = {}
_PIECES: dict[str, Pieces] = {}  # per device type: what "auto" takes
_PIECES_BY_NAME: dict[str, Pieces] = {}  # per backend: what asking for it by name takes
_PROVIDERS: list[str] = []  # backend names with a provider here, besides "torch"


def _register_cpu() -> None:
    try:
        from normlab.ops import cpu
    except ImportError:  # numba missing: everything runs on the composite provider
        return
    for mode, entries in cpu.ROUTES.items():
        _ROUTES["cpu", mode] = entries
    _PIECES["cpu"] = _PIECES_BY_NAME[cpu.NAME] = cpu.PIECES
    _PROVIDERS.append(cpu.NAME)


def _register_torch_native() -> None:
    from normlab.ops import torch_native

    for device_type in torch_native.DEVICE_TYPES:
        for mode, entries in torch_native.ROUTES.items():
            _ROUTES[device_type, mode] = entries


def _register_triton() -> None:
    from normlab.ops import triton

    if not triton.installed():
        return
    for device_type, by_mode in triton.ROUTES.items():
        for mode, entries in by_mode.items():
            _ROUTES[device_type, mode] = (*entries, *_ROUTES.get((device_type, mode), ()))
    _PIECES["cuda"] = _PIECES_BY_NAME[triton.NAME] = triton.PIECES
    if torch.cuda.is_available():  # on CPU tensors only the interpreter runs it (tests)
        _PROVIDERS.append(triton.NAME)


_register_cpu()
_register_torch_native()
_register_triton()
# (device type, batch_stats, backend, plan kind, masked, activated) -> entries: filtered once.
_FILTERED: dict[tuple[str, bool, str, str, bool, bool], tuple[Provider, ...]] = {}


def routes(
    device_type: str, mode: str, backend: str = "auto", kind: str | None = None,
    masked: bool = False, activated: bool = True,
) -> tuple[Provider, ...]:
    """The entries a call on ``device_type`` in ``mode`` (``"train"``, ``"eval"``) tries
    under ``backend`` (and for plans of ``kind``; ``masked`` ones: the entries that say
    ``masks = True``; without an activation, not the entries that say
    ``only_activated = True``), in order; the composite provider last."""
    entries = _ROUTES.get((device_type, mode), ())
    if backend == "auto":
        entries = tuple(e for e in entries if not getattr(e, "explicit_only", False))
    else:
        entries = tuple(e for e in entries if e.name == backend)
    if kind is not None:
        entries = tuple(e for e in entries if kind in e.kinds)
    if masked:
        entries = tuple(e for e in entries if getattr(e, "masks", False))
    if not activated:
        entries = tuple(e for e in entries if not getattr(e, "only_activated", False))
    return (*entries, COMPOSITE)


def route(plan: Plan, call: Call, backend: str | None = None) -> Provider:
    """The provider that runs ``plan`` on ``call``'s tensors: the first entry that applies."""
    name = requested() if backend is None else _check_choice(backend, "backend")
    x = call.x
    device_type = "cpu" if x.is_cpu else x.device.type
    activated = plan.act != "identity"
    key = (device_type, plan.batch_stats, name, plan.kind, plan.masked, activated)
    entries = _FILTERED.get(key)
    if entries is None:
        mode = "train" if plan.batch_stats else "eval"
        entries = _FILTERED[key] = routes(
            device_type, mode, name, plan.kind, plan.masked, activated
        )
    for entry in entries:
        if entry.applies(plan, call):
            return entry
    raise AssertionError("the composite provider applies to every call")  # pragma: no cover


def pieces(x: Tensor, backend: str | None = None) -> Pieces:
    """The split-phase pieces for ``x`` under ``backend`` (composite where no provider
    of that backend supports ``x``)."""
    name = requested() if backend is None else _check_choice(backend, "backend")
    found = _PIECES.get(x.device.type) if name == "auto" else _PIECES_BY_NAME.get(name)
    return found if found is not None and found.supports(x) else COMPOSITE


def available() -> list[str]:
    """Names of the backends that run on this machine (``"torch"`` always)."""
    return [*_PROVIDERS, "torch"]


# --- the backend asked for ----------------------------------------------------------------

_local = threading.local()


def _check_choice(name: str, source: str) -> str:
    if name not in CHOICES:
        raise ValueError(f"{source} must be one of {CHOICES}, got {name!r}")
    return name


# os.environ's own store: "is ENV_VAR set?" is one dict lookup there, where os.environ
# encodes and decodes (a few us a call, which small calls feel; docs/backends.md).
_ENV_STORE = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey(ENV_VAR) if hasattr(os.environ, "encodekey") else None


# How many use_backend blocks are open in any thread: with none, no thread-local lookup.
_open_blocks = 0
_blocks_lock = threading.Lock()


def requested() -> str:
    """The backend asked for by context manager or environment (``"auto"`` if none)."""
    if _open_blocks:
        stack = getattr(_local, "stack", None)
        if stack:
            return stack[-1]
    if _ENV_STORE is not None and _ENV_KEY not in _ENV_STORE:
        return "auto"
    env = os.environ.get(ENV_VAR)
    if not env:
        return "auto"
    env = env.strip().lower()
    return _check_choice(env, f"environment variable {ENV_VAR}") if env else "auto"


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed normlab calls on backend ``name`` (``"auto"``, ``"cpu"``,
    ``"triton"``, ``"torch"``); calls no entry of that backend supports take the composite
    code."""
    global _open_blocks
    _check_choice(name, "backend")
    stack = _local.__dict__.setdefault("stack", [])
    stack.append(name)
    with _blocks_lock:
        _open_blocks += 1
    try:
        yield
    finally:
        stack.pop()
        with _blocks_lock:
            _open_blocks -= 1
