"""The train-eval experiment: BatchNorm's statistics at training time and at inference.

A BatchNorm network (:func:`normlab.experiments.models.mlp`, ``Linear -> BatchNorm1d ->
ReLU``) is trained as usual; at every evaluation its test accuracy is measured

- in eval mode (``model.eval()``: the running statistics), and
- in train mode, i.e. having forgotten ``model.eval()``: every test batch is normalized by
  its own statistics, for test batches of 64, 8 and 2 (a copy of the model is used, so the
  running statistics are not disturbed; the ragged last batch is left out), and for a single
  sample, which ``BatchNorm1d`` refuses in train mode (the error is recorded as raised).

At the end, on a shifted test set (``SHIFT``: lower contrast and brighter, as from another
scanner), the same, plus the running statistics re-estimated on shifted *unlabelled* training
images (AdaBN's recipe), and batch statistics on single-class batches (the test set sorted by
label), where the batch's own statistics erase what the classes have in common.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import numpy as np
import torch
from matplotlib.ticker import PercentFormatter
from torch import Tensor, nn

from normlab.experiments import seeded
from normlab.experiments.data import Dataset
from normlab.experiments.lab import Context, ExperimentResult
from normlab.experiments.models import mlp
from normlab.experiments.report import Section, Table
from normlab.experiments.runs import accuracy
from normlab.experiments.verdict import Verdict, accuracy_margin, all_of, effect_verdict

__all__ = ["BATCHES", "SHIFT", "batch_stats_accuracy", "constant_prediction_accuracy",
           "reestimated", "run", "shifted", "single_sample", "train"]

HIDDEN, LR, BATCH = [100, 100, 100], 0.1, 64
BATCHES = (64, 8, 2)  # test batch sizes run with batch statistics over training
SHIFT = (0.5, 0.3)  # test images x -> 0.5 x + 0.3: half the contrast, brighter background
ADAPT_PASSES = 2  # passes over the shifted training images to re-estimate the statistics


def shifted(x: Tensor, shift: tuple[float, float] = SHIFT) -> Tensor:
    """``scale * x + offset``: the shifted test distribution."""
    return shift[0] * x + shift[1]


@torch.no_grad()
def batch_stats_accuracy(model: nn.Module, x: Tensor, y: Tensor, batch: int,
                         order: Tensor | None = None) -> float:
    """Accuracy in train mode (each batch normalized by its own statistics) over batches of
    ``batch`` taken in ``order`` (default: as given); the ragged last batch is left out.
    Runs on a copy, so the model's running statistics stay as they are."""
    probe = copy.deepcopy(model).train()
    if order is not None:
        x, y = x[order], y[order]
    n = len(y) // batch * batch
    if n == 0:
        raise ValueError(f"batch {batch} exceeds the {len(y)} examples")
    correct = sum(int((probe(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
                  for i in range(0, n, batch))
    return correct / n


def single_sample(model: nn.Module, x: Tensor) -> str | None:
    """What one sample in train mode does: ``None`` if it runs, else the error's text."""
    probe = copy.deepcopy(model).train()
    try:
        with torch.no_grad():
            probe(x[:1])
    except (ValueError, RuntimeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


class _OwnStatistics(nn.Module):
    """What a BatchNorm layer computes on a batch of one with that batch's own statistics:
    ``(x - x) / sqrt(0 + eps) * weight + bias = bias``, whatever the input."""

    def __init__(self, bn: nn.Module) -> None:
        super().__init__()
        self.bias = bn.bias.detach().clone()

    def forward(self, x: Tensor) -> Tensor:
        return self.bias.expand_as(x)


@torch.no_grad()
def constant_prediction_accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Accuracy had ``BatchNorm1d`` allowed a batch of one in train mode: every sample is
    normalized to zeros by its own statistics, so every input gets the same prediction."""
    probe = copy.deepcopy(model).eval()
    for name, module in list(probe.named_children()):
        if name.startswith("norm"):
            setattr(probe, name, _OwnStatistics(module))
    return float((probe(x).argmax(1) == y).double().mean())


@torch.no_grad()
def reestimated(model: nn.Module, x: Tensor, batch: int = BATCH, passes: int = ADAPT_PASSES,
                seed: int = 0) -> nn.Module:
    """A copy of ``model`` whose running statistics are recomputed from the unlabelled
    inputs ``x`` (a cumulative average over batches of ``batch``), in eval mode."""
    adapted = copy.deepcopy(model)
    for m in adapted.modules():
        if hasattr(m, "running_mean") and m.running_mean is not None:
            m.reset_running_stats()
            m.momentum = None  # None: the plain average of every batch seen
    adapted.train()
    g = torch.Generator().manual_seed(seed)
    for _ in range(passes):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - batch + 1, batch):
            adapted(x[order[i:i + batch]])
    return adapted.eval()


def _measure(model: nn.Module, x: Tensor, y: Tensor, order: Tensor) -> dict[str, float]:
    row = {"eval": accuracy(model, x, y)}
    for b in BATCHES:
        row[f"batch{b}"] = batch_stats_accuracy(model, x, y, b, order)
    return row


def train(data: Dataset, steps: int, eval_every: int, seed: int) -> dict[str, Any]:
    """Train one BN MLP; the accuracies of every way of taking statistics (JSON-able)."""
    torch.manual_seed(seed)
    x_train, x_test = data.flat()
    y_train, y_test = data.y_train, data.y_test
    model = mlp(data.num_inputs, HIDDEN, data.num_classes, norm="batch")
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y_test), generator=g)  # the test batches: random, fixed
    curves: dict[str, list[float]] = {}
    out: dict[str, Any] = {"steps": []}
    start = time.perf_counter()

    def evaluate(step: int) -> None:
        out["steps"].append(step)
        for k, v in _measure(model, x_test, y_test, order).items():
            curves.setdefault(k, []).append(v)

    model.train()
    evaluate(0)
    diverged = seeded.train_sgd(model, opt, x_train, y_train, steps=steps, batch=BATCH, generator=g,
                         eval_every=eval_every, evaluate=evaluate)
    by_label = torch.argsort(y_test, stable=True)  # batches of (mostly) one class
    xs = shifted(x_test)
    end = {
        "clean": {**_measure(model, x_test, y_test, order),
                  "single_class": batch_stats_accuracy(model, x_test, y_test, BATCH, by_label),
                  "batch1": constant_prediction_accuracy(model, x_test, y_test)},
        "shifted": {**_measure(model, xs, y_test, order),
                    "single_class": batch_stats_accuracy(model, xs, y_test, BATCH, by_label),
                    "batch1": constant_prediction_accuracy(model, xs, y_test),
                    "adapted": accuracy(reestimated(model, shifted(x_train), seed=seed),
                                        xs, y_test)},
    }
    return {**out, "test_acc": curves["eval"], "curves": curves, "end": end,
            "batch1_error": single_sample(model, x_test),
            "final_test_acc": curves["eval"][-1], "diverged": diverged,
            "seconds": round(time.perf_counter() - start, 3)}


MODES = {
    "eval": "eval mode (running statistics)",
    "batch64": "batch statistics, batches of 64",
    "batch8": "batch statistics, batches of 8",
    "batch2": "batch statistics, batches of 2",
    "batch1": "one sample (own statistics, had it run)",
    "single_class": "batch statistics, single-class batches of 64",
    "adapted": "running statistics re-estimated on shifted inputs",
}


def _plot_curves(ctx: Context, runs: list[dict[str, Any]]) -> Any:
    fig = seeded.new_figure(8.0, 4.2)
    ax = fig.add_subplot()
    lines = [(MODES[k], runs[0]["steps"], [r["curves"][k] for r in runs])
             for k in ("eval", *(f"batch{b}" for b in BATCHES))]
    seeded.band(ax, lines, percent=True)
    ax.axhline(100 / ctx.data.num_classes, color="gray", linestyle=":", linewidth=1,
               label="chance")
    ax.set(ylim=(0, 100), xlabel="training step", ylabel="test accuracy",
           title="Test accuracy of one BN network, by the statistics it normalizes with")
    seeded.legend_outside(ax, fontsize=8, title="mean, min-max over seeds", title_fontsize=8)
    return seeded.save(fig, ctx.path("train_eval_over_training.png"))


def _plot_end(ctx: Context, runs: list[dict[str, Any]]) -> Any:
    """Horizontal bars (mean, min-max whiskers): every way of inferring, clean and shifted."""
    fig = seeded.new_figure(9.5, 4.6)
    ax = fig.add_subplot()
    keys = list(MODES)
    height = 0.38
    parts = (("clean", "clean test set"),
             ("shifted", f"shifted test set ({SHIFT[0]:g} x + {SHIFT[1]:g})"))
    for k, (part, label) in enumerate(parts):
        ys, means, lows, highs = [], [], [], []
        for i, key in enumerate(keys):
            values = [r["end"][part].get(key) for r in runs]
            if any(v is None for v in values):
                continue  # re-estimating on clean inputs is what training already did
            v = 100 * np.array(values, dtype=float)
            ys.append(i + (k - 0.5) * height)
            means.append(v.mean())
            lows.append(v.mean() - v.min())
            highs.append(v.max() - v.mean())
        ax.barh(ys, means, height, xerr=[lows, highs], capsize=3, label=label, color=f"C{k}")
    ax.axvline(100 / ctx.data.num_classes, color="gray", linestyle=":", linewidth=1,
               label="chance")
    ax.set_yticks(range(len(keys)))
    ax.set_yticklabels([MODES[k] for k in keys], fontsize=8)
    ax.invert_yaxis()  # eval mode, the right way, on top
    ax.set(xlim=(0, 100), xlabel="test accuracy",
           title="At the end of training (bars: mean; whiskers: min-max over seeds)")
    ax.xaxis.set_major_formatter(PercentFormatter(decimals=0))
    ax.grid(alpha=0.3, axis="x")
    seeded.legend_outside(ax, fontsize=8)
    return seeded.save(fig, ctx.path("train_eval_end.png"))


def decide(runs: list[dict[str, Any]], test_size: int) -> Verdict:
    """The rule, fixed with the experiment: both parts must hold on every seed, each by
    more than the margin (two test examples, at least one point)."""
    margin = accuracy_margin(test_size)
    small = effect_verdict([r["end"]["clean"]["eval"] - r["end"]["clean"]["batch2"]
                            for r in runs], margin,
                           what="eval mode's accuracy minus batch statistics' on batches of 2")
    shift = effect_verdict([r["end"]["shifted"]["adapted"] - r["end"]["shifted"]["eval"]
                            for r in runs], margin,
                           what="on the shifted test set, re-estimated statistics' accuracy "
                                "minus the running statistics'")
    return all_of([small, shift])


def run(ctx: Context) -> ExperimentResult:
    """Train the BN network on every seed, measure, plot, and decide the claim."""
    steps, every = seeded.steps_for(ctx, 1000)
    seeds = seeded.seed_list(ctx)
    runs = [seeded.cached(ctx, f"bn-mlp-seed{seed}",
                          {"model": {"hidden": HIDDEN, "norm": "batch", "activation": "relu"},
                           "train": {"steps": steps, "eval_every": every, "seed": seed,
                                     "lr": LR, "batch_size": BATCH, "batches": list(BATCHES),
                                     "shift": list(SHIFT), "adapt_passes": ADAPT_PASSES}},
                          lambda s=seed: train(ctx.data, steps, every, s))
            for seed in seeds]
    pngs = [_plot_curves(ctx, runs), _plot_end(ctx, runs)]
    rows = []
    for key, label in MODES.items():
        cells = []
        for part in ("clean", "shifted"):
            values = [r["end"][part].get(key) for r in runs]
            cells.append("-" if any(v is None for v in values) else seeded.range_text(values))
        rows.append([label, *cells])
    table = Table(["inference with", "clean test set",
                   f"shifted test set ({SHIFT[0]:g} x + {SHIFT[1]:g})"], rows)
    errors = sorted({r["batch1_error"] or "none" for r in runs})
    verdict = decide(runs, len(ctx.data.y_test))
    end = [r["end"] for r in runs]
    headline = (
        "forgetting model.eval() costs "
        f"{_points([e['clean']['eval'] - e['clean']['batch2'] for e in end])} "
        "accuracy points on test batches of 2 "
        f"({_points([e['clean']['eval'] - e['clean']['batch64'] for e in end])} "
        f"on batches of 64); a single sample in train mode raised "
        f"{'; '.join(e.split(':')[0] for e in errors)}; on the shifted test set, "
        f"re-estimated statistics score "
        f"{seeded.range_text([e['shifted']['adapted'] for e in end])} against "
        f"{seeded.range_text([e['shifted']['eval'] for e in end])} with the running ones."
    )
    section = Section(
        "Training vs inference statistics",
        [f"ReLU MLP {' x '.join(map(str, HIDDEN))} with BatchNorm1d, SGD lr {LR}, batch "
         f"{BATCH}, {steps} steps, seeds {', '.join(map(str, seeds))} (mean, min-max). "
         "Batch statistics are measured on a copy of the model in train mode (as if "
         "model.eval() were forgotten), on test batches in a fixed random order. The "
         f"shifted test set is {SHIFT[0]:g} x + {SHIFT[1]:g} (half the contrast, a grey "
         "background); 're-estimated' recomputes the running statistics from the shifted "
         f"training images without their labels ({ADAPT_PASSES} passes, batches of {BATCH}).",
         f"A single sample in train mode: {' / '.join(errors)}. Had it run, a sample "
         "normalized by its own statistics is all zeros after every BatchNorm, so every input "
         "gets the same prediction: the 'one sample' row.",
         "With batch statistics the clean and shifted columns agree: changing every pixel "
         "to a x + b (a > 0) changes each first-layer unit by a scale and an offset, which "
         "the first BatchNorm removes when it normalizes by the batch's own statistics (up "
         "to eps, which is why batches of 2 differ a little).",
         "Single-class batches: the test set sorted by label, so each batch's statistics "
         "describe one digit and normalizing by them removes what tells that digit apart."],
        [table], pngs,
    )
    return seeded.finish([section], table, headline, verdict)


def _points(values: list[float]) -> str:
    """Per-seed differences of accuracies in points, ``mean (min-max)``."""
    return seeded.range_text(values, suffix="")
