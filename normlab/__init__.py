"""normlab: Batch Normalization and its family.

Drop-in ``torch.nn`` layers (``normlab.BatchNorm2d`` for ``torch.nn.BatchNorm2d``, same
checkpoints), a functional API, a readable NumPy float64 reference (``normlab.reference``),
and the choice of kernel backend (``normlab.use_backend``).
"""

from normlab import functional
from normlab.nn import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    GroupNorm,
    InstanceNorm1d,
    InstanceNorm2d,
    InstanceNorm3d,
    LayerNorm,
    RMSNorm,
)
from normlab.ops import available as available_backends
from normlab.ops import use_backend

__version__ = "0.1.0"

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "RMSNorm",
    "functional",
    "use_backend",
    "available_backends",
]
