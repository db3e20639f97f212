"""The regularization experiment: the train/test gap with and without BatchNorm, with and
without dropout (2 x 2), over several seeds.

The BN paper reports that BatchNorm regularizes (each example's normalization depends on
the random batch it lands in) and that dropout can then be reduced or dropped. Here a ReLU
MLP (``Linear -> [BatchNorm1d] -> ReLU -> [Dropout]``) is trained on a reduced training set
(``N_TRAIN`` digits), so that it can fit it perfectly and the gap to the test set is wide
enough to measure; train and test accuracy are both measured in eval mode (running
statistics, no dropout), i.e. the same network on both sets.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from matplotlib.ticker import PercentFormatter
from torch import Tensor, nn

import normlab
from normlab.experiments import seeded
from normlab.experiments.data import Dataset
from normlab.experiments.lab import Context, ExperimentResult
from normlab.experiments.report import Section, Table
from normlab.experiments.runs import accuracy
from normlab.experiments.verdict import Verdict, accuracy_margin, all_of, effect_verdict

__all__ = ["VARIANTS", "build", "gap", "run", "train"]

HIDDEN, DROPOUT = [256, 256, 256], 0.5
N_TRAIN, LR, MOMENTUM, BATCH = 300, 0.05, 0.9, 32
# (batchnorm, dropout) -> label
VARIANTS = {(False, False): "plain", (False, True): "dropout", (True, False): "BN",
            (True, True): "BN + dropout"}


def build(num_inputs: int, num_classes: int, batchnorm: bool, dropout: bool) -> nn.Sequential:
    """``Linear -> [BatchNorm1d] -> ReLU -> [Dropout(DROPOUT)]`` per hidden layer, then a
    linear classifier (dropout after the activation, where the dropout paper puts it)."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    width = num_inputs
    for i, h in enumerate(HIDDEN, start=1):
        layers[f"fc{i}"] = nn.Linear(width, h, bias=not batchnorm)  # BN's beta is the bias
        if batchnorm:
            layers[f"norm{i}"] = normlab.BatchNorm1d(h)
        layers[f"act{i}"] = nn.ReLU()
        if dropout:
            layers[f"drop{i}"] = nn.Dropout(DROPOUT)
        width = h
    layers["out"] = nn.Linear(width, num_classes)
    return nn.Sequential(layers)


def gap(run: dict[str, Any]) -> float:
    """Final train accuracy minus final test accuracy (a fraction)."""
    return run["train_acc"][-1] - run["test_acc"][-1]


def train_subset(data: Dataset, seed: int, n: int = N_TRAIN) -> tuple[Tensor, Tensor]:
    """``n`` training images (flattened) and labels, drawn with ``seed``."""
    x, _ = data.flat()
    g = torch.Generator().manual_seed(10_000 + seed)
    idx = torch.randperm(len(data.y_train), generator=g)[:n]
    return x[idx], data.y_train[idx]


def train(data: Dataset, batchnorm: bool, dropout: bool, steps: int, eval_every: int,
          seed: int) -> dict[str, Any]:
    """Train one variant with SGD + momentum on the seed's training subset; train and test
    accuracy (eval mode) at every evaluation (JSON-able)."""
    x_train, y_train = train_subset(data, seed)
    _, x_test = data.flat()
    torch.manual_seed(seed)
    model = build(data.num_inputs, data.num_classes, batchnorm, dropout)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    g = torch.Generator().manual_seed(seed)
    out: dict[str, list[Any]] = {"steps": [], "train_acc": [], "test_acc": []}
    start = time.perf_counter()

    def evaluate(step: int) -> None:
        out["steps"].append(step)
        out["train_acc"].append(accuracy(model, x_train, y_train))
        out["test_acc"].append(accuracy(model, x_test, data.y_test))

    model.train()
    evaluate(0)
    diverged = seeded.train_sgd(model, opt, x_train, y_train, steps=steps,
                         batch=min(BATCH, len(y_train)), generator=g, eval_every=eval_every,
                         evaluate=evaluate)
    return {**out, "final_test_acc": out["test_acc"][-1], "diverged": diverged,
            "train_size": len(y_train), "seconds": round(time.perf_counter() - start, 3)}


def decide(results: dict[str, list[dict[str, Any]]], test_size: int) -> Verdict:
    """The rule, fixed with the experiment: both parts, on every seed, by more than the
    margin (two test examples, at least one point)."""
    margin = accuracy_margin(test_size)
    plain, drop = results["plain"], results["dropout"]
    bn, bn_drop = results["BN"], results["BN + dropout"]
    narrower = effect_verdict([gap(p) - gap(b) for p, b in zip(plain, bn, strict=True)], margin,
                              what="the plain net's train/test gap minus BN's")
    need = effect_verdict(
        [(d["final_test_acc"] - p["final_test_acc"]) - (bd["final_test_acc"] - b["final_test_acc"])
         for p, d, b, bd in zip(plain, drop, bn, bn_drop, strict=True)], margin,
        what="dropout's test-accuracy gain without BN minus its gain with BN")
    return all_of([narrower, need])


