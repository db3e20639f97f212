"""BatchNorm variants against torch eager, measured in one run.

1. Norm + activation layers: ``normlab.nn.BatchNormAct2d``, ``GroupNormAct(32, C)`` (ResNet
   stage shapes) and ``LayerNormAct`` (transformer shapes) with ``relu`` (fused into the
   kernels) and ``gelu`` (the norm's kernels, then torch's gelu) train forward+backward vs
   the torch eager norm then the activation, interleaved A/B, median of ``--reps`` after
   warm-up; ratio per shape and geomean, plus a bandwidth reference (a large ``copy_``)
   taken in the same run.
2. InPlaceABN memory: a 10-block ``Conv3x3 -> norm -> LeakyReLU`` stack, one training step;
   the bytes of the distinct tensors autograd saves for backward (counted by
   ``torch.autograd.graph.saved_tensors_hooks``, parameters excluded) are the activation
   memory held at the peak, between forward and backward. Eager Conv-BN-LeakyReLU vs
   Conv-InPlaceABN, with the largest gradient difference between the two.

Usage: ``python benchmarks/variants.py [--quick] [--threads N] [--reps R]``.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

# numba's and torch's OpenMP runtimes are separate; with the default active wait, each
# one's idle threads spin and steal the 2 cores from the other (it slowed *both* sides
# 2-3x here). Passive waiting, set before either runtime starts, is the fair setting.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from normlab.nn.act import BatchNormAct2d, GroupNormAct, LayerNormAct  # noqa: E402,I001
from normlab.nn.inplace_abn import InPlaceABN  # noqa: E402

RESNET_SHAPES = [(32, 64, 56, 56), (16, 128, 28, 28), (64, 256, 14, 14), (128, 512, 7, 7)]
QUICK_SHAPES = [(8, 32, 28, 28), (16, 64, 14, 14)]
TRANSFORMER_SHAPES = [(32, 128, 768), (8, 512, 1024)]


def _median_pair(
    a: Callable[[], object], b: Callable[[], object], reps: int
) -> tuple[float, float]:
    """Interleaved A/B timing: medians (seconds) after two warm-up calls of each."""
    for _ in range(2):
        a(), b()
    ta, tb = [], []
    for _ in range(reps):
        for fn, acc in ((a, ta), (b, tb)):
            start = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - start)
    return statistics.median(ta), statistics.median(tb)


def _bandwidth(reps: int, quick: bool) -> float:
    """GB/s of a large copy_ (read + write), the machine's memory-bandwidth reference."""
    n = (4 if quick else 64) * 2**20 // 4
    src, dst = torch.randn(n), torch.empty(n)
    dst.copy_(src)  # first touch of dst's pages outside the timing
    times = []
    for _ in range(max(reps, 3)):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * n * 4 / statistics.median(times) / 1e9


# name -> (normlab layer, torch eager norm, input shapes, quick shapes), built from the
# channel (or feature) count and the activation name.
FUSED_LAYERS: dict[str, tuple[Callable[..., nn.Module], Callable[[int], nn.Module],
                              list[tuple[int, ...]], list[tuple[int, ...]]]] = {
    "BatchNormAct2d": (lambda c, act: BatchNormAct2d(c, act=act), nn.BatchNorm2d,
                       RESNET_SHAPES, QUICK_SHAPES),
    "GroupNormAct(32)": (lambda c, act: GroupNormAct(32, c, act=act),
                         lambda c: nn.GroupNorm(32, c), RESNET_SHAPES, QUICK_SHAPES),
    "LayerNormAct": (lambda d, act: LayerNormAct(d, act=act), nn.LayerNorm,
                     TRANSFORMER_SHAPES, [(8, 64, 128)]),
}
EAGER_ACTS = {"relu": nn.ReLU, "gelu": nn.GELU}


def _fused_pair(
    layer: str, act: str, x: torch.Tensor, dy: torch.Tensor
) -> tuple[Callable[[], None], ...]:
    """Train forward+backward of normlab's ``layer`` with ``act`` and of the torch eager
    norm followed by the activation on ``x``, gradients for input and parameters."""
    make_ours, make_norm = FUSED_LAYERS[layer][:2]
    size = x.shape[-1] if layer == "LayerNormAct" else x.shape[1]
    ours, norm, activation = make_ours(size, act), make_norm(size), EAGER_ACTS[act]()

    def run_ours() -> None:
        torch.autograd.grad(ours(x), (x, ours.weight, ours.bias), dy)

    def run_torch() -> None:
        torch.autograd.grad(activation(norm(x)), (x, norm.weight, norm.bias), dy)

    return run_ours, run_torch


def bench_fused(layer: str, act: str, shapes: list[tuple[int, ...]], reps: int) -> dict[str, float]:
    """Ratio torch-eager / normlab time for train forward+backward of ``layer`` with
    ``act`` per shape."""
    ratios = {}
    for shape in shapes:
        x = torch.randn(shape, requires_grad=True)
        t_ours, t_torch = _median_pair(*_fused_pair(layer, act, x, torch.randn(shape)), reps)
        # bytes the fused path must move at least: read x, write y; read x, dy, write dx
        gbs = 5 * x.numel() * 4 / t_ours / 1e9
        ratios[str(shape)] = t_torch / t_ours
        print(f"  {str(shape):20s} normlab {t_ours * 1e3:8.2f} ms  torch {t_torch * 1e3:8.2f} ms"
              f"  ratio {t_torch / t_ours:5.2f}x  ({gbs:5.1f} GB/s effective)")
    return ratios


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


