"""TorchScript support: each normlab layer names the module ``torch.jit.script`` compiles.

normlab's ``forward`` methods are Python (backend routing, argument checks with f-string
messages, custom ops), which TorchScript cannot compile. ``torch.jit.script`` calls
``__prepare_scriptable__`` on every submodule before compiling (on the top-level module
and, recursively, on its children), so :class:`ScriptableMixin` answers with a module that
computes the same thing and holds the *same* Parameter and buffer objects (state_dict keys
unchanged):

============================================  ===========================================
normlab layer                                  scripted as
============================================  ===========================================
BatchNorm1d/2d/3d, InstanceNorm1d/2d/3d,       ``torch.nn`` class of the same name
GroupNorm, LayerNorm, RMSNorm
FrozenBatchNorm, FrozenBatchNorm1d/2d/3d       :class:`ScriptFrozenBatchNorm`
BatchNormAct1d/2d/3d, InPlaceABN               :class:`ScriptBatchNormAct`
GroupNormAct, LayerNormAct                     :class:`ScriptGroupNormAct`, ``...LayerNormAct``
SyncBatchNorm(Act), BatchRenorm*, GhostBatch*  :class:`NotScriptableError`, naming the fix
============================================  ===========================================

The ``Script*`` modules subclass the ``torch.nn`` norm they extend (``ScriptBatchNormAct``
is an ``nn.BatchNorm2d``-family ``_BatchNorm``), so their compiled code is saved inside the
TorchScript archive and ``torch.jit.load`` needs no normlab.

Caveat (torch's, not ours): for a layer nested in a model, ``torch.jit.script`` writes what
``__prepare_scriptable__`` returned into the parent's ``_modules``, so after scripting,
``model`` itself holds the ``torch.nn`` layers (sharing the Parameters, so training and
optimizers carry on, with torch's semantics). Script a ``copy.deepcopy(model)`` to keep it.

:func:`torch_equivalent` (the ``torch.nn`` layer alone) is also what
``normlab.tools.convert(model, to="torch")`` uses.
"""

import warnings
from collections.abc import Callable
from functools import cache
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as TF

from normlab.functional import activation
from normlab.plan import compute_dtype

__all__ = [
    "NotScriptableError",
    "ScriptableMixin",
    "ScriptBatchNormAct",
    "ScriptFrozenBatchNorm",
    "ScriptGroupNormAct",
    "ScriptLayerNormAct",
    "computes_like",
    "norm_kwargs",
    "overridden",
    "scriptable",
    "torch_equivalent",
]


class NotScriptableError(RuntimeError):
    """A normlab layer that has no TorchScript equivalent; the message names the fix."""


# --- TorchScript-compatible modules ------------------------------------------------------
# Annotations here are read by the TorchScript compiler: builtin types only.


class ScriptFrozenBatchNorm(nn.Module):
    """``act(x * scale + shift)`` over ``input [N, C, *S]`` from frozen BatchNorm buffers.

    ``scale = weight / sqrt(running_var + eps)``, ``shift = bias - running_mean * scale``,
    computed in float32 (float64 for float64 input) as ``normlab.FrozenBatchNorm`` does.
    """

    def __init__(self, num_features: int, eps: float, act: str, slope: float, dims: list[int]):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.act = act
        self.slope = slope
        self.dims = dims
        for name in ("weight", "bias", "running_mean", "running_var"):
            self.register_buffer(name, torch.empty(num_features, device="meta"))
        self.register_buffer(
            "num_batches_tracked", torch.empty((), dtype=torch.long, device="meta")
        )

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() not in self.dims or input.shape[1] != self.num_features:
            raise ValueError(
                f"expected input of rank in {self.dims} with {self.num_features} channels at "
                f"dim 1, got shape {input.shape}"
            )
        work = compute_dtype(input.dtype)
        scale = self.weight.to(work) * torch.rsqrt(self.running_var.to(work) + self.eps)
        shift = self.bias.to(work) - self.running_mean.to(work) * scale
        shape = [1, -1] + [1] * (input.dim() - 2)
        # In the statistics' dtype, rounded once at the end: in float16/bfloat16 the shift
        # (-running_mean * scale) can be large against the result, or overflow.
        y = torch.addcmul(shift.reshape(shape), input.to(work), scale.reshape(shape))
        y = y.to(input.dtype)
        return activation(y, self.act, self.slope)


