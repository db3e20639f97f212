"""Keras' BatchNormalization conventions, converted to and from torch/normlab BatchNorm.

| Keras                                   | torch / normlab                             |
|-----------------------------------------|---------------------------------------------|
| ``momentum=0.99`` (weight of the *old*) | ``momentum=0.01`` (weight of the *new*)     |
| ``epsilon=1e-3``                        | ``eps=1e-5``                                |
| ``axis=-1`` (channels last, NHWC)       | channels at dim 1 (NCHW)                    |
| weights ``[gamma, beta, moving_mean,    | ``weight, bias, running_mean, running_var`` |
| moving_variance]`` (gamma absent when   | (+ ``num_batches_tracked``)                 |
| ``scale=False``, beta when              |                                             |
| ``center=False``)                       |                                             |
| ``moving_variance``: running average of | ``running_var``: running average of the     |
| the *biased* batch variance (divide by  | *unbiased* batch variance (``m - 1``)       |
| ``m``, the elements per channel)        |                                             |

At inference both compute ``gamma * (x - mean) / sqrt(var + eps) + beta`` with the stored
variance as is, so the default ``variance="as_stored"`` copies it unchanged and the
converted layer's outputs equal Keras'. ``variance="unbiased"`` (from Keras) or
``"biased"`` (to Keras) rescales by ``m / (m - 1)`` to give the number the other framework's
training would have accumulated, assuming every training batch had ``count = m`` elements
per channel (batch size x spatial size). The rescaling is exact for the last batch's
contribution and for a steady state, not for the initial value (1) still decaying in the
average; use it when training continues in the other framework, not for inference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "from_keras",
    "to_keras",
    "keras_config",
    "batchnorm_from_keras",
    "keras_momentum_to_torch",
    "torch_momentum_to_keras",
    "MoveChannels",
]

_KEYS = ("gamma", "beta", "moving_mean", "moving_variance")


def keras_momentum_to_torch(momentum: float) -> float:
    """Keras' momentum (weight of the old average, default 0.99) -> torch's (1 - it)."""
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise TypeError(f"momentum must be a float in [0, 1], got {momentum!r}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    return 1.0 - float(momentum)


def torch_momentum_to_keras(momentum: float | None) -> float:
    """torch's momentum (weight of the new batch, default 0.1) -> Keras' (1 - it)."""
    if momentum is None:
        raise ValueError(
            "momentum=None (a cumulative average) has no Keras equivalent; set a float momentum"
        )
    return keras_momentum_to_torch(momentum)


def _bessel(count: int | None, what: str) -> float:
    if isinstance(count, bool) or not isinstance(count, int) or count < 2:
        raise ValueError(
            f"count (elements per channel in a training batch, >= 2) is required for "
            f"variance={what!r}, got {count!r}"
        )
    return count / (count - 1)


def _split(
    weights: Sequence[Any] | Mapping[str, Any], center: bool, scale: bool
) -> dict[str, np.ndarray]:
    """Keras' stored arrays by name, from a list in Keras order or a name -> array mapping."""
    if isinstance(weights, Mapping) or hasattr(weights, "files"):  # dict, np.load(".npz")
        found: dict[str, np.ndarray] = {}
        for key in weights.keys():  # "bn/gamma:0" (Keras 2 h5 names) -> "gamma"
            short = str(key).rsplit("/", 1)[-1].split(":", 1)[0]
            if short in _KEYS:
                found[short] = np.asarray(weights[key])
        missing = {"moving_mean", "moving_variance"} - found.keys()
        if missing:
            raise ValueError(f"weights has no {sorted(missing)}; keys: {sorted(weights.keys())}")
        return found
    names = [k for k, on in zip(_KEYS, (scale, center, True, True), strict=True) if on]
    weights = list(weights)
    if len(weights) != len(names):
        raise ValueError(
            f"weights must be {len(names)} arrays {names} (Keras order for center={center}, "
            f"scale={scale}), got {len(weights)}"
        )
    return {k: np.asarray(w) for k, w in zip(names, weights, strict=True)}


