"""Validate the NumPy float64 oracle (normlab.reference) against torch in float64.

Forward outputs are compared with ``torch.nn.functional``, backward with ``torch.autograd.grad``
and running statistics with torch's functional ops and modules, all over tables of cases.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from normlab import reference as ref

FWD_TOL = {"rtol": 1e-12, "atol": 1e-12}
BWD_TOL = {"rtol": 1e-10, "atol": 1e-10}


@dataclass(frozen=True)
class Case:
    """One forward/backward configuration of one norm.

    ``groups`` is used by GroupNorm, ``normalized`` (the trailing shape) by LayerNorm/RMSNorm.
    ``offset`` is added to the input to check that the statistics survive a large mean.
    """

    norm: str
    shape: tuple[int, ...]
    affine: bool = True
    groups: int = 1
    normalized: tuple[int, ...] = field(default=())
    eps: float | None = 1e-5
    offset: float = 0.0

    @property
    def param_shape(self) -> tuple[int, ...]:
        return self.normalized if self.norm in ("layer", "rms") else (self.shape[1],)

    def __str__(self) -> str:
        extra = f"g{self.groups}" if self.norm == "group" else ""
        if self.norm in ("layer", "rms"):
            extra = "ns" + "x".join(map(str, self.normalized))
        aff = "affine" if self.affine else "plain"
        return f"{self.norm}-{'x'.join(map(str, self.shape))}-{extra}-{aff}-eps{self.eps}"


CASES = [
    Case("batch", (4, 3)),
    Case("batch", (5, 3, 7)),
    Case("batch", (2, 4, 3, 5), affine=False),
    Case("batch", (2, 3, 2, 3, 4), eps=1e-3),
    Case("batch", (3, 2, 2, 2)),
    Case("batch", (8, 3, 5), offset=1e4),
    Case("instance", (2, 3, 6)),
    Case("instance", (3, 4, 3, 5), affine=False),
    Case("instance", (2, 2, 2, 3, 3), eps=0.1),
    Case("instance", (1, 3, 16), offset=1e4),
    Case("group", (2, 6, 5), groups=3),
    Case("group", (3, 4, 3, 3), groups=1),
    Case("group", (2, 4, 3, 3), groups=4, affine=False),
    Case("group", (2, 8), groups=2),
    Case("group", (2, 6, 2, 2, 2), groups=2, eps=1e-2),
    Case("layer", (4, 7), normalized=(7,)),
    Case("layer", (2, 3, 5), normalized=(3, 5)),
    Case("layer", (2, 3, 4, 5), normalized=(5,), affine=False),
    Case("layer", (6, 1, 4), normalized=(1, 4), eps=1e-2),
    Case("layer", (3, 9), normalized=(9,), offset=1e4),
    Case("rms", (4, 7), normalized=(7,)),
    Case("rms", (2, 3, 5), normalized=(3, 5), eps=None),
    Case("rms", (2, 3, 4), normalized=(4,), affine=False, eps=1e-6),
    Case("rms", (5, 8), normalized=(8,), eps=0.5),
]


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().numpy()


def torch_forward(c: Case, x: torch.Tensor, w, b) -> torch.Tensor:
    """The torch.nn.functional op of ``c`` (train-mode statistics)."""
    if c.norm == "batch":
        return F.batch_norm(x, None, None, w, b, training=True, eps=c.eps)
    if c.norm == "instance":
        return F.instance_norm(x, weight=w, bias=b, eps=c.eps)
    if c.norm == "group":
        return F.group_norm(x, c.groups, w, b, eps=c.eps)
    if c.norm == "layer":
        return F.layer_norm(x, c.normalized, w, b, eps=c.eps)
    return F.rms_norm(x, c.normalized, w, eps=c.eps)


REF_FORWARD: dict[str, Callable] = {
    "batch": lambda c, x, w, b: ref.batch_norm_forward(x, w, b, eps=c.eps),
    "instance": lambda c, x, w, b: ref.instance_norm_forward(x, w, b, eps=c.eps),
    "group": lambda c, x, w, b: ref.group_norm_forward(x, c.groups, w, b, eps=c.eps),
    "layer": lambda c, x, w, b: ref.layer_norm_forward(x, c.normalized, w, b, eps=c.eps),
    "rms": lambda c, x, w, b: ref.rms_norm_forward(x, c.normalized, w, eps=c.eps),
}

# Every reference backward, normalized to (dx, dweight, dbias); RMSNorm has no bias.
REF_BACKWARD: dict[str, Callable] = {
    "batch": lambda c, dy, x, w: ref.batch_norm_backward(dy, x, w, eps=c.eps),
    "instance": lambda c, dy, x, w: ref.instance_norm_backward(dy, x, w, eps=c.eps),
    "group": lambda c, dy, x, w: ref.group_norm_backward(dy, x, c.groups, w, eps=c.eps),
    "layer": lambda c, dy, x, w: ref.layer_norm_backward(dy, x, c.normalized, w, eps=c.eps),
    "rms": lambda c, dy, x, w: (*ref.rms_norm_backward(dy, x, c.normalized, w, eps=c.eps), None),
}


def make_inputs(c: Case, seed: int = 0):
    """Float64 leaf tensors ``x``, ``weight``, ``bias`` (None without affine / for RMSNorm)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(c.shape, generator=g, dtype=torch.float64) + c.offset).requires_grad_()
    if not c.affine:
        return x, None, None
    w = (1 + 0.5 * torch.randn(c.param_shape, generator=g, dtype=torch.float64)).requires_grad_()
    b = None
    if c.norm != "rms":
        b = torch.randn(c.param_shape, generator=g, dtype=torch.float64).requires_grad_()
    return x, w, b


