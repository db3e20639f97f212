"""torch.jit.script over normlab layers: each compiles to the torch.nn layer (or a Script*
module of normlab.nn._script) that holds the same Parameters and buffers, gives torch's
output in eval and in training, inside models too; layers without an equivalent raise an
error that names the fix, and the fix works."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn import functional as TF

import normlab
import normlab.nn as nlnn
from normlab.nn._script import NotScriptableError, computes_like, scriptable, torch_equivalent
from normlab.tools import convert, fold_batchnorm


def _torch_act(name: str, slope: float):
    return {
        "identity": lambda y: y,
        "relu": torch.relu,
        "leaky_relu": lambda y: TF.leaky_relu(y, slope),
        "elu": lambda y: TF.elu(y, slope),
        "silu": TF.silu,
        "gelu": TF.gelu,
    }[name]


def _torch_twin(layer: nn.Module, cls: type, **kw) -> nn.Module:
    """torch.nn ``cls`` with ``layer``'s state (a copy, built independently of normlab)."""
    twin = cls(**kw)
    twin.load_state_dict(layer.state_dict())
    return twin.train(layer.training)


def _then(norm: nn.Module, act: str, slope: float) -> nn.Module:
    """torch's norm followed by the activation: the reference of a fused layer."""

    class NormAct(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = norm

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return _torch_act(act, slope)(self.norm(x))

    return NormAct()


class _FrozenRef(nn.Module):
    """Eval BatchNorm on a frozen layer's buffers, then its activation."""

    def __init__(self, frozen: nn.Module) -> None:
        super().__init__()
        self.frozen = frozen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.frozen
        y = TF.batch_norm(x, f.running_mean, f.running_var, f.weight, f.bias, False, 0.0, f.eps)
        return _torch_act(f.act, f.slope)(y)


# (id, normlab layer, torch reference built from the layer, input shape, scripted class name)
SCRIPTABLE = [
    ("bn1d", lambda: nlnn.BatchNorm1d(6),
     lambda m: _torch_twin(m, nn.BatchNorm1d, num_features=6), (5, 6), "BatchNorm1d"),
    ("bn1d-3d-cumulative", lambda: nlnn.BatchNorm1d(6, eps=1e-3, momentum=None),
     lambda m: _torch_twin(m, nn.BatchNorm1d, num_features=6, eps=1e-3, momentum=None),
     (5, 6, 4), "BatchNorm1d"),
    ("bn2d-noaffine", lambda: nlnn.BatchNorm2d(6, affine=False),
     lambda m: _torch_twin(m, nn.BatchNorm2d, num_features=6, affine=False),
     (3, 6, 4, 4), "BatchNorm2d"),
    ("bn2d-nobias", lambda: nlnn.BatchNorm2d(6, bias=False),
     lambda m: _torch_twin(m, nn.BatchNorm2d, num_features=6, bias=False),
     (3, 6, 4, 4), "BatchNorm2d"),
    ("bn3d-notrack", lambda: nlnn.BatchNorm3d(6, track_running_stats=False),
     lambda m: _torch_twin(m, nn.BatchNorm3d, num_features=6, track_running_stats=False),
     (2, 6, 3, 3, 3), "BatchNorm3d"),
    ("in1d", lambda: nlnn.InstanceNorm1d(6),
     lambda m: _torch_twin(m, nn.InstanceNorm1d, num_features=6), (3, 6, 8), "InstanceNorm1d"),
    ("in2d-affine-track",
     lambda: nlnn.InstanceNorm2d(6, affine=True, track_running_stats=True),
     lambda m: _torch_twin(m, nn.InstanceNorm2d, num_features=6, affine=True,
                           track_running_stats=True),
     (3, 6, 4, 4), "InstanceNorm2d"),
    ("in3d-track", lambda: nlnn.InstanceNorm3d(6, momentum=0.3, track_running_stats=True),
     lambda m: _torch_twin(m, nn.InstanceNorm3d, num_features=6, momentum=0.3,
                           track_running_stats=True),
     (2, 6, 3, 3, 3), "InstanceNorm3d"),
    ("gn", lambda: nlnn.GroupNorm(3, 6, eps=1e-4),
     lambda m: _torch_twin(m, nn.GroupNorm, num_groups=3, num_channels=6, eps=1e-4),
     (3, 6, 4, 4), "GroupNorm"),
    ("gn-nobias", lambda: nlnn.GroupNorm(2, 6, bias=False),
     lambda m: _torch_twin(m, nn.GroupNorm, num_groups=2, num_channels=6, bias=False),
     (3, 6, 5), "GroupNorm"),
    ("gn-noaffine", lambda: nlnn.GroupNorm(2, 6, affine=False),
     lambda m: _torch_twin(m, nn.GroupNorm, num_groups=2, num_channels=6, affine=False),
     (3, 6), "GroupNorm"),
    ("ln", lambda: nlnn.LayerNorm((6, 5), eps=1e-4),
     lambda m: _torch_twin(m, nn.LayerNorm, normalized_shape=(6, 5), eps=1e-4),
     (3, 6, 5), "LayerNorm"),
    ("ln-nobias", lambda: nlnn.LayerNorm(5, bias=False),
     lambda m: _torch_twin(m, nn.LayerNorm, normalized_shape=5, bias=False),
     (3, 6, 5), "LayerNorm"),
    ("rms", lambda: nlnn.RMSNorm(5), lambda m: _torch_twin(m, nn.RMSNorm, normalized_shape=5),
     (3, 6, 5), "RMSNorm"),
    ("rms-eps-noaffine", lambda: nlnn.RMSNorm((6, 5), eps=1e-3, elementwise_affine=False),
     lambda m: _torch_twin(m, nn.RMSNorm, normalized_shape=(6, 5), eps=1e-3,
                           elementwise_affine=False),
     (3, 6, 5), "RMSNorm"),
    ("frozen2d", lambda: nlnn.FrozenBatchNorm2d(6, eps=1e-3), _FrozenRef,
     (3, 6, 4, 4), "ScriptFrozenBatchNorm"),
    ("frozen1d-relu", lambda: nlnn.FrozenBatchNorm1d(6, act="relu"), _FrozenRef,
     (5, 6), "ScriptFrozenBatchNorm"),
    ("frozen-any-leaky", lambda: nlnn.FrozenBatchNorm(6, act="leaky_relu", slope=0.2),
     _FrozenRef, (2, 6, 3, 3, 3), "ScriptFrozenBatchNorm"),
    ("bnact2d-relu", lambda: nlnn.BatchNormAct2d(6),
     lambda m: _then(_torch_twin(m, nn.BatchNorm2d, num_features=6), "relu", 0.0),
     (3, 6, 4, 4), "ScriptBatchNormAct"),
    ("bnact1d-leaky-cumulative",
     lambda: nlnn.BatchNormAct1d(6, momentum=None, act="leaky_relu", slope=0.1),
     lambda m: _then(_torch_twin(m, nn.BatchNorm1d, num_features=6, momentum=None),
                     "leaky_relu", 0.1),
     (5, 6, 3), "ScriptBatchNormAct"),
    ("bnact3d-silu-notrack", lambda: nlnn.BatchNormAct3d(6, act="silu",
                                                        track_running_stats=False),
     lambda m: _then(_torch_twin(m, nn.BatchNorm3d, num_features=6,
                                 track_running_stats=False), "silu", 0.0),
     (2, 6, 3, 3, 3), "ScriptBatchNormAct"),
    ("inplace-abn-elu",
     lambda: nlnn.InPlaceABN(6, activation="elu", activation_param=0.5, inplace=False),
     lambda m: _then(_torch_twin(m, nn.BatchNorm2d, num_features=6), "elu", 0.5),
     (3, 6, 4, 4), "ScriptBatchNormAct"),
    ("gnact-gelu", lambda: nlnn.GroupNormAct(3, 6, act="gelu"),
     lambda m: _then(_torch_twin(m, nn.GroupNorm, num_groups=3, num_channels=6), "gelu", 0.0),
     (3, 6, 4, 4), "ScriptGroupNormAct"),
    ("lnact-leaky-nobias", lambda: nlnn.LayerNormAct(5, bias=False, act="leaky_relu", slope=0.3),
     lambda m: _then(_torch_twin(m, nn.LayerNorm, normalized_shape=5, bias=False),
                     "leaky_relu", 0.3),
     (3, 6, 5), "ScriptLayerNormAct"),
]  # fmt: skip
IDS = [row[0] for row in SCRIPTABLE]


def _randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if name.endswith("num_batches_tracked"):
                t.fill_(3)
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=gen))
    return module


