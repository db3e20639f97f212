"""normlab against torch.nn on the GPU (or the CPU with ``--quick``), one run, one table.

For each layer, shape and dtype: torch eager and normlab per provider (``auto``: the
routing table's choice; ``triton``: the Triton provider for every call, where it runs),
train (forward + backward) and eval medians of interleaved repetitions after warm-up (CUDA
events on a GPU), the effective bandwidth of normlab's step as a fraction of a device copy
measured in the same run, the activation memory saved for backward (both sides, counted
with saved-tensor hooks), the peak memory of a training step (GPU), host syncs in a
training step (GPU, ``torch.cuda.set_sync_debug_mode``), the largest output difference
from torch, and whether a NaN batch left the running statistics alone. Fused layers
(BatchNormAct2d, InPlaceABN) are compared with torch's BatchNorm followed by the
activation. On a GPU it also captures a small conv net's training step in a CUDA graph.
Writes JSON (``--json``) and prints a Markdown table for ``docs/gpu.md``.

Usage: ``python benchmarks/gpu.py [--quick] [--json out.json] [--dtypes float32,bfloat16]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import normlab  # noqa: E402
from normlab import ops  # noqa: E402


def _torch_act(make: Callable[[int], nn.Module], act: nn.Module) -> Callable[[int], nn.Module]:
    return lambda c: nn.Sequential(make(c), act)


# (name, normlab builder, torch builder, shape, channels-last)
CASES: list[tuple[str, Callable[[int], nn.Module], Callable[[int], nn.Module],
                  tuple[int, ...], bool]] = [
    ("BatchNorm2d", normlab.BatchNorm2d, nn.BatchNorm2d, (32, 64, 112, 112), False),
    ("BatchNorm2d", normlab.BatchNorm2d, nn.BatchNorm2d, (32, 256, 56, 56), False),
    ("BatchNorm2d", normlab.BatchNorm2d, nn.BatchNorm2d, (32, 1024, 14, 14), False),
    ("BatchNorm2d-CL", normlab.BatchNorm2d, nn.BatchNorm2d, (32, 256, 56, 56), True),
    ("BatchNorm1d", normlab.BatchNorm1d, nn.BatchNorm1d, (4096, 1024), False),
    ("BatchNorm1d", normlab.BatchNorm1d, nn.BatchNorm1d, (64, 256, 512), False),
    ("BatchNormAct2d", lambda c: normlab.BatchNormAct2d(c, act="relu"),
     _torch_act(nn.BatchNorm2d, nn.ReLU()), (32, 256, 56, 56), False),
    ("InPlaceABN", lambda c: normlab.InPlaceABN(c, inplace=False),
     _torch_act(nn.BatchNorm2d, nn.LeakyReLU(0.01)), (32, 256, 56, 56), False),
    ("GroupNorm", lambda c: normlab.GroupNorm(min(32, c // 2), c),
     lambda c: nn.GroupNorm(min(32, c // 2), c), (32, 256, 56, 56), False),
    ("InstanceNorm2d", lambda c: normlab.InstanceNorm2d(c, affine=True),
     lambda c: nn.InstanceNorm2d(c, affine=True), (32, 64, 112, 112), False),
    ("LayerNorm", normlab.LayerNorm, nn.LayerNorm, (16, 2048, 4096), False),
    ("RMSNorm", normlab.RMSNorm, nn.RMSNorm, (16, 2048, 4096), False),
]
ROWWISE = ("LayerNorm", "RMSNorm")
QUICK_SHAPES = {2: (8, 16), 3: (4, 8, 10), 4: (2, 8, 5, 5)}


def _features(name: str, shape: tuple[int, ...]) -> int:
    return shape[-1] if name in ROWWISE else shape[1]


def _timer(device: torch.device) -> Callable[[Callable[[], None]], float]:
    if device.type == "cuda":
        def cuda_time(fn: Callable[[], None]) -> float:
            start = torch.cuda.Event(enable_timing=True)
            stop = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            return start.elapsed_time(stop) / 1e3
        return cuda_time

    def cpu_time(fn: Callable[[], None]) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    return cpu_time


def _copy_bandwidth(device: torch.device, quick: bool) -> float:
    """Bytes per second of a large device copy (read + write)."""
    n = (1 << 20) if quick else (1 << 28)
    a, b = torch.empty(n, device=device), torch.empty(n, device=device)
    timer = _timer(device)
    for _ in range(3):
        b.copy_(a)
    return 2 * a.numel() * a.element_size() / statistics.median(
        timer(lambda: b.copy_(a)) for _ in range(10))


def _syncs(step: Callable[[], None], device: torch.device) -> int | None:
    """Host syncs in one call of ``step`` (GPU only: counted by the sync debug mode)."""
    if device.type != "cuda":
        return None
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
            torch.cuda.synchronize()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def _saved_mib(layer: nn.Module, x: torch.Tensor) -> float:
    """Activation memory autograd keeps for backward in one training forward (distinct
    storages other than the parameters and buffers), MiB."""
    own = {t.untyped_storage().data_ptr() for t in (*layer.parameters(), *layer.buffers())}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    xs = x.detach().clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(xs * 1)  # a non-leaf input, as inside a network (in-place ABN needs one)
    del y
    return sum(seen.values()) / 2**20


def _nan_guard_holds(layer: nn.Module, x: torch.Tensor) -> bool | None:
    """A batch with a NaN in channel 0 leaves that channel's running statistics as they
    were (and finite); ``None`` for layers without running statistics."""
    buffers = getattr(layer, "running_mean", None), getattr(layer, "running_var", None)
    if buffers[0] is None or not layer.training:
        return None
    before = [b.clone() for b in buffers]
    bad = x.detach().clone()
    bad[(0,) * bad.dim()] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            layer(bad)
        normlab.running.non_finite_count(reset=True)
    held = all(bool(torch.isfinite(b).all()) and torch.equal(b[0], a[0])
               for b, a in zip(buffers, before, strict=True))
    with torch.no_grad():
        for b, a in zip(buffers, before, strict=True):
            b.copy_(a)
    return held


def _step(layer: nn.Module, x: torch.Tensor, mode: str, backend: str | None
          ) -> Callable[[], None]:
    def once() -> None:
        with ops.use_backend(backend) if backend else contextlib.nullcontext():
            if mode == "train":
                xs = x.detach().requires_grad_(True)
                layer(xs * 1).sum().backward()
            else:
                with torch.no_grad():
                    layer(x)
    return once


def _providers(device: torch.device) -> list[str]:
    """``auto``, plus ``triton`` where it runs on ``device``."""
    from normlab.ops import triton

    probe = torch.empty(1, device=device)
    return ["auto", "triton"] if device.type == "cuda" and triton.installed() and \
        triton.runs_on(probe) else ["auto"]


def run(quick: bool, device: torch.device, dtypes: list[torch.dtype], reps: int) -> list[dict]:
    timer = _timer(device)
    bandwidth = _copy_bandwidth(device, quick)
    rows = []
    for dtype in dtypes:
        for name, build, build_torch, shape, channels_last in CASES:
            if quick:
                shape = (4, 6, 16) if name in ROWWISE else QUICK_SHAPES[min(len(shape), 4)]
            features = _features(name, shape)
            torch.manual_seed(0)
            x = torch.randn(shape, device=device, dtype=dtype)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            theirs = build_torch(features).to(device, dtype)
            for provider in _providers(device):
                ours = build(features).to(device, dtype)
                for mode in ("train", "eval"):
                    ours.train(mode == "train"), theirs.train(mode == "train")
                    a = _step(ours, x, mode, provider if provider != "auto" else None)
                    b = _step(theirs, x, mode, None)
                    for _ in range(3):
                        a(), b()
                    ta, tb = [], []
                    for _ in range(reps):
                        ta.append(timer(a))
                        tb.append(timer(b))
                    with torch.no_grad(), ops.use_backend(provider):
                        difference = float((ours(x).float() - theirs(x).float()).abs().max())
                    passes = 5 if mode == "train" else 2  # the minimum, in tensors of x's size
                    moved = passes * x.numel() * x.element_size()
                    peak = saved = saved_torch = nan_ok = syncs = None
                    if mode == "train":
                        with ops.use_backend(provider):
                            saved = _saved_mib(ours, x)
                            nan_ok = _nan_guard_holds(ours, x)
                        saved_torch = _saved_mib(theirs, x)
                        syncs = _syncs(a, device)
                        if device.type == "cuda":
                            torch.cuda.reset_peak_memory_stats()
                            a()
                            peak = torch.cuda.max_memory_allocated() / 2**20
                    rows.append({
                        "layer": name, "shape": list(shape), "mode": mode,
                        "dtype": str(dtype).replace("torch.", ""), "provider": provider,
                        "torch_ms": 1e3 * statistics.median(tb),
                        "normlab_ms": 1e3 * statistics.median(ta),
                        "speedup": statistics.median(tb) / statistics.median(ta),
                        "bandwidth_fraction": moved / statistics.median(ta) / bandwidth,
                        "saved_mib": saved, "saved_mib_torch": saved_torch,
                        "peak_mib": peak, "host_syncs": syncs, "nan_guard": nan_ok,
                        "max_difference": difference,
                    })
    return rows


def graph_capture(device: torch.device) -> str:
    """Capture a small conv net's training step (normlab BatchNorm2d and BatchNormAct2d)
    in a CUDA graph and replay it: "ok", or the error. GPU only."""
    if device.type != "cuda":
        return "skipped (no GPU)"
    try:
        net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), normlab.BatchNormAct2d(16),
                            nn.Conv2d(16, 16, 3, padding=1), normlab.BatchNorm2d(16)).to(device)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        x = torch.randn(8, 3, 16, 16, device=device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up outside the capture, as torch's docs ask
                opt.zero_grad(set_to_none=True)
                net(x).square().mean().backward()
                opt.step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        opt.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            loss = net(x).square().mean()
            loss.backward()
            opt.step()
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        return "ok" if torch.isfinite(loss) else "replayed, loss not finite"
    except Exception as exc:  # the table reports the failure, the run goes on
        return f"failed: {type(exc).__name__}: {exc}"[:300]


def markdown(rows: list[dict], device: torch.device, capture: str) -> str:
    lines = [f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; "
             f"torch {torch.__version__}; CUDA-graph capture of a training step: {capture}", "",
             "| layer | shape | dtype | provider | mode | torch ms | normlab ms | vs torch | "
             "% copy BW | saved MiB (torch) | syncs | NaN guard | max diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def opt(value: object, fmt: str = "{}") -> str:
        return "-" if value is None else fmt.format(value)

    for r in rows:
        saved = "-" if r["saved_mib"] is None else (
            f"{r['saved_mib']:.3g} ({r['saved_mib_torch']:.3g})")
        lines.append(
            f"| {r['layer']} | {'x'.join(map(str, r['shape']))} | {r['dtype']} | "
            f"{r['provider']} | {r['mode']} | {r['torch_ms']:.3f} | {r['normlab_ms']:.3f} | "
            f"{r['speedup']:.2f}x | {100 * r['bandwidth_fraction']:.0f}% | {saved} | "
            f"{opt(r['host_syncs'])} | {opt(r['nan_guard'])} | {r['max_difference']:.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes on any device")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--dtypes", default="float32,bfloat16",
                        help="comma-separated: float32, bfloat16, float16")
    parser.add_argument("--reps", type=int, default=None)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = [getattr(torch, name.strip()) for name in args.dtypes.split(",")]
    rows = run(args.quick, device, dtypes, args.reps or (3 if args.quick else 20))
    capture = graph_capture(device)
    print(markdown(rows, device, capture))
    if args.json is not None:
        args.json.write_text(json.dumps({"device": str(device), "graph_capture": capture,
                                         "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
