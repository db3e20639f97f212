"""Ghost BatchNorm (Hoffer et al., 2017; tf.keras ``virtual_batch_size``).

In training the batch is cut into consecutive virtual batches of ``virtual_batch_size``
samples (the last one may be shorter), and each is normalized with its own statistics: the
output is exactly ``torch.cat([bn(chunk) for chunk in input.split(virtual_batch_size)])``.
``weight``/``bias`` and the running statistics are shared. How the running statistics
follow the virtual batches is ``running_update``:

- ``"mean"`` (default, tf.keras): **one** update per training step with the average over
  the virtual batches of their means and of their unbiased variances; ``num_batches_tracked``
  counts steps, so ``momentum`` means what it means for BatchNorm.
- ``"sequential"``: one update per virtual batch, in order (``num_batches_tracked`` counts
  virtual batches): buffers equal those of a plain BatchNorm applied chunk by chunk.

tf.keras assigns samples to virtual batches with a stride (sample ``i`` to ``i % (N/V)``);
consecutive chunks are the torch idiom and make no difference for shuffled data.
Inference is plain BatchNorm with the running statistics.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from normlab import _checks
from normlab import functional as F
from normlab.nn.batchnorm import BatchNormBase
from normlab.running import bessel, update_running_stats

__all__ = ["GhostBatchNormBase", "GhostBatchNorm1d", "GhostBatchNorm2d", "RUNNING_UPDATES"]

RUNNING_UPDATES = ("mean", "sequential")


class GhostBatchNormBase(BatchNormBase):
    """Ghost BatchNorm over ``input [N, C, *S]`` with keyword-only ``virtual_batch_size``
    (samples per virtual batch) and ``running_update`` (``"mean"`` or ``"sequential"``)."""

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
        virtual_batch_size: int,
        running_update: str = "mean",
        **kwargs: Any,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs
        )
        self.virtual_batch_size = _checks.check_positive_int(
            virtual_batch_size, "virtual_batch_size"
        )
        if running_update not in RUNNING_UPDATES:
            raise ValueError(
                f"running_update must be one of {RUNNING_UPDATES}, got {running_update!r}"
            )
        self.running_update = running_update

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}, "
            f"running_update={self.running_update!r}"
        )

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        """Ghost BatchNorm of ``input [N, C, *S]``; ``mask`` (bool ``[N, *S]``, ``True`` =
        valid): each virtual batch's statistics over its valid positions; a virtual batch
        of padding only records nothing."""
        mask = self._check_input_dim(input, mask)
        vbs = self.virtual_batch_size
        if (
            not self.training
            or input.shape[0] <= vbs
            or self._stats_frozen(input, mask)
            or self._one_value(input, mask)
        ):
            return super().forward(input, mask)  # one virtual batch is plain BatchNorm
        chunks = input.split(vbs)
        if chunks[-1].numel() // input.shape[1] == 1:
            raise ValueError(
                f"the last virtual batch has 1 value per channel: input batch {input.shape[0]} "
                f"with virtual_batch_size={vbs} leaves a single sample of shape "
                f"{tuple(input.shape[1:])}; choose a virtual_batch_size that divides the batch"
            )
        masks = [None] * len(chunks) if mask is None else mask.split(vbs)
        outputs, means, variances, counts = [], [], [], []
        for chunk, chunk_mask in zip(chunks, masks, strict=True):
            y, mean, var = F.stats_and_output(
                chunk, self.weight, self.bias, self.eps, mask=chunk_mask
            )
            outputs.append(y)
            count = _checks.valid_per_channel(chunk, chunk_mask)
            if count:  # a virtual batch of padding only has no statistics to record
                means.append(mean)
                variances.append(var)
                counts.append(count)
        if self.track_running_stats and counts:
            self._update(means, variances, counts)
        return torch.cat(outputs, dim=0)

    def _update(self, means: list[Tensor], variances: list[Tensor], counts: list[int]) -> None:
        if self.running_update == "sequential":
            for mean, var, count in zip(means, variances, counts, strict=True):
                update_running_stats(
                    self.running_mean, self.running_var, mean, var, count, self._average_factor()
                )
            return
        unbiased = [v * bessel(n) for v, n in zip(variances, counts, strict=True)]
        update_running_stats(
            self.running_mean, self.running_var, torch.stack(means).mean(0),
            torch.stack(unbiased).mean(0), sum(counts), self._average_factor(), unbiased=True,
        )


class GhostBatchNorm1d(GhostBatchNormBase):
    """Ghost BatchNorm over ``[N, C]`` or ``[N, C, L]`` input."""

    _allowed_dims = (2, 3)


class GhostBatchNorm2d(GhostBatchNormBase):
    """Ghost BatchNorm over ``[N, C, H, W]`` input."""

    _allowed_dims = (4,)
