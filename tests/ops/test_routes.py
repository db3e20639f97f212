"""The routing table of ``normlab.ops``: which provider runs which plan (one table,
plan -> expected entry, per backend), and every entry that applies to a call against the
composite provider and the NumPy float64 reference (each row carries its reference)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

import normlab
from normlab import ops, plan, reference, reference_masked
from normlab.ops import triton

pytest.importorskip("normlab.ops.cpu", reason="numba is not installed")

CL = torch.channels_last


@dataclass(frozen=True)
class Call:
    """A functional call: its plan, the tensors, and the reference of its output."""

    id: str
    shape: tuple[int, ...]
    make_plan: Callable[[torch.Tensor], plan.Plan]
    reference: Callable[..., np.ndarray]  # (x, w, b, rm, rv) as float64 arrays -> y
    params: tuple[int, ...] | None = None  # weight/bias shape
    running: bool = False
    memory_format: torch.memory_format = torch.contiguous_format
    dtype: torch.dtype = torch.float32
    # backend -> the entry class expected to run it
    expected: dict[str, str] = field(default_factory=dict)
    masked: bool = False  # a validity mask [N, *S] with about 30% padding

    def tensors(self) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(0)
        x = (torch.randn(self.shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(self.dtype)
        x = x.contiguous(memory_format=self.memory_format)
        w = b = rm = rv = None
        if self.params is not None:
            w = torch.randn(self.params, generator=g, dtype=torch.float64).to(self.dtype)
            b = torch.randn(self.params, generator=g, dtype=torch.float64).to(self.dtype)
        if self.running:
            rm = torch.randn(self.shape[1], generator=g, dtype=torch.float64).to(self.dtype)
            rv = (torch.rand(self.shape[1], generator=g, dtype=torch.float64) + 0.5).to(self.dtype)
        return x, w, b, rm, rv

    def mask(self) -> torch.Tensor | None:
        return _padding((self.shape[0], *self.shape[2:])) if self.masked else None


def _padding(shape: tuple[int, ...]) -> torch.Tensor:
    """About 30% padding, the same for a call and its reference."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(3)) > 0.3


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().double().numpy()


def _bn_train(x, w, b, rm, rv):  # noqa: ANN001, ANN202
    return reference.batch_norm_forward(x, w, b, 1e-5)


def _bn_eval(x, w, b, rm, rv):  # noqa: ANN001, ANN202
    return reference.batch_norm_eval(x, rm, rv, w, b, 1e-5)


def _masked_bn(mask: torch.Tensor) -> Callable[..., np.ndarray]:
    return lambda x, w, b, rm, rv: reference_masked.masked_batch_norm_forward(
        x, mask.numpy(), w, b, 1e-5)


