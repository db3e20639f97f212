"""The running statistics of the BatchNorm family: one update for every layer, variant,
backend and SyncBatchNorm.

``running = (1 - momentum) * running + momentum * batch``, the variance with Bessel's
correction (``count / (count - 1)``), a channel whose batch statistics are not finite
keeping its values (with one :class:`RuntimeWarning`). ``momentum`` is the weight of the
new batch: ``1 / num_batches_tracked`` for a cumulative average.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from normlab.plan import Plan

__all__ = ["bessel", "non_finite_count", "record", "update_running_stats", "warn_non_finite"]

# A provider's kernel for the update: (running_mean, running_var, batch_mean, batch_var,
# correction, momentum) -> channels kept (non-finite), or None where it does not apply.
UpdateKernel = Callable[[Tensor, Tensor, Tensor, Tensor, float, float], "int | None"]


def bessel(count: int) -> float:
    """The factor from the biased variance of ``count`` values to the unbiased one (1 for a
    single value, which has no spread to correct)."""
    return count / (count - 1) if count > 1 else 1.0


@torch.no_grad()
def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    batch_mean: Tensor,
    batch_var: Tensor,
    count: int | Tensor,
    momentum: float,
    *,
    unbiased: bool = False,
    kernel: UpdateKernel | None = None,
) -> None:
    """In place: ``running = (1 - momentum) * running + momentum * batch``.

    ``batch_var`` is the biased variance over ``count`` elements (``unbiased=True``: already
    the unbiased one); the running variance stores the unbiased one,
    ``var * count / (count - 1)``, as torch does. A channel
    whose batch statistics are NaN/Inf keeps its previous running values (the output
    still follows torch), so one bad batch under AMP cannot poison the model. A provider
    may pass its ``kernel`` for the arithmetic (one call instead of a handful of small ops).
    """
    if isinstance(count, Tensor):
        if _host_readable(count) and not torch.compiler.is_compiling():
            count = int(count)
        else:
            _update_counted_on_device(running_mean, running_var, batch_mean, batch_var, count,
                                      momentum, unbiased)
            return
    if count == 0:
        return  # an empty batch carries no statistics; torch leaves the buffers as they are
    correction = 1.0 if unbiased else bessel(count)
    if torch._C._are_functorch_transforms_active():
        # torch.func's transforms (grad, jacrev, jacfwd) refuse in-place writes to tensors
        # captured from outside them; an alias taken inside is the transform's own and
        # writes through (torch's instance_norm updates its buffers the same way).
        running_mean = torch.ops.aten.alias(running_mean)
        running_var = torch.ops.aten.alias(running_var)
    kept = None if kernel is None else kernel(
        running_mean, running_var, batch_mean, batch_var, correction, momentum
    )
    if kept is not None:
        if kept:
            warn_non_finite()
        return
    unbiased = batch_var * correction
    finite = torch.isfinite(batch_mean).logical_and_(torch.isfinite(unbiased))
    compiling = torch.compiler.is_compiling()
    on_cpu = _host_readable(batch_mean)
    if not compiling and on_cpu and running_mean.dtype == batch_mean.dtype and bool(finite.all()):
        # The common case, in as few small ops as possible: lerp_ is exactly
        # (1 - momentum) * running + momentum * batch.
        running_mean.lerp_(batch_mean, momentum)
        running_var.lerp_(unbiased, momentum)
        return
    work = batch_mean.dtype
    new_mean = running_mean.to(work) * (1 - momentum) + batch_mean * momentum
    new_var = running_var.to(work) * (1 - momentum) + unbiased * momentum
    if compiling or not on_cpu:
        # No data-dependent branch under torch.compile (it would break the graph), and no
        # host sync on other devices (it would stall their queue): guard unconditionally;
        # on a device the kept channels are counted there, read by ``non_finite_count``.
        running_mean.copy_(torch.where(finite, new_mean, running_mean.to(work)))
        running_var.copy_(torch.where(finite, new_var, running_var.to(work)))
        if not compiling:
            count_kept(finite)
        return
    if not bool(finite.all()):
        warn_non_finite()
        new_mean = torch.where(finite, new_mean, running_mean.to(work))
        new_var = torch.where(finite, new_var, running_var.to(work))
    running_mean.copy_(new_mean)
    running_var.copy_(new_var)


def _update_counted_on_device(
    running_mean: Tensor, running_var: Tensor, batch_mean: Tensor, batch_var: Tensor,
    count: Tensor, momentum: float, unbiased: bool,
) -> None:
    """:func:`update_running_stats` with a ``count`` held on the device (a masked batch's
    valid positions, counted by a kernel): the Bessel factor and "no value: record
    nothing" become ``torch.where``s, so nothing is read back to the host."""
    work = batch_mean.dtype
    count = count.to(work)
    correction = 1.0 if unbiased else torch.where(
        count > 1, count / (count - 1).clamp_min(1), torch.ones_like(count)
    )
    new_var = batch_var * correction
    finite = torch.isfinite(batch_mean).logical_and_(torch.isfinite(new_var))
    keep = finite.logical_and(count > 0)
    new_mean = running_mean.to(work) * (1 - momentum) + batch_mean * momentum
    new_var = running_var.to(work) * (1 - momentum) + new_var * momentum
    running_mean.copy_(torch.where(keep, new_mean, running_mean.to(work)))
    running_var.copy_(torch.where(keep, new_var, running_var.to(work)))
    if not torch.compiler.is_compiling():
        count_kept(finite.logical_or_(count <= 0))


