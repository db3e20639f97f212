"""Argument checks shared by the functional API and the layers.

Each raises ``TypeError``/``ValueError`` naming the argument and what was expected, so bad
input fails at the call site instead of deep inside a kernel (or, worse, silently).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def check_tensor(value: object, name: str = "input") -> Tensor:
    """``value`` must be a floating-point tensor."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor (float16/bfloat16/float32/float64), "
            f"got dtype {value.dtype}"
        )
    if value.layout != torch.strided:
        raise TypeError(
            f"{name} must be a dense (strided) tensor, got layout {value.layout}; "
            f"convert it with .to_dense()"
        )
    return value


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def check_companion(
    input: Tensor, value: Tensor | None, name: str, match_dtype: bool = True
) -> None:
    """A parameter or buffer used with ``input`` must be on its device and (if
    ``match_dtype``) have its dtype; float16/bfloat16 input may also take float32 ones
    (mixed precision), as torch's native norms do (they refuse any other mix)."""
    if value is None:
        return
    if value.device != input.device:
        raise ValueError(
            f"{name} is on device {value.device} but input is on {input.device}; move the "
            f"layer (.to(device)) or the input"
        )
    if match_dtype and value.dtype != input.dtype and not (
        input.dtype in _LOW_PRECISION and value.dtype == torch.float32
    ):
        raise TypeError(
            f"{name} has dtype {value.dtype} but input has dtype {input.dtype}; parameters "
            f"and buffers must have the input's dtype (float16/bfloat16 input also takes "
            f"float32 ones): cast the layer (.to(dtype)) or the input"
        )


def check_min_dim(input: Tensor, min_dim: int, layout: str) -> None:
    if input.dim() < min_dim:
        raise ValueError(
            f"input must have at least {min_dim} dimensions {layout}, "
            f"got shape {tuple(input.shape)}"
        )


def check_dim(input: Tensor, allowed: Sequence[int], name: str = "input") -> None:
    """Rank check with torch's wording, e.g. ``expected 2D or 3D input (got 4D input)``."""
    if input.dim() not in allowed:
        expected = " or ".join(f"{d}D" for d in allowed)
        raise ValueError(f"expected {expected} {name} (got {input.dim()}D {name})")


def check_eps(eps: float, name: str = "eps") -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"{name} must be a positive float, got {type(eps).__name__}")
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"{name} must be a positive finite float, got {eps}")
    return float(eps)


def check_momentum(momentum: float | None, allow_none: bool = True) -> float | None:
    if momentum is None and allow_none:
        return None
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise TypeError(f"momentum must be a float in [0, 1] or None, got {momentum!r}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(
            f"momentum must be in [0, 1] (or None for a cumulative average), got {momentum}"
        )
    return float(momentum)


def check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return value


def check_vector(
    value: Tensor | None, name: str, size: int, what: str, input: Tensor | None = None
) -> None:
    """A per-channel parameter or buffer must be ``[size]`` (``None`` passes) and, given
    ``input``, match it (:func:`check_companion`)."""
    if value is None:
        return
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(value).__name__}")
    if value.shape != (size,):
        raise ValueError(
            f"{name} must have shape ({size},) to match the {size} {what}, "
            f"got shape {tuple(value.shape)}"
        )
    if input is not None:
        check_companion(input, value, name)


_TENSOR_TYPES = (Tensor, torch.nn.Parameter)
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def fits(input: object, shape: tuple[int, ...], *tensors: Tensor | None, at: int = -1) -> bool:
    """The common case, in a few compares: ``input`` a dense floating tensor whose
    dimensions from ``at`` on (``-1``: its trailing ones) are ``shape``, and each given
    tensor ``shape``-shaped with its dtype and device. The layers call their functional
    core when it holds and the checked function (which names what is wrong) otherwise."""
    if type(input) not in _TENSOR_TYPES or input.dtype not in _FLOATS:
        return False
    if input.layout != torch.strided:
        return False
    sizes = input.shape
    if at >= 0 or len(shape) == 1:  # one dimension to compare: no slice
        at = len(sizes) - 1 if at < 0 else at
        if not 0 <= at < len(sizes) or sizes[at] != shape[0]:
            return False
    elif sizes[len(sizes) - len(shape):] != shape:
        return False
    dtype, on_cpu = input.dtype, input.is_cpu
    for value in tensors:
        if value is not None and not (
            type(value) in _TENSOR_TYPES and value.shape == shape and value.dtype == dtype
            and (value.is_cpu if on_cpu else value.device == input.device)
        ):
            return False
    return True


