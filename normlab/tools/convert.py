"""Swap the norm layers of a model: torch.nn <-> normlab, BatchNorm -> GroupNorm/Sync/Frozen.

Layers are replaced in their parents (the model's class is kept), carrying what stays
meaningful: parameters and buffers (normlab's layers share torch's state_dict keys),
``training`` mode, each parameter's ``requires_grad``, device and dtype. A module shared
under several names is converted once and stays shared.

A subclass is converted by its base class's rule only when it computes what the base
computes (it adds attributes or changes construction, but overrides neither ``forward``
nor the methods ``forward`` relies on); a subclass with its own computation (timm's
``LayerNorm``, torchvision's channels-first ``LayerNorm2d``) is left and reported. What was
left is told in one :class:`ConvertWarning`, and in full by ``return_report=True``;
``mapping={cls: new_cls_or_function}`` converts such classes as you say.
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any, Literal, NamedTuple

import torch
from torch import nn

from normlab.nn._script import norm_kwargs, overridden, torch_equivalent
from normlab.tools._detect import is_batchnorm, is_frozen_batchnorm, is_norm_like

__all__ = ["convert", "ConvertReport", "ConvertWarning", "TARGETS"]

TARGETS = ("normlab", "torch", "groupnorm", "sync", "frozen")
_NAMES = (
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "GroupNorm",
    "RMSNorm",
)

Mapped = type | Callable[[nn.Module], "nn.Module | None"]


class ConvertWarning(UserWarning):
    """convert left norm layers unconverted (filter it with ``warnings`` or ``warn=False``)."""


class Converted(NamedTuple):
    name: str  # qualified name in the model ("" for the model itself)
    old: type
    new: type


class Left(NamedTuple):
    name: str
    cls: type
    reason: str


class ConvertReport(NamedTuple):
    """What ``convert`` changed (``converted``) and which norm layers it left (``left``),
    one entry per module (shared modules once), in ``named_modules`` order."""

    to: str
    converted: list[Converted]
    left: list[Left]

    def counts(self) -> dict[str, Counter[str]]:
        """``{"converted": Counter("old -> new"), "left": Counter("cls (reason)")}``."""
        return {
            "converted": Counter(f"{_qual(c.old)} -> {_qual(c.new)}" for c in self.converted),
            "left": Counter(f"{_qual(m.cls)} ({m.reason})" for m in self.left),
        }

    def summary(self) -> str:
        """A few lines: counts per class converted and left."""
        counts = self.counts()
        lines = [f"convert(to={self.to!r}): {len(self.converted)} converted, "
                 f"{len(self.left)} norm layers left"]  # fmt: skip
        lines += [f"  converted {n} x {what}" for what, n in counts["converted"].items()]
        lines += [f"  left      {n} x {what}" for what, n in counts["left"].items()]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _qual(cls: type) -> str:
    module = cls.__module__
    for prefix, short in (("torch.nn.modules.", "torch.nn"), ("normlab.nn.", "normlab")):
        if module.startswith(prefix):
            return f"{short}.{cls.__name__}"
    return f"{module}.{cls.__qualname__}"


def _class_pairs() -> list[tuple[type, type]]:
    """(torch.nn class, normlab class) for every layer both have."""
    import normlab.nn as nlnn

    return [
        (getattr(nn, n), getattr(nlnn, n)) for n in _NAMES if hasattr(nn, n) and hasattr(nlnn, n)
    ]


def _factory(m: nn.Module) -> dict[str, Any]:
    """device/dtype of ``m``'s floating tensors (None when it has none)."""
    for t in list(m.parameters()) + list(m.buffers()):
        if t.is_floating_point():
            return {"device": t.device, "dtype": t.dtype}
    return {}


def _carry(old: nn.Module, new: nn.Module, state: bool = True) -> nn.Module:
    """Copy state (when the keys mean the same thing), mode and requires_grad to ``new``."""
    if state:
        new.load_state_dict(old.state_dict())
    new.train(old.training)
    old_params = dict(old.named_parameters())
    for name, p in new.named_parameters():
        if name in old_params:
            p.requires_grad_(old_params[name].requires_grad)
    return new


def _rebuild(m: nn.Module, cls: type) -> nn.Module:
    return _carry(m, cls(**norm_kwargs(m), **_factory(m)))


