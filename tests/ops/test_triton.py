"""The Triton provider under ``TRITON_INTERPRET=1`` on CPU tensors (tiny shapes: the
interpreter runs each program in Python), against torch.nn's functions and the composite
code: every norm kind with each fused activation, float32/float16/bfloat16/float64, odd
sizes, strided and channels-last input, masks, eval with running statistics, NaN batches,
data far from zero, fp64 gradcheck, ``torch.compile(fullgraph=True)``, and the routing
table's choices on CUDA, CPU and ``meta``."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import pytest
import torch
from torch.nn import functional as TF

pytest.importorskip("triton")

import normlab  # noqa: E402
from normlab import functional as F  # noqa: E402
from normlab import ops  # noqa: E402
from normlab.ops import triton as provider  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _interpreter() -> None:
    """The kernels run interpreted (tests/conftest.py sets TRITON_INTERPRET=1 before
    anything imports triton)."""
    if os.environ.get(provider.INTERPRET_VAR) != "1" or not provider._kernels().INTERPRETED:
        pytest.skip("TRITON_INTERPRET=1 was not set before triton was imported")


def _act_ref(y: torch.Tensor, act: str, slope: float = 0.1) -> torch.Tensor:
    return {"identity": lambda t: t, "relu": torch.relu, "silu": TF.silu, "gelu": TF.gelu,
            "leaky_relu": lambda t: TF.leaky_relu(t, slope)}[act](y)


# (id, input shape, layout, normlab call, torch.nn reference) -- a call takes
# (x, params, act, backend) and returns y; params hold weight/bias/running buffers.
Call = Callable[..., torch.Tensor]


def _bn(x, p, act, backend):  # noqa: ANN001, ANN202
    return F.batch_norm(x, p["rm"], p["rv"], p["w"], p["b"], training=True, momentum=0.1,
                        eps=1e-5, act=act, slope=0.1, backend=backend)


def _bn_ref(x, p, act):  # noqa: ANN001, ANN202
    return _act_ref(TF.batch_norm(x, p["rm"], p["rv"], p["w"], p["b"], True, 0.1, 1e-5), act)


def _bn_eval(x, p, act, backend):  # noqa: ANN001, ANN202
    return F.batch_norm(x, p["rm"], p["rv"], p["w"], p["b"], training=False, eps=1e-5,
                        act=act, slope=0.1, backend=backend)


def _bn_eval_ref(x, p, act):  # noqa: ANN001, ANN202
    return _act_ref(TF.batch_norm(x, p["rm"], p["rv"], p["w"], p["b"], False, 0.1, 1e-5), act)


def _gn(x, p, act, backend):  # noqa: ANN001, ANN202
    return F.group_norm(x, 2, p["w"], p["b"], 1e-5, act=act, slope=0.1, backend=backend)


def _gn_ref(x, p, act):  # noqa: ANN001, ANN202
    return _act_ref(TF.group_norm(x, 2, p["w"], p["b"], 1e-5), act)


def _ln(x, p, act, backend):  # noqa: ANN001, ANN202
    shape = tuple(x.shape[-1:])
    return F.layer_norm(x, shape, p["lw"], p["lb"], 1e-5, act=act, slope=0.1, backend=backend)


def _ln_ref(x, p, act):  # noqa: ANN001, ANN202
    return _act_ref(TF.layer_norm(x, tuple(x.shape[-1:]), p["lw"], p["lb"], 1e-5), act)


def _in(x, p, act, backend):  # noqa: ANN001, ANN202
    return F.instance_norm(x, p["rm"], p["rv"], p["w"], p["b"], use_input_stats=True,
                           momentum=0.1, eps=1e-5, backend=backend)


def _in_ref(x, p, act):  # noqa: ANN001, ANN202
    return TF.instance_norm(x, p["rm"], p["rv"], p["w"], p["b"], True, 0.1, 1e-5)


def _rms(x, p, act, backend):  # noqa: ANN001, ANN202
    return F.rms_norm(x, tuple(x.shape[-1:]), p["lw"], 1e-6, backend=backend)


def _rms_ref(x, p, act):  # noqa: ANN001, ANN202
    return TF.rms_norm(x, tuple(x.shape[-1:]), p["lw"], 1e-6)


CASES = [
    ("bn1d-2d", (6, 5), "contiguous", _bn, _bn_ref),
    ("bn1d-3d-odd", (3, 5, 7), "contiguous", _bn, _bn_ref),
    ("bn2d", (2, 5, 3, 4), "contiguous", _bn, _bn_ref),
    ("bn2d-channels-last", (2, 5, 3, 4), "channels_last", _bn, _bn_ref),
    ("bn2d-strided", (2, 5, 3, 4), "strided", _bn, _bn_ref),
    ("bn2d-eval", (2, 5, 3, 4), "contiguous", _bn_eval, _bn_eval_ref),
    ("in2d", (2, 5, 3, 3), "contiguous", _in, _in_ref),
    ("gn", (3, 6, 2, 5), "contiguous", _gn, _gn_ref),
    ("gn-channels-last", (3, 6, 2, 5), "channels_last", _gn, _gn_ref),
    ("ln", (4, 3, 7), "contiguous", _ln, _ln_ref),
    ("ln-strided", (4, 3, 7), "strided", _ln, _ln_ref),
    ("rms", (5, 9), "contiguous", _rms, _rms_ref),
]
ACTS = ["identity", "relu", "leaky_relu", "silu", "gelu"]
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-2,
             torch.bfloat16: 1e-1}


def _input(shape: tuple[int, ...], layout: str, dtype: torch.dtype, seed: int = 0,
           offset: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if layout == "strided":  # every other element of the last dimension
        x = torch.randn(*shape[:-1], 2 * shape[-1], generator=g, dtype=torch.float64)[..., ::2]
    else:
        x = torch.randn(shape, generator=g, dtype=torch.float64)
    x = (x * 2 + offset).to(dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    return x


def _params(x: torch.Tensor, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    c, last = x.shape[1], x.shape[-1]
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    param_dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else work

    def rand(n: int, base: float = 0.0) -> torch.Tensor:
        return (torch.rand(n, generator=g, dtype=torch.float64) + base).to(param_dtype)

    return {"w": rand(c, 0.5), "b": rand(c) - 0.5, "lw": rand(last, 0.5), "lb": rand(last),
            "rm": rand(c).to(work), "rv": rand(c, 0.5).to(work)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64],
                         ids=str)
@pytest.mark.parametrize(("shape", "layout", "call", "ref"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_forward_matches_torch(shape, layout, call, ref, dtype: torch.dtype) -> None:  # noqa: ANN001
    """Output and running statistics equal torch.nn's (computed in float64, then cast)."""
    x = _input(shape, layout, dtype)
    ours, theirs = _params(x), _params(x)
    theirs64 = {k: v.double() for k, v in theirs.items()}
    act = "silu" if call in (_bn, _bn_eval, _gn, _ln) else "identity"
    y = call(x, ours, act, "triton")
    expected = ref(x.double(), theirs64, act)
    assert y.dtype == x.dtype and y.shape == x.shape
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(y.double(), expected, atol=tol, rtol=tol)
    torch.testing.assert_close(ours["rm"].double(), theirs64["rm"], atol=tol, rtol=tol)
    torch.testing.assert_close(ours["rv"].double(), theirs64["rv"], atol=tol, rtol=tol)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize(("shape", "layout", "call", "ref"),
                         [c[1:] for c in CASES if c[3] in (_bn, _bn_eval, _gn, _ln)],
                         ids=[c[0] for c in CASES if c[3] in (_bn, _bn_eval, _gn, _ln)])
