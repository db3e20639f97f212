"""One rank of a gloo process group, launched by tests/distributed/test_syncbatchnorm.py.

    python _worker.py RANK WORLD_SIZE PORT OUT_DIR

Phase "equivalence": every rank builds the same global batch from a seed, runs its slice
through ``normlab.SyncBatchNorm`` and compares with ``torch.nn.BatchNorm*d`` run in this
process on the whole batch. Phase "inplace": the same for a ResNet-like model whose
SyncBatchNorm outputs are modified in place. Phase "channels": the last rank's layer has
one more channel. Phase "failure": the last rank dies or hangs. Each phase writes
``OUT_DIR/{phase}_rank{RANK}.json``: ``{check name: [error, tolerance]}`` (errors are
max |a - b| / max(1, |b|)), which the pytest side asserts one by one.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from normlab import distributed as D
from normlab import ops
from normlab.nn.act import BatchNormAct2d
from normlab.nn.batchnorm import BatchNorm1d
from normlab.nn.syncbatchnorm import SyncBatchNorm, convert_sync_batchnorm, revert_sync_batchnorm

# name, spatial shape, dtype, channels_last, momentum, split, affine, track_running_stats, offset
# split: how the global batch is dealt out; "uneven" is 3/5/8 over 3 ranks (3/5 over 2),
# "empty" gives rank 0 no samples at all.
CASES: list[tuple[str, tuple[int, ...], str, bool, float | None, str, bool, bool, float]] = [
    ("1d_NC_fp32_even", (), "float32", False, 0.1, "even", True, True, 0.0),
    ("1d_NCL_fp64_uneven", (7,), "float64", False, 0.1, "uneven", True, True, 0.0),
    ("2d_fp32_uneven", (4, 5), "float32", False, 0.1, "uneven", True, True, 0.0),
    ("2d_fp64_uneven", (4, 5), "float64", False, 0.3, "uneven", True, True, 0.0),
    ("2d_fp32_channels_last_uneven", (4, 5), "float32", True, 0.1, "uneven", True, True, 0.0),
    ("2d_fp64_channels_last_empty", (3, 4), "float64", True, 0.1, "empty", True, True, 0.0),
    ("2d_fp64_momentum_none_uneven", (3, 3), "float64", False, None, "uneven", True, True, 0.0),
    ("2d_fp32_momentum_none_empty", (3, 3), "float32", False, None, "empty", True, True, 0.0),
    ("2d_fp32_no_affine_empty", (4, 4), "float32", False, 0.1, "empty", False, True, 0.0),
    ("2d_fp64_no_running_stats_uneven", (4, 4), "float64", False, 0.1, "uneven", True, False, 0.0),
    ("3d_fp32_uneven", (2, 3, 4), "float32", False, 0.1, "uneven", True, True, 0.0),
    ("3d_fp64_channels_last_empty", (2, 3, 2), "float64", True, 0.1, "empty", True, True, 0.0),
    # x = 1e4 + noise: E[x^2] - E[x]^2 would lose ~1e-8 of the variance even in float64.
    ("2d_fp64_large_mean_uneven", (4, 5), "float64", False, 0.1, "uneven", True, True, 1e4),
]
CHANNELS = 3
STEPS = 2  # two training steps: running statistics and momentum=None accumulate
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}

# Every collective torch.distributed offers; the count test wraps them all.
COLLECTIVES = (
    "all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_single",
    "all_gather_into_tensor", "all_gather_object", "all_gather_coalesced", "broadcast",
    "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_single",
    "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather", "scatter",
    "barrier", "send", "recv", "isend", "irecv", "batch_isend_irecv",
)


def split_counts(split: str, world: int) -> list[int]:
    if split == "even":
        return [4] * world
    if split == "uneven":
        return [3, 5, 8][:world]
    if split == "empty":
        return [0, 5, 8][:world]
    raise ValueError(split)


@contextmanager
def count_collectives() -> Iterator[dict[str, int]]:
    """Counts calls of every public torch.distributed collective inside the block."""
    calls: dict[str, int] = {}
    saved = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            calls[name] = calls.get(name, 0) + 1
            return fn(*args, **kwargs)

        return counted

    for name, fn in saved.items():
        setattr(dist, name, wrap(name, fn))
    try:
        yield calls
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    if actual.shape != expected.shape:
        return float("inf")
    if actual.numel() == 0:
        return 0.0
    return float(((actual - expected).abs() / expected.abs().clamp(min=1)).max())


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (outside the counted windows: only used to check parameter grads)."""
    t = t.detach().clone()
    dist.all_reduce(t)
    return t


