"""InstanceNorm1d/2d/3d: statistics per sample and channel over the spatial dimensions."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from normlab import _checks
from normlab import functional as F
from normlab.nn.base import NormBase


class InstanceNormBase(NormBase):
    """Instance Normalization over ``input [N, C, *S]`` or unbatched ``[C, *S]``.

    Defaults follow torch: ``affine=False``, ``track_running_stats=False``. With
    running statistics, eval mode uses them; ``momentum=None`` means no update, as in
    torch's InstanceNorm (not a cumulative average as in BatchNorm).
    """

    _spatial_dims = 0

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = False,
        track_running_stats: bool = False,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias
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
        # Checkpoints from before torch 0.4 carry running stats that a non-tracking
        # InstanceNorm never had: report and drop them, as torch does.
        if local_metadata.get("version") is None and not self.track_running_stats:
            keys = (prefix + "running_mean", prefix + "running_var")
            stale = [key for key in keys if key in state_dict]
            if stale:
                error_msgs.append(
                    f"Unexpected running stats buffer(s) {stale} for {type(self).__name__} "
                    "with track_running_stats=False"
                )
                for key in stale:
                    state_dict.pop(key)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        """Normalize ``input [N, C, *S]`` (or unbatched ``[C, *S]``); ``mask`` (bool,
        broadcastable to ``[N, *S]``, or ``[*S]`` unbatched; ``True`` = valid): statistics
        over each instance's valid positions."""
        params, buffers = self._parameters, self._buffers
        weight, bias = params.get("weight"), params.get("bias")
        running_mean, running_var = buffers.get("running_mean"), buffers.get("running_var")
        use_input_stats = self.training or not self.track_running_stats
        if (
            mask is None
            and input.dim() == self._spatial_dims + 2
            and _checks.fits(input, (self.num_features,), weight, bias, running_mean,
                             running_var, at=1)
            and (input.numel() != input.shape[0] * input.shape[1] or not use_input_stats)
        ):
            return F._instance_norm(
                input, running_mean, running_var, weight, bias, use_input_stats,
                0.0 if self.momentum is None else self.momentum, self.eps,
            )
        _checks.check_tensor(input)
        _checks.check_dim(input, (self._spatial_dims + 1, self._spatial_dims + 2))
        unbatched = input.dim() == self._spatial_dims + 1
        channel_dim = 0 if unbatched else 1
        if input.shape[channel_dim] != self.num_features:
            if self.affine:
                raise ValueError(
                    f"expected input's size at dim={channel_dim} to match num_features "
                    f"({self.num_features}), got input of shape {tuple(input.shape)}"
                )
            warnings.warn(
                f"input's size at dim={channel_dim} does not match num_features; num_features "
                "is not used because affine=False",
                stacklevel=2,
            )
        batched = input.unsqueeze(0) if unbatched else input
        if unbatched and isinstance(mask, Tensor):
            mask = mask.unsqueeze(0)
        out = F.instance_norm(
            batched,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training or not self.track_running_stats,
            0.0 if self.momentum is None else self.momentum,
            self.eps,
            mask=mask,
        )
        return out.squeeze(0) if unbatched else out


class InstanceNorm1d(InstanceNormBase):
    """InstanceNorm over ``[N, C, L]`` or ``[C, L]`` (drop-in for ``torch.nn.InstanceNorm1d``)."""

    _spatial_dims = 1


class InstanceNorm2d(InstanceNormBase):
    """InstanceNorm over ``[N, C, H, W]`` or ``[C, H, W]`` (for ``torch.nn.InstanceNorm2d``)."""

    _spatial_dims = 2


class InstanceNorm3d(InstanceNormBase):
    """InstanceNorm over ``[N, C, D, H, W]`` or ``[C, D, H, W]`` (``torch.nn.InstanceNorm3d``)."""

    _spatial_dims = 3
