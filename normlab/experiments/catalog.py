"""The experiments: each trains a set of runs through a Context, plots, and reports.

Names, claims and setups are in :mod:`normlab.experiments.registry`; the numbers chosen
here (steps, learning rates, sweeps) are the full budgets on the embedded digits, and
``--budget`` scales the steps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from normlab.experiments import figures
from normlab.experiments.lab import QUICK_STEPS, Context, ExperimentResult, fmt_acc, fmt_steps
from normlab.experiments.models import NORMS
from normlab.experiments.report import Section, Table

__all__ = ["CATALOG"]

TARGET = 0.95  # test accuracy whose first crossing the curves experiments report


def _mlp(**options: Any) -> dict[str, Any]:
    return {"kind": "mlp", "hidden": [100, 100, 100], "activation": "relu", **options}


def _curve_series(results: dict[str, dict[str, Any]]) -> list[figures.Series]:
    return [(label, r["steps"], r["test_acc"]) for label, r in results.items()]


def _steps_table(results: dict[str, dict[str, Any]], steps: int, target: float) -> Table:
    rows = [
        [
            label,
            fmt_steps(r["steps_to_target"], steps),
            fmt_acc(r["final_test_acc"]),
            fmt_acc(r["best_test_acc"]),
        ]
        for label, r in results.items()
    ]
    return Table(["model", f"steps to {target:.0%}", "final test acc", "best test acc"], rows)


def bn_paper(ctx: Context) -> ExperimentResult:
    """3 x 100 sigmoid MLP with and without BN: accuracy and a sigmoid input's percentiles."""
    # lr 1.0: the plain sigmoid net needs a large step to learn at all within the budget.
    spec = ctx.spec(3000, eval_every=50, batch_size=60, lr=1.0, target=TARGET)
    labels = {"none": "without BN", "batch": "with BN"}
    results = {
        labels[norm]: ctx.run(norm, _mlp(activation="sigmoid", norm=norm), spec, probe="act3")
        for norm in labels
    }
    acc_png = figures.curves_plot(
        ctx.path("bn_paper_accuracy.png"), _curve_series(results), hline=TARGET,
        title="(a) test accuracy, 3 x 100 sigmoid MLP", ylim=(0.0, 1.0),
    )
    pct_png = figures.percentiles_plot(
        ctx.path("bn_paper_sigmoid_input.png"),
        [(f"({'bc'[i]}) {label}", r["steps"], r["probe"]) for i, (label, r) in
         enumerate(results.items())],
        title="Input to one sigmoid of the last hidden layer: 15th, 50th, 85th percentiles",
    )
    drift = {
        label: max(r["probe"]["p50"][1:] or [0.0]) - min(r["probe"]["p50"][1:] or [0.0])
        for label, r in results.items()
    }
    table = _steps_table(results, spec.steps, TARGET)
    table.headers.append("median input range")
    for row, label in zip(table.rows, results, strict=True):
        row.append(f"{drift[label]:.2f}")
    plain, bn = results["without BN"], results["with BN"]
    headline = (
        f"with BN the network reached {TARGET:.0%} test accuracy in "
        f"{fmt_steps(bn['steps_to_target'], spec.steps)} steps, without BN in "
        f"{fmt_steps(plain['steps_to_target'], spec.steps)}; the median of the sigmoid's "
        f"input moved over a range of {drift['with BN']:.2f} with BN and "
        f"{drift['without BN']:.2f} without."
    )
    section = Section(
        "Accuracy and the distribution of a sigmoid's input",
        [f"{spec.steps} steps of SGD (lr {spec.lr}, batch {spec.batch_size}); the probe is "
         "unit 0 of the input to the last hidden layer's sigmoid, over the test set, in "
         "eval mode. 'median input range' is max - min of its median after step 0."],
        [table], [acc_png, pct_png],
    )
    return ExperimentResult([section], table, headline)


def _sweep(
    ctx: Context,
    key: str,
    values: list[float],
    make: Callable[[str, float], tuple[dict[str, Any], Any]],
    norms: tuple[str, ...] = ("none", "batch"),
) -> dict[str, list[dict[str, Any]]]:
    """Run ``make(norm, value) -> (model, spec)`` for every norm and value."""
    return {
        norm: [ctx.run(f"{norm}-{key}{v:g}", *make(norm, v)) for v in values] for norm in norms
    }