def record(
    plan: Plan,
    running_mean: Tensor,
    running_var: Tensor,
    batch_mean: Tensor,
    batch_var: Tensor,
    kernel: UpdateKernel | None = None,
    count: int | Tensor | None = None,
    counts: Tensor | None = None,
) -> None:
    """The running update after a training call of ``plan`` with batch statistics
    ``[C]`` (BatchNorm) or ``[N, C]`` (InstanceNorm: torch averages each instance's
    statistics over the batch; the Bessel factor ``S / (S - 1)`` is the same for every
    instance, so averaging the biased variances and correcting once is the same thing).
    ``count``: the values behind each statistic when not the plan's (a masked batch's
    valid positions; 0 records nothing). ``counts [N]``: a masked InstanceNorm's valid
    positions per instance: each instance's variance is corrected by its own count, and
    the instances with fewer than two valid positions are left out."""
    if plan.per_sample and counts is not None and not _host_readable(counts):
        # per instance, on the device: the instances with two valid positions or more
        used = (counts >= 2)[:, None]
        counts = counts.to(batch_var.dtype)[:, None]
        unbiased = batch_var * counts / (counts - 1).clamp_min(1)
        n_used = used.sum().to(batch_var.dtype)
        zero = torch.zeros((), dtype=batch_var.dtype, device=batch_var.device)
        mean = torch.where(used, batch_mean, zero).sum(0) / n_used.clamp_min(1)
        var = torch.where(used, unbiased, zero).sum(0) / n_used.clamp_min(1)
        update_running_stats(running_mean, running_var, mean, var, n_used, plan.momentum,
                             unbiased=True)
        return
    if plan.per_sample and counts is not None:
        used = counts >= 2
        if not bool(used.any()):
            return
        counts = counts.to(batch_var.dtype)
        correction = (counts / (counts - 1).clamp_min(1))[:, None]
        update_running_stats(
            running_mean, running_var, batch_mean[used].mean(0),
            (batch_var * correction)[used].mean(0), int(used.sum()), plan.momentum,
            unbiased=True, kernel=kernel,
        )
        return
    if plan.per_sample:
        if plan.view[0] == 0:
            return
        batch_mean, batch_var = batch_mean.mean(0), batch_var.mean(0)
    update_running_stats(
        running_mean, running_var, batch_mean, batch_var,
        plan.values if count is None else count, plan.momentum, kernel=kernel,
    )


def _host_readable(t: Tensor) -> bool:
    """Whether reading ``t``'s values costs no device sync (CPU tensors)."""
    return t.is_cpu


# Per device: how many channels kept their running statistics (non-finite batch
# statistics), counted on the device without a host sync.
_KEPT: dict[torch.device, Tensor] = {}


def count_kept(finite: Tensor) -> None:
    """Count, on ``finite``'s device, the channels whose update was skipped."""
    kept = _KEPT.get(finite.device)
    if kept is None:
        kept = _KEPT[finite.device] = torch.zeros((), dtype=torch.long, device=finite.device)
    kept.add_(finite.numel() - finite.sum())


def non_finite_count(reset: bool = False) -> int:
    """How many channel updates were skipped on non-CPU devices since the start (or the
    last ``reset``) because their batch statistics were NaN/Inf; warns once when any were.
    Reading it synchronizes with those devices: call it when you want to know (say, once
    per epoch), not per step. On CPU the warning comes with the step itself."""
    total = sum(int(kept) for kept in _KEPT.values() if kept.device.type != "meta")
    if reset:
        for kept in _KEPT.values():
            kept.zero_()
    if total:
        warn_non_finite()
    return total


def warn_non_finite() -> None:
    """The one warning of a kept running statistic (non-finite batch statistics)."""
    warnings.warn(
        "normlab: a batch had non-finite statistics (NaN/Inf); running_mean/running_var "
        "kept their previous values for the affected channels",
        RuntimeWarning,
        stacklevel=4,
    )