def check_vectors(input: Tensor, size: int, what: str, **vectors: Tensor | None) -> None:
    """:func:`check_vector` of each named vector against ``input``, with a fast pass for
    the common case (``[size]``, the input's device and dtype)."""
    device, dtype, shape = input.device, input.dtype, (size,)
    for name, value in vectors.items():
        if value is None or (
            type(value) in _TENSOR_TYPES and value.shape == shape and value.dtype == dtype
            and value.device == device
        ):
            continue
        check_vector(value, name, size, what, input)


def check_mask(input: Tensor, mask: object) -> Tensor:
    """A validity mask for ``input [N, C, *S]``: a bool tensor on its device, broadcastable
    to ``[N, *S]`` (no channel dimension); returned broadcast to that shape."""
    expected = (input.shape[0], *input.shape[2:])
    where = f"mask must be a bool tensor broadcastable to [N, *S] = {list(expected)}"
    if not isinstance(mask, Tensor):
        raise ValueError(f"{where}, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise ValueError(f"{where}, got dtype {mask.dtype} (use mask.bool() or x != pad)")
    if mask.device != input.device:
        raise ValueError(f"{where} on input's device {input.device}, got device {mask.device}")
    if mask.dim() != len(expected):
        raise ValueError(f"{where} (input without its channel dim), got shape {list(mask.shape)}")
    try:
        return mask.broadcast_to(expected)
    except RuntimeError:
        raise ValueError(f"{where}, got shape {list(mask.shape)}") from None


def valid_per_channel(input: Tensor, mask: Tensor | None) -> int:
    """Values behind each channel's statistics: ``N * prod(S)``, or the mask's valid ones."""
    if mask is None:
        return input.numel() // input.shape[1] if input.shape[1] else 0
    return int(mask.sum())


def one_value_per_channel(input: Tensor) -> bool:
    """Whether a non-empty ``[N, C, *S]`` batch holds a single value per channel."""
    return input.numel() > 0 and input.numel() // input.shape[1] == 1


def check_values_per_channel(input: Tensor, mask: Tensor | None = None) -> None:
    """BatchNorm training needs more than one value per channel (torch's condition; with a
    ``mask`` on the CPU, more than one valid position)."""
    if mask is None and one_value_per_channel(input):
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {input.size()}"
        )
    # Counting a mask's valid positions reads the device: on CPU only (elsewhere a single
    # valid position normalizes to the bias and records its value, with no host sync).
    if mask is not None and mask.is_cpu and valid_per_channel(input, mask) == 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, got input size "
            f"{input.size()} with 1 valid position in mask"
        )


def normalized_shape_tuple(normalized_shape: int | Sequence[int]) -> tuple[int, ...]:
    """torch's convention: an int means the last dimension."""
    if type(normalized_shape) is tuple and normalized_shape and all(
        type(d) is int and d >= 0 for d in normalized_shape
    ):
        return normalized_shape  # the layers' own (already checked) shape
    if isinstance(normalized_shape, int) and not isinstance(normalized_shape, bool):
        shape: tuple[int, ...] = (normalized_shape,)
    elif isinstance(normalized_shape, (Sequence, torch.Size)) and all(
        isinstance(d, int) and not isinstance(d, bool) for d in normalized_shape
    ):
        shape = tuple(normalized_shape)
    else:
        raise TypeError(
            f"normalized_shape must be an int or a sequence of ints, got {normalized_shape!r}"
        )
    if not shape or any(d < 0 for d in shape):
        raise ValueError(f"normalized_shape must be non-empty and non-negative, got {shape}")
    return shape


def check_trailing_shape(input: Tensor, shape: tuple[int, ...]) -> None:
    if tuple(input.shape[input.dim() - len(shape) :]) != shape or input.dim() < len(shape):
        raise ValueError(
            f"input's trailing dimensions must equal normalized_shape {shape}, "
            f"got input of shape {tuple(input.shape)}"
        )


def check_per_shape(
    value: Tensor | None, name: str, shape: tuple[int, ...], input: Tensor, any_dtype: bool
) -> None:
    """A parameter of shape ``normalized_shape`` on ``input``'s device, of its dtype
    unless ``any_dtype`` (torch's rms_norm computes in the promoted dtype)."""
    if value is None or (
        type(value) in _TENSOR_TYPES and value.shape == shape and value.dtype == input.dtype
        and value.device == input.device
    ):
        return
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(value).__name__}")
    if tuple(value.shape) != shape:
        raise ValueError(
            f"{name} must have shape normalized_shape {shape}, got shape {tuple(value.shape)}"
        )
    check_companion(input, value, name, match_dtype=not any_dtype)
