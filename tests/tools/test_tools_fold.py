"""fold_batchnorm / fold_weights: folded eval outputs equal the original's (torch.nn as oracle)."""

from __future__ import annotations

import copy
import runpy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import normlab.nn as nlnn
from normlab.tools import find_foldable, fold_batchnorm, fold_weights
from normlab.tools._detect import is_batchnorm

ROOT = Path(__file__).resolve().parents[2]


def _normlab_layer(name: str, module: str):
    """A normlab layer by name, from ``normlab.nn`` or (until re-exported) its module."""
    import importlib

    cls = getattr(nlnn, name, None)
    if cls is None:
        try:
            cls = getattr(importlib.import_module(f"normlab.nn.{module}"), name, None)
        except ImportError:
            cls = None
    return cls


BN = {
    ("torch", 1): nn.BatchNorm1d,
    ("torch", 2): nn.BatchNorm2d,
    ("torch", 3): nn.BatchNorm3d,
    ("normlab", 1): nlnn.BatchNorm1d,
    ("normlab", 2): nlnn.BatchNorm2d,
    ("normlab", 3): nlnn.BatchNorm3d,
}

# (id, layer factory, BN dim, input shape, channels_last)
LAYERS = [
    ("conv1d", lambda: nn.Conv1d(3, 6, 3), 1, (2, 3, 10), False),
    ("conv1d-nobias-g3", lambda: nn.Conv1d(6, 9, 3, groups=3, bias=False), 1, (2, 6, 9), False),
    ("conv2d", lambda: nn.Conv2d(4, 8, 3, padding=1), 2, (2, 4, 7, 6), False),
    ("conv2d-g2-nobias", lambda: nn.Conv2d(4, 8, 3, groups=2, bias=False), 2, (2, 4, 6, 6), False),
    ("conv2d-dw-cl", lambda: nn.Conv2d(6, 6, 3, groups=6, padding=1), 2, (2, 6, 5, 5), True),
    ("conv2d-cl-nobias", lambda: nn.Conv2d(3, 5, 1, bias=False), 2, (3, 3, 4, 4), True),
    ("conv3d", lambda: nn.Conv3d(2, 4, 3), 3, (2, 2, 5, 5, 4), False),
    ("conv3d-cl", lambda: nn.Conv3d(2, 4, 2, bias=False), 3, (2, 2, 4, 4, 4), True),
    ("convT1d-g2", lambda: nn.ConvTranspose1d(4, 6, 3, groups=2), 1, (2, 4, 7), False),
    (
        "convT2d-g2-s2-nobias",
        lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2, bias=False),
        2,
        (2, 4, 5, 5),
        False,
    ),
    ("convT2d-cl", lambda: nn.ConvTranspose2d(3, 4, 2, stride=2), 2, (2, 3, 4, 4), True),
    ("convT3d", lambda: nn.ConvTranspose3d(2, 4, 2), 3, (2, 2, 3, 3, 3), False),
    ("linear", lambda: nn.Linear(5, 7), 1, (4, 5), False),
    ("linear-nobias", lambda: nn.Linear(5, 7, bias=False), 1, (4, 5), False),
]


def _randomize_bn(bn: nn.Module, gen: torch.Generator) -> None:
    """Random running statistics and affine, so the fold is not an identity."""
    c = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=gen))
        bn.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
        if bn.weight is not None:
            bn.weight.copy_(torch.randn(c, generator=gen))
            bn.bias.copy_(torch.randn(c, generator=gen))