def _sweep_outputs(
    ctx: Context,
    name: str,
    xs: list[float],
    runs: dict[str, list[dict[str, Any]]],
    *,
    xlabel: str,
    title: str,
    error: bool = False,
    logx: bool = True,
) -> tuple[Table, Any]:
    """A table (one row per swept value) and a plot of accuracy (or error) vs the sweep."""
    def metric(r: dict[str, Any]) -> float:
        return 1.0 - r["final_test_acc"] if error else r["final_test_acc"]

    labels = {norm: NORMS[norm] for norm in runs}
    headers = [xlabel] + [f"{labels[n]} test {'error' if error else 'acc'}" for n in runs]
    rows = []
    for i, x in enumerate(xs):
        cells = [f"{x:g}"]
        for norm in runs:
            r = runs[norm][i]
            cells.append(fmt_acc(metric(r)) + (" (diverged)" if r["diverged"] else ""))
        rows.append(cells)
    png = figures.sweep_plot(
        ctx.path(f"{name}.png"), xs,
        {labels[n]: [metric(r) for r in rs] for n, rs in runs.items()},
        failed={labels[n]: [r["diverged"] for r in rs] for n, rs in runs.items()},
        title=title, xlabel=xlabel, ylabel="test error" if error else "final test accuracy",
        logx=logx,
    )
    return Table(headers, rows), png


def _working_range(xs: list[float], runs: list[dict[str, Any]], threshold: float) -> str:
    good = [x for x, r in zip(xs, runs, strict=True) if r["final_test_acc"] >= threshold]
    return f"{min(good):g} .. {max(good):g}" if good else "none"


def learning_rate(ctx: Context) -> ExperimentResult:
    """Final accuracy over a learning-rate sweep, with and without BN (plain SGD)."""
    lrs = ctx.pick([0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0], [0.1, 3.0])
    runs = _sweep(ctx, "lr", lrs,
                  lambda norm, lr: (_mlp(norm=norm), ctx.spec(800, eval_every=50, lr=lr,
                                                                batch_size=32)))
    table, png = _sweep_outputs(ctx, "learning_rate", lrs, runs, xlabel="learning rate",
                                title="Final test accuracy vs learning rate (SGD)")
    threshold = 0.9
    headline = (
        f"test accuracy >= {threshold:.0%} at learning rates "
        f"{_working_range(lrs, runs['batch'], threshold)} with BN, "
        f"{_working_range(lrs, runs['none'], threshold)} without."
    )
    section = Section("Learning-rate sweep",
                      [f"{runs['none'][0]['steps'][-1]} steps of plain SGD, batch 32, each "
                       "learning rate from the same seed."], [table], [png])
    return ExperimentResult([section], table, headline)


def init_scale(ctx: Context) -> ExperimentResult:
    """Final accuracy over a sweep of initial weight scales, with and without BN."""
    scales = ctx.pick([0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0], [0.01, 1.0])

    def make(norm: str, scale: float) -> tuple[dict[str, Any], Any]:
        model = {**_mlp(norm=norm), "hidden": [100] * 4, "init_scale": scale}
        return model, ctx.spec(800, eval_every=50, lr=0.05, momentum=0.9, batch_size=32)

    runs = _sweep(ctx, "scale", scales, make)
    table, png = _sweep_outputs(ctx, "init", scales, runs,
                                xlabel="init scale (x He std)",
                                title="Final test accuracy vs initial weight scale")
    threshold = 0.9
    headline = (
        f"test accuracy >= {threshold:.0%} for init scales "
        f"{_working_range(scales, runs['batch'], threshold)} with BN, "
        f"{_working_range(scales, runs['none'], threshold)} without."
    )
    section = Section("Initialization sweep",
                      ["Weights drawn from N(0, (scale * sqrt(2 / fan_in))^2), biases zero; "
                       "SGD with momentum 0.9, lr 0.05, batch 32."], [table], [png])
    return ExperimentResult([section], table, headline)


