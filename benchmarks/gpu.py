"""normlab against torch.nn on the GPU (or the CPU with ``--quick``), one run, one table.

For each layer and shape: torch eager and normlab, train (forward + backward) and eval,
medians of interleaved repetitions after warm-up (CUDA events on a GPU), the effective
bandwidth of normlab's step as a fraction of a device copy measured in the same run, the
peak memory of a training step (GPU), host syncs in a training step (GPU, counted with
``torch.cuda.set_sync_debug_mode``), and the largest output difference from torch.
Writes JSON (``--json``) and prints a Markdown table for ``docs/gpu.md``.

Usage: ``python benchmarks/gpu.py [--quick] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import normlab  # noqa: E402

# (name, builder(namespace, channels or features), shape, channels-last)
CASES: list[tuple[str, Callable[[object, int], nn.Module], tuple[int, ...], bool]] = [
    ("BatchNorm2d", lambda ns, c: ns.BatchNorm2d(c), (32, 64, 56, 56), False),
    ("BatchNorm2d", lambda ns, c: ns.BatchNorm2d(c), (64, 256, 14, 14), False),
    ("BatchNorm2d-CL", lambda ns, c: ns.BatchNorm2d(c), (32, 64, 56, 56), True),
    ("BatchNorm1d", lambda ns, c: ns.BatchNorm1d(c), (512, 1024), False),
    ("BatchNorm1d", lambda ns, c: ns.BatchNorm1d(c), (64, 256, 100), False),
    ("GroupNorm", lambda ns, c: ns.GroupNorm(min(32, c // 2), c), (32, 256, 28, 28), False),
    ("InstanceNorm2d", lambda ns, c: ns.InstanceNorm2d(c, affine=True), (32, 64, 56, 56), False),
    ("LayerNorm", lambda ns, c: ns.LayerNorm(c), (32, 128, 768), False),
    ("RMSNorm", lambda ns, c: ns.RMSNorm(c), (8, 512, 1024), False),
]
QUICK_SHAPES = {2: (8, 16), 3: (4, 8, 10), 4: (2, 8, 5, 5)}


def _features(name: str, shape: tuple[int, ...]) -> int:
    return shape[-1] if name in ("LayerNorm", "RMSNorm") else shape[1]


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
    import warnings

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
            torch.cuda.synchronize()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def run(quick: bool, device: torch.device, dtype: torch.dtype, reps: int) -> list[dict]:
    timer = _timer(device)
    bandwidth = _copy_bandwidth(device, quick)
    rows = []
    for name, build, shape, channels_last in CASES:
        if quick:
            shape = QUICK_SHAPES[min(len(shape), 4)] if name not in ("LayerNorm", "RMSNorm") \
                else (4, 6, 16)
        features = _features(name, shape)
        torch.manual_seed(0)
        x = torch.randn(shape, device=device, dtype=dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        ours = build(normlab, features).to(device, dtype)
        theirs = build(nn, features).to(device, dtype)
        for mode in ("train", "eval"):
            ours.train(mode == "train"), theirs.train(mode == "train")

            def step(layer: nn.Module, mode: str = mode, x: torch.Tensor = x) -> Callable[[], None]:
                def once() -> None:
                    if mode == "train":
                        xs = x.detach().requires_grad_(True)
                        layer(xs).sum().backward()
                    else:
                        with torch.no_grad():
                            layer(x)
                return once

            a, b = step(ours), step(theirs)
            for _ in range(3):
                a(), b()
            ta, tb = [], []
            for _ in range(reps):
                ta.append(timer(a))
                tb.append(timer(b))
            with torch.no_grad():
                difference = float((ours(x) - theirs(x)).abs().max())
            passes = 5 if mode == "train" else 2  # bytes moved at the minimum, in tensors
            moved = passes * x.numel() * x.element_size()
            peak = None
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                a()
                peak = torch.cuda.max_memory_allocated() / 2**20
            rows.append({
                "layer": name, "shape": list(shape), "mode": mode, "dtype": str(dtype),
                "torch_ms": 1e3 * statistics.median(tb),
                "normlab_ms": 1e3 * statistics.median(ta),
                "speedup": statistics.median(tb) / statistics.median(ta),
                "bandwidth_fraction": moved / statistics.median(ta) / bandwidth,
                "peak_mib": peak, "host_syncs": _syncs(a, device) if mode == "train" else None,
                "max_difference": difference,
            })
    return rows


def markdown(rows: list[dict], device: torch.device) -> str:
    lines = [f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; "
             f"torch {torch.__version__}", "",
             "| layer | shape | mode | torch ms | normlab ms | vs torch | % copy BW | syncs | "
             "max diff |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        syncs = "-" if r["host_syncs"] is None else str(r["host_syncs"])
        lines.append(
            f"| {r['layer']} | {'x'.join(map(str, r['shape']))} | {r['mode']} | "
            f"{r['torch_ms']:.3f} | {r['normlab_ms']:.3f} | {r['speedup']:.2f}x | "
            f"{100 * r['bandwidth_fraction']:.0f}% | {syncs} | {r['max_difference']:.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes on any device")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--reps", type=int, default=None)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = run(args.quick, device, getattr(torch, args.dtype), args.reps or (3 if args.quick
                                                                              else 25))
    print(markdown(rows, device))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
