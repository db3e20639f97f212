"""Cross-process BatchNorm statistics on ``torch.distributed`` (any backend: gloo, nccl).

``sync_batch_norm`` normalizes each process's slice of a global batch with the statistics
of the whole batch, exactly as one process would on the concatenated batch:

forward
    every rank computes its local per-channel ``(count, mean, M2)`` with the backend's
    fast kernels, ONE ``all_gather`` exchanges them, and every rank merges them with
    Chan's parallel formula (exact count weighting; a rank with 0 samples contributes
    nothing): ``mean = sum n_r m_r / n``, ``M2 = sum M2_r + sum n_r (m_r - mean)^2``.
channel check
    ``all_gather`` needs the same size on every rank: with different channel counts gloo
    aborts the process (SIGABRT) and other backends read garbage. So before the first
    exchange of an ``owner`` (a layer) on a group, one ``all_gather`` of a fixed-size
    header ``[C, bytes per value]`` checks that the ranks agree, and every rank raises
    the same ``ValueError`` if not. Later calls skip it: steady state stays one
    collective per forward. Without an ``owner`` every call checks.
backward
    every rank reduces its local ``(sum dy, sum dy * xhat)``, ONE ``all_reduce`` sums
    them, and the input gradient is applied locally. The weight/bias gradients stay
    local, as in ``torch.nn.SyncBatchNorm``: DistributedDataParallel sums (averages)
    parameter gradients across ranks itself.

A collective that fails (dead peer, timeout of the process group) raises a
``RuntimeError`` naming the collective instead of hanging; with nccl, timeouts are
reported by its watchdog (see ``docs/distributed.md``).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from normlab import _checks, ops, plan
from normlab import functional as F
from normlab.running import update_running_stats

__all__ = [
    "is_sync_possible",
    "world_size",
    "gather_batch_stats",
    "batch_stats",
    "normalize_synced",
    "sync_batch_norm",
    "check_global_count",
    "check_channels",
]

ProcessGroup = Any  # torch.distributed.ProcessGroup, or None for the default (WORLD) group


def world_size(process_group: ProcessGroup = None) -> int:
    """Size of ``process_group`` (default: WORLD), or 1 when torch.distributed is not running."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


def is_sync_possible(process_group: ProcessGroup = None) -> bool:
    """True when statistics can (and need to) be combined across processes."""
    return world_size(process_group) > 1


def _describe(process_group: ProcessGroup) -> str:
    try:
        backend = dist.get_backend(process_group)
        rank = dist.get_rank(process_group)
        size = dist.get_world_size(process_group)
    except Exception:  # the group itself may be what broke
        return "process group unavailable"
    return f"backend {backend}, rank {rank} of {size}"


def _collective(name: str, what: str, call: Any, *args: Any, group: ProcessGroup) -> None:
    """Run one blocking collective; re-raise a failure with the collective's name.

    A dead or missing peer surfaces as an exception from the backend once the process
    group's ``timeout`` (``init_process_group(timeout=...)``) expires, or at once when the
    peer's connection closes; either way the user learns which collective failed.
    """
    try:
        call(*args, group=group)
    except Exception as exc:  # DistBackendError, RuntimeError, ValueError from the backend
        raise RuntimeError(
            f"normlab.SyncBatchNorm: {name} of {what} failed ({_describe(group)}); a peer "
            f"process may have died, run a different number of SyncBatchNorm layers, or not "
            f"reached this step within the process group's timeout: {exc}"
        ) from exc


def _all_gather_flat(output: Tensor, input: Tensor, group: ProcessGroup) -> None:
    # torch >= 2.12 names it all_gather_single (all_gather_into_tensor is deprecated);
    # both take the flat concatenation of every rank's input as the output.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, input, group=group)


def _on_host(t: Tensor) -> bool:
    """Whether reading ``t``'s values costs no device sync (CPU tensors: gloo). Elsewhere
    the counts stay tensors on the device and every decision on them a ``torch.where``."""
    return t.is_cpu


def _stats_dtype(device: torch.device) -> torch.dtype:
    """float64 for the exchanged statistics: counts stay exact past 2**24 and the merge
    adds no rounding; MPS has no float64, so it keeps float32."""
    return torch.float32 if device.type == "mps" else torch.float64


