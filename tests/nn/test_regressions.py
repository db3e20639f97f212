"""Regressions found by running normlab against code nobody here wrote (issue 13): each
case failed before its fix. Every backend the user can pick, "auto" included."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
from collections.abc import Callable

import pytest
import torch
from torch.func import functional_call, grad, jacfwd, jacrev

import normlab
from normlab import ops
from normlab.ops.cpu import layouts

BACKENDS = ops.CHOICES  # "auto", "cpu", "torch"


def _layouts(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """``x`` as it comes, and with the channels innermost in memory (channels-last for
    4D/5D, transposed for 3D)."""
    last = x.movedim(1, -1).contiguous().movedim(-1, 1)
    return {"contiguous": x, "channels-last": last}


def _truth_grads(
    layer: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """torch.nn's layer in float64 on a contiguous copy: output, dx, dweight, dbias."""
    twin = layer.double()
    x64 = x.detach().double().contiguous().requires_grad_()
    y = twin(x64)
    dx, dw, db = torch.autograd.grad(y, (x64, twin.weight, twin.bias), dy.double())
    return y, dx, dw, db


# InstanceNorm in eval with running statistics: torch.batch_norm's CPU backward misreads
# a batch of one whose batch stride is the smallest (the [1, C, 1, S] view of a
# channels-last input, an unsqueezed [C, *S]). Output right, gradients wrong.
INSTANCE_EVAL = [
    ("in1d-batch1", torch.nn.InstanceNorm1d, normlab.InstanceNorm1d, (1, 3, 7)),
    ("in1d-unbatched", torch.nn.InstanceNorm1d, normlab.InstanceNorm1d, (3, 7)),
    ("in2d-batch1", torch.nn.InstanceNorm2d, normlab.InstanceNorm2d, (1, 3, 4, 5)),
    ("in2d-unbatched", torch.nn.InstanceNorm2d, normlab.InstanceNorm2d, (3, 4, 5)),
    ("in2d-batch2", torch.nn.InstanceNorm2d, normlab.InstanceNorm2d, (2, 3, 4, 5)),
    ("in3d-batch1", torch.nn.InstanceNorm3d, normlab.InstanceNorm3d, (1, 3, 2, 3, 4)),
    ("in3d-unbatched", torch.nn.InstanceNorm3d, normlab.InstanceNorm3d, (3, 2, 3, 4)),
    ("bn2d-batch1", torch.nn.BatchNorm2d, normlab.BatchNorm2d, (1, 3, 4, 5)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels-last"])
@pytest.mark.parametrize(("torch_cls", "cls", "shape"), [c[1:] for c in INSTANCE_EVAL],
                         ids=[c[0] for c in INSTANCE_EVAL])
def test_eval_with_running_stats_gives_right_gradients_in_any_layout(
    torch_cls: type, cls: type, shape: tuple[int, ...], layout: str, backend: str
) -> None:
    gen = torch.Generator().manual_seed(0)
    layer = cls(3, affine=True, track_running_stats=True).eval()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5, generator=gen)
        layer.bias.uniform_(-1, 1, generator=gen)
        layer.running_mean.uniform_(-1, 1, generator=gen)
        layer.running_var.uniform_(0.5, 2, generator=gen)
    twin = torch_cls(3, affine=True, track_running_stats=True).eval()
    twin.load_state_dict(layer.state_dict())
    unbatched = len(shape) == getattr(layer, "_spatial_dims", -1) + 1
    x = _layouts(torch.randn((1, *shape) if unbatched else shape, generator=gen))[layout]
    x = (x[0] if unbatched else x).detach().requires_grad_()  # [0] keeps the strides
    dy = torch.randn(shape, generator=gen)
    with normlab.use_backend(backend):
        y = layer(x)
        got = (y, *torch.autograd.grad(y, (x, layer.weight, layer.bias), dy))
    for name, g, want in zip(("y", "dx", "dweight", "dbias"), got, _truth_grads(twin, x, dy),
                             strict=True):
        torch.testing.assert_close(g.double(), want, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("transform", ["grad", "jacrev", "jacfwd"])
def test_torch_func_over_instance_norm_with_running_stats(transform: str, backend: str) -> None:
    """torch.func's transforms over a training InstanceNorm that tracks running statistics:
    the same derivatives and running statistics as torch.nn's layer."""
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1)) + 3
    results = []
    for cls in (torch.nn.InstanceNorm2d, normlab.InstanceNorm2d):
        layer = cls(3, affine=True, track_running_stats=True)

        def loss(params: dict[str, torch.Tensor], layer: torch.nn.Module = layer) -> torch.Tensor:
            out = functional_call(layer, params, (x,)).pow(3).sum(dim=(0, 2, 3))
            return out.sum() if transform == "grad" else out

        apply = {"grad": grad, "jacrev": jacrev, "jacfwd": jacfwd}[transform]
        with normlab.use_backend(backend):
            derivative = apply(loss)(dict(layer.named_parameters()))
        results.append((derivative, layer.running_mean.clone(), layer.running_var.clone()))
    (want, want_mean, want_var), (got, got_mean, got_var) = results
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_mean, want_mean)
    torch.testing.assert_close(got_var, want_var)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64],
                         ids=str)