def _mapped(m: nn.Module, target: Mapped) -> nn.Module | None:
    """A user mapping's replacement for ``m``: a class is built from ``m``'s configuration
    and loads its state dict; a function's result is taken as it is."""
    if not isinstance(target, type):
        return target(m)
    try:
        return _rebuild(m, target)
    except (TypeError, AttributeError, RuntimeError) as err:
        raise TypeError(
            f"convert: mapping {{{_qual(type(m))}: {_qual(target)}}} could not rebuild the "
            f"layer as {target.__name__} from its configuration and state dict ({err}); "
            "map the class to a function module -> module instead"
        ) from err


def _nearest(cls: type, table: Mapping[type, Any]) -> type | None:
    """The first class of ``cls``'s MRO that ``table`` has (None if none)."""
    return next((k for k in cls.__mro__ if k in table), None)


def _is_normlab(m: nn.Module) -> bool:
    """A normlab layer or a subclass of one."""
    return any(k.__module__.startswith("normlab.") for k in type(m).__mro__)


def _why_left(m: nn.Module, to: str, bases: Mapping[type, Any]) -> str:
    """Why a norm layer had no rule: the base it would take and what it overrides."""
    base = _nearest(type(m), bases)
    if base is not None:
        names = overridden(type(m), base)
        if names:
            return f"overrides {', '.join(names)} of {_qual(base)}"
    return f"no {'torch.nn' if to == 'torch' else to} equivalent"


def _to_groupnorm(m: nn.Module, num_groups: int | Callable[[int], int], name: str) -> nn.Module:
    import normlab.nn as nlnn

    c = m.num_features
    g = num_groups(c) if callable(num_groups) else num_groups
    if isinstance(g, bool) or not isinstance(g, int) or g < 1 or c % g:
        raise ValueError(
            f"num_groups must be a positive int dividing num_features; layer {name!r} has "
            f"num_features={c}, got num_groups={g!r}"
        )
    act = _bn_activation(m)
    affine = bool(getattr(m, "affine", True)) and m.weight is not None
    kw: dict[str, Any] = dict(eps=m.eps, affine=affine)
    if affine:
        kw["bias"] = m.bias is not None
    if act is not None:
        cls: type = nlnn.GroupNormAct
        kw.update(act=act[0], slope=act[1])
    else:
        cls = nlnn.GroupNorm if _is_normlab(m) else nn.GroupNorm
    gn = cls(g, c, **kw, **_factory(m))
    if affine:  # gamma/beta keep their meaning per channel; running statistics have none
        with torch.no_grad():
            gn.weight.copy_(m.weight)
            if m.bias is not None:
                gn.bias.copy_(m.bias)
    return _carry(m, gn, state=False)


def _bn_activation(m: nn.Module) -> tuple[str, float] | None:
    """(act, slope) of a normlab BatchNorm+activation layer, else None."""
    if isinstance(getattr(m, "act", None), str):
        return m.act, float(m.slope)
    if isinstance(getattr(m, "activation", None), str):  # InPlaceABN
        return m.activation, float(m.activation_param)
    return None


def _groupnorm_rule(m: nn.Module) -> str | None:
    """Why BatchNorm ``m`` cannot become GroupNorm, or None when it can: plain BatchNorm
    classes (torch's, incl. SyncBatchNorm, and normlab's, incl. the renorm/ghost/sync
    variants) and subclasses computing the same; normlab's BatchNorm+activation layers
    become GroupNormAct. Frozen BatchNorm is kept (its statistics are constants)."""
    import normlab.nn as nlnn
    from normlab.plan import ACTIVATIONS

    if is_frozen_batchnorm(m):
        return "frozen BatchNorm is kept"
    act = _bn_activation(m)
    if act is not None and act[0] not in ACTIVATIONS:
        return f"activation {act[0]!r} has no GroupNormAct"
    known = (
        nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nlnn.BatchNorm1d,
        nlnn.BatchNorm2d, nlnn.BatchNorm3d, nlnn.BatchNormAct1d, nlnn.BatchNormAct2d,
        nlnn.BatchNormAct3d, nlnn.SyncBatchNorm, nlnn.SyncBatchNormAct, nlnn.InPlaceABN,
        nlnn.BatchRenorm1d, nlnn.BatchRenorm2d, nlnn.BatchRenorm3d, nlnn.GhostBatchNorm1d,
        nlnn.GhostBatchNorm2d,
    )  # fmt: skip
    base = _nearest(type(m), dict.fromkeys(known))
    if base is None:
        return "no groupnorm rule for this class"
    names = overridden(type(m), base)
    return f"overrides {', '.join(names)} of {_qual(base)}" if names else None


