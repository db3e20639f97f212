"""Benchmark: a small ResNet-like model in eval mode, BatchNorm folded vs not.

Same process, interleaved A/B runs after warm-up, medians printed with their ratio
(target: folded >= 1.2x faster). A large ``copy_`` is timed in the same run as a
memory-bandwidth reference.

    PYTHONPATH=. python benchmarks/fold.py [--quick] [--threads N] [--backend torch|normlab]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from normlab.tools import find_foldable, fold_batchnorm


def _bn_class(backend: str) -> type[nn.Module]:
    if backend == "torch":
        return nn.BatchNorm2d
    import normlab.nn

    return normlab.nn.BatchNorm2d


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, bn: type[nn.Module]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = bn(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = bn(c_out)
        self.down = None
        if stride != 1 or c_in != c_out:
            self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), bn(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.down is None else self.down(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


def small_resnet(bn: type[nn.Module], width: int = 16, num_classes: int = 10) -> nn.Module:
    """ResNet-18-like layout at CIFAR scale: stem + 3 stages of 2 blocks."""
    layers: list[nn.Module] = [
        nn.Conv2d(3, width, 3, 1, 1, bias=False),
        bn(width),
        nn.ReLU(inplace=True),
    ]
    c = width
    for i, c_out in enumerate((width, 2 * width, 4 * width)):
        layers += [BasicBlock(c, c_out, 1 if i == 0 else 2, bn), BasicBlock(c_out, c_out, 1, bn)]
        c = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes)]
    return nn.Sequential(*layers)


def _randomize_stats(model: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial running statistics so the fold does real work (and is checked)."""
    for m in model.modules():
        if getattr(m, "running_mean", None) is not None:
            with torch.no_grad():
                m.running_mean.normal_(0, 0.5, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
                m.weight.normal_(1, 0.2, generator=gen)
                m.bias.normal_(0, 0.2, generator=gen)


def _time(fn, x: torch.Tensor) -> float:
    t0 = time.perf_counter()
    fn(x)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and few runs (CI)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backend", choices=["torch", "normlab"], default="torch")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--size", type=int, default=None, help="input height = width")
    parser.add_argument("--channels-last", action="store_true", help="NHWC model and input")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    batch = args.batch or (4 if args.quick else 32)
    size = args.size or (16 if args.quick else 32)
    warmup, reps = (2, 5) if args.quick else (5, 21)

    model = small_resnet(_bn_class(args.backend)).eval()
    _randomize_stats(model, torch.Generator().manual_seed(1))
    pairs = find_foldable(model)
    folded = fold_batchnorm(model)
    x = torch.randn(batch, 3, size, size)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model, folded, x = (
        model.to(memory_format=fmt),
        folded.to(memory_format=fmt),
        x.to(memory_format=fmt),
    )

    with torch.inference_mode():
        diff = (folded(x) - model(x)).abs().max().item()
        for _ in range(warmup):
            model(x)
            folded(x)
        t_ref, t_fold = [], []
        for _ in range(reps):  # interleaved so drift (thermal, other load) hits both alike
            t_ref.append(_time(model, x))
            t_fold.append(_time(folded, x))
        src = torch.empty(64 * 2**20 // 4)
        dst = torch.empty_like(src)
        t_copy = statistics.median(_time(lambda _: dst.copy_(src), src) for _ in range(5))

    med_ref, med_fold = statistics.median(t_ref), statistics.median(t_fold)
    layout = "channels_last" if args.channels_last else "contiguous"
    print(
        f"threads={args.threads} backend={args.backend} input=({batch}, 3, {size}, {size}) {layout}"
    )
    print(f"folded pairs: {len(pairs)} (BatchNorms replaced by Identity)")
    print(f"max |diff| folded vs unfolded: {diff:.2e}")
    print(f"bandwidth reference (64 MiB copy_): {2 * src.numel() * 4 / t_copy / 1e9:.1f} GB/s")
    print(f"unfolded median: {med_ref * 1e3:.3f} ms   folded median: {med_fold * 1e3:.3f} ms")
    print(f"ratio (unfolded / folded): {med_ref / med_fold:.2f}x  (target >= 1.2x)")


if __name__ == "__main__":
    main()