def _input(shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5


def _assert_same_state(a: nn.Module, b: nn.Module, tol: float = 0.0) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=tol, atol=tol, msg=key)


@pytest.mark.parametrize("name,make,reference,shape,scripted_as", SCRIPTABLE, ids=IDS)
def test_scripted_layer_gives_torchs_output_in_eval(name, make, reference, shape, scripted_as):
    layer = _randomize(make()).eval()
    expected = reference(layer)(_input(shape))

    scripted = torch.jit.script(layer)

    assert isinstance(scripted, torch.jit.ScriptModule)
    assert scripted.original_name == scripted_as
    torch.testing.assert_close(scripted(_input(shape)), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer(_input(shape)), expected, rtol=1e-5, atol=1e-5)
    _assert_same_state(layer, scripted)  # same keys, same values


@pytest.mark.parametrize("name,make,reference,shape,scripted_as", SCRIPTABLE, ids=IDS)
def test_scripted_layer_trains_like_torch(name, make, reference, shape, scripted_as):
    layer = _randomize(make()).train()
    expected_module = reference(copy.deepcopy(layer)).train()
    scripted = torch.jit.script(copy.deepcopy(layer))
    assert scripted.training

    for step in range(2):  # two steps: the running average and its counter move as torch's
        torch.testing.assert_close(
            scripted(_input(shape, seed=step)),
            expected_module(_input(shape, seed=step)),
            rtol=1e-5,
            atol=1e-5,
        )
    inner = getattr(expected_module, "norm", getattr(expected_module, "frozen", expected_module))
    _assert_same_state(scripted, inner, tol=1e-6)