def torch_bn(dims: int, **kwargs: Any) -> nn.Module:
    return {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims](
        **kwargs
    )


def run_case(index: int, case: tuple, rank: int, world: int, out: dict[str, list[float]]) -> None:
    name, spatial, dtype_name, channels_last, momentum, split, affine, track, offset = case
    dtype = getattr(torch, dtype_name)
    tol = TOL[dtype]
    counts = split_counts(split, world)
    lo, hi = sum(counts[:rank]), sum(counts[: rank + 1])
    kwargs = dict(momentum=momentum, affine=affine, track_running_stats=track, dtype=dtype)
    sync = SyncBatchNorm(CHANNELS, **kwargs)
    ref = torch_bn(len(spatial), num_features=CHANNELS, **kwargs)
    gen = torch.Generator().manual_seed(1000 + index)
    if affine:
        with torch.no_grad():
            for p in ("weight", "bias"):
                value = torch.randn(CHANNELS, generator=gen, dtype=dtype)
                getattr(sync, p).copy_(value)
                getattr(ref, p).copy_(value)
    memory_format = {2: torch.channels_last, 3: torch.channels_last_3d}.get(len(spatial))
    for step in range(STEPS):
        shape = (sum(counts), CHANNELS, *spatial)
        scale = torch.rand(CHANNELS, generator=gen, dtype=dtype).add(0.5)
        full = offset + torch.randn(shape, generator=gen, dtype=dtype) * scale.view(
            1, CHANNELS, *[1] * len(spatial)
        )
        grad_full = torch.randn(shape, generator=gen, dtype=dtype)
        x_full = full.clone().requires_grad_(True)
        x_local = full[lo:hi].clone()
        if channels_last:
            x_local = x_local.contiguous(memory_format=memory_format)
        x_local.requires_grad_(True)
        with count_collectives() as fwd_calls:
            y_local = sync(x_local)
        with count_collectives() as bwd_calls:
            (y_local * grad_full[lo:hi]).sum().backward()
        y_full = ref(x_full)
        (y_full * grad_full).sum().backward()
        tag = f"{name}/step{step}"
        # The layer's first step adds the all_gather of the channel check; then only one.
        expected = 2 if step == 0 else 1
        out[f"{tag}/collectives_forward"] = [abs(sum(fwd_calls.values()) - expected), 0]
        gathers = fwd_calls.get("all_gather_single", 0) + fwd_calls.get("all_gather_into_tensor", 0)
        out[f"{tag}/all_gather_forward"] = [abs(gathers - expected), 0]
        out[f"{tag}/collectives_backward"] = [abs(sum(bwd_calls.values()) - 1), 0]
        out[f"{tag}/all_reduce_backward"] = [abs(bwd_calls.get("all_reduce", 0) - 1), 0]
        out[f"{tag}/output"] = [rel_err(y_local, y_full[lo:hi]), tol]
        out[f"{tag}/grad_input"] = [rel_err(x_local.grad, x_full.grad[lo:hi]), tol]
        if affine:
            for p in ("weight", "bias"):
                local = getattr(sync, p).grad
                out[f"{tag}/grad_{p}"] = [rel_err(all_sum(local), getattr(ref, p).grad), tol]
                getattr(sync, p).grad = None
                getattr(ref, p).grad = None
        if track:
            out[f"{tag}/running_mean"] = [rel_err(sync.running_mean, ref.running_mean), tol]
            out[f"{tag}/running_var"] = [rel_err(sync.running_var, ref.running_var), tol]
            out[f"{tag}/num_batches_tracked"] = [
                abs(int(sync.num_batches_tracked) - int(ref.num_batches_tracked)), 0
            ]
    if track:
        # Eval: running statistics, no collective at all.
        sync.eval()
        ref.eval()
        x = full[lo:hi]
        with count_collectives() as eval_calls, torch.no_grad():
            y = sync(x)
        out[f"{name}/eval_output"] = [rel_err(y, ref(full)[lo:hi]), tol]
        out[f"{name}/eval_collectives"] = [sum(eval_calls.values()), 0]


