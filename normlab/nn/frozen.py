"""Frozen BatchNorm: eval-mode BatchNorm as a fixed per-channel affine map, and the tools
that freeze / unfreeze the BatchNorm layers of a model.

``FrozenBatchNorm2d`` holds ``weight``, ``bias``, ``running_mean``, ``running_var`` and
``num_batches_tracked`` as *buffers* (the keys of ``BatchNorm2d``'s state_dict, so either
loads the other's checkpoint), and computes, in train and eval alike::

    y = x * scale + shift,   scale = weight / sqrt(running_var + eps),
                             shift = bias - running_mean * scale

which is what detectors fine-tune with. Two ways to stop BatchNorm from learning:

- :func:`freeze_batch_norm` replaces the layers (nothing trains, nothing updates);
- :func:`set_freeze_stats` sets ``freeze_stats`` on normlab BatchNorm layers: running
  statistics stay fixed and are used for normalization even under ``model.train()``, while
  ``weight``/``bias`` keep training.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn

from normlab import _checks
from normlab import functional as F
from normlab.nn._script import ScriptableMixin
from normlab.nn.base import CheckedHyperparameters
from normlab.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormBase
from normlab.plan import compute_dtype

__all__ = [
    "FrozenBatchNorm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "freeze_batch_norm",
    "unfreeze_batch_norm",
    "set_freeze_stats",
]

_TorchBN = nn.modules.batchnorm._BatchNorm


class FrozenBatchNorm(ScriptableMixin, CheckedHyperparameters):
    """Fixed BatchNorm over ``input [N, C, *S]`` (2-D to 5-D); see the module docstring.

    ``act``/``slope`` (keyword-only, default ``"identity"``) apply an activation after, so
    that norm+activation layers (``BatchNormAct2d``, ``InPlaceABN``) freeze too.
    """

    _allowed_dims: tuple[int, ...] = (2, 3, 4, 5)

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        act: str = "identity",
        slope: float = 0.01,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features = _checks.check_positive_int(num_features, "num_features")
        self.eps = _checks.check_eps(eps)
        self.act, self.slope = act, float(slope)
        self.register_buffer("weight", torch.ones(num_features, **factory))
        self.register_buffer("bias", torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self.register_buffer(
            "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
        )
        # What unfreeze_batch_norm rebuilds: (class, constructor kwargs); not state.
        self._unfreeze_as: tuple[type[nn.Module], dict[str, Any]] | None = None

    def extra_repr(self) -> str:
        act = "" if self.act == "identity" else f", act={self.act!r}"
        return f"{self.num_features}, eps={self.eps}{act}"

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Tensor],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # A BatchNorm checkpoint without affine parameters (affine=False) or without a
        # counter (old versions) means weight=1, bias=0, num_batches_tracked=0.
        defaults = {
            "weight": self.weight.new_ones(()).expand_as(self.weight),
            "bias": self.bias.new_zeros(()).expand_as(self.bias),
            "num_batches_tracked": torch.tensor(0, dtype=torch.long),
        }
        for name, value in defaults.items():
            state_dict.setdefault(prefix + name, value)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        """Normalize ``input [N, C, *S]`` with the frozen statistics; a ``mask`` is checked
        and otherwise changes nothing (no batch statistics are taken)."""
        _checks.check_tensor(input)
        _checks.check_dim(input, self._allowed_dims)
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"expected input with num_features={self.num_features} channels at dim 1, "
                f"got input of shape {tuple(input.shape)}"
            )
        if mask is not None:
            _checks.check_mask(input, mask)
        for name in ("weight", "bias", "running_mean", "running_var"):
            # Any float dtype mixes (the result is the input's), devices do not.
            _checks.check_companion(input, getattr(self, name), name, match_dtype=False)
        work = compute_dtype(input.dtype)
        scale = self.weight.to(work) * torch.rsqrt(self.running_var.to(work) + self.eps)
        shift = self.bias.to(work) - self.running_mean.to(work) * scale
        shape = (1, -1) + (1,) * (input.dim() - 2)
        # In the statistics' dtype, rounded once at the end: in float16/bfloat16 the shift
        # (-running_mean * scale) can be large against the result, or overflow.
        y = torch.addcmul(shift.reshape(shape), input.to(work), scale.reshape(shape))
        y = y.to(input.dtype)
        return F.activation(y, self.act, self.slope)

    @classmethod
    def from_batch_norm(cls, bn: nn.Module) -> FrozenBatchNorm:
        """A frozen copy of ``bn`` (``torch.nn`` or normlab BatchNorm, or a BatchNorm+act)."""
        ref = bn.running_mean if bn.running_mean is not None else bn.weight
        act, slope = _activation_of(bn)
        frozen = cls(bn.num_features, bn.eps, device=None if ref is None else ref.device,
                     dtype=None if ref is None else ref.dtype, act=act, slope=slope)
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                value = getattr(bn, name, None)
                if value is not None:
                    getattr(frozen, name).copy_(value.detach())
        frozen._unfreeze_as = (type(bn), _init_kwargs(bn))
        return frozen


class FrozenBatchNorm1d(FrozenBatchNorm):
    """Frozen BatchNorm over ``[N, C]`` or ``[N, C, L]``."""

    _allowed_dims = (2, 3)


class FrozenBatchNorm2d(FrozenBatchNorm):
    """Frozen BatchNorm over ``[N, C, H, W]`` (torchvision's ``FrozenBatchNorm2d``)."""

    _allowed_dims = (4,)


class FrozenBatchNorm3d(FrozenBatchNorm):
    """Frozen BatchNorm over ``[N, C, D, H, W]``."""

    _allowed_dims = (5,)


def _activation_of(bn: nn.Module) -> tuple[str, float]:
    """The activation a norm+act layer applies after the norm (identity for plain BN)."""
    if isinstance(getattr(bn, "act", None), str):  # BatchNormAct*d
        return bn.act, bn.slope
    if isinstance(getattr(bn, "activation", None), str):  # InPlaceABN
        return bn.activation, bn.activation_param
    return "identity", 0.01


def _init_kwargs(bn: nn.Module) -> dict[str, Any]:
    """Constructor arguments of ``bn`` that it keeps as same-named attributes."""
    skip = {"self", "device", "dtype", "args", "kwargs"}
    params = inspect.signature(type(bn).__init__).parameters
    kwargs = {
        name: getattr(bn, name)
        for name in params
        if name not in skip and hasattr(bn, name) and not isinstance(getattr(bn, name), Tensor)
    }
    if "bias" in params and getattr(bn, "affine", False):
        kwargs["bias"] = bn.bias is not None  # the flag, not the parameter
    return kwargs


def _dims_of(bn: nn.Module) -> tuple[int, ...]:
    if isinstance(bn, BatchNormBase):
        return bn._allowed_dims
    for cls, dims in ((nn.BatchNorm1d, (2, 3)), (nn.BatchNorm2d, (4,)), (nn.BatchNorm3d, (5,))):
        if isinstance(bn, cls):
            return dims
    return FrozenBatchNorm._allowed_dims  # SyncBatchNorm and others: any rank


_FROZEN_BY_DIMS: dict[tuple[int, ...], type[FrozenBatchNorm]] = {
    (2, 3): FrozenBatchNorm1d,
    (4,): FrozenBatchNorm2d,
    (5,): FrozenBatchNorm3d,
}
_PLAIN_BY_DIMS: dict[tuple[int, ...], type[BatchNormBase]] = {
    (2, 3): BatchNorm1d,
    (4,): BatchNorm2d,
    (5,): BatchNorm3d,
}


def freeze_batch_norm(model: nn.Module) -> nn.Module:
    """Replace every BatchNorm layer of ``model`` (``torch.nn`` ``_BatchNorm`` incl.
    SyncBatchNorm, and every normlab ``BatchNormBase``) by its ``FrozenBatchNorm*d``.

    Works in place on the children and returns ``model`` (or the frozen layer when
    ``model`` itself is a BatchNorm). :func:`unfreeze_batch_norm` undoes it.
    """
    if isinstance(model, (_TorchBN, BatchNormBase)):
        frozen_cls = _FROZEN_BY_DIMS.get(_dims_of(model), FrozenBatchNorm)
        return frozen_cls.from_batch_norm(model)
    for name, child in model.named_children():
        new = freeze_batch_norm(child)
        if new is not child:
            setattr(model, name, new)
    return model


def _unfreeze_one(frozen: FrozenBatchNorm) -> nn.Module:
    if frozen._unfreeze_as is not None:
        cls, kwargs = frozen._unfreeze_as
    else:
        cls = _PLAIN_BY_DIMS.get(frozen._allowed_dims, BatchNorm2d)
        kwargs = {"num_features": frozen.num_features, "eps": frozen.eps}
    layer = cls(**kwargs).to(device=frozen.running_mean.device, dtype=frozen.running_mean.dtype)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            target = getattr(layer, name, None)
            if target is not None:
                target.copy_(getattr(frozen, name))
    layer.train(frozen.training)
    return layer


def unfreeze_batch_norm(model: nn.Module) -> nn.Module:
    """Replace every ``FrozenBatchNorm*`` of ``model`` by a trainable BatchNorm: the class
    (and constructor arguments) it was frozen from, else normlab's ``BatchNorm*d``.
    Returns ``model`` (or the new layer when ``model`` itself is frozen)."""
    if isinstance(model, FrozenBatchNorm):
        return _unfreeze_one(model)
    for name, child in model.named_children():
        new = unfreeze_batch_norm(child)
        if new is not child:
            setattr(model, name, new)
    return model


def set_freeze_stats(model: nn.Module, frozen: bool = True) -> int:
    """Set ``freeze_stats`` on every normlab BatchNorm layer of ``model``; returns how many.

    The flag survives ``model.train()``; ``torch.nn`` BatchNorm layers have no such flag
    (convert them first, or use :func:`freeze_batch_norm`).
    """
    layers = [m for m in model.modules() if isinstance(m, BatchNormBase)]
    for layer in layers:
        layer.freeze_stats = bool(frozen)
    return len(layers)