def _replace(
    model: nn.Module, fn: Callable[[nn.Module, str], nn.Module | None]
) -> tuple[nn.Module, list[Converted], set[int]]:
    """Apply ``fn`` top-down; where it returns a module, that module replaces the old one.
    Returns the model, what was replaced, and the ids of the new modules."""
    memo: dict[int, nn.Module] = {}
    done: list[Converted] = []
    new_ids: set[int] = set()

    def visit(module: nn.Module, name: str) -> nn.Module:
        if id(module) in memo:
            return memo[id(module)]
        new = fn(module, name)
        if new is None or new is module:
            for child_name, child in list(module.named_children()):
                new_child = visit(child, f"{name}.{child_name}" if name else child_name)
                if new_child is not child:
                    setattr(module, child_name, new_child)
            new = module
        else:
            done.append(Converted(name, type(module), type(new)))
            new_ids.add(id(new))
        memo[id(module)] = new
        return new

    return visit(model, ""), done, new_ids


def _delegate(name: str, module: str, target: str) -> Callable[..., nn.Module]:
    import importlib

    import normlab
    import normlab.nn

    # re-exported at the top level, or in normlab.nn, or still only in its own module
    fn = getattr(normlab, name, None) or getattr(normlab.nn, name, None)
    if fn is None:
        try:
            fn = getattr(importlib.import_module(f"normlab.nn.{module}"), name, None)
        except ImportError:
            fn = None
    if fn is None:
        raise NotImplementedError(
            f"convert(to={target!r}) delegates to normlab.{name}, which this normlab does not "
            f"provide (yet)"
        )
    return fn


def _left_after(model: nn.Module, to: str, converted: set[int]) -> list[Left]:
    """The norm layers of the converted ``model`` that ``to`` was about but left."""
    import normlab.nn as nlnn

    torch_bases = {a: b for a, b in _class_pairs()}
    normlab_bases = {b: a for a, b in _class_pairs()}
    left = []
    for name, m in model.named_modules():
        if id(m) in converted or not is_norm_like(m):
            continue
        reason: str | None = None
        if to == "normlab" and not _is_normlab(m):
            reason = _why_left(m, to, torch_bases)
        elif to == "torch" and _is_normlab(m):
            reason = _why_left(m, to, normlab_bases)
        elif to == "groupnorm" and is_batchnorm(m):
            reason = _groupnorm_rule(m) or "not converted"
        elif to == "sync" and is_batchnorm(m) and not is_frozen_batchnorm(m):
            if not isinstance(m, (nlnn.SyncBatchNorm, nn.SyncBatchNorm)):
                reason = "not converted by normlab.convert_sync_batchnorm"
        elif to == "frozen" and is_batchnorm(m) and not is_frozen_batchnorm(m):
            reason = "not frozen by normlab.freeze_batch_norm"
        if reason is not None:
            left.append(Left(name, type(m), reason))
    return left


def _warn_left(report: ConvertReport) -> None:
    by_class = report.counts()["left"]
    listed = "; ".join(f"{n} x {what}" for what, n in by_class.items())
    warnings.warn(
        f"convert(to={report.to!r}) left {len(report.left)} norm layer(s) unconverted: "
        f"{listed}. Pass mapping={{cls: new class or function module -> module}} to convert "
        "them, return_report=True for the list by name, warn=False to silence this.",
        ConvertWarning,
        stacklevel=3,
    )


