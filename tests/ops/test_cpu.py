"""The CPU provider's implementations of the ops (``normlab.ops._library`` on CPU tensors)
against the composite provider, op by op.

One table of ``[N, G, K, S]`` views (per-sample and per-channel statistics, contiguous,
channels-last, strided and empty) drives forward, backward, eval and the split-phase
pieces; then the torch.library registration (opcheck, torch.compile without graph
break), determinism, backend selection and the on-disk compile cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import normlab
from normlab import ops
from normlab.ops import _library as kernels
from normlab.ops import composite

cpu = pytest.importorskip("normlab.ops.cpu", reason="numba is not installed")
from normlab.ops.cpu import layouts, runtime  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class View:
    """An ``x4 [N, G, K, S]`` input: ``per_sample`` statistics (else per ``G``)."""

    id: str
    shape: tuple[int, int, int, int]
    per_sample: bool
    center: bool = True
    # or "channels_last" ([N, S, G, K] in memory), "strided", "transposed" ([S, K, G, N])
    layout: str = "contiguous"

    def make(self, dtype: torch.dtype, seed: int = 0, offset: float = 0.0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        n, groups, k, s = self.shape
        if self.layout == "channels_last":
            base = torch.randn(n, s, groups, k, generator=g, dtype=torch.float64)
            x = base.permute(0, 2, 3, 1)
        elif self.layout == "transposed":
            x = torch.randn(s, k, groups, n, generator=g, dtype=torch.float64).permute(3, 2, 1, 0)
        elif self.layout == "strided":
            x = torch.randn(n, groups, k, 2 * s, generator=g, dtype=torch.float64)[..., ::2]
        else:
            x = torch.randn(self.shape, generator=g, dtype=torch.float64)
        return (x * 2 + offset).to(dtype)


VIEWS = [
    View("layer_norm", (6, 1, 12, 1), True),
    View("rms_norm", (6, 1, 12, 1), True, center=False),
    View("group_norm", (3, 2, 3, 5), True),
    View("instance_norm", (3, 4, 1, 7), True),  # rows of <= PLANES_MAX_ROW: planes kernels
    View("instance_norm-long-rows", (3, 4, 1, 100), True),  # rows kernels
    View("instance_norm-large", (16, 64, 1, 49), True),  # planes, several threads and tasks
    View("group_norm-channels-last", (3, 2, 3, 5), True, layout="channels_last"),
    View("batch_norm", (4, 3, 1, 10), False),
    View("batch_norm-NC", (8, 5, 1, 1), False),
    View("batch_norm-NC-transposed", (8, 5, 1, 1), False, layout="transposed"),
    View("batch_norm-NC-large-transposed", (600, 64, 1, 1), False, layout="transposed"),
    View("batch_norm-channels-last", (4, 3, 1, 10), False, layout="channels_last"),
    View("batch_norm-strided", (4, 3, 1, 10), False, layout="strided"),
    View("batch_norm-uncentered", (4, 3, 1, 10), False, center=False),
    # At least PLANES_MIN_CHANNELS channels: one channel per task (the "planes" kernels).
    View("batch_norm-planes", (5, 16, 1, 7), False),
    View("batch_norm-planes-uncentered", (5, 16, 1, 7), False, center=False),
    # Large enough to run on several threads and, for the cols layout, several pieces.
    View("batch_norm-large", (16, 8, 1, 300), False),
    View("batch_norm-large-channels-last", (16, 8, 1, 300), False, layout="channels_last"),
    View("batch_norm-large-planes", (16, 32, 1, 300), False),
    View("layer_norm-large", (96, 1, 512, 1), True),
    View("group_norm-large", (8, 4, 4, 300), True),
    View("batch_norm-empty", (0, 3, 1, 10), False),
    View("layer_norm-empty", (0, 1, 12, 1), True),
]
CHANNEL_VIEWS = [v for v in VIEWS if not v.per_sample]
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def _tol(dtype: torch.dtype) -> dict[str, float]:
    return {
        torch.float64: {"atol": 1e-10, "rtol": 1e-10},
        torch.float32: {"atol": 2e-5, "rtol": 2e-5},
        torch.bfloat16: {"atol": 3e-2, "rtol": 2e-2},
    }[dtype]


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, **_tol(dtype), equal_nan=True)


def _params(view: View, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    features = view.shape[1] * view.shape[2]
    weight = torch.randn(features, generator=g, dtype=torch.float64) + 1
    return weight.to(dtype), torch.randn(features, generator=g, dtype=torch.float64).to(dtype)


def _leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def _train(module, view: View, x, w, b, dy):  # noqa: ANN001, ANN202
    x, w, b = _leaves(x, w, b)
    y, mean, var = module.normalize(
        x, w, b, per_sample=view.per_sample, center=view.center, eps=1e-5
    )
    y.backward(dy)
    return y, mean, var, x.grad, w.grad, b.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("view", VIEWS, ids=lambda v: v.id)
def test_train_forward_backward_match_composite(view: View, dtype: torch.dtype) -> None:
    x = view.make(dtype)
    w, b = _params(view, dtype)
    dy = view.make(dtype, seed=2)
    got = _train(kernels, view, x, w, b, dy)
    want = _train(composite, view, x, w, b, dy)
    for actual, expected in zip(got, want, strict=True):
        _close(actual, expected, dtype)
    # The output keeps the input's memory layout (channels-last stays channels-last).
    assert got[0].stride() == torch.empty_like(x).stride()


@pytest.mark.parametrize("view", CHANNEL_VIEWS, ids=lambda v: v.id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_eval_forward_backward_match_composite(view: View, dtype: torch.dtype) -> None:
    x = view.make(dtype)
    w, b = _params(view, dtype)
    groups = view.shape[1]
    mean = torch.linspace(-1, 1, groups, dtype=dtype)
    var = torch.linspace(0.5, 2, groups, dtype=dtype)
    dy = view.make(dtype, seed=2)
    results = []
    for module in (kernels, composite):
        xl, wl, bl = _leaves(x, w, b)
        y = module.normalize_with_stats(xl, mean, var, wl, bl, eps=1e-5)
        y.backward(dy)
        results.append((y, xl.grad, wl.grad, bl.grad))
    for actual, expected in zip(*results, strict=True):
        _close(actual, expected, dtype)


def test_eval_gradient_of_the_statistics_uses_composite_code() -> None:
    x = torch.randn(4, 3, 1, 5, dtype=torch.float64)
    stats = (torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5)
    grads = []
    for module in (kernels, composite):
        mean, var = _leaves(*stats)
        module.normalize_with_stats(x, mean, var, None, None, eps=1e-5).square().sum().backward()
        grads.append((mean.grad, var.grad))
    for actual, expected in zip(*grads, strict=True):
        torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("view", [v for v in VIEWS if v.shape[2] == 1 or v.per_sample],
                         ids=lambda v: v.id)
def test_split_phase_pieces_match_composite(view: View) -> None:
    dtype = torch.float64
    x = view.make(dtype)
    got = kernels.moments(x, per_sample=view.per_sample, center=view.center)
    want = composite.moments(x, per_sample=view.per_sample, center=view.center)
    for actual, expected in zip(got, want, strict=True):
        _close(actual, expected, dtype)
    if view.per_sample or x.numel() == 0:
        return
    mean, var = want
    rstd = torch.rsqrt(var + 1e-5)
    dy = view.make(dtype, seed=2)
    w = _params(view, dtype)[0]
    sums = kernels.backward_reduce(dy, x, mean, rstd)
    for actual, expected in zip(sums, composite.backward_reduce(dy, x, mean, rstd), strict=True):
        _close(actual, expected, dtype)
    count = x.numel() // x.shape[1]
    _close(
        kernels.backward_apply(dy, x, mean, rstd, w, *sums, count),
        composite.backward_apply(dy, x, mean, rstd, w, *sums, count),
        dtype,
    )


def test_variance_survives_a_large_mean() -> None:
    """float32 data around 1e4 with unit noise: E[x^2] - E[x]^2 would lose it all."""
    chosen = ("layer_norm", "batch_norm", "batch_norm-NC-transposed", "batch_norm-planes")
    for view in (v for v in VIEWS if v.id in chosen):
        x = view.make(torch.float32, offset=1e4)
        _, _, var = kernels.normalize(x, None, None, per_sample=view.per_sample, center=True, eps=0)
        dims = (2, 3) if view.per_sample else (0, 2, 3)
        exact = x.double().var(dim=dims, correction=0)
        torch.testing.assert_close(var.double(), exact, rtol=1e-4, atol=0)


@pytest.mark.parametrize("channels", [3, 16], ids=["plane-parallel", "planes"])
def test_nan_propagates_to_the_statistics(channels: int) -> None:
    x = torch.randn(4, channels, 1, 6)
    x[1, 2, 0, 3] = float("nan")
    y, mean, var = kernels.normalize(x, None, None, per_sample=False, center=True, eps=1e-5)
    assert mean[2].isnan() and var[2].isnan() and y[:, 2].isnan().all()
    assert not (mean[:2].isnan().any() or y[:, :2].isnan().any())


def test_planes_route_is_taken_from_the_minimum_channel_count() -> None:
    """The planes kernels run (and are what the table above tested) from
    PLANES_MIN_CHANNELS channels of contiguous NCHW input."""
    c = layouts.PLANES_MIN_CHANNELS
    assert layouts._by_planes(torch.randn(2, c, 1, 5), cols=False)
    assert not layouts._by_planes(torch.randn(2, c - 1, 1, 5), cols=False)


def test_double_backward_falls_back_to_composite() -> None:
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def fn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return normlab.functional.batch_norm(x, None, None, w, None, True, backend="cpu")

    assert torch.autograd.gradgradcheck(fn, (x, w), atol=1e-5)


def test_non_cpu_tensors_are_not_supported() -> None:
    meta = torch.empty(2, 3, device="meta")
    assert not cpu.supports(meta)
    assert not cpu.supports(torch.zeros(3, dtype=torch.int64))
    assert ops.pieces(meta, "cpu") is ops.COMPOSITE
    assert ops.pieces(torch.zeros(2, 3), "auto") is cpu.PIECES


# --------------------------------------------------------------------------------------
# torch.library registration


def _opcheck_samples() -> list[tuple[object, tuple, dict]]:
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int, grad: bool = False) -> torch.Tensor:
        return torch.randn(shape, generator=g, dtype=torch.float64).requires_grad_(grad)

    x_nchw = rand(3, 4, 1, 5, grad=True)
    x_cl = rand(3, 5, 4, 1).permute(0, 2, 3, 1).detach().requires_grad_(True)
    w, b = rand(4, grad=True), rand(4, grad=True)
    mean, var = rand(4), rand(4).abs() + 0.5
    rstd = torch.rsqrt(var)
    dy = rand(3, 4, 1, 5)
    nl = torch.ops.normlab
    return [
        (nl.normalize, (x_nchw, w, b, False, True, 1e-5), {}),
        (nl.normalize, (x_cl, w, None, False, True, 1e-5), {}),
        (nl.normalize, (rand(6, 2, 2, 3, grad=True), w, b, True, True, 1e-5), {}),
        (nl.normalize, (rand(6, 1, 4, 1, grad=True), w, None, True, False, 1e-5), {}),
        (nl.normalize_backward, (dy, x_nchw.detach(), mean, rstd, w.detach(), False, True), {}),
        (nl.normalize_with_stats, (x_nchw, mean, var, w, b, 1e-5), {}),
        (nl.normalize_with_stats, (x_cl, mean, var, None, b, 1e-5), {}),
        (nl.moments, (x_nchw.detach(), False, True), {}),
        (nl.moments, (rand(6, 2, 2, 3), True, False), {}),
        (nl.backward_reduce, (dy, x_nchw.detach(), mean, rstd), {}),
        (nl.backward_apply, (dy, x_nchw.detach(), mean, rstd, w.detach(), mean, var, 15), {}),
    ]


@pytest.mark.parametrize("index", range(len(_opcheck_samples())))
def test_opcheck(index: int) -> None:
    op, args, kwargs = _opcheck_samples()[index]
    torch.library.opcheck(op, args, kwargs)


def _small_model() -> nn.Module:
    return nn.Sequential(
        normlab.BatchNorm2d(4),
        normlab.GroupNorm(2, 4),
        normlab.LayerNorm(5),
        normlab.RMSNorm(5),
        normlab.GroupNormAct(2, 4, act="leaky_relu"),
        normlab.LayerNormAct(5),
        normlab.BatchNormAct2d(4),
    )


def test_providers_are_imported_with_the_package() -> None:
    # Importing a provider lazily inside torch.compile's tracing would break the graph.
    assert "cpu" in ops.available() and ops.routes("cpu", "train")[0].name == "cpu"


@pytest.mark.parametrize("backend", ["cpu", "auto", None])
def test_compile_fullgraph_has_no_graph_break(
    backend: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "cpu": the kernels' ops; "auto" also routes some cases to torch's native kernels;
    # None: no environment variable (the layers' shortcuts ask os.environ's store).
    if backend is None:
        monkeypatch.delenv(ops.ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(ops.ENV_VAR, backend)
    torch.manual_seed(0)
    model, reference = _small_model(), _small_model()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(3, 4, 6, 5)
    graphs: list[torch.fx.GraphModule] = []

    def capture(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    compiled = torch.compile(model, fullgraph=True, backend=capture)
    for train in (True, False):
        model.train(train), reference.train(train)
        xa, xb = _leaves(x, x)
        ya, yb = compiled(xa), reference(xb)
        torch.testing.assert_close(ya, yb)
        ya.square().sum().backward()
        yb.square().sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, atol=1e-4, rtol=1e-4)
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4)
    for a, b in zip(model.buffers(), reference.buffers(), strict=True):
        torch.testing.assert_close(a, b)
    code = "".join(gm.code for gm in graphs)
    assert len(graphs) == 2, len(graphs)  # one graph per mode (train, eval)
    assert "torch.ops.normlab.normalize(" in code  # training BatchNorm: the kernels' op
    if backend == "cpu":  # eval BatchNorm on the kernels too
        assert "torch.ops.normlab.normalize_with_stats(" in code
    else:  # "auto": eval BatchNorm on torch's native kernel
        assert "torch.batch_norm(" in code and "normalize_with_stats" not in code


# --------------------------------------------------------------------------------------
# Determinism, threads, selection, cache


@pytest.mark.parametrize("view", [v for v in VIEWS if "large" in v.id], ids=lambda v: v.id)
def test_bitwise_deterministic(view: View) -> None:
    x = view.make(torch.float32)
    w, b = _params(view, torch.float32)
    dy = view.make(torch.float32, seed=2)
    first = _train(kernels, view, x, w, b, dy)
    for _ in range(2):
        again = _train(kernels, view, x, w, b, dy)
        for a, b_ in zip(first, again, strict=True):
            assert torch.equal(a, b_)


def test_threads_follow_torch() -> None:
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert cpu.sync_threads(10**9) == 1
        torch.set_num_threads(2)
        assert cpu.sync_threads(10**9) == min(2, runtime.numba.config.NUMBA_NUM_THREADS)
        assert cpu.sync_threads(10) == 1  # tiny inputs stay on the calling thread
        assert runtime.numba.get_num_threads() == 1
        torch.set_num_threads(2)
        assert cpu.sync_threads(10**9) == runtime.numba.get_num_threads()
    finally:
        torch.set_num_threads(before)


_PROBE = """
import json, torch
from normlab.ops import _library, cpu
from normlab.ops.cpu import kernels as K
x = torch.randn(6, 1, 12, 1)
with torch.no_grad():
    _library.normalize(x, None, None, per_sample=True, center=True, eps=1e-5)
