"""Differential fuzz tests: seeded random configurations of every layer and variant, on every
backend, against ``torch.nn`` (an explicit torch composition for the variants torch lacks)
and the NumPy float64 reference.

One generator, :func:`random_case`, draws a :class:`Case` (layer and constructor arguments
incl. ``eps``/``momentum`` ``None``, input shape incl. size-1/size-0 dims, dtype incl.
bf16/fp16 with float32 parameters (and, rarely, mixes torch refuses), layout incl.
channels-last, transposed, stride-0 expanded and storage offset, train/eval, which tensors
require grad, now and then a NaN/inf in the input); one runner, :func:`check_case`, runs:

- normlab's layer in the case's dtype and layout;
- its torch twin on the same state and input (torch's own error);
- the twin in float64 on the same values (the truth), itself checked against the reference;
- the truth again on an input moved by one rounding (how sensitive the problem is).

For each of the output, the input and parameter gradients and the running statistics,
normlab's error against the truth may be ``K`` times the larger of torch's error and that
sensitivity, plus a few units in the last place of the result times its size, plus what
rounding the terms of the formula costs (:func:`natural_errors`). If torch raises, normlab
must raise (any exception); if torch runs, normlab must run.

``make test`` runs a fixed slice (``FAST_CASES`` cases, seed 0, on every backend). A longer
run: ``pytest tests/test_fuzz.py --fuzz-cases 5000 --fuzz-seed 7 -n 2`` (or the environment
variables ``NORMLAB_FUZZ_CASES`` / ``NORMLAB_FUZZ_SEED``). A failure prints the case; rerun
it with ``check_case(Case(...), backend)`` from this module.

Cases hitting a known, reported bug are skipped by :func:`known_issue`, each with its
reason: delete the entry once the bug is fixed.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as TF

import normlab
from normlab import ops
from normlab import reference as ref
from normlab import reference_variants as rv

FAST_CASES = 256  # per backend, in `make test`
K = 4.0  # normlab may be this many times less accurate than torch
FLOOR_ULPS = 2.0  # ... plus this many units of the result dtype's eps times its largest value
NATURAL_ULPS = 4.0  # ... plus this many of the compute dtype's eps times the natural scale
MAX_SMALL_NUMEL = 4096
LARGE_NUMEL = (1 << 15, 1 << 17)  # parallel kernels (32k) and the fused activations (64k)

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
LAYOUTS = ("contiguous", "channels_last", "transposed", "expanded", "offset")
QUANTITIES = ("y", "dx", "dweight", "dbias", "running_mean", "running_var")
BACKENDS = ("auto", *ops.available())  # "auto" is a choice of its own: its routes differ


@dataclass(frozen=True)
class Case:
    """One random configuration: ``normlab.<layer>(*args, **kwargs)`` (parameters in
    ``param_dtype``) on an input of ``shape``, ``dtype`` and ``layout``."""

    layer: str
    args: tuple
    kwargs: dict = field(default_factory=dict)
    shape: tuple[int, ...] = ()
    dtype: str = "float32"
    param_dtype: str = "float32"
    layout: str = "contiguous"
    layout_arg: int = 0  # the permutation, expanded dim or storage offset, by layout
    train: bool = True
    x_grad: bool = True
    param_grad: bool = True
    scale: float = 1.0  # input = randn * scale + offset
    offset: float = 0.0
    poison: str = ""  # "nan" or "inf": one input value is that
    seed: int = 0

    @property
    def id(self) -> str:
        mode = "train" if self.train else "eval"
        return f"{self.layer}-{self.dtype}-{self.layout}-{mode}-{self.seed}"

    def repro(self, backend: str) -> str:
        return f"check_case({self!r}, {backend!r})"


# --------------------------------------------------------------------------------------------
# The generator
# --------------------------------------------------------------------------------------------


def _pick(rng: np.random.Generator, options: list | tuple, weights: list | None = None) -> Any:
    p = None if weights is None else np.asarray(weights, dtype=float) / sum(weights)
    return options[int(rng.choice(len(options), p=p))]


def _dims(rng: np.random.Generator, count: int, budget: int) -> list[int]:
    """``count`` sizes whose product stays within ``budget``; size 1 and (rarely) 0 included."""
    dims = [int(_pick(rng, [0, 1, 1, 2, 3, 4, 5, 7, 8, 16], [1, 6, 3, 4, 3, 3, 2, 2, 2, 2]))
            for _ in range(count)]
    while math.prod(dims) > budget:
        i = int(np.argmax(dims))
        dims[i] = max(1, dims[i] // 2)
    return dims


def _budget(rng: np.random.Generator) -> int:
    """Total elements allowed: mostly small, a few large enough for the parallel and fused
    kernels."""
    if rng.random() < 0.05:
        return int(rng.integers(*LARGE_NUMEL))
    return int(_pick(rng, [64, 512, MAX_SMALL_NUMEL]))


def _grow(rng: np.random.Generator, shape: list[int], budget: int, fixed: set[int]) -> list[int]:
    """For a large budget: scale free dims up until the shape is within a factor 2 of it."""
    if budget <= MAX_SMALL_NUMEL or 0 in shape:
        return shape
    free = [i for i in range(len(shape)) if i not in fixed]
    while free and math.prod(shape) * 2 <= budget:
        shape[int(_pick(rng, free))] *= 2
    return shape


def _eps(rng: np.random.Generator) -> dict:
    return _pick(rng, [{}, {"eps": 1e-3}, {"eps": 0.1}, {"eps": 1e-10}], [4, 2, 1, 1])


def _momentum(rng: np.random.Generator) -> dict:
    return _pick(rng, [{}, {"momentum": 0.0}, {"momentum": 0.3}, {"momentum": 1.0},
                       {"momentum": None}], [3, 1, 1, 1, 2])


def _affine(rng: np.random.Generator, name: str = "affine") -> dict:
    return {name: bool(rng.random() < 0.7), "bias": bool(rng.random() < 0.8)}


def _batch_shape(rng: np.random.Generator, ranks: tuple[int, ...]) -> tuple[int, ...]:
    rank = int(_pick(rng, ranks))
    budget = _budget(rng)
    shape = _dims(rng, rank, budget)
    shape[1] = max(shape[1], 1)  # the layers need a channel
    return tuple(_grow(rng, shape, budget, {1}))


def _draw_batch(ranks: tuple[int, ...], extra: Callable | None = None) -> Callable:
    """BatchNorm-like ``(C, eps, momentum, affine, track_running_stats, bias)`` + ``extra``."""

    def draw(rng: np.random.Generator) -> tuple[tuple, dict, tuple]:
        shape = _batch_shape(rng, ranks)
        kwargs = {**_eps(rng), **_momentum(rng), **_affine(rng),
                  "track_running_stats": bool(rng.random() < 0.75)}
        if extra is not None:
            kwargs.update(extra(rng))
        return (shape[1],), kwargs, shape

    return draw


def _draw_instance(spatial: int) -> Callable:
    def draw(rng: np.random.Generator) -> tuple[tuple, dict, tuple]:
        shape = _batch_shape(rng, (spatial + 2,))
        if rng.random() < 0.2:
            shape = shape[1:]  # unbatched [C, *S]
        kwargs = {**_eps(rng), **_momentum(rng), **_affine(rng),
                  "track_running_stats": bool(rng.random() < 0.5)}
        return (shape[1] if len(shape) == spatial + 2 else shape[0],), kwargs, shape

    return draw


def _act(rng: np.random.Generator) -> dict:
    return {"act": _pick(rng, ["relu", "leaky_relu", "silu", "gelu", "identity"]),
            "slope": _pick(rng, [0.01, 0.2])}


def _draw_group(act: bool) -> Callable:
    def draw(rng: np.random.Generator) -> tuple[tuple, dict, tuple]:
        groups = int(rng.integers(1, 5))
        budget = _budget(rng)
        shape = _dims(rng, int(rng.integers(2, 6)), budget)
        shape[1] = groups * int(_pick(rng, [1, 1, 2, 3, 4]))
        shape = _grow(rng, shape, budget, {1})
        kwargs = {**_eps(rng), **_affine(rng), **(_act(rng) if act else {})}
        return (groups, shape[1]), kwargs, tuple(shape)

    return draw


def _draw_trailing(kind: str) -> Callable:
    """LayerNorm / RMSNorm / LayerNormAct over the last 1-3 dims of a rank 1-4 input."""

    def draw(rng: np.random.Generator) -> tuple[tuple, dict, tuple]:
        budget = _budget(rng)
        shape = _dims(rng, int(rng.integers(1, 5)), budget)
        k = int(rng.integers(1, min(len(shape), 3) + 1))
        shape = _grow(rng, shape, budget, set())
        normalized = tuple(shape[len(shape) - k:])
        if kind == "rms":
            eps = _pick(rng, [{"eps": None}, {}, {"eps": 1e-3}, {"eps": 1e-10}], [2, 1, 1, 1])
            kwargs = {**eps, "elementwise_affine": bool(rng.random() < 0.7)}
        else:
            kwargs = {**_eps(rng), **_affine(rng, "elementwise_affine")}
            if kind == "act":
                kwargs.update(_act(rng))
        args = normalized if len(normalized) > 1 or rng.random() < 0.5 else normalized[0]
        return (args,), kwargs, tuple(shape)

    return draw


def _renorm(rng: np.random.Generator) -> dict:
    return {"rmax": _pick(rng, [1.0, 1.5, 3.0]), "dmax": _pick(rng, [0.0, 0.5, 5.0])}


def _ghost(rng: np.random.Generator) -> dict:
    return {"virtual_batch_size": int(rng.integers(1, 5)),
            "running_update": _pick(rng, ["mean", "sequential"])}


def _abn(rng: np.random.Generator) -> dict:
    return {"activation": _pick(rng, ["leaky_relu", "elu", "identity"]),
            "activation_param": _pick(rng, [0.01, 0.5, 1.0]),
            "inplace": bool(rng.random() < 0.5)}


def _draw_frozen(ranks: tuple[int, ...]) -> Callable:
    def draw(rng: np.random.Generator) -> tuple[tuple, dict, tuple]:
        shape = _batch_shape(rng, ranks)
        act = _pick(rng, [{}, {"act": "relu"}, {"act": "leaky_relu", "slope": 0.2}], [3, 1, 1])
        return (shape[1],), {**_eps(rng), **act}, shape

    return draw


# --------------------------------------------------------------------------------------------
# The references (NumPy float64), one per family of layers
# --------------------------------------------------------------------------------------------

State = dict[str, np.ndarray | None]  # a layer's state dict, in float64
# ``reference(case, state, x, eps)``: the output (before the activation) and the updated
# running statistics from ``normlab.reference`` / ``reference_variants`` for one step of
# ``case`` from ``state`` on ``x``. Each row of :data:`SPECS` names its layer's.
Reference = Callable[[Case, State, np.ndarray, float], dict[str, np.ndarray]]


def _np(t: Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().double().numpy().copy()


def _batch_norm_reference(case: Case, state: State, x: np.ndarray,
                          eps: float) -> dict[str, np.ndarray]:
    w, b = state.get("weight"), state.get("bias")
    rm, rvar = state.get("running_mean"), state.get("running_var")
    if not case.train and rm is not None:
        return {"y": ref.batch_norm_eval(x, rm, rvar, w, b, eps)}
    out = {"y": ref.batch_norm_forward(x, w, b, eps)}
    if case.train and rm is not None:
        mean, var, count = ref.batch_stats(x)
        out["running_mean"], out["running_var"], _ = ref.update_running_stats(
            rm, rvar, mean, var, count, case.kwargs.get("momentum", 0.1),
            int(state["num_batches_tracked"]))
    return out


def _batch_renorm_reference(case: Case, state: State, x: np.ndarray,
                            eps: float) -> dict[str, np.ndarray]:
    """Batch Renorm in training with running statistics; else BatchNorm's."""
    rm, kw = state.get("running_mean"), case.kwargs
    if not case.train or rm is None:
        return _batch_norm_reference(case, state, x, eps)
    momentum = kw.get("momentum", 0.1)
    m = momentum if momentum is not None else 1 / (int(state["num_batches_tracked"]) + 1)
    y, mean, var = rv.batch_renorm_forward(x, rm, state.get("running_var"), state.get("weight"),
                                           state.get("bias"), kw["rmax"], kw["dmax"], m, eps)
    return {"y": y, "running_mean": mean, "running_var": var}


