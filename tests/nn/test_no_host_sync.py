"""No host sync on the non-CPU route: every layer's training and eval step, forward and
backward, runs on the ``meta`` device, where any ``.item()``, ``bool()`` of a tensor or
read of a value raises. (GPU work goes through the same composite route; see
docs/gpu.md for what is measured on a GPU.)"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import normlab
from normlab import running

LAYERS: list[tuple[str, Callable[[], nn.Module], tuple[int, ...]]] = [
    ("BatchNorm1d", lambda: normlab.BatchNorm1d(4), (8, 4)),
    ("BatchNorm2d", lambda: normlab.BatchNorm2d(4), (4, 4, 3, 3)),
    ("BatchNorm3d", lambda: normlab.BatchNorm3d(4), (2, 4, 2, 3, 3)),
    ("BatchNormAct2d", lambda: normlab.BatchNormAct2d(4, act="silu"), (4, 4, 3, 3)),
    ("BatchRenorm2d", lambda: normlab.BatchRenorm2d(4), (4, 4, 3, 3)),
    ("GhostBatchNorm2d", lambda: normlab.GhostBatchNorm2d(4, virtual_batch_size=2),
     (4, 4, 3, 3)),
    ("InPlaceABN", lambda: normlab.InPlaceABN(4, inplace=False), (4, 4, 3, 3)),
    ("FrozenBatchNorm2d", lambda: normlab.FrozenBatchNorm2d(4), (4, 4, 3, 3)),
    ("SyncBatchNorm", lambda: normlab.SyncBatchNorm(4), (4, 4, 3, 3)),
    ("InstanceNorm2d", lambda: normlab.InstanceNorm2d(4, affine=True,
                                                      track_running_stats=True), (4, 4, 3, 3)),
    ("GroupNorm", lambda: normlab.GroupNorm(2, 4), (4, 4, 3, 3)),
    ("GroupNormAct", lambda: normlab.GroupNormAct(2, 4), (4, 4, 3, 3)),
    ("LayerNorm", lambda: normlab.LayerNorm([3, 3]), (4, 4, 3, 3)),
    ("LayerNormAct", lambda: normlab.LayerNormAct([3, 3], act="gelu"), (4, 4, 3, 3)),
    ("RMSNorm", lambda: normlab.RMSNorm([3, 3]), (4, 4, 3, 3)),
]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("make", "shape"), [c[1:] for c in LAYERS], ids=[c[0] for c in LAYERS])
def test_step_runs_on_meta_without_host_sync(make, shape, train: bool) -> None:  # noqa: ANN001
    layer = make().to("meta").train(train)
    x = torch.randn(shape, device="meta", requires_grad=True)
    y = layer(x)
    assert y.device.type == "meta" and y.shape == x.shape
    y.sum().backward()
    assert x.grad is not None and x.grad.device.type == "meta"


def test_non_finite_statistics_are_counted_on_the_device_and_read_on_request() -> None:
    """Off the CPU the guard runs unconditionally on the device; the kept channels are
    counted there and read (one sync) when asked. Simulated with the CPU code path."""
    running.non_finite_count(reset=True)
    finite = torch.tensor([True, False, False])
    running.count_kept(finite)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        assert running.non_finite_count(reset=True) == 2
    assert running.non_finite_count() == 0


def test_device_path_keeps_non_finite_channels(monkeypatch: pytest.MonkeyPatch) -> None:
    """The guard taken off the CPU (run here on CPU tensors by pretending reads cost a
    sync): the NaN channel keeps its running values, the others follow the update, and
    the count records it, with no warning until asked."""
    monkeypatch.setattr(running, "_host_readable", lambda t: False)
    running.non_finite_count(reset=True)
    rm, rv = torch.zeros(3), torch.ones(3)
    mean, var = torch.tensor([1.0, float("nan"), 2.0]), torch.tensor([4.0, 1.0, 4.0])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        running.update_running_stats(rm, rv, mean, var, 5, 0.5)
    torch.testing.assert_close(rm, torch.tensor([0.5, 0.0, 1.0]))
    torch.testing.assert_close(rv, torch.tensor([3.0, 1.0, 3.0]))  # 0.5 + 0.5 * 4 * 5/4
    with pytest.warns(RuntimeWarning, match="non-finite"):
        assert running.non_finite_count(reset=True) == 1


def test_native_batch_train_guards_running_statistics_on_the_device() -> None:
    """The CUDA route's BatchNorm training (torch's kernels, device independent: run here
    on CPU tensors): torch's running update, except a channel whose statistics are not
    finite, which keeps its values and is counted."""
    from normlab import plan
    from normlab.ops.torch_native import NativeBatchTrain

    x = torch.randn(6, 3, 4)
    x[2, 1, 0] = float("nan")
    rm, rv = torch.zeros(3), torch.ones(3)
    expected_rm, expected_rv = rm.clone(), rv.clone()
    torch.batch_norm(x, None, None, expected_rm, expected_rv, True, 0.1, 1e-5, False)
    running.non_finite_count(reset=True)
    p = plan.batch(x, True, 1e-5, 0.1)
    y = NativeBatchTrain.forward(p, plan.Call(x, None, None, rm, rv))
    assert y[:, 1].isnan().all() and not y[:, [0, 2]].isnan().any()
    torch.testing.assert_close(rm[[0, 2]], expected_rm[[0, 2]])
    torch.testing.assert_close(rv[[0, 2]], expected_rv[[0, 2]])
    assert rm[1] == 0 and rv[1] == 1
    with pytest.warns(RuntimeWarning, match="non-finite"):
        assert running.non_finite_count(reset=True) == 1


def test_cumulative_average_reads_the_counter_only_after_outside_changes() -> None:
    """momentum=None: the layer counts batches itself and re-reads num_batches_tracked only
    when something else changed it (a checkpoint, a reset), matching torch every time."""
    ours, theirs = normlab.BatchNorm1d(3, momentum=None), nn.BatchNorm1d(3, momentum=None)
    g = torch.Generator().manual_seed(0)

    def step() -> None:
        x = torch.randn(8, 3, generator=g)
        ours(x), theirs(x)
        torch.testing.assert_close(ours.running_mean, theirs.running_mean)
        torch.testing.assert_close(ours.running_var, theirs.running_var)
        assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked)

    step(), step()
    state = theirs.state_dict()
    state["num_batches_tracked"] = torch.tensor(7)
    ours.load_state_dict(state), theirs.load_state_dict(state)
    step(), step()
    ours.reset_running_stats(), theirs.reset_running_stats()
    step()
    ours.num_batches_tracked = torch.tensor(3)  # a new tensor
    theirs.num_batches_tracked = torch.tensor(3)
    step()


MASKED: list[tuple[str, Callable[[], nn.Module], tuple[int, ...]]] = [
    ("BatchNorm1d", lambda: normlab.BatchNorm1d(4), (3, 4, 6)),
    ("BatchNorm2d", lambda: normlab.BatchNorm2d(4), (2, 4, 3, 3)),
    ("BatchNormAct2d", lambda: normlab.BatchNormAct2d(4, act="relu"), (2, 4, 3, 3)),
    ("InstanceNorm1d", lambda: normlab.InstanceNorm1d(4, affine=True,
                                                      track_running_stats=True), (3, 4, 6)),
    ("GroupNorm", lambda: normlab.GroupNorm(2, 4), (3, 4, 6)),
    ("InPlaceABN", lambda: normlab.InPlaceABN(4, inplace=False), (3, 4, 6)),
]


@pytest.mark.parametrize(("make", "shape"), [c[1:] for c in MASKED], ids=[c[0] for c in MASKED])
def test_masked_step_runs_on_meta_without_host_sync(make, shape) -> None:  # noqa: ANN001
    """Masked statistics and their running update (the valid count stays on the device)."""
    layer = make().to("meta").train()
    x = torch.randn(shape, device="meta", requires_grad=True)
    mask = torch.ones((shape[0], *shape[2:]), dtype=torch.bool, device="meta")
    y = layer(x, mask=mask)
    assert y.device.type == "meta" and y.shape == x.shape
    y.sum().backward()
    assert x.grad is not None and x.grad.device.type == "meta"


@pytest.mark.parametrize("per_sample", [False, True], ids=["batch", "instance"])
def test_device_counted_update_matches_the_host_one(
    monkeypatch: pytest.MonkeyPatch, per_sample: bool
) -> None:
    """A valid count held on the device (a kernel's) updates the running statistics as the
    host count does: Bessel's factor by the count, nothing recorded for no valid value,
    instances with fewer than two valid positions left out."""
    from normlab import plan

    mean, var = torch.tensor([[1.0, 2.0], [3.0, -1.0], [5.0, 0.5]]), torch.rand(3, 2) + 0.5
    counts = torch.tensor([4, 1, 7])
    p = plan.instance(torch.empty(3, 2, 8), True, 1e-5, 0.3) if per_sample else plan.batch(
        torch.empty(3, 2, 8), True, 1e-5, 0.3)
    results = []
    for on_device in (False, True):
        monkeypatch.setattr(running, "_host_readable", lambda t, d=on_device: not d)
        rm, rv = torch.zeros(2), torch.ones(2)
        if per_sample:
            running.record(p, rm, rv, mean, var, counts=counts)
        else:
            running.record(p, rm, rv, mean[0], var[0], count=counts[0])
            running.record(p, rm, rv, mean[1], var[1], count=torch.tensor(0))
        results.append((rm, rv))
    torch.testing.assert_close(results[0], results[1])
    assert not torch.equal(results[1][0], torch.zeros(2))