@pytest.mark.parametrize("c", CASES, ids=str)
def test_forward_matches_torch(c: Case) -> None:
    x, w, b = make_inputs(c)
    expected = torch_forward(c, x, w, b).detach().numpy()
    got = REF_FORWARD[c.norm](c, _np(x), _np(w), _np(b))
    assert got.dtype == np.float64 and got.shape == expected.shape
    # x - mean loses ~log10(offset) digits to cancellation in any float64 algorithm, and torch's
    # algorithm differs from the two-pass one, so the tolerance grows with the offset.
    tol = 1e-12 * max(1.0, c.offset * 1e-3)
    np.testing.assert_allclose(got, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("c", CASES, ids=str)
def test_backward_matches_autograd(c: Case) -> None:
    x, w, b = make_inputs(c)
    dy = torch.randn(c.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch_forward(c, x, w, b)
    leaves = [t for t in (x, w, b) if t is not None]
    grads = dict(zip(("dx", "dw", "db"), torch.autograd.grad(y, leaves, dy), strict=False))
    dx, dw, db = REF_BACKWARD[c.norm](c, dy.numpy(), _np(x), _np(w))
    # With no affine the reference returns None for the parameter grads (bias too for RMSNorm).
    assert (dw is None) == (w is None) and (db is None) == (b is None)
    np.testing.assert_allclose(dx, grads["dx"].numpy(), **BWD_TOL)
    if w is not None:
        np.testing.assert_allclose(dw, grads["dw"].numpy(), **BWD_TOL)
    if b is not None:
        np.testing.assert_allclose(db, grads["db"].numpy(), **BWD_TOL)


# --------------------------------------------------------------------------------------------
# Generic core
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("axes", [(0,), (1, 2), (0, 2), (0, 1, 2)])
@pytest.mark.parametrize("center", [True, False])
def test_moments_match_numpy(axes: tuple[int, ...], center: bool) -> None:
    x = np.random.default_rng(0).normal(3.0, 2.0, size=(4, 5, 6))
    mean, var = ref.moments(x, axes, center=center)
    if center:
        np.testing.assert_allclose(mean, x.mean(axis=axes, keepdims=True), rtol=1e-13)
        np.testing.assert_allclose(var, x.var(axis=axes, keepdims=True), rtol=1e-12)
    else:
        assert np.all(mean == 0) and mean.shape == var.shape
        np.testing.assert_allclose(var, (x**2).mean(axis=axes, keepdims=True), rtol=1e-13)


def test_moments_two_pass_survives_large_mean() -> None:
    # E[x^2] - E[x]^2 loses ~all digits here even in float64; the two-pass variance keeps them.
    noise = np.random.default_rng(1).normal(0.0, 1e-3, size=1000)
    x = 1e8 + noise
    _, var = ref.moments(x, (0,))
    np.testing.assert_allclose(var.item(), noise.var(), rtol=1e-6)


@pytest.mark.parametrize("center", [True, False])
def test_normalize_backward_matches_autograd(center: bool) -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    dxhat = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    axes, eps = (0, 2), 0.3
    mean = x.mean(axes, keepdim=True) if center else torch.zeros(())
    xhat_t = (x - mean) * torch.rsqrt(((x - mean) ** 2).mean(axes, keepdim=True) + eps)
    (expected,) = torch.autograd.grad(xhat_t, x, dxhat)
    xhat, _, rstd = ref.normalize(x.detach().numpy(), axes, eps, center=center)
    np.testing.assert_allclose(xhat, xhat_t.detach().numpy(), **FWD_TOL)
    dx = ref.normalize_backward(dxhat.numpy(), xhat, rstd, axes, center=center)
    np.testing.assert_allclose(dx, expected.numpy(), **BWD_TOL)


# --------------------------------------------------------------------------------------------
# Running statistics
# --------------------------------------------------------------------------------------------

BN_MODULES = {
    2: torch.nn.BatchNorm1d,
    3: torch.nn.BatchNorm1d,
    4: torch.nn.BatchNorm2d,
    5: torch.nn.BatchNorm3d,
}


@pytest.mark.parametrize("momentum", [0.1, 0.3, 0.8, None])
@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (2, 2, 3, 3), (2, 2, 2, 2, 3)])
def test_batch_norm_train_steps_then_eval_match_torch_module(momentum, shape) -> None:
    """Three train steps (outputs and buffers, momentum=None is the cumulative average),
    then eval forward/backward with the running statistics."""
    torch.manual_seed(3)
    m = BN_MODULES[len(shape)](shape[1], momentum=momentum).double()
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_()
    rm, rv, nbt = np.zeros(shape[1]), np.ones(shape[1]), 0
    w, b = _np(m.weight), _np(m.bias)
    for step in range(3):
        x = torch.randn(shape, dtype=torch.float64) * (step + 1) + step
        y = m(x).detach().numpy()
        np.testing.assert_allclose(ref.batch_norm_forward(x.numpy(), w, b), y, **FWD_TOL)
        mean, var, count = ref.batch_stats(x.numpy())
        assert count == x.numel() // shape[1]
        rm, rv, nbt = ref.update_running_stats(rm, rv, mean, var, count, momentum, nbt)
        np.testing.assert_allclose(rm, _np(m.running_mean), **FWD_TOL)
        np.testing.assert_allclose(rv, _np(m.running_var), **FWD_TOL)
        assert nbt == m.num_batches_tracked.item()

    m.eval()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(shape, dtype=torch.float64)
    y = m(x)
    np.testing.assert_allclose(ref.batch_norm_eval(_np(x), rm, rv, w, b), _np(y), **FWD_TOL)
    expected = torch.autograd.grad(y, [x, m.weight, m.bias], dy)
    got = ref.batch_norm_eval_backward(dy.numpy(), _np(x), rm, rv, w)
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e.numpy(), **BWD_TOL)


