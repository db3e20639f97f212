"""BatchNorm variants against their references: Batch Renorm and Ghost BatchNorm (NumPy
float64 and chunked plain BN), Frozen BatchNorm and the freeze tools, the ``freeze_stats``
flag and the ``small_batch`` policy of the plain layers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from normlab import reference as ref
from normlab import reference_variants as rv
from normlab.nn.act import BatchNormAct2d
from normlab.nn.batchnorm import BatchNorm1d, BatchNorm2d
from normlab.nn.frozen import (
    FrozenBatchNorm,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    freeze_batch_norm,
    set_freeze_stats,
    unfreeze_batch_norm,
)
from normlab.nn.ghost import GhostBatchNorm1d, GhostBatchNorm2d
from normlab.nn.renorm import (
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    renorm_limits,
    set_renorm_limits,
)

F64 = torch.float64


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().double().numpy().copy()


def _close(actual: torch.Tensor | None, expected: np.ndarray | None, tol: float = 1e-10) -> None:
    if expected is None:
        assert actual is None
        return
    np.testing.assert_allclose(_np(actual), expected, rtol=tol, atol=tol)


def _randomize(layer: nn.Module, seed: int = 0) -> None:
    """Non-trivial parameters and running statistics (so that renorm's clipping bites)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean"):
            t = getattr(layer, name, None)
            if t is not None:
                t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype) * 0.5 + 0.3)
        if getattr(layer, "running_var", None) is not None:
            layer.running_var.copy_(torch.rand(layer.running_var.shape, generator=g) + 0.2)


# --------------------------------------------------------------------------------------------
# Batch Renormalization
# --------------------------------------------------------------------------------------------

RENORM_CASES = [
    # (class, input shape, kwargs)
    (BatchRenorm1d, (8, 3), {}),
    (BatchRenorm1d, (5, 3, 4), {"rmax": 1.5, "dmax": 0.3}),
    (BatchRenorm2d, (4, 3, 5, 5), {}),
    (BatchRenorm2d, (4, 3, 5, 5), {"rmax": 1.2, "dmax": 0.1, "momentum": 0.3}),
    (BatchRenorm2d, (4, 3, 5, 5), {"affine": False, "rmax": 2.0, "dmax": 1.0}),
    (BatchRenorm3d, (2, 3, 2, 3, 4), {"rmax": 1.1, "dmax": 0.5}),
]


@pytest.mark.parametrize("cls,shape,kwargs", RENORM_CASES)
def test_renorm_train_matches_reference(backend, cls, shape, kwargs) -> None:
    layer = cls(shape[1], dtype=F64, **kwargs)
    _randomize(layer)
    rm0, rv0 = _np(layer.running_mean), _np(layer.running_var)
    x = (torch.randn(shape, dtype=F64) * 2 + 1).requires_grad_()
    dy = torch.randn(shape, dtype=F64)
    y = layer(x)
    y.backward(dy)
    w, b = _np(layer.weight), _np(layer.bias)
    rmax, dmax = layer.rmax, layer.dmax
    y_ref, rm_ref, rv_ref = rv.batch_renorm_forward(
        _np(x), rm0, rv0, w, b, rmax, dmax, layer.momentum, layer.eps
    )
    dx_ref, dw_ref, db_ref = rv.batch_renorm_backward(
        _np(dy), _np(x), rm0, rv0, w, rmax, dmax, layer.eps
    )
    _close(y, y_ref)
    _close(x.grad, dx_ref)
    if layer.affine:
        _close(layer.weight.grad, dw_ref)
        _close(layer.bias.grad, db_ref)
    _close(layer.running_mean, rm_ref)
    _close(layer.running_var, rv_ref)
    assert int(layer.num_batches_tracked) == 1
    # the clipping is active in these cases: renorm differs from BatchNorm
    assert not np.allclose(y_ref, ref.batch_norm_forward(_np(x), w, b, layer.eps))


def test_renorm_limits_one_zero_is_batch_norm_and_eval_is_unchanged() -> None:
    layer = BatchRenorm2d(3, rmax=1.0, dmax=0.0)
    plain = nn.BatchNorm2d(3)
    _randomize(layer)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(layer(x), plain(x))
    torch.testing.assert_close(layer.running_var, plain.running_var)
    layer.rmax, layer.dmax = 3.0, 5.0
    layer.eval(), plain.eval()
    torch.testing.assert_close(layer(x), plain(x))


