"""Norm + activation layers (fused and composite) and InPlaceABN against their references:
NumPy float64 (``reference`` + ``reference_variants``) and torch eager Conv-BN-act."""

from __future__ import annotations

import copy
import importlib.util
import pathlib

import numpy as np
import pytest
import torch
from torch import nn

import normlab
import normlab.ops.cpu.steps as steps
from normlab import functional as NF
from normlab import plan as P
from normlab import reference as ref
from normlab import reference_variants as rv
from normlab.nn.act import (
    BatchNormAct1d,
    BatchNormAct2d,
    BatchNormAct3d,
    GroupNormAct,
    LayerNormAct,
)
from normlab.nn.batchnorm import BatchNorm2d
from normlab.nn.inplace_abn import InPlaceABN
from normlab.nn.normalization import GroupNorm, LayerNorm
from normlab.ops.composite import Composite
from normlab.ops.cpu import ACT_CODES

F64 = torch.float64


@pytest.fixture(autouse=True)
def _fuse_small_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests' tensors are small: take the fused path for them anyway."""
    monkeypatch.setattr(steps, "FUSED_MIN_NUMEL", 0)


@pytest.fixture
def kernel_acts(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The activation codes the one-call steps' kernels are called with (BatchNorm train
    step and per-row step, with and without autograd), in call order."""
    calls: list[int] = []

    def spy(original, act_index: int):  # noqa: ANN001, ANN202
        def wrapped(*args):  # noqa: ANN002, ANN202
            calls.append(args[act_index])
            return original(*args)
        return wrapped

    # (ctx, x, weight, bias, running_mean, running_var, momentum, eps, act, ...)
    train = spy(steps._train_forward, 8)
    # (ctx, x, weight, bias, rows, groups, features, eps, center, act, slope)
    rows = spy(steps._rows_forward, 9)
    monkeypatch.setattr(steps, "_train_forward", train)
    monkeypatch.setattr(steps, "_rows_forward", rows)
    # autograd's StepFunction calls the kernels' holders, bound at import
    monkeypatch.setattr(steps._BatchKernels, "forward", staticmethod(train))
    monkeypatch.setattr(steps._RowsKernels, "forward", staticmethod(rows))
    return calls


ACTS = [("relu", 0.01), ("leaky_relu", 0.2), ("silu", 0.01), ("gelu", 0.01), ("identity", 0.01)]
FUSED_ACTS = ("relu", "leaky_relu")  # the activations the CPU kernels fuse


def _fused(provider: object, p: P.Plan, x: torch.Tensor) -> bool:
    """Whether the routed ``provider`` runs ``p`` on ``x`` with the activation fused into
    the kernels (a one-call step with a non-zero activation code)."""
    return isinstance(provider, (steps.BatchStep, steps.RowsStep)) and steps.fused_code(
        p, x
    ) in (1, 2)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy().copy()


def _close(actual: torch.Tensor, expected: np.ndarray, tol: float) -> None:
    np.testing.assert_allclose(_np(actual), expected, rtol=tol, atol=tol)


def _params(layer: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5 + 0.5)


# --------------------------------------------------------------------------------------------
# BatchNormAct: fused kernels (backend auto/cpu) and composite (backend torch)
# --------------------------------------------------------------------------------------------

BN_ACT_CASES = [
    (BatchNormAct1d, (7, 3)),
    (BatchNormAct1d, (4, 3, 5)),
    (BatchNormAct2d, (3, 4, 5, 6)),
    (BatchNormAct3d, (2, 3, 2, 3, 4)),
]


@pytest.mark.parametrize("act,slope", ACTS)
@pytest.mark.parametrize("cls,shape", BN_ACT_CASES)
@pytest.mark.parametrize("path", ["torch", "cpu"])
def test_batch_norm_act_matches_reference(path, cls, shape, act, slope, kernel_acts) -> None:
    """Fused (cpu; relu and leaky_relu: the train step's kernel) or composite: the same
    float64 reference values, gradients and running statistics."""
    layer = cls(shape[1], dtype=F64, act=act, slope=slope)
    _params(layer)
    x = (torch.randn(shape, dtype=F64) * 1.5 + 0.5).requires_grad_()
    dy = torch.randn(shape, dtype=F64)
    p = P.batch(x, batch_stats=True, eps=layer.eps, momentum=0.1, act=act, slope=slope)
    call = P.Call(x, layer.weight, layer.bias, layer.running_mean, layer.running_var)
    provider = normlab.ops.route(p, call, path)
    assert provider.name == path
    assert isinstance(provider, Composite) == (path == "torch")
    assert _fused(provider, p, x) == (path == "cpu" and act in FUSED_ACTS)
    if path == "cpu" and act in FUSED_ACTS:
        assert isinstance(provider, steps.BatchStep)
    with normlab.use_backend(path):
        y = layer(x)
        y.backward(dy)
    # the train step's kernel ran (with the activation fused) exactly where routed so
    step = isinstance(provider, steps.BatchStep)
    assert kernel_acts == ([ACT_CODES[act]] if _fused(provider, p, x) else [0] if step else [])
    w, b = _np(layer.weight), _np(layer.bias)
    pre = ref.batch_norm_forward(_np(x), w, b, layer.eps)
    _close(y, rv.activation_forward(pre, act, slope), 1e-10)
    dpre = rv.activation_backward(_np(dy), pre, act, slope)
    dx, dw, db = ref.batch_norm_backward(dpre, _np(x), w, layer.eps)
    _close(x.grad, dx, 1e-9)
    _close(layer.weight.grad, dw, 1e-9)
    _close(layer.bias.grad, db, 1e-9)
    mean, var, count = ref.batch_stats(_np(x))
    rm, rvar, _ = ref.update_running_stats(np.zeros(shape[1]), np.ones(shape[1]), mean, var,
                                           count, 0.1, 0)
    _close(layer.running_mean, rm, 1e-12)
    _close(layer.running_var, rvar, 1e-12)
    layer.eval()
    eval_pre = ref.batch_norm_eval(_np(x), rm, rvar, w, b, layer.eps)
    with normlab.use_backend(path):
        _close(layer(x), rv.activation_forward(eval_pre, act, slope), 1e-10)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("act,slope", [("relu", 0.0), ("leaky_relu", 0.1), ("gelu", 0.0)])
def test_fused_float32_matches_torch_eager(act, slope, affine, kernel_acts) -> None:
    """float32 fused kernels vs torch.nn.BatchNorm2d followed by the torch activation,
    with a large common mean (the statistics must not cancel catastrophically)."""
    layer = BatchNormAct2d(6, act=act, slope=slope, affine=affine, momentum=None)
    eager = nn.BatchNorm2d(6, affine=affine, momentum=None)
    if affine:
        _params(layer, seed=4)
        eager.load_state_dict(layer.state_dict())
    x = (torch.randn(8, 6, 7, 7) * 0.5 + 100.0).requires_grad_()
    x_eager = x.detach().clone().requires_grad_()
    dy = torch.randn(8, 6, 7, 7)
    with normlab.use_backend("cpu"):
        y = layer(x)
    y.backward(dy)
    # relu/leaky_relu fused into the train step's kernel; gelu applied by torch after
    # the normalization (whichever cpu entry ran it)
    if act in FUSED_ACTS:
        assert kernel_acts == [ACT_CODES[act]]
    else:
        assert all(code == 0 for code in kernel_acts)
    y_eager = NF.activation(eager(x_eager), act, slope)
    y_eager.backward(dy)
    torch.testing.assert_close(y, y_eager, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(x.grad, x_eager.grad, atol=5e-4, rtol=1e-3)
    if affine:
        torch.testing.assert_close(layer.weight.grad, eager.weight.grad, atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(layer.bias.grad, eager.bias.grad, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(layer.running_mean, eager.running_mean)
    torch.testing.assert_close(layer.running_var, eager.running_var)
    assert int(layer.num_batches_tracked) == 1


ROW_ACT_CASES = [  # norm, x shape, num_groups or normalized_shape
    ("group", (3, 6, 4, 5), 2),
    ("group", (5, 6), 3),  # [N, C]: one value per channel and sample
    ("layer", (3, 2, 4, 5), (4, 5)),
    ("layer", (6, 7), 7),
]


def _row_act_layer(norm: str, arg, shape, act: str, slope: float) -> nn.Module:  # noqa: ANN001
    if norm == "group":
        return GroupNormAct(arg, shape[1], dtype=F64, act=act, slope=slope)
    return LayerNormAct(arg, dtype=F64, act=act, slope=slope)


@pytest.mark.parametrize("act,slope", ACTS)
@pytest.mark.parametrize("norm,shape,arg", ROW_ACT_CASES)
@pytest.mark.parametrize("path", ["torch", "cpu"])
def test_group_and_layer_norm_act_match_reference(
    path, norm, shape, arg, act, slope, kernel_acts
) -> None:
    """Fused (cpu; relu and leaky_relu) or composite: the same float64 reference values and
    gradients; the kernels take the activation exactly where the route says."""
    layer = _row_act_layer(norm, arg, shape, act, slope)
    _params(layer)
    x = (torch.randn(shape, dtype=F64) * 1.5 + 0.5).requires_grad_()
    dy = torch.randn(shape, dtype=F64)
    if norm == "group":
        p = P.group(x, arg, layer.eps, act, slope)
    else:
        p = P.layer(x, (arg,) if isinstance(arg, int) else tuple(arg), layer.eps, act, slope)
    provider = normlab.ops.route(p, P.Call(x, layer.weight, layer.bias), path)
    if path == "cpu":  # one rows step: the fused entry for relu/leaky_relu, else the plain one
        assert isinstance(provider, steps.RowsStep)
        assert provider.fused_only == (act in FUSED_ACTS)
        assert steps.fused_code(p, x) == ACT_CODES.get(act)
    else:
        assert isinstance(provider, Composite)
    assert _fused(provider, p, x) == (path == "cpu" and act in FUSED_ACTS)
    with normlab.use_backend(path):
        y = layer(x)
        y.backward(dy)
    # backend cpu: one rows step, with the activation fused or (silu, gelu) after it
    assert kernel_acts == ([ACT_CODES.get(act, 0)] if path == "cpu" else [])
    w, b = _np(layer.weight), _np(layer.bias)
    if norm == "group":
        pre = ref.group_norm_forward(_np(x), arg, w, b, layer.eps)
    else:
        pre = ref.layer_norm_forward(_np(x), arg, w, b, layer.eps)
    _close(y, rv.activation_forward(pre, act, slope), 1e-10)
    dpre = rv.activation_backward(_np(dy), pre, act, slope)
    if norm == "group":
        dx, dw, db = ref.group_norm_backward(dpre, _np(x), arg, w, layer.eps)
    else:
        dx, dw, db = ref.layer_norm_backward(dpre, _np(x), arg, w, layer.eps)
    _close(x.grad, dx, 1e-9)
    _close(layer.weight.grad, dw, 1e-9)
    _close(layer.bias.grad, db, 1e-9)


@pytest.mark.parametrize("act,slope", [("relu", 0.0), ("leaky_relu", 0.1)])
@pytest.mark.parametrize("norm", ["group", "layer"])
def test_fused_rows_float32_as_accurate_as_torch(norm, act, slope, kernel_acts) -> None:
    """float32 fused GroupNormAct/LayerNormAct and torch's float32 norm then activation,
    both against torch in float64, on input with a large common mean (x - mean must not
    cancel): the fused errors are at most twice torch's own."""
    shape = (4, 8, 6, 6)
    if norm == "group":
        layer, eager = GroupNormAct(4, 8, act=act, slope=slope), nn.GroupNorm(4, 8)
    else:
        layer, eager = LayerNormAct((6, 6), act=act, slope=slope), nn.LayerNorm((6, 6))
    _params(layer, seed=5)
    eager.load_state_dict(layer.state_dict())
    exact = copy.deepcopy(eager).double()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 0.5 + 100.0
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    results = []
    for module, dtype in ((layer, torch.float32), (eager, torch.float32), (exact, F64)):
        x_ = x.to(dtype).requires_grad_()
        with normlab.use_backend("cpu"):
            y = NF.activation(module(x_), act, slope) if module is not layer else module(x_)
        grads = torch.autograd.grad(y, (x_, *module.parameters()), dy.to(dtype))
        results.append([t.double() for t in (y, *grads)])
    assert kernel_acts == [ACT_CODES[act]]  # the layer ran the fused rows kernel, once
    ours, theirs, reference = results
    for o, t, r in zip(ours, theirs, reference, strict=True):
        assert (o - r).abs().max() <= 2 * (t - r).abs().max() + 1e-6


@pytest.mark.parametrize(
    "act_layer,plain_layer,shape",
    [
        (lambda: GroupNormAct(2, 6, act="silu"), lambda: GroupNorm(2, 6), (3, 6, 4, 4)),
        (lambda: LayerNormAct((4, 5), act="leaky_relu", slope=0.3), lambda: LayerNorm((4, 5)),
         (3, 2, 4, 5)),
        (lambda: BatchNormAct2d(6, act="gelu"), lambda: BatchNorm2d(6), (3, 6, 4, 4)),
    ],
)
def test_norm_act_state_dict_and_composite(backend, act_layer, plain_layer, shape) -> None:
    layer, plain = act_layer().double(), plain_layer().double()
    _params(plain, seed=7)
    layer.load_state_dict(plain.state_dict())  # strict: the keys are the plain layer's
    plain.load_state_dict(layer.state_dict())
    torch.nn.Module.train(plain, False), layer.train(False)
    x = torch.randn(shape, dtype=F64, requires_grad=True)
    y = layer(x)
    expected = NF.activation(plain(x), layer.act, layer.slope)
    torch.testing.assert_close(y, expected)
    if isinstance(layer, GroupNormAct):
        w, b = _np(layer.weight), _np(layer.bias)
        pre = ref.group_norm_forward(_np(x), 2, w, b, layer.eps)
        _close(y, rv.activation_forward(pre, "silu"), 1e-10)
    if isinstance(layer, LayerNormAct):
        pre = ref.layer_norm_forward(_np(x), (4, 5), _np(layer.weight), _np(layer.bias),
                                     layer.eps)
        _close(y, rv.activation_forward(pre, "leaky_relu", 0.3), 1e-10)
    assert "act=" in repr(layer)


@pytest.mark.parametrize("act,slope", ACTS)
@pytest.mark.parametrize("norm", ["batch", "group", "layer"])
def test_functional_act_fused_matches_composite(norm, act, slope, kernel_acts) -> None:
    """normlab.functional's norms with ``act=``: backend cpu (fused for relu/leaky_relu)
    gives the composite's (backend torch) output and gradients."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 6, 3, 5, generator=g, dtype=F64)
    w, b = torch.rand(6, generator=g, dtype=F64) + 0.5, torch.randn(6, generator=g, dtype=F64)
    dy = torch.randn(x.shape, generator=g, dtype=F64)
    if norm == "layer":
        w, b = w.repeat(5)[:15].reshape(3, 5), b.repeat(5)[:15].reshape(3, 5)
    results = {}
    for backend in ("torch", "cpu"):
        kernel_acts.clear()
        x_, w_, b_ = (t.clone().requires_grad_() for t in (x, w, b))
        if norm == "batch":
            y = NF.batch_norm(x_, torch.zeros(6, dtype=F64), torch.ones(6, dtype=F64), w_, b_,
                              True, act=act, slope=slope, backend=backend)
        elif norm == "group":
            y = NF.group_norm(x_, 3, w_, b_, act=act, slope=slope, backend=backend)
        else:
            y = NF.layer_norm(x_, (3, 5), w_, b_, act=act, slope=slope, backend=backend)
        results[backend] = (y, *torch.autograd.grad(y, (x_, w_, b_), dy))
        fused = [code for code in kernel_acts if code]
        assert fused == ([ACT_CODES[act]] if backend == "cpu" and act in FUSED_ACTS else [])
    for ours, composite in zip(results["cpu"], results["torch"], strict=True):
        torch.testing.assert_close(ours, composite, atol=1e-10, rtol=1e-10)


def test_act_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="act must be one of"):
        BatchNormAct2d(3, act="tanh")
    with pytest.raises(TypeError, match="slope"):
        GroupNormAct(1, 3, act="leaky_relu", slope="0.1")
    with pytest.raises(ValueError, match="weight must have shape"):
        NF.batch_norm(torch.randn(4, 3), None, None, torch.ones(2), None, True, act="relu")
    with pytest.raises(ValueError, match="act must be one of"):
        NF.check_activation("tanh")
    with pytest.raises(ValueError, match="act must be one of"):
        NF.group_norm(torch.randn(2, 4), 2, act="tanh")
    with pytest.raises(TypeError, match="slope"):
        NF.layer_norm(torch.randn(2, 4), (4,), act="leaky_relu", slope=None)
    assert set(P.ACTIVATIONS) == {"relu", "leaky_relu", "silu", "gelu", "identity"}


# --------------------------------------------------------------------------------------------
# InPlaceABN against torch eager Conv-BN-activation
# --------------------------------------------------------------------------------------------

ABN_CASES = [
    ("leaky_relu", 0.01, torch.float32, 1e-4),
    ("leaky_relu", 0.3, torch.float64, 1e-10),
    ("elu", 1.0, torch.float32, 1e-4),
    ("elu", 0.5, torch.float64, 1e-10),
    ("identity", 0.01, torch.float32, 1e-4),
]


def _eager_act(name: str, param: float) -> nn.Module:
    return {"leaky_relu": nn.LeakyReLU(param), "elu": nn.ELU(param),
            "identity": nn.Identity()}[name]


@pytest.mark.parametrize("inplace", [True, False])
@pytest.mark.parametrize("name,param,dtype,tol", ABN_CASES)
def test_inplace_abn_matches_torch_eager(backend, name, param, dtype, tol, inplace) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False, dtype=dtype)
    bn = nn.BatchNorm2d(4, dtype=dtype)
    _params(bn, seed=2)
    eager = nn.Sequential(conv, bn, _eager_act(name, param))
    abn = InPlaceABN(4, dtype=dtype, activation=name, activation_param=param, inplace=inplace)
    abn.load_state_dict(bn.state_dict())
    ours = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False, dtype=dtype), abn)
    ours[0].load_state_dict(conv.state_dict())
    x = torch.randn(5, 3, 6, 6, dtype=dtype, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    dy = torch.randn(5, 4, 6, 6, dtype=dtype)
    for _ in range(2):
        y_eager = eager(x)
        y_eager.backward(dy)
        y = ours(x2)
        y.backward(dy)
    opts = {"atol": tol, "rtol": tol}
    torch.testing.assert_close(y, y_eager, **opts)
    torch.testing.assert_close(x2.grad, x.grad, **opts)
    torch.testing.assert_close(ours[0].weight.grad, conv.weight.grad, **opts)
    torch.testing.assert_close(abn.weight.grad, bn.weight.grad, **opts)
    torch.testing.assert_close(abn.bias.grad, bn.bias.grad, **opts)
    torch.testing.assert_close(abn.running_mean, bn.running_mean, **opts)
    torch.testing.assert_close(abn.running_var, bn.running_var, **opts)
    eager.eval(), ours.eval()
    torch.testing.assert_close(ours(x2), eager(x), **opts)


def test_inplace_abn_writes_over_its_input_and_checks_arguments() -> None:
    abn = InPlaceABN(3)
    h = torch.randn(4, 3, 5, 5, requires_grad=True) * 2  # a non-leaf, as a conv output is
    out = abn(h)
    assert out.data_ptr() == h.data_ptr()
    out.sum().backward()
    with pytest.raises(ValueError, match="activation_param must be > 0"):
        InPlaceABN(3, activation="leaky_relu", activation_param=0.0)
    with pytest.raises(ValueError, match="activation must be one of"):
        InPlaceABN(3, activation="relu")
    with torch.no_grad():
        abn.weight[1] = 0.0
    with pytest.raises(ValueError, match="weight without zero"):
        abn(torch.randn(4, 3, 5, 5))


def test_benchmark_quick_runs() -> None:
    path = pathlib.Path(__file__).parents[2] / "benchmarks" / "variants.py"
    spec = importlib.util.spec_from_file_location("bench_variants", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--quick"])
    assert result["memory_saving"] > 0.4  # InPlaceABN saves > 40% of the saved activations
    assert all(r > 0 for r in result["fused_ratios"].values())
    assert set(result["geomeans"]) == {
        f"{layer}/{act}" for layer in module.FUSED_LAYERS for act in module.EAGER_ACTS
    }
    assert all(r > 0 for r in result["geomeans"].values())
    assert result["grad_errors"][1]["abn32"] < 1e-4
    assert result["grad_errors"][10]["abn64"] < 1e-10