def test_rms_norm_default_eps_is_torchs(dtype: torch.dtype, backend: str) -> None:
    """eps=None is the epsilon of the computation's dtype (float32's for half types): the
    issue's example, where bfloat16's own epsilon gave [0.101, 0.00565] for [1.406, 0.0786]."""
    x = torch.tensor([[0.009, 0.0005], [1.0, -2.0]], dtype=dtype)
    with normlab.use_backend(backend):
        got = normlab.RMSNorm(2, dtype=dtype)(x)
    want = torch.nn.RMSNorm(2, dtype=dtype)(x)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_norm_default_eps_under_autocast(backend: str) -> None:
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(2)) * 1e-3
    with normlab.use_backend(backend), torch.autocast("cpu", torch.bfloat16):
        got = normlab.RMSNorm(8)(x)
        want = torch.nn.RMSNorm(8)(x)
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-3)


EPS_LAYERS: list[tuple[str, Callable[[], torch.nn.Module], tuple[int, ...]]] = [
    ("layer_norm", lambda: normlab.LayerNorm(5), (2, 5)),
    ("layer_norm_act", lambda: normlab.LayerNormAct(5), (2, 5)),
    ("group_norm", lambda: normlab.GroupNorm(2, 4), (2, 4, 3)),
    ("group_norm_act", lambda: normlab.GroupNormAct(2, 4), (2, 4, 3)),
    ("rms_norm", lambda: normlab.RMSNorm(5), (2, 5)),
    ("frozen", lambda: normlab.FrozenBatchNorm2d(4), (2, 4, 3, 3)),
    ("batch_norm", lambda: normlab.BatchNorm1d(4), (2, 4)),
]


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), "small"])
@pytest.mark.parametrize(("make", "shape"), [c[1:] for c in EPS_LAYERS],
                         ids=[c[0] for c in EPS_LAYERS])
def test_eps_set_after_construction_is_checked(make, shape, bad) -> None:  # noqa: ANN001
    layer = make()
    with pytest.raises((ValueError, TypeError), match="eps must be"):
        layer.eps = bad
    for backend in BACKENDS:
        with normlab.use_backend(backend):
            assert torch.isfinite(layer(torch.randn(shape))).all()
    layer.eps = 1e-3  # a valid value is taken
    assert layer.eps == 1e-3


def test_rms_norm_eps_may_be_set_back_to_none() -> None:
    layer = normlab.RMSNorm(4, eps=1e-3)
    layer.eps = None
    assert layer.eps is None