class ScriptBatchNormAct(nn.modules.batchnorm._BatchNorm):
    """``act(BatchNorm(input [N, C, *S]))`` with torch's BatchNorm semantics in train and eval.

    ``dims``: the input ranks accepted (BatchNormAct2d: ``[4]``; InPlaceABN: ``[2, 3, 4, 5]``).
    """

    def __init__(
        self,
        num_features: int,
        eps: float,
        momentum: float | None,
        affine: bool,
        track_running_stats: bool,
        bias: bool,
        act: str,
        slope: float,
        dims: list[int],
    ):
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device="meta", bias=bias
        )
        self.act = act
        self.slope = slope
        self.dims = dims

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in self.dims:
            raise ValueError(f"expected input of rank in {self.dims}, got {input.dim()}D input")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        factor = 0.0
        if self.momentum is not None:
            factor = self.momentum
        if self.training and self.track_running_stats:
            count = self.num_batches_tracked
            if count is not None:
                count.add_(1)
                if self.momentum is None:  # cumulative average
                    factor = 1.0 / float(count)
        # Batch statistics in training, and in eval when there are no running ones; the
        # running buffers are passed where they are read or updated.
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        keep = not self.training or self.track_running_stats
        y = TF.batch_norm(
            input,
            self.running_mean if keep else None,
            self.running_var if keep else None,
            self.weight,
            self.bias,
            batch_stats,
            factor,
            self.eps,
        )
        return activation(y, self.act, self.slope)


class ScriptGroupNormAct(nn.GroupNorm):
    """``act(GroupNorm(input [N, C, *S]))``."""

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float,
        affine: bool,
        bias: bool,
        act: str,
        slope: float,
    ):
        super().__init__(num_groups, num_channels, eps, affine, device="meta", bias=bias)
        self.act = act
        self.slope = slope

    def forward(self, input: Tensor) -> Tensor:
        y = TF.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)
        return activation(y, self.act, self.slope)


class ScriptLayerNormAct(nn.LayerNorm):
    """``act(LayerNorm(input [*, *normalized_shape]))``."""

    def __init__(
        self,
        normalized_shape: list[int],
        eps: float,
        elementwise_affine: bool,
        bias: bool,
        act: str,
        slope: float,
    ):
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device="meta")
        self.act = act
        self.slope = slope

    def forward(self, input: Tensor) -> Tensor:
        y = TF.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
        return activation(y, self.act, self.slope)


# --- which module stands in for which layer -----------------------------------------------

# Methods that build or describe a layer without changing what forward computes.
_NOT_COMPUTE = frozenset(
    {
        "__init__",
        "__setattr__",
        "__repr__",
        "extra_repr",
        "reset_parameters",
        "reset_running_stats",
        "_load_from_state_dict",
    }
)


def _defined(cls: type, name: str) -> Any:
    """The raw class attribute ``cls.name`` resolves to (no descriptor binding)."""
    for klass in cls.__mro__:
        if name in vars(klass):
            return vars(klass)[name]
    return None


def overridden(cls: type, base: type) -> list[str]:
    """The methods (and class attributes) of ``base`` and its parents below ``nn.Module``
    that the subclass ``cls`` redefines, except the ones that only build or describe the
    layer (``__init__``, ``extra_repr``, ``reset_parameters``, ...)."""
    names: list[str] = []
    for klass in base.__mro__:
        if klass is nn.Module:
            break
        for name in vars(klass):
            if name in _NOT_COMPUTE or name in names or name.startswith("__"):
                continue
            if _defined(cls, name) is not _defined(base, name):
                names.append(name)
    return names


def computes_like(cls: type, base: type) -> bool:
    """Whether ``cls`` is ``base`` or a subclass that computes what ``base`` computes (it
    only adds attributes or changes construction: see :func:`overridden`)."""
    return cls is base or (issubclass(cls, base) and not overridden(cls, base))