# owner (a layer) -> the process groups its channel count was checked on. Weak on both
# sides: nothing lands in the layer's __dict__ (deepcopy, pickle and state_dict stay as
# they were), and a destroyed group can never pass for a new one at the same address.
_CHECKED: weakref.WeakKeyDictionary[Any, weakref.WeakSet[Any]] = weakref.WeakKeyDictionary()


def _group_object(process_group: ProcessGroup) -> Any:
    return process_group if process_group is not None else dist.group.WORLD


def check_channels(
    channels: int, device: torch.device, process_group: ProcessGroup = None
) -> None:
    """Check that every rank of ``process_group`` exchanges statistics of ``channels``
    channels, with ONE ``all_gather`` of a fixed-size header; raise ``ValueError`` naming
    every rank's count on every rank if not (all ranks raise at the same point, so the
    group stays usable). The header is ``[C, bytes per exchanged value]``: its size is
    the same on every rank whatever ``C`` is, which the statistics' cannot be.
    """
    work = _stats_dtype(device)
    itemsize = torch.empty(0, dtype=work).element_size()
    header = torch.tensor([channels, itemsize], dtype=torch.int64, device=device)
    size = dist.get_world_size(process_group)
    gathered = torch.empty(size * header.numel(), dtype=torch.int64, device=device)
    _collective(
        "all_gather", "channel counts", _all_gather_flat, gathered, header, group=process_group
    )
    rows = gathered.view(size, header.numel()).tolist()  # the one host read of the check
    if all(row == rows[0] for row in rows):
        return
    seen = ", ".join(
        f"rank {rank}: {c}" + ("" if b == itemsize else f" ({b}-byte statistics)")
        for rank, (c, b) in enumerate(rows)
    )
    raise ValueError(
        "normlab.SyncBatchNorm: the ranks of the process group disagree on the number of "
        f"channels ({seen}; {_describe(process_group)}). Every rank must run the same "
        "SyncBatchNorm layers, with the same num_features, in the same order."
    )


def gather_batch_stats(
    mean: Tensor,
    var: Tensor,
    count: int | Tensor,
    process_group: ProcessGroup = None,
    *,
    owner: Any = None,
) -> tuple[Tensor, Tensor, int | Tensor]:
    """Merge every rank's per-channel statistics into the global batch's: ONE all_gather.

    ``mean``/``var`` ``[C]`` are this rank's mean and biased variance over ``count``
    elements per channel (ignored when ``count == 0``). Returns the global ``(mean, var,
    count)``, ``mean``/``var`` ``[C]`` in ``mean``'s dtype, ``var`` biased; off the CPU
    (or with a tensor ``count``) ``count`` is a 0-dim tensor on the device, nothing read
    back to the host (a global count of 0 gives NaN statistics there too).

    The ranks' channel counts are checked first (``check_channels``, one more all_gather)
    on every call, or once per process group for a given ``owner``: any object that
    supports weak references, normally the calling layer.
    """
    channels = mean.shape[0]
    group_object = _group_object(process_group)
    checked = None if owner is None else _CHECKED.get(owner)
    if checked is None or group_object not in checked:
        check_channels(channels, mean.device, process_group)
        if owner is not None:  # only once it passed: a failed check is repeated
            _CHECKED.setdefault(owner, weakref.WeakSet()).add(group_object)
    work = _stats_dtype(mean.device)
    on_device = isinstance(count, Tensor) or not _on_host(mean)
    packed = torch.empty(1 + 2 * channels, dtype=work, device=mean.device)
    if on_device:
        count_t = torch.as_tensor(count, dtype=work, device=mean.device)
        packed[0] = count_t
        has = count_t > 0  # zero weight below, but 0 * NaN would still poison the sums
        packed[1 : 1 + channels] = torch.where(has, mean.to(work), 0.0)
        packed[1 + channels :] = torch.where(has, var.to(work) * count_t, 0.0)
    else:
        packed[0] = count
        if count > 0:
            packed[1 : 1 + channels] = mean
            packed[1 + channels :] = var.to(work) * count  # M2: sum of squared deviations
        else:
            packed[1:] = 0
    size = dist.get_world_size(process_group)
    gathered = torch.empty(size * packed.numel(), dtype=work, device=mean.device)
    _collective(
        "all_gather", "batch statistics", _all_gather_flat, gathered, packed, group=process_group
    )
    gathered = gathered.view(size, packed.numel())
    counts = gathered[:, :1]  # [W, 1]
    means, m2s = gathered[:, 1 : 1 + channels], gathered[:, 1 + channels :]
    if on_device:
        total_t = counts.sum()
        per = total_t.clamp_min(1)
        global_mean = (counts * means).sum(0) / per
        global_m2 = m2s.sum(0) + (counts * (means - global_mean).square()).sum(0)
        nan = torch.tensor(float("nan"), dtype=work, device=mean.device)
        empty = total_t == 0
        return (torch.where(empty, nan, global_mean).to(mean.dtype),
                torch.where(empty, nan, global_m2 / per).to(mean.dtype), total_t)
    total = int(round(float(counts.sum())))
    if total == 0:
        nan = torch.full_like(mean, float("nan"))
        return nan, nan.clone(), 0
    # Chan et al.'s parallel merge, all partitions at once: exact, and no E[x^2] - E[x]^2.
    global_mean = (counts * means).sum(0) / total
    global_m2 = m2s.sum(0) + (counts * (means - global_mean).square()).sum(0)
    return global_mean.to(mean.dtype), (global_m2 / total).to(mean.dtype), total


