"""A normalization followed by an activation, fused into the CPU kernels.

The backend contract of ``normlab.ops`` (``normalize`` / ``normalize_with_stats``) knows no
activation; rather than widen it, this module adds functions beside it that take the
activation as ``(act, slope)``: :func:`batch_norm_act`, :func:`group_norm_act`,
:func:`layer_norm_act`.

- **fused** (backend ``"auto"``/``"cpu"``, contiguous float32/float64 CPU input, ``act``
  one of the kernels' ``relu``/``leaky_relu``; BatchNorm in training with batch
  statistics): BatchNorm runs the cpu backend's one-call train step
  (``normlab.ops.cpu.batch_norm_train``, the one plain BatchNorm runs), GroupNorm and
  LayerNorm its per-row step (``normlab.ops.cpu.rows_norm``), each with the activation as
  a code of the kernels: the forward writes ``act(xhat * w + b)`` while the channel or
  row is still in cache; the backward recomputes the pre-activation from the saved input
  (nothing but ``x`` and the statistics is saved) and applies ``act'`` inside the norm's
  two backward passes. Torch eager runs the norm, then the activation, then both
  backwards: twice the passes over memory and twice the saved tensors.
- **composite** (everything else: backend ``"torch"``, CUDA, half precision, strided
  input, BatchNorm in eval mode, and ``silu``/``gelu``) is ``activation(norm(...))``: the
  norm runs on the selected backend (its own fast path included) and autograd
  differentiates the pair. silu and gelu are left to torch because they need exp/erf,
  which numba evaluates one value at a time (no vector math library): fused, they ran
  3-8x slower than torch's vectorized ones.

The fused path is differentiable once (no double backward); use backend ``"torch"`` for
``gradgradcheck``-style work.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn import functional as TF

from normlab import _checks, ops
from normlab import functional as F

try:  # numba is a dependency, but keep the composite path importable without it
    from normlab.ops import cpu
except ImportError:  # pragma: no cover - exercised only without numba
    cpu = None

__all__ = [
    "ACTIVATIONS",
    "check_activation",
    "activation",
    "batch_norm_act",
    "group_norm_act",
    "layer_norm_act",
    "fused_supported",
    "act_code",
]

ACTIVATIONS = ("relu", "leaky_relu", "silu", "gelu", "identity")
# Below this many elements the fixed cost of the fused path (kernel launch, a custom
# autograd node) exceeds what it saves in memory traffic: use the composite path.
FUSED_MIN_NUMEL = 1 << 16


def check_activation(act: str, slope: float = 0.01) -> tuple[str, float]:
    """Validate an activation name and its ``slope`` (leaky_relu's negative slope)."""
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    if isinstance(slope, bool) or not isinstance(slope, (int, float)) or not math.isfinite(slope):
        raise TypeError(f"slope must be a finite float, got {slope!r}")
    return act, float(slope)


def activation(x: Tensor, act: str, slope: float = 0.01) -> Tensor:
    """``act(x)`` with torch's definitions (gelu is the exact, erf-based one).

    ``act`` is one of :data:`ACTIVATIONS` or ``"elu"`` (for InPlaceABN; there ``slope`` is
    elu's ``alpha``), ``slope`` is leaky_relu's negative slope."""
    if act == "elu":
        return TF.elu(x, slope)
    if act == "relu":
        return torch.relu(x)
    if act == "leaky_relu":
        return TF.leaky_relu(x, slope)
    if act == "silu":
        return TF.silu(x)
    if act == "gelu":
        return TF.gelu(x)
    if act == "identity":
        return x
    raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")


def act_code(act: str) -> int | None:
    """The kernels' code for ``act`` where they fuse it (``relu``, ``leaky_relu``,
    ``identity``), else ``None`` (``silu``, ``gelu``, or no numba)."""
    return None if cpu is None else cpu.ACT_CODES.get(act)


def fused_supported(x: Tensor, backend: str | None = None, act: str = "relu") -> bool:
    """Whether the ``*_norm_act`` functions take the fused kernels for ``x`` and ``act``
    (:func:`batch_norm_act` in training only)."""
    name = backend if backend is not None else ops.requested()
    return (
        cpu is not None
        and name in ("auto", "cpu")
        and act_code(act) is not None
        and x.dtype in (torch.float32, torch.float64)
        and x.dim() >= 2
        and x.numel() >= max(FUSED_MIN_NUMEL, 1)
        and x.is_contiguous()
        and cpu.supports(x)
        and not torch.compiler.is_compiling()
    )


def batch_norm_act(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    act: str = "relu",
    slope: float = 0.01,
    backend: str | None = None,
) -> Tensor:
    """``act(batch_norm(input [N, C, *S], ...))``, same arguments as
    :func:`normlab.functional.batch_norm` plus the activation ``act`` (and leaky_relu's
    ``slope``). Running statistics are updated in place in training, as there."""
    act, slope = check_activation(act, slope)
    if training and fused_supported(input, backend, act):
        # functional.batch_norm's own checks, with its messages, before any buffer changes.
        F._check_per_channel_args(
            input, 2, running_mean, running_var, weight, bias, momentum, eps, None
        )
        _checks.check_values_per_channel(input)
        y = F.train_step(
            cpu, input, running_mean, running_var, weight, bias, momentum, eps,
            cpu.ACT_CODES[act], slope,
        )
        if y is not None:
            return y
    # The composite path, also for parameters of another dtype or layout than the input's.
    y = F.batch_norm(
        input, running_mean, running_var, weight, bias, training, momentum, eps,
        backend=backend,
    )
    return activation(y, act, slope)


def group_norm_act(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    act: str = "relu",
    slope: float = 0.01,
    backend: str | None = None,
) -> Tensor:
    """``act(group_norm(input [N, C, *S], ...))``, same arguments as
    :func:`normlab.functional.group_norm` plus the activation ``act`` (and leaky_relu's
    ``slope``)."""
    act, slope = check_activation(act, slope)
    if act != "identity" and fused_supported(input, backend, act):
        F._check_group_norm_args(input, num_groups, weight, bias, eps)
        y = cpu.rows_norm(
            input, input.shape[0] * num_groups, num_groups, input.shape[1], weight, bias,
            eps, True, cpu.ACT_CODES[act], slope,
        )
        if y is not None:
            return y
    y = F.group_norm(input, num_groups, weight, bias, eps, backend=backend)
    return activation(y, act, slope)


def layer_norm_act(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    act: str = "relu",
    slope: float = 0.01,
    backend: str | None = None,
) -> Tensor:
    """``act(layer_norm(input, normalized_shape, ...))``, same arguments as
    :func:`normlab.functional.layer_norm` plus the activation ``act`` (and leaky_relu's
    ``slope``)."""
    act, slope = check_activation(act, slope)
    if act != "identity" and fused_supported(input, backend, act):
        shape = F._check_layer_norm_args(input, normalized_shape, weight, bias, eps)
        features = math.prod(shape)
        y = cpu.rows_norm(
            input, input.numel() // features, 1, features, weight, bias, eps, True,
            cpu.ACT_CODES[act], slope,
        )
        if y is not None:
            return y
    y = F.layer_norm(input, normalized_shape, weight, bias, eps, backend=backend)
    return activation(y, act, slope)
