"""Masked BatchNorm (statistics over the valid positions of padded batches) against the
float64 reference (``normlab.reference_masked``) and against unmasked BatchNorm on the
concatenated valid values, on every backend; bad masks refused before any state moves."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

import normlab
from normlab import reference_masked as ref

TOL = {torch.float32: {"atol": 3e-5, "rtol": 3e-5}, torch.float64: {"atol": 1e-10, "rtol": 1e-9}}


@dataclass(frozen=True)
class MaskedCase:
    id: str
    layer: str
    shape: tuple[int, ...]
    padding: str  # "none", "30%", "all-but-one-per-sample", "all-but-two", "all"
    kwargs: tuple = ()
    memory_format: torch.memory_format = torch.contiguous_format

    def make(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(len(self.id))
        x = (torch.randn(self.shape, generator=g, dtype=torch.float64) * 2 + 1).to(dtype)
        x = x.contiguous(memory_format=self.memory_format)
        n, spatial = self.shape[0], self.shape[2:]
        if self.padding == "none":
            mask = torch.ones((n, *spatial), dtype=torch.bool)
        elif self.padding == "30%":
            mask = torch.rand((n, *spatial), generator=g) > 0.3
            mask.view(n, -1)[:, 0] = True
        elif self.padding == "all-but-two":
            mask = torch.zeros((n, *spatial), dtype=torch.bool)
            mask.view(-1)[[0, -1]] = True
        else:  # "all"
            mask = torch.zeros((n, *spatial), dtype=torch.bool)
        return x, mask


CASES = [
    MaskedCase("1d-sequence", "BatchNorm1d", (4, 6, 10), "30%"),
    MaskedCase("1d-no-padding", "BatchNorm1d", (4, 6, 10), "none"),
    MaskedCase("1d-all-but-two", "BatchNorm1d", (3, 5, 7), "all-but-two"),
    MaskedCase("1d-all-padding", "BatchNorm1d", (3, 5, 7), "all"),
    MaskedCase("1d-momentum-None", "BatchNorm1d", (4, 6, 10), "30%", (("momentum", None),)),
    MaskedCase("1d-no-affine", "BatchNorm1d", (4, 6, 10), "30%", (("affine", False),)),
    MaskedCase("2d", "BatchNorm2d", (3, 8, 4, 5), "30%"),
    MaskedCase("2d-channels-last", "BatchNorm2d", (3, 8, 4, 5), "30%",
               memory_format=torch.channels_last),
    MaskedCase("3d", "BatchNorm3d", (2, 4, 3, 4, 5), "30%"),
    MaskedCase("act-relu", "BatchNormAct1d", (4, 6, 10), "30%", (("act", "relu"),)),
]


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().double().numpy()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_masked_batch_norm_matches_reference(case: MaskedCase, dtype: torch.dtype,
                                             backend: str) -> None:
    layer = getattr(normlab, case.layer)(case.shape[1], dtype=dtype, **dict(case.kwargs))
    with torch.no_grad():
        if layer.weight is not None:
            layer.weight.uniform_(0.5, 1.5), layer.bias.uniform_(-0.5, 0.5)
        layer.running_mean.uniform_(-1, 1), layer.running_var.uniform_(0.5, 2)
    x, mask = case.make(dtype)
    rm0, rv0 = _np(layer.running_mean).copy(), _np(layer.running_var).copy()
    xs = x.clone().requires_grad_(True)
    dy = torch.randn(case.shape, dtype=dtype, generator=torch.Generator().manual_seed(7))
    with normlab.use_backend(backend):
        y = layer(xs, mask=mask)
    relu = dict(case.kwargs).get("act") == "relu"
    w, b = _np(layer.weight), _np(layer.bias)
    expected = ref.masked_batch_norm_forward(_np(x), mask.numpy(), w, b, layer.eps)
    pre = expected
    if relu:
        expected = np.maximum(expected, 0)
    torch.testing.assert_close(y.double(), torch.from_numpy(expected), **TOL[dtype])
    assert y.is_contiguous(memory_format=case.memory_format) or mask.sum() == 0
    y.backward(dy)
    grad = _np(dy) * (pre > 0) if relu else _np(dy)
    dx, dw, db = ref.masked_batch_norm_backward(grad, _np(x), mask.numpy(), w, layer.eps)
    torch.testing.assert_close(xs.grad.double(), torch.from_numpy(dx), **TOL[dtype])
    if layer.weight is not None:
        torch.testing.assert_close(layer.weight.grad.double(), torch.from_numpy(dw), **TOL[dtype])
        torch.testing.assert_close(layer.bias.grad.double(), torch.from_numpy(db), **TOL[dtype])
    mean, var, count = ref.masked_batch_stats(_np(x), mask.numpy())
    if count == 0:  # an all-padding batch records nothing, not even the step
        assert int(layer.num_batches_tracked) == 0
        torch.testing.assert_close(_np(layer.running_mean), rm0)
        return
    momentum = 1.0 if layer.momentum is None else layer.momentum
    want_rm = (1 - momentum) * rm0 + momentum * mean
    want_rv = (1 - momentum) * rv0 + momentum * var * count / (count - 1)
    assert int(layer.num_batches_tracked) == 1
    torch.testing.assert_close(_np(layer.running_mean), want_rm, **TOL[dtype])
    torch.testing.assert_close(_np(layer.running_var), want_rv, **TOL[dtype])


@pytest.mark.parametrize("case", [c for c in CASES if c.padding == "30%" and not c.kwargs],
                         ids=lambda c: c.id)
def test_masked_equals_unmasked_on_the_concatenated_valid_values(case: MaskedCase) -> None:
    """The statistics, the valid outputs and the running buffers of a masked batch are
    those of torch.nn's BatchNorm1d on the valid values alone, stacked as ``[M, C]``."""
    x, mask = case.make(torch.float64)
    ours = getattr(normlab, case.layer)(case.shape[1], dtype=torch.float64)
    theirs = torch.nn.BatchNorm1d(case.shape[1], dtype=torch.float64)
    y = ours(x, mask=mask)
    valid = torch.from_numpy(ref.concatenated_valid(x.numpy(), mask.numpy()))
    expected = theirs(valid)
    got = torch.from_numpy(ref.concatenated_valid(y.detach().numpy(), mask.numpy()))
    torch.testing.assert_close(got, expected.detach())
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)