def _ghost_batch_norm_reference(case: Case, state: State, x: np.ndarray,
                                eps: float) -> dict[str, np.ndarray]:
    """Ghost BatchNorm in training on more than one virtual batch; else BatchNorm's."""
    kw = case.kwargs
    size, momentum = kw["virtual_batch_size"], kw.get("momentum", 0.1)
    if not case.train or x.shape[0] <= size:
        return _batch_norm_reference(case, state, x, eps)
    out = {"y": rv.ghost_batch_norm_forward(x, size, state.get("weight"), state.get("bias"),
                                            eps)}
    rm, rvar = state.get("running_mean"), state.get("running_var")
    if rm is not None and momentum is not None:
        out["running_mean"], out["running_var"] = rv.ghost_update_running_stats(
            x, size, rm, rvar, momentum, kw["running_update"])
    return out


def _frozen_batch_norm_reference(case: Case, state: State, x: np.ndarray,
                                 eps: float) -> dict[str, np.ndarray]:
    w, b = state.get("weight"), state.get("bias")
    ones = np.ones(case.args[0])
    return {"y": rv.frozen_batch_norm(x, ones if w is None else w, 0 * ones if b is None else b,
                                      state.get("running_mean"), state.get("running_var"), eps)}


def _instance_norm_reference(spatial: int, case: Case, state: State, x: np.ndarray,
                             eps: float) -> dict[str, np.ndarray]:
    """InstanceNorm{spatial}d: its input without the batch dimension has ``spatial + 1`` dims."""
    w, b = state.get("weight"), state.get("bias")
    rm, rvar = state.get("running_mean"), state.get("running_var")
    batched = x if x.ndim == spatial + 2 else x[None]
    out: dict[str, np.ndarray] = {}
    if not case.train and rm is not None:
        y = ref.batch_norm_eval(batched, rm, rvar, w, b, eps)
    else:
        y = ref.instance_norm_forward(batched, w, b, eps)
        if rm is not None:
            out["running_mean"], out["running_var"] = ref.instance_norm_update_running_stats(
                rm, rvar, batched, case.kwargs.get("momentum", 0.1))
    out["y"] = y.reshape(x.shape)
    return out