@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_functional_training_updates_buffers(affine: bool) -> None:
    """F.batch_norm(training=True) with buffers: output, buffers, eval-mode without affine."""
    c = Case("batch", (3, 4, 5), affine=affine)
    x, w, b = make_inputs(c)
    rm_t, rv_t = (
        torch.full((4,), 0.5, dtype=torch.float64),
        torch.full((4,), 2.0, dtype=torch.float64),
    )
    y = F.batch_norm(x, rm_t, rv_t, w, b, training=True, momentum=0.25, eps=1e-3)
    np.testing.assert_allclose(
        ref.batch_norm_forward(_np(x), _np(w), _np(b), eps=1e-3), _np(y), **FWD_TOL
    )
    mean, var, count = ref.batch_stats(_np(x))
    rm, rv, nbt = ref.update_running_stats(
        np.full(4, 0.5), np.full(4, 2.0), mean, var, count, 0.25, 7
    )
    assert nbt == 8
    np.testing.assert_allclose(rm, rm_t.numpy(), **FWD_TOL)
    np.testing.assert_allclose(rv, rv_t.numpy(), **FWD_TOL)
    y_eval = F.batch_norm(x, rm_t, rv_t, w, b, training=False, eps=1e-3)
    np.testing.assert_allclose(
        ref.batch_norm_eval(_np(x), rm, rv, _np(w), _np(b), eps=1e-3), _np(y_eval), **FWD_TOL
    )


