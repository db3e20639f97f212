"""Parameters, buffers and state_dict handling shared by BatchNorm and InstanceNorm.

Keys and defaults follow ``torch.nn``: optional state is registered as ``None`` so a
checkpoint's keys depend only on the flags (``affine``, ``bias``, ``track_running_stats``),
and ``torch.nn.BatchNorm2d`` and ``normlab.BatchNorm2d`` load each other's state dicts.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from normlab import _checks
from normlab.nn._script import ScriptableMixin


class CheckedHyperparameters(nn.Module):
    """Validates ``eps`` (and ``momentum``) whenever they are set, after construction
    too (a schedule, a user's ``m.eps = 0``): a bad value is refused where it is set, not
    turned into NaN output by a route that trusts the layer. ``eps_optional`` layers
    (RMSNorm) also take ``eps=None``."""

    eps_optional = False

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "eps" and not (value is None and self.eps_optional):
            value = _checks.check_eps(value)
        elif name == "momentum":
            value = _checks.check_momentum(value)
        super().__setattr__(name, value)


class NormBase(ScriptableMixin, CheckedHyperparameters):
    """Base of the layers with per-channel parameters and optional running statistics.

    Holds ``weight``/``bias`` ``[C]`` (if ``affine``), and ``running_mean``/``running_var``
    ``[C]`` with ``num_batches_tracked`` (if ``track_running_stats``).
    """

    _version = 2
    __constants__ = ["track_running_stats", "momentum", "eps", "num_features", "affine"]

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features = _checks.check_positive_int(num_features, "num_features")
        self.eps = _checks.check_eps(eps)
        self.momentum = _checks.check_momentum(momentum)
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            self.bias = nn.Parameter(torch.empty(num_features, **factory)) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, bias={self.bias is not None}, "
            f"track_running_stats={self.track_running_stats}"
        )

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Tensor],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # Checkpoints older than version 2 have no num_batches_tracked: start it at 0.
        version = local_metadata.get("version")
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