def from_keras(
    weights: Sequence[Any] | Mapping[str, Any],
    *,
    momentum: float = 0.99,
    epsilon: float = 1e-3,
    center: bool = True,
    scale: bool = True,
    variance: Literal["as_stored", "unbiased"] = "as_stored",
    count: int | None = None,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """State dict and constructor kwargs of a torch/normlab BatchNorm equal to a Keras one.

    Args:
        weights: ``layer.get_weights()`` of a Keras ``BatchNormalization`` (a list in Keras
            order, each ``[C]``) or a mapping such as ``np.load("bn.npz")`` with keys
            ``gamma``, ``beta``, ``moving_mean``, ``moving_variance`` (a ``"name/"`` prefix and
            ``":0"`` suffix, as in Keras 2 h5 files, are ignored).
        momentum, epsilon, center, scale: the Keras layer's arguments.
        variance: ``"as_stored"`` (outputs equal Keras') or ``"unbiased"`` (times
            ``count / (count - 1)``, see the module docstring).
        count: elements per channel in a training batch (for ``"unbiased"``).

    Returns:
        ``(state_dict, kwargs)``: ``BatchNorm2d(**kwargs).load_state_dict(state_dict)``. A
        missing gamma/beta becomes ones/zeros (torch's ``affine`` has both); when neither is
        stored, ``affine=False``.
    """
    arrays = _split(weights, center, scale)
    mean = torch.as_tensor(arrays["moving_mean"], dtype=torch.float32).clone()
    var = torch.as_tensor(arrays["moving_variance"], dtype=torch.float32).clone()
    if mean.dim() != 1 or var.shape != mean.shape:
        raise ValueError(
            f"moving_mean and moving_variance must both be [C]; got {tuple(mean.shape)} and "
            f"{tuple(var.shape)}"
        )
    if variance == "unbiased":
        var = (var.double() * _bessel(count, variance)).float()
    elif variance != "as_stored":
        raise ValueError(f"variance must be 'as_stored' or 'unbiased', got {variance!r}")
    affine = "gamma" in arrays or "beta" in arrays
    state: dict[str, Tensor] = {"running_mean": mean, "running_var": var}
    if affine:
        for key, name, fill in (("gamma", "weight", 1.0), ("beta", "bias", 0.0)):
            t = arrays.get(key)
            t = torch.full_like(mean, fill) if t is None else torch.as_tensor(t).float().clone()
            if t.shape != mean.shape:
                raise ValueError(f"{key} must have shape {tuple(mean.shape)}, got {tuple(t.shape)}")
            state[name] = t
    state["num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    kwargs = dict(
        num_features=mean.numel(),
        eps=float(epsilon),
        momentum=keras_momentum_to_torch(momentum),
        affine=affine,
    )
    return state, kwargs


def to_keras(
    bn: nn.Module,
    *,
    variance: Literal["as_stored", "biased"] = "as_stored",
    count: int | None = None,
) -> list[np.ndarray]:
    """``bn``'s state as Keras stores it: ``[gamma, beta, moving_mean, moving_variance]``.

    gamma and beta are left out when ``bn`` has no affine (Keras ``scale=False``,
    ``center=False``; see ``keras_config``); a normlab BatchNorm with ``bias=False`` gives
    ``[gamma, moving_mean, moving_variance]`` (``center=False``). ``variance="biased"``
    multiplies by ``(count - 1) / count`` (see the module docstring). float32 arrays.
    """
    mean, var = getattr(bn, "running_mean", None), getattr(bn, "running_var", None)
    if mean is None or var is None:
        raise ValueError("bn must have running statistics (track_running_stats=True)")
    var64 = var.detach().double().cpu()
    if variance == "biased":
        var64 = var64 / _bessel(count, variance)
    elif variance != "as_stored":
        raise ValueError(f"variance must be 'as_stored' or 'biased', got {variance!r}")
    out = [t.detach().float().cpu().numpy() for t in (bn.weight, bn.bias) if t is not None]
    return out + [mean.detach().float().cpu().numpy(), var64.float().numpy()]


def keras_config(bn: nn.Module, axis: int = -1) -> dict[str, Any]:
    """Keras ``BatchNormalization`` arguments equivalent to ``bn`` (channels at ``axis``)."""
    return dict(
        axis=axis,
        momentum=torch_momentum_to_keras(bn.momentum),
        epsilon=float(bn.eps),
        center=getattr(bn, "bias", None) is not None,
        scale=getattr(bn, "weight", None) is not None,
    )


class MoveChannels(nn.Module):
    """Runs ``module`` (channels at dim 1) on input whose channels are at ``axis``.

    ``[N, H, W, C]`` with ``axis=-1`` is moved to ``[N, C, H, W]`` and back (a view: the
    BatchNorm sees a channels-last tensor, which torch and normlab handle as a layout).
    """

    def __init__(self, module: nn.Module, axis: int = -1) -> None:
        super().__init__()
        self.module = module
        self.axis = axis

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x.movedim(self.axis, 1)).movedim(1, self.axis)

    def extra_repr(self) -> str:
        return f"axis={self.axis}"


def batchnorm_from_keras(
    weights: Sequence[Any] | Mapping[str, Any],
    *,
    dim: int = 2,
    axis: int = -1,
    backend: Literal["normlab", "torch"] = "normlab",
    **kwargs: Any,
) -> nn.Module:
    """A BatchNorm{dim}d equal to a Keras ``BatchNormalization`` at inference.

    ``axis`` is the Keras layer's (``-1``: channels last); unless it is 1, the layer is
    wrapped in ``MoveChannels`` so it takes the same input layout as the Keras layer.
    Other ``kwargs`` go to ``from_keras``. Returned in eval mode.
    """
    if dim not in (1, 2, 3):
        raise ValueError(f"dim must be 1, 2 or 3, got {dim!r}")
    if backend == "torch":
        cls = getattr(nn, f"BatchNorm{dim}d")
    elif backend == "normlab":
        import normlab.nn as nlnn

        cls = getattr(nlnn, f"BatchNorm{dim}d")
    else:
        raise ValueError(f"backend must be 'normlab' or 'torch', got {backend!r}")
    state, ctor = from_keras(weights, **kwargs)
    bn = cls(**ctor)
    bn.load_state_dict(state)
    bn.eval()
    return bn if axis == 1 else MoveChannels(bn, axis).eval()
