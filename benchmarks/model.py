"""What swapping the norm layers does to a whole training step, measured in one run.

A stack of ``Conv3x3 -> norm -> ReLU`` blocks (the convolutions are torch's in every
column), one training step (forward, a mean-square loss, backward) with:

- ``torch``: ``torch.nn.BatchNorm2d`` then ``torch.nn.ReLU``;
- ``normlab``: ``normlab.BatchNorm2d`` then ``torch.nn.ReLU`` (the drop-in swap);
- ``normlab-act``: ``normlab.BatchNormAct2d(act="relu")`` (BatchNorm and ReLU fused).

Interleaved runs, medians after warm-up, speedup of each against ``torch`` measured in the
same run. The norm is a minority of the step (the convolutions dominate), so this shows
how much of the layer-level speedup a model keeps.

Usage: ``python benchmarks/model.py [--quick] [--threads N] [--reps R] [--blocks B]``.
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

KINDS = ("torch", "normlab", "normlab-act")


def conv_stack(kind: str, blocks: int, channels: int) -> nn.Sequential:
    """``blocks`` x (Conv3x3 -> norm -> ReLU) with the norm of ``kind`` (see module doc)."""
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers.append(nn.Conv2d(channels, channels, 3, padding=1, bias=False))
        if kind == "torch":
            layers += [nn.BatchNorm2d(channels), nn.ReLU()]
        elif kind == "normlab":
            layers += [normlab.BatchNorm2d(channels), nn.ReLU()]
        else:
            layers.append(normlab.BatchNormAct2d(channels, act="relu"))
    return nn.Sequential(*layers)


def _same_convolutions(models: dict[str, nn.Sequential]) -> None:
    reference = [m for m in models["torch"] if isinstance(m, nn.Conv2d)]
    for model in models.values():
        convs = [m for m in model if isinstance(m, nn.Conv2d)]
        for conv, ref in zip(convs, reference, strict=True):
            conv.load_state_dict(ref.state_dict())


def _step(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        model.zero_grad(set_to_none=True)
        model(x).square().mean().backward()

    return run


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Runs the comparison; returns each column's speedup against ``torch`` and, under
    ``"difference"``, the largest output difference from ``torch``'s column."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small input, few reps (CI)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--allocator", choices=("steady", "system"), default="steady",
                        help="as in `normlab bench`")
    args = parser.parse_args(argv)
    from normlab.bench import steady_allocator

    allocator = steady_allocator() if args.allocator == "steady" else None
    torch.set_num_threads(args.threads)
    reps = args.reps or (3 if args.quick else 9)
    shape = (2, 16, 16, 16) if args.quick else (16, 64, 56, 56)
    torch.manual_seed(0)
    models = {kind: conv_stack(kind, args.blocks, shape[1]) for kind in KINDS}
    _same_convolutions(models)
    x = torch.randn(shape)
    with torch.no_grad():  # the same function in every column (train mode: batch statistics)
        outputs = {kind: model(x) for kind, model in models.items()}
    difference = max((out - outputs["torch"]).abs().max().item() for out in outputs.values())
    steps = {kind: _step(model, x) for kind, model in models.items()}
    for run in steps.values():
        run(), run()
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for _ in range(reps):
        for kind, run in steps.items():
            start = time.perf_counter()
            run()
            times[kind].append(time.perf_counter() - start)
    medians = {kind: statistics.median(t) for kind, t in times.items()}
    print(f"threads={args.threads} reps={reps} torch={torch.__version__} "
          f"allocator={allocator or 'system defaults'}")
    print(f"{args.blocks} x (Conv3x3 -> norm -> ReLU), input {shape}, one training step "
          f"(outputs agree within {difference:.1e}):")
    speedups = {}
    for kind, median in medians.items():
        speedups[kind] = medians["torch"] / median
        print(f"  {kind:12s} {median * 1e3:9.1f} ms   {speedups[kind]:.3f}x torch")
    return {**speedups, "difference": difference}


if __name__ == "__main__":
    main()
