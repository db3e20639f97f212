"""convert: torch.nn <-> normlab round trips, BatchNorm -> GroupNorm, delegation to sync/frozen;
subclasses, user mappings and the report of what was left."""

from __future__ import annotations

import warnings

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
    with pytest.warns(normlab.tools.ConvertWarning, match=r"1 x torch.nn.SyncBatchNorm"):
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


# --- subclasses, user mappings, the report -------------------------------------------------


class _TimmLikeLayerNorm(nn.LayerNorm):
    """timm's pattern: another default eps and its own forward (same math, other code)."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__(num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class _LayerNorm2d(nn.LayerNorm):
    """torchvision's ConvNeXt pattern: LayerNorm over the channels of NCHW input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _NormlabLayerNorm2d(nlnn.LayerNorm):
    """The same, on normlab's LayerNorm: what a user maps _LayerNorm2d to."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _TaggedGroupNorm(nn.GroupNorm):
    """A subclass that only adds an attribute: computes what GroupNorm computes."""

    def __init__(self, num_groups: int, num_channels: int) -> None:
        super().__init__(num_groups, num_channels)
        self.tag = "stage1"


class _RmsNorm(nn.Module):
    """A norm written from scratch (timm's RmsNorm / HF's LlamaRMSNorm pattern)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class _PreNorm(nn.Module):
    """A container named like a norm: not a norm layer itself."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x))


class _Normalize(nn.Module):
    """Input normalization (torchvision's transforms.Normalize pattern): not a norm layer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - 0.5) / 0.25


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pre = _Normalize()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), _LayerNorm2d(8))
        self.gn = _TaggedGroupNorm(2, 8)
        self.blocks = nn.ModuleList([_TimmLikeLayerNorm(8) for _ in range(3)])
        self.mix = _PreNorm(8)
        self.rms = _RmsNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.gn(self.stem(self.pre(x))).permute(0, 2, 3, 1)
        for block in self.blocks:
            x = block(x)
        return self.rms(self.mix(x))


def _net() -> nn.Module:
    net = _Net()
    _randomize(net)
    return net.eval()


def test_subclass_with_its_own_forward_is_left_and_reported_once():
    net = _net()
    with pytest.warns(normlab.tools.ConvertWarning) as record:
        out, report = convert(net, to="normlab", return_report=True)
    assert len(record) == 1  # one warning per call, listing every class with its count
    message = str(record[0].message)
    assert "left 5 norm layer(s)" in message
    timm_like = f"{__name__}._TimmLikeLayerNorm (overrides forward of torch.nn.LayerNorm)"
    assert f"3 x {timm_like}" in message
    assert f"1 x {__name__}._LayerNorm2d (overrides forward of" in message
    assert f"1 x {__name__}._RmsNorm (no normlab equivalent)" in message
    assert "Normalize" not in message and "PreNorm" not in message
    # the report: by name; the left layers are untouched, the others converted
    assert {(m.name, m.cls) for m in report.left} == {
        ("stem.2", _LayerNorm2d), ("blocks.0", _TimmLikeLayerNorm),
        ("blocks.1", _TimmLikeLayerNorm), ("blocks.2", _TimmLikeLayerNorm), ("rms", _RmsNorm),
    }  # fmt: skip
    assert [(c.name, c.old, c.new) for c in report.converted] == [
        ("stem.1", nn.BatchNorm2d, nlnn.BatchNorm2d),
        ("gn", _TaggedGroupNorm, nlnn.GroupNorm),  # only an attribute added: base rule
        ("mix.norm", nn.LayerNorm, nlnn.LayerNorm),
    ]
    assert type(out.stem[2]) is _LayerNorm2d and type(out.blocks[0]) is _TimmLikeLayerNorm
    assert "3 converted, 5 norm layers left" in str(report)
    assert f"left      3 x {__name__}._TimmLikeLayerNorm" in report.summary()
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(out(x), net(x), rtol=1e-5, atol=1e-5)