def _group_norm_reference(case: Case, state: State, x: np.ndarray,
                          eps: float) -> dict[str, np.ndarray]:
    return {"y": ref.group_norm_forward(x, case.args[0], state.get("weight"), state.get("bias"),
                                        eps)}


def _layer_norm_reference(case: Case, state: State, x: np.ndarray,
                          eps: float) -> dict[str, np.ndarray]:
    return {"y": ref.layer_norm_forward(x, case.args[0], state.get("weight"), state.get("bias"),
                                        eps)}


def _rms_norm_reference(case: Case, state: State, x: np.ndarray,
                        eps: float) -> dict[str, np.ndarray]:
    return {"y": ref.rms_norm_forward(x, case.args[0], state.get("weight"), eps)}


# --------------------------------------------------------------------------------------------
# Torch twins: torch.nn's layer, or a composition of torch ops for the variants
# --------------------------------------------------------------------------------------------


class _TorchBN(nn.modules.batchnorm._BatchNorm):
    """torch's BatchNorm for any rank (InPlaceABN takes 2-D to 5-D input)."""

    def _check_input_dim(self, input: Tensor) -> None:
        pass


class _TorchFrozen(_TorchBN):
    """FrozenBatchNorm: eval BatchNorm on the buffers, in train and eval alike; buffers of
    another dtype are cast as torchvision's FrozenBatchNorm2d promotes them (to float32 for
    half input, the mixed precision torch's batch_norm takes)."""

    def forward(self, x: Tensor) -> Tensor:
        work = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        if self.running_mean.dtype == x.dtype:
            work = x.dtype
        stats = [t.to(work) for t in (self.running_mean, self.running_var, self.weight,
                                      self.bias)]
        return TF.batch_norm(x, *stats[:2], *stats[2:], False, 0.0, self.eps)


def _factor(bn: _TorchBN) -> float:
    """Count a training batch and return its weight in the running average (torch's rule)."""
    bn.num_batches_tracked.add_(1)
    return 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum


