"""The normalization family as functions, mirroring ``torch.nn.functional``.

All five are one computation: view the input, without copying where its layout allows,
as ``x4 = [N, G, K, S]`` and normalize with statistics either per ``G`` over
``(N, K, S)`` or per ``(N, G)`` over ``(K, S)``; the affine parameters are ``[G*K]``.

=============  ==========================  ===========  ==================
function       x4 view of ``[N, C, *S]``   statistics   affine per
=============  ==========================  ===========  ==================
batch_norm     ``(N, C, 1, prod(S))``      per ``C``    channel
instance_norm  ``(N, C, 1, prod(S))``      per (n, c)   channel
group_norm     ``(N, G, C/G, prod(S))``    per (n, g)   channel
layer_norm     ``(rows, 1, D, 1)``         per row      normalized element
rms_norm       ``(rows, 1, D, 1)``         per row      normalized element
=============  ==========================  ===========  ==================

(for ``layer_norm``/``rms_norm``, ``D = prod(normalized_shape)`` and ``rows`` is the
product of the leading dimensions). The kernels live in ``normlab.ops``; this module
checks arguments, builds the view, picks a backend and keeps the running statistics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import ModuleType

import torch
from torch import Tensor

from normlab import _checks, ops, running

__all__ = ["batch_norm", "instance_norm", "group_norm", "layer_norm", "rms_norm"]


def _spatial_size(input: Tensor) -> int:
    return math.prod(input.shape[2:])


_CHANNEL_PARAMS = ("weight", "bias", "running_mean", "running_var")
_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


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


def _direct(kernels: ModuleType, entry: str, *args: object) -> object | None:
    """The backend's whole-call entry point ``entry`` (see ``normlab.ops``) on ``args``, or
    ``None`` where the backend has none or it declines the input."""
    call = getattr(kernels, entry, None)
    return None if call is None else call(*args)


def train_step(
    kernels: ModuleType,
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float,
    eps: float,
    act: int = 0,
    slope: float = 0.0,
) -> Tensor | None:
    """A backend's one-call BatchNorm train step (``batch_norm_train``: statistics,
    output with an optional fused activation, running update) on checked arguments, or
    ``None`` where the backend has none for this input."""
    result = _direct(
        kernels, "batch_norm_train", input, weight, bias, running_mean, running_var,
        momentum, eps, act, slope,
    )
    if result is None:
        return None
    y, kept = result
    if kept:
        running.warn_non_finite()
    return y


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
    backend: str | None = None,
) -> Tensor:
    """Batch Normalization of ``input [N, C, *S]`` with statistics per channel.

    In training (or without running statistics) it normalizes with the batch's mean and
    biased variance over ``(N, *S)`` and, when given, updates ``running_mean`` /
    ``running_var`` in place (``momentum`` is the weight of the new batch: Keras'
    ``momentum=0.99`` is ``momentum=0.01`` here). Otherwise it uses the running ones.
    """
    _check_per_channel_args(
        input, 2, running_mean, running_var, weight, bias, momentum, eps,
        needs_running=None if training else "training=False",
    )
    n, channels, spatial = input.shape[0], input.shape[1], _spatial_size(input)
    if training:
        _checks.check_values_per_channel(input)
    kernels = ops.resolve(input, backend)
    if training:
        y = train_step(kernels, input, running_mean, running_var, weight, bias, momentum, eps)
    else:
        y = _direct(kernels, "batch_norm_eval", input, running_mean, running_var, weight, bias,
                    eps)
    if y is not None:
        return y
    x4 = input.reshape(n, channels, 1, spatial)
    if not training:
        y4 = kernels.normalize_with_stats(x4, running_mean, running_var, weight, bias, eps=eps)
        return y4.reshape(input.shape)
    y4, mean, var = kernels.normalize(x4, weight, bias, per_sample=False, center=True, eps=eps)
    if running_mean is not None:
        running.update_running_stats(running_mean, running_var, mean, var, n * spatial, momentum)
    return y4.reshape(input.shape)


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
    backend: str | None = None,
) -> Tensor:
    """Instance Normalization of ``input [N, C, *S]``: statistics per sample and channel.

    With ``use_input_stats`` and running buffers, those are updated (in place) with the
    per-instance statistics averaged over the batch, as torch does.
    """
    _check_per_channel_args(
        input, 3, running_mean, running_var, weight, bias, momentum, eps,
        needs_running=None if use_input_stats else "use_input_stats=False",
        buffers_any_dtype=True,
    )
    n, channels, spatial = input.shape[0], input.shape[1], _spatial_size(input)
    if use_input_stats and spatial == 1:
        raise ValueError(
            f"Expected more than 1 spatial element when training, got input size {input.size()}"
        )
    x4 = input.reshape(n, channels, 1, spatial)
    kernels = ops.resolve(input, backend)
    if not use_input_stats:
        y4 = kernels.normalize_with_stats(x4, running_mean, running_var, weight, bias, eps=eps)
        return y4.reshape(input.shape)
    y4, mean, var = kernels.normalize(x4, weight, bias, per_sample=True, center=True, eps=eps)
    if running_mean is not None and n > 0:
        # torch averages each instance's statistics over the batch; the Bessel factor
        # S / (S - 1) is the same for every instance, so averaging the biased variances
        # and correcting once is the same thing.
        running.update_running_stats(
            running_mean, running_var, mean.mean(0), var.mean(0), spatial, momentum
        )
    return y4.reshape(input.shape)


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
    backend: str | None = None,
) -> Tensor:
    """Group Normalization of ``input [N, C, *S]``: statistics per sample over each group
    of ``C / num_groups`` channels (and ``*S``). ``num_groups=1`` is LayerNorm over
    ``(C, *S)``; ``num_groups=C`` is InstanceNorm."""
    _check_group_norm_args(input, num_groups, weight, bias, eps)
    n, channels, spatial = input.shape[0], input.shape[1], _spatial_size(input)
    kernels = ops.resolve(input, backend)
    y = _direct(kernels, "group_norm", input, num_groups, weight, bias, eps)
    if y is not None:
        return y
    x4 = input.reshape(n, num_groups, channels // num_groups, spatial)
    y4, _, _ = kernels.normalize(x4, weight, bias, per_sample=True, center=True, eps=eps)
    return y4.reshape(input.shape)


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


def _rows_view(
    input: Tensor, shape: tuple[int, ...], weight: Tensor | None, bias: Tensor | None
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    features = math.prod(shape)
    rows = math.prod(input.shape[: input.dim() - len(shape)])
    x4 = input.reshape(rows, 1, features, 1)
    return x4, _flat_or_none(weight, features), _flat_or_none(bias, features)


def _flat_or_none(param: Tensor | None, features: int) -> Tensor | None:
    return None if param is None else param.reshape(features)


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
    backend: str | None = None,
) -> Tensor:
    """Layer Normalization over the trailing ``normalized_shape`` dimensions of ``input``."""
    shape = _check_layer_norm_args(input, normalized_shape, weight, bias, eps)
    kernels = ops.resolve(input, backend)
    y = _direct(kernels, "layer_norm", input, shape, weight, bias, eps)
    if y is not None:
        return y
    x4, weight, bias = _rows_view(input, shape, weight, bias)
    y4, _, _ = kernels.normalize(x4, weight, bias, per_sample=True, center=True, eps=eps)
    return y4.reshape(input.shape)


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
    if eps is None:
        eps = torch.finfo(ops.torch_ops.compute_dtype(input.dtype)).eps
    else:
        eps = _checks.check_eps(eps)
    _check_rows_args(input, shape, weight, None, any_dtype=True)
    kernels = ops.resolve(input, backend)
    y = _direct(kernels, "rms_norm", input, shape, weight, eps)
    if y is not None:
        return y
    x4, weight, _ = _rows_view(input, shape, weight, None)
    y4, _, _ = kernels.normalize(x4, weight, None, per_sample=True, center=False, eps=eps)
    y = y4.reshape(input.shape)
    # torch's rms_norm is elementwise past its statistics: its output keeps channels-last.
    layout = _CHANNELS_LAST.get(input.dim())
    if layout is not None and not input.is_contiguous() and input.is_contiguous(
        memory_format=layout
    ):
        return y.contiguous(memory_format=layout)
    return y