def norm_kwargs(module: nn.Module) -> dict[str, Any]:
    """Constructor arguments rebuilding ``module``'s configuration: the keyword arguments
    torch.nn's and normlab's norm layers share (``num_features``/``num_groups``/
    ``normalized_shape``, ``eps``, ``momentum``, ``affine``, ``bias`` flag, ...)."""
    if hasattr(module, "num_groups"):
        kw: dict[str, Any] = dict(
            num_groups=module.num_groups,
            num_channels=module.num_channels,
            eps=module.eps,
            affine=module.affine,
        )
        if module.affine:
            kw["bias"] = module.bias is not None
        return kw
    if hasattr(module, "num_features") and hasattr(module, "momentum"):  # BatchNorm, InstanceNorm
        kw = dict(
            num_features=module.num_features,
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
        )
        if module.affine:
            kw["bias"] = module.bias is not None
        return kw
    kw = dict(
        normalized_shape=tuple(module.normalized_shape),
        eps=module.eps,
        elementwise_affine=module.elementwise_affine,
    )
    if "bias" in getattr(module, "_parameters", {}) and not _is_rms(module):
        if module.elementwise_affine:
            kw["bias"] = module.bias is not None
    return kw


def _is_rms(module: nn.Module) -> bool:
    return isinstance(module, nn.RMSNorm) or any(
        c.__name__ == "RMSNorm" for c in type(module).__mro__
    )


def _share(source: nn.Module, target: nn.Module) -> nn.Module:
    """Give ``target`` (built on the meta device) ``source``'s Parameters and buffers, the
    same objects, and its mode."""
    for name in list(target._parameters):
        setattr(target, name, getattr(source, name))
    for name in list(target._buffers):
        setattr(target, name, getattr(source, name))
    return target.train(source.training)


def _act_of(module: nn.Module) -> tuple[str, float]:
    if isinstance(getattr(module, "activation", None), str):  # InPlaceABN
        return module.activation, float(module.activation_param)
    return getattr(module, "act", "identity"), float(getattr(module, "slope", 0.01))


def _warn_training_options(module: nn.Module) -> None:
    """normlab-only BatchNorm options that torch's layer lacks: say what changes."""
    lost = []
    if getattr(module, "freeze_stats", False):
        lost.append("freeze_stats=True")
    if getattr(module, "small_batch", "error") != "error":
        lost.append(f"small_batch={module.small_batch!r}")
    if lost:
        warnings.warn(
            f"{type(module).__name__} has {', '.join(lost)}, which torch.nn's BatchNorm does "
            "not have: the torch/TorchScript module computes the same in eval, but trains with "
            "torch's semantics (freeze the layer with normlab.freeze_batch_norm to keep its "
            "statistics fixed)",
            RuntimeWarning,
            stacklevel=3,
        )


def _torch_twin(module: nn.Module, cls: type) -> nn.Module:
    _warn_training_options(module)
    return _share(module, cls(**norm_kwargs(module), device="meta"))


def _frozen(module: nn.Module) -> nn.Module:
    act, slope = _act_of(module)
    dims = list(module._allowed_dims)
    return _share(module, ScriptFrozenBatchNorm(module.num_features, module.eps, act, slope, dims))


def _batch_norm_act(module: nn.Module) -> nn.Module:
    _warn_training_options(module)
    kw = norm_kwargs(module)
    kw.setdefault("bias", True)
    act, slope = _act_of(module)
    dims = list(module._allowed_dims)
    return _share(module, ScriptBatchNormAct(**kw, act=act, slope=slope, dims=dims))


def _group_norm_act(module: nn.Module) -> nn.Module:
    kw = norm_kwargs(module)
    kw.setdefault("bias", True)
    act, slope = _act_of(module)
    return _share(module, ScriptGroupNormAct(**kw, act=act, slope=slope))


def _layer_norm_act(module: nn.Module) -> nn.Module:
    kw = norm_kwargs(module)
    kw["normalized_shape"] = list(kw["normalized_shape"])
    kw.setdefault("bias", True)
    act, slope = _act_of(module)
    return _share(module, ScriptLayerNormAct(**kw, act=act, slope=slope))


@cache
def _torch_classes() -> dict[type, type]:
    """normlab layer -> the torch.nn layer computing the same (looked up when first used:
    the layer modules import this one)."""
    import normlab.nn as nlnn

    names = (
        "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "InstanceNorm1d", "InstanceNorm2d",
        "InstanceNorm3d", "GroupNorm", "LayerNorm", "RMSNorm",
    )  # fmt: skip
    return {getattr(nlnn, n): getattr(nn, n) for n in names}