def _plot_curves(ctx: Context, results: dict[str, list[dict[str, Any]]]) -> Any:
    fig = seeded.new_figure(11.0, 4.2)
    left, right = fig.subplots(1, 2)
    styles = {label: {"color": f"C{i}"} for i, label in enumerate(results)}
    seeded.band(left, [(label, runs[0]["steps"], [r["test_acc"] for r in runs])
                       for label, runs in results.items()], percent=True, styles=styles)
    left.axhline(100 / ctx.data.num_classes, color="gray", linestyle=":", linewidth=1)
    left.set(ylim=(0, 100), xlabel="training step", ylabel="test accuracy (eval mode)",
             title="Test accuracy (dotted: chance)")
    seeded.band(right, [(label, runs[0]["steps"],
                         [[a - b for a, b in zip(r["train_acc"], r["test_acc"], strict=True)]
                          for r in runs]) for label, runs in results.items()],
                percent=True, styles=styles)
    right.axhline(0, color="gray", linewidth=1)
    right.set(xlabel="training step", ylabel="train minus test accuracy (points)",
              title="Generalization gap")
    right.yaxis.set_major_formatter(PercentFormatter(decimals=0, symbol=""))
    seeded.legend_outside(right, fontsize=8, title="mean, min-max over seeds",
                          title_fontsize=8)
    return seeded.save(fig, ctx.path("regularization_curves.png"))


def _plot_end(ctx: Context, results: dict[str, list[dict[str, Any]]]) -> Any:
    fig = seeded.new_figure(10.0, 3.4)
    axes = fig.subplots(1, 2, sharey=True)
    labels = list(results)
    panels = (("test accuracy, end", lambda r: r["final_test_acc"]),
              ("train minus test accuracy, end (points)", gap))
    for ax, (title, value) in zip(axes, panels, strict=True):
        v = [100 * np.array([value(r) for r in results[label]]) for label in labels]
        means = [a.mean() for a in v]
        err = [[m - a.min() for m, a in zip(means, v, strict=True)],
               [a.max() - m for m, a in zip(means, v, strict=True)]]
        bars = ax.barh(range(len(labels)), means, xerr=err, capsize=3,
                       color=[f"C{i}" for i in range(len(labels))])
        ax.bar_label(bars, labels=[f"{m:.1f}" for m in means], label_type="center",
                     color="white", fontsize=9, fontweight="bold")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, axis="x")
    axes[0].set_xlim(0, 100)
    axes[0].xaxis.set_major_formatter(PercentFormatter(decimals=0))
    axes[1].set_xlim(0, max(10.0, 1.3 * max(100 * gap(r) for rs in results.values()
                                              for r in rs)))
    axes[0].set_yticks(range(len(labels)))
    axes[0].set_yticklabels(labels)
    axes[0].invert_yaxis()
    fig.suptitle("At the end of training (bars: mean; whiskers: min-max over seeds)",
                 fontsize=10)
    return seeded.save(fig, ctx.path("regularization_end.png"))


def run(ctx: Context) -> ExperimentResult:
    """Train the 2 x 2 variants on every seed, plot, and decide the claim."""
    steps, every = seeded.steps_for(ctx, 1000)
    seeds = seeded.seed_list(ctx)
    results: dict[str, list[dict[str, Any]]] = {}
    for (bn, drop), label in VARIANTS.items():
        for seed in seeds:
            key = f"{'bn' if bn else 'plain'}{'-dropout' if drop else ''}-seed{seed}"
            config = {"model": {"hidden": HIDDEN, "batchnorm": bn,
                                "dropout": DROPOUT if drop else 0.0},
                      "train": {"steps": steps, "eval_every": every, "seed": seed, "lr": LR,
                                "momentum": MOMENTUM, "batch_size": BATCH,
                                "train_size": N_TRAIN}}
            results.setdefault(label, []).append(seeded.cached(
                ctx, key, config,
                lambda b=bn, d=drop, s=seed: train(ctx.data, b, d, steps, every, s)))
    pngs = [_plot_curves(ctx, results), _plot_end(ctx, results)]
    rows = [[label, seeded.range_text([r["train_acc"][-1] for r in runs]),
             seeded.range_text([r["final_test_acc"] for r in runs]),
             seeded.range_text([gap(r) for r in runs], suffix="")]
            for label, runs in results.items()]
    table = Table(["model", "train accuracy", "test accuracy", "gap (points)"], rows)
    verdict = decide(results, len(ctx.data.y_test))
    headline = "train/test gap in points: " + ", ".join(
        f"{label} {seeded.range_text([gap(r) for r in runs], suffix='')}"
        for label, runs in results.items()) + "; test accuracy: " + ", ".join(
        f"{label} {seeded.range_text([r['final_test_acc'] for r in runs])}"
        for label, runs in results.items()) + "."
    n_train = results["plain"][0]["train_size"]
    section = Section(
        "Train/test gap with and without BatchNorm and dropout",
        [f"ReLU MLP {' x '.join(map(str, HIDDEN))}, dropout {DROPOUT:g} after each hidden "
         f"activation where used; SGD lr {LR}, momentum {MOMENTUM}, batch {BATCH}, {steps} "
         f"steps on {n_train} training images (drawn per seed; the test set is the full "
         f"one), seeds {', '.join(map(str, seeds))} (mean, min-max). Train and test accuracy "
         "are both taken in eval mode (running statistics, dropout off), so the gap is the "
         "same network's accuracy on the images it saw minus on the ones it did not."],
        [table], pngs,
    )
    return seeded.finish([section], table, headline, verdict)
