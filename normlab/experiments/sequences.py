"""The sequence experiment: BatchNorm on padded variable-length batches, with and without
a mask, against LayerNorm and no normalization.

Data (generated, seeded): noisy waveforms of 10-100 steps, ``1 + sin(2 pi f t + phase)``
plus noise, the class given by the frequency band (3 classes), zero-padded to 100 steps;
batches drawn at random, so their padding ratio varies. The model: two ``Conv1d -> norm ->
ReLU`` blocks, the mean over the valid steps, a linear classifier. The norms:

- ``BatchNorm1d`` unmasked: its statistics include the padding (zeros, against a signal
  around 1), so they depend on how long the other sequences of the batch are;
- ``BatchNorm1d(mask=...)``: statistics over the valid steps only;
- ``LayerNorm`` over the channels at each step (padding cannot reach it);
- none.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any

import torch
from torch import Tensor, nn

import normlab

NORMS = ("batch", "batch-masked", "layer", "none")
LABELS = {"batch": "BatchNorm1d", "batch-masked": "BatchNorm1d + mask", "layer": "LayerNorm",
          "none": "no norm"}
MAX_LEN, CLASSES, CHANNELS = 100, 3, 16


def make_sequences(n: int, seed: int, max_len: int = MAX_LEN) -> tuple[Tensor, Tensor, Tensor]:
    """``(x [n, 1, max_len], lengths [n], labels [n])``: zero-padded noisy waveforms."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    lengths = torch.randint(10, MAX_LEN + 1, (n,), generator=g)
    freq = 0.03 + 0.03 * labels.double() + 0.02 * torch.rand(n, generator=g, dtype=torch.float64)
    phase = 2 * math.pi * torch.rand(n, 1, generator=g, dtype=torch.float64)
    t = torch.arange(max_len, dtype=torch.float64)
    x = 1.0 + torch.sin(2 * math.pi * freq[:, None] * t + phase)
    x = x + 0.8 * torch.randn(n, max_len, generator=g, dtype=torch.float64)
    x = x * (t < lengths[:, None])  # zero padding past each length
    return x.float()[:, None, :], lengths, labels


class _Block(nn.Module):
    def __init__(self, c_in: int, norm: str) -> None:
        super().__init__()
        self.conv = nn.Conv1d(c_in, CHANNELS, 5, padding=2)
        self.norm_kind = norm
        if norm.startswith("batch"):
            self.norm = normlab.BatchNorm1d(CHANNELS)
        elif norm == "layer":
            self.norm = normlab.LayerNorm(CHANNELS)
        else:
            self.norm = nn.Identity()

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = self.conv(x) * mask[:, None]  # the convolution leaks into the padding: zero it
        if self.norm_kind == "batch-masked":
            x = self.norm(x, mask=mask)
        elif self.norm_kind == "layer":
            x = self.norm(x.transpose(1, 2)).transpose(1, 2)
        else:
            x = self.norm(x)
        return torch.relu(x)


class SequenceNet(nn.Module):
    """Two ``Conv1d -> norm -> ReLU`` blocks, the mean over valid steps, a classifier."""

    def __init__(self, norm: str) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_Block(1, norm), _Block(CHANNELS, norm)])
        self.head = nn.Linear(CHANNELS, CLASSES)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        mask = normlab.lengths_to_mask(lengths, x.shape[-1])
        for block in self.blocks:
            x = block(x, mask)
        pooled = (x * mask[:, None]).sum(-1) / lengths[:, None].clamp_min(1)
        return self.head(pooled)


def _accuracy(model: nn.Module, data: tuple[Tensor, Tensor, Tensor], pad_to: int,
              train_mode: bool) -> float:
    """Accuracy on ``data`` zero-padded to ``pad_to`` steps, in batches of 64, in eval mode
    (running statistics) or train mode (each batch's own statistics; on a copy, so the
    model's running statistics stay as they are)."""
    x, lengths, labels = data
    if pad_to > x.shape[-1]:
        x = torch.nn.functional.pad(x, (0, pad_to - x.shape[-1]))
    probe = copy.deepcopy(model).train(train_mode)
    correct = 0
    with torch.no_grad():
        for start in range(0, len(labels), 64):
            sl = slice(start, start + 64)
            correct += int((probe(x[sl], lengths[sl]).argmax(1) == labels[sl]).sum())
    return correct / len(labels)


def train(norm: str, steps: int, seed: int, eval_every: int, n_train: int = 2048,
          n_test: int = 512, batch_size: int = 32, lr: float = 0.05) -> dict[str, Any]:
    """Train one model; returns its curves (test accuracy in eval mode) and final figures."""
    torch.manual_seed(seed)
    train_data = make_sequences(n_train, seed)
    test_data = make_sequences(n_test, seed + 1000)
    model = SequenceNet(norm)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    curve_steps, curve_acc = [], []
    x, lengths, labels = train_data
    for step in range(1, steps + 1):
        idx = torch.randint(0, n_train, (batch_size,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx], lengths[idx]), labels[idx])
        if not torch.isfinite(loss):
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % eval_every == 0 or step == steps:
            curve_steps.append(step)
            curve_acc.append(_accuracy(model, test_data, MAX_LEN, train_mode=False))
    if not curve_acc or curve_steps[-1] != step:  # diverged: one last point where it stopped
        curve_steps.append(step)
        curve_acc.append(_accuracy(model, test_data, MAX_LEN, train_mode=False))
    return {
        "steps": curve_steps,
        "test_acc": curve_acc,
        "final_test_acc": curve_acc[-1],
        "diverged": step < steps,
        "train_acc_eval": _accuracy(model, train_data, MAX_LEN, train_mode=False),
        "test_acc_batch_stats": _accuracy(model, test_data, MAX_LEN, train_mode=True),
        "test_acc_batch_stats_padded": _accuracy(model, test_data, 2 * MAX_LEN, train_mode=True),
        "seconds": time.perf_counter() - start,
    }
