"""The normalization family as functions, mirroring ``torch.nn.functional``.

All five are one computation (``normlab.plan``): each function checks its arguments,
builds the plan of the call, and runs it on the provider the routing table of
``normlab.ops`` picks; the provider also updates the running statistics
(``normlab.running``). ``batch_norm``, ``group_norm`` and ``layer_norm`` take a fused
activation ``act`` (``relu``, ``leaky_relu`` with ``slope``, ``silu``, ``gelu``,
``identity``): ``act(norm(x))``, in one kernel pass where the provider fuses it (the CPU
kernels: relu and leaky_relu on contiguous float32/float64 input; differentiable once
there, use ``backend="torch"`` for double backward).

The private ``_batch_norm``, ``_instance_norm``, ... run a plan on arguments already
checked: the layers check their own tensors once and call those.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from normlab import _checks, ops, plan
from normlab.ops.composite import activation
from normlab.plan import ACTIVATIONS

__all__ = [
    "ACTIVATIONS", "activation", "batch_norm", "batch_stats", "check_activation", "group_norm",
    "instance_norm", "layer_norm", "lengths_to_mask", "rms_norm", "stats_and_output",
]


def lengths_to_mask(lengths: Tensor, max_len: int | None = None) -> Tensor:
    """``[N, max_len]`` bool mask of padded sequences: ``mask[n, t] = t < lengths[n]``
    (``max_len`` defaults to the longest). For ``BatchNorm1d(x [N, C, L], mask=...)``."""
    if not isinstance(lengths, Tensor) or lengths.dim() != 1 or lengths.is_floating_point():
        raise ValueError(f"lengths must be a 1-d integer tensor, got {lengths!r}")
    longest = int(lengths.max()) if lengths.numel() else 0
    if max_len is None:
        max_len = longest
    if longest > max_len or (lengths.numel() and int(lengths.min()) < 0):
        raise ValueError(
            f"max_len ({max_len}) must be at least every length, and lengths >= 0, got "
            f"lengths from {int(lengths.min())} to {longest}"
        )
    return torch.arange(max_len, device=lengths.device) < lengths[:, None]


def check_activation(act: str, slope: float = 0.01) -> tuple[str, float]:
    """Validate an activation name and its ``slope`` (leaky_relu's negative slope)."""
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    if isinstance(slope, bool) or not isinstance(slope, (int, float)) or not math.isfinite(slope):
        raise TypeError(f"slope must be a finite float, got {slope!r}")
    return act, float(slope)


def _run(
    p: plan.Plan,
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    backend: str | None,
    mask: Tensor | None = None,
) -> Tensor:
    call = plan.Call(input, weight, bias, running_mean, running_var, mask)
    return ops.route(p, call, backend).forward(p, call)


_CHANNEL_PARAMS = ("weight", "bias", "running_mean", "running_var")


def _check_channel_params(
    input: Tensor, *params: Tensor | None, buffers_any_dtype: bool = False
) -> None:
    """``weight, bias[, running_mean, running_var]``: ``None`` or ``[C]`` on ``input``'s
    device, of its dtype (the running buffers of any float dtype if
    ``buffers_any_dtype``: torch's instance_norm converts them)."""
    channels = input.shape[1]
    for name, value in zip(_CHANNEL_PARAMS, params, strict=False):
        if value is not None:
            _checks.check_vector(value, name, channels, "channels of input (dim 1)")
            _checks.check_companion(
                input, value, name, match_dtype=not (buffers_any_dtype and "running" in name)
            )


def _check_per_channel_args(
    input: Tensor,
    min_dim: int,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float,
    eps: float,
    needs_running: str | None,
    buffers_any_dtype: bool = False,
) -> None:
    """Checks shared by batch_norm and instance_norm; ``needs_running`` names the flag
    that makes the running statistics mandatory (``None`` when they are optional)."""
    _checks.check_tensor(input)
    _checks.check_min_dim(input, min_dim, "[N, C, *S]")
    _checks.check_eps(eps)
    _checks.check_momentum(momentum, allow_none=False)
    _check_channel_params(
        input, weight, bias, running_mean, running_var, buffers_any_dtype=buffers_any_dtype
    )
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together or both be None")
    if needs_running and running_mean is None:
        raise ValueError(f"running_mean and running_var are required when {needs_running}")


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    act: str = "identity",
    slope: float = 0.01,
    mask: Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    """Batch Normalization of ``input [N, C, *S]`` with statistics per channel, then the
    activation ``act``.

    In training (or without running statistics) it normalizes with the batch's mean and
    biased variance over ``(N, *S)`` and, when given, updates ``running_mean`` /
    ``running_var`` in place (``momentum`` is the weight of the new batch: Keras'
    ``momentum=0.99`` is ``momentum=0.01`` here). Otherwise it uses the running ones.

    ``mask`` (bool, broadcastable to ``[N, *S]``, ``True`` = valid): the batch statistics
    and the running update use the valid positions only (the unbiased variance over their
    count); the output is computed at every position. A batch with no valid position
    records nothing. Ignored when normalizing with the running statistics.
    """
    _check_per_channel_args(
        input, 2, running_mean, running_var, weight, bias, momentum, eps,
        needs_running=None if training else "training=False",
    )
    act, slope = check_activation(act, slope)
    if mask is not None:
        mask = _checks.check_mask(input, mask)
    if training:
        _checks.check_values_per_channel(input, mask)
    return _batch_norm(
        input, running_mean, running_var, weight, bias, training, momentum, eps, act, slope,
        backend, mask,
    )


def _batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    batch_stats: bool,
    momentum: float,
    eps: float,
    act: str = "identity",
    slope: float = 0.0,
    backend: str | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    p = plan.batch(input, batch_stats, eps, momentum, act, slope, mask is not None)
    return _run(p, input, weight, bias, running_mean, running_var, backend, mask)


def stats_and_output(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    *,
    mask: Tensor | None = None,
    backend: str | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Train-mode BatchNorm of ``input [N, C, *S]`` (checked by the caller) returning
    ``(output, mean, biased var)``, the statistics ``[C]`` in the compute dtype (over the
    valid positions of ``mask [N, *S]``): for the variants that handle the running
    statistics themselves (ghost, in-place ABN)."""
    p = plan.batch(input, True, eps, 0.0, "identity", 0.0, mask is not None)
    if p.masked:
        y4, mean, var = ops.COMPOSITE.normalize(
            p.x4(input), weight, bias, per_sample=False, center=True, eps=eps,
            mask4=p.mask4(mask),
        )
    else:
        y4, mean, var = ops.pieces(input, backend).normalize(
            p.x4(input), weight, bias, per_sample=False, center=True, eps=eps
        )
    return y4.reshape(input.shape), mean, var


@torch.no_grad()
def batch_stats(
    input: Tensor, mask: Tensor | None = None, *, backend: str | None = None
) -> tuple[Tensor, Tensor]:
    """Per-channel ``(mean, biased var)`` ``[C]`` of ``input [N, C, *S]`` (checked by the
    caller), over the valid positions of ``mask [N, *S]`` if given; not differentiated."""
    p = plan.batch(input, True, 0.0)
    if mask is not None:
        return ops.COMPOSITE.moments(
            p.x4(input), per_sample=False, center=True, mask4=p.mask4(mask)
        )
    return ops.pieces(input, backend).moments(p.x4(input), per_sample=False, center=True)


def instance_norm(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    mask: Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    """Instance Normalization of ``input [N, C, *S]``: statistics per sample and channel.

    With ``use_input_stats`` and running buffers, those are updated (in place) with the
    per-instance statistics averaged over the batch, as torch does. ``mask`` (bool,
    broadcastable to ``[N, *S]``): statistics over each instance's valid positions (see
    :func:`batch_norm`; the running variance corrects each instance by its own count).
    """
    _check_per_channel_args(
        input, 3, running_mean, running_var, weight, bias, momentum, eps,
        needs_running=None if use_input_stats else "use_input_stats=False",
        buffers_any_dtype=True,
    )
    if use_input_stats and math.prod(input.shape[2:]) == 1:
        raise ValueError(
            f"Expected more than 1 spatial element when training, got input size {input.size()}"
        )
    if mask is not None:
        mask = _checks.check_mask(input, mask)
    return _instance_norm(
        input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps, backend,
        mask,
    )


def _instance_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    use_input_stats: bool,
    momentum: float,
    eps: float,
    backend: str | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    p = plan.instance(input, use_input_stats, eps, momentum, mask is not None)
    return _run(p, input, weight, bias, running_mean, running_var, backend, mask)


def _check_group_norm_args(
    input: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float
) -> None:
    _checks.check_tensor(input)
    _checks.check_min_dim(input, 2, "[N, C, *]")
    _checks.check_positive_int(num_groups, "num_groups")
    _checks.check_eps(eps)
    channels = input.shape[1]
    if channels % num_groups:
        raise ValueError(
            f"num_groups ({num_groups}) must divide the number of channels of input ({channels})"
        )
    _check_channel_params(input, weight, bias)
    if input.numel() // num_groups == 1 and input.numel() > 0:
        # torch's condition (one sample, one value per group): the statistics of one value
        # say nothing and the output would be just bias.
        raise ValueError(
            f"Expected more than 1 value per group, got input size {tuple(input.shape)} with "
            f"num_groups={num_groups}"
        )


def group_norm(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    act: str = "identity",
    slope: float = 0.01,
    mask: Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    """Group Normalization of ``input [N, C, *S]``: statistics per sample over each group
    of ``C / num_groups`` channels (and ``*S``), then the activation ``act``.
    ``num_groups=1`` is LayerNorm over ``(C, *S)``; ``num_groups=C`` is InstanceNorm.
    ``mask`` (bool, broadcastable to ``[N, *S]``): statistics over the valid positions."""
    _check_group_norm_args(input, num_groups, weight, bias, eps)
    act, slope = check_activation(act, slope)
    if mask is not None:
        mask = _checks.check_mask(input, mask)
    return _group_norm(input, num_groups, weight, bias, eps, act, slope, backend, mask)


def _group_norm(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    act: str = "identity",
    slope: float = 0.0,
    backend: str | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    p = plan.group(input, num_groups, eps, act, slope, mask is not None)
    return _run(p, input, weight, bias, None, None, backend, mask)


def _check_rows_args(
    input: Tensor,
    shape: tuple[int, ...],
    weight: Tensor | None,
    bias: Tensor | None,
    any_dtype: bool = False,
) -> None:
    _checks.check_trailing_shape(input, shape)
    _checks.check_per_shape(weight, "weight", shape, input, any_dtype)
    _checks.check_per_shape(bias, "bias", shape, input, any_dtype)


def _check_layer_norm_args(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> tuple[int, ...]:
    """The checks of layer_norm; returns ``normalized_shape`` as a tuple."""
    _checks.check_tensor(input)
    shape = _checks.normalized_shape_tuple(normalized_shape)
    _checks.check_eps(eps)
    _check_rows_args(input, shape, weight, bias)
    return shape


def layer_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    act: str = "identity",
    slope: float = 0.01,
    backend: str | None = None,
) -> Tensor:
    """Layer Normalization over the trailing ``normalized_shape`` dimensions of ``input``,
    then the activation ``act``."""
    shape = _check_layer_norm_args(input, normalized_shape, weight, bias, eps)
    act, slope = check_activation(act, slope)
    return _layer_norm(input, shape, weight, bias, eps, act, slope, backend)


def _layer_norm(
    input: Tensor,
    normalized_shape: tuple[int, ...],
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    act: str = "identity",
    slope: float = 0.0,
    backend: str | None = None,
) -> Tensor:
    p = plan.layer(input, normalized_shape, eps, act, slope)
    return _run(p, input, weight, bias, None, None, backend)


_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def rms_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
    *,
    backend: str | None = None,
) -> Tensor:
    """RMS Normalization: ``x / sqrt(mean(x^2) + eps) * weight`` over the trailing
    ``normalized_shape`` dimensions. ``eps=None`` means the machine epsilon of the dtype
    the statistics are computed in, as torch's: float32's for float16/bfloat16 input."""
    _checks.check_tensor(input)
    shape = _checks.normalized_shape_tuple(normalized_shape)
    if eps is not None:
        eps = _checks.check_eps(eps)
    _check_rows_args(input, shape, weight, None, any_dtype=True)
    return _rms_norm(input, shape, weight, eps, backend)


def _rms_norm(
    input: Tensor,
    normalized_shape: tuple[int, ...],
    weight: Tensor | None,
    eps: float | None,
    backend: str | None = None,
) -> Tensor:
    if eps is None:
        eps = torch.finfo(plan.compute_dtype(input.dtype)).eps
    p = plan.rms(input, normalized_shape, eps)
    y = _run(p, input, weight, None, None, None, backend)
    # torch's rms_norm is elementwise past its statistics: its output keeps channels-last.
    layout = _CHANNELS_LAST.get(input.dim())
    if layout is not None and not input.is_contiguous() and input.is_contiguous(
        memory_format=layout
    ) and y.is_contiguous():
        return y.contiguous(memory_format=layout)
    return y
