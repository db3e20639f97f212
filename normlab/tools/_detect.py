"""Which modules are norms: torch.nn's and normlab's, plain, frozen or fused with an activation.

Detection is by class (``isinstance``) for the families we know, plus duck typing for
frozen BatchNorm layers (torchvision's and normlab's ``FrozenBatchNorm2d`` hold
``weight``/``bias``/``running_mean``/``running_var`` as buffers and never update them).
normlab is imported lazily so the tools work while parts of the package are missing.
"""

from __future__ import annotations

import re

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from torch.nn.modules.instancenorm import _InstanceNorm


def _normlab_class(name: str) -> type | None:
    """``normlab.nn.<name>`` if it exists (the layers are written in parallel)."""
    try:
        import normlab.nn as nlnn
    except ImportError:  # pragma: no cover - the package always has nn once it lands
        return None
    cls = getattr(nlnn, name, None)
    return cls if isinstance(cls, type) else None


def is_frozen_batchnorm(module: nn.Module) -> bool:
    """A BatchNorm whose statistics and affine are constants (buffers), e.g. FrozenBatchNorm2d."""
    frozen = _normlab_class("FrozenBatchNorm2d")
    if frozen is not None and isinstance(module, frozen):
        return True
    return "FrozenBatchNorm" in type(module).__name__ and all(
        hasattr(module, a) for a in ("weight", "bias", "running_mean", "running_var", "eps")
    )


def is_batchnorm(module: nn.Module) -> bool:
    """torch.nn BatchNorm (incl. SyncBatchNorm), normlab BatchNormBase (incl. +act), frozen."""
    if isinstance(module, _BatchNorm):
        return True
    base = _normlab_class("BatchNormBase")
    if base is not None and isinstance(module, base):
        return True
    return is_frozen_batchnorm(module)


def is_instancenorm(module: nn.Module) -> bool:
    if isinstance(module, _InstanceNorm):
        return True
    base = _normlab_class("InstanceNormBase")
    return base is not None and isinstance(module, base)


def tracks_running_stats(module: nn.Module) -> bool:
    """A norm whose running statistics are updated in training: torch/normlab BN and IN.

    Frozen BatchNorm is excluded: its statistics are constants by design.
    """
    if is_frozen_batchnorm(module):
        return False
    base = _normlab_class("NormBase")
    known = isinstance(module, _NormBase) or (base is not None and isinstance(module, base))
    return (
        known
        and bool(getattr(module, "track_running_stats", False))
        and getattr(module, "running_mean", None) is not None
        and getattr(module, "running_var", None) is not None
    )


def is_norm(module: nn.Module) -> bool:
    """Any normalization layer we know of (used to pick layers to inspect)."""
    if is_batchnorm(module) or is_instancenorm(module):
        return True
    torch_norms: tuple[type, ...] = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
    if hasattr(nn, "RMSNorm"):
        torch_norms += (nn.RMSNorm,)
    if isinstance(module, torch_norms):
        return True
    for name in ("NormBase", "LayerNorm", "GroupNorm", "RMSNorm"):
        cls = _normlab_class(name)
        if cls is not None and isinstance(module, cls):
            return True
    return False


def is_norm_like(module: nn.Module) -> bool:
    """A norm layer, known or not: :func:`is_norm`, or a module whose class name says Norm
    (timm's ``RmsNorm``, HF's ``LlamaRMSNorm``) and that holds no norm-like module itself,
    so that containers (``PreNorm``, ``NormBlock``) and input ``Normalize`` do not count."""
    if is_norm(module) or isinstance(module, _NormBase):
        return True
    name = type(module).__name__
    if "Norm" not in name or re.search(r"Normali[sz]e$", name):
        return False
    return not any(is_norm_like(child) for child in module.children())


# Activations of normlab's fused layers, named by string (``act``/``slope`` on BatchNormAct*d,
# SyncBatchNormAct, FrozenBatchNorm*d; ``activation``/``activation_param`` on InPlaceABN).
_ACTIVATIONS = {
    "identity": lambda p: None,
    "relu": lambda p: nn.ReLU(),
    "leaky_relu": lambda p: nn.LeakyReLU(p),
    "silu": lambda p: nn.SiLU(),
    "gelu": lambda p: nn.GELU(),
    "elu": lambda p: nn.ELU(p),
}


def fused_activation(module: nn.Module) -> nn.Module | None:
    """The activation a fused norm+act layer applies after normalizing, as a module, else None.

    Understands normlab's fused layers (activation named by a string) and timm's layout
    (``drop`` then ``act`` submodules). Raises ValueError for an activation it cannot
    rebuild (the caller must then leave the layer alone).
    """
    if isinstance(getattr(module, "activation", None), str):  # InPlaceABN
        act, param = module.activation, getattr(module, "activation_param", 0.01)
    else:
        act, param = getattr(module, "act", None), getattr(module, "slope", 0.01)
    if isinstance(act, str):
        if act not in _ACTIVATIONS:
            raise ValueError(f"unknown fused activation {act!r} of {type(module).__name__}")
        return _ACTIVATIONS[act](float(param))
    if not isinstance(act, nn.Module):
        return None
    drop = getattr(module, "drop", None)
    if isinstance(drop, nn.Module) and not isinstance(drop, nn.Identity):
        return nn.Sequential(drop, act)
    return act