def test_mapping_converts_subclasses_by_class_or_function():
    net = _net()

    def rms(m: _RmsNorm) -> nn.Module:
        new = nlnn.RMSNorm(m.weight.shape[0], eps=1e-6)
        new.weight = m.weight
        return new

    mapping = {_LayerNorm2d: _NormlabLayerNorm2d, _TimmLikeLayerNorm: nlnn.LayerNorm, _RmsNorm: rms}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left: no warning
        out, report = convert(net, to="normlab", mapping=mapping, return_report=True)
    assert report.left == []
    assert type(out.stem[2]) is _NormlabLayerNorm2d and type(out.rms) is nlnn.RMSNorm
    assert type(out.blocks[2]) is nlnn.LayerNorm and out.blocks[2].eps == 1e-6  # config carried
    assert report.counts()["converted"][f"{__name__}._TimmLikeLayerNorm -> normlab.LayerNorm"] == 3
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(out(x), net(x), rtol=1e-5, atol=1e-5)
    assert type(net.blocks[0]) is _TimmLikeLayerNorm  # not in place


def test_warn_false_and_bad_mappings():
    net = _net()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert(net, to="normlab", warn=False)
    with pytest.raises(
        TypeError,
        match=rf"mapping \{{{__name__}._RmsNorm: "
        r"normlab.LayerNorm\}.*function",
    ):
        convert(net, to="normlab", mapping={_RmsNorm: nlnn.LayerNorm}, warn=False)
    with pytest.raises(TypeError, match="mapping applies to"):
        convert(net, to="frozen", mapping={_RmsNorm: nlnn.RMSNorm})
    with pytest.raises(TypeError, match="classes to classes or functions"):
        convert(net, to="normlab", mapping={_RmsNorm: "RMSNorm"})


def test_to_torch_shares_tensors_and_reports_layers_torch_lacks():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 1), nlnn.BatchNorm2d(8), nlnn.BatchNormAct2d(8), nlnn.FrozenBatchNorm2d(8)
    )
    _randomize(model)
    params = list(model[1].parameters())
    with pytest.warns(normlab.tools.ConvertWarning, match=r"normlab.BatchNormAct2d \(no torch"):
        out, report = convert(model, to="torch", inplace=True, return_report=True)
    assert type(out[1]) is nn.BatchNorm2d
    assert all(a is b for a, b in zip(out[1].parameters(), params, strict=True))  # optimizer ok
    assert [(m.name, m.cls) for m in report.left] == [
        ("2", nlnn.BatchNormAct2d),
        ("3", nlnn.FrozenBatchNorm2d),
    ]


class _TimmLikeBatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d pattern: a BatchNorm2d subclass applying its ``act`` child."""

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


def test_groupnorm_keeps_activations_and_reports_what_it_cannot_convert():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 1), nlnn.BatchNormAct2d(8, act="leaky_relu", slope=0.2),
        _TimmLikeBatchNormAct2d(8), nlnn.FrozenBatchNorm2d(8),
    ).eval()  # fmt: skip
    _randomize(model)
    with pytest.warns(normlab.tools.ConvertWarning) as record:
        out, report = convert(model, to="groupnorm", num_groups=4, return_report=True)
    message = str(record[0].message)
    assert "_TimmLikeBatchNormAct2d (overrides forward of torch.nn.BatchNorm2d)" in message
    assert "normlab.FrozenBatchNorm2d (frozen BatchNorm is kept)" in message
    assert type(out[1]) is nlnn.GroupNormAct and (out[1].act, out[1].slope) == ("leaky_relu", 0.2)
    assert [c.name for c in report.converted] == ["1"]
    x = torch.randn(2, 3, 4, 4)
    expect = nn.functional.leaky_relu(
        nn.functional.group_norm(model[0](x), 4, model[1].weight, model[1].bias), 0.2
    )
    torch.testing.assert_close(out[1](model[0](x)), expect, rtol=1e-5, atol=1e-5)


def test_delegated_targets_report_too():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nlnn.BatchNorm1d(4))
    out, report = convert(model, to="frozen", return_report=True)
    assert [(c.name, c.old) for c in report.converted] == [
        ("1", nn.BatchNorm2d),
        ("2", nlnn.BatchNorm1d),
    ]
    assert report.left == [] and type(out[2]) is nlnn.FrozenBatchNorm1d
