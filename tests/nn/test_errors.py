"""Bad input fails loudly, with the argument and the expectation in the message, and
leaves the module's state untouched."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import normlab
import normlab.functional as F

x2, x3, x4 = torch.randn(4, 3), torch.randn(4, 3, 5), torch.randn(4, 3, 5, 5)

# (id, action, exception type, message pattern)
BAD_INPUTS: list[tuple[str, Callable[[], object], type[Exception], str]] = [
    (
        "bn1d-rank",
        lambda: normlab.BatchNorm1d(3)(x4),
        ValueError,
        r"expected 2D or 3D input \(got 4D",
    ),
    ("bn2d-rank", lambda: normlab.BatchNorm2d(3)(x3), ValueError, r"expected 4D input \(got 3D"),
    ("bn3d-rank", lambda: normlab.BatchNorm3d(3)(x4), ValueError, r"expected 5D input \(got 4D"),
    ("in1d-rank", lambda: normlab.InstanceNorm1d(3)(x4), ValueError, r"expected 2D or 3D input"),
    ("in2d-rank", lambda: normlab.InstanceNorm2d(3)(x2), ValueError, r"expected 3D or 4D input"),
    ("gn-rank", lambda: normlab.GroupNorm(1, 3)(torch.randn(3)), ValueError, r"at least 2 dim"),
    (
        "bn-channels",
        lambda: normlab.BatchNorm2d(4)(x4),
        ValueError,
        r"num_features=4.*\(4, 3, 5, 5\)",
    ),
    ("bn1d-channels", lambda: normlab.BatchNorm1d(5)(x2), ValueError, r"num_features=5"),
    (
        "in-affine-channels",
        lambda: normlab.InstanceNorm1d(4, affine=True)(x3),
        ValueError,
        r"match num_features \(4\)",
    ),
    ("gn-channels", lambda: normlab.GroupNorm(2, 4)(x3), ValueError, r"num_channels=4"),
    ("ln-shape", lambda: normlab.LayerNorm(4)(x3), ValueError, r"normalized_shape \(4,\)"),
    ("rms-shape", lambda: normlab.RMSNorm((3, 4))(x3), ValueError, r"normalized_shape \(3, 4\)"),
    ("bn-eps-zero", lambda: normlab.BatchNorm2d(3, eps=0), ValueError, r"eps must be a positive"),
    ("bn-eps-negative", lambda: normlab.BatchNorm1d(3, eps=-1e-5), ValueError, r"eps must be"),
    ("in-eps", lambda: normlab.InstanceNorm2d(3, eps=0.0), ValueError, r"eps must be"),
    ("gn-eps", lambda: normlab.GroupNorm(1, 3, eps=0), ValueError, r"eps must be"),
    ("ln-eps", lambda: normlab.LayerNorm(3, eps=-1.0), ValueError, r"eps must be"),
    ("rms-eps", lambda: normlab.RMSNorm(3, eps=0.0), ValueError, r"eps must be"),
    ("eps-type", lambda: normlab.BatchNorm2d(3, eps="small"), TypeError, r"eps must be"),
    ("functional-eps", lambda: F.layer_norm(x3, 5, eps=0), ValueError, r"eps must be"),
    (
        "momentum-high",
        lambda: normlab.BatchNorm2d(3, momentum=1.5),
        ValueError,
        r"momentum must be in \[0, 1\]",
    ),
    (
        "momentum-negative",
        lambda: normlab.BatchNorm1d(3, momentum=-0.1),
        ValueError,
        r"momentum must be in \[0, 1\]",
    ),
    ("momentum-in", lambda: normlab.InstanceNorm1d(3, momentum=2.0), ValueError, r"momentum"),
    (
        "functional-momentum",
        lambda: F.batch_norm(x2, None, None, training=True, momentum=3.0),
        ValueError,
        r"momentum must be in \[0, 1\]",
    ),
    (
        "groups-divide",
        lambda: normlab.GroupNorm(4, 6),
        ValueError,
        r"num_groups \(4\) must divide num_channels \(6\)",
    ),
    (
        "functional-groups",
        lambda: F.group_norm(torch.randn(2, 6, 3), 4),
        ValueError,
        r"num_groups \(4\) must divide",
    ),
    ("num-features-type", lambda: normlab.BatchNorm2d(3.0), TypeError, r"num_features must be"),
    ("num-features-zero", lambda: normlab.BatchNorm2d(0), ValueError, r"num_features must be"),
    ("normalized-shape-type", lambda: normlab.LayerNorm("4"), TypeError, r"normalized_shape"),
    (
        "int-input",
        lambda: normlab.BatchNorm1d(3)(torch.ones(4, 3, dtype=torch.long)),
        TypeError,
        r"floating-point tensor.*torch.int64",
    ),
    (
        "int-input-ln",
        lambda: normlab.LayerNorm(3)(torch.ones(4, 3, dtype=torch.int32)),
        TypeError,
        r"floating-point",
    ),
    (
        "not-a-tensor",
        lambda: normlab.GroupNorm(1, 3)([[1.0, 2.0, 3.0]]),
        TypeError,
        r"input must be a torch.Tensor, got list",
    ),
    (
        "one-value-per-channel",
        lambda: normlab.BatchNorm1d(3)(torch.randn(1, 3)),
        ValueError,
        r"Expected more than 1 value per channel when training",
    ),
    (
        "one-value-per-channel-2d",
        lambda: normlab.BatchNorm2d(3)(torch.randn(1, 3, 1, 1)),
        ValueError,
        r"more than 1 value per channel",
    ),
    (
        "instance-one-spatial",
        lambda: normlab.InstanceNorm1d(3)(torch.randn(2, 3, 1)),
        ValueError,
        r"more than 1 spatial element",
    ),
    (
        "functional-weight-shape",
        lambda: F.batch_norm(x3, None, None, torch.ones(4), training=True),
        ValueError,
        r"weight must have shape \(3,\)",
    ),
    (
        "functional-running-shape",
        lambda: F.batch_norm(x3, torch.zeros(2), torch.ones(2), training=True),
        ValueError,
        r"running_mean must have shape \(3,\)",
    ),
    (
        "functional-eval-needs-stats",
        lambda: F.batch_norm(x3, None, None),
        ValueError,
        r"required when training=False",
    ),
    (
        "functional-ln-weight",
        lambda: F.layer_norm(x3, 5, torch.ones(4)),
        ValueError,
        r"weight must have shape normalized_shape \(5,\)",
    ),
    (
        "backend-name",
        lambda: F.layer_norm(x3, 5, backend="gpu"),
        ValueError,
        r"backend must be one of",
    ),
]


@pytest.mark.parametrize(
    "action,error,pattern", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_input_raises_a_clear_error(
    action: Callable[[], object], error: type[Exception], pattern: str
) -> None:
    with pytest.raises(error, match=pattern):
        action()


def test_momentum_is_checked_when_changed_later() -> None:
    bn = normlab.BatchNorm2d(3)
    with pytest.raises(ValueError, match="momentum"):
        bn.momentum = 1.2
    bn.momentum = None  # a cumulative average is allowed


def test_rejected_batch_leaves_buffers_and_counter_untouched() -> None:
    bn = normlab.BatchNorm1d(3)
    bn(torch.randn(8, 3))
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    for bad in (torch.randn(8, 4), torch.randn(1, 3), torch.ones(8, 3, dtype=torch.long)):
        with pytest.raises((ValueError, TypeError)):
            bn(bad)
    for key, value in bn.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_backend_environment_variable_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NORMLAB_BACKEND", "fastest")
    with pytest.raises(ValueError, match="NORMLAB_BACKEND must be one of"):
        F.layer_norm(x3, 5)


# A layer's own state replaced by a tensor of the wrong shape: the layers' fast routes
# (straight to the kernels or torch's native function) must leave the report to the
# checked path, and a rejected training batch must not be counted.
BAD_STATE = [
    ("bn-eval-running_mean", lambda: normlab.BatchNorm2d(3).eval(), "running_mean",
     torch.zeros(5), x4),
    ("bn-eval-weight", lambda: normlab.BatchNorm2d(3).eval(), "weight",
     torch.nn.Parameter(torch.ones(5)), x4),
    ("bn-train-weight", lambda: normlab.BatchNorm2d(3), "weight",
     torch.nn.Parameter(torch.ones(5)), x4),
    ("bn-train-running_var", lambda: normlab.BatchNorm1d(3), "running_var", torch.ones(5), x3),
    ("ln-weight", lambda: normlab.LayerNorm(3), "weight", torch.nn.Parameter(torch.ones(5)),
     x2),
    ("gn-bias", lambda: normlab.GroupNorm(1, 3), "bias", torch.nn.Parameter(torch.ones(5)),
     x4),
]


@pytest.mark.parametrize(("make", "name", "value", "x"), [c[1:] for c in BAD_STATE],
                         ids=[c[0] for c in BAD_STATE])
def test_reassigned_state_of_wrong_shape_is_named(make, name, value, x) -> None:  # noqa: ANN001
    layer = make()
    setattr(layer, name, value)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match=f"{name} must have shape"):
        layer(x)
    for key, old in before.items():
        assert torch.equal(layer.state_dict()[key], old), key


# State never moves on an error: every layer and variant, in training and eval, given each
# kind of bad input, raises a ValueError/TypeError naming the problem, with its parameters,
# buffers, counter and the input exactly as they were.
LAYERS: list[tuple[str, Callable[[], torch.nn.Module], tuple[int, ...]]] = [
    ("bn1d", lambda: normlab.BatchNorm1d(3), (4, 3, 5)),
    ("bn2d", lambda: normlab.BatchNorm2d(3), (4, 3, 5, 5)),
    ("bn3d", lambda: normlab.BatchNorm3d(3), (2, 3, 2, 3, 3)),
    ("bn-act", lambda: normlab.BatchNormAct2d(3), (4, 3, 5, 5)),
    ("renorm", lambda: normlab.BatchRenorm2d(3), (4, 3, 5, 5)),
    ("ghost", lambda: normlab.GhostBatchNorm2d(3, virtual_batch_size=2), (4, 3, 5, 5)),
    ("inplace-abn", lambda: normlab.InPlaceABN(3), (4, 3, 5, 5)),
    ("frozen", lambda: normlab.FrozenBatchNorm2d(3), (4, 3, 5, 5)),
    ("in2d", lambda: normlab.InstanceNorm2d(3, affine=True, track_running_stats=True),
     (4, 3, 5, 5)),
    ("gn", lambda: normlab.GroupNorm(1, 3), (4, 3, 5, 5)),
    ("gn-act", lambda: normlab.GroupNormAct(1, 3), (4, 3, 5, 5)),
    ("ln", lambda: normlab.LayerNorm(5), (4, 3, 5)),
    ("ln-act", lambda: normlab.LayerNormAct(5), (4, 3, 5)),
    ("rms", lambda: normlab.RMSNorm(5), (4, 3, 5)),
]
# Layers whose parameters may have another float dtype than the input (torch's rms_norm
# promotes; a frozen BatchNorm is a plain affine map).
ANY_DTYPE = {"rms", "frozen"}
TRAILING = {"ln", "ln-act", "rms"}  # normalized over the trailing dims, not channels

# (id, make the bad input from a good one, exception, message pattern)
BAD_BATCHES: list[tuple[str, Callable[[torch.Tensor], torch.Tensor], type[Exception], str]] = [
    ("meta", lambda x: x.to("meta"), ValueError, r"on device cpu but input is on meta"),
    ("sparse", lambda x: x.to_sparse(), TypeError, r"dense \(strided\)"),
    ("integer", lambda x: x.long(), TypeError, r"floating-point"),
    ("float64", lambda x: x.double(), TypeError, r"has dtype torch.float32 but input"),
    ("channels", lambda x: torch.randn(x.shape[0], 4, *x.shape[2:]), ValueError, r"4"),
    ("trailing", lambda x: torch.randn(*x.shape[:-1], 7), ValueError, r"7"),
]


def _bad_cases() -> list[object]:
    cases = []
    for layer_id, make, shape in LAYERS:
        for bad_id, bad, error, pattern in BAD_BATCHES:
            if bad_id == "float64" and layer_id in ANY_DTYPE:
                continue
            if bad_id == ("channels" if layer_id in TRAILING else "trailing"):
                continue
            for training in (True, False):
                cases.append(pytest.param(
                    make, shape, bad, error, pattern, training,
                    id=f"{layer_id}-{bad_id}-{'train' if training else 'eval'}",
                ))
    return cases


def _snapshot(layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in layer.state_dict().items()}


def _assert_unchanged(layer: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = layer.state_dict()
    for key, old in before.items():
        assert torch.equal(after[key], old), f"{key} moved"


@pytest.mark.parametrize(("make", "shape", "bad", "error", "pattern", "training"), _bad_cases())
def test_bad_batch_moves_no_state(make, shape, bad, error, pattern, training) -> None:  # noqa: ANN001
    layer = make().train(training)
    layer(torch.randn(shape))  # a good step first: the state is not the initial one
    before = _snapshot(layer)
    x = bad(torch.randn(shape))
    x_before = None if x.is_meta or x.is_sparse else x.clone()
    with pytest.raises(error, match=pattern):
        layer(x)
    _assert_unchanged(layer, before)
    if x_before is not None:
        assert torch.equal(x, x_before), "the input was modified"


# A layer's own tensors reassigned with the wrong dtype or device are named too.
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    ("name", "value", "error", "pattern"),
    [
        ("running_mean", torch.zeros(3, dtype=torch.float64), TypeError,
         r"running_mean has dtype torch.float64"),
        ("weight", torch.nn.Parameter(torch.ones(3, dtype=torch.float64)), TypeError,
         r"weight has dtype torch.float64"),
        ("bias", torch.nn.Parameter(torch.zeros(3, device="meta")), ValueError,
         r"bias is on device meta"),
    ],
    ids=["running_mean-float64", "weight-float64", "bias-meta"],
)
def test_reassigned_state_of_wrong_dtype_or_device_is_named(
    name: str, value: torch.Tensor, error: type[Exception], pattern: str, training: bool
) -> None:
    layer = normlab.BatchNorm2d(3).train(training)
    setattr(layer, name, value)
    before = _snapshot(layer) if name != "bias" else None
    with pytest.raises(error, match=pattern):
        layer(x4)
    if before is not None:
        _assert_unchanged(layer, before)
    else:
        assert int(layer.num_batches_tracked) == 0


@pytest.mark.parametrize(("make", "shape"), [c[1:] for c in LAYERS], ids=[c[0] for c in LAYERS])
def test_empty_batch_gives_empty_output_and_keeps_statistics(make, shape) -> None:  # noqa: ANN001
    layer = make()
    layer(torch.randn(shape))
    before = _snapshot(layer)
    y = layer(torch.randn(0, *shape[1:]))
    assert y.shape == (0, *shape[1:])
    for key in ("running_mean", "running_var"):
        if key in before:
            assert torch.equal(layer.state_dict()[key], before[key]), key


@pytest.mark.parametrize("as_view", [False, True], ids=["leaf", "view-of-leaf"])
def test_inplace_abn_refuses_a_leaf_before_writing(as_view: bool) -> None:
    layer = normlab.InPlaceABN(3)
    leaf = torch.randn(4, 3, 5, 5, requires_grad=True)
    x = leaf.view(4, 3, 25).view(4, 3, 5, 5) if as_view else leaf
    before, x_before = _snapshot(layer), x.detach().clone()
    with pytest.raises(ValueError, match="leaf tensor that requires grad"):
        layer(x)
    _assert_unchanged(layer, before)
    assert torch.equal(x.detach(), x_before)
    # Without autograd, or on a non-leaf, the write is allowed.
    y = layer(leaf * 1.0)
    y.sum().backward()
    assert leaf.grad is not None
