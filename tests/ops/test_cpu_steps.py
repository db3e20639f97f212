"""The CPU provider's one-call steps (``normlab.ops.cpu.steps``): BatchNorm training and
the per-row norms, against the NumPy float64 reference, where they apply and where not,
double backward."""

from __future__ import annotations

import pytest
import torch

import normlab
from normlab import plan, reference

steps = pytest.importorskip("normlab.ops.cpu.steps", reason="numba is not installed")
BATCH, ROWS = steps.BatchStep(), steps.RowsStep(fused_only=False)


def _tol(dtype: torch.dtype) -> dict[str, float]:
    return {torch.float64: {"atol": 1e-10, "rtol": 1e-10},
            torch.float32: {"atol": 2e-5, "rtol": 2e-5}}[dtype]


def _leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def _batch_plan(x: torch.Tensor, momentum: float = 0.1, act: str = "identity") -> plan.Plan:
    return plan.batch(x, True, 1e-5, momentum, act, 0.01)


def _batch_applies(x, w, b, rm, rv, act="identity") -> bool:  # noqa: ANN001
    return BATCH.applies(_batch_plan(x, act=act), plan.Call(x, w, b, rm, rv))


def _batch_step(x, w, b, rm, rv, momentum, act="identity"):  # noqa: ANN001, ANN202
    return BATCH.forward(_batch_plan(x, momentum, act), plan.Call(x, w, b, rm, rv))


def _rows_plan(norm: str, x: torch.Tensor, arg: object, act: str = "identity") -> plan.Plan:
    if norm == "group":
        return plan.group(x, arg, 1e-5, act, 0.01)
    if norm == "layer":
        return plan.layer(x, tuple(arg), 1e-5, act, 0.01)
    return plan.rms(x, tuple(arg), 1e-5)


# --------------------------------------------------------------------------------------
# BatchNorm's one-call train step (steps.BatchStep), against the NumPy reference