def make_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2), BatchNormAct2d(8, act="silu"),  # -> SyncBatchNormAct
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5), nn.BatchNorm1d(5),
    )


def run_ddp(rank: int, world: int, out: dict[str, list[float]]) -> None:
    """3 SGD steps under DDP with SyncBatchNorm == 3 single-process steps on the full batch."""
    torch.manual_seed(0)
    ref = make_cnn()
    model = convert_sync_batchnorm(copy.deepcopy(ref))
    # Default broadcast_buffers=True: rank 0's running statistics are broadcast every
    # forward; with SyncBatchNorm they are equal on every rank anyway.
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    counts = split_counts("uneven", world)
    total = sum(counts)
    lo, hi = sum(counts[:rank]), sum(counts[: rank + 1])
    gen = torch.Generator().manual_seed(7)
    for _ in range(3):
        x = torch.randn(total, 3, 8, 8, generator=gen)
        target = torch.randint(0, 5, (total,), generator=gen)
        # DDP averages gradients over ranks: scaling each rank's summed loss by world/total
        # makes that average the gradient of the full batch's mean loss, even when uneven.
        loss = nn.functional.cross_entropy(ddp(x[lo:hi]), target[lo:hi], reduction="sum")
        opt.zero_grad()
        (loss * world / total).backward()
        opt.step()
        ref_opt.zero_grad()
        nn.functional.cross_entropy(ref(x), target).backward()
        ref_opt.step()
    for (key, value), ref_value in zip(
        model.state_dict().items(), ref.state_dict().values(), strict=True
    ):
        out[f"ddp/{key}"] = [rel_err(value.double(), ref_value.double()), 1e-5]
    # Back to plain layers: same classes as the original model, same values.
    plain = revert_sync_batchnorm(model)
    out["ddp/revert_types"] = [
        float([type(m) for m in plain.modules()] != [type(m) for m in ref.modules()]), 0
    ]


