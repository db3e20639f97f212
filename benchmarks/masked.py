"""Masked BatchNorm1d on padded sequences against normlab's unmasked call and the usual
torch recipe (select the valid positions, ``torch.nn.BatchNorm1d``, scatter back), one
training step each (forward + backward), interleaved in one run.

Default: ``[64, 256, 100]`` with lengths drawn from 40..100 (about 30% padding). The
figures printed are ratios: masked / unmasked (the cost of the mask) and recipe / masked
(the speedup over the recipe). Three repeats; runs that disagree by more than 10% are
flagged (a busy machine). Usage: ``python benchmarks/masked.py [--quick] [--threads N]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import normlab  # noqa: E402


def _steps(shape: tuple[int, int, int], seed: int = 0) -> dict[str, Callable[[], None]]:
    g = torch.Generator().manual_seed(seed)
    n, c, length = shape
    x = torch.randn(shape, generator=g)
    lengths = torch.randint(int(0.4 * length), length + 1, (n,), generator=g)
    mask = normlab.lengths_to_mask(lengths, length)
    ours, theirs = normlab.BatchNorm1d(c), torch.nn.BatchNorm1d(c)

    def unmasked() -> None:
        xg = x.clone().requires_grad_(True)
        ours(xg).sum().backward()

    def masked() -> None:
        xg = x.clone().requires_grad_(True)
        ours(xg, mask=mask).sum().backward()

    def recipe() -> None:
        xg = x.clone().requires_grad_(True)
        valid = theirs(xg.transpose(1, 2)[mask])  # [M, C]
        y = torch.zeros(n, length, c).index_put((mask,), valid)
        y.transpose(1, 2).sum().backward()

    return {"unmasked": unmasked, "masked": masked, "recipe": recipe}


def _medians(steps: dict[str, Callable[[], None]], reps: int) -> dict[str, float]:
    for step in steps.values():
        step(), step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small input, few reps (CI)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = (4, 8, 20) if args.quick else (64, 256, 100)
    reps = args.reps or (3 if args.quick else 15)
    steps = _steps(shape)
    runs = [_medians(steps, reps) for _ in range(1 if args.quick else 3)]
    cost = [r["masked"] / r["unmasked"] for r in runs]
    speedup = [r["recipe"] / r["masked"] for r in runs]
    print(f"masked BatchNorm1d {shape}, ~30% padding, train fwd+bwd, threads={args.threads}")
    for name, values in (("masked / unmasked", cost), ("recipe / masked", speedup)):
        spread = (max(values) - min(values)) / statistics.median(values)
        flag = "  (runs disagree: busy machine)" if spread > 0.10 else ""
        print(f"  {name:18s} {statistics.median(values):.2f}x  "
              + " ".join(f"{v:.2f}" for v in values) + flag)
    return {"cost": statistics.median(cost), "speedup": statistics.median(speedup)}


if __name__ == "__main__":
    main()
