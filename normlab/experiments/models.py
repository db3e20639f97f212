"""The models the lab trains: an MLP and a small CNN, each with a choice of normalization.

Every normalization layer comes from normlab (``normlab.BatchNorm1d`` etc.), so the
experiments exercise this library's layers, not torch's. Modules get stable names
(``fc1``, ``norm1``, ``act1``, ..., ``out``) so a probe can hook "the input of the last
hidden sigmoid" by name.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

from torch import nn

import normlab

__all__ = ["NORMS", "build", "group_count", "init_weights", "mlp", "small_cnn"]

#: Normalizations the factories know, with the label used in tables and plots.
NORMS: dict[str, str] = {
    "none": "no norm",
    "batch": "BatchNorm",
    "layer": "LayerNorm",
    "group": "GroupNorm",
    "instance": "InstanceNorm",
}

_ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


def group_count(channels: int, target: int = 8) -> int:
    """The largest number of groups ``<= target`` that divides ``channels``."""
    return max(g for g in range(1, min(target, channels) + 1) if channels % g == 0)


def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {sorted(NORMS)}, got {norm!r}")


def _norm_features(norm: str, features: int) -> nn.Module:
    """A norm for ``[N, features]`` activations (``Identity`` for ``"none"``)."""
    _check_norm(norm)
    if norm == "none":
        return nn.Identity()
    if norm == "batch":
        return normlab.BatchNorm1d(features)
    if norm == "layer":
        return normlab.LayerNorm(features)
    if norm == "group":
        return normlab.GroupNorm(group_count(features), features)
    raise ValueError(f"norm {norm!r} needs spatial positions; use it in small_cnn, not mlp")


def _norm_maps(norm: str, shape: tuple[int, int, int]) -> nn.Module:
    """A norm for ``[N, C, H, W]`` feature maps of per-sample ``shape = (C, H, W)``."""
    _check_norm(norm)
    c = shape[0]
    if norm == "none":
        return nn.Identity()
    if norm == "batch":
        return normlab.BatchNorm2d(c)
    if norm == "layer":
        # Over (C, H, W) with a per-element affine: the GroupNorm paper's "LN" column.
        return normlab.LayerNorm(list(shape))
    if norm == "group":
        return normlab.GroupNorm(group_count(c), c)
    return normlab.InstanceNorm2d(c, affine=True)


def mlp(
    num_inputs: int,
    hidden: Sequence[int],
    num_classes: int,
    *,
    norm: str = "none",
    activation: str = "relu",
    placement: str = "before",
    input_norm: bool = False,
    output_norm: bool = False,
) -> nn.Sequential:
    """A fully connected classifier ``[N, num_inputs] -> [N, num_classes]`` (logits).

    ``placement="before"`` is the BN paper's ``Linear -> Norm -> act``; ``"after"`` puts
    the norm after the activation. ``input_norm``/``output_norm`` add a BatchNorm1d on the
    raw inputs / on the logits (the placements the articles advise against).
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
    if placement not in ("before", "after"):
        raise ValueError(f"placement must be 'before' or 'after', got {placement!r}")
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    if input_norm:
        layers["norm_in"] = normlab.BatchNorm1d(num_inputs)
    width = num_inputs
    for i, h in enumerate(hidden, start=1):
        # A norm right after the Linear subtracts the mean, so a bias there would be a no-op.
        layers[f"fc{i}"] = nn.Linear(width, h, bias=norm == "none" or placement == "after")
        if placement == "before":
            layers[f"norm{i}"] = _norm_features(norm, h)
            layers[f"act{i}"] = _ACTIVATIONS[activation]()
        else:
            layers[f"act{i}"] = _ACTIVATIONS[activation]()
            layers[f"norm{i}"] = _norm_features(norm, h)
        width = h
    layers["out"] = nn.Linear(width, num_classes)
    if output_norm:
        layers["norm_out"] = normlab.BatchNorm1d(num_classes)
    return nn.Sequential(layers)


def small_cnn(
    image_shape: tuple[int, int, int],
    num_classes: int,
    *,
    norm: str = "batch",
    widths: Sequence[int] = (16, 32, 64),
) -> nn.Sequential:
    """Conv3x3 -> Norm -> ReLU blocks (strides 1, 2, 2, ...), global average pool, Linear.

    Input ``[N, C, H, W]`` with ``(C, H, W) = image_shape``; output logits ``[N, num_classes]``.
    """
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    c, h, w = image_shape
    for i, width in enumerate(widths, start=1):
        stride = 1 if i == 1 else 2
        layers[f"conv{i}"] = nn.Conv2d(c, width, 3, stride=stride, padding=1, bias=norm == "none")
        c, h, w = width, (h - 1) // stride + 1, (w - 1) // stride + 1
        layers[f"norm{i}"] = _norm_maps(norm, (c, h, w))
        layers[f"act{i}"] = nn.ReLU()
    layers["pool"] = nn.AdaptiveAvgPool2d(1)
    layers["flatten"] = nn.Flatten()
    layers["out"] = nn.Linear(c, num_classes)
    return nn.Sequential(layers)


def init_weights(model: nn.Module, scale: float, gain: float = math.sqrt(2.0)) -> None:
    """Gaussian weights with std ``scale * gain / sqrt(fan_in)`` and zero biases.

    ``scale=1`` with the default gain is He initialization; the init experiment sweeps
    ``scale`` to make the network start too small or too large.
    """
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            fan_in = module.weight[0].numel()
            nn.init.normal_(module.weight, 0.0, scale * gain / math.sqrt(fan_in))
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def build(spec: dict, image_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """A model from a JSON-able description (what the result store records).

    ``spec["kind"]`` is ``"mlp"`` (keys of :func:`mlp`: ``hidden``, ``norm``, ``activation``,
    ``placement``, ``input_norm``, ``output_norm``) or ``"cnn"`` (``norm``, ``widths``);
    an optional ``init_scale`` re-initializes the weights with :func:`init_weights`.
    """
    options = {k: v for k, v in spec.items() if k not in ("kind", "init_scale")}
    if spec["kind"] == "mlp":
        c, h, w = image_shape
        model = mlp(c * h * w, options.pop("hidden"), num_classes, **options)
    elif spec["kind"] == "cnn":
        model = small_cnn(image_shape, num_classes, **options)
    else:
        raise ValueError(f"model kind must be 'mlp' or 'cnn', got {spec['kind']!r}")
    if spec.get("init_scale") is not None:
        init_weights(model, spec["init_scale"])
    return model
