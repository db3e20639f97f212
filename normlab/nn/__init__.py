"""The layers: ``torch.nn`` signatures, defaults and state_dict keys, thin over
``normlab.functional``."""

from normlab.nn.base import NormBase
from normlab.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormBase
from normlab.nn.instancenorm import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d, InstanceNormBase
from normlab.nn.normalization import GroupNorm, LayerNorm, RMSNorm

__all__ = [
    "NormBase",
    "BatchNormBase",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "InstanceNormBase",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "GroupNorm",
    "LayerNorm",
    "RMSNorm",
]