GROUP_NORM_CRASH = """
import torch, normlab
x = torch.randn(2, 4, 3, 3).to(memory_format=torch.channels_last)
x5 = torch.randn(2, 4, 2, 3, 3).to(memory_format=torch.channels_last_3d)
for backend in normlab.ops.CHOICES:
    with normlab.use_backend(backend):
        for inp in (x, x5):
            for layer, act in ((normlab.GroupNorm(2, 4), torch.nn.Identity()),
                               (normlab.GroupNormAct(2, 4), torch.nn.ReLU())):
                twin = torch.nn.GroupNorm(2, 4)
                layer(inp).pow(2).sum().backward()
                act(twin(inp.contiguous())).pow(2).sum().backward()
                torch.testing.assert_close(layer.weight.grad, twin.weight.grad)
print("survived")
"""


def test_group_norm_channels_last_with_parameter_grads_only_does_not_crash() -> None:
    """torch 2.13's CPU GroupNorm backward segfaults on a channels-last input that needs no
    gradient while the parameters do: normlab must not route there (run in a child process,
    so a regression is a failed test, not a dead test worker)."""
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(GROUP_NORM_CRASH)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "survived" in run.stdout, (run.returncode, run.stderr[-2000:])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("shape", "groups"), [((1, 4, 1), 4), ((1, 4), 4), ((1, 4, 1, 1), 4),
                                               ((2, 4, 1), 4), ((1, 4, 1), 2), ((1, 1), 1)])
def test_group_norm_one_value_per_group_raises_as_torch(
    shape: tuple[int, ...], groups: int, backend: str
) -> None:
    x = torch.randn(shape)
    try:
        torch.nn.GroupNorm(groups, shape[1])(x)
    except ValueError:
        with normlab.use_backend(backend), pytest.raises(ValueError, match="more than 1 value"):
            normlab.GroupNorm(groups, shape[1])(x)
    else:
        with normlab.use_backend(backend):
            normlab.GroupNorm(groups, shape[1])(x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_of_one_element_has_zero_input_gradient(affine: bool, backend: str) -> None:
    """Each row normalizes to exactly 0 (output = bias) whatever x is, so dx is exactly 0;
    with eps=1e-10 rounding times 1/sqrt(eps) gave up to 0.011 (torch's own: 0.25)."""
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(64, 1, generator=gen) * 100).requires_grad_()
    layer = normlab.LayerNorm(1, eps=1e-10, elementwise_affine=affine)
    if affine:
        with torch.no_grad():
            layer.weight.uniform_(0.5, 2, generator=gen)
    with normlab.use_backend(backend):
        dx, = torch.autograd.grad(layer(x), x, torch.randn(64, 1, generator=gen))
    assert torch.equal(dx, torch.zeros_like(dx))


def test_constants_for_absent_parameters_are_not_kept_for_wide_rows() -> None:
    """A LayerNorm without affine parameters on wide rows once left full-size ones/zeros
    vectors in a cache for good (128 MB after one LayerNorm(2**24) call)."""
    layouts._cached_constant.cache_clear()
    layouts._cached_constant_np.cache_clear()
    features = 2 * layouts._CACHED_CONSTANT_MAX
    x = torch.randn(2, features, requires_grad=True)
    with normlab.use_backend("cpu"):
        normlab.LayerNorm(features, elementwise_affine=False)(x).sum().backward()
        normlab.LayerNorm(16, elementwise_affine=False)(torch.randn(2, 16))
    caches = (layouts._cached_constant, layouts._cached_constant_np)
    held = sum(cache.cache_info().currsize for cache in caches)
    assert 0 < held <= 4  # the small call's constants are cached, the wide call's are not