@pytest.mark.parametrize("momentum", [0.1, 0.3, 1.0])
@pytest.mark.parametrize("shape", [(2, 3, 6), (3, 2, 3, 4), (1, 2, 2, 2, 3)])
def test_instance_norm_running_stats_match_torch(momentum: float, shape) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 3
    rm_t = torch.linspace(-1, 1, shape[1], dtype=torch.float64)
    rv_t = torch.linspace(0.5, 2, shape[1], dtype=torch.float64)
    rm0, rv0 = rm_t.numpy().copy(), rv_t.numpy().copy()
    y = F.instance_norm(x, rm_t, rv_t, use_input_stats=True, momentum=momentum)
    np.testing.assert_allclose(ref.instance_norm_forward(x.numpy()), y.numpy(), **FWD_TOL)
    rm, rv = ref.instance_norm_update_running_stats(rm0, rv0, x.numpy(), momentum)
    np.testing.assert_allclose(rm, rm_t.numpy(), **FWD_TOL)
    np.testing.assert_allclose(rv, rv_t.numpy(), **FWD_TOL)


def test_instance_norm_momentum_none_is_no_update_like_torch_module() -> None:
    m = torch.nn.InstanceNorm1d(3, momentum=None, track_running_stats=True).double()
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    m(x)
    rm, rv = ref.instance_norm_update_running_stats(np.zeros(3), np.ones(3), x.numpy(), None)
    np.testing.assert_array_equal(rm, _np(m.running_mean))
    np.testing.assert_array_equal(rv, _np(m.running_var))


def test_update_running_stats_rejects_single_value() -> None:
    with pytest.raises(ValueError, match="count"):
        ref.update_running_stats(np.zeros(2), np.ones(2), np.zeros(2), np.zeros(2), 1, 0.1, 0)


# --------------------------------------------------------------------------------------------
# Empty batches
# --------------------------------------------------------------------------------------------


def test_batch_norm_empty_batch_matches_torch_module() -> None:
    m = torch.nn.BatchNorm2d(3).double()
    x = torch.zeros(0, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    y = m(x)
    w = _np(m.weight)
    assert ref.batch_norm_forward(_np(x), w, _np(m.bias)).shape == y.shape
    mean, var, count = ref.batch_stats(_np(x))
    assert count == 0
    rm, rv, nbt = ref.update_running_stats(np.zeros(3), np.ones(3), mean, var, count, 0.1, 0)
    np.testing.assert_array_equal(rm, _np(m.running_mean))
    np.testing.assert_array_equal(rv, _np(m.running_var))
    assert nbt == m.num_batches_tracked.item() == 1
    expected = torch.autograd.grad(y, [x, m.weight, m.bias], torch.zeros_like(y))
    got = ref.batch_norm_backward(np.zeros(y.shape), _np(x), w)
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_array_equal(g, e.numpy())


EMPTY_CASES = [
    # torch's instance_norm raises IndexError for N=0 with a weight, so no affine here.
    Case("instance", (0, 3, 4), affine=False),
    Case("group", (0, 4, 3), groups=2),
    Case("layer", (0, 4, 3), normalized=(4, 3)),
    Case("layer", (2, 0, 5), normalized=(5,)),
    Case("rms", (0, 5), normalized=(5,)),
]


@pytest.mark.parametrize("c", EMPTY_CASES, ids=str)
def test_empty_input_matches_torch(c: Case) -> None:
    x, w, b = make_inputs(c)
    y = torch_forward(c, x, w, b)
    got = REF_FORWARD[c.norm](c, _np(x), _np(w), _np(b))
    assert got.shape == y.shape
    leaves = [t for t in (x, w, b) if t is not None]
    expected = torch.autograd.grad(y, leaves, torch.zeros_like(y))
    got_grads = [
        g for g in REF_BACKWARD[c.norm](c, np.zeros(y.shape), _np(x), _np(w)) if g is not None
    ]
    for g, e in zip(got_grads, expected, strict=True):
        np.testing.assert_array_equal(g, e.numpy())


# --------------------------------------------------------------------------------------------
# Equivalences inside the family
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 6, 5), (3, 4, 2, 3)])
def test_group_norm_one_group_is_layer_norm_over_channels_and_space(shape) -> None:
    x = np.random.default_rng(5).normal(size=shape)
    dy = np.random.default_rng(6).normal(size=shape)
    np.testing.assert_allclose(
        ref.group_norm_forward(x, 1), ref.layer_norm_forward(x, shape[1:]), **FWD_TOL
    )
    np.testing.assert_allclose(
        ref.group_norm_backward(dy, x, 1)[0],
        ref.layer_norm_backward(dy, x, shape[1:])[0],
        **BWD_TOL,
    )