def _make(layer_fn, dim: int, backend: str, affine: bool, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layer = layer_fn()
    c = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    bn = BN[backend, dim](c, affine=affine, eps=1e-3)
    _randomize_bn(bn, torch.Generator().manual_seed(seed + 1))
    return nn.Sequential(layer, bn, nn.ReLU())


class _Untraceable(nn.Module):
    """Data-dependent control flow: fx cannot trace it, the fallback must find the pairs."""

    def __init__(self, body: nn.Sequential) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 1e9:  # never true, but symbolic tracing cannot know
            return x
        return self.body(x)


def _check_fold(model: nn.Module, x: torch.Tensor, expect_pairs: int) -> nn.Module:
    model.eval()
    before = copy.deepcopy(model.state_dict())
    ref = model(x)
    folded = fold_batchnorm(model)
    # the input model is untouched (inplace=False)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    n_before = sum(1 for m in model.modules() if is_batchnorm(m))
    assert n_before - sum(1 for m in folded.modules() if is_batchnorm(m)) == expect_pairs
    torch.testing.assert_close(folded(x), ref, rtol=1e-5, atol=1e-5)
    return folded


@pytest.mark.parametrize("backend", ["torch", "normlab"])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize(
    "name,layer_fn,dim,shape,channels_last", LAYERS, ids=[r[0] for r in LAYERS]
)
def test_fold_equivalence(name, layer_fn, dim, shape, channels_last, backend, affine):
    model = _make(layer_fn, dim, backend, affine)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(7))
    if channels_last:
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        model = model.to(memory_format=fmt)
        x = x.contiguous(memory_format=fmt)
    assert find_foldable(model) == [("0", "1")]
    folded = _check_fold(model, x, 1)
    assert isinstance(folded[1], nn.Identity)
    if channels_last:
        assert folded[0].weight.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("backend", ["torch", "normlab"])
def test_fold_untraceable_falls_back_to_sequential(backend):
    body = nn.Sequential(
        _make(LAYERS[2][1], 2, backend, True)[:2], nn.ReLU(), nn.Conv2d(8, 4, 1), BN[backend, 2](4)
    )
    _randomize_bn(body[3], torch.Generator().manual_seed(3))
    model = _Untraceable(body)
    assert find_foldable(model) == [("body.0.0", "body.0.1"), ("body.2", "body.3")]
    _check_fold(model, torch.randn(2, 4, 6, 6), 2)


class _Residual(nn.Module):
    """conv output feeds both the BN and a skip path: folding would change the skip."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.bn2 = nlnn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y + self.bn2(self.conv2(x))


def test_fold_skips_shared_outputs_and_modules():
    model = _Residual()
    _randomize_bn(model.bn, torch.Generator().manual_seed(0))
    _randomize_bn(model.bn2, torch.Generator().manual_seed(1))
    assert find_foldable(model) == [("conv2", "bn2")]
    folded = _check_fold(model, torch.randn(2, 4, 5, 5), 1)
    assert isinstance(folded.bn, nn.BatchNorm2d) and isinstance(folded.bn2, nn.Identity)
    # a conv reused twice in a Sequential is never folded
    conv = nn.Conv2d(3, 3, 1)
    shared = nn.Sequential(conv, nn.BatchNorm2d(3), conv, nn.BatchNorm2d(3))
    assert find_foldable(shared) == []


class _BatchNormAct2d(nn.BatchNorm2d):
    """timm-style fused BN + activation (``drop`` then ``act`` after normalizing)."""

    def __init__(self, c: int, act: nn.Module) -> None:
        super().__init__(c)
        self.drop = nn.Identity()
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


class _FrozenBatchNorm2d(nn.Module):
    """torchvision-style frozen BN: everything is a buffer."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.eps = 1e-5
        for name, init in [("weight", 1), ("bias", 0), ("running_mean", 0), ("running_var", 1)]:
            self.register_buffer(name, torch.full((c,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)


def _frozen_classes() -> list:
    classes = [_FrozenBatchNorm2d]
    frozen = _normlab_layer("FrozenBatchNorm2d", "frozen")
    if frozen is not None:
        classes.append(frozen)
    return classes


@pytest.mark.parametrize("frozen_cls", _frozen_classes(), ids=lambda c: c.__module__)
def test_fold_frozen_batchnorm(frozen_cls):
    bn = frozen_cls(6)
    _randomize_bn_buffers(bn)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), bn, nn.ReLU())
    _check_fold(model, torch.randn(2, 3, 6, 6), 1)
    assert isinstance(fold_batchnorm(model.eval())[1], nn.Identity)


def _randomize_bn_buffers(bn: nn.Module) -> None:
    gen = torch.Generator().manual_seed(5)
    c = bn.running_mean.numel()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=gen))
        bn.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
        bn.weight.copy_(torch.randn(c, generator=gen))
        bn.bias.copy_(torch.randn(c, generator=gen))