# Found by the differential fuzz suite (tests/test_fuzz.py).


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm_of_one_element_propagates_non_finite_input(backend: str) -> None:
    x = torch.tensor([[1.0], [float("inf")], [float("nan")], [-3.0]], requires_grad=True)
    want = torch.autograd.grad(torch.nn.LayerNorm(1)(x).sum(), x)[0]
    with normlab.use_backend(backend):
        got = torch.autograd.grad(normlab.LayerNorm(1)(x).sum(), x)[0]
    torch.testing.assert_close(got, want, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_frozen_batch_norm_in_half_precision_is_torchs_eval_batch_norm(dtype: torch.dtype) -> None:
    """The shift (-running_mean * scale) is large here: rounded to half precision before
    the sum it cost up to 36x torch's error, and overflowed to inf in float16."""
    frozen, twin = normlab.FrozenBatchNorm1d(1), torch.nn.BatchNorm1d(1).eval()
    for layer in (frozen, twin):
        layer.running_mean.fill_(1000.0)
        layer.running_var.fill_(1e-4)
    x = (torch.randn(2, 1, 4, generator=torch.Generator().manual_seed(4)) * 0.01 + 1000)
    got, want = frozen(x.to(dtype)), twin(x.to(dtype))
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), want.float(), rtol=0.02, atol=0.05)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 4, 4), (4,)], ids=["whole-sample", "last-dim"])
def test_rms_norm_keeps_a_channels_last_layout_as_torch(
    shape: tuple[int, ...], backend: str
) -> None:
    x = torch.randn(2, 2, 4, 4).to(memory_format=torch.channels_last)
    with normlab.use_backend(backend):
        got = normlab.RMSNorm(shape)(x)
    want = torch.nn.RMSNorm(shape)(x)
    assert got.stride() == want.stride()
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("buffer_dtype", [torch.float64, torch.bfloat16], ids=str)
def test_instance_norm_running_buffers_of_another_dtype_as_torch(
    buffer_dtype: torch.dtype, training: bool, backend: str
) -> None:
    """torch's instance_norm converts its running buffers: any float dtype is taken."""
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    layers = [cls(3, track_running_stats=True).train(training)
              for cls in (torch.nn.InstanceNorm2d, normlab.InstanceNorm2d)]
    for layer in layers:
        layer.running_mean = torch.full((3,), 0.5, dtype=buffer_dtype)
        layer.running_var = torch.full((3,), 2.0, dtype=buffer_dtype)
    want = layers[0](x)
    with normlab.use_backend(backend):
        got = layers[1](x)
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(layers[1], name), getattr(layers[0], name))


NEAR_FLOAT32_MAX = [  # id, layer, input shape, channels-last: the per-sample kernel paths
    ("in2d-planes", lambda: normlab.InstanceNorm2d(32, affine=True), (8, 32, 4, 4), False),
    ("in2d-planes-channels-last", lambda: normlab.InstanceNorm2d(16, affine=True),
     (4, 16, 7, 7), True),
    ("in1d-rows", lambda: normlab.InstanceNorm1d(4, affine=True), (2, 4, 200), False),
    ("in1d-long-rows", lambda: normlab.InstanceNorm1d(4, affine=True), (2, 4, 1000), False),
    # "cpu" only: "auto" runs torch's native GroupNorm, non-finite here as torch's layer.
    ("group-rows-cpu", lambda: normlab.GroupNorm(2, 4), (2, 4, 1000), False),
]


@pytest.mark.parametrize(
    ("make", "shape", "channels_last", "backend"),
    [pytest.param(*c[1:], backend, id=f"{c[0]}-{backend}") for c in NEAR_FLOAT32_MAX
     for backend in (("cpu",) if c[0].endswith("-cpu") else ("auto", "cpu"))],
)
def test_float32_input_near_its_maximum_gives_the_finite_truth(
    make, shape, channels_last, backend  # noqa: ANN001
) -> None:
    """Values up to 3.3e38: their squares (and some x - mean) pass float32's range, the
    float64 truth is finite. The kernels take those rows/planes in float64 (torch's own
    InstanceNorm is finite here; its channels-last BatchNorm, GroupNorm, LayerNorm not)."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(shape, generator=gen).clamp(-3, 3) * 1.1e38
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    layer = make()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 2, generator=gen)
        layer.bias.uniform_(-1, 1, generator=gen)
    truth = copy.deepcopy(layer).double()
    with normlab.use_backend("torch"):  # the composite code in float64: the truth
        want = truth(x.double())
    with normlab.use_backend(backend):
        got = layer(x)
    assert torch.isfinite(want).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
