"""Data-parallel training of a small CNN with normlab.SyncBatchNorm, on CPU.

    torchrun --nproc-per-node 2 examples/syncbn_torchrun.py            # 2 processes, gloo
    torchrun --nproc-per-node 2 examples/syncbn_torchrun.py --uneven   # ranks get 3:1 slices
    python examples/syncbn_torchrun.py                                 # 1 process: plain BN

Each process trains a replica of the model on its slice of every global batch, under
DistributedDataParallel. With plain BatchNorm each replica would normalize with the
statistics of its own slice (a smaller, noisier batch); after ``convert_sync_batchnorm`` every
BatchNorm layer uses the statistics of the whole global batch, so the training is the same
as one process on the full batch, whatever the slices' sizes. The data is synthetic (no
downloads): 16x16 images whose class is a bright quadrant.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch import nn

from normlab.nn.syncbatchnorm import convert_sync_batchnorm


def make_model() -> nn.Module:
    """A small CNN with torch.nn BatchNorm, as you would find it in existing code."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4),
    )


def synthetic_batch(size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [size, 3, 16, 16] with one brighter quadrant; the label is that quadrant."""
    labels = torch.randint(0, 4, (size,), generator=generator)
    images = torch.randn(size, 3, 16, 16, generator=generator)
    for quadrant in range(4):
        rows, cols = divmod(quadrant, 2)
        chosen = labels == quadrant
        images[chosen, :, rows * 8 : rows * 8 + 8, cols * 8 : cols * 8 + 8] += 1.5
    return images, labels


def my_slice(global_size: int, rank: int, world: int, uneven: bool) -> slice:
    """This rank's rows of the global batch: equal parts, or (--uneven) weights 3:1:3:1..."""
    weights = [3 if (r % 2 == 0 or not uneven) else 1 for r in range(world)]
    bounds = [global_size * sum(weights[:r]) // sum(weights) for r in range(world + 1)]
    return slice(bounds[rank], bounds[rank + 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64, help="global batch size")
    parser.add_argument("--uneven", action="store_true", help="ranks get 3:1 shares")
    args = parser.parse_args()

    torch.set_num_threads(1)  # one core per process
    distributed = "RANK" in os.environ  # set by torchrun
    if distributed:
        dist.init_process_group("gloo")  # on GPUs: "nccl", and move model and data there
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1

    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts them)
    model = convert_sync_batchnorm(make_model())  # before DDP and before the optimizer
    if distributed:
        model = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)

    data = torch.Generator().manual_seed(1)  # every rank draws the same global batches
    rows = my_slice(args.batch, rank, world, args.uneven)
    start = time.perf_counter()
    for step in range(args.steps):
        images, labels = synthetic_batch(args.batch, data)
        logits = model(images[rows])
        # DDP averages gradients over ranks; weighting each rank's summed loss by
        # world / global batch makes that average the gradient of the global mean loss,
        # also when the slices differ in size.
        loss = nn.functional.cross_entropy(logits, labels[rows], reduction="sum")
        optimizer.zero_grad()
        (loss * world / args.batch).backward()
        optimizer.step()
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss on rank 0's slice {loss.item() / len(labels[rows]):.4f}")
    elapsed = time.perf_counter() - start

    # Every replica holds the same parameters and the same running statistics.
    plain = model.module if distributed else model
    flat = torch.cat([t.detach().double().flatten() for t in plain.state_dict().values()])
    if distributed:
        copies = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(copies, flat)
        identical = all(torch.equal(copies[0], c) for c in copies)
    else:
        identical = True
    plain.eval()
    with torch.no_grad():
        images, labels = synthetic_batch(512, torch.Generator().manual_seed(2))
        accuracy = (plain(images).argmax(1) == labels).float().mean().item()
    if rank == 0:
        print(f"{world} process(es), slice of rank 0: {rows.stop - rows.start} of {args.batch}; "
              f"{args.steps} steps in {elapsed:.2f} s")
        print(f"replicas identical: {identical}; held-out accuracy: {accuracy:.3f}")
    if distributed:
        dist.destroy_process_group()
    if not identical:
        raise SystemExit("replicas diverged")


if __name__ == "__main__":
    main()
