"""``normlab demo``: one MLP trained with no norm, BatchNorm, LayerNorm and GroupNorm.

Runs on the embedded digits (no network), prints a summary table and writes
``runs/demo/report.html`` with the PNGs beside it. About 15 s of training on one core.
"""

from __future__ import annotations

import contextlib
import io
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from normlab.experiments import figures
from normlab.experiments.data import Dataset, load_digits
from normlab.experiments.lab import Context, fmt_acc, fmt_steps
from normlab.experiments.models import NORMS, build
from normlab.experiments.report import Section, Table, write_report
from normlab.experiments.runs import ResultStore, kernels_will_compile
from normlab.experiments.runs import warm_up as warm_up_model

__all__ = ["DemoResult", "run_demo"]

HIDDEN = [100, 100, 100]


@dataclass
class DemoResult:
    """The runs by norm name, the summary table, a headline, the report path, and the
    seconds each model's warm-up took (outside its train time)."""

    runs: dict[str, dict[str, Any]]
    table: Table
    headline: str
    report: Path
    warmup_seconds: dict[str, float] = field(default_factory=dict)


COMPILE_NOTICE = ("demo: first run on this machine: compiling normlab's CPU kernels before "
                  "training (about 5-15 s per norm, once; cached afterwards)")


def _model(norm: str) -> dict[str, Any]:
    return {"kind": "mlp", "hidden": HIDDEN, "activation": "relu", "norm": norm}


def warm_up(norm: str, data: Dataset, batch_size: int) -> float:
    """Warm the demo model of ``norm`` up (``runs.warm_up``): a first run's kernel
    compilation happens here, outside the timed training; returns the seconds taken."""
    return warm_up_model(lambda: build(_model(norm), data.image_shape, data.num_classes),
                         data, flat=True, batch_size=batch_size)


def _warm_up_all(norms: Sequence[str], data: Dataset, batch_size: int,
                 echo: Callable[[str], None]) -> dict[str, float]:
    """Warm every model up; on a first run say once, before training, that kernels
    compile (normlab's runtime would print its own notice mid-warm-up: it is held back,
    and anything else written to stderr meanwhile is passed on)."""
    compiling = kernels_will_compile()
    if compiling:
        echo(COMPILE_NOTICE)
    held = io.StringIO()
    with contextlib.redirect_stderr(held) if compiling else contextlib.nullcontext():
        seconds = {norm: warm_up(norm, data, batch_size) for norm in norms}
    for line in held.getvalue().splitlines():
        if line.strip() and not line.startswith("normlab: compiling"):
            echo(line)
    if compiling:
        echo(f"demo: kernels ready in {sum(seconds.values()):.1f} s (not counted in the "
             "train times)")
    return seconds


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
    # Before any timing: a first run's kernel compilation would otherwise be counted as
    # train time (16.8 s vs 2.5 s warm) and make the progress bar promise hours.
    warmup = _warm_up_all(norms, data, spec.batch_size, echo)
    store.meta["warmup_seconds"] = {norm: round(s, 3) for norm, s in warmup.items()}
    runs = {norm: ctx.run(norm, _model(norm), spec) for norm in norms}
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
        chance=1 / data.num_classes,
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
         f"accuracy measured every {spec.eval_every} steps (eval mode). The train time "
         "excludes a warm-up of each model on one batch before timing starts "
         f"({sum(warmup.values()):.1f} s in all; a first run compiles normlab's kernels "
         "there)."],
        [table], [acc_png, loss_png],
    )
    report = write_report(out / "report.html", "normlab demo: the same MLP with and without "
                          "normalization", intro, [section],
                          meta=f"seed {seed}, {time.perf_counter() - start:.0f} s")
    store.save()
    return DemoResult(runs, table, headline, report, warmup)