def test_mask_none_is_the_unmasked_computation() -> None:
    x = torch.randn(4, 6, 10)
    a, b = normlab.BatchNorm1d(6), normlab.BatchNorm1d(6)
    assert torch.equal(a(x), b(x, mask=None))
    full = torch.ones(4, 10, dtype=torch.bool)
    torch.testing.assert_close(a(x, mask=full), b(x))
    torch.testing.assert_close(a.running_var, b.running_var)


def test_eval_ignores_the_mask() -> None:
    layer = normlab.BatchNorm1d(6).eval()
    x = torch.randn(4, 6, 10)
    mask = torch.rand(4, 10) > 0.5
    assert torch.equal(layer(x, mask=mask), layer(x))


def test_lengths_to_mask() -> None:
    mask = normlab.lengths_to_mask(torch.tensor([3, 0, 5]), 5)
    assert mask.dtype == torch.bool and mask.tolist() == [
        [True, True, True, False, False], [False] * 5, [True] * 5]
    assert normlab.lengths_to_mask(torch.tensor([2, 1])).shape == (2, 2)
    with pytest.raises(ValueError, match="lengths"):
        normlab.lengths_to_mask(torch.tensor([1.5]), 3)
    with pytest.raises(ValueError, match="max_len"):
        normlab.lengths_to_mask(torch.tensor([4]), 3)


BAD_MASKS = [
    ("wrong shape", lambda x: torch.ones(4, 9, dtype=torch.bool), "broadcastable to \\[N, \\*S\\]"),
    ("with the channel dim", lambda x: torch.ones(4, 6, 10, dtype=torch.bool), "channel"),
    ("float", lambda x: torch.ones(4, 10), "dtype torch.float32"),
    ("meta", lambda x: torch.ones(4, 10, dtype=torch.bool, device="meta"), "device"),
    ("not a tensor", lambda x: [[True] * 10] * 4, "list"),
    ("one valid position", lambda x: torch.eye(4, 10, dtype=torch.bool)[:1].expand(4, 10)
     & (torch.arange(4)[:, None] == 0), "1 valid position"),
]


@pytest.mark.parametrize(("make", "message"), [b[1:] for b in BAD_MASKS],
                         ids=[b[0] for b in BAD_MASKS])
def test_bad_mask_is_refused_before_any_state_moves(make, message) -> None:  # noqa: ANN001
    layer = normlab.BatchNorm1d(6)
    x = torch.randn(4, 6, 10)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        layer(x, mask=make(x))
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key
    with pytest.raises(ValueError, match=message):
        normlab.functional.batch_norm(x, None, None, training=True, mask=make(x))


