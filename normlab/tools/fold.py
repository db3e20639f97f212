"""Fold BatchNorm into the preceding Conv/ConvTranspose/Linear for inference.

In eval mode a BatchNorm is a per-channel affine map ``y = x * s + t`` with
``s = gamma / sqrt(running_var + eps)`` and ``t = beta - running_mean * s``. When ``x`` is
the output of a layer that is linear per output channel, ``s`` scales that channel's
weights and ``t`` joins its bias, and the BatchNorm disappears: one pass less over the
activations.

Pairs are found on a ``torch.fx`` graph when the model traces (the conv's output must feed
only the BatchNorm, both called once); where tracing fails we fall back to adjacent children of
``nn.Sequential`` and recurse into the children, tracing each one. The model's class is kept:
the folded BatchNorm is replaced in its parent by ``nn.Identity`` or, for a fused norm+act
layer, by its activation.
"""

from __future__ import annotations

import copy
from collections import Counter
from typing import Any

import torch
from torch import Tensor, fx, nn

from normlab.tools._detect import fused_activation, is_batchnorm, is_norm

__all__ = ["fold_weights", "fold_batchnorm", "find_foldable"]

_FOLDABLE = (nn.Linear, nn.modules.conv._ConvNd)


def _out_channels(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _bn_stats(bn: Any) -> tuple[Tensor, Tensor, Tensor, Tensor, float]:
    """(mean, var, gamma, beta, eps) of a BatchNorm-like object, gamma/beta filled if absent."""
    mean = getattr(bn, "running_mean", None)
    var = getattr(bn, "running_var", None)
    if mean is None or var is None:
        raise ValueError(
            f"bn must hold running statistics (running_mean and running_var of shape [C]) to "
            f"be folded; {type(bn).__name__} has none (track_running_stats=False uses batch "
            "statistics in eval, which no fixed weight can reproduce)"
        )
    gamma = getattr(bn, "weight", None)
    beta = getattr(bn, "bias", None)
    gamma = torch.ones_like(mean) if gamma is None else gamma
    beta = torch.zeros_like(mean) if beta is None else beta
    return mean, var, gamma, beta, float(bn.eps)


@torch.no_grad()
def fold_weights(
    weight: Tensor,
    bias: Tensor | None,
    bn: Any,
    *,
    transposed: bool = False,
    groups: int = 1,
) -> tuple[Tensor, Tensor]:
    """Weight and bias of a layer followed by ``bn`` (in eval mode), folded into one layer.

    Args:
        weight: ``[C_out, C_in/groups, *k]`` (Conv, Linear ``[C_out, C_in]``) or
            ``[C_in, C_out/groups, *k]`` when ``transposed`` (ConvTranspose).
        bias: ``[C_out]`` or None.
        bn: an object with ``running_mean``, ``running_var`` ``[C_out]``, ``eps`` and
            optional ``weight``/``bias`` ``[C_out]`` (torch/normlab/frozen BatchNorm).
        transposed: ``weight`` is laid out as ConvTranspose's.
        groups: the layer's ``groups`` (only matters when ``transposed``).

    Returns:
        ``(weight, bias)``: new tensors (inputs untouched), same dtype, device and memory
        format as ``weight``; computed in float64.
    """
    if not isinstance(weight, Tensor) or weight.dim() < 2:
        raise TypeError(f"weight must be a Tensor with at least 2 dims, got {weight!r:.80}")
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    mean, var, gamma, beta, eps = _bn_stats(bn)
    if transposed:
        if weight.shape[0] % groups:
            raise ValueError(
                f"transposed weight of shape {tuple(weight.shape)} has dim 0 not divisible by "
                f"groups={groups}"
            )
        c_out = weight.shape[1] * groups
    else:
        c_out = weight.shape[0]
    if mean.shape != (c_out,):
        raise ValueError(
            f"bn has {tuple(mean.shape)} running statistics but the layer has {c_out} output "
            f"channels (weight shape {tuple(weight.shape)}, transposed={transposed})"
        )
    if bias is not None and bias.shape != (c_out,):
        raise ValueError(f"bias must have shape ({c_out},), got {tuple(bias.shape)}")

    f64 = dict(dtype=torch.float64, device=weight.device)
    scale = gamma.to(**f64) / torch.sqrt(var.to(**f64) + eps)
    b = torch.zeros(c_out, **f64) if bias is None else bias.to(**f64)
    new_bias = (b - mean.to(**f64)) * scale + beta.to(**f64)

    w = weight.to(torch.float64)
    k = (1,) * (weight.dim() - 2)
    if transposed:
        # [C_in, C_out/g, *k] -> [g, C_in/g, C_out/g, *k]: output channel g*C_out/g + j.
        wg = w.reshape(groups, weight.shape[0] // groups, weight.shape[1], *weight.shape[2:])
        w = (wg * scale.view(groups, 1, weight.shape[1], *k)).reshape(weight.shape)
    else:
        w = w * scale.view(c_out, 1, *k)
    new_weight = w.to(weight.dtype).contiguous(memory_format=_memory_format(weight))
    return new_weight, new_bias.to(weight.dtype)


def _memory_format(t: Tensor) -> torch.memory_format:
    """channels_last(_3d) when ``t`` is laid out so, else contiguous."""
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(t.dim())
    if fmt is not None and t.is_contiguous(memory_format=fmt) and not t.is_contiguous():
        return fmt
    return torch.contiguous_format


class _NormLeafTracer(fx.Tracer):
    """Keeps every norm a leaf: normlab's layers check shapes in Python (control flow)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_norm(m) or super().is_leaf_module(m, module_qualified_name)


def _pairs_from_graph(module: nn.Module, graph: fx.Graph) -> list[tuple[str, str]]:
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    attrs = [str(n.target) for n in graph.nodes if n.op == "get_attr"]
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        bn = module.get_submodule(node.target)
        src = node.args[0]
        if not is_batchnorm(bn) or not isinstance(src, fx.Node) or src.op != "call_module":
            continue
        layer = module.get_submodule(src.target)
        if (
            isinstance(layer, _FOLDABLE)
            and len(src.users) == 1  # the conv's output feeds only the BatchNorm
            and calls[src.target] == 1
            and calls[node.target] == 1
            # the conv's weights are not read elsewhere (e.g. F.conv2d(x, self.conv.weight))
            and not any(a.startswith(f"{src.target}.") for a in attrs)
        ):
            pairs.append((str(src.target), str(node.target)))
    return pairs


def _find_pairs(module: nn.Module, prefix: str) -> list[tuple[str, str]]:
    if not any(True for _ in module.children()):
        return []
    try:
        graph = _NormLeafTracer().trace(module)
    except Exception:  # untraceable (control flow, unsupported ops): use module structure
        pairs: list[tuple[str, str]] = []
        if isinstance(module, nn.Sequential):
            names = [name for name, _ in module.named_children()]
            children = list(module.children())
            for i in range(len(children) - 1):
                if isinstance(children[i], _FOLDABLE) and is_batchnorm(children[i + 1]):
                    pairs.append((names[i], names[i + 1]))
        pairs = [(prefix + a, prefix + b) for a, b in pairs]
        for name, child in module.named_children():
            pairs += _find_pairs(child, f"{prefix}{name}.")
        return pairs
    return [(prefix + a, prefix + b) for a, b in _pairs_from_graph(module, graph)]


def find_foldable(model: nn.Module) -> list[tuple[str, str]]:
    """Qualified names ``(layer, batchnorm)`` of the pairs ``fold_batchnorm`` would fold.

    A pair qualifies when the BatchNorm (torch, normlab, frozen or fused with an activation)
    directly and only consumes the output of a Conv1d/2d/3d, ConvTranspose1d/2d/3d or
    Linear with matching channels and running statistics, and neither module is shared.
    """
    uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    result = []
    for layer_name, bn_name in _find_pairs(model, ""):
        layer, bn = model.get_submodule(layer_name), model.get_submodule(bn_name)
        if uses[id(layer)] > 1 or uses[id(bn)] > 1:
            continue
        if getattr(bn, "running_mean", None) is None:
            continue  # no running statistics: eval uses the batch's, nothing to fold
        if bn.running_mean.shape != (_out_channels(layer),):
            continue
        try:
            fused_activation(bn)
        except ValueError:
            continue  # an activation we cannot rebuild: keep the layer
        result.append((layer_name, bn_name))
    return result


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def fold_batchnorm(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Fold every foldable BatchNorm into the layer before it (see ``find_foldable``).

    The model must be in eval mode (folding uses the running statistics, which training
    mode does not). Each folded BatchNorm is replaced by ``nn.Identity`` or, for a fused
    norm+act layer, by its activation. Eval outputs equal the original's up to rounding
    (the fold is computed in float64). Layers trained with ``mask=`` fold the same way:
    eval uses the running statistics, which the mask only shaped during training.

    Args:
        model: a module in eval mode (``model.eval()``).
        inplace: modify ``model`` itself instead of a deep copy.

    Returns:
        The folded model (same class as ``model``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    training = [n or "<model>" for n, m in model.named_modules() if m.training]
    if training:
        raise RuntimeError(
            "fold_batchnorm needs the model in eval mode (folding uses running statistics, "
            f"training mode uses batch statistics); call model.eval() first. Modules in "
            f"training mode: {training[:5]}{' ...' if len(training) > 5 else ''}"
        )
    if not inplace:
        model = copy.deepcopy(model)
    if is_batchnorm(model):
        return model  # a lone BatchNorm has nothing before it inside the model
    for layer_name, bn_name in find_foldable(model):
        layer, bn = model.get_submodule(layer_name), model.get_submodule(bn_name)
        transposed = bool(getattr(layer, "transposed", False))
        groups = int(getattr(layer, "groups", 1))
        weight, bias = fold_weights(
            layer.weight, layer.bias, bn, transposed=transposed, groups=groups
        )
        with torch.no_grad():
            layer.weight.copy_(weight)
            if layer.bias is None:
                layer.bias = nn.Parameter(bias, requires_grad=layer.weight.requires_grad)
            else:
                layer.bias.copy_(bias)
        act = fused_activation(bn)
        _set_submodule(model, bn_name, nn.Identity() if act is None else act)
    return model