class _SyncBatchNormFunction(torch.autograd.Function):
    """Normalize ``x4 [N, C, 1, S]`` with given global statistics; backward sums the
    reductions across ranks.

    The statistics are inputs (computed outside under ``no_grad``), but backward returns
    the full input gradient, including the path through the global mean and variance.
    It takes and returns the 4-d view, never reshaping inside: autograd forbids in-place
    ops (``ReLU(inplace=True)``, ``out += identity``) on a Function output that is a view
    made inside the Function, while a view made outside (``normalize_synced``) is fine.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x4: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        mean: Tensor,
        var: Tensor,
        count: int,
        eps: float,
        process_group: ProcessGroup,
        backend: str | None,
        mask4: Tensor | None,
    ) -> Tensor:
        kernels = ops.pieces(x4, backend)
        y4 = kernels.normalize_with_stats(x4, mean, var, weight, bias, eps=eps)
        if y4._base is not None:  # a kernel's view of its own buffer: see the class doc
            y4 = y4.clone()
        ctx.save_for_backward(x4, weight, mean, torch.rsqrt(var + eps))
        ctx.count, ctx.group, ctx.backend, ctx.mask4 = count, process_group, backend, mask4
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y4

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy4: Tensor) -> tuple[Tensor | None, ...]:
        x4, weight, mean, rstd = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        kernels = ops.pieces(x4, ctx.backend)
        if x4.numel() > 0:
            sum_dy, sum_dy_xhat = kernels.backward_reduce(dy4, x4, mean, rstd)
        else:  # a rank with no samples still joins the collective, with zeros
            sum_dy, sum_dy_xhat = torch.zeros_like(mean), torch.zeros_like(mean)
        grad_weight = sum_dy_xhat.to(weight.dtype) if need_weight else None
        grad_bias = sum_dy.to(ctx.bias_dtype) if need_bias else None
        grad_input = None
        if need_input:
            # Every rank's output depends on every rank's input through the statistics:
            # the input gradient needs the global sums. One all_reduce carries both.
            packed = torch.cat([sum_dy, sum_dy_xhat])
            _collective(
                "all_reduce", "gradient sums (sum dy, sum dy*xhat)", dist.all_reduce, packed,
                group=ctx.group,
            )
            channels = mean.shape[0]
            global_dy, global_dy_xhat = packed[:channels], packed[channels:]
            if x4.numel() > 0 and ctx.mask4 is not None:  # the composite code reads the mask
                grad_input = ops.COMPOSITE.backward_apply(
                    dy4, x4, mean, rstd, weight, global_dy, global_dy_xhat, ctx.count, ctx.mask4
                )
            elif x4.numel() > 0:
                grad_input = kernels.backward_apply(
                    dy4, x4, mean, rstd, weight, global_dy, global_dy_xhat, ctx.count
                )
            else:
                grad_input = torch.zeros_like(x4)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None


def batch_stats(
    input: Tensor,
    process_group: ProcessGroup = None,
    *,
    backend: str | None = None,
    owner: Any = None,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor, int | Tensor]:
    """Per-channel ``(mean, biased var, count)`` of the batch concatenated over all ranks of
    ``process_group``: local moments with the backend's kernels, then ONE all_gather
    (after the channel check, see ``gather_batch_stats`` for ``owner``).

    ``input [N, C, *S]`` may be empty on some ranks. ``mean``/``var`` are ``[C]`` in the
    compute dtype (float32, float64 for float64 input); with a global count of 0 they are
    0 and 1 (nothing is normalized; nothing should be recorded), with a ``mask`` (bool
    ``[N, *S]``: statistics over its valid positions) 0 and +inf (the output is ``bias``).
    Off the CPU ``count`` is a 0-dim tensor on the device (see ``gather_batch_stats``).
    """
    if mask is not None and not _on_host(mask):  # counted on the device
        local_count: int | Tensor = mask.sum()
    else:
        local_count = _checks.valid_per_channel(input, mask)
    with torch.no_grad():
        if isinstance(local_count, Tensor) or local_count > 0:  # masked: zeros for none
            mean, var = F.batch_stats(input, mask, backend=backend)
        else:
            mean = torch.zeros(
                input.shape[1], dtype=plan.compute_dtype(input.dtype), device=input.device
            )
            var = torch.zeros_like(mean)
        mean, var, count = gather_batch_stats(
            mean, var, local_count, process_group, owner=owner
        )
    fill = 1.0 if mask is None else float("inf")
    if isinstance(count, Tensor):
        empty = count == 0
        return (torch.where(empty, 0.0, mean), torch.where(empty, fill, var), count)
    if count == 0:
        mean, var = torch.zeros_like(mean), torch.full_like(var, fill)
    return mean, var, count


def normalize_synced(
    input: Tensor,
    mean: Tensor,
    var: Tensor,
    count: int | Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    process_group: ProcessGroup = None,
    *,
    backend: str | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Normalize ``input [N, C, *S]`` with the global ``mean``/``var`` ``[C]`` of ``count``
    elements per channel (from ``batch_stats``). Differentiable w.r.t. ``input`` (through
    the statistics too: ONE all_reduce in backward, on every rank), ``weight`` and ``bias``
    (this rank's share; DDP sums the shares). The output may be modified in place. With
    the ``mask`` the statistics came from, only valid positions get their gradient terms."""
    view = plan.batch(input, True, eps)
    x4, mask4 = view.x4(input), None if mask is None else view.mask4(mask)
    y4 = _SyncBatchNormFunction.apply(
        x4, weight, bias, mean, var, count, eps, process_group, backend, mask4
    )
    # Back to [N, C, *S] outside the Function: in-place ops on this view are allowed.
    return y4.reshape(input.shape)


