"""Kernel backends behind one interface, and the choice between them.

Every backend module exposes the same two functions on the canonical view
``x4 = [N, G, K, S]`` (see ``normlab.ops.torch_ops`` for the contract):

- ``normalize(x4, weight, bias, *, per_sample, center, eps) -> (y4, mean, var)``
- ``normalize_with_stats(x4, mean, var, weight, bias, *, eps) -> y4``

and a ``supports(x) -> bool`` telling whether it can run on that tensor (the composite
``torch`` backend runs on everything). A backend may also offer whole-call entry points
that ``normlab.functional`` tries first, each returning ``None`` where it does not apply:
``batch_norm_train`` (statistics, output and running update in one call),
``batch_norm_eval``, ``layer_norm``, ``group_norm``, ``rms_norm`` (see ``normlab.ops.cpu``).

The backend is chosen, first match wins, by: the ``backend=`` argument of a functional
call, the innermost ``normlab.use_backend(...)`` context, the ``NORMLAB_BACKEND``
environment variable, then ``"auto"``: the fastest registered backend that supports the
tensor (a backend may refine "auto" per operation: ``normlab.ops.cpu.AUTO``). A backend
that does not support a tensor (say, ``"cpu"`` given a CUDA tensor)
falls back to ``"torch"``, which computes the same result.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
from collections.abc import Iterator
from types import ModuleType

from torch import Tensor, strided

# Fastest first: "auto" takes the first one that imports and supports the tensor.
_MODULES = {"cpu": "normlab.ops.cpu", "torch": "normlab.ops.torch_ops"}
CHOICES = ("auto", *_MODULES)
ENV_VAR = "NORMLAB_BACKEND"

_local = threading.local()
_loaded: dict[str, ModuleType | None] = {}


def _load(name: str) -> ModuleType | None:
    """Import a backend once; a backend whose engine is missing is simply unavailable."""
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(_MODULES[name])
        except ImportError:
            _loaded[name] = None
    return _loaded[name]


def backend(name: str) -> ModuleType | None:
    """The backend module ``name`` (``"cpu"``, ``"torch"``), or ``None`` if it does not
    import here."""
    return _load(name)


def available() -> list[str]:
    """Names of the backends that import on this machine."""
    return [name for name in _MODULES if _load(name) is not None]


def _check_choice(name: str, source: str) -> str:
    if name not in CHOICES:
        raise ValueError(f"{source} must be one of {CHOICES}, got {name!r}")
    return name


# os.environ's own store, which its writes keep current: asking it whether ENV_VAR is set
# is one dict lookup, where os.environ.get encodes, looks up and decodes. Every normlab
# call asks, and on a cold cache (after a kernel streamed a large tensor) that lookup cost
# 30-40 us here, a few percent of a ResNet-shape eval call.
_ENV_STORE = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey(ENV_VAR) if hasattr(os.environ, "encodekey") else None


def requested() -> str:
    """The backend asked for by context manager or environment (``"auto"`` if none)."""
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    if _ENV_STORE is not None and _ENV_KEY not in _ENV_STORE:
        return "auto"
    env = os.environ.get(ENV_VAR, "").strip().lower()
    return _check_choice(env, f"environment variable {ENV_VAR}") if env else "auto"


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed normlab calls on backend ``name`` (``"auto"``, ``"cpu"``, ``"torch"``)."""
    _check_choice(name, "backend")
    stack = _local.__dict__.setdefault("stack", [])
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def resolve(x: Tensor, backend: str | None = None) -> ModuleType:
    """The backend module that will normalize ``x``."""
    name = _check_choice(backend, "backend") if backend is not None else requested()
    candidates = _MODULES if name == "auto" else (name, "torch")
    for candidate in candidates:
        module = _load(candidate)
        if module is not None and module.supports(x):
            # A backend may refine "auto" per operation (normlab.ops.cpu.AUTO).
            return getattr(module, "AUTO", module) if name == "auto" else module
    raise RuntimeError("the composite torch backend failed to import")  # pragma: no cover


def auto_cpu(x: Tensor) -> ModuleType | None:
    """``normlab.ops.cpu.AUTO`` where ``x`` resolves to it with no ``backend=`` argument
    (backend ``auto`` requested, a strided CPU tensor, the cpu backend importable), else
    ``None``: the layers' shortcut to its whole-call entry points, in fewer Python steps
    than :func:`resolve` (each costs 5-40 us on a cold cache; see docs/backends.md)."""
    if type(x) is not Tensor or not x.is_cpu or x.layout != strided or requested() != "auto":
        return None
    module = _load("cpu")
    return None if module is None else module.AUTO


# Import the backends with the package: a first import from inside torch.compile's tracing
# would be a graph break (fullgraph=True raises on it).
available()