def batch_size(ctx: Context) -> ExperimentResult:
    """Test error vs batch size for BN/GN/LN/IN in a small CNN, fixed epochs."""
    sizes = ctx.pick([2, 4, 8, 16, 32, 64], [2, 16])
    epochs = 6
    n_train = len(ctx.data.y_train)

    def make(norm: str, b: float) -> tuple[dict[str, Any], Any]:
        b = int(b)
        steps = max(1, epochs * n_train // b)
        # Linear scaling rule: the lr grows with the batch, as in the GroupNorm paper.
        spec = ctx.spec(steps, eval_every=max(1, steps // 8), batch_size=b,
                        lr=0.1 * b / 32, momentum=0.9)
        return {"kind": "cnn", "norm": norm, "widths": [16, 32, 64]}, spec

    norms = ("batch", "group", "layer", "instance")
    runs = _sweep(ctx, "batch", [float(s) for s in sizes], make, norms=norms)
    table, png = _sweep_outputs(ctx, "batch_size", sizes, runs, xlabel="batch size",
                                title="Test error vs batch size (small CNN)", error=True)
    err = {n: {s: 1 - r["final_test_acc"] for s, r in zip(sizes, rs, strict=True)}
           for n, rs in runs.items()}
    small, large = min(sizes), max(sizes)
    headline = f"test error at batch {small} vs {large}: " + ", ".join(
        f"{NORMS[n]} {fmt_acc(err[n][small])} vs {fmt_acc(err[n][large])}" for n in norms
    ) + "."
    section = Section(
        "Batch-size sweep",
        [f"{epochs} epochs at every batch size, SGD momentum 0.9, lr 0.1 x batch / 32; "
         "test error in eval mode (BatchNorm uses its running statistics)."],
        [table], [png],
    )
    return ExperimentResult([section], table, headline)


def placement(ctx: Context) -> ExperimentResult:
    """BN before vs after the activation, and on the input/output layers."""
    spec = ctx.spec(1500, eval_every=25, lr=0.1, batch_size=32, target=TARGET)
    variants = {
        "no norm": _mlp(norm="none"),
        "BN before act": _mlp(norm="batch"),
        "BN after act": _mlp(norm="batch", placement="after"),
        "BN before act + input BN": _mlp(norm="batch", input_norm=True),
        "BN before act + output BN": _mlp(norm="batch", output_norm=True),
    }
    results = {
        label: ctx.run(label.lower().replace(" ", "-").replace("+-", ""), model, spec)
        for label, model in variants.items()
    }
    png = figures.curves_plot(ctx.path("placement.png"), _curve_series(results),
                              hline=TARGET, title="Where BatchNorm goes: test accuracy",
                              ylim=(0.0, 1.0))
    table = _steps_table(results, spec.steps, TARGET)
    headline = f"steps to {TARGET:.0%} (final test accuracy): " + ", ".join(
        f"{label} {fmt_steps(r['steps_to_target'], spec.steps)} ({fmt_acc(r['final_test_acc'])})"
        for label, r in results.items()
    ) + "."
    section = Section(
        "BatchNorm placement",
        [f"{spec.steps} steps of SGD (lr {spec.lr}, batch {spec.batch_size}), same seed for "
         "every variant."],
        [table], [png],
    )
    return ExperimentResult([section], table, headline)


def sequences(ctx: Context) -> ExperimentResult:
    """BatchNorm1d with and without a mask, LayerNorm and none on padded sequences."""
    from normlab.experiments import sequences as seq

    steps = QUICK_STEPS if ctx.quick else max(10, round(600 * ctx.budget))
    every = max(1, steps // 6) if ctx.quick else 25
    sizes = {"n_train": 256, "n_test": 128} if ctx.quick else {}
    seeds = [ctx.seed] if ctx.quick else [ctx.seed + i for i in range(3)]
    results: dict[str, list[dict[str, Any]]] = {}
    for norm in seq.NORMS:
        for seed in seeds:
            key = norm if len(seeds) == 1 else f"{norm}-seed{seed}"
            config = {"data": {"generated": "waveforms", **sizes}, "model": {"norm": norm},
                      "train": {"steps": steps, "eval_every": every, "seed": seed}}
            run = ctx.store.get(key, config) if ctx.resume else None
            if run is None:
                run = seq.train(norm, steps, seed, every, **sizes)
                ctx.store.put(key, config, run)
                ctx.echo(f"  {key}: test accuracy {fmt_acc(run['final_test_acc'])} "
                         f"in {run['seconds']:.1f} s")
            results.setdefault(seq.LABELS[norm], []).append(run)
    png = figures.curves_plot(
        ctx.path("sequences.png"),
        [(label, runs[0]["steps"], runs[0]["test_acc"]) for label, runs in results.items()],
        ylim=(0.0, 1.0), hline=1 / 3,
        title=f"Padded sequences: test accuracy, eval mode (seed {seeds[0]}; dashed: chance)",
    )
    columns = ("final_test_acc", "test_acc_batch_stats", "test_acc_batch_stats_padded")
    rows = [[label, *(_mean_range([r[c] for r in runs]) for c in columns),
             _mean_range([_mismatch(r) for r in runs], points=True)]
            for label, runs in results.items()]
    table = Table(["model", "test, eval mode (running statistics)",
                   "test, batch statistics", "test, batch statistics, padded to 200",
                   "mismatch (points)"], rows)
    verdict = _padding_verdict(results[seq.LABELS["batch"]],
                               results[seq.LABELS["batch-masked"]])
    section = Section(
        "BatchNorm on padded sequences",
        [f"{steps} steps, seeds {', '.join(map(str, seeds))} (mean, min-max). The model is "
         "run three ways on the test set: in eval mode (running statistics), with each "
         "batch's own statistics (as in training), and the same with every sequence padded "
         "to twice the length, so only the amount of padding changes. The mismatch is the "
         "largest of |batch statistics - eval| and the accuracy lost to the extra padding: "
         "a model whose statistics ignore the padding scores the same all three ways.",
         verdict],
        [table], [png],
    )
    return ExperimentResult([section], table, verdict)


def _mismatch(run: dict[str, Any]) -> float:
    """How much the way statistics are taken changes the test accuracy (a fraction)."""
    stats = run["test_acc_batch_stats"]
    return max(abs(stats - run["final_test_acc"]), stats - run["test_acc_batch_stats_padded"])


def _mean_range(values: list[float], points: bool = False) -> str:
    if points:
        values = [100 * v for v in values]
    text = f"{sum(values) / len(values):.1f}" if points else fmt_acc(sum(values) / len(values))
    if len(values) > 1:
        low, high = min(values), max(values)
        text += f" ({low:.1f}-{high:.1f})" if points else f" ({fmt_acc(low)}-{fmt_acc(high)})"
    return text


def _padding_verdict(plain: list[dict[str, Any]], masked: list[dict[str, Any]]) -> str:
    """The rule, fixed with the experiment: the claim is reproduced if unmasked BatchNorm's
    smallest mismatch over the seeds exceeds masked BatchNorm's largest by more than 2
    points; not reproduced if its largest is no more than the masked one's smallest;
    inconclusive otherwise (the seeds' ranges overlap or the margin is under 2 points)."""
    plain_m = [_mismatch(r) for r in plain]
    masked_m = [_mismatch(r) for r in masked]
    said = (f"the way statistics are taken moves unmasked BatchNorm's test accuracy by "
            f"{100 * min(plain_m):.1f}-{100 * max(plain_m):.1f} points, masked BatchNorm's "
            f"by {100 * min(masked_m):.1f}-{100 * max(masked_m):.1f}")
    if min(plain_m) > max(masked_m) + 0.02:
        return f"Verdict: reproduced ({said})."
    if max(plain_m) <= min(masked_m):
        return f"Verdict: not reproduced ({said})."
    return f"Verdict: inconclusive ({said}; the rule asks for a 2-point margin over the seeds)."


CATALOG: dict[str, Callable[[Context], ExperimentResult]] = {
    "bn-paper": bn_paper,
    "learning-rate": learning_rate,
    "init": init_scale,
    "batch-size": batch_size,
    "placement": placement,
    "sequences": sequences,
}