def convert(
    model: nn.Module,
    to: Literal["normlab", "torch", "groupnorm", "sync", "frozen"],
    *,
    num_groups: int | Callable[[int], int] = 32,
    mapping: Mapping[type, Mapped] | None = None,
    inplace: bool = False,
    warn: bool = True,
    return_report: bool = False,
    **kwargs: Any,
) -> nn.Module | tuple[nn.Module, ConvertReport]:
    """Replace the norm layers of ``model``.

    Args:
        model: any module (a lone norm layer too).
        to: ``"normlab"``: torch.nn BatchNorm/InstanceNorm/LayerNorm/GroupNorm/RMSNorm ->
            the normlab layer of the same name; ``"torch"``: the reverse (the torch layer
            holds the normlab layer's Parameters and buffers); ``"groupnorm"``: every
            BatchNorm (torch or normlab, not frozen) -> GroupNorm of the same family with
            ``num_groups`` groups, gamma/beta carried (normlab's BatchNorm+activation ->
            ``GroupNormAct``); ``"sync"``: ``normlab.convert_sync_batchnorm(model,
            **kwargs)``; ``"frozen"``: ``normlab.freeze_batch_norm(model, **kwargs)``.
            Subclasses take their base's rule only if they compute the same (see the
            module docstring); the others are left and reported.
        num_groups: groups for ``"groupnorm"``; an int, or a function of ``num_features``.
        mapping: ``{cls: new}`` for modules of exactly class ``cls``, before the built-in
            rules (``"normlab"``, ``"torch"``, ``"groupnorm"``): ``new`` is a class, built
            from the layer's configuration (``num_features``, ``eps``, ...) and loaded with
            its state dict, or a function ``module -> module`` (None: leave it).
        inplace: modify ``model`` itself instead of a deep copy.
        warn: a :class:`ConvertWarning` listing the norm layers left unconverted, by class.
        return_report: also return a :class:`ConvertReport`.
        kwargs: passed to the delegated function (``"sync"``, ``"frozen"``).

    Returns:
        The converted model (``model`` itself when ``inplace``, unless ``model`` is a norm),
        and the report when ``return_report``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if to not in TARGETS:
        raise ValueError(f"to must be one of {TARGETS}, got {to!r}")
    if kwargs and to not in ("sync", "frozen"):
        raise TypeError(f"convert(to={to!r}) takes no extra arguments, got {sorted(kwargs)}")
    mapping = dict(mapping or {})
    if mapping and to in ("sync", "frozen"):
        raise TypeError(f"mapping applies to to='normlab', 'torch' or 'groupnorm', not {to!r}")
    for cls, target in mapping.items():
        if not isinstance(cls, type) or not (isinstance(target, type) or callable(target)):
            raise TypeError(
                f"mapping must map classes to classes or functions, got {cls!r}: {target!r}"
            )
    if not inplace:
        model = copy.deepcopy(model)

    if to in ("sync", "frozen"):
        fn = (
            _delegate("convert_sync_batchnorm", "syncbatchnorm", to)
            if to == "sync"
            else _delegate("freeze_batch_norm", "frozen", to)
        )
        before = {name: type(m) for name, m in model.named_modules()}
        model = fn(model, **kwargs)
        done, new_ids = [], set()
        for name, m in model.named_modules():
            if name in before and type(m) is not before[name]:
                done.append(Converted(name, before[name], type(m)))
                new_ids.add(id(m))
    else:
        model, done, new_ids = _replace(model, _rule(to, num_groups, mapping))
    report = ConvertReport(to, done, _left_after(model, to, new_ids))
    if warn and report.left:
        _warn_left(report)
    return (model, report) if return_report else model


def _rule(
    to: str, num_groups: int | Callable[[int], int], mapping: dict[type, Mapped]
) -> Callable[[nn.Module, str], nn.Module | None]:
    """The replacement of one module for target ``to`` (None: keep it, visit its children)."""
    pairs = _class_pairs()
    to_normlab = dict(pairs)

    def rule(m: nn.Module, name: str) -> nn.Module | None:
        if type(m) in mapping:
            return _mapped(m, mapping[type(m)])
        if to == "groupnorm":
            if is_batchnorm(m) and _groupnorm_rule(m) is None:
                return _to_groupnorm(m, num_groups, name or "<model>")
            return None
        if to == "torch":
            return torch_equivalent(m) if _is_normlab(m) else None
        base = _nearest(type(m), to_normlab)
        if base is None or overridden(type(m), base):
            return None
        return _rebuild(m, to_normlab[base])

    return rule
