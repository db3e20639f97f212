"""Swap the norm layers of a model: torch.nn <-> normlab, BatchNorm -> GroupNorm/Sync/Frozen.

Layers are replaced in their parents (the model's class is kept), carrying what stays
meaningful: parameters and buffers (normlab's layers share torch's state_dict keys),
``training`` mode, each parameter's ``requires_grad``, device and dtype. A module shared
under several names is converted once and stays shared.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from normlab.tools._detect import is_batchnorm, is_frozen_batchnorm

__all__ = ["convert", "TARGETS"]

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


def _class_pairs() -> list[tuple[type, type]]:
    """(torch.nn class, normlab class) for every layer both have."""
    import normlab.nn as nlnn

    return [
        (getattr(nn, n), getattr(nlnn, n)) for n in _NAMES if hasattr(nn, n) and hasattr(nlnn, n)
    ]


def _ctor_kwargs(m: nn.Module) -> dict[str, Any]:
    """Constructor arguments that rebuild ``m``'s configuration (torch/normlab signatures)."""
    if hasattr(m, "num_groups"):
        kw = dict(num_groups=m.num_groups, num_channels=m.num_channels, eps=m.eps, affine=m.affine)
        if m.affine:
            kw["bias"] = m.bias is not None
        return kw
    if hasattr(m, "num_features"):  # BatchNorm, InstanceNorm
        kw = dict(
            num_features=m.num_features,
            eps=m.eps,
            momentum=m.momentum,
            affine=m.affine,
            track_running_stats=m.track_running_stats,
        )
        if m.affine:
            kw["bias"] = m.bias is not None
        return kw
    kw = dict(
        normalized_shape=tuple(m.normalized_shape),
        eps=m.eps,
        elementwise_affine=m.elementwise_affine,
    )
    if isinstance(m, nn.LayerNorm) or type(m).__name__ == "LayerNorm":
        if m.elementwise_affine:
            kw["bias"] = m.bias is not None
    return kw


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
    return _carry(m, cls(**_ctor_kwargs(m), **_factory(m)))


def _to_groupnorm(m: nn.Module, num_groups: int | Callable[[int], int], name: str) -> nn.Module:
    import normlab.nn as nlnn

    c = m.num_features
    g = num_groups(c) if callable(num_groups) else num_groups
    if isinstance(g, bool) or not isinstance(g, int) or g < 1 or c % g:
        raise ValueError(
            f"num_groups must be a positive int dividing num_features; layer {name!r} has "
            f"num_features={c}, got num_groups={g!r}"
        )
    cls = nlnn.GroupNorm if isinstance(m, nlnn.NormBase) else nn.GroupNorm
    affine = bool(getattr(m, "affine", True)) and m.weight is not None
    kw: dict[str, Any] = dict(eps=m.eps, affine=affine)
    if affine:
        kw["bias"] = m.bias is not None
    gn = cls(g, c, **kw, **_factory(m))
    if affine:  # gamma/beta keep their meaning per channel; running statistics have none
        with torch.no_grad():
            gn.weight.copy_(m.weight)
            if m.bias is not None:
                gn.bias.copy_(m.bias)
    return _carry(m, gn, state=False)


def _replace(model: nn.Module, fn: Callable[[nn.Module, str], nn.Module | None]) -> nn.Module:
    """Apply ``fn`` top-down; where it returns a module, that module replaces the old one."""
    memo: dict[int, nn.Module] = {}

    def visit(module: nn.Module, name: str) -> nn.Module:
        if id(module) in memo:
            return memo[id(module)]
        new = fn(module, name)
        if new is None:
            for child_name, child in list(module.named_children()):
                new_child = visit(child, f"{name}.{child_name}" if name else child_name)
                if new_child is not child:
                    setattr(module, child_name, new_child)
            new = module
        memo[id(module)] = new
        return new

    return visit(model, "")


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


def convert(
    model: nn.Module,
    to: Literal["normlab", "torch", "groupnorm", "sync", "frozen"],
    *,
    num_groups: int | Callable[[int], int] = 32,
    inplace: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Replace the norm layers of ``model``.

    Args:
        model: any module (a lone norm layer too).
        to: ``"normlab"``: torch.nn BatchNorm/InstanceNorm/LayerNorm/GroupNorm/RMSNorm (exact
            classes, not subclasses) -> the normlab layer of the same name;
            ``"torch"``: the reverse; ``"groupnorm"``: every BatchNorm (torch or normlab, not
            frozen) -> GroupNorm of the same family with ``num_groups`` groups, gamma/beta
            carried; ``"sync"``: ``normlab.convert_sync_batchnorm(model, **kwargs)``;
            ``"frozen"``: ``normlab.freeze_batch_norm(model, **kwargs)``.
        num_groups: groups for ``"groupnorm"``; an int, or a function of ``num_features``.
        inplace: modify ``model`` itself instead of a deep copy.
        kwargs: passed to the delegated function (``"sync"``, ``"frozen"``).

    Returns:
        The converted model (``model`` itself when ``inplace``, unless ``model`` is a norm).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if to not in TARGETS:
        raise ValueError(f"to must be one of {TARGETS}, got {to!r}")
    if kwargs and to not in ("sync", "frozen"):
        raise TypeError(f"convert(to={to!r}) takes no extra arguments, got {sorted(kwargs)}")
    if to in ("sync", "frozen"):
        fn = (
            _delegate("convert_sync_batchnorm", "syncbatchnorm", to)
            if to == "sync"
            else _delegate("freeze_batch_norm", "frozen", to)
        )
        return fn(model if inplace else copy.deepcopy(model), **kwargs)
    if not inplace:
        model = copy.deepcopy(model)

    if to == "groupnorm":
        return _replace(
            model,
            lambda m, name: (
                _to_groupnorm(m, num_groups, name or "<model>")
                if is_batchnorm(m) and not is_frozen_batchnorm(m)
                else None
            ),
        )
    pairs = _class_pairs()
    table = {src: dst for a, b in pairs for src, dst in ([(a, b)] if to == "normlab" else [(b, a)])}

    return _replace(
        model, lambda m, _name: _rebuild(m, table[type(m)]) if type(m) in table else None
    )