@pytest.mark.parametrize("name,make,reference,shape,scripted_as", SCRIPTABLE, ids=IDS)
def test_scripted_module_holds_the_layers_tensors(name, make, reference, shape, scripted_as):
    layer = make()
    module = scriptable(layer)
    tensors = dict(layer.named_parameters()) | dict(layer.named_buffers())
    assert {n: id(t) for n, t in module.named_parameters()} == {
        n: id(t) for n, t in layer.named_parameters()
    }
    assert all(t is tensors[n] for n, t in module.named_buffers())
    assert not any(t.is_meta for t in module.state_dict().values())
    assert module.training == layer.training


def _conv_bn_relu(bn: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), bn, nn.ReLU())


class _Block(nn.Module):
    """Layers reached as attributes, in a Sequential and shared twice."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv_bn_relu(nlnn.BatchNorm2d(8))
        self.body = nn.Sequential(nn.Conv2d(8, 8, 1), nlnn.BatchNormAct2d(8, act="silu"))
        self.frozen = nlnn.FrozenBatchNorm2d(8)
        self.gn = nlnn.GroupNorm(4, 8)
        self.ln = nlnn.LayerNorm(8)
        self.again = self.gn  # the same module under two names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.gn(self.frozen(self.body(self.stem(x))))
        return self.ln(self.again(x).permute(0, 2, 3, 1))


def test_model_scripts_with_the_same_output_keys_and_parameters():
    model = _randomize(_Block()).eval()
    x = _input((2, 3, 6, 6))
    expected = model(x)
    keys = list(model.state_dict())
    params = list(model.parameters())

    scripted = torch.jit.script(model)

    assert isinstance(scripted, torch.jit.ScriptModule)
    torch.testing.assert_close(scripted(x), expected, rtol=1e-5, atol=1e-5)
    assert list(scripted.state_dict()) == keys
    assert [p.data_ptr() for p in scripted.parameters()] == [p.data_ptr() for p in params]
    # torch.jit.script puts the prepared modules in the parents (see normlab.nn._script):
    # the model now holds torch's layers, with its own Parameters, and still computes the same.
    assert type(model.stem[1]) is nn.BatchNorm2d and model.gn is model.again
    now = list(model.parameters())
    assert len(now) == len(params) and all(a is b for a, b in zip(now, params, strict=True))
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_scripted_model_saves_and_loads_without_normlab(tmp_path):
    model = _randomize(_Block()).eval()
    x = _input((2, 3, 6, 6))
    path = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(copy.deepcopy(model)), str(path))
    torch.save({"x": x, "y": model(x)}, tmp_path / "io.pt")
    code = (
        "import sys, torch\n"
        f"m = torch.jit.load({str(path)!r}); io = torch.load({str(tmp_path / 'io.pt')!r})\n"
        "torch.testing.assert_close(m(io['x']), io['y'], rtol=1e-5, atol=1e-5)\n"
        "assert not any(n.startswith('normlab') for n in sys.modules), 'normlab was imported'\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_scripting_a_deep_copy_leaves_the_model_alone():
    model = _conv_bn_relu(nlnn.BatchNorm2d(8)).eval()
    torch.jit.script(copy.deepcopy(model))
    assert type(model[1]) is nlnn.BatchNorm2d


class _MyBatchNorm(nlnn.BatchNorm2d):
    """A subclass adding an attribute only: computes what BatchNorm2d computes."""

    def __init__(self, num_features: int, tag: str = "x") -> None:
        super().__init__(num_features)
        self.tag = tag


class _PermutedLayerNorm(nlnn.LayerNorm):
    """A subclass with its own forward (channels-first LayerNorm, as in ConvNeXt)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def test_subclass_scripts_only_when_it_computes_like_its_base():
    assert computes_like(_MyBatchNorm, nlnn.BatchNorm2d)
    assert not computes_like(_PermutedLayerNorm, nlnn.LayerNorm)
    assert not computes_like(nlnn.BatchNormAct2d, nlnn.BatchNormBase)
    assert not computes_like(nlnn.LayerNorm, nlnn.RMSNorm)
    scripted = torch.jit.script(_randomize(_MyBatchNorm(4)).eval())
    assert scripted.original_name == "BatchNorm2d"
    with pytest.raises(
        NotScriptableError,
        match=r"_PermutedLayerNorm.*subclass of normlab\."
        r"LayerNorm.*convert\(model, to='torch', mapping=",
    ):
        torch.jit.script(nn.Sequential(_PermutedLayerNorm(4)))
    assert torch_equivalent(_PermutedLayerNorm(4)) is None


