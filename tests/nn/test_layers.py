"""Every layer against ``torch.nn`` and the NumPy float64 reference, over a table of
configurations modelled on torch's ModuleInfo entries for norms.

One generic test drives the whole table: two training steps (outputs, input and
parameter gradients, buffers) then eval, on every backend and in float32/float64.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import normlab
from normlab import reference as ref


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().double().numpy()


# The NumPy float64 references, one per kind of layer: ``reference(layer, xs, dys, w, b, eps)``
# is the output, the gradients (``dbias`` always, as ``normlab.reference`` has it) and the new
# running buffers of one forward/backward of ``layer`` (its state *before* the step) in its
# current mode, on the float64 arrays ``xs``, ``dys``, ``w``, ``b``.
Reference = Callable[..., dict[str, Any]]
Array = np.ndarray
Param = np.ndarray | None


def _batch_or_running_stats(
    layer: nn.Module,
    xs: Array,
    dys: Array,
    w: Param,
    b: Param,
    eps: float,
    fwd: Callable,
    bwd: Callable,
) -> dict[str, Any]:
    """``fwd``/``bwd`` (statistics of the input) in training or without running statistics,
    else the running statistics; no update of them."""
    rm, rv = _np(layer.running_mean), _np(layer.running_var)
    if layer.training or rm is None:
        y = fwd(xs, w, b, eps)
        dx, dw, db = bwd(dys, xs, w, eps)
    else:
        y = ref.batch_norm_eval(xs, rm, rv, w, b, eps)
        dx, dw, db = ref.batch_norm_eval_backward(dys, xs, rm, rv, w, eps)
    return {"y": y, "dx": dx, "dweight": dw, "dbias": db}


def _batch_norm_reference(
    layer: nn.Module, xs: Array, dys: Array, w: Param, b: Param, eps: float
) -> dict[str, Any]:
    out = _batch_or_running_stats(
        layer, xs, dys, w, b, eps, ref.batch_norm_forward, ref.batch_norm_backward
    )
    rm, rv = _np(layer.running_mean), _np(layer.running_var)
    if layer.training and rm is not None:
        mean, var, count = ref.batch_stats(xs)
        out["running_mean"], out["running_var"], out["num_batches_tracked"] = (
            ref.update_running_stats(
                rm, rv, mean, var, count, layer.momentum, int(layer.num_batches_tracked)
            )
        )
    return out


def _instance_norm_reference(
    spatial: int, layer: nn.Module, xs: Array, dys: Array, w: Param, b: Param, eps: float
) -> dict[str, Any]:
    """InstanceNorm{spatial}d; its input without the batch dimension has ``spatial + 1`` dims."""
    unbatched = xs.ndim == spatial + 1
    if unbatched:
        xs, dys = xs[None], dys[None]
    out = _batch_or_running_stats(
        layer, xs, dys, w, b, eps, ref.instance_norm_forward, ref.instance_norm_backward
    )
    rm, rv = _np(layer.running_mean), _np(layer.running_var)
    if layer.training and rm is not None:
        out["running_mean"], out["running_var"] = ref.instance_norm_update_running_stats(
            rm, rv, xs, layer.momentum
        )
    if unbatched:
        out["y"], out["dx"] = out["y"][0], out["dx"][0]
    return out


def _group_norm_reference(
    layer: nn.Module, xs: Array, dys: Array, w: Param, b: Param, eps: float
) -> dict[str, Any]:
    y = ref.group_norm_forward(xs, layer.num_groups, w, b, eps)
    dx, dw, db = ref.group_norm_backward(dys, xs, layer.num_groups, w, eps)
    return {"y": y, "dx": dx, "dweight": dw, "dbias": db}


def _layer_norm_reference(
    layer: nn.Module, xs: Array, dys: Array, w: Param, b: Param, eps: float
) -> dict[str, Any]:
    y = ref.layer_norm_forward(xs, layer.normalized_shape, w, b, eps)
    dx, dw, db = ref.layer_norm_backward(dys, xs, layer.normalized_shape, w, eps)
    return {"y": y, "dx": dx, "dweight": dw, "dbias": db}


def _rms_norm_reference(
    layer: nn.Module, xs: Array, dys: Array, w: Param, b: Param, eps: float
) -> dict[str, Any]:
    y = ref.rms_norm_forward(xs, layer.normalized_shape, w, eps)
    dx, dw = ref.rms_norm_backward(dys, xs, layer.normalized_shape, w, eps)
    return {"y": y, "dx": dx, "dweight": dw, "dbias": None}


# Each layer's reference, looked up once when a table row is built.
REFERENCES: dict[str, Reference] = {
    "BatchNorm1d": _batch_norm_reference,
    "BatchNorm2d": _batch_norm_reference,
    "BatchNorm3d": _batch_norm_reference,
    "InstanceNorm1d": partial(_instance_norm_reference, 1),
    "InstanceNorm2d": partial(_instance_norm_reference, 2),
    "InstanceNorm3d": partial(_instance_norm_reference, 3),
    "GroupNorm": _group_norm_reference,
    "LayerNorm": _layer_norm_reference,
    "RMSNorm": _rms_norm_reference,
}


@dataclass(frozen=True)
class Case:
    """One layer configuration: ``normlab.<layer>(*args, **kwargs)`` on inputs of ``shape``,
    checked against ``reference`` (the layer's entry of :data:`REFERENCES`)."""

    id: str
    layer: str
    args: tuple
    shape: tuple[int, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    memory_format: torch.memory_format = torch.contiguous_format
    reference: Reference = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "reference", REFERENCES[self.layer])


CASES = [
    Case("bn1d-NC", "BatchNorm1d", (4,), (6, 4)),
    Case("bn1d-NCL", "BatchNorm1d", (4,), (5, 4, 3)),
    Case("bn1d-momentum-None", "BatchNorm1d", (4,), (6, 4), {"momentum": None}),
    Case("bn2d", "BatchNorm2d", (3,), (4, 3, 5, 5)),
    Case("bn2d-momentum-0.3", "BatchNorm2d", (3,), (4, 3, 5, 5), {"momentum": 0.3}),
    Case("bn2d-momentum-0.8", "BatchNorm2d", (3,), (2, 3, 4, 4), {"momentum": 0.8}),
    Case("bn2d-momentum-None", "BatchNorm2d", (3,), (2, 3, 4, 4), {"momentum": None}),
    Case("bn2d-no-affine", "BatchNorm2d", (3,), (4, 3, 5, 5), {"affine": False}),
    Case("bn2d-no-bias", "BatchNorm2d", (3,), (4, 3, 5, 5), {"bias": False}),
    Case("bn2d-not-tracking", "BatchNorm2d", (3,), (4, 3, 5, 5), {"track_running_stats": False}),
    Case("bn2d-zero-batch", "BatchNorm2d", (3,), (0, 3, 5, 5)),
    Case("bn2d-16-channels", "BatchNorm2d", (16,), (3, 16, 4, 5)),  # per-channel tasks
    Case(
        "bn2d-channels-last", "BatchNorm2d", (3,), (4, 3, 5, 5), memory_format=torch.channels_last
    ),
    Case("bn3d", "BatchNorm3d", (2,), (3, 2, 3, 4, 2)),
    Case(
        "bn3d-channels-last",
        "BatchNorm3d",
        (2,),
        (3, 2, 3, 4, 2),
        memory_format=torch.channels_last_3d,
    ),
    Case("in1d", "InstanceNorm1d", (3,), (4, 3, 6)),
    Case("in1d-unbatched", "InstanceNorm1d", (3,), (3, 6)),
    Case(
        "in2d-affine-tracking",
        "InstanceNorm2d",
        (3,),
        (4, 3, 4, 5),
        {"affine": True, "track_running_stats": True},
    ),
    Case(
        "in2d-tracking-momentum-0.3",
        "InstanceNorm2d",
        (3,),
        (2, 3, 4, 4),
        {"track_running_stats": True, "momentum": 0.3},
    ),
    Case("in2d-unbatched-affine", "InstanceNorm2d", (3,), (3, 4, 4), {"affine": True}),
    Case(
        "in3d-affine-no-bias",
        "InstanceNorm3d",
        (2,),
        (2, 2, 3, 3, 2),
        {"affine": True, "bias": False},
    ),
    Case("gn", "GroupNorm", (2, 6), (4, 6, 5)),
    Case("gn-4d", "GroupNorm", (3, 6), (2, 6, 3, 3)),
    Case("gn-NC", "GroupNorm", (2, 4), (5, 4)),
    Case("gn-one-group", "GroupNorm", (1, 4), (3, 4, 5)),
    Case("gn-group-per-channel", "GroupNorm", (4, 4), (3, 4, 5)),
    Case("gn-no-affine", "GroupNorm", (2, 6), (4, 6, 5), {"affine": False}),
    Case("gn-no-bias", "GroupNorm", (2, 6), (4, 6, 5), {"bias": False}),
    Case("gn-zero-batch", "GroupNorm", (2, 6), (0, 6, 5)),
    Case("gn-channels-last", "GroupNorm", (2, 6), (2, 6, 3, 3), memory_format=torch.channels_last),
    Case("ln", "LayerNorm", (8,), (4, 8)),
    Case("ln-3d-input", "LayerNorm", (8,), (2, 3, 8)),
    Case("ln-2d-shape", "LayerNorm", ((3, 4),), (2, 3, 4)),
    Case("ln-no-affine", "LayerNorm", (8,), (4, 8), {"elementwise_affine": False}),
    Case("ln-no-bias", "LayerNorm", (8,), (4, 8), {"bias": False}),
    Case("ln-zero-batch", "LayerNorm", (8,), (0, 8)),
    Case("rms", "RMSNorm", (8,), (4, 8)),
    Case("rms-eps", "RMSNorm", (8,), (2, 3, 8), {"eps": 1e-3}),
    Case("rms-2d-shape", "RMSNorm", ((3, 4),), (2, 3, 4)),
    Case("rms-no-affine", "RMSNorm", (8,), (4, 8), {"elementwise_affine": False}),
]

TOLERANCE = {
    torch.float32: {"atol": 2e-5, "rtol": 2e-5},
    torch.float64: {"atol": 1e-10, "rtol": 1e-9},
}


def _randomize_affine(module: nn.Module, generator: torch.Generator) -> None:
    """Non-trivial weight/bias so the affine path is really tested."""
    with torch.no_grad():
        for name in ("weight", "bias"):
            param = getattr(module, name, None)
            if param is not None:
                param.copy_(
                    torch.randn(param.shape, generator=generator) * 0.5 + (name == "weight")
                )


def _reference_step(case: Case, layer: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> dict:
    """Output, gradients and new buffers from the case's reference for one forward/backward
    of ``layer`` (its state *before* the step) in its current mode."""
    w, b = _np(getattr(layer, "weight", None)), _np(getattr(layer, "bias", None))
    # eps=None (RMSNorm's default) is torch's: the eps of the input's dtype.
    eps = layer.eps if layer.eps is not None else torch.finfo(x.dtype).eps
    out = case.reference(layer, _np(x), _np(dy), w, b, eps)
    # The reference always returns the gradient of a bias; a layer without one has none.
    out["dbias"] = None if b is None else out["dbias"]
    return out


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    for fmt in (torch.channels_last, torch.channels_last_3d):
        if (
            x.dim() == (4 if fmt == torch.channels_last else 5)
            and not x.is_contiguous()
            and (x.is_contiguous(memory_format=fmt))
        ):
            return fmt
    return torch.contiguous_format


def _step(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> dict:
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    y = layer(x)
    y.backward(dy)
    return {
        "y": y.detach(),
        "dx": x.grad,
        "dweight": _grad(getattr(layer, "weight", None)),
        "dbias": _grad(getattr(layer, "bias", None)),
        "buffers": {k: v.detach().clone() for k, v in layer.named_buffers()},
        "memory_format_kept": y.is_contiguous(memory_format=_memory_format(x)),
    }


def _grad(param: torch.Tensor | None) -> torch.Tensor | None:
    return None if param is None or param.grad is None else param.grad.detach().clone()


def _assert_close(actual: Any, expected: Any, dtype: torch.dtype, what: str) -> None:
    if expected is None or actual is None:
        assert actual is None and expected is None, f"{what}: one side is None"
        return
    expected_t = torch.as_tensor(np.asarray(expected), dtype=torch.float64)
    torch.testing.assert_close(
        torch.as_tensor(actual).double(),
        expected_t,
        **TOLERANCE[dtype],
        msg=lambda m: f"{what}: {m}",
    )


def _build(case: Case, dtype: torch.dtype) -> tuple[nn.Module, nn.Module]:
    torch_layer = getattr(nn, case.layer)(*case.args, **case.kwargs, dtype=dtype)
    ours = getattr(normlab, case.layer)(*case.args, **case.kwargs, dtype=dtype)
    _randomize_affine(torch_layer, torch.Generator().manual_seed(1))
    ours.load_state_dict(torch_layer.state_dict())
    return torch_layer, ours


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_layer_matches_torch_and_reference(case: Case, dtype: torch.dtype, backend: str) -> None:
    torch_layer, ours = _build(case, dtype)
    generator = torch.Generator().manual_seed(0)
    for mode in ("train", "train", "eval"):
        torch_layer.train(mode == "train")
        ours.train(mode == "train")
        x = (torch.randn(case.shape, generator=generator, dtype=dtype) * 2 + 0.5).to(
            memory_format=case.memory_format
        )
        dy = torch.randn(case.shape, generator=generator, dtype=dtype)
        expected = _reference_step(case, ours, x, dy)
        got, theirs = _step(ours, x, dy), _step(torch_layer, x, dy)
        for key in ("y", "dx", "dweight", "dbias"):
            _assert_close(got[key], expected[key], dtype, f"{mode} {key} vs reference")
            _assert_close(got[key], theirs[key], dtype, f"{mode} {key} vs torch.nn")
        assert got["buffers"].keys() == theirs["buffers"].keys()
        for name, value in got["buffers"].items():
            if name in expected:
                _assert_close(value, expected[name], dtype, f"{mode} {name} vs reference")
            if value.dtype == torch.long:
                assert torch.equal(value, theirs["buffers"][name]), name
            else:
                _assert_close(value, theirs["buffers"][name], dtype, f"{mode} {name} vs torch.nn")
        assert got["memory_format_kept"], "output lost the input's memory format"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_state_dict_round_trip_with_torch(case: Case) -> None:
    torch_layer, ours = _build(case, torch.float32)
    assert list(ours.state_dict()) == list(torch_layer.state_dict())
    assert repr(ours).split("(", 1)[1] == repr(torch_layer).split("(", 1)[1]
    # normlab -> torch: perturb our buffers, load them back into a fresh torch layer.
    for buffer in ours.buffers():
        if buffer.is_floating_point():
            buffer.add_(0.25)
    fresh = getattr(nn, case.layer)(*case.args, **case.kwargs)
    fresh.load_state_dict(ours.state_dict())
    for (k, a), (_, b) in zip(ours.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


HALF_CASES = [c for c in CASES if c.id in ("bn2d", "bn2d-channels-last", "gn", "ln", "rms", "in1d")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("case", HALF_CASES, ids=[c.id for c in HALF_CASES])
def test_half_input_uses_float32_statistics(case: Case, dtype: torch.dtype, backend: str) -> None:
    """Half-precision input, float32 parameters and buffers: the result is the float32
    computation rounded once to the input dtype."""
    _, ours = _build(case, torch.float32)
    ours.train()
    x32 = torch.randn(case.shape, generator=torch.Generator().manual_seed(0)) * 3 + 1
    x = x32.to(dtype).to(memory_format=case.memory_format)
    y = ours(x)
    assert y.dtype == dtype
    expected = _reference_step(case, ours, x.float(), torch.zeros_like(x32))["y"]
    torch.testing.assert_close(y.double(), torch.as_tensor(expected), atol=0.05, rtol=0.02)
    for name, buf in ours.named_buffers():
        assert buf.dtype == (torch.long if name == "num_batches_tracked" else torch.float32)
        assert torch.isfinite(buf.float()).all(), name