@cache
def _script_builders() -> dict[type, Callable[[nn.Module], nn.Module]]:
    """normlab layer without a torch.nn twin -> builder of its TorchScript module."""
    import normlab.nn as nlnn

    table: dict[type, Callable[[nn.Module], nn.Module]] = {}
    for cls in (nlnn.FrozenBatchNorm, nlnn.FrozenBatchNorm1d, nlnn.FrozenBatchNorm2d,
                nlnn.FrozenBatchNorm3d):  # fmt: skip
        table[cls] = _frozen
    for cls in (nlnn.BatchNormAct1d, nlnn.BatchNormAct2d, nlnn.BatchNormAct3d, nlnn.InPlaceABN):
        table[cls] = _batch_norm_act
    table[nlnn.GroupNormAct] = _group_norm_act
    table[nlnn.LayerNormAct] = _layer_norm_act
    return table


def _nearest(cls: type, table: dict[type, Any]) -> type | None:
    """The class of ``table`` that ``cls`` is, or is a subclass of without changing what it
    computes (a subclass adding attributes only); else None."""
    for klass in cls.__mro__:
        if klass in table:
            return klass if computes_like(cls, klass) else None
    return None


def torch_equivalent(module: nn.Module) -> nn.Module | None:
    """The ``torch.nn`` layer computing what the normlab layer ``module`` computes, holding
    the same Parameter and buffer objects (same state_dict keys) and mode; None when torch
    has no such layer (fused activation, frozen, renorm, ghost, sync, a subclass with its
    own computation). Warns when normlab-only training options (``freeze_stats``,
    ``small_batch``) would be dropped."""
    table = _torch_classes()
    klass = _nearest(type(module), table)
    return None if klass is None else _torch_twin(module, table[klass])


def _not_scriptable_message(module: nn.Module) -> str:
    import normlab.nn as nlnn

    name = type(module).__name__
    if isinstance(module, nlnn.SyncBatchNorm):
        return (
            f"normlab.{name} cannot be scripted: its training step gathers statistics from "
            "every process, which TorchScript cannot express. Revert it before scripting: "
            "model = normlab.revert_sync_batchnorm(model) (BatchNorm*d and BatchNormAct*d "
            "script)."
        )
    if isinstance(module, (nlnn.BatchRenormBase, nlnn.GhostBatchNormBase)):
        torch_bn = {(2, 3): "BatchNorm1d", (4,): "BatchNorm2d", (5,): "BatchNorm3d"}.get(
            tuple(module._allowed_dims), "BatchNorm2d"
        )
        return (
            f"normlab.{name} cannot be scripted: its training step has no TorchScript "
            "equivalent (in eval it is plain BatchNorm). Before scripting, freeze or fold it: "
            "normlab.freeze_batch_norm(model) (FrozenBatchNorm scripts) or "
            "normlab.tools.fold_batchnorm(model.eval()); or rebuild it as torch's BatchNorm "
            f"(same state, torch's training step): normlab.tools.convert(model, to='torch', "
            f"mapping={{normlab.{name}: torch.nn.{torch_bn}}})."
        )
    bases = [c.__name__ for c in type(module).__mro__[1:] if c.__module__.startswith("normlab.")]
    return (
        f"{type(module).__module__}.{name} (a subclass of normlab.{bases[0] if bases else '?'} "
        "that changes what it computes) cannot be scripted: normlab scripts its layers by "
        "swapping in an equivalent TorchScript module, and has none for this class. Convert "
        "it before scripting, e.g. normlab.tools.convert(model, to='torch', "
        f"mapping={{{name}: <torch.nn class, or function of the module>}}), or give {name} a "
        "TorchScript-compatible forward and a __prepare_scriptable__ that returns self."
    )


def scriptable(module: nn.Module) -> nn.Module:
    """The module ``torch.jit.script`` compiles in place of the normlab layer ``module``:
    its ``torch.nn`` equivalent, else one of this file's ``Script*`` modules, sharing the
    layer's Parameters and buffers. Raises :class:`NotScriptableError` naming the fix."""
    twin = torch_equivalent(module)
    if twin is not None:
        return twin
    builders = _script_builders()
    klass = _nearest(type(module), builders)
    if klass is None:
        raise NotScriptableError(_not_scriptable_message(module))
    return builders[klass](module)


class ScriptableMixin:
    """Makes ``torch.jit.script`` compile :func:`scriptable`'s module for a normlab layer
    (and, through TorchScript's recursion, for every normlab layer inside a model)."""

    def __prepare_scriptable__(self) -> nn.Module:
        return scriptable(self)  # type: ignore[arg-type]