def sync_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    momentum: float = 0.1,
    eps: float = 1e-5,
    process_group: ProcessGroup = None,
    *,
    backend: str | None = None,
    owner: Any = None,
) -> Tensor:
    """Training-mode BatchNorm of ``input [N, C, *S]`` with statistics over all ranks.

    Every rank of ``process_group`` must call it (with any ``N``, including 0) the same
    number of times, and backward likewise. ``running_mean``/``running_var`` ``[C]``, when
    given, are updated in place with the global statistics (unbiased variance over the
    global count; a non-finite batch leaves them unchanged, with a warning). The ranks'
    channel counts are checked on every call, or once per process group for an ``owner``
    (see ``gather_batch_stats``): then the forward is one collective.
    """
    _checks.check_tensor(input)
    _checks.check_min_dim(input, 2, "[N, C, *]")
    _checks.check_eps(eps)
    _checks.check_momentum(momentum, allow_none=False)
    channels = input.shape[1]
    for name, value in (
        ("weight", weight), ("bias", bias), ("running_mean", running_mean),
        ("running_var", running_var),
    ):
        _checks.check_vector(value, name, channels, "channels of input (dim 1)")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together or both be None")
    mean, var, count = batch_stats(input, process_group, backend=backend, owner=owner)
    check_global_count(count, input)
    if running_mean is not None:
        update_running_stats(running_mean, running_var, mean, var, count, momentum)
    return normalize_synced(
        input, mean, var, count, weight, bias, eps, process_group, backend=backend
    )


def check_global_count(count: int | Tensor, input: Tensor) -> None:
    """torch's rule, applied to the global batch: training needs more than one value per
    channel. Checked after the collective, so every rank raises together (no hang). A
    count held on the device is not read (a host sync per step): as torch's SyncBatchNorm
    on a GPU, a global batch of one value then normalizes to ``bias``."""
    if isinstance(count, Tensor):
        return
    if count == 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, got 1 over all ranks of "
            f"the process group (this rank: input size {input.size()})"
        )