def _fused_cases() -> list:
    """(id, factory of a fused BN+act over 6 channels, type of the activation kept)."""
    cases = [
        ("timm-relu", lambda: _BatchNormAct2d(6, nn.ReLU()), nn.ReLU),
        ("timm-silu", lambda: _BatchNormAct2d(6, nn.SiLU()), nn.SiLU),
        ("timm-identity", lambda: _BatchNormAct2d(6, nn.Identity()), nn.Identity),
    ]
    bn_act = _normlab_layer("BatchNormAct2d", "act")
    if bn_act is not None:
        cases += [
            ("normlab-relu", lambda: bn_act(6, act="relu"), nn.ReLU),
            ("normlab-leaky", lambda: bn_act(6, act="leaky_relu", slope=0.2), nn.LeakyReLU),
            ("normlab-gelu", lambda: bn_act(6, act="gelu"), nn.GELU),
            ("normlab-identity", lambda: bn_act(6, act="identity"), nn.Identity),
        ]
    abn = _normlab_layer("InPlaceABN", "inplace_abn")
    if abn is not None:
        cases.append(
            ("inplace-abn-elu", lambda: abn(6, activation="elu", activation_param=0.5), nn.ELU)
        )
    frozen = _normlab_layer("FrozenBatchNorm2d", "frozen")
    if frozen is not None:
        cases.append(("frozen-leaky", lambda: frozen(6, act="leaky_relu", slope=0.1), nn.LeakyReLU))
    return cases


FUSED = _fused_cases()


@pytest.mark.parametrize("name,factory,act_type", FUSED, ids=[c[0] for c in FUSED])
def test_fold_keeps_fused_activation(name, factory, act_type):
    bn = factory()
    _randomize_bn_buffers(bn)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), bn)
    folded = _check_fold(model, torch.randn(2, 3, 6, 6) * 3, 1)
    assert type(folded[1]) is act_type


def test_fold_requires_eval_mode():
    model = _make(LAYERS[2][1], 2, "torch", True)
    with pytest.raises(RuntimeError, match="eval mode"):
        fold_batchnorm(model)
    model.eval()
    model[1].train()
    with pytest.raises(RuntimeError, match=r"model.eval\(\)"):
        fold_batchnorm(model)


def test_fold_skips_bn_without_running_stats_and_inplace():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    assert find_foldable(model) == []
    model = _make(LAYERS[2][1], 2, "torch", True).eval()
    out = fold_batchnorm(model, inplace=True)
    assert out is model and isinstance(model[1], nn.Identity)


def test_fold_weights_is_pure_and_checks_shapes():
    conv = nn.Conv2d(4, 6, 3, groups=2)
    bn = nn.BatchNorm2d(6)
    _randomize_bn(bn, torch.Generator().manual_seed(0))
    w0, b0 = conv.weight.detach().clone(), conv.bias.detach().clone()
    w, b = fold_weights(conv.weight, conv.bias, bn)
    assert torch.equal(conv.weight, w0) and torch.equal(conv.bias, b0)
    assert w.shape == w0.shape and b.shape == (6,)
    x = torch.randn(2, 4, 5, 5)
    expect = bn.eval()(conv(x))
    got = nn.functional.conv2d(x, w, b, groups=2)
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="output channels"):
        fold_weights(torch.randn(5, 4, 3, 3), None, bn)
    with pytest.raises(ValueError, match="running statistics"):
        fold_weights(w0, b0, nn.BatchNorm2d(6, track_running_stats=False))
    with pytest.raises(TypeError, match="weight"):
        fold_weights([1.0], None, bn)


def test_fold_benchmark_quick(monkeypatch, capsys):
    """The benchmark script runs end to end in --quick mode and prints a ratio (in-process:
    a subprocess would pay for importing torch again)."""
    monkeypatch.setattr(sys, "argv", ["fold.py", "--quick"])
    threads = torch.get_num_threads()
    try:
        runpy.run_path(str(ROOT / "benchmarks" / "fold.py"), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "ratio (unfolded / folded)" in out and "max |diff|" in out
    diff = float(out.split("max |diff| folded vs unfolded:")[1].split()[0])
    assert diff < 1e-4
