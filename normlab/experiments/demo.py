"""``normlab demo``: one MLP trained with no norm, BatchNorm, LayerNorm and GroupNorm.

Runs on the embedded digits (no network), prints a summary table and writes
``runs/demo/report.html`` with the PNGs beside it. About 15 s of training on one core.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normlab.experiments import figures
from normlab.experiments.data import Dataset, load_digits
from normlab.experiments.lab import Context, fmt_acc, fmt_steps
from normlab.experiments.models import NORMS
from normlab.experiments.report import Section, Table, write_report
from normlab.experiments.runs import ResultStore

__all__ = ["DemoResult", "run_demo"]

HIDDEN = [100, 100, 100]


@dataclass
class DemoResult:
    """The runs by norm name, the summary table, a headline, and the report path."""

    runs: dict[str, dict[str, Any]]
    table: Table
    headline: str
    report: Path


def _headline(runs: dict[str, dict[str, Any]], target: float, steps: int) -> str:
    if "batch" not in runs or "none" not in runs:
        return ""
    bn, plain = runs["batch"]["steps_to_target"], runs["none"]["steps_to_target"]
    if bn is None:
        return f"BatchNorm did not reach {target:.0%} test accuracy in {steps} steps."
    if plain is None:
        return (f"BatchNorm reached {target:.0%} test accuracy in {bn} steps; without "
                f"normalization the same MLP did not reach it in {steps}.")
    return (f"BatchNorm reached {target:.0%} test accuracy in {bn} steps, without "
            f"normalization in {plain}: {plain / bn:.1f}x fewer steps.")


def run_demo(
    out_dir: str | Path = "runs/demo",
    *,
    steps: int = 1500,
    seed: int = 0,
    target: float = 0.95,
    lr: float = 0.1,
    norms: Sequence[str] = ("none", "batch", "layer", "group"),
    progress: bool = True,
    echo: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
    data: Dataset | None = None,
) -> DemoResult:
    """Train the demo MLP once per norm and write the report; returns the results.

    Every run is trained afresh (``results.json`` is written for reference, not reused).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = data if data is not None else load_digits()
    store = ResultStore(out / "results.json", "demo")
    store.meta = {"data": data.describe(), "seed": seed, "steps": steps, "target": target}
    ctx = Context(data, out, store, seed=seed, progress=progress, echo=echo, resume=False)
    spec = ctx.spec(steps, eval_every=10, lr=lr, batch_size=32, target=target)
    echo(f"demo: MLP {data.num_inputs}-{'-'.join(map(str, HIDDEN))}-{data.num_classes} (ReLU) "
         f"on {data.describe()}; SGD lr {lr}, batch {spec.batch_size}, {spec.steps} steps")
    start = time.perf_counter()
    runs = {
        norm: ctx.run(norm, {"kind": "mlp", "hidden": HIDDEN, "activation": "relu",
                             "norm": norm}, spec)
        for norm in norms
    }
    labels = {norm: NORMS[norm] for norm in runs}
    table = Table(
        ["model", f"steps to {target:.0%}", "final test acc", "best test acc", "train time"],
        [[labels[n], fmt_steps(r["steps_to_target"], spec.steps), fmt_acc(r["final_test_acc"]),
          fmt_acc(r["best_test_acc"]), f"{r['seconds']:.1f} s"] for n, r in runs.items()],
    )
    headline = _headline(runs, target, spec.steps)
    acc_png = figures.curves_plot(
        out / "demo_accuracy.png",
        [(labels[n], r["steps"], r["test_acc"]) for n, r in runs.items()],
        title=f"Same MLP, {len(runs)} normalizations: test accuracy", hline=target,
        ylim=(0.0, 1.0),
    )
    loss_png = figures.curves_plot(
        out / "demo_loss.png",
        [(labels[n], r["steps"][1:], r["train_loss"][1:]) for n, r in runs.items()],
        title="Training loss (mean over each 10 steps)", ylabel="cross-entropy",
    )
    intro = [
        "The same multilayer perceptron, trained from the same seed with the same optimizer, "
        "once without normalization and once with each normlab layer between every Linear "
        "layer and its ReLU.",
        f"Data: {data.describe()} (scikit-learn's bundled handwritten digits).",
    ]
    if headline:
        intro.append(f"Result: {headline}")
    section = Section(
        "Summary",
        [f"SGD without momentum, lr {lr}, batch {spec.batch_size}, {spec.steps} steps, test "
         f"accuracy measured every {spec.eval_every} steps (eval mode)."],
        [table], [acc_png, loss_png],
    )
    report = write_report(out / "report.html", "normlab demo: the same MLP with and without "
                          "normalization", intro, [section],
                          meta=f"seed {seed}, {time.perf_counter() - start:.0f} s")
    store.save()
    return DemoResult(runs, table, headline, report)