stats = K.rows_forward.stats
print(json.dumps({"hits": sum(stats.cache_hits.values()),
                  "misses": sum(stats.cache_misses.values()), "dir": cpu.cache_dir(),
                  "path": K.rows_forward._cache._cache_path}))
"""


def test_second_process_loads_kernels_from_the_disk_cache() -> None:
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")

    def probe() -> dict:
        out = subprocess.run(
            [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True
        )
        return json.loads(out.stdout.strip().splitlines()[-1])

    first = probe()  # compiles, unless an earlier run already cached the kernel
    second = probe()
    assert first["hits"] + first["misses"] == 1
    assert second == {"hits": 1, "misses": 0, "dir": first["dir"], "path": first["path"]}
    assert Path(first["path"]).is_relative_to(first["dir"])
    # The default cache lives in the user's cache dir, not next to the installed sources.
    assert Path(first["dir"]).parts[-2:] == ("normlab", "numba")
    assert list(Path(first["dir"]).rglob("*rows_forward*.nbi"))


def test_numba_pool_started_passive_without_changing_the_environment() -> None:
    # The policy applies to numba's OpenMP runtime only: the environment torch and child
    # processes see is unchanged (unless the user set OMP_WAIT_POLICY, which then wins).
    import os

    if "OMP_WAIT_POLICY" in os.environ:
        assert cpu.numba_wait_policy() == os.environ["OMP_WAIT_POLICY"]
    else:
        expected = os.environ.get(cpu.WAIT_POLICY_VAR, "PASSIVE")
        assert cpu.numba_wait_policy() == ("default" if expected == "keep" else expected)
        assert "OMP_WAIT_POLICY" not in os.environ


_IMPORT_PROBE = """
import json, os
before = dict(os.environ)
import numba, torch
numba_cache = numba.config.CACHE_DIR
import normlab
from normlab.ops.cpu import runtime
imported = {"environ": dict(os.environ) == before, "pool": runtime._pool_started,
            "numba_cache": numba.config.CACHE_DIR == numba_cache}