def _relu(f: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    return lambda *a: np.maximum(f(*a), 0)


def _batch(
    act: str = "identity", batch_stats: bool = True, masked: bool = False
) -> Callable[..., plan.Plan]:
    return lambda x: plan.batch(x, batch_stats, 1e-5, 0.1, act, 0.01, masked)


_PADDING = _padding((4, 5, 6))


BIG = (64, 16, 8, 16)  # past the fused-activation threshold (65536 elements)
CALLS = [
    Call("bn-train-planes", (4, 16, 5, 5), _batch(), _bn_train, (16,), True,
         expected={"auto": "BatchStep", "cpu": "BatchStep", "torch": "Composite"}),
    Call("bn-train-NC", (32, 6), _batch(), _bn_train, (6,), True,
         expected={"auto": "BatchStep", "cpu": "BatchStep", "torch": "Composite"}),
    Call("bn-train-channels-last", (4, 6, 3, 5), _batch(), _bn_train, (6,), True, CL,
         expected={"auto": "BatchStep", "cpu": "BatchStep", "torch": "Composite"}),
    Call("bn-train-few-channels", (4, 3, 5), _batch(), _bn_train, (3,), True,
         expected={"auto": "General", "cpu": "General", "torch": "Composite"}),
    Call("bn-train-half", (4, 16, 5), _batch(), _bn_train, (16,), True, dtype=torch.bfloat16,
         expected={"auto": "General", "cpu": "General", "torch": "Composite"}),
    Call("bn-train-relu-fused", BIG, _batch("relu"), _relu(_bn_train), (16,), True,
         expected={"auto": "BatchStep", "cpu": "BatchStep", "torch": "Composite"}),
    Call("bn-train-masked", (4, 16, 5, 6), _batch(masked=True), _masked_bn(_PADDING), (16,),
         True, expected={"auto": "MaskedBatchStep", "cpu": "MaskedBatchStep",
                         "torch": "Composite"}, masked=True),
    Call("bn-train-masked-channels-last", (4, 16, 5, 6), _batch(masked=True),
         _masked_bn(_PADDING), (16,), True, CL,
         expected={"auto": "Composite", "cpu": "Composite", "torch": "Composite"},
         masked=True),
    Call("in-train-masked", (4, 5, 6), lambda x: plan.instance(x, True, 1e-5, 0.1, True),
         lambda x, w, b, rm, rv: reference_masked.masked_instance_norm_forward(
             x, _padding((4, 6)).numpy(), w, b), (5,), True,
         expected={"auto": "MaskedRowsStep", "cpu": "MaskedRowsStep", "torch": "Composite"},
         masked=True),
    Call("gn-train-masked", (4, 6, 6), lambda x: plan.group(x, 2, 1e-5, "identity", 0.0, True),
         lambda x, w, b, rm, rv: reference_masked.masked_group_norm_forward(
             x, _padding((4, 6)).numpy(), 2, w, b), (6,),
         expected={"auto": "MaskedRowsStep", "cpu": "MaskedRowsStep", "torch": "Composite"},
         masked=True),
    Call("bn-eval", (4, 16, 5, 5), _batch(batch_stats=False), _bn_eval, (16,), True,
         expected={"auto": "NativeEval", "cpu": "General", "torch": "Composite"}),
    Call("bn-eval-relu", (4, 16, 5, 5), _batch("relu", False), _relu(_bn_eval), (16,), True,
         expected={"auto": "NativeEval", "cpu": "General", "torch": "Composite"}),
    Call("in-train", (4, 6, 9), lambda x: plan.instance(x, True, 1e-5, 0.1),
         lambda x, w, b, rm, rv: reference.instance_norm_forward(x, w, b, 1e-5), (6,), True,
         expected={"auto": "General", "cpu": "General", "torch": "Composite"}),
    Call("in-eval", (4, 6, 9), lambda x: plan.instance(x, False, 1e-5), _bn_eval, (6,), True,
         expected={"auto": "NativeEval", "cpu": "General", "torch": "Composite"}),
    Call("ln", (8, 3, 32), lambda x: plan.layer(x, (32,), 1e-5),
         lambda x, w, b, rm, rv: reference.layer_norm_forward(x, (32,), w, b, 1e-5), (32,),
         expected={"auto": "NativeNorm", "cpu": "RowsStep", "torch": "Composite"}),
    Call("ln-one-element", (8, 1), lambda x: plan.layer(x, (1,), 1e-5),
         lambda x, w, b, rm, rv: reference.layer_norm_forward(x, (1,), w, b, 1e-5), (1,),
         expected={"auto": "RowsStep", "cpu": "RowsStep", "torch": "Composite"}),
    Call("ln-relu-fused", (256, 512), lambda x: plan.layer(x, (512,), 1e-5, "relu"),
         _relu(lambda x, w, b, rm, rv: reference.layer_norm_forward(x, (512,), w, b, 1e-5)),
         (512,), expected={"auto": "RowsStep", "cpu": "RowsStep", "torch": "Composite"}),
    Call("gn", (4, 6, 3, 3), lambda x: plan.group(x, 2, 1e-5),
         lambda x, w, b, rm, rv: reference.group_norm_forward(x, 2, w, b, 1e-5), (6,),
         expected={"auto": "NativeNorm", "cpu": "RowsStep", "torch": "Composite"}),
    Call("gn-NC", (4, 6), lambda x: plan.group(x, 2, 1e-5),
         lambda x, w, b, rm, rv: reference.group_norm_forward(x, 2, w, b, 1e-5), (6,),
         expected={"auto": "RowsStep", "cpu": "RowsStep", "torch": "Composite"}),
    Call("gn-one-channel-per-group", (4, 6, 9), lambda x: plan.group(x, 6, 1e-5),
         lambda x, w, b, rm, rv: reference.group_norm_forward(x, 6, w, b, 1e-5), (6,),
         expected={"auto": "General", "cpu": "General", "torch": "Composite"}),
    Call("gn-channels-last", (4, 6, 3, 3), lambda x: plan.group(x, 2, 1e-5),
         lambda x, w, b, rm, rv: reference.group_norm_forward(x, 2, w, b, 1e-5), (6,),
         memory_format=CL,
         expected={"auto": "NativeNorm", "cpu": "General", "torch": "Composite"}),
    Call("rms", (8, 32), lambda x: plan.rms(x, (32,), 1e-5),
         lambda x, w, b, rm, rv: reference.rms_norm_forward(x, (32,), w, 1e-5), (32,),
         expected={"auto": "RowsStep", "cpu": "RowsStep", "torch": "Composite"}),
]


def _bias(call: Call, b: torch.Tensor | None) -> torch.Tensor | None:
    return None if call.make_plan is not None and "rms" in call.id else b


@pytest.mark.parametrize("backend", ["auto", "cpu", "torch"])
@pytest.mark.parametrize("call", CALLS, ids=[c.id for c in CALLS])
def test_route(call: Call, backend: str) -> None:
    x, w, b, rm, rv = call.tensors()
    p = call.make_plan(x)
    tensors = plan.Call(x, w, _bias(call, b), rm, rv, call.mask())
    chosen = ops.route(p, tensors, backend)
    assert type(chosen).__name__ == call.expected[backend]
    with normlab.use_backend(backend):  # the context manager filters the same table
        assert ops.route(p, tensors) is chosen


@pytest.mark.parametrize("table", ["cpu", "cuda"])
@pytest.mark.parametrize("call", CALLS, ids=[c.id for c in CALLS])
def test_every_entry_that_applies_matches_composite_and_reference(call: Call, table: str) -> None:
    """Conformance: each entry of a route that takes the call gives the composite
    provider's output, gradients and running statistics, and the reference's output (the
    CUDA route's entries, torch's native kernels, are device independent: run here on CPU
    tensors)."""
    x, w, b, rm, rv = call.tensors()
    b = _bias(call, b)
    p = call.make_plan(x)
    mode = "train" if p.batch_stats else "eval"
    results = {}
    for entry in ops.routes(table, mode, "auto", p.kind, p.masked, p.act != "identity"):
        if not entry.applies(p, plan.Call(x, w, b, rm, rv, call.mask())):
            continue
        xs, ws, bs = (None if t is None else t.detach().clone().requires_grad_(True)
                      for t in (x, w, b))
        rms, rvs = (None if t is None else t.clone() for t in (rm, rv))
        y = entry.forward(p, plan.Call(xs, ws, bs, rms, rvs, call.mask()))
        y.backward(torch.ones_like(y).mul_(torch.linspace(-1, 1, y.numel()).view(y.shape)))
        results[type(entry).__name__] = (y.detach(), xs.grad, rms, rvs,
                                         None if ws is None else ws.grad)
    assert "Composite" in results
    assert len(results) >= 2 or table != "cpu" or call.expected["cpu"] == "Composite"
    tol = {"atol": 2e-2, "rtol": 2e-2} if x.dtype == torch.bfloat16 else {"atol": 1e-4,
                                                                           "rtol": 1e-4}
    want = results.pop("Composite")
    expected = call.reference(*(_np(t) for t in (x, w, b, rm, rv)))
    torch.testing.assert_close(want[0].double(), torch.from_numpy(expected), **tol,
                               check_dtype=False)
    for name, got in results.items():
        for a, e in zip(got, want, strict=True):
            if e is None:
                assert a is None, name
            else:
                torch.testing.assert_close(a, e, **tol, msg=lambda m, n=name: f"{n}: {m}")


def test_cuda_and_meta_route_to_torch_natives_then_composite() -> None:
    """CUDA and meta take torch's native kernels (meta proves they read nothing back),
    the Triton provider for masks and fused activations, the composite code for
    InstanceNorm training."""
    x = torch.empty(4, 6, 5, device="meta")
    assert type(ops.route(plan.batch(x, True, 1e-5, 0.1), plan.Call(x))).__name__ == (
        "NativeBatchTrain")
    assert type(ops.route(plan.layer(x, (5,), 1e-5), plan.Call(x))).__name__ == "NativeNorm"
    assert ops.route(plan.instance(x, True, 1e-5), plan.Call(x)) is ops.COMPOSITE
    masked = plan.batch(x, True, 1e-5, 0.1, "identity", 0.0, True)
    activated = plan.batch(x, True, 1e-5, 0.1, "relu")
    # masks and fused activations: the Triton provider where triton is installed
    fused = "triton" if triton.installed() else "torch"
    assert ops.route(masked, plan.Call(x)).name == fused
    assert ops.route(activated, plan.Call(x)).name == fused
    assert ops.route(plan.batch(x, True, 1e-5, 0.1), plan.Call(x), "torch") is ops.COMPOSITE
    assert ops.pieces(x) is ops.COMPOSITE
    cuda_eval = ["TritonStep"] * triton.installed() + ["NativeEval", "Composite"]
    assert [type(e).__name__ for e in ops.routes("cuda", "eval")] == cuda_eval


def test_backend_choice_argument_context_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    assert ops.requested() == "auto"
    with normlab.use_backend("torch"):
        assert ops.requested() == "torch"
        with normlab.use_backend("cpu"):
            assert ops.requested() == "cpu"
    monkeypatch.setenv(ops.ENV_VAR, " CPU ")
    assert ops.requested() == "cpu"
    monkeypatch.setenv(ops.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="NORMLAB_BACKEND"):
        ops.requested()
    monkeypatch.delenv(ops.ENV_VAR)  # read on every call, not once
    assert ops.requested() == "auto"
    with pytest.raises(ValueError, match="backend must be one of"):
        normlab.functional.layer_norm(torch.randn(2, 3), (3,), backend="gpu")


@pytest.mark.parametrize(("make_input", "momentum", "counted"), [
    (lambda: torch.randn(4, 8, 5, 5), 0.1, 1),
    (lambda: torch.randn(4, 8, 5, 10)[..., ::2], 0.1, 1),  # the general kernels
    (lambda: torch.randn(4, 8, 5, 5), None, 1),  # cumulative average
    (lambda: torch.randn(1, 8, 1, 1), 0.1, 0),  # one value per channel: running stats
], ids=["contiguous", "strided", "momentum-None", "one-value"])
def test_a_layer_step_is_counted_once(make_input, momentum, counted) -> None:  # noqa: ANN001
    """Whatever entry runs it, a training batch is counted once (and a batch the layer
    normalizes with its running statistics not at all)."""
    layer = normlab.BatchNorm2d(8, momentum=momentum, small_batch="running")
    expected_layer = torch.nn.BatchNorm2d(8, momentum=momentum)
    x = make_input()
    expected = expected_layer.eval()(x) if x.shape[0] == 1 else expected_layer(x)
    torch.testing.assert_close(layer(x), expected)
    assert int(layer.num_batches_tracked) == counted
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(layer, name), getattr(expected_layer, name))