@pytest.mark.parametrize("policy", ["error", "running", "skip_update"])
def test_one_valid_position_follows_the_small_batch_policy(policy: str) -> None:
    layer = normlab.BatchNorm1d(3, small_batch=policy)
    with torch.no_grad():
        layer.running_mean.fill_(0.5), layer.running_var.fill_(2.0), layer.bias.fill_(0.25)
    x = torch.randn(2, 3, 4)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[1, 2] = True
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    if policy == "error":
        with pytest.raises(ValueError, match="1 valid position"):
            layer(x, mask=mask)
    else:
        y = layer(x, mask=mask)
        if policy == "running":  # the running statistics, untouched
            torch.testing.assert_close(y, layer.eval()(x))
        else:  # the batch's own statistics: the one valid value normalizes to bias
            torch.testing.assert_close(y[1, :, 2], layer.bias.detach())
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_masked_step_double_backward_runs_the_composite_code() -> None:
    """The kernels' step is differentiable once; gradients of gradients come from the
    composite code with the same mask."""
    x = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    w = torch.rand(4, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(3, 6, generator=torch.Generator().manual_seed(1)) > 0.3

    def fn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return normlab.functional.batch_norm(x, None, None, w, None, True, mask=mask,
                                             backend="cpu")

    assert torch.autograd.gradcheck(fn, (x, w))
    assert torch.autograd.gradgradcheck(fn, (x, w), atol=1e-5)


@pytest.mark.parametrize("norm", ["instance", "group"])
def test_masked_rows_step_double_backward(norm: str) -> None:
    x = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    w = torch.rand(4, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(3, 6, generator=torch.Generator().manual_seed(2)) > 0.3

    def fn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if norm == "instance":
            return normlab.functional.instance_norm(x, weight=w, mask=mask, backend="cpu")
        return normlab.functional.group_norm(x, 2, w, mask=mask, backend="cpu")

    assert torch.autograd.gradcheck(fn, (x, w))
    assert torch.autograd.gradgradcheck(fn, (x, w), atol=1e-5)


def test_masked_benchmark_quick(capsys: pytest.CaptureFixture) -> None:
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "masked.py"
    spec = importlib.util.spec_from_file_location("masked_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--quick"])
    assert result["cost"] > 0 and result["speedup"] > 0
    assert "recipe / masked" in capsys.readouterr().out


PER_SAMPLE = [  # id, layer factory, shape, reference forward / backward
    ("in1d", lambda: normlab.InstanceNorm1d(6, affine=True), (4, 6, 10),
     lambda x, m, w, b: ref.masked_instance_norm_forward(x, m, w, b),
     lambda dy, x, m, w: ref.masked_instance_norm_backward(dy, x, m, w)),
    ("in2d-running", lambda: normlab.InstanceNorm2d(5, affine=True, track_running_stats=True),
     (3, 5, 4, 6),
     lambda x, m, w, b: ref.masked_instance_norm_forward(x, m, w, b),
     lambda dy, x, m, w: ref.masked_instance_norm_backward(dy, x, m, w)),
    ("gn", lambda: normlab.GroupNorm(2, 6), (4, 6, 10),
     lambda x, m, w, b: ref.masked_group_norm_forward(x, m, 2, w, b),
     lambda dy, x, m, w: ref.masked_group_norm_backward(dy, x, m, 2, w)),
    ("gn-2d", lambda: normlab.GroupNorm(3, 6), (2, 6, 3, 5),
     lambda x, m, w, b: ref.masked_group_norm_forward(x, m, 3, w, b),
     lambda dy, x, m, w: ref.masked_group_norm_backward(dy, x, m, 3, w)),
]


@pytest.mark.parametrize("padding", ["30%", "all"])
@pytest.mark.parametrize(("make", "shape", "forward", "backward"), [c[1:] for c in PER_SAMPLE],
                         ids=[c[0] for c in PER_SAMPLE])
def test_masked_instance_and_group_norm_match_reference(
    make, shape, forward, backward, padding, backend  # noqa: ANN001
) -> None:
    layer = make().double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5), layer.bias.uniform_(-0.5, 0.5)
    x, mask = MaskedCase("x", "", shape, padding).make(torch.float64)
    mask[0] = False  # one instance of padding only: its output is bias
    xs = x.clone().requires_grad_(True)
    dy = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    running = getattr(layer, "running_mean", None) is not None
    rm0 = _np(layer.running_mean).copy() if running else None
    rv0 = _np(layer.running_var).copy() if running else None
    with normlab.use_backend(backend):
        y = layer(xs, mask=mask)
    w, b = _np(layer.weight), _np(layer.bias)
    torch.testing.assert_close(y.detach(), torch.from_numpy(forward(x.numpy(), mask.numpy(), w, b)),
                               **TOL[torch.float64])
    y.backward(dy)
    dx, dw, db = backward(dy.numpy(), x.numpy(), mask.numpy(), w)
    torch.testing.assert_close(xs.grad, torch.from_numpy(dx), **TOL[torch.float64])
    torch.testing.assert_close(layer.weight.grad, torch.from_numpy(dw), **TOL[torch.float64])
    torch.testing.assert_close(layer.bias.grad, torch.from_numpy(db), **TOL[torch.float64])
    if rm0 is not None:
        want = ref.masked_instance_norm_running(rm0, rv0, x.numpy(), mask.numpy(), 0.1)
        torch.testing.assert_close(_np(layer.running_mean), want[0], **TOL[torch.float64])
        torch.testing.assert_close(_np(layer.running_var), want[1], **TOL[torch.float64])


