"""normlab: Batch Normalization and its family.

Drop-in ``torch.nn`` layers (``normlab.BatchNorm2d`` for ``torch.nn.BatchNorm2d``, same
checkpoints), their variants (renorm, ghost, frozen, fused activation, in-place ABN,
synchronized), a functional API, a readable NumPy float64 reference
(``normlab.reference``), the choice of kernel backend (``normlab.use_backend``), and tools
(``normlab.tools``: fold, recalibrate, convert, Keras conventions; ``normlab.inspect``).
"""

from normlab import functional, inspect, tools
from normlab.functional import lengths_to_mask
from normlab.nn import *  # noqa: F403 - the layers are the package's public face
from normlab.nn import __all__ as _layers
from normlab.ops import available as available_backends
from normlab.ops import use_backend
from normlab.tools import fold_batchnorm, fold_weights, from_keras, recalibrate, to_keras

__version__ = "0.1.0"

__all__ = [
    *_layers,
    "functional",
    "lengths_to_mask",
    "inspect",
    "tools",
    "use_backend",
    "available_backends",
    "fold_batchnorm",
    "fold_weights",
    "recalibrate",
    "from_keras",
    "to_keras",
]
