"""SyncBatchNorm: BatchNorm with statistics over every process of a process group.

Unlike ``torch.nn.SyncBatchNorm`` it runs on CPU (gloo) as well as GPU (nccl), and ranks
may hold different batch sizes, including none at all. The math lives in
``normlab.distributed``; this module holds the parameters, buffers and conversions.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from normlab import _checks
from normlab import distributed as D
from normlab import functional as F
from normlab.nn.act import (
    BatchNormAct1d,
    BatchNormAct2d,
    BatchNormAct3d,
    BatchNormActBase,
    _ActMixin,
)
from normlab.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormBase
from normlab.nn.ghost import GhostBatchNormBase
from normlab.running import update_running_stats

__all__ = [
    "SyncBatchNorm",
    "SyncBatchNormAct",
    "convert_sync_batchnorm",
    "revert_sync_batchnorm",
    "register_sync_conversion",
]


class SyncBatchNorm(BatchNormBase):
    """BatchNorm over ``input [N, C, *S]`` (2D to 5D) with the statistics of the global batch.

    In training, with ``torch.distributed`` initialized and more than one process in
    ``process_group`` (default: WORLD), the mean and variance are those of the batch
    concatenated over all ranks: one ``all_gather`` in forward, one ``all_reduce`` in
    backward (plus, on the layer's first such step on a group, one small ``all_gather``
    that checks the ranks agree on the channel count: ``ValueError`` on every rank if
    not). Otherwise (not initialized, world size 1, eval) it is plain BatchNorm.
    The output may be modified in place (``ReLU(inplace=True)``, ``out += identity``).
    Parameters, buffers and state_dict keys are those of ``BatchNorm*d`` and
    ``torch.nn.SyncBatchNorm``. Every rank must run the layer's forward and backward the
    same number of times (a rank with ``N = 0`` still calls them).

    ``freeze_stats`` and ``small_batch`` behave as in ``BatchNormBase``, with the
    one-value-per-channel test applied to the global batch.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        small_batch: str = "error",
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype,
            bias=bias, small_batch=small_batch,
        )
        self.process_group = process_group
        # Rank of the last input seen: lets revert_sync_batchnorm pick BatchNorm1d/2d/3d.
        self._last_input_dim: int | None = None

    def _check_shape(self, input: Tensor) -> None:
        _checks.check_tensor(input)
        _checks.check_min_dim(input, 2, "[N, C, *]")
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"expected input with num_features={self.num_features} channels at dim 1, "
                f"got input of shape {tuple(input.shape)}"
            )

    def _check_input_dim(self, input: Tensor, mask: Tensor | None = None) -> Tensor | None:
        # The single-process path (BatchNormBase.forward): any rank >= 2, local batch rules.
        self._check_shape(input)
        if mask is not None:
            mask = _checks.check_mask(input, mask)
        frozen = self._stats_frozen(input, mask)
        if self.training and self.small_batch != "skip_update" and not frozen:
            _checks.check_values_per_channel(input, mask)
        elif not self.training and self.running_mean is None:  # batch statistics in eval
            _checks.check_values_per_channel(input, mask)
        _checks.check_vectors(
            input, self.num_features, "channels of input (dim 1)", weight=self.weight,
            bias=self.bias, running_mean=self.running_mean, running_var=self.running_var,
        )
        return mask

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        """Normalize ``input [N, C, *S]`` with the global batch's statistics; ``mask``
        (bool, broadcastable to ``[N, *S]``, ``True`` = valid): statistics over the valid
        positions of every rank (each rank may have its own count, or none)."""
        frozen = self.freeze_stats and self.running_mean is not None  # same on every rank
        if frozen or not (self.training and D.is_sync_possible(self.process_group)):
            output = super().forward(input, mask)
            self._last_input_dim = input.dim()
            return output
        self._check_shape(input)
        if mask is not None:
            mask = _checks.check_mask(input, mask)
        self._last_input_dim = input.dim()
        group = self.process_group
        # owner=self: the ranks' channel counts are checked on this layer's first
        # synchronized step on a group (one more small all_gather), not on every step.
        mean, var, count = D.batch_stats(input, group, owner=self, mask=mask)
        # Decisions that depend on the batch size use the GLOBAL count (known to every rank
        # after the collective), so all ranks take the same path: no rank waits alone.
        # A count on the device (off the CPU) is not read: no host sync per step; the
        # running update then skips an empty global batch on the device by itself.
        counted = not isinstance(count, Tensor)
        if counted and count == 1:
            if self.small_batch == "running" and self.running_mean is not None:
                return F._batch_norm(
                    input, self.running_mean, self.running_var, self.weight, self.bias,
                    False, 0.0, self.eps, self.act, self.slope,
                )
            if self.small_batch != "skip_update":
                D.check_global_count(count, input)
            # skip_update: the batch's own statistics (output = bias), nothing recorded.
        elif mask is None or not counted or count > 0:  # padding only records nothing
            factor = self._average_factor()
            if self.track_running_stats:
                update_running_stats(self.running_mean, self.running_var, mean, var, count, factor)
        y = D.normalize_synced(
            input, mean, var, count, self.weight, self.bias, self.eps, group, mask=mask
        )
        return F.activation(y, self.act, self.slope)

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: Any = None) -> nn.Module:
        """Same as ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: see the free function
        ``convert_sync_batchnorm``."""
        return convert_sync_batchnorm(module, process_group)