def _plain_bn_of(model: nn.Module) -> nn.Module:
    return convert(
        model,
        to="torch",
        mapping={nlnn.BatchRenorm2d: nn.BatchNorm2d, nlnn.GhostBatchNorm2d: nn.BatchNorm2d},
    )


# (id, layer, what the message must say, the fix it names: model -> scriptable model)
UNSCRIPTABLE = [
    ("sync", lambda: nlnn.SyncBatchNorm(8), r"normlab\.SyncBatchNorm.*revert_sync_batchnorm",
     normlab.revert_sync_batchnorm),
    ("sync-act", lambda: nlnn.SyncBatchNormAct(8), r"SyncBatchNormAct.*revert_sync_batchnorm",
     normlab.revert_sync_batchnorm),
    ("renorm-freeze", lambda: nlnn.BatchRenorm2d(8),
     r"BatchRenorm2d.*freeze_batch_norm\(model\).*fold_batchnorm",
     normlab.freeze_batch_norm),
    ("renorm-fold", lambda: nlnn.BatchRenorm2d(8), r"fold_batchnorm\(model\.eval\(\)\)",
     lambda m: fold_batchnorm(m.eval())),
    ("ghost-convert", lambda: nlnn.GhostBatchNorm2d(8, virtual_batch_size=2),
     r"GhostBatchNorm2d.*convert\(model, to='torch', mapping=\{normlab\.GhostBatchNorm2d: "
     r"torch\.nn\.BatchNorm2d\}\)", _plain_bn_of),
    ("renorm-convert", lambda: nlnn.BatchRenorm2d(8), r"mapping=\{normlab\.BatchRenorm2d",
     _plain_bn_of),
]  # fmt: skip


@pytest.mark.parametrize(
    "name,make,message,fix", UNSCRIPTABLE, ids=[row[0] for row in UNSCRIPTABLE]
)
def test_unscriptable_layer_names_a_fix_that_works(name, make, message, fix):
    model = _randomize(_conv_bn_relu(make())).eval()
    x = _input((2, 3, 5, 5))
    expected = model(x)
    with pytest.raises(NotScriptableError, match=message):
        torch.jit.script(model)
    with pytest.raises(RuntimeError, match=message):  # a RuntimeError, alone or nested
        torch.jit.script(model[1])

    scripted = torch.jit.script(fix(copy.deepcopy(model)))

    torch.testing.assert_close(scripted(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "setting,expected", [("freeze_stats", "freeze_stats=True"), ("small_batch", "'running'")]
)
def test_normlab_only_training_options_warn(setting, expected):
    layer = (
        nlnn.BatchNorm2d(4)
        if setting == "freeze_stats"
        else nlnn.BatchNorm2d(4, small_batch="running")
    )
    if setting == "freeze_stats":
        layer.freeze_stats = True
    with pytest.warns(RuntimeWarning, match=rf"{expected}.*torch's semantics"):
        torch.jit.script(layer)
    with pytest.warns(RuntimeWarning, match=expected):
        convert(layer, to="torch")