def test_fused_activation_forward_and_backward(shape, layout, call, ref, act: str) -> None:  # noqa: ANN001
    """Each activation fused: output and gradients (input, weight, bias) equal torch's."""
    x = _input(shape, layout, torch.float64).requires_grad_()
    ours, theirs = _params(x), _params(x)
    for p in (ours, theirs):
        for name in ("w", "b", "lw", "lb"):
            p[name].requires_grad_()
    y = call(x, ours, act, "triton")
    expected = ref(x, theirs, act)
    torch.testing.assert_close(y, expected)
    probe = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=y.dtype)
    names = ("lw", "lb") if call is _ln else ("w", "b")
    got = torch.autograd.grad((y * probe).sum(), [x, *(ours[n] for n in names)])
    want = torch.autograd.grad((expected * probe).sum(), [x, *(theirs[n] for n in names)])
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(("shape", "layout", "call", "ref"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_gradcheck_float64(shape, layout, call, ref) -> None:  # noqa: ANN001
    x = _input(shape, layout, torch.float64).requires_grad_()
    p = _params(x)
    weights = [p[n].requires_grad_() for n in (("lw", "lb") if call in (_ln, _rms) else ("w", "b"))]
    act = "gelu" if call in (_bn, _gn, _ln) else "identity"

    def fn(x: torch.Tensor, *_: torch.Tensor) -> torch.Tensor:
        return call(x, {**p, "rm": p["rm"].clone(), "rv": p["rv"].clone()}, act, "triton")

    assert torch.autograd.gradcheck(fn, (x, *weights), fast_mode=True)


def _route_name(x: torch.Tensor, make_plan: Callable, **call: torch.Tensor | None) -> str:
    from normlab.plan import Call as PlanCall

    return ops.route(make_plan(x), PlanCall(x, **call), "triton").name


def test_calls_take_the_triton_provider() -> None:
    """Not a fallback in disguise: with the interpreter on, backend='triton' routes every
    kind to the provider; without it, nothing on the CPU does."""
    from normlab import plan

    x = torch.randn(4, 6, 3)
    assert _route_name(x, lambda t: plan.batch(t, True, 1e-5, 0.1, "relu")) == "triton"
    assert _route_name(x, lambda t: plan.group(t, 2, 1e-5)) == "triton"
    assert _route_name(x, lambda t: plan.layer(t, (3,), 1e-5, "gelu")) == "triton"
    assert _route_name(x, lambda t: plan.rms(t, (3,), 1e-5)) == "triton"
    auto = ops.routes("cpu", "train", "auto", "batch")
    assert all(e.name != "triton" for e in auto)
    cuda = ops.routes("cuda", "train", "auto", "batch")
    assert cuda[0].name == "triton" and cuda[0].fused_only
    assert ops.routes("cuda", "train", "auto", "batch", activated=False)[0].name == "triton"


def _buffers(channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.zeros(channels, dtype=torch.float64),
            torch.ones(channels, dtype=torch.float64))


@pytest.mark.parametrize(("call", "shape", "padding"), [
    ("batch", (4, 3, 10), 0.3), ("batch", (3, 2, 4, 5), 0.5), ("batch-cl", (3, 4, 2, 5), 0.5),
    ("batch", (9, 3), 0.4), ("instance", (3, 2, 9), 0.4), ("group", (3, 4, 8), 0.3),
    ("batch", (3, 2, 6), 1.0),
], ids=["bn1d", "bn2d", "bn2d-channels-last", "bn1d-2d", "in1d", "gn", "bn-all-padding"])
def test_masked_statistics(call: str, shape: tuple[int, ...], padding: float) -> None:
    """Statistics and running update over the valid positions, as the composite code and
    (for BatchNorm) torch's BatchNorm1d on the concatenated valid values."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g, dtype=torch.float64) + 2
    mask = torch.rand((shape[0], *shape[2:]), generator=g) >= padding
    if call == "batch-cl":  # channels contiguous: the kernels' per-channel tile layout
        call, x = "batch", x.to(memory_format=torch.channels_last)
    results = {}
    for backend in ("triton", "torch"):
        xx = x.clone().requires_grad_()
        w = torch.linspace(0.5, 1.5, shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.linspace(-1, 1, shape[1], dtype=torch.float64, requires_grad=True)
        rm, rv = _buffers(shape[1])
        if call == "batch":
            y = F.batch_norm(xx, rm, rv, w, b, training=True, momentum=0.2, mask=mask,
                             backend=backend)
        elif call == "instance":
            y = F.instance_norm(xx, rm, rv, w, b, use_input_stats=True, momentum=0.2,
                                mask=mask, backend=backend)
        else:
            y = F.group_norm(xx, 2, w, b, mask=mask, backend=backend)
        grads = torch.autograd.grad((y * torch.sin(y)).sum(), (xx, w, b))
        results[backend] = (y, rm, rv, *grads)
    for a, b in zip(results["triton"], results["torch"], strict=True):
        torch.testing.assert_close(a, b)
    if call == "batch" and padding < 1:
        values = x.movedim(1, -1)[mask]  # [valid, C]
        rm, rv = _buffers(shape[1])
        TF.batch_norm(values, rm, rv, None, None, True, 0.2, 1e-5)
        torch.testing.assert_close(results["triton"][1], rm)
        torch.testing.assert_close(results["triton"][2], rv)


def test_statistics_of_data_far_from_zero() -> None:
    """Mean 1e4, spread 1: float32 statistics merged in two stages (no E[x^2] - E[x]^2)
    keep the variance to float32 precision of the spread, as torch's."""
    x = _input((8, 3, 16, 16), "contiguous", torch.float32, offset=1e4)
    p = _params(x)
    y = _bn(x, p, "identity", "triton")
    var = x.double().var(dim=(0, 2, 3), unbiased=False)
    assert ((var - 4).abs() < 0.5).all()  # the data: spread 2
    expected = TF.batch_norm(x.double(), None, None, p["w"].double(), p["b"].double(), True)
    torch.testing.assert_close(y.double(), expected, atol=1e-2, rtol=1e-3)


def test_nan_batch_keeps_running_statistics() -> None:
    """A channel with a NaN keeps its running values (one warning); the others update."""
    x = _input((4, 3, 5), "contiguous", torch.float32)
    x[1, 2, 3] = float("nan")
    p = _params(x)
    before = p["rm"].clone(), p["rv"].clone()
    with pytest.warns(RuntimeWarning, match="non-finite"):
        y = _bn(x, p, "relu", "triton")
    assert y[:, 2].isnan().all() and not y[:, :2].isnan().any()
    assert p["rm"][2] == before[0][2] and p["rv"][2] == before[1][2]
    assert (p["rm"][:2] != before[0][:2]).all()


@pytest.mark.parametrize("shape", [(0, 3, 4), (1, 3)], ids=["empty-batch", "one-value"])
def test_edge_batches_behave_as_the_torch_backend(shape: tuple[int, ...]) -> None:
    """An empty batch, one value per channel: the same outcome (values or error) as the
    composite backend."""
    x = torch.randn(shape)
    outcomes = []
    for backend in ("triton", "torch"):
        p = _params(x) if x.numel() else {"w": torch.ones(3), "b": torch.zeros(3),
                                          "rm": torch.zeros(3), "rv": torch.ones(3)}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                outcomes.append((_bn(x, p, "relu", backend), p["rm"], p["rv"]))
        except (ValueError, RuntimeError) as exc:
            outcomes.append(type(exc))
    if isinstance(outcomes[0], type):
        assert outcomes[0] is outcomes[1]
    else:
        for a, b in zip(*outcomes, strict=True):
            torch.testing.assert_close(a, b, equal_nan=True)


def test_compile_fullgraph_sees_one_op_each_way() -> None:
    """torch.compile traces the provider as the registered custom op, no graph break."""
    x = _input((4, 3, 5), "contiguous", torch.float32).requires_grad_()
    p = _params(x)
    w = p["w"].requires_grad_()

    def step(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, None, None, w, None, training=True, act="relu",
                            backend="triton")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    y = compiled(x, w)
    torch.testing.assert_close(y, step(x, w))
    gx, gw = torch.autograd.grad(y.square().sum(), (x, w))
    ex, ew = torch.autograd.grad(step(x, w).square().sum(), (x, w))
    torch.testing.assert_close(gx, ex)
    torch.testing.assert_close(gw, ew)


def test_double_backward_with_an_activation_says_so() -> None:
    """With a fused activation the kernels are differentiable once, and say so; without,
    double backward goes through the composite code."""
    x = _input((4, 3), "contiguous", torch.float64).requires_grad_()
    y = F.batch_norm(x, None, None, None, None, training=True, act="relu", backend="triton")
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(y.square().sum(), x, create_graph=True)
    x2 = _input((4, 3), "contiguous", torch.float64).requires_grad_()
    y2 = F.batch_norm(x2, None, None, None, None, training=True, backend="triton")
    (g2,) = torch.autograd.grad(y2.pow(3).sum(), x2, create_graph=True)
    assert torch.autograd.gradcheck(
        lambda t: F.batch_norm(t, None, None, None, None, training=True, backend="triton"),
        (x2,), check_grad_dtypes=True, fast_mode=True)
    assert g2.grad_fn is not None  # differentiable again (through the composite code)


def test_layers_on_the_provider_match_torch_layers() -> None:
    """A drop-in check: torch.nn's layers and normlab's on backend='triton', same weights."""
    x = _input((4, 6, 3, 3), "contiguous", torch.float32)
    pairs = [(torch.nn.BatchNorm2d(6), normlab.BatchNorm2d(6)),
             (torch.nn.GroupNorm(3, 6), normlab.GroupNorm(3, 6))]
    with normlab.use_backend("triton"):
        for theirs, ours in pairs:
            ours.load_state_dict(theirs.state_dict())
            torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
            for a, b in zip(ours.state_dict().values(), theirs.state_dict().values(),
                            strict=True):
                torch.testing.assert_close(a, b)


@pytest.mark.parametrize(("activation", "masked"), [
    ("leaky_relu", False), ("elu", False), ("identity", False), ("leaky_relu", True),
], ids=["leaky_relu", "elu", "identity", "leaky_relu-masked"])
def test_inplace_abn_backward_from_the_output(activation: str, masked: bool) -> None:
    """In-place ABN on the provider (statistics, then the backward from the output alone)
    equals the composite backend's: output, gradients, running statistics."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    mask = torch.rand(3, 5, generator=g) > 0.3 if masked else None
    dz = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    assert ops.pieces(x, "triton").name == "triton"  # the backward's provider
    results = []
    for backend in ("triton", "torch"):
        layer = normlab.InPlaceABN(4, activation=activation, activation_param=0.2,
                                   inplace=False, dtype=torch.float64)
        with torch.no_grad():
            layer.weight.copy_(torch.linspace(0.5, 2.0, 4))
            layer.bias.copy_(torch.linspace(-0.5, 0.5, 4))
        xx = x.clone().requires_grad_()
        with normlab.use_backend(backend):
            z = layer(xx, mask=mask)
            grads = torch.autograd.grad(z, (xx, layer.weight, layer.bias), dz)
        results.append((z, *grads, layer.running_mean, layer.running_var))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b)


def test_rows_longer_than_one_program_take_the_two_kernel_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """LayerNorm rows over ``ROW_LIMIT`` values (statistics in two stages, then the
    output) give what the one-program rows give, and torch's."""
    kernels = provider._kernels()
    x = _input((4, 3, 7), "contiguous", torch.float64).requires_grad_()
    p = _params(x)
    for name in ("lw", "lb"):
        p[name].requires_grad_()
    expected = _ln_ref(x, p, "gelu")
    want = torch.autograd.grad(expected.sum(), (x, p["lw"], p["lb"]))
    for limit in (kernels.ROW_LIMIT, 4):
        monkeypatch.setattr(kernels, "ROW_LIMIT", limit)
        assert kernels.fits_rows(x.reshape(12, 1, 7, 1), True) == (limit >= 7)
        y = _ln(x, p, "gelu", "triton")
        torch.testing.assert_close(y, expected)
        for a, b in zip(torch.autograd.grad(y.sum(), (x, p["lw"], p["lb"])), want,
                        strict=True):
            torch.testing.assert_close(a, b)