def test_renorm_state_dict_round_trip_with_batch_norm() -> None:
    layer = BatchRenorm2d(4)
    _randomize(layer, seed=3)
    for plain in (nn.BatchNorm2d(4), BatchNorm2d(4)):
        plain.load_state_dict(layer.state_dict())  # strict: same keys
        back = BatchRenorm2d(4)
        back.load_state_dict(plain.state_dict())
        for key, value in layer.state_dict().items():
            torch.testing.assert_close(back.state_dict()[key], value)


@pytest.mark.parametrize(
    "step,expected",
    [(0, (1.0, 0.0)), (5000, (1.0, 0.0)), (15000, (1.0 + 2 * 10 / 35, 2.5)),
     (25000, (1.0 + 2 * 20 / 35, 5.0)), (40000, (3.0, 5.0)), (10**6, (3.0, 5.0))],
)
def test_renorm_schedule_follows_the_paper(step, expected) -> None:
    assert renorm_limits(step) == pytest.approx(expected)


def test_set_renorm_limits_and_bad_limits() -> None:
    model = nn.Sequential(BatchRenorm2d(2), nn.ReLU(), BatchRenorm1d(2), BatchNorm2d(2))
    assert set_renorm_limits(model, *renorm_limits(22500)) == 2
    assert model[0].rmax == pytest.approx(2.0) and model[2].dmax == pytest.approx(4.375)
    with pytest.raises(ValueError, match="rmax"):
        model[0].rmax = 0.5
    with pytest.raises(ValueError, match="dmax"):
        BatchRenorm2d(2, dmax=-1.0)
    with pytest.raises(ValueError, match="warmup_steps"):
        renorm_limits(0, warmup_steps=50000)


# --------------------------------------------------------------------------------------------
# Ghost BatchNorm
# --------------------------------------------------------------------------------------------

GHOST_CASES = [
    # (class, input shape, virtual batch size, kwargs)
    (GhostBatchNorm1d, (12, 3), 4, {}),
    (GhostBatchNorm1d, (10, 3, 4), 4, {"momentum": None}),  # uneven last chunk (2 samples)
    (GhostBatchNorm2d, (8, 3, 4, 4), 2, {"momentum": 0.3}),
    (GhostBatchNorm2d, (9, 3, 3, 3), 4, {"affine": False}),  # last chunk of 1 sample
]


