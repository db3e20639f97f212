"""What one layer call costs on a small tensor, where Python, not memory, sets the time.

For each layer, a forward (eval and train) and a training step (forward + backward) on
``[32, 100]``-sized input, normlab and its ``torch.nn`` twin interleaved, medians of many
calls after warm-up; the figure printed is normlab's time over torch's (``2.0x`` = twice
torch's cost). Repeated three times: a spread over 10% between the runs is flagged, as
the machine was busy.

Usage: ``python benchmarks/call_cost.py [--threads N] [--calls C]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import normlab  # noqa: E402

# (name, builder(module namespace), input shape)
CASES: tuple[tuple[str, Callable[[object], nn.Module], tuple[int, ...]], ...] = (
    ("BatchNorm1d", lambda ns: ns.BatchNorm1d(100), (32, 100)),
    ("InstanceNorm1d", lambda ns: ns.InstanceNorm1d(100, affine=True), (32, 100, 4)),
    ("GroupNorm", lambda ns: ns.GroupNorm(4, 100), (32, 100)),
    ("LayerNorm", lambda ns: ns.LayerNorm(100), (32, 100)),
    ("RMSNorm", lambda ns: ns.RMSNorm(100), (32, 100)),
)
MODES = ("eval", "train", "train+backward")


def _call(module: nn.Module, x: torch.Tensor, mode: str) -> Callable[[], None]:
    module.train(mode != "eval")
    if mode == "train+backward":
        xg = x.clone().requires_grad_(True)

        def step() -> None:
            module(xg).sum().backward()

        return step
    if mode == "train":

        def forward() -> None:
            with torch.no_grad():
                module(x)

        return forward

    def evaluate() -> None:
        with torch.no_grad():
            module(x)

    return evaluate


def _ratio(ours: Callable[[], None], theirs: Callable[[], None], calls: int) -> float:
    for _ in range(50):
        ours(), theirs()
    a, b = [], []
    for _ in range(calls):
        start = time.perf_counter()
        ours()
        a.append(time.perf_counter() - start)
        start = time.perf_counter()
        theirs()
        b.append(time.perf_counter() - start)
    return statistics.median(a) / statistics.median(b)


def main(argv: list[str] | None = None) -> dict[tuple[str, str], float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"normlab time / torch time per call, threads={args.threads}, "
          f"median of {args.calls} calls, {args.runs} runs")
    print(f"{'layer':16s} {'mode':16s} {'ratio':>7s}  runs")
    result = {}
    for name, build, shape in CASES:
        x = torch.randn(shape)
        for mode in MODES:
            ours = _call(build(normlab), x, mode)
            theirs = _call(build(nn), x, mode)
            runs = [_ratio(ours, theirs, args.calls) for _ in range(args.runs)]
            median = statistics.median(runs)
            spread = (max(runs) - min(runs)) / median
            flag = "  (runs disagree: busy machine)" if spread > 0.10 else ""
            print(f"{name:16s} {mode:16s} {median:6.2f}x  "
                  + " ".join(f"{r:.2f}" for r in runs) + flag)
            result[(name, mode)] = median
    return result


if __name__ == "__main__":
    main()
