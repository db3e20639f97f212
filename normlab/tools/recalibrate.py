"""Exact population statistics for every norm with running statistics ("precise BN").

The running averages a norm keeps during training are an exponential moving average over
batches computed with *changing* weights; after training (or after fold, prune, quantize,
SWA weight averaging) they drift from the statistics the final weights produce. Here we run
the model over a set of batches, capture each norm's input with a forward pre-hook, and
merge per-batch statistics exactly in float64 (Chan's parallel update, weighted by element
counts), then write

- BatchNorm: ``running_mean`` = mean of the inputs over all ``N x S`` positions of all
  batches, ``running_var`` = their unbiased variance (torch's convention for the buffer);
- InstanceNorm: the element-weighted average over all instances of each instance's mean and
  unbiased variance (the quantity torch's running average estimates for InstanceNorm).

Norm layers run in training mode during the passes (each normalizes with its batch
statistics, as in training); other modules keep their mode (so Dropout stays off in an
eval model). Momentum, ``num_batches_tracked``, train/eval modes and hooks are restored.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from normlab.tools._detect import is_instancenorm, tracks_running_stats

__all__ = ["recalibrate", "default_forward"]


def default_forward(model: nn.Module, batch: Any) -> Any:
    """``model(batch)`` for a tensor, ``model(batch[0])`` for an ``(input, target, ...)``
    tuple/list, ``model(**batch)`` for a mapping."""
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    if isinstance(batch, dict):
        return model(**batch)
    raise TypeError(
        f"batches must yield a Tensor, a tuple/list whose first item is the input, or a "
        f"dict of keyword inputs; got {type(batch).__name__} (pass forward_fn to handle it)"
    )


class _Stats:
    """Per-channel count, mean and M2 (sum of squared deviations) in float64, merged exactly."""

    def __init__(self, num_features: int, instance: bool) -> None:
        self.instance = instance
        zeros = torch.zeros(num_features, dtype=torch.float64)
        self.n = zeros  # [C] elements seen (BN), or elements of the instances seen (IN)
        self.mean = zeros
        self.m2 = zeros  # BN: sum of squared deviations; IN: sum of n_i * var_i

    def add(self, x: Tensor, mask: Tensor | None = None) -> None:
        """One batch ``x [N, C, *S]``; ``mask`` (bool ``[N, *S]``): its valid positions."""
        x = x.detach().to(torch.float64)
        if x.dim() < 2:
            raise ValueError(f"norm input must be [N, C, *S], got shape {tuple(x.shape)}")
        if x.numel() == 0:
            return
        if self.instance:
            if x.dim() == 2:  # unbatched [C, L]
                x = x.unsqueeze(0)
                mask = None if mask is None else mask.unsqueeze(0)
            xi = x.flatten(2)  # [N, C, L]
            valid = torch.ones(xi.shape[0], xi.shape[2], dtype=torch.float64) if mask is None \
                else mask.broadcast_to((x.shape[0], *x.shape[2:])).reshape(xi.shape[0], -1)
            valid = valid.to(xi.device, torch.float64)[:, None, :]  # [N, 1, L]
            counts = valid.sum(dim=2)  # [N, 1]: valid positions of each instance
            used = counts >= 2  # an instance of one element has no unbiased variance
            if not bool(used.any()):
                return
            per = counts.clamp_min(1)
            mean_i = (xi * valid).sum(dim=2) / per  # [N, C]
            var_i = (((xi - mean_i[..., None]) * valid) ** 2).sum(dim=2) / (per - 1).clamp_min(1)
            weight = counts * used  # element weights of the instances that count
            n_b = weight.sum(dim=0).expand(x.shape[1]).clone()
            mean_b = (mean_i * weight).sum(dim=0) / n_b
            # element-weighted sum of per-instance unbiased variances (one weight per instance)
            m2_b = (var_i * weight).sum(dim=0)
        else:
            xc = x.transpose(0, 1).reshape(x.shape[1], -1)  # [C, N*S]
            if mask is not None:  # the valid positions only
                xc = xc[:, mask.broadcast_to((x.shape[0], *x.shape[2:])).reshape(-1)]
                if xc.shape[1] == 0:
                    return
            n_b = torch.full((x.shape[1],), float(xc.shape[1]), dtype=torch.float64)
            mean_b = xc.mean(dim=1)
            m2_b = ((xc - mean_b[:, None]) ** 2).sum(dim=1)
        if n_b.shape != self.n.shape:
            raise ValueError(
                f"norm input has {n_b.numel()} channels at dim 1, expected {self.n.numel()}"
            )
        n_b, mean_b, m2_b = n_b.cpu(), mean_b.cpu(), m2_b.cpu()
        n = self.n + n_b
        delta = mean_b - self.mean
        if not self.instance:  # between-batch spread joins the pooled variance
            self.m2 = self.m2 + m2_b + delta**2 * self.n * n_b / n
        else:
            self.m2 = self.m2 + m2_b
        self.mean = self.mean + delta * n_b / n
        self.n = n

    def all_reduce(self, group: Any, device: torch.device) -> None:
        """Merge the statistics of every process of ``group`` (same layers on every rank).

        ``device`` is where the collective runs (the buffers' device: NCCL needs CUDA).
        """
        import torch.distributed as dist

        # a rank that saw nothing contributes zeros (uneven or empty shards are fine)
        total = torch.stack([self.n, self.n * self.mean]).to(device)
        dist.all_reduce(total, group=group)
        n, mean = total[0].cpu(), total[1].cpu() / total[0].cpu().clamp_min(1)
        m2 = self.m2.clone()
        if not self.instance:
            m2 += self.n * (self.mean - mean) ** 2
        m2 = m2.to(device)
        dist.all_reduce(m2, group=group)
        self.n, self.mean, self.m2 = n, mean, m2.cpu()

    def running(self) -> tuple[Tensor, Tensor]:
        if self.instance:
            return self.mean, self.m2 / self.n
        return self.mean, self.m2 / (self.n - 1).clamp_min(1)


@torch.no_grad()
def recalibrate(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int | None = None,
    process_group: Any = None,
    progress: bool = True,
    *,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
) -> nn.Module:
    """Recompute the running statistics of every norm that tracks them, exactly, in place.

    Args:
        model: any module; its torch.nn / normlab BatchNorm and InstanceNorm layers with
            ``track_running_stats=True`` are recalibrated (frozen BatchNorms are left alone).
        batches: an iterable of inputs (e.g. a DataLoader); see ``default_forward``.
        num_batches: use at most this many batches (all when None).
        process_group: a ``torch.distributed`` group (e.g. ``dist.group.WORLD``) whose ranks'
            statistics are merged with ``all_reduce`` (every rank must call this with the
            same model); None for a single process.
        progress: show a tqdm progress bar.
        forward_fn: ``forward_fn(model, batch)`` runs one batch (default ``default_forward``).
            Padded batches: a model that passes ``mask=`` to its normlab norms gets their
            statistics over the valid positions, e.g. ``forward_fn=lambda m, b: m(b[0],
            lengths=b[1])`` for a model taking the lengths.

    Returns:
        ``model`` (modified in place).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if num_batches is not None and (not isinstance(num_batches, int) or num_batches < 1):
        raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}")
    forward_fn = forward_fn or default_forward
    norms = {name: m for name, m in model.named_modules() if tracks_running_stats(m)}
    if not norms:
        warnings.warn(
            "recalibrate: the model has no norm layer with running statistics", stacklevel=2
        )
        return model

    stats = {name: _Stats(m.running_mean.numel(), is_instancenorm(m)) for name, m in norms.items()}
    modes = {m: m.training for m in model.modules()}
    saved = {
        name: (
            m.momentum,
            m.num_batches_tracked.clone()
            if getattr(m, "num_batches_tracked", None) is not None
            else None,
        )
        for name, m in norms.items()
    }
    handles = [
        m.register_forward_pre_hook(
            lambda _m, args, kwargs, s=stats[name]: s.add(
                args[0], kwargs.get("mask", args[1] if len(args) > 1 else None)
            ),
            with_kwargs=True,
        )
        for name, m in norms.items()
    ]
    try:
        for m in norms.values():
            m.train()
            # the layers' own running averages are overwritten below; momentum 0 keeps them
            # from moving meanwhile (cheaper and clearer than a cumulative average)
            m.momentum = 0.0
        total = num_batches
        if total is None and hasattr(batches, "__len__"):
            total = len(batches)  # type: ignore[arg-type]
        seen = _run(model, batches, num_batches, forward_fn, progress, total)
        if seen == 0:
            raise ValueError("batches yielded no batch; nothing to recalibrate with")
        for name, m in norms.items():
            s = stats[name]
            if process_group is not None:
                s.all_reduce(process_group, m.running_mean.device)
            if not bool((s.n > 0).all()):
                warnings.warn(
                    f"recalibrate: norm layer {name!r} saw no input; left unchanged", stacklevel=2
                )
                continue
            mean, var = s.running()
            m.running_mean.copy_(mean.to(m.running_mean))
            m.running_var.copy_(var.to(m.running_var))
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
        for name, m in norms.items():
            momentum, nbt = saved[name]
            m.momentum = momentum
            if nbt is not None:
                m.num_batches_tracked.copy_(nbt)
    return model


def _run(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int | None,
    forward_fn: Callable[[nn.Module, Any], Any],
    progress: bool,
    total: int | None,
) -> int:
    it = iter(batches) if num_batches is None else itertools.islice(batches, num_batches)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, total=total, desc="recalibrate", unit="batch", leave=False)
    seen = 0
    for batch in it:
        forward_fn(model, batch)
        seen += 1
    return seen