def run_global_batch_rules(rank: int, world: int, out: dict[str, list[float]]) -> None:
    """Rules that depend on the batch size use the GLOBAL batch, so every rank agrees.

    Only the last rank holds one sample (one value per channel over the whole group), or
    no rank holds any; compared with single-process torch/normlab BatchNorm on that batch.
    """
    import normlab.nn as nlnn

    gen = torch.Generator().manual_seed(99)
    one = torch.randn(1, CHANNELS, generator=gen)
    mine = one if rank == world - 1 else one[:0]
    stats = {"running_mean": torch.randn(CHANNELS, generator=gen),
             "running_var": torch.rand(CHANNELS, generator=gen) + 0.5}

    def make(**kwargs: Any) -> SyncBatchNorm:
        layer = SyncBatchNorm(CHANNELS, **kwargs)
        layer.load_state_dict({**layer.state_dict(), **stats})
        with torch.no_grad():
            layer.weight.normal_(generator=gen)
            layer.bias.normal_(generator=gen)
        return layer

    def unchanged(layer: nn.Module, name: str, batches: int = 0) -> None:
        for key, value in stats.items():
            out[f"rules/{name}/{key}_unchanged"] = [rel_err(getattr(layer, key), value), 0]
        out[f"rules/{name}/num_batches_tracked"] = [abs(int(layer.num_batches_tracked) - batches),
                                                    0]

    # small_batch="error" (torch's rule): every rank raises, nothing is counted.
    layer = make()
    try:
        layer(mine)
        out["rules/error/raised"] = [1, 0]
    except ValueError as exc:
        out["rules/error/raised"] = [float("more than 1 value per channel" not in str(exc)), 0]
    unchanged(layer, "error")
    # small_batch="running": the running statistics normalize; no collective in backward.
    layer = make(small_batch="running")
    x = mine.clone().requires_grad_(True)
    with count_collectives() as calls:
        y = layer(x)
        y.sum().backward()
    ref = nlnn.BatchNorm1d(CHANNELS)
    ref.load_state_dict(layer.state_dict())
    out["rules/running/output"] = [rel_err(y, ref.eval()(mine)), 1e-6]
    # The statistics' all_gather, after the channel check's (a fresh layer).
    out["rules/running/collectives"] = [abs(sum(calls.values()) - 2), 0]
    unchanged(layer, "running")
    # small_batch="skip_update": the batch's own statistics (output = bias), no update.
    layer = make(small_batch="skip_update")
    y = layer(mine)
    y.sum().backward()
    out["rules/skip_update/output"] = [rel_err(y, layer.bias.detach().expand_as(y)), 1e-6]
    unchanged(layer, "skip_update")
    # freeze_stats: plain BatchNorm with the running statistics, no collective at all.
    layer = make()
    layer.freeze_stats = True
    x = torch.randn(2 + rank, CHANNELS, generator=gen)
    with count_collectives() as calls:
        y = layer(x)
        y.sum().backward()
    ref = nlnn.BatchNorm1d(CHANNELS)
    ref.load_state_dict(layer.state_dict())
    out["rules/frozen/output"] = [rel_err(y, ref.eval()(x)), 1e-6]
    out["rules/frozen/collectives"] = [sum(calls.values()), 0]
    unchanged(layer, "frozen")
    # No sample anywhere: an empty output and untouched statistics, counted like torch does.
    layer = make()
    x = torch.empty(0, CHANNELS, 4, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    out["rules/empty/output_shape"] = [float(y.shape != x.shape or x.grad.shape != x.shape), 0]
    unchanged(layer, "empty", batches=1)


def equivalence(rank: int, world: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    # The kernels serving the local part (NORMLAB_BACKEND, set per group by the test).
    out[f"backend/{ops.pieces(torch.empty(2, 2)).name}"] = [0, 0]
    for index, case in enumerate(CASES):
        run_case(index, case, rank, world, out)
    run_ddp(rank, world, out)
    run_global_batch_rules(rank, world, out)
    return out


class ResidualNet(nn.Module):
    """A stem and a torchvision BasicBlock: every BatchNorm output is modified in place,
    by ``ReLU(inplace=True)`` or by ``out += identity``; plus a norm+act layer (identity
    activation: its output is the norm's) modified in place."""

    def __init__(self) -> None:
        super().__init__()
        kw = dict(kernel_size=3, padding=1, bias=False, dtype=torch.float64)
        self.stem = nn.Sequential(
            nn.Conv2d(3, 4, **kw), nn.BatchNorm2d(4, dtype=torch.float64), nn.ReLU(inplace=True)
        )
        self.conv1, self.bn1 = nn.Conv2d(4, 4, **kw), nn.BatchNorm2d(4, dtype=torch.float64)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, **kw), nn.BatchNorm2d(4, dtype=torch.float64)
        self.conv3 = nn.Conv2d(4, 4, **kw)
        self.bn3 = BatchNormAct2d(4, act="identity", dtype=torch.float64)  # -> SyncBatchNormAct
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        out = self.relu(out)
        y = self.bn3(self.conv3(out))
        y.mul_(2.0)
        return y


def inplace(rank: int, world: int) -> dict[str, list[float]]:
    """SyncBatchNorm outputs modified in place (ReLU(inplace=True), ``+=`` residual) give
    the outputs, gradients (input, every parameter) and running statistics of
    single-process ``torch.nn.BatchNorm2d`` on the concatenated batch."""
    out: dict[str, list[float]] = {}
    torch.manual_seed(3)
    ref = ResidualNet()
    with torch.no_grad():  # non-trivial affine parameters
        for module in ref.modules():
            if hasattr(module, "running_mean"):  # torch's and normlab's BatchNorm layers
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    model = convert_sync_batchnorm(copy.deepcopy(ref))
    gen = torch.Generator().manual_seed(11)
    for split in ("uneven", "empty"):
        counts = split_counts(split, world)
        lo, hi = sum(counts[:rank]), sum(counts[: rank + 1])
        full = torch.randn(sum(counts), 3, 5, 5, generator=gen, dtype=torch.float64)
        grad = torch.randn(sum(counts), 4, 5, 5, generator=gen, dtype=torch.float64)
        x_full = full.clone().requires_grad_(True)
        x_local = full[lo:hi].clone().requires_grad_(True)
        y_local = model(x_local)
        (y_local * grad[lo:hi]).sum().backward()
        y_full = ref(x_full)
        (y_full * grad).sum().backward()
        tag = f"inplace/{split}"
        out[f"{tag}/output"] = [rel_err(y_local, y_full[lo:hi]), 1e-10]
        out[f"{tag}/grad_input"] = [rel_err(x_local.grad, x_full.grad[lo:hi]), 1e-10]
        for (key, p), p_ref in zip(model.named_parameters(), ref.parameters(), strict=True):
            out[f"{tag}/grad/{key}"] = [rel_err(all_sum(p.grad), p_ref.grad), 1e-10]
        for (key, b), b_ref in zip(model.named_buffers(), ref.buffers(), strict=True):
            out[f"{tag}/buffer/{key}"] = [rel_err(b.double(), b_ref.double()), 1e-10]
        model.zero_grad()
        ref.zero_grad()
    out["inplace/converted"] = [
        float(sum(isinstance(m, SyncBatchNorm) for m in model.modules()) != 4), 0
    ]
    return out


def channels(rank: int, world: int) -> dict[str, list[float]]:
    """The last rank's layer has one channel more: every rank must raise ValueError naming
    every rank's count (gloo used to abort one process with SIGABRT); the group stays
    usable afterwards."""
    out: dict[str, list[float]] = {}
    counts = [CHANNELS] * (world - 1) + [CHANNELS + 1]
    expected = ", ".join(f"rank {r}: {c}" for r, c in enumerate(counts))
    mine = counts[rank]
    layer = SyncBatchNorm(mine)
    calls = {
        "layer": lambda: layer(torch.randn(4, mine, 3)),
        "layer_again": lambda: layer(torch.randn(4, mine, 3)),  # not marked as checked
        "functional": lambda: D.sync_batch_norm(torch.randn(2, mine, 2), None, None),
    }
    for name, call in calls.items():
        try:
            call()
            out[f"channels/{name}/raised"] = [1, 0]
        except ValueError as exc:
            out[f"channels/{name}/raised"] = [0, 0]
            out[f"channels/{name}/names_counts"] = [float(expected not in str(exc)), 0]
    # Every rank raised at the same point: the next collectives still line up.
    ok = SyncBatchNorm(CHANNELS)
    x = torch.randn(2 + rank, CHANNELS, 3, requires_grad=True)
    ok(x).sum().backward()
    out["channels/group_usable_after"] = [float(x.grad is None), 0]
    return out


TIMEOUT_S = 3.0  # of the group the failure phase runs on


def failure(rank: int, world: int) -> dict[str, list[float]]:
    """The last rank misbehaves; the others must get errors naming the collective, in time.

    With 2 ranks it dies (sockets close; gloo notices at once), with 3 it hangs alive
    (only the process group's timeout can tell). A fresh group with a short timeout is
    created once every rank is up, so a slow start on a busy machine cannot trip it.
    """
    out: dict[str, list[float]] = {}
    group = dist.new_group(list(range(world)), timeout=datetime.timedelta(seconds=TIMEOUT_S))
    layer = SyncBatchNorm(CHANNELS, process_group=group)
    x = torch.randn(4, CHANNELS, 3, requires_grad=True)
    layer(x).sum().backward()  # one healthy step proves the group works
    y = layer(x)
    mode = "dead" if world == 2 else "hung"
    if rank == world - 1:
        if mode == "hung":
            time.sleep(10 * TIMEOUT_S)  # the test kills it before it wakes
        os._exit(0)  # dies without a word: its sockets close
    steps = {"all_reduce": lambda: y.sum().backward(), "all_gather": lambda: layer(x)}
    for collective, run in steps.items():
        start = time.monotonic()
        try:
            run()
            out[f"{mode}/{collective}_raised"] = [1, 0]
        except RuntimeError as exc:
            named = f"normlab.SyncBatchNorm: {collective} of" in str(exc)
            out[f"{mode}/{collective}_raised"] = [0, 0]
            out[f"{mode}/{collective}_names_collective"] = [float(not named), 0]
        # Within the timeout (plus slack for a loaded machine), not a hang.
        out[f"{mode}/{collective}_seconds"] = [time.monotonic() - start, TIMEOUT_S + 15]
    return out


def masked(rank: int, world: int) -> dict[str, list[float]]:
    """Masked SyncBatchNorm: every rank its own valid count (one rank's batch all padding,
    with uneven and empty splits) gives single-process masked BatchNorm's outputs,
    gradients and running statistics on the concatenated batch, in one collective each
    way."""
    out: dict[str, list[float]] = {}
    gen = torch.Generator().manual_seed(5)
    ours = SyncBatchNorm(CHANNELS, dtype=torch.float64)
    ref = BatchNorm1d(CHANNELS, dtype=torch.float64)
    with torch.no_grad():
        for layer in (ours, ref):
            layer.weight.copy_(torch.linspace(0.5, 1.5, CHANNELS))
            layer.bias.copy_(torch.linspace(-0.5, 0.5, CHANNELS))
    # the layer's first synchronized step also checks the ranks' channel counts
    for step, split in enumerate(("uneven", "empty")):
        counts = split_counts(split, world)
        lo, hi = sum(counts[:rank]), sum(counts[: rank + 1])
        total = sum(counts)
        full = torch.randn(total, CHANNELS, 7, generator=gen, dtype=torch.float64) * 2 + 1
        lengths = torch.randint(1, 8, (total,), generator=gen)
        lengths[: counts[0]] = 0  # rank 0's samples: padding only
        mask = torch.arange(7) < lengths[:, None]
        grad = torch.randn(total, CHANNELS, 7, generator=gen, dtype=torch.float64)
        ours.zero_grad(), ref.zero_grad()
        x_local = full[lo:hi].clone().requires_grad_(True)
        x_full = full.clone().requires_grad_(True)
        with count_collectives() as calls:
            y_local = ours(x_local, mask=mask[lo:hi])
            forward_calls = dict(calls)
            (y_local * grad[lo:hi]).sum().backward()
        y_full = ref(x_full, mask=mask)
        (y_full * grad).sum().backward()
        tag = f"masked/{split}"
        out[f"{tag}/output"] = [rel_err(y_local, y_full[lo:hi]), 1e-10]
        out[f"{tag}/grad_input"] = [rel_err(x_local.grad, x_full.grad[lo:hi]), 1e-10]
        out[f"{tag}/grad_weight"] = [rel_err(all_sum(ours.weight.grad), ref.weight.grad), 1e-10]
        out[f"{tag}/grad_bias"] = [rel_err(all_sum(ours.bias.grad), ref.bias.grad), 1e-10]
        for name in ("running_mean", "running_var"):
            out[f"{tag}/{name}"] = [rel_err(getattr(ours, name), getattr(ref, name)), 1e-10]
        out[f"{tag}/num_batches_tracked"] = [
            float(int(ours.num_batches_tracked) != int(ref.num_batches_tracked)), 0
        ]
        out[f"{tag}/one_collective_forward"] = [
            float(sum(forward_calls.values()) != (2 if step == 0 else 1)), 0
        ]
        out[f"{tag}/one_collective_backward"] = [
            float(sum(calls.values()) - sum(forward_calls.values()) != 1), 0
        ]
    return out


def device_counts(rank: int, world: int) -> dict[str, list[float]]:
    """The path GPUs take (counts kept on the device, no host read), run here on gloo by
    treating CPU tensors as unreadable: the same equivalence cases and masked steps must
    hold. (The global-batch rules read the count; off the CPU they follow torch's local
    rule instead, so they are not repeated here.)"""
    from normlab import running

    out: dict[str, list[float]] = {}
    saved = D._on_host, running._host_readable
    D._on_host = running._host_readable = lambda t: False
    # the composite pieces: what a GPU without triton runs (the CPU kernels' ops take
    # host counts only, and never see device tensors)
    ops_block = ops.use_backend("torch")
    ops_block.__enter__()
    try:
        for index, case in enumerate(CASES):
            run_case(index, case, rank, world, out)
        for name, value in masked(rank, world).items():
            if not name.endswith("num_batches_tracked"):  # counted on the host only
                out[name] = value
    finally:
        ops_block.__exit__(None, None, None)
        D._on_host, running._host_readable = saved
    return out


PHASES: dict[str, Callable[[int, int], dict[str, list[float]]]] = {
    "equivalence": equivalence, "inplace": inplace, "channels": channels, "masked": masked,
    "device_counts": device_counts, "failure": failure,
}


def main() -> None:
    rank, world, port, out_dir = *map(int, sys.argv[1:4]), sys.argv[4]
    torch.set_num_threads(1)  # many ranks share 2 cores
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    for phase, run in PHASES.items():
        try:
            result = run(rank, world)
        except Exception:
            result = {"error": traceback.format_exc()}
        Path(out_dir, f"{phase}_rank{rank}.json").write_text(json.dumps(result))
    sys.stdout.flush()
    os._exit(0)  # the group is broken by the failure phase: skip shutdown handshakes


if __name__ == "__main__":
    main()