class SyncBatchNormAct(_ActMixin, SyncBatchNorm):
    """``act(SyncBatchNorm(input))``: the synchronized counterpart of ``BatchNormAct*d``
    (what ``convert_sync_batchnorm`` turns those into); keyword-only ``act``/``slope``.

    The activation is applied after the synchronized normalization (the fused one-pass
    kernels need the local statistics only, so they do not apply here)."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        act: str = "relu",
        slope: float = 0.01,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, process_group, device,
            dtype, **kwargs,
        )
        self._set_act(act, slope)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._act_repr()


# --- conversions ------------------------------------------------------------------------

Converter = Callable[[nn.Module, Any], nn.Module]

# type -> converter (or None: leave such layers alone). Looked up along the module's MRO,
# so a subclass can opt out or convert differently: normlab's fused norm+act layers and
# BatchNorm variants (ghost, renorm, frozen) register themselves here when they land,
# e.g. ``register_sync_conversion(BatchNormAct2d, to_sync=..., to_plain=...)``.
_TO_SYNC: dict[type, Converter | None] = {}
_TO_PLAIN: dict[type, Callable[[nn.Module, int | None], nn.Module] | None] = {}


def register_sync_conversion(
    cls: type,
    to_sync: Converter | None,
    to_plain: Callable[[nn.Module, int | None], nn.Module] | None = None,
) -> None:
    """Teach ``convert_sync_batchnorm`` (``to_sync(module, process_group)``) and
    ``revert_sync_batchnorm`` (``to_plain(module, dims)``) about layers of type ``cls``
    and its subclasses; ``None`` means "leave them as they are"."""
    _TO_SYNC[cls] = to_sync
    if to_plain is not None or cls in _TO_PLAIN:
        _TO_PLAIN[cls] = to_plain


def _lookup(table: dict[type, Any], module: nn.Module) -> tuple[bool, Any]:
    for klass in type(module).__mro__:
        if klass in table:
            return True, table[klass]
    return False, None


def _move_state(source: nn.Module, target: nn.Module) -> nn.Module:
    """Give ``target`` the very parameter and buffer objects of ``source`` (so optimizers and
    references keep working), its ``training`` flag and ``requires_grad``."""
    with torch.no_grad():
        for name in ("weight", "bias"):
            if getattr(source, name, None) is not None:
                setattr(target, name, getattr(source, name))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            if getattr(source, name, None) is not None:
                setattr(target, name, getattr(source, name))
    target.train(source.training)
    # normlab's extras (BatchNormBase): plain attributes, not in the state_dict.
    for name in ("freeze_stats", "small_batch"):
        if name in vars(source):
            setattr(target, name, getattr(source, name))
    if hasattr(source, "qconfig"):
        target.qconfig = source.qconfig
    return target


def _bn_kwargs(module: nn.Module) -> dict[str, Any]:
    if isinstance(module.weight, nn.parameter.UninitializedParameter) or isinstance(
        module.running_mean, nn.parameter.UninitializedBuffer
    ):
        raise ValueError(
            f"cannot convert an uninitialized lazy layer {type(module).__name__}: run one "
            "forward pass first so that num_features is known"
        )
    # Allocate on the module's device/dtype; the tensors are replaced by the originals anyway.
    like = module.weight if module.weight is not None else module.running_mean
    return {
        "num_features": module.num_features,
        "eps": module.eps,
        "momentum": module.momentum,
        "affine": module.affine,
        "track_running_stats": module.track_running_stats,
        "device": None if like is None else like.device,
        "dtype": None if like is None else like.dtype,
        "bias": module.bias is not None,
    }


# Plain classes a revert can rebuild, so that a conversion round-trips to them exactly.
_PLAIN_CLASSES: tuple[type, ...] = (
    BatchNorm1d, BatchNorm2d, BatchNorm3d,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
    BatchNormAct1d, BatchNormAct2d, BatchNormAct3d,
)
_INPUT_RANK_TO_DIMS = {2: 1, 3: 1, 4: 2, 5: 3}


def _act_kwargs(module: nn.Module) -> dict[str, Any]:
    return {"act": module.act, "slope": module.slope}


def _bn_to_sync(module: nn.Module, process_group: Any) -> nn.Module:
    sync = _move_state(module, SyncBatchNorm(**_bn_kwargs(module), process_group=process_group))
    if type(module) in _PLAIN_CLASSES:
        sync._source_class = type(module)
    return sync


def _bn_act_to_sync(module: nn.Module, process_group: Any) -> nn.Module:
    kwargs = {**_bn_kwargs(module), **_act_kwargs(module), "process_group": process_group}
    sync = _move_state(module, SyncBatchNormAct(**kwargs))
    if type(module) in _PLAIN_CLASSES:
        sync._source_class = type(module)
    return sync


def _plain_class(module: nn.Module, dims: int | None, by_dims: dict[int, type]) -> type:
    if dims is not None:
        return by_dims[dims]
    if getattr(module, "_source_class", None) is not None:
        return module._source_class
    seen = getattr(module, "_last_input_dim", None)
    return by_dims[_INPUT_RANK_TO_DIMS.get(seen, 2)]


def _sync_to_plain(module: nn.Module, dims: int | None) -> nn.Module:
    cls = _plain_class(module, dims, {1: BatchNorm1d, 2: BatchNorm2d, 3: BatchNorm3d})
    return _move_state(module, cls(**_bn_kwargs(module)))


def _sync_act_to_plain(module: nn.Module, dims: int | None) -> nn.Module:
    cls = _plain_class(module, dims, {1: BatchNormAct1d, 2: BatchNormAct2d, 3: BatchNormAct3d})
    return _move_state(module, cls(**_bn_kwargs(module), **_act_kwargs(module)))


def _no_sync_version(module: nn.Module, process_group: Any) -> nn.Module:
    warnings.warn(
        f"convert_sync_batchnorm: left a {type(module).__name__} unsynchronized (it has no "
        "synchronized version; its statistics stay per process). Register one with "
        "register_sync_conversion, or register None to silence this.",
        UserWarning,
        stacklevel=4,
    )
    return module


register_sync_conversion(nn.modules.batchnorm._BatchNorm, _bn_to_sync)  # incl. torch SyncBN
register_sync_conversion(nn.SyncBatchNorm, _bn_to_sync, _sync_to_plain)
register_sync_conversion(BatchNorm1d, _bn_to_sync)
register_sync_conversion(BatchNorm2d, _bn_to_sync)
register_sync_conversion(BatchNorm3d, _bn_to_sync)
register_sync_conversion(BatchNormActBase, _bn_act_to_sync)
register_sync_conversion(SyncBatchNorm, None, _sync_to_plain)  # already synchronized
register_sync_conversion(SyncBatchNormAct, None, _sync_act_to_plain)
# Ghost BatchNorm normalizes small virtual batches on purpose: keep it per process.
register_sync_conversion(GhostBatchNormBase, None)
# Other variants (BatchRenorm, InPlaceABN, ...) would silently lose their semantics as a
# plain SyncBatchNorm: they stay as they are, with a warning.
register_sync_conversion(BatchNormBase, _no_sync_version)


def _convert(module: nn.Module, table: dict[type, Any], arg: Any) -> nn.Module:
    found, converter = _lookup(table, module)
    if found and converter is not None:
        return converter(module, arg)
    for name, child in module.named_children():
        new_child = _convert(child, table, arg)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


def convert_sync_batchnorm(module: nn.Module, process_group: Any = None) -> nn.Module:
    """Replace every BatchNorm layer in ``module`` (``torch.nn.BatchNorm1d/2d/3d``,
    ``torch.nn.SyncBatchNorm``, ``normlab.BatchNorm1d/2d/3d``) by ``normlab.SyncBatchNorm``,
    and ``normlab.BatchNormAct*d`` by ``SyncBatchNormAct``, over ``process_group``
    (default: WORLD), keeping the parameter and buffer objects, ``training`` and
    ``requires_grad``. Ghost BatchNorm stays per process; other normlab variants
    (BatchRenorm, InPlaceABN) stay as they are, with a warning.

    Modifies ``module`` in place and returns it; if ``module`` is itself a BatchNorm
    layer, returns the new layer. Call it before wrapping the model in
    ``DistributedDataParallel`` and before creating the optimizer.
    """
    return _convert(module, _TO_SYNC, process_group)


def revert_sync_batchnorm(module: nn.Module, dims: int | None = None) -> nn.Module:
    """Replace every ``normlab.SyncBatchNorm`` (and ``torch.nn.SyncBatchNorm``) in ``module``
    by a plain BatchNorm layer with the same parameters, buffers and flags
    (``SyncBatchNormAct`` by ``BatchNormAct*d``).

    The class is ``normlab.BatchNorm{dims}d`` when ``dims`` (1, 2 or 3) is given;
    otherwise the class the layer was converted from (round trip), else the one matching
    the rank of the last input the layer saw (2D/3D -> 1d, 4D -> 2d, 5D -> 3d), else
    ``BatchNorm2d``. In place; returns ``module`` (or the new layer).
    """
    if dims is not None and dims not in (1, 2, 3):
        raise ValueError(f"dims must be 1, 2, 3 or None, got {dims!r}")
    return _convert(module, _TO_PLAIN, dims)
