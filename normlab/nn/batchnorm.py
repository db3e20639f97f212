"""BatchNorm1d/2d/3d: statistics per channel over the batch and spatial dimensions."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from normlab import _checks, ops
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

    def _stats_frozen(self, input: Tensor) -> bool:
        """Whether this training step normalizes with the running statistics, untouched."""
        if not (self.training and self.running_mean is not None):
            return False
        return self.freeze_stats or (
            self.small_batch == "running" and _checks.one_value_per_channel(input)
        )

    def _check_input_dim(self, input: Tensor) -> None:
        """Everything that can reject ``input``, checked before any buffer changes."""
        _checks.check_tensor(input)
        _checks.check_dim(input, self._allowed_dims)
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"expected input with num_features={self.num_features} channels at dim 1, "
                f"got input of shape {tuple(input.shape)}"
            )
        if self.training and self.small_batch != "skip_update" and not self._stats_frozen(input):
            _checks.check_values_per_channel(input)
        # The layer's own tensors too (one reassigned with the wrong shape, device or
        # dtype), worded as the functional API words them: before any state moves.
        for name in ("weight", "bias", "running_mean", "running_var"):
            _checks.check_vector(
                getattr(self, name), name, self.num_features, "channels of input (dim 1)", input
            )

    def _average_factor(self) -> float:
        """Counts the batch (in training) and returns the running-average weight of it;
        call it after :meth:`_check_input_dim`."""
        if not (self.training and self.track_running_stats):
            return 0.0 if self.momentum is None else self.momentum
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum

    def _eval_direct(self, input: Tensor) -> Tensor | None:
        """Eval mode on backend ``auto`` with CPU input: ``torch.batch_norm`` on the
        running statistics (``normlab.ops.cpu.AUTO.batch_norm_eval``) in as few Python
        steps as torch's own module, or ``None`` for the general path, which checks the
        input with its messages. After a step that streamed a large tensor each Python step
        runs on a cold cache (5-40 us here); the general path's checks and dispatch cost
        ~10% of a ResNet-shape eval call."""
        running_mean = self.running_mean
        auto = ops.auto_cpu(input)
        if (
            auto is None
            or running_mean is None
            or input.dim() not in self._allowed_dims
            or input.shape[1] != self.num_features
        ):
            return None
        try:
            return auto.batch_norm_eval(
                input, running_mean, self.running_var, self.weight, self.bias, self.eps
            )
        except RuntimeError:  # torch's complaint about, say, a reassigned buffer's shape:
            return None  # the general path names the argument (ValueError)

    def _train_direct(self, input: Tensor, act: int = 0, slope: float = 0.0) -> Tensor | None:
        """Training on backend ``auto`` with CPU input: the one-call train step
        (``normlab.ops.cpu.AUTO.batch_norm_train``, with the fused activation ``act``,
        ``slope``) straight from ``forward``, or ``None`` for the general path. It takes
        only what needs none of the general path's decisions: the layer's rank and channel
        count, more than one value per channel, a fixed ``momentum``, statistics not
        frozen; the parameters and buffers are the layer's own (the step declines any of
        the wrong shape or dtype). Saves the general path's checks and dispatch,
        ~0.2 ms a step on cold caches (see ``_eval_direct``)."""
        auto = ops.auto_cpu(input)
        if (
            auto is None
            or self.freeze_stats
            or self.momentum is None
            or input.dim() not in self._allowed_dims
            or input.shape[1] != self.num_features
            or input.numel() <= self.num_features  # at most one value per channel
        ):
            return None
        track = self.track_running_stats
        if track:
            self.num_batches_tracked.add_(1)  # before the kernel, while caches are warm
        y = F.train_step(
            auto, input, self.running_mean if track else None,
            self.running_var if track else None, self.weight, self.bias, self.momentum,
            self.eps, act, slope,
        )
        if y is None and track:
            self.num_batches_tracked.sub_(1)  # declined: the general path counts the batch
        return y

    def forward(self, input: Tensor) -> Tensor:
        y = self._train_direct(input) if self.training else self._eval_direct(input)
        if y is not None:
            return y
        self._check_input_dim(input)
        if self._stats_frozen(input):
            return F.batch_norm(
                input, self.running_mean, self.running_var, self.weight, self.bias,
                False, 0.0, self.eps,
            )
        if self.training and _checks.one_value_per_channel(input):  # small_batch="skip_update"
            y4, _, _ = ops.resolve(input).normalize(
                input.reshape(1, -1, 1, 1), self.weight, self.bias,
                per_sample=False, center=True, eps=self.eps,
            )
            return y4.reshape(input.shape)
        factor = self._average_factor()
        # Batch statistics in training, and in eval when there are no running ones.
        use_batch_stats = self.training or self.running_mean is None
        track = not self.training or self.track_running_stats
        return F.batch_norm(
            input,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.weight,
            self.bias,
            use_batch_stats,
            factor,
            self.eps,
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
