"""The layers: ``torch.nn`` signatures, defaults and state_dict keys, thin over
``normlab.functional``; and the BatchNorm variants built on them."""

from normlab.nn._script import NotScriptableError
from normlab.nn.act import (
    BatchNormAct1d,
    BatchNormAct2d,
    BatchNormAct3d,
    BatchNormActBase,
    GroupNormAct,
    LayerNormAct,
)
from normlab.nn.base import NormBase
from normlab.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormBase
from normlab.nn.frozen import (
    FrozenBatchNorm,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    freeze_batch_norm,
    set_freeze_stats,
    unfreeze_batch_norm,
)
from normlab.nn.ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNormBase
from normlab.nn.inplace_abn import InPlaceABN
from normlab.nn.instancenorm import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d, InstanceNormBase
from normlab.nn.normalization import GroupNorm, LayerNorm, RMSNorm
from normlab.nn.renorm import (
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    BatchRenormBase,
    renorm_limits,
    set_renorm_limits,
)
from normlab.nn.syncbatchnorm import (
    SyncBatchNorm,
    SyncBatchNormAct,
    convert_sync_batchnorm,
    register_sync_conversion,
    revert_sync_batchnorm,
)

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
    "BatchRenormBase",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "renorm_limits",
    "set_renorm_limits",
    "GhostBatchNormBase",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "FrozenBatchNorm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "freeze_batch_norm",
    "unfreeze_batch_norm",
    "set_freeze_stats",
    "BatchNormActBase",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "GroupNormAct",
    "LayerNormAct",
    "InPlaceABN",
    "SyncBatchNorm",
    "SyncBatchNormAct",
    "convert_sync_batchnorm",
    "revert_sync_batchnorm",
    "register_sync_conversion",
    "NotScriptableError",
]
