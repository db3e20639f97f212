"""normlab: Batch Normalization and its family.

Drop-in ``torch.nn`` layers (``normlab.BatchNorm2d`` for ``torch.nn.BatchNorm2d``, same
checkpoints), their variants (renorm, ghost, frozen, fused activation, in-place ABN,
synchronized), a functional API, a readable NumPy float64 reference
(``normlab.reference``), the choice of kernel backend (``normlab.use_backend``), and tools
(``normlab.tools``: fold, recalibrate, convert, Keras conventions; ``normlab.inspect``).

The names below load on first use (PEP 562), so ``import normlab`` alone, and with it the
``normlab`` command line's ``--help``, does not pay for importing torch.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from normlab._version import __version__ as __version__

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ loads these
    from normlab import functional, inspect, tools  # noqa: F401
    from normlab.functional import lengths_to_mask  # noqa: F401
    from normlab.nn import *  # noqa: F403, F401
    from normlab.ops import available as available_backends  # noqa: F401
    from normlab.ops import use_backend  # noqa: F401
    from normlab.tools import fold_batchnorm, fold_weights, from_keras, recalibrate, to_keras  # noqa: F401

# name -> (module, attribute in it; None: the module itself)
_LAZY: dict[str, tuple[str, str | None]] = {
    "functional": ("normlab.functional", None),
    "inspect": ("normlab.inspect", None),
    "tools": ("normlab.tools", None),
    "lengths_to_mask": ("normlab.functional", "lengths_to_mask"),
    "use_backend": ("normlab.ops", "use_backend"),
    "available_backends": ("normlab.ops", "available"),
    "fold_batchnorm": ("normlab.tools", "fold_batchnorm"),
    "fold_weights": ("normlab.tools", "fold_weights"),
    "recalibrate": ("normlab.tools", "recalibrate"),
    "from_keras": ("normlab.tools", "from_keras"),
    "to_keras": ("normlab.tools", "to_keras"),
}


def _layer_names() -> list[str]:
    return list(importlib.import_module("normlab.nn").__all__)


def __getattr__(name: str) -> Any:
    """Load a public name on first access (and ``__all__``, which lists the layers)."""
    if name == "__all__":
        value: Any = [*_layer_names(), *_LAZY]
    elif name in _LAZY:
        module, attr = _LAZY[name]
        value = importlib.import_module(module)
        if attr is not None:
            value = getattr(value, attr)
    elif name.startswith("_"):
        raise AttributeError(f"module 'normlab' has no attribute {name!r}")
    elif importlib.util.find_spec(f"normlab.{name}") is not None:
        # a submodule (normlab.ops, ``from normlab import running``): loaded by name; looking
        # through the layers first would import normlab.nn in the middle of that import
        value = importlib.import_module(f"normlab.{name}")
    elif name in _layer_names():
        value = getattr(importlib.import_module("normlab.nn"), name)
    else:
        raise AttributeError(f"module 'normlab' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_layer_names(), *_LAZY})
