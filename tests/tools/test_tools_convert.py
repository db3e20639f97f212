"""convert: torch.nn <-> normlab round trips, BatchNorm -> GroupNorm, delegation to sync/frozen."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normlab
import normlab.nn as nlnn
from normlab.tools import convert

# (id, torch layer factory, input shape)
LAYERS = [
    ("bn1d", lambda: nn.BatchNorm1d(6), (4, 6)),
    ("bn1d-3d-mom-none", lambda: nn.BatchNorm1d(6, momentum=None, eps=1e-3), (4, 6, 5)),
    ("bn2d-noaffine", lambda: nn.BatchNorm2d(6, affine=False), (3, 6, 4, 4)),
    ("bn2d-nobias", lambda: nn.BatchNorm2d(6, bias=False), (3, 6, 4, 4)),
    ("bn3d-notrack", lambda: nn.BatchNorm3d(6, track_running_stats=False), (2, 6, 3, 3, 3)),
    ("in1d", lambda: nn.InstanceNorm1d(6), (3, 6, 8)),
    (
        "in2d-affine-track",
        lambda: nn.InstanceNorm2d(6, affine=True, track_running_stats=True),
        (3, 6, 4, 4),
    ),
    ("in3d-track", lambda: nn.InstanceNorm3d(6, track_running_stats=True), (2, 6, 3, 3, 3)),
    ("ln", lambda: nn.LayerNorm((6, 5), eps=1e-4), (3, 6, 5)),
    ("ln-nobias", lambda: nn.LayerNorm(5, bias=False), (3, 6, 5)),
    ("gn", lambda: nn.GroupNorm(3, 6), (3, 6, 4, 4)),
    ("gn-noaffine", lambda: nn.GroupNorm(2, 6, affine=False), (3, 6, 4)),
    ("rms", lambda: nn.RMSNorm(5), (3, 6, 5)),
    ("rms-eps", lambda: nn.RMSNorm((6, 5), eps=1e-3, elementwise_affine=False), (3, 6, 5)),
]


def _randomize(module: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if name.endswith("num_batches_tracked"):
                t.fill_(7)
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=gen))


def _assert_same_state(a: nn.Module, b: nn.Module, tol: float = 0.0) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=tol, atol=tol)
    ga = {n: p.requires_grad for n, p in a.named_parameters()}
    assert ga == {n: p.requires_grad for n, p in b.named_parameters()}
    assert [m.training for m in a.modules()] == [m.training for m in b.modules()]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name,factory,shape", LAYERS, ids=[r[0] for r in LAYERS])
def test_round_trip_torch_normlab_torch(name, factory, shape, training):
    layer = factory()
    _randomize(layer)
    params = list(layer.parameters())
    if params:
        params[0].requires_grad_(False)
    model = nn.Sequential(nn.Identity(), layer, nn.Sequential(layer))  # shared twice
    model.train(training)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))

    ours = convert(model, to="normlab")
    assert type(ours[1]).__module__.startswith("normlab.nn")
    assert type(ours[1]).__name__ == type(layer).__name__
    assert ours[1] is ours[2][0]  # sharing kept
    assert type(model[1]) is type(layer)  # not in place
    _assert_same_state(model, ours)
    # same forward (and, in training, the same running statistics update)
    torch.testing.assert_close(ours(x), model(x), rtol=1e-5, atol=1e-5)
    _assert_same_state(model, ours, tol=1e-6)

    back = convert(ours, to="torch")
    assert type(back[1]) is type(layer)
    _assert_same_state(ours, back)  # exact: a copy of ours


def test_convert_inplace_and_lone_layer():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    out = convert(model, to="normlab", inplace=True)
    assert out is model and isinstance(model[1], nlnn.BatchNorm2d)
    lone = convert(nn.LayerNorm(4), to="normlab")
    assert isinstance(lone, nlnn.LayerNorm)
    # subclasses (e.g. SyncBatchNorm, custom layers) are not silently rebuilt as the base class
    sync = nn.SyncBatchNorm(4)
    assert convert(nn.Sequential(sync), to="normlab", inplace=True)[0] is sync


@pytest.mark.parametrize("bn_cls", [nn.BatchNorm2d, nlnn.BatchNorm2d])
@pytest.mark.parametrize("num_groups", [2, 4, lambda c: c // 2])
def test_batchnorm_to_groupnorm(bn_cls, num_groups):
    model = nn.Sequential(nn.Conv2d(3, 8, 1), bn_cls(8, eps=1e-3)).eval()
    _randomize(model[1])
    model[1].bias.requires_grad_(False)
    gn = convert(model, to="groupnorm", num_groups=num_groups)[1]
    g = num_groups(8) if callable(num_groups) else num_groups
    assert gn.num_groups == g and not gn.training and not gn.bias.requires_grad
    assert type(gn).__module__.startswith("normlab" if bn_cls is nlnn.BatchNorm2d else "torch")
    x = torch.randn(2, 8, 5, 5)
    expect = nn.functional.group_norm(x, g, model[1].weight, model[1].bias, eps=1e-3)
    torch.testing.assert_close(gn(x), expect, rtol=1e-5, atol=1e-5)


def test_groupnorm_bad_groups_and_bad_target():
    model = nn.Sequential(nn.BatchNorm1d(6))
    with pytest.raises(ValueError, match=r"num_groups.*'0'.*num_features=6"):
        convert(model, to="groupnorm", num_groups=4)
    with pytest.raises(ValueError, match="to must be one of"):
        convert(model, to="keras")
    with pytest.raises(TypeError, match="model"):
        convert("model", to="torch")
    with pytest.raises(TypeError, match="extra arguments"):
        convert(model, to="torch", process_group=None)


def _delegate(name: str, module: str):
    import importlib

    found = getattr(normlab, name, None) or getattr(nlnn, name, None)
    try:
        return found or getattr(importlib.import_module(f"normlab.nn.{module}"), name, None)
    except ImportError:
        return None


@pytest.mark.parametrize(
    "to,fn_name,module",
    [
        ("sync", "convert_sync_batchnorm", "syncbatchnorm"),
        ("frozen", "freeze_batch_norm", "frozen"),
    ],
)
def test_sync_and_frozen_delegate(to, fn_name, module):
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval()
    _randomize(model[1])
    if _delegate(fn_name, module) is None:
        with pytest.raises(NotImplementedError, match=fn_name):
            convert(model, to=to)
        return
    out = convert(model, to=to)
    assert isinstance(model[1], nn.BatchNorm2d)  # the original is untouched
    assert type(out[1]) is not nn.BatchNorm2d
    for key in ("weight", "bias", "running_mean", "running_var"):
        torch.testing.assert_close(getattr(out[1], key), getattr(model[1], key))
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(out(x), model(x), rtol=1e-5, atol=1e-5)
