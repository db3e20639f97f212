"""recalibrate: running stats equal the exact float64 statistics of each layer's inputs."""

from __future__ import annotations

import copy
import multiprocessing
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import normlab.nn as nlnn
from normlab.tools import recalibrate
from normlab.tools._detect import is_instancenorm, tracks_running_stats

# batch sizes differ on purpose: batches must be weighted by their element counts
SIZES = [3, 5, 2, 7]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Conv2d(6, 5, 3),
        nlnn.BatchNorm2d(5, momentum=None),
        nn.ReLU(),
        nn.Conv2d(5, 4, 1),
        nn.InstanceNorm2d(4, track_running_stats=True),
        nlnn.InstanceNorm2d(4, track_running_stats=True, affine=True),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 8),
        nlnn.BatchNorm1d(8),
        nn.LayerNorm(8),  # no running stats: must be left alone
        nn.Linear(8, 3),
        nn.BatchNorm1d(3, track_running_stats=False),  # idem
    )


def _batches(seed: int = 0, sizes: list[int] = SIZES) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # a large common offset: a naive E[x^2] - E[x]^2 in float32 would lose the variance
    return [100.0 + torch.randn(n, 3, 8, 8, generator=gen) * 3 for n in sizes]


def _exact_stats(model: nn.Module, batches: list[torch.Tensor], training_modes: dict):
    """Each norm's inputs captured with hooks (norms in train mode), stats in float64."""
    model = copy.deepcopy(model)
    for name, m in model.named_modules():
        m.training = training_modes[name]
    inputs: dict[str, list[torch.Tensor]] = {}
    norms = {n: m for n, m in model.named_modules() if tracks_running_stats(m)}
    for name, m in norms.items():
        m.train()
        m.register_forward_pre_hook(
            lambda _m, a, name=name: inputs.setdefault(name, []).append(a[0].double())
        )
    torch.manual_seed(123)  # same Dropout masks as the recalibrate call under test
    with torch.no_grad():
        for x in batches:
            model(x)
    out = {}
    for name, m in norms.items():
        x = torch.cat(inputs[name])  # [N_total, C, *S]
        if is_instancenorm(m):
            xi = x.flatten(2)
            out[name] = (xi.mean(dim=(0, 2)), xi.var(dim=2, correction=1).mean(dim=0))
        else:
            xc = x.transpose(0, 1).reshape(x.shape[1], -1)
            out[name] = (xc.mean(dim=1), xc.var(dim=1, correction=1))
    return out


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_recalibrate_matches_exact_float64_statistics(mode):
    model = _model()
    getattr(model, mode)()
    modes = {n: m.training for n, m in model.named_modules()}
    momenta = {n: m.momentum for n, m in model.named_modules() if hasattr(m, "momentum")}
    tracked = {
        n: m.num_batches_tracked.clone()
        for n, m in model.named_modules()
        if getattr(m, "num_batches_tracked", None) is not None
    }
    batches = _batches()
    expect = _exact_stats(model, batches, modes)
    assert len(expect) == 5

    torch.manual_seed(123)
    out = recalibrate(model, batches, progress=False)
    assert out is model
    for name, (mean, var) in expect.items():
        m = model.get_submodule(name)
        torch.testing.assert_close(m.running_mean.double(), mean, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(m.running_var.double(), var, rtol=1e-5, atol=1e-6)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: m.momentum for n, m in model.named_modules() if hasattr(m, "momentum")} == momenta
    for n, t in tracked.items():
        assert torch.equal(model.get_submodule(n).num_batches_tracked, t)
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_recalibrate_num_batches_tuples_and_progress(capsys):
    model = _model().eval()
    batches = _batches()
    expect = _exact_stats(model, batches[:2], {n: m.training for n, m in model.named_modules()})
    pairs = [(x, torch.zeros(len(x))) for x in batches]  # (input, target) like a DataLoader
    recalibrate(model, pairs, num_batches=2, progress=True)
    bn = model.get_submodule("1")
    torch.testing.assert_close(bn.running_mean.double(), expect["1"][0], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(bn.running_var.double(), expect["1"][1], rtol=1e-5, atol=1e-6)
    assert "recalibrate" in capsys.readouterr().err


def test_recalibrate_bad_arguments():
    model = _model()
    with pytest.raises(ValueError, match="num_batches"):
        recalibrate(model, _batches(), num_batches=0, progress=False)
    with pytest.raises(ValueError, match="no batch"):
        recalibrate(model, [], progress=False)
    with pytest.raises(TypeError, match="forward_fn"):
        recalibrate(model, ["not a tensor"], progress=False)
    with pytest.warns(UserWarning, match="no norm layer"):
        recalibrate(nn.Linear(2, 2), [torch.randn(2, 2)], progress=False)


def _dist_worker(rank: int, world: int, init_file: str, result_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = _model().eval()
        shards = [_batches(seed=0, sizes=[3, 5]), _batches(seed=1, sizes=[2, 7, 4])]
        recalibrate(model, shards[rank], process_group=dist.group.WORLD, progress=False)
        if rank == 0:
            torch.save(model.state_dict(), result_file)
    finally:
        dist.destroy_process_group()


def test_recalibrate_all_reduce_over_process_group():
    """Two gloo ranks with uneven shards == one process over the union of the batches."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file, result_file = os.path.join(tmp, "init"), os.path.join(tmp, "sd.pt")
        # forkserver: fork is unsafe once the parent has used OpenMP threads (deadlock);
        # the server imports torch and normlab once, both workers fork from it
        multiprocessing.set_forkserver_preload(["torch", "normlab.nn", "normlab.tools"])
        mp.start_processes(
            _dist_worker, args=(2, init_file, result_file), nprocs=2, start_method="forkserver"
        )
        got = torch.load(result_file)
    model = _model().eval()
    union = _batches(seed=0, sizes=[3, 5]) + _batches(seed=1, sizes=[2, 7, 4])
    expect = _exact_stats(model, union, {n: m.training for n, m in model.named_modules()})
    for name, (mean, var) in expect.items():
        torch.testing.assert_close(got[f"{name}.running_mean"].double(), mean, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(got[f"{name}.running_var"].double(), var, rtol=1e-5, atol=1e-6)


class _Masked(torch.nn.Module):
    """A sequence model whose normlab norms take the padding mask."""

    def __init__(self) -> None:
        super().__init__()
        import normlab

        self.bn = normlab.BatchNorm1d(3)
        self.inorm = normlab.InstanceNorm1d(3, track_running_stats=True)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.inorm(self.bn(x, mask=mask), mask=mask)


def test_recalibrate_uses_the_masks_valid_positions() -> None:
    import normlab

    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(3):
        x = torch.randn(4, 3, 9, generator=g, dtype=torch.float64) * 2 + 1
        x[..., 6:] = 100.0  # padding far from the data: it must not count
        lengths = torch.randint(2, 7, (4,), generator=g)
        batches.append((x, normlab.lengths_to_mask(lengths, 9)))
    model = _Masked().double()
    recalibrate(model, batches, progress=False, forward_fn=lambda m, b: m(b[0], b[1]))
    valid = torch.cat([x.transpose(1, 2)[m] for x, m in batches])  # [M, C]
    torch.testing.assert_close(model.bn.running_mean, valid.mean(0))
    torch.testing.assert_close(model.bn.running_var, valid.var(0, correction=1))
    # InstanceNorm: its inputs are BatchNorm's outputs (training mode, batch statistics over
    # the valid positions); the element-weighted average of each instance's mean and
    # unbiased variance over its own valid positions.
    means, variances, weights = [], [], []
    with torch.no_grad():
        for x, m in batches:
            y = normlab.functional.batch_norm(x, None, None, model.bn.weight, model.bn.bias,
                                              True, mask=m)
            for n in range(x.shape[0]):
                v = y[n][:, m[n]]
                means.append(v.mean(1)), variances.append(v.var(1, correction=1))
                weights.append(float(m[n].sum()))
    w = torch.tensor(weights, dtype=torch.float64)[:, None]
    torch.testing.assert_close(model.inorm.running_mean,
                               (torch.stack(means) * w).sum(0) / w.sum())
    torch.testing.assert_close(model.inorm.running_var,
                               (torch.stack(variances) * w).sum(0) / w.sum())