class _TorchRenorm(_TorchBN):
    """Batch Renorm: torch's batch_norm with ``weight * r`` and ``weight * d + bias``."""

    def __init__(self, *args: Any, rmax: float, dmax: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rmax, self.dmax = rmax, dmax

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.running_mean is None:
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        with torch.no_grad():
            work = torch.float64 if x.dtype == torch.float64 else torch.float32
            var_b, mean_b = torch.var_mean(x.detach().to(work), dim=dims, correction=0)
            sigma = torch.sqrt(self.running_var.to(work) + self.eps)
            r = (torch.sqrt(var_b + self.eps) / sigma).clamp(1 / self.rmax, self.rmax)
            d = ((mean_b - self.running_mean.to(work)) / sigma).clamp(-self.dmax, self.dmax)
        if x.numel() // x.shape[1] <= 1:  # torch's own complaint, before any state moves
            return super().forward(x)
        weight = self.weight
        if weight is None:
            weight = torch.ones_like(r, dtype=self.running_mean.dtype)
        bias = weight * d.to(weight.dtype)
        if self.bias is not None:
            bias = bias + self.bias
        return TF.batch_norm(x, self.running_mean, self.running_var, weight * r.to(weight.dtype),
                             bias, True, _factor(self), self.eps)


class _TorchGhost(_TorchBN):
    """Ghost BatchNorm: torch's batch_norm on each virtual batch."""

    def __init__(self, *args: Any, virtual_batch_size: int, running_update: str,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.virtual_batch_size, self.running_update = virtual_batch_size, running_update

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or x.shape[0] <= self.virtual_batch_size:
            return super().forward(x)
        chunks = x.split(self.virtual_batch_size)
        if self.running_update == "sequential" or not self.track_running_stats:
            return torch.cat([super(_TorchGhost, self).forward(c) for c in chunks])
        # torch's checks of the running buffers (their dtype), as the plain layer has them.
        TF.batch_norm(chunks[0].detach(), self.running_mean.clone(), self.running_var.clone(),
                      self.weight, self.bias, True, 0.0, self.eps)
        outs = [TF.batch_norm(c, None, None, self.weight, self.bias, True, 0.0, self.eps)
                for c in chunks]
        with torch.no_grad():
            work = torch.float64 if x.dtype == torch.float64 else torch.float32
            stats = [torch.var_mean(c.to(work), dim=[0, *range(2, c.dim())]) for c in chunks]
            factor = _factor(self)
            for buffer, value in ((self.running_mean, torch.stack([m for _, m in stats]).mean(0)),
                                  (self.running_var, torch.stack([v for v, _ in stats]).mean(0))):
                buffer.mul_(1 - factor).add_(value * factor)
        return torch.cat(outs)


def _subset(kwargs: dict, *names: str) -> dict:
    return {k: v for k, v in kwargs.items() if k in names}


BN_KWARGS = ("eps", "momentum", "affine", "track_running_stats", "bias")


def _plain_twin(case: Case) -> nn.Module:
    return getattr(nn, case.layer)(*case.args, **case.kwargs)


def _bn_twin(cls: type[_TorchBN], *names: str) -> Callable[[Case], nn.Module]:
    def twin(case: Case) -> nn.Module:
        return cls(*case.args, **_subset(case.kwargs, *BN_KWARGS),
                   **_subset(case.kwargs, *names))

    return twin


def _norm_twin(cls: type[nn.Module], *names: str) -> Callable[[Case], nn.Module]:
    return lambda case: cls(*case.args, **_subset(case.kwargs, *names))


@dataclass(frozen=True)
class Spec:
    """How to draw a layer's configuration, the NumPy reference that computes it and how to
    build its torch twin; ``family`` names the kind of statistics (for the rounding model
    and torch's quirks)."""

    family: str
    draw: Callable[[np.random.Generator], tuple[tuple, dict, tuple]]
    reference: Reference
    twin: Callable[[Case], nn.Module] = _plain_twin


SPECS: dict[str, Spec] = {
    # torch.nn has these
    "BatchNorm1d": Spec("batch", _draw_batch((2, 3)), _batch_norm_reference),
    "BatchNorm2d": Spec("batch", _draw_batch((4,)), _batch_norm_reference),
    "BatchNorm3d": Spec("batch", _draw_batch((5,)), _batch_norm_reference),
    "InstanceNorm1d": Spec("instance", _draw_instance(1), partial(_instance_norm_reference, 1)),
    "InstanceNorm2d": Spec("instance", _draw_instance(2), partial(_instance_norm_reference, 2)),
    "InstanceNorm3d": Spec("instance", _draw_instance(3), partial(_instance_norm_reference, 3)),
    "GroupNorm": Spec("group", _draw_group(act=False), _group_norm_reference),
    "LayerNorm": Spec("layer", _draw_trailing("layer"), _layer_norm_reference),
    "RMSNorm": Spec("rms", _draw_trailing("rms"), _rms_norm_reference),
    # the variants, against torch compositions
    "BatchNormAct1d": Spec("batch", _draw_batch((2, 3), _act), _batch_norm_reference,
                           _bn_twin(_TorchBN)),
    "BatchNormAct2d": Spec("batch", _draw_batch((4,), _act), _batch_norm_reference,
                           _bn_twin(_TorchBN)),
    "BatchNormAct3d": Spec("batch", _draw_batch((5,), _act), _batch_norm_reference,
                           _bn_twin(_TorchBN)),
    "GroupNormAct": Spec("group", _draw_group(act=True), _group_norm_reference,
                         _norm_twin(nn.GroupNorm, "eps", "affine", "bias")),
    "LayerNormAct": Spec("layer", _draw_trailing("act"), _layer_norm_reference,
                         _norm_twin(nn.LayerNorm, "eps", "elementwise_affine", "bias")),
    "InPlaceABN": Spec("batch", _draw_batch((2, 3, 4, 5), _abn), _batch_norm_reference,
                       _bn_twin(_TorchBN)),
    "FrozenBatchNorm1d": Spec("frozen", _draw_frozen((2, 3)), _frozen_batch_norm_reference,
                              _bn_twin(_TorchFrozen)),
    "FrozenBatchNorm2d": Spec("frozen", _draw_frozen((4,)), _frozen_batch_norm_reference,
                              _bn_twin(_TorchFrozen)),
    "FrozenBatchNorm3d": Spec("frozen", _draw_frozen((5,)), _frozen_batch_norm_reference,
                              _bn_twin(_TorchFrozen)),
    "BatchRenorm1d": Spec("renorm", _draw_batch((2, 3), _renorm), _batch_renorm_reference,
                          _bn_twin(_TorchRenorm, "rmax", "dmax")),
    "BatchRenorm2d": Spec("renorm", _draw_batch((4,), _renorm), _batch_renorm_reference,
                          _bn_twin(_TorchRenorm, "rmax", "dmax")),
    "BatchRenorm3d": Spec("renorm", _draw_batch((5,), _renorm), _batch_renorm_reference,
                          _bn_twin(_TorchRenorm, "rmax", "dmax")),
    "GhostBatchNorm1d": Spec("ghost", _draw_batch((2, 3), _ghost), _ghost_batch_norm_reference,
                             _bn_twin(_TorchGhost, "virtual_batch_size", "running_update")),
    "GhostBatchNorm2d": Spec("ghost", _draw_batch((4,), _ghost), _ghost_batch_norm_reference,
                             _bn_twin(_TorchGhost, "virtual_batch_size", "running_update")),
}
TWINNED = tuple(SPECS)[:9]
# Each torch.nn twin twice as often as a variant in the fast slice.
ROTATION = (*TWINNED, *SPECS)


def _layout(rng: np.random.Generator, rank: int) -> str:
    options = [lay for lay in LAYOUTS if lay != "channels_last" or rank in (4, 5)]
    return _pick(rng, options, [4 if lay == "contiguous" else 2 for lay in options])


def random_case(rng: np.random.Generator, layer: str | None = None, seed: int = 0) -> Case:
    """A random configuration of ``layer`` (any layer when ``None``)."""
    layer = layer or _pick(rng, tuple(SPECS))
    args, kwargs, shape = SPECS[layer].draw(rng)
    dtype = _pick(rng, list(DTYPES), [4, 2, 2, 2])
    if rng.random() < 0.08:  # a mix torch may refuse, and then normlab must refuse it too
        param_dtype = _pick(rng, [d for d in DTYPES if d != dtype])
    else:
        param_dtype = _pick(rng, ["float32", dtype]) if dtype in ("bfloat16", "float16") else dtype
    scale, offset = _pick(rng, [(1.0, 0.0), (1e-2, 0.0), (1e2, 0.0), (1.0, 3.0), (0.1, 50.0),
                                (1e-2, 1e3)], [4, 1, 1, 2, 1, 1])
    return Case(
        layer=layer, args=args, kwargs=kwargs, shape=shape, dtype=dtype,
        param_dtype=param_dtype, layout=_layout(rng, len(shape)),
        layout_arg=int(rng.integers(0, 1 << 16)), train=bool(rng.random() < 0.6),
        x_grad=bool(rng.random() < 0.75), param_grad=bool(rng.random() < 0.6),
        scale=scale, offset=offset, poison=_pick(rng, ["", "nan", "inf"], [30, 1, 1]), seed=seed,
    )


def generate_cases(seed: int, count: int) -> list[Case]:
    """``count`` cases: case ``i`` from the generator seeded ``(seed, i)``, the layer in
    turn from :data:`ROTATION` so that every layer gets its share of a short run."""
    return [
        random_case(np.random.default_rng([seed, i]), ROTATION[i % len(ROTATION)],
                    seed=seed * 1_000_000 + i)
        for i in range(count)
    ]


# --------------------------------------------------------------------------------------------
# Inputs and state
# --------------------------------------------------------------------------------------------


def make_input(case: Case, gen: torch.Generator) -> Tensor:
    """The input in the case's dtype and layout (values ``randn * scale + offset``)."""
    dtype, shape, rank = DTYPES[case.dtype], case.shape, len(case.shape)

    def values(size: tuple[int, ...]) -> Tensor:
        x = torch.randn(size, generator=gen, dtype=torch.float64) * case.scale + case.offset
        if case.poison and x.numel():
            x.view(-1)[case.layout_arg % x.numel()] = float(case.poison)
        return x.to(dtype)

    if case.layout == "channels_last":
        fmt = torch.channels_last if rank == 4 else torch.channels_last_3d
        return values(shape).to(memory_format=fmt)
    if case.layout == "transposed" and rank > 1:
        perm = list(np.random.default_rng(case.layout_arg).permutation(rank))
        if perm == sorted(perm):
            perm = perm[1:] + perm[:1]
        base = values(tuple(shape[p] for p in perm))
        return base.permute(*np.argsort(perm).tolist())
    if case.layout == "expanded" and rank > 0:
        dim = case.layout_arg % rank
        one = values(tuple(1 if i == dim else s for i, s in enumerate(shape)))
        return one.expand(shape)
    if case.layout == "offset":
        k = 1 + case.layout_arg % 7
        return values((math.prod(shape) + k,))[k:].view(shape)
    return values(shape)


def randomize_state(layer: nn.Module, case: Case, gen: torch.Generator) -> None:
    """Weights away from zero (InPlaceABN divides by them), running statistics near the
    data's, a few batches already tracked (for ``momentum=None``)."""
    tensors = {**dict(layer.named_parameters()), **dict(layer.named_buffers())}
    with torch.no_grad():
        for name, t in tensors.items():
            if t is None:
                continue
            size = t.shape
            if name == "num_batches_tracked":
                value = torch.randint(0, 4, size, generator=gen)
            elif name == "weight":
                sign = torch.randint(0, 2, size, generator=gen) * 2 - 1
                value = sign * (torch.rand(size, generator=gen) + 0.5)
            elif name == "bias":
                value = torch.randn(size, generator=gen) * 0.5
            elif name == "running_mean":
                value = torch.randn(size, generator=gen) * case.scale * 0.5 + case.offset
            else:  # running_var
                value = (torch.rand(size, generator=gen) * 1.8 + 0.2) * case.scale**2
            t.copy_(value)


def _act_of(case: Case) -> tuple[str, float]:
    """The activation a layer applies after the norm, and its parameter."""
    if "act" in case.kwargs:
        return case.kwargs["act"], case.kwargs.get("slope", 0.01)
    if "activation" in case.kwargs:
        return case.kwargs["activation"], case.kwargs["activation_param"]
    return "identity", 0.0


def _activation(name: str, param: float) -> Callable[[Tensor], Tensor]:
    return {
        "identity": lambda v: v,
        "relu": torch.relu,
        "leaky_relu": lambda v: TF.leaky_relu(v, param),
        "elu": lambda v: TF.elu(v, param),
        "silu": TF.silu,
        "gelu": TF.gelu,
    }[name]


def _branches(name: str, param: float, positive: Tensor) -> Callable[[Tensor], Tensor]:
    """The activation with the branch of each element fixed by ``positive`` (normlab's own
    output > 0): the truth then differentiates the same branch normlab took, so rounding
    that lands a pre-activation on the other side of the kink is not an error."""
    if name not in ("relu", "leaky_relu", "elu"):
        return _activation(name, param)
    negative = {"relu": torch.zeros_like, "leaky_relu": lambda v: v * param,
                "elu": lambda v: torch.expm1(v) * param}[name]
    return lambda v: torch.where(positive.to(v.device), v, negative(v))


# --------------------------------------------------------------------------------------------
# Running one layer
# --------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    error: BaseException | None = None
    values: dict[str, Tensor | None] = field(default_factory=dict)


def run_layer(layer: nn.Module, post: Callable[[Tensor], Tensor], x: Tensor, dy: Tensor,
              case: Case, grad_params: set[str]) -> Outcome:
    """One forward (and backward, if anything requires grad) of ``post(layer(x))``."""
    layer.train(case.train)
    for name, p in layer.named_parameters():
        p.requires_grad_(case.param_grad and name in grad_params)
        p.grad = None
    xin = x.detach().requires_grad_(case.x_grad)
    # In-place ABN writes over its input: give it a copy (non-leaf, so autograd allows it).
    feed = xin.clone() if case.kwargs.get("inplace") else xin
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            y = post(layer(feed))
            if y.requires_grad:
                y.backward(dy.to(y.dtype))
    except Exception as exc:  # compared with the twin's outcome
        return Outcome(error=exc)
    values: dict[str, Tensor | None] = {"y": y.detach(), "dx": xin.grad}
    params = dict(layer.named_parameters())
    for name in ("weight", "bias"):
        p = params.get(name)
        values["d" + name] = None if p is None or p.grad is None else p.grad.detach()
    for name, buf in layer.named_buffers():
        if name.startswith(("running", "num_batches")):
            values[name] = buf.detach().clone()
    return Outcome(values=values)


def _twin_input(case: Case, x: Tensor) -> Tensor:
    """The input for torch's layer. torch 2.13's CPU group_norm backward crashes (SIGSEGV)
    on a non-contiguous input that does not require grad while weight/bias do: give torch a
    contiguous copy there (the values are the same)."""
    if SPECS[case.layer].family == "group" and not case.x_grad and case.param_grad:
        return x.contiguous()
    return x


# --------------------------------------------------------------------------------------------
# Comparing
# --------------------------------------------------------------------------------------------


def _perturbed(case: Case, t: Tensor) -> Tensor:
    """``t`` with each value moved by one unit in the last place of the dtype the case
    computes in (float32 for half input), away from the mean: the worst case of rounding
    before a subtraction of the mean (random moves would average out in the sums)."""
    eps = torch.finfo(torch.float64 if case.dtype == "float64" else torch.float32).eps
    finite = torch.isfinite(t)
    if not finite.any():
        return t
    return t + eps * t.abs() * torch.sign(t - t[finite].mean())


def _rows(case: Case, x: np.ndarray) -> list[np.ndarray]:
    """The groups of values that share statistics, as rows of 2-D arrays."""
    family, kw = SPECS[case.layer].family, case.kwargs
    if family == "instance":
        return [x.reshape(-1, math.prod(x.shape[x.ndim - int(case.layer[-2]):]))]
    if family == "group":
        return [x.reshape(x.shape[0] * case.args[0], -1)]
    if family in ("layer", "rms"):
        d = math.prod(_normalized(case))
        return [x.reshape(-1, d)]
    chunks = [x]
    if family == "ghost" and case.train and x.shape[0] > kw["virtual_batch_size"]:
        chunks = np.split(x, range(kw["virtual_batch_size"], x.shape[0],
                                   kw["virtual_batch_size"]))
    return [np.moveaxis(c, 1, 0).reshape(x.shape[1], -1) for c in chunks]


def _normalized(case: Case) -> tuple[int, ...]:
    shape = case.args[0]
    return tuple(shape) if isinstance(shape, tuple) else (shape,)


def natural_errors(case: Case, state: dict[str, np.ndarray | None], x: np.ndarray,
                   dy: np.ndarray, eps: float) -> dict[str, float]:
    """What rounding the terms of each quantity costs: an algorithm that rounds them in
    the compute dtype (``x * rstd - mean * rstd`` for ``(x - mean) * rstd``, a sum of
    ``n`` values) is off by a few of its units times the terms' size and ``log2(n)``.

    A group of one value is exact in the compute dtype (``x - mean`` is 0, so ``xhat`` and
    the input gradient are 0, as torch has them): there only the float64 truth's own
    rounding counts (it is not always exactly 0 either). RMSNorm has no such groups."""
    x = np.where(np.isfinite(x), x, 0.0)  # a poisoned value has no rounding to speak of
    if x.size == 0:
        return dict.fromkeys(QUANTITIES, 0.0)
    w, rm, rvar = state.get("weight"), state.get("running_mean"), state.get("running_var")
    family = SPECS[case.layer].family
    center = family != "rms"
    if rvar is not None and (family == "frozen" or not case.train):
        rstd = {True: 1 / np.sqrt(rvar + eps)}
        count = x.size // x.shape[1]
    else:
        rows = _rows(case, x)
        count = max(r.shape[1] for r in rows)
        rstd = {
            single: np.concatenate([
                1 / np.sqrt((r.var(axis=1) if center else (r * r).mean(axis=1)) + eps)
                for r in rows if single or not center or r.shape[1] > 1] or [np.zeros(0)])
            for single in (True, False)
        }
    x_max = float(np.abs(x).max()) + (float(np.abs(rm).max()) if rm is not None else 0.0)
    w_max = 1.0 if w is None else float(np.abs(w).max(initial=1.0))
    b_max = 0.0 if state.get("bias") is None else float(np.abs(state["bias"]).max(initial=0))
    dy_max = float(np.abs(dy).max())
    per_param = x.size / (w.size if w is not None and w.size else 1)
    var_term = x_max * float(np.sqrt(x.var())) + (0.0 if rvar is None else float(rvar.max()))

    def scales(rstd: np.ndarray) -> dict[str, float]:
        rstd_max = float(rstd.max(initial=0.0)) * case.kwargs.get("rmax", 1.0)
        a = x_max * rstd_max + 1  # bounds |x * rstd| and |mean * rstd|
        return {"y": w_max * a + b_max, "dx": dy_max * w_max * rstd_max * a,
                "dweight": per_param * dy_max * a, "dbias": per_param * dy_max,
                "running_mean": x_max, "running_var": var_term}

    compute = torch.finfo(torch.float64 if case.dtype == "float64" else torch.float32).eps
    low, every = scales(rstd.get(False, rstd[True])), scales(rstd[True])
    growth = NATURAL_ULPS * (1 + math.log2(max(count, 1)))
    return {q: growth * (compute * low[q] + torch.finfo(torch.float64).eps * every[q])
            for q in QUANTITIES}


def _compare(what: str, ours: Tensor, theirs: Tensor, truth: Tensor, near: Tensor,
             input_dtype: torch.dtype, natural: float, poisoned: bool) -> str | None:
    """``None`` if ``ours`` is as close to ``truth`` as allowed, else the reason: ``K``
    times the larger of torch's error and the truth's own sensitivity (``near``: the truth
    of a perturbed input), plus a few units in the last place of the result's dtype (of
    the input's for the output and the gradients: they pass through it) times the largest
    value, plus the ``natural`` error of rounding its terms (:func:`natural_errors`). Only
    where the truth is finite (torch gives NaN for some empty reductions that are 0).

    With a NaN/inf in the input, the output is NaN/inf where torch's is, the gradients at
    least there, and the running statistics stay finite (normlab keeps the last finite
    values)."""
    if ours.shape != truth.shape:
        return f"{what}: shape {tuple(ours.shape)}, torch {tuple(truth.shape)}"
    if ours.dtype != theirs.dtype:
        return f"{what}: dtype {ours.dtype}, torch {theirs.dtype}"
    if ours.numel() == 0:
        return None
    o, t, e = ours.double(), theirs.double(), truth.double()
    if poisoned and what.startswith("running"):
        if not torch.isfinite(o).all():
            return f"{what}: a non-finite batch reached the running statistics"
    elif poisoned:
        # The output as torch's; a gradient may be NaN where torch's activation derivative
        # at NaN happens to be finite, but must not hide one of torch's NaNs.
        bad_o, bad_t = ~torch.isfinite(o), ~torch.isfinite(t)
        if (not torch.equal(bad_o, bad_t)) if what == "y" else bool((bad_t & ~bad_o).any()):
            return (f"{what}: {int(bad_o.sum())} non-finite values, torch has "
                    f"{int(bad_t.sum())} (not at the same places)")
    # Where the exact value overflows the result's dtype, inf is the right answer.
    usable = (e.abs() <= torch.finfo(ours.dtype).max) & torch.isfinite(t)
    if not usable.any():
        return None
    if not torch.isfinite(o[usable]).all():
        return f"{what}: non-finite values where torch and the truth are finite"
    err_ours = (o - e)[usable].abs().max().item()
    err_torch = (t - e)[usable].abs().max().item()
    sensitivity = (near.double() - e)[usable].abs().nan_to_num(0.0).max().item()
    magnitude = e[usable].abs().max().item()
    ulp = torch.finfo(ours.dtype).eps
    if not what.startswith("running"):
        ulp = max(ulp, torch.finfo(input_dtype).eps)
    tol = K * max(err_torch, sensitivity) + FLOOR_ULPS * ulp * magnitude + natural
    if err_ours <= tol:
        return None
    where = int(((o - e).abs() * usable).flatten().argmax())
    return (f"{what}: max error {err_ours:.3g} vs the float64 truth > tolerance {tol:.3g} "
            f"(torch's error {err_torch:.3g}, sensitivity {sensitivity:.3g}, max |truth| "
            f"{magnitude:.3g}); worst at flat index {where}: ours {o.flatten()[where].item():.8g}, "
            f"torch {t.flatten()[where].item():.8g}, truth {e.flatten()[where].item():.8g}")


def _torch_may_refuse(case: Case, exc: BaseException) -> bool:
    """Where normlab runs on purpose though torch raises (README, "differs from torch")."""
    return (SPECS[case.layer].family == "instance" and case.kwargs.get("affine")
            and 0 in case.shape and isinstance(exc, IndexError))


# --------------------------------------------------------------------------------------------
# The reference, checked against the float64 truth
# --------------------------------------------------------------------------------------------


def _check_reference(case: Case, state: dict[str, np.ndarray | None], x: Tensor,
                     pre: Tensor, truth: Outcome, eps: float, natural: dict[str, float]
                     ) -> None:
    """The float64 truth (torch) and the NumPy reference agree: the twin is the right one.
    ``natural``: the rounding allowed (torch's float64 is not exact either)."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):  # a poisoned input
        expected = SPECS[case.layer].reference(case, state, _np(x), eps)
    got = {"y": pre, **{k: truth.values.get(k) for k in ("running_mean", "running_var")}}
    for key, value in expected.items():
        actual = _np(got[key])
        scale = max(float(np.abs(value[np.isfinite(value)]).max(initial=0.0)), 1.0)
        np.testing.assert_allclose(actual, value, rtol=1e-7, atol=1e-9 * scale + natural[key],
                                   err_msg=f"{key}: the float64 truth vs normlab.reference")


# --------------------------------------------------------------------------------------------
# The runner
# --------------------------------------------------------------------------------------------


def build(case: Case) -> tuple[nn.Module, nn.Module, nn.Module]:
    """normlab's layer with random state, its torch twin and the twin in float64."""
    pdt = DTYPES[case.param_dtype]
    ours = getattr(normlab, case.layer)(*case.args, **case.kwargs, dtype=pdt)
    randomize_state(ours, case, torch.Generator().manual_seed(case.seed))
    twin = SPECS[case.layer].twin(case).to(pdt)
    twin.load_state_dict(ours.state_dict())
    truth = copy.deepcopy(twin).double()
    if case.layer == "RMSNorm" and ours.eps is None:
        # torch's default: the eps of the dtype it computes in (float32 for half input).
        compute = torch.float64 if case.dtype == "float64" else torch.float32
        truth.eps = torch.finfo(compute).eps
    return ours, twin, truth


def check_case(case: Case, backend: str) -> None:
    """Run ``case`` on ``backend``; raise AssertionError (with the repro) on a mismatch."""
    try:
        _check_case(case, backend)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n  reproduce: {case.repro(backend)}") from None


def _check_case(case: Case, backend: str) -> None:
    ours, twin, truth = build(case)
    truth_start = copy.deepcopy(truth)
    grad_params = {name for name, _ in ours.named_parameters()}
    gen = torch.Generator().manual_seed(case.seed + 1)
    x = make_input(case, gen)
    dy = (torch.randn(case.shape, generator=gen, dtype=torch.float64)).to(DTYPES[case.dtype])
    x_before = x.clone()
    state = {k: _np(v) for k, v in ours.state_dict().items()}
    act, param = _act_of(case)

    with normlab.use_backend(backend):
        got = run_layer(ours, _activation("identity", 0.0), x, dy, case, grad_params)
    assert torch.allclose(x, x_before, rtol=0, atol=0, equal_nan=True), (
        "normlab modified its input")
    theirs = run_layer(twin, _activation(act, param), _twin_input(case, x), dy, case, grad_params)

    if theirs.error is not None:
        if got.error is None:
            assert _torch_may_refuse(case, theirs.error), (
                f"torch raises {theirs.error!r} but normlab runs")
        return
    assert got.error is None, f"torch runs but normlab raises {got.error!r}"

    # The truth: float64, the activation's branches as normlab took them.
    positive = got.values["y"] > 0
    x64 = x.double().contiguous()
    pre: list[Tensor] = []

    def post(v: Tensor) -> Tensor:
        pre.append(v.detach())
        return _branches(act, param, positive)(v)

    exact = run_layer(truth, post, x64, dy.double(), case, grad_params)
    assert exact.error is None, f"torch runs in {case.dtype} but not in float64: {exact.error!r}"
    # How much the truth moves when x and dy move by one rounding of the compute dtype:
    # what any algorithm working in that dtype may be off by (a large mean, a tiny variance).
    x_near, dy_near = _perturbed(case, x64), _perturbed(case, dy.double())
    near = run_layer(copy.deepcopy(truth_start), post, x_near, dy_near, case, grad_params)

    natural = natural_errors(case, state, _np(x64), _np(dy), float(truth.eps))
    if x.numel():
        _check_reference(case, state, x64, pre[0], exact, float(truth.eps), natural)
    problems = _differences(case, got, theirs, exact, near, natural)
    assert not problems, "; ".join(problems)


def _differences(case: Case, got: Outcome, theirs: Outcome, exact: Outcome, near: Outcome,
                 natural: dict[str, float]) -> list[str]:
    """What is wrong with normlab's outcome ``got``, next to torch's and the truth's."""
    problems = []
    for fmt in (torch.channels_last, torch.channels_last_3d):
        theirs_y, ours_y = theirs.values["y"], got.values["y"]
        rank = 4 if fmt == torch.channels_last else 5
        if (case.layer in TWINNED and ours_y.dim() == theirs_y.dim() == rank
                and not theirs_y.is_contiguous()
                and theirs_y.is_contiguous(memory_format=fmt)
                and not ours_y.is_contiguous(memory_format=fmt)):
            problems.append(f"y: torch's output is {fmt}, normlab's is not")
    for key in (*QUANTITIES, "num_batches_tracked"):
        a, b, e = (o.values.get(key) for o in (got, theirs, exact))
        if a is None or b is None:
            if (a is None) != (b is None):
                problems.append(f"{key}: normlab {'has none' if a is None else 'has one'}, "
                                f"torch {'has none' if b is None else 'has one'}")
            continue
        if key == "num_batches_tracked":
            if not torch.equal(a, b):
                problems.append(f"{key}: {int(a)}, torch {int(b)}")
            continue
        problem = _compare(key, a, b, e, near.values[key], DTYPES[case.dtype], natural[key],
                           bool(case.poison))
        if problem:
            problems.append(problem)
    return problems


# --------------------------------------------------------------------------------------------
# Known bugs: each entry names its bug; delete it once the bug is fixed
# --------------------------------------------------------------------------------------------


def _half(dtype: str) -> bool:
    return dtype in ("float16", "bfloat16")


def _mixed(case: Case) -> bool:
    """Parameters in a dtype other than the input's (float32 ones for half input aside)."""
    return case.param_dtype != case.dtype and not (
        _half(case.dtype) and case.param_dtype == "float32")


# Each entry: the bug (with a repro), and which cases it makes fail. Delete it once fixed.
KNOWN_ISSUES: dict[str, Callable[[Case, str], bool]] = {
    # Deliberate, not a bug: normlab refuses parameters of another dtype than the input
    # (TypeError naming the tensor) on every batch; torch skips its check on an empty one.
    # torch.nn.BatchNorm2d(3)(torch.randn(0, 3, 4, 4, dtype=torch.float64)) runs.
    "an empty input with parameters in another dtype: torch runs, normlab refuses the mix "
    "as on any other batch":
        lambda case, backend: 0 in case.shape and _mixed(case),
}


def known_issue(case: Case, backend: str) -> str | None:
    """Why ``case`` is skipped on ``backend`` (a bug of :data:`KNOWN_ISSUES`), or ``None``."""
    for reason, applies in KNOWN_ISSUES.items():
        if applies(case, backend):
            return reason
    return None


# --------------------------------------------------------------------------------------------
# pytest
# --------------------------------------------------------------------------------------------


def _setting(config: pytest.Config, option: str, env: str, default: int) -> int:
    value = config.getoption(option, None)
    if value is None:
        value = os.environ.get(env)
    return default if value is None else int(value)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "case" not in metafunc.fixturenames:
        return
    count = _setting(metafunc.config, "fuzz_cases", "NORMLAB_FUZZ_CASES", FAST_CASES)
    seed = _setting(metafunc.config, "fuzz_seed", "NORMLAB_FUZZ_SEED", 0)
    cases = generate_cases(seed, count)
    metafunc.parametrize("case", cases, ids=[c.id for c in cases])


@pytest.mark.parametrize("fuzz_backend", BACKENDS)
def test_fuzz(case: Case, fuzz_backend: str) -> None:
    reason = known_issue(case, fuzz_backend)
    if reason:
        pytest.skip(reason)
    check_case(case, fuzz_backend)


# The Triton provider runs interpreted here (about 1 ms a launch): the small cases only.
TRITON_MAX_NUMEL = 2048


def test_fuzz_triton(case: Case) -> None:
    """The fast slice's small cases on the Triton provider, under TRITON_INTERPRET=1."""
    from normlab.ops import triton

    if not (triton.installed() and triton.runs_on(torch.empty(0))):
        pytest.skip("triton not installed, or TRITON_INTERPRET=1 not set before its import")
    if math.prod(case.shape) > TRITON_MAX_NUMEL:
        pytest.skip(f"larger than {TRITON_MAX_NUMEL} values: too slow interpreted")
    reason = known_issue(case, "triton")
    if reason:
        pytest.skip(reason)
    check_case(case, "triton")


def test_generator_covers_the_configuration_space() -> None:
    """The fast slice reaches every layer, dtype, layout, mode and an empty input."""
    cases = generate_cases(0, FAST_CASES)
    assert {c.layer for c in cases} == set(SPECS)
    assert {c.dtype for c in cases} == set(DTYPES)
    assert {c.layout for c in cases} == set(LAYOUTS)
    assert {c.train for c in cases} == {True, False}
    assert any(0 in c.shape for c in cases) and any(1 in c.shape for c in cases)
    assert any(math.prod(c.shape) >= LARGE_NUMEL[0] for c in cases)
    assert any(c.kwargs.get("eps", 1) is None for c in cases)
    assert any("momentum" in c.kwargs and c.kwargs["momentum"] is None for c in cases)
    assert {c.poison for c in cases} == {"", "nan", "inf"}
    assert set(BACKENDS) | {"triton"} == set(ops.CHOICES)  # triton: test_fuzz_triton
