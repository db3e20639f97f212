"""Tools for models with normalization layers: fold, recalibrate, convert, Keras conventions.

- ``fold_batchnorm`` / ``fold_weights``: BatchNorm into the preceding Conv/Linear (inference).
- ``recalibrate``: exact population statistics ("precise BN") over a set of batches.
- ``convert``: torch.nn <-> normlab, BatchNorm -> GroupNorm / SyncBatchNorm / frozen; reports
  the norm layers it left (``ConvertWarning``, ``ConvertReport``).
- ``from_keras`` / ``to_keras``: Keras' BatchNormalization parameters and conventions.

Diagnostics live in ``normlab.inspect``.
"""

from normlab.tools.convert import TARGETS, ConvertReport, ConvertWarning, convert
from normlab.tools.fold import find_foldable, fold_batchnorm, fold_weights
from normlab.tools.keras import (
    MoveChannels,
    batchnorm_from_keras,
    from_keras,
    keras_config,
    keras_momentum_to_torch,
    to_keras,
    torch_momentum_to_keras,
)
from normlab.tools.recalibrate import default_forward, recalibrate

__all__ = [
    "TARGETS",
    "ConvertReport",
    "ConvertWarning",
    "MoveChannels",
    "batchnorm_from_keras",
    "convert",
    "default_forward",
    "find_foldable",
    "fold_batchnorm",
    "fold_weights",
    "from_keras",
    "keras_config",
    "keras_momentum_to_torch",
    "recalibrate",
    "to_keras",
    "torch_momentum_to_keras",
]