@pytest.mark.parametrize("running_update", ["sequential", "mean"])
@pytest.mark.parametrize("cls,shape,vbs,kwargs", GHOST_CASES)
def test_ghost_equals_batch_norm_chunk_by_chunk(
    backend, cls, shape, vbs, kwargs, running_update
) -> None:
    layer = cls(shape[1], dtype=F64, virtual_batch_size=vbs, running_update=running_update,
                **kwargs)
    _randomize(layer, seed=1)
    plain = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}[len(shape) - 2 or 1](
        shape[1], dtype=F64, **kwargs
    )
    plain.load_state_dict(layer.state_dict())
    rm0, rv0 = _np(layer.running_mean), _np(layer.running_var)
    x = torch.randn(shape, dtype=F64).requires_grad_()
    x_plain = x.detach().clone().requires_grad_()
    dy = torch.randn(shape, dtype=F64)
    for _ in range(2):  # two steps: the buffers feed back through momentum
        y = layer(x)
        y.backward(dy)
        y_plain = torch.cat([plain(chunk) for chunk in x_plain.split(vbs)])
        y_plain.backward(dy)
    torch.testing.assert_close(y, y_plain)
    torch.testing.assert_close(x.grad, x_plain.grad)
    if layer.affine:
        torch.testing.assert_close(layer.weight.grad, plain.weight.grad)
        torch.testing.assert_close(layer.bias.grad, plain.bias.grad)
    _close(y, rv.ghost_batch_norm_forward(_np(x), vbs, _np(layer.weight), _np(layer.bias)))
    dx_ref, _, _ = rv.ghost_batch_norm_backward(_np(dy), _np(x), vbs, _np(layer.weight))
    _close(x.grad, 2 * dx_ref)
    chunks = -(-shape[0] // vbs)
    if running_update == "sequential":
        torch.testing.assert_close(layer.running_mean, plain.running_mean)
        torch.testing.assert_close(layer.running_var, plain.running_var)
        assert int(layer.num_batches_tracked) == int(plain.num_batches_tracked) == 2 * chunks
    else:
        assert int(layer.num_batches_tracked) == 2
        if kwargs.get("momentum", 0.1) is not None:
            m = kwargs.get("momentum", 0.1)
            rm1, rv1 = rv.ghost_update_running_stats(_np(x), vbs, rm0, rv0, m, "mean")
            rm2, rv2 = rv.ghost_update_running_stats(_np(x), vbs, rm1, rv1, m, "mean")
            _close(layer.running_mean, rm2)
            _close(layer.running_var, rv2)
    plain.load_state_dict(layer.state_dict())
    layer.eval(), plain.eval()
    torch.testing.assert_close(layer(x), plain(x))


def test_ghost_small_batches_and_errors() -> None:
    layer = GhostBatchNorm1d(3, virtual_batch_size=4)
    plain = nn.BatchNorm1d(3)
    x = torch.randn(3, 3)  # fewer samples than a virtual batch: plain BatchNorm
    torch.testing.assert_close(layer(x), plain(x))
    with pytest.raises(ValueError, match="virtual_batch_size"):
        layer(torch.randn(5, 3))  # last virtual batch: a single value per channel
    with pytest.raises(ValueError, match="virtual_batch_size"):
        GhostBatchNorm2d(3, virtual_batch_size=0)
    with pytest.raises(ValueError, match="running_update"):
        GhostBatchNorm2d(3, virtual_batch_size=2, running_update="last")
    assert set(GhostBatchNorm2d(3, virtual_batch_size=2).state_dict()) == set(
        nn.BatchNorm2d(3).state_dict()
    )


# --------------------------------------------------------------------------------------------
# Frozen BatchNorm, freeze / unfreeze, freeze_stats
# --------------------------------------------------------------------------------------------


def test_frozen_matches_reference_and_batch_norm_eval() -> None:
    bn = nn.BatchNorm2d(3, dtype=F64)
    _randomize(bn, seed=2)
    frozen = FrozenBatchNorm2d(3, dtype=F64)
    frozen.load_state_dict(bn.state_dict())  # strict, same keys
    x = torch.randn(2, 3, 4, 4, dtype=F64)
    expected = rv.frozen_batch_norm(_np(x), _np(bn.weight), _np(bn.bias),
                                    _np(bn.running_mean), _np(bn.running_var), bn.eps)
    for mode in (True, False):  # same in train and eval
        frozen.train(mode)
        _close(frozen(x), expected)
    _close(bn.eval()(x), expected)
    assert not list(frozen.parameters())
    back = nn.BatchNorm2d(3, dtype=F64)
    back.load_state_dict(frozen.state_dict())
    for key, value in bn.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], value)


def test_frozen_loads_a_non_affine_checkpoint() -> None:
    bn = nn.BatchNorm1d(3, affine=False)
    _randomize(bn)
    frozen = FrozenBatchNorm1d(3)
    frozen.load_state_dict(bn.state_dict())
    x = torch.randn(4, 3)
    torch.testing.assert_close(frozen(x), bn.eval()(x))
    with pytest.raises(ValueError, match="expected 2D or 3D input"):
        frozen(torch.randn(2, 3, 4, 4))


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(),
        nn.Sequential(nn.Conv2d(3, 4, 1), BatchNorm2d(4)),
        BatchNormAct2d(4, act="leaky_relu", slope=0.2),
        nn.Flatten(), nn.Linear(4 * 6 * 6, 5), nn.BatchNorm1d(5, affine=False),
    )
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d, BatchNorm2d)):
            _randomize(m, seed=len(list(m.parameters())) + m.num_features)
    return model


