"""BatchNorm1d/2d/3d: statistics per channel over the batch and spatial dimensions."""

from __future__ import annotations

from torch import Tensor

from normlab import _checks
from normlab import functional as F
from normlab.nn.base import NormBase


class BatchNormBase(NormBase):
    """Batch Normalization (Ioffe & Szegedy, 2015) over ``input [N, C, *S]``.

    ``y = (x - mean) / sqrt(var + eps) * weight + bias`` with the batch's statistics
    over ``(N, *S)`` in training, and ``running_mean``/``running_var`` in eval (when
    ``track_running_stats``). ``momentum`` weighs the new batch in the running average
    (Keras' ``momentum=0.99`` is ``0.01`` here); ``None`` means a cumulative average.
    """

    _allowed_dims: tuple[int, ...] = ()

    def _check_input_dim(self, input: Tensor) -> None:
        """Everything that can reject ``input``, checked before any buffer changes."""
        _checks.check_tensor(input)
        _checks.check_dim(input, self._allowed_dims)
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"expected input with num_features={self.num_features} channels at dim 1, "
                f"got input of shape {tuple(input.shape)}"
            )
        if self.training:
            _checks.check_values_per_channel(input)

    def _average_factor(self) -> float:
        """Counts the batch (in training) and returns the running-average weight of it."""
        if not (self.training and self.track_running_stats):
            return 0.0 if self.momentum is None else self.momentum
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
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