def test_unbatched_instance_norm_takes_an_unbatched_mask() -> None:
    layer = normlab.InstanceNorm1d(3)
    x, mask = torch.randn(3, 8), torch.arange(8) < 5
    torch.testing.assert_close(layer(x, mask=mask), layer(x[:, :5].unsqueeze(0))[0].new_tensor(
        ref.masked_instance_norm_forward(x[None].numpy(), mask[None].numpy()))[0])


@pytest.mark.parametrize(("make", "message"), [b[1:] for b in BAD_MASKS[:-1]],
                         ids=[b[0] for b in BAD_MASKS[:-1]])
def test_bad_mask_is_refused_by_instance_and_group_norm(make, message) -> None:  # noqa: ANN001
    x = torch.randn(4, 6, 10)
    layer = normlab.InstanceNorm1d(6, track_running_stats=True)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    for call in (lambda m: layer(x, mask=m), lambda m: normlab.GroupNorm(2, 6)(x, mask=m),
                 lambda m: normlab.functional.group_norm(x, 3, mask=m)):
        with pytest.raises(ValueError, match=message):
            call(make(x))
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key


VARIANTS = [  # id, factory, whether training normalizes with the masked batch statistics
    ("renorm-warmup", lambda: normlab.BatchRenorm1d(6, rmax=1.0, dmax=0.0)),
    ("ghost-one-virtual-batch", lambda: normlab.GhostBatchNorm1d(6, virtual_batch_size=8)),
    ("inplace-abn-identity", lambda: normlab.InPlaceABN(6, activation="identity",
                                                        inplace=False)),
]


@pytest.mark.parametrize(("make",), [v[1:] for v in VARIANTS], ids=[v[0] for v in VARIANTS])
def test_variants_take_the_mask_like_batch_norm(make) -> None:  # noqa: ANN001
    """Where a variant computes what BatchNorm computes (renorm in its warm-up, ghost with
    one virtual batch, in-place ABN with the identity), the masked call equals masked
    BatchNorm: outputs, input gradients and running statistics."""
    x, mask = CASES[0].make(torch.float64)
    layer, plain = make().double(), normlab.BatchNorm1d(6).double()
    xs, xp = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    dy = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    (layer(xs * 1.0, mask=mask) * dy).sum().backward()
    (plain(xp * 1.0, mask=mask) * dy).sum().backward()
    torch.testing.assert_close(xs.grad, xp.grad)
    torch.testing.assert_close(layer.running_mean, plain.running_mean)
    torch.testing.assert_close(layer.running_var, plain.running_var)


def test_ghost_virtual_batches_each_use_their_valid_positions() -> None:
    x, mask = CASES[0].make(torch.float64)  # [4, 6, 10]
    layer = normlab.GhostBatchNorm1d(6, virtual_batch_size=2, running_update="sequential")
    layer = layer.double()
    plain = normlab.BatchNorm1d(6).double()
    y = layer(x, mask=mask)
    expected = torch.cat([plain(x[i:i + 2], mask=mask[i:i + 2]) for i in (0, 2)])
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(layer.running_var, plain.running_var)


def test_frozen_batch_norm_checks_and_ignores_the_mask() -> None:
    layer = normlab.FrozenBatchNorm1d(6)
    x, mask = CASES[0].make(torch.float32)
    assert torch.equal(layer(x, mask=mask), layer(x))
    with pytest.raises(ValueError, match="mask"):
        layer(x, mask=mask.float())