STEP_CASES = [  # id, x shape, affine, running buffers, memory format (planes / cols kernels)
    ("bn2d", (4, 16, 3, 5), True, True, torch.contiguous_format),
    ("bn1d-sequence", (5, 8, 7), True, True, torch.contiguous_format),
    ("bn3d-no-affine", (2, 8, 2, 3, 4), False, True, torch.contiguous_format),
    ("no-running-stats", (4, 16, 3, 5), True, False, torch.contiguous_format),
    ("bn1d-NC", (50, 6), True, True, torch.contiguous_format),
    ("bn2d-1x1", (40, 6, 1, 1), True, True, torch.contiguous_format),
    ("bn2d-channels-last", (4, 3, 3, 5), True, True, torch.channels_last),
    ("bn3d-channels-last", (2, 5, 2, 3, 4), True, False, torch.channels_last_3d),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(("shape", "affine", "running", "fmt"), [c[1:] for c in STEP_CASES],
                         ids=[c[0] for c in STEP_CASES])
def test_train_step_matches_reference(
    shape: tuple[int, ...], affine: bool, running: bool, fmt: torch.memory_format,
    dtype: torch.dtype,
) -> None:
    g = torch.Generator().manual_seed(3)
    c = shape[1]
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1).to(dtype)
    x = x.contiguous(memory_format=fmt)
    w, b = (torch.randn(c, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    rm = torch.randn(c, generator=g, dtype=torch.float64).to(dtype) if running else None
    rv = torch.rand(c, generator=g, dtype=torch.float64).to(dtype) + 0.5 if running else None
    before = None if rm is None else (rm.double().numpy().copy(), rv.double().numpy().copy())
    x_, w_, b_ = _leaves(x, w, b)
    w_, b_ = (w_, b_) if affine else (None, None)
    assert _batch_applies(x_, w_, b_, rm, rv)
    y = _batch_step(x_, w_, b_, rm, rv, 0.3)
    assert y.is_contiguous(memory_format=fmt)
    wn = w.double().numpy() if affine else None
    bn = b.double().numpy() if affine else None
    tol = _tol(dtype)
    expected = reference.batch_norm_forward(x.double().numpy(), wn, bn, 1e-5)
    torch.testing.assert_close(y.double(), torch.from_numpy(expected), **tol)
    if running:
        mean, var, count = reference.batch_stats(x.double().numpy())
        new = reference.update_running_stats(*before, mean, var, count, 0.3, 0)
        torch.testing.assert_close(rm.double(), torch.from_numpy(new[0]), **tol)
        torch.testing.assert_close(rv.double(), torch.from_numpy(new[1]), **tol)
    # An expanded (stride-0) gradient, as y.sum().backward() gives, is made contiguous.
    dy = torch.randn(shape[1:], generator=g, dtype=torch.float64).to(dtype).expand(shape)
    y.backward(dy)
    dx, dw, db = reference.batch_norm_backward(dy.double().numpy(), x.double().numpy(), wn)
    torch.testing.assert_close(x_.grad.double(), torch.from_numpy(dx), **tol)
    if affine:
        torch.testing.assert_close(w_.grad.double(), torch.from_numpy(dw), **tol)
        torch.testing.assert_close(b_.grad.double(), torch.from_numpy(db), **tol)


def test_train_step_applies_only_where_its_kernels_fit() -> None:
    """Anything else goes to the general path. Bad arguments (a weight of another dtype or
    size) never get here: the functional layer refuses them (tests/nn/test_errors.py)."""
    x, v = torch.randn(4, 16, 5), torch.ones(16)
    channels_last = torch.randn(4, 16, 3, 5).to(memory_format=torch.channels_last)
    assert _batch_applies(x, v, v, v.clone(), v.clone())
    assert steps._step_layout(x, 0) == "planes"
    assert steps._step_layout(channels_last, 0) == steps._step_layout(torch.randn(4, 16), 0)
    assert steps._step_layout(channels_last, 0) == "cols"
    big_channels_last = torch.randn(64, 16, 8, 10).to(memory_format=torch.channels_last)
    declined = {
        "channels-last with a fused activation": (big_channels_last, v, "relu"),
        "strided": (torch.randn(4, 16, 10)[..., ::2], v, "identity"),
        "few channels": (torch.randn(4, 3, 5), torch.ones(3), "identity"),
        "half precision": (torch.randn(4, 16, 5).half(), v.half(), "identity"),
        "non-contiguous weight": (x, torch.ones(32)[::2], "identity"),
        "empty": (torch.randn(0, 16, 5), v, "identity"),
    }
    for name, (x_, w, act) in declined.items():
        assert not _batch_applies(x_, w, None, None, None, act), name
    assert _batch_applies(torch.randn(64, 3, 400), None, None, None, None, act="relu")
    assert not _batch_applies(x, None, None, v.requires_grad_(), v.clone())
    # The layers take the step, and BatchNormAct with its activation code.
    calls = []
    original = steps._train_forward

    def spy(*args):  # noqa: ANN002, ANN202
        calls.append(args[8])
        return original(*args)

    steps._BatchKernels.forward = staticmethod(spy)
    steps._train_forward = spy
    try:
        normlab.BatchNorm1d(16)(x)
        normlab.BatchNormAct1d(16, act="leaky_relu")(torch.randn(64, 16, 80))
        normlab.BatchNormAct1d(16, act="silu")(torch.randn(64, 16, 80))  # torch's silu after
    finally:
        steps._train_forward = original
        steps._BatchKernels.forward = staticmethod(original)
    assert calls == [0, steps.ACT_CODES["leaky_relu"], 0]


def test_train_step_double_backward(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(3, 8, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)

    def fn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return _batch_step(x, w, None, None, None, 0.1)

    assert torch.autograd.gradgradcheck(fn, (x, w), atol=1e-5)
    monkeypatch.setattr(steps, "FUSED_MIN_NUMEL", 0)
    y = _batch_step(x, w, None, None, None, 0.1, act="relu")
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(y.square().sum(), x, create_graph=True)


def test_train_step_keeps_running_stats_of_non_finite_channels() -> None:
    x = torch.randn(4, 16, 6)
    x[1, 2, 3] = float("nan")
    rm, rv = torch.zeros(16), torch.ones(16)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        y = _batch_step(x, None, None, rm, rv, 0.5)
    assert rm[2] == 0 and rv[2] == 1 and y[:, 2].isnan().all()
    assert (rm != 0).sum() == 15
    layer = normlab.BatchNorm1d(16)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        layer(x)
    assert layer.running_mean[2] == 0 and layer.num_batches_tracked == 1


# --------------------------------------------------------------------------------------
# The per-row one-call step (steps.RowsStep: LayerNorm, GroupNorm, RMSNorm), against the
# NumPy reference

ROWS_CASES = [  # id, x shape, norm, its argument, affine
    ("layer-1d", (6, 40), "layer", (40,), True),
    ("layer-2d-shape", (3, 2, 4, 5), "layer", (4, 5), True),
    ("layer-no-affine", (5, 33), "layer", (33,), False),
    ("group", (3, 6, 4, 5), "group", 2, True),
    ("group-NC", (5, 8), "group", 4, True),
    ("group-no-affine", (2, 8, 3, 3, 2), "group", 4, False),
    ("rms", (7, 3, 16), "rms", (16,), True),
    ("rms-no-affine", (4, 300), "rms", (300,), False),
]


def _rows_reference(norm: str, x, arg, w, b, dy):  # noqa: ANN001, ANN202
    """(y, (dx, dw, db)) of the float64 reference."""
    if norm == "group":
        return (reference.group_norm_forward(x, arg, w, b, 1e-5),
                reference.group_norm_backward(dy, x, arg, w, 1e-5))
    if norm == "layer":
        return (reference.layer_norm_forward(x, arg, w, b, 1e-5),
                reference.layer_norm_backward(dy, x, arg, w, 1e-5))
    dx, dw = reference.rms_norm_backward(dy, x, arg, w, 1e-5)
    return reference.rms_norm_forward(x, arg, w, 1e-5), (dx, dw, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(("shape", "norm", "arg", "affine"), [c[1:] for c in ROWS_CASES],
                         ids=[c[0] for c in ROWS_CASES])
def test_rows_step_matches_reference(
    shape: tuple[int, ...], norm: str, arg: object, affine: bool, dtype: torch.dtype
) -> None:
    g = torch.Generator().manual_seed(5)
    pshape = (shape[1],) if norm == "group" else arg
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1).to(dtype)
    w, b = (torch.randn(pshape, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    x_, w_, b_ = _leaves(x, w, b)
    w_, b_ = (w_, b_) if affine else (None, None)
    b_ = None if norm == "rms" else b_
    p = _rows_plan(norm, x_, arg)
    assert ROWS.applies(p, plan.Call(x_, w_, b_))
    y = ROWS.forward(p, plan.Call(x_, w_, b_))
    assert y.shape == shape
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    y.backward(dy)
    f64 = [None if t is None else t.detach().double().numpy() for t in (x, w_, b_, dy)]
    y_ref, grads_ref = _rows_reference(norm, f64[0], arg, f64[1], f64[2], f64[3])
    tol = _tol(dtype)
    torch.testing.assert_close(y.double(), torch.from_numpy(y_ref), **tol)
    for got, want in zip((x_, w_, b_), grads_ref, strict=True):
        if got is not None:
            torch.testing.assert_close(got.grad.double(), torch.from_numpy(want), **tol)


def test_rows_step_applies_only_where_its_kernels_fit() -> None:
    x, v = torch.randn(4, 16), torch.ones(16)
    assert ROWS.applies(plan.layer(x, (16,), 1e-5), plan.Call(x, v, v))
    declined = {
        "strided": (torch.randn(4, 32)[:, ::2], v),
        "half precision": (x.half(), v.half()),
        "weight of another dtype": (x, v.double()),
        "weight of another size": (x, torch.ones(15)),
        "non-contiguous weight": (x, torch.ones(32)[::2]),
        "empty": (torch.randn(0, 16), v),
    }
    for name, (x_, w) in declined.items():
        assert not ROWS.applies(plan.layer(x_, (16,), 1e-5), plan.Call(x_, w)), name
    # GroupNorm with a channel per group is InstanceNorm: the general path's planes kernels.
    x = torch.randn(2, 4, 7)
    assert not ROWS.applies(plan.group(x, 4, 1e-5), plan.Call(x))


def test_rows_step_double_backward(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(3, 6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)

    def fn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return ROWS.forward(plan.group(x, 2, 1e-5), plan.Call(x, w))

    assert torch.autograd.gradgradcheck(fn, (x, w), atol=1e-5)
    monkeypatch.setattr(steps, "FUSED_MIN_NUMEL", 0)
    y = ROWS.forward(plan.group(x, 2, 1e-5, "relu"), plan.Call(x, w))
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(y.square().sum(), x, create_graph=True)