@pytest.mark.parametrize("shape", [(2, 6, 5), (3, 4, 2, 3)])
def test_group_norm_one_channel_per_group_is_instance_norm(shape) -> None:
    rng = np.random.default_rng(7)
    x, dy = rng.normal(size=shape), rng.normal(size=shape)
    w, b = rng.normal(size=shape[1]), rng.normal(size=shape[1])
    c = shape[1]
    np.testing.assert_allclose(
        ref.group_norm_forward(x, c, w, b), ref.instance_norm_forward(x, w, b), **FWD_TOL
    )
    for g, i in zip(
        ref.group_norm_backward(dy, x, c, w), ref.instance_norm_backward(dy, x, w), strict=True
    ):
        np.testing.assert_allclose(g, i, **BWD_TOL)


def _statistic_view(c: Case, x: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    """``x`` reshaped so that one statistic of ``c`` covers ``axes`` (GroupNorm: [N, G, -1])."""
    if c.norm == "batch":
        return x, (0, *range(2, x.ndim))
    if c.norm == "instance":
        return x, tuple(range(2, x.ndim))
    if c.norm == "group":
        return x.reshape(c.shape[0], c.groups, -1), (2,)
    return x, tuple(range(x.ndim - len(c.normalized), x.ndim))


@pytest.mark.parametrize("c", [c for c in CASES if not c.affine], ids=str)
def test_train_mode_output_has_zero_mean_unit_var_per_statistic(c: Case) -> None:
    """Without affine each statistic's slice of ``y`` has mean 0 and variance var/(var+eps)
    (RMSNorm: mean square ms/(ms+eps)), checked with NumPy's own mean/var."""
    x = np.random.default_rng(8).normal(2.0, 3.0, size=c.shape)
    y, axes = _statistic_view(c, REF_FORWARD[c.norm](c, x, None, None))
    x, _ = _statistic_view(c, x)
    if c.norm == "rms":
        ms = (x**2).mean(axis=axes)
        np.testing.assert_allclose((y**2).mean(axis=axes), ms / (ms + c.eps), rtol=1e-12)
        return
    var = x.var(axis=axes)
    np.testing.assert_allclose(y.mean(axis=axes), 0.0, atol=1e-12)
    np.testing.assert_allclose(y.var(axis=axes), var / (var + c.eps), rtol=1e-12)


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------

BAD_CALLS = [
    (lambda: ref.group_norm_forward(np.zeros((2, 6, 3)), 4), "num_groups"),
    (lambda: ref.layer_norm_forward(np.zeros((2, 6, 3)), (6,)), "normalized_shape"),
    (lambda: ref.batch_norm_forward(np.zeros(5)), "x must have shape"),
    (lambda: ref.instance_norm_forward(np.zeros((2, 3))), "spatial"),
    (lambda: ref.batch_norm_forward(np.zeros((2, 3)), np.ones(4)), "weight"),
]


@pytest.mark.parametrize(("call", "match"), BAD_CALLS)
def test_bad_arguments_raise_value_error(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()