normlab.BatchNorm2d(4)(torch.randn(8, 4, 16, 16))
ran = {"environ": dict(os.environ) == before, "pool": runtime._pool_started}
pid = os.fork()
if pid == 0:  # a child of a process whose pool runs: the composite backend
    os._exit(0 if normlab.ops.pieces(torch.randn(2, 2)).name == "torch" else 3)
print(json.dumps({"imported": imported, "ran": ran, "child": os.waitpid(pid, 0)[1]}))
"""


def test_import_leaves_the_process_as_it_was() -> None:
    """``import normlab`` changes neither ``os.environ`` nor numba's config (a user's own
    numba functions cache where they did), and starts numba's thread pool only when a
    kernel first runs; a kernel run leaves the environment alone too."""
    run = subprocess.run([sys.executable, "-c", _IMPORT_PROBE], capture_output=True,
                         text=True, check=True)
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report == {
        "imported": {"environ": True, "pool": False, "numba_cache": True},
        "ran": {"environ": True, "pool": True},
        "child": 0,
    }


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_child_forked_before_any_kernel_runs_the_kernels() -> None:
    """A process forked before its parent started numba's pool (the pool starts with the
    first kernel) has a pool of its own to start: it runs the kernels, silently."""
    code = (
        "import os, warnings, torch, normlab\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    with warnings.catch_warnings():\n"
        "        warnings.simplefilter('error')\n"
        "        normlab.BatchNorm2d(4)(torch.randn(8, 4, 16, 16))\n"
        "        ok = normlab.ops.pieces(torch.randn(2, 2)).name != 'torch'\n"
        "    os._exit(0 if ok else 3)\n"
        "print(os.waitpid(pid, 0)[1])\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=300)
    assert run.stdout.strip().splitlines()[-1] == "0", run.stderr[-2000:]


DIRECT_CASES = [  # functional call on "auto", torch's own function, "auto" takes torch's
    ("layer_norm", lambda f, x, w, b: f.layer_norm(x, (5, 6), w, b), (3, 4, 5, 6), (5, 6), True),
    ("group_norm", lambda f, x, w, b: f.group_norm(x, 2, w, b), (3, 4, 5, 6), (4,), True),
    ("group_norm-instance", lambda f, x, w, b: f.group_norm(x, 4, w, b), (3, 4, 5, 6), (4,),
     False),
    ("batch_norm-eval", lambda f, x, w, b: f.batch_norm(x, w * 0.1, b.abs() + 0.5, w, b),
     (3, 4, 5, 6), (4,), True),
]


@pytest.mark.parametrize(("fn", "shape", "pshape", "native"), [c[1:] for c in DIRECT_CASES],
                         ids=[c[0] for c in DIRECT_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_auto_matches_torch_natives_and_the_kernels(
    fn, shape, pshape, native, dtype  # noqa: ANN001
) -> None:
    """LayerNorm, GroupNorm and eval BatchNorm on "auto": torch's native function itself
    (bitwise), called on the input as it comes; the kernels where it declines (bfloat16
    input with float32 parameters, one channel per group), with the same results."""
    x = (torch.randn(shape) * 3 + 1).to(dtype)
    w, b = torch.randn(pshape), torch.randn(pshape)
    with ops.use_backend("auto"):
        got = fn(normlab.functional, x, w, b)
    with ops.use_backend("cpu"):
        kernels = fn(normlab.functional, x, w, b)
    torch.testing.assert_close(got, kernels, rtol=1e-4, atol=1e-5)
    if native and dtype == torch.float32:
        assert torch.equal(got, fn(nn.functional, x, w, b))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_falls_back_to_torch_backend() -> None:
    """numba's GNU OpenMP pool is not fork-safe: a forked child that used the kernels
    would be terminated; instead it computes on the composite backend, and says so once."""
    x = torch.randn(8, 4, 16, 16)
    parent = normlab.BatchNorm2d(4)(x)  # the parent has used the kernels' thread pool
    assert ops.pieces(x).name != "torch"
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        status = 1
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                child = normlab.BatchNorm2d(4)(x)
                again = normlab.BatchNorm2d(4)(x)
            said = [str(w.message) for w in caught]
            ok = (
                ops.pieces(x).name == "torch"
                and torch.allclose(child, parent, atol=1e-5)
                and torch.equal(child, again)
                and said == [cpu.FORKED_CHILD_WARNING]  # once, not per call
            )
            status = 0 if ok else 2
        finally:
            os.write(write, bytes([status]))
            os._exit(0)
    os.close(write)
    _, wait_status = os.waitpid(pid, 0)
    result = os.read(read, 1)
    os.close(read)
    assert os.WIFEXITED(wait_status) and result == b"\x00", (wait_status, result)


def test_first_compilation_is_announced_once_on_stderr(tmp_path: Path) -> None:
    """An empty kernel cache: one line on stderr before the first kernel compiles; a second
    process with the cache says nothing."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    code = ("import torch, normlab\n"
            "normlab.LayerNorm(8, elementwise_affine=False)(torch.randn(4, 8))\n"
            "normlab.LayerNorm(8, elementwise_affine=False)(torch.randn(4, 8))\n")
    env["NORMLAB_BACKEND"] = "cpu"
    runs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                           text=True, check=True, timeout=600) for _ in range(2)]
    said = [[line for line in r.stderr.splitlines() if line.startswith("normlab: compiling")]
            for r in runs]
    assert len(said[0]) == 1 and str(tmp_path) in said[0][0]
    assert said[1] == []
