"""BatchNorm1d/2d/3d: statistics per channel over the batch and spatial dimensions."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from normlab import _checks
from normlab import functional as F
from normlab.nn.base import NormBase

SMALL_BATCH_POLICIES = ("error", "running", "skip_update")


class BatchNormBase(NormBase):
    """Batch Normalization (Ioffe & Szegedy, 2015) over ``input [N, C, *S]``.

    ``y = (x - mean) / sqrt(var + eps) * weight + bias`` with the batch's statistics
    over ``(N, *S)`` in training, and ``running_mean``/``running_var`` in eval (when
    ``track_running_stats``). ``momentum`` weighs the new batch in the running average
    (Keras' ``momentum=0.99`` is ``0.01`` here); ``None`` means a cumulative average.

    Beyond torch (plain attributes, not in the state_dict):

    - ``freeze_stats`` (default ``False``; set it on the layer, it survives ``.train()``):
      in training, normalize with the running statistics and leave them and
      ``num_batches_tracked`` unchanged; ``weight``/``bias`` still get gradients.
    - ``small_batch`` (keyword-only): what a training batch with one value per channel does:
      ``"error"`` (torch's ValueError), ``"running"`` (normalize with the running
      statistics, no update) or ``"skip_update"`` (normalize with the batch's own
      statistics, so the output is ``bias``, and update nothing).
    """

    _allowed_dims: tuple[int, ...] = ()
    freeze_stats: bool = False
    small_batch: str = "error"
    # The fused activation (BatchNormAct* set their own).
    act: str = "identity"
    slope: float = 0.0

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
        small_batch: str = "error",
        **kwargs: Any,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs
        )
        if small_batch not in SMALL_BATCH_POLICIES:
            raise ValueError(
                f"small_batch must be one of {SMALL_BATCH_POLICIES}, got {small_batch!r}"
            )
        self.small_batch = small_batch

    @staticmethod
    def _one_value(input: Tensor, mask: Tensor | None = None) -> bool:
        """Whether the batch holds one value per channel (one valid position if masked;
        counted on the CPU only: elsewhere it would cost a host sync per step)."""
        if mask is None:
            return _checks.one_value_per_channel(input)
        return mask.is_cpu and _checks.valid_per_channel(input, mask) == 1

    def _stats_frozen(self, input: Tensor, mask: Tensor | None = None) -> bool:
        """Whether this training step normalizes with the running statistics, untouched."""
        if not (self.training and self._buffers.get("running_mean") is not None):
            return False
        return self.freeze_stats or (
            self.small_batch == "running" and self._one_value(input, mask)
        )

    def _check_input_dim(self, input: Tensor, mask: Tensor | None = None) -> Tensor | None:
        """Everything that can reject ``input`` (and ``mask``), checked before any buffer
        changes; returns the mask broadcast to ``[N, *S]``."""
        params, buffers = self._parameters, self._buffers
        if mask is None and (
            _checks.fits(
                input, (self.num_features,), params.get("weight"), params.get("bias"),
                buffers.get("running_mean"), buffers.get("running_var"), at=1,
            )
            and input.dim() in self._allowed_dims
            and (input.numel() != input.shape[1] or input.numel() == 0)  # not one value each
        ):
            return None
        _checks.check_tensor(input)
        _checks.check_dim(input, self._allowed_dims)
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"expected input with num_features={self.num_features} channels at dim 1, "
                f"got input of shape {tuple(input.shape)}"
            )
        if mask is not None:
            mask = _checks.check_mask(input, mask)
        frozen = self._stats_frozen(input, mask)
        if self.training and self.small_batch != "skip_update" and not frozen:
            _checks.check_values_per_channel(input, mask)
        elif not self.training and self._buffers.get("running_mean") is None:  # batch stats
            _checks.check_values_per_channel(input, mask)
        # The layer's own tensors too (one reassigned with the wrong shape, device or
        # dtype), worded as the functional API words them: before any state moves.
        _checks.check_vectors(
            input, self.num_features, "channels of input (dim 1)",
            weight=params.get("weight"), bias=params.get("bias"),
            running_mean=buffers.get("running_mean"), running_var=buffers.get("running_var"),
        )
        return mask

    def _average_factor(self) -> float:
        """Counts the batch (in training) and returns the running-average weight of it;
        call it after :meth:`_check_input_dim`."""
        if not (self.training and self.track_running_stats):
            return 0.0 if self.momentum is None else self.momentum
        tracked = self.num_batches_tracked
        tracked.add_(1)
        if self.momentum is None:
            return 1.0 / self._batches_seen(tracked)
        return self.momentum

    def _batches_seen(self, tracked: Tensor) -> int:
        """``num_batches_tracked`` as a Python int, read from the buffer only when something
        else than this layer's own counting changed it (a checkpoint, a reset): on a GPU,
        reading it every step would stall the queue."""
        seen = self.__dict__.get("_seen")
        if seen is not None and seen[0] is tracked and seen[1] == tracked._version - 1:
            count = seen[2] + 1
        else:
            count = int(tracked)
        self.__dict__["_seen"] = (tracked, tracked._version, count)
        return count

    def _step(
        self, input: Tensor, mask: Tensor | None = None
    ) -> tuple[bool, Tensor | None, Tensor | None, float]:
        """``(batch_stats, running_mean, running_var, momentum)`` of this call, the batch
        counted where it will be recorded; after :meth:`_check_input_dim`."""
        buffers = self._buffers
        running_mean, running_var = buffers.get("running_mean"), buffers.get("running_var")
        if not self.training:
            return running_mean is None, running_mean, running_var, 0.0
        if self._stats_frozen(input, mask):
            return False, running_mean, running_var, 0.0
        if (
            not self.track_running_stats
            or self._one_value(input, mask)  # small_batch="skip_update"
            # all padding records nothing (off the CPU the running update itself skips it,
            # on the device; num_batches_tracked still counts the batch there)
            or (mask is not None and mask.is_cpu and not bool(mask.any()))
        ):
            return True, None, None, 0.0
        return True, running_mean, running_var, self._average_factor()

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        """Normalize ``input [N, C, *S]``; ``mask`` (bool, broadcastable to ``[N, *S]``,
        ``True`` = valid) restricts the batch statistics and the running update to the
        valid positions (``normlab.functional.batch_norm``)."""
        params, buffers = self._parameters, self._buffers
        weight, bias = params.get("weight"), params.get("bias")
        running_mean, running_var = buffers.get("running_mean"), buffers.get("running_var")
        if (
            mask is None
            and not self.freeze_stats
            and _checks.fits(input, (self.num_features,), weight, bias, running_mean,
                             running_var, at=1)
            and input.dim() in self._allowed_dims
            and input.numel() != input.shape[1]  # more than one value per channel, or none
        ):
            # The common case, checked in a few compares: the step needs no other decision.
            if not self.training:
                batch_stats, momentum = running_mean is None, 0.0
            elif self.track_running_stats:
                batch_stats, momentum = True, self._average_factor()
            else:
                batch_stats, momentum = True, 0.0
            return F._batch_norm(
                input, running_mean, running_var, weight, bias, batch_stats, momentum,
                self.eps, self.act, self.slope,
            )
        mask = self._check_input_dim(input, mask)
        batch_stats, running_mean, running_var, momentum = self._step(input, mask)
        return F._batch_norm(
            input, running_mean, running_var, weight, bias, batch_stats, momentum, self.eps,
            self.act, self.slope, None, mask if batch_stats else None,
        )


class BatchNorm1d(BatchNormBase):
    """BatchNorm over ``[N, C]`` or ``[N, C, L]`` input (drop-in for ``torch.nn.BatchNorm1d``)."""

    _allowed_dims = (2, 3)


class BatchNorm2d(BatchNormBase):
    """BatchNorm over ``[N, C, H, W]`` input (drop-in for ``torch.nn.BatchNorm2d``)."""

    _allowed_dims = (4,)


class BatchNorm3d(BatchNormBase):
    """BatchNorm over ``[N, C, D, H, W]`` input (drop-in for ``torch.nn.BatchNorm3d``)."""

    _allowed_dims = (5,)