class _SavedBytes:
    """Counts the distinct storages autograd saves for backward (parameters excluded)."""

    def __init__(self, model: nn.Module) -> None:
        self.skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen: dict[int, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self.skip:
            self.seen[ptr] = max(self.seen.get(ptr, 0), storage.nbytes())
        return t

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def _stack(blocks: int, c: int, abn: bool) -> nn.Sequential:
    """Blocks ``(conv, norm[, act])``: both stacks have the same state_dict keys."""
    def block() -> nn.Sequential:
        conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        if abn:
            return nn.Sequential(conv, InPlaceABN(c, activation="leaky_relu",
                                                  activation_param=0.01))
        return nn.Sequential(conv, nn.BatchNorm2d(c), nn.LeakyReLU(0.01))

    return nn.Sequential(*(block() for _ in range(blocks)))


def bench_memory(shape: tuple[int, ...], blocks: int = 10) -> tuple[int, int]:
    """(eager bytes, InPlaceABN bytes) of saved activations in one training step."""
    torch.manual_seed(0)
    eager = _stack(blocks, shape[1], abn=False)
    ours = _stack(blocks, shape[1], abn=True)
    ours.load_state_dict(eager.state_dict())  # same keys: ABN's checkpoint is BatchNorm's
    x = torch.randn(shape)
    totals = []
    for model in (eager, ours):
        counter = _SavedBytes(model)
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
            y = model(x.clone().requires_grad_())
        torch.autograd.grad(y, list(model.parameters()), torch.ones_like(y))
        totals.append(counter.total)
    return totals[0], totals[1]


def grad_errors(shape: tuple[int, ...], blocks: int) -> dict[str, float]:
    """Largest ``max |g - g64| / max |g64|`` over the parameters of a ``blocks``-deep stack,
    for eager float32, InPlaceABN float32 and InPlaceABN float64, against eager float64."""
    torch.manual_seed(0)
    ref = _stack(blocks, shape[1], abn=False).double()
    x, dy = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref(x.clone()), list(ref.parameters()), dy)
    errors = {}
    for name, abn, dtype in (("eager32", False, torch.float32), ("abn32", True, torch.float32),
                             ("abn64", True, torch.float64)):
        model = _stack(blocks, shape[1], abn=abn).to(dtype)
        model.load_state_dict(ref.state_dict())
        grads = torch.autograd.grad(model(x.to(dtype)), list(model.parameters()), dy.to(dtype))
        errors[name] = max(((g.double() - r).abs().max() / r.abs().max()).item()
                           for g, r in zip(grads, ref_grads, strict=True))
    return errors


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, few reps (CI)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--allocator", choices=("steady", "system"), default="steady",
                        help="as in `normlab bench`: steady (glibc reuses freed memory, no "
                             "first-touch page faults in either column) or system defaults")
    args = parser.parse_args(argv)
    from normlab.bench import steady_allocator

    allocator = steady_allocator() if args.allocator == "steady" else None
    reps = args.reps or (3 if args.quick else 15)
    torch.set_num_threads(args.threads)
    try:
        import numba

        numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    except ImportError:  # pragma: no cover
        pass
    print(f"threads={args.threads} reps={reps} torch={torch.__version__} "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')} "
          f"allocator={allocator or 'system defaults'}")
    print(f"copy bandwidth reference: {_bandwidth(reps, args.quick):.1f} GB/s")

    geomeans = {}
    for layer, (_, _, shapes, quick_shapes) in FUSED_LAYERS.items():
        for act in EAGER_ACTS:
            print(f"{layer}(act={act!r}) train fwd+bwd vs torch eager norm + {act}:")
            found = bench_fused(layer, act, quick_shapes if args.quick else shapes, reps)
            geomeans[f"{layer}/{act}"] = _geomean(list(found.values()))
            target = " (target >= 3x)" if (layer, act) == ("BatchNormAct2d", "relu") else ""
            print(f"  geomean ratio {geomeans[f'{layer}/{act}']:.2f}x{target}")
            if (layer, act) == ("BatchNormAct2d", "relu"):
                ratios = found
    geomean = geomeans["BatchNormAct2d/relu"]

    mem_shape = (2, 8, 16, 16) if args.quick else (16, 64, 56, 56)
    eager_bytes, abn_bytes = bench_memory(mem_shape)
    saving = 1 - abn_bytes / eager_bytes
    print(f"10-block Conv-BN-LeakyReLU training step, input {mem_shape}:")
    print(f"  saved activations: eager {eager_bytes / 2**20:.1f} MiB, "
          f"InPlaceABN {abn_bytes / 2**20:.1f} MiB -> {saving:.0%} less (target >= 40%)")
    acc_shape = (2, 8, 16, 16) if args.quick else (4, 32, 28, 28)
    errors = {}
    for blocks in (1, 10):
        errors[blocks] = grad_errors(acc_shape, blocks)
        print(f"  gradients vs float64 eager, {blocks:2d} block(s), input {acc_shape}: "
              + ", ".join(f"{k} {v:.1e}" for k, v in errors[blocks].items())
              + "  (max |g - g64| / max |g64|)")
    return {"fused_ratios": ratios, "geomean": geomean, "geomeans": geomeans,
            "memory_saving": saving,
            "grad_errors": errors}


if __name__ == "__main__":
    main()