def test_freeze_and_unfreeze_batch_norm() -> None:
    model = _model()
    x = torch.randn(3, 2, 8, 8)
    expected = model.eval()(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    frozen = freeze_batch_norm(model.train())
    kinds = [type(m) for m in frozen.modules() if isinstance(m, FrozenBatchNorm)]
    assert kinds == [FrozenBatchNorm2d, FrozenBatchNorm2d, FrozenBatchNorm2d, FrozenBatchNorm1d]
    torch.testing.assert_close(frozen(x), expected)  # train mode, eval output
    assert set(frozen.state_dict()) == set(before) | {"7.weight", "7.bias"}
    thawed = unfreeze_batch_norm(frozen)
    assert [type(m) for m in thawed.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm,
            BatchNorm2d, BatchNormAct2d))] == [nn.BatchNorm2d, BatchNorm2d, BatchNormAct2d,
                                              nn.BatchNorm1d]
    assert thawed[4].act == "leaky_relu" and thawed[4].slope == 0.2
    assert thawed[7].affine is False
    for key, value in thawed.state_dict().items():
        torch.testing.assert_close(value, before[key])
    torch.testing.assert_close(thawed.eval()(x), expected)
    assert isinstance(freeze_batch_norm(BatchNorm1d(3)), FrozenBatchNorm1d)


def test_freeze_stats_survives_train_and_uses_running_stats(backend) -> None:
    model = _model()
    x = torch.randn(3, 2, 8, 8)
    expected = model.eval()(x)
    normlab_layers = set_freeze_stats(model, True)
    assert normlab_layers == 2  # BatchNorm2d and BatchNormAct2d (torch.nn layers have no flag)
    model.train()
    for layer in (model[3][1], model[4]):
        assert layer.freeze_stats and layer.training
        buffers = [b.clone() for b in layer.buffers()]
        out = layer(torch.randn(4, 4, 3, 3, requires_grad=True))
        out.sum().backward()
        for before, after in zip(buffers, layer.buffers(), strict=True):
            torch.testing.assert_close(before, after)  # running stats and counter untouched
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    # only the normlab layers are frozen: eval everything else to compare
    model[1].eval(), model[7].eval()
    torch.testing.assert_close(model(x), expected)
    model.eval().train()
    assert model[4].freeze_stats
    set_freeze_stats(model, False)
    model[4](torch.randn(4, 4, 3, 3))
    assert int(model[4].num_batches_tracked) == 1


# --------------------------------------------------------------------------------------------
# small_batch policy
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [BatchNorm1d, BatchNormAct2d, GhostBatchNorm2d, BatchRenorm2d])
@pytest.mark.parametrize("policy", ["error", "running", "skip_update"])
def test_small_batch_policy(cls, policy) -> None:
    extra = {"virtual_batch_size": 2} if cls is GhostBatchNorm2d else {}
    layer = cls(3, small_batch=policy, **extra)
    _randomize(layer)
    shape = (1, 3) if cls is BatchNorm1d else (1, 3, 1, 1)
    x = torch.randn(shape)
    buffers = [b.clone() for b in layer.buffers()]
    if policy == "error":
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            layer(x)
        return
    y = layer(x)
    for before, after in zip(buffers, layer.buffers(), strict=True):
        torch.testing.assert_close(before, after)
    bias = layer.bias.reshape((1, 3) + (1,) * (x.dim() - 2))
    expected = layer.eval()(x) if policy == "running" else bias.expand_as(x)
    if cls is BatchNormAct2d and policy == "skip_update":
        expected = torch.relu(expected)
    torch.testing.assert_close(y, expected)
    # larger batches are unaffected by the policy
    layer.train()
    layer(torch.randn((4,) + shape[1:]))
    assert int(layer.num_batches_tracked) == 1


def test_small_batch_policy_checks() -> None:
    with pytest.raises(ValueError, match="small_batch"):
        BatchNorm2d(3, small_batch="ignore")
    layer = BatchNorm2d(3, small_batch="running", track_running_stats=False)
    with pytest.raises(ValueError, match="more than 1 value"):
        layer(torch.randn(1, 3, 1, 1))  # nothing to fall back on
    assert set(BatchNorm2d(3, small_batch="running").state_dict()) == set(
        nn.BatchNorm2d(3).state_dict()
    )
