"""The experiments: each trains a set of runs over seeds through a Context, plots, reports,
and decides its claim with a rule fixed here, before any run (see each docstring).

Names, claims and setups are in :mod:`normlab.experiments.registry`; the numbers chosen
here (steps, learning rates, sweeps) are the full budgets on the embedded digits, and
``--budget`` scales the steps. Every run is repeated over :meth:`Context.seeds` (three
seeds, one in quick mode, where every verdict is therefore "inconclusive").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from normlab.experiments import figures
from normlab.experiments.lab import (
    QUICK_STEPS,
    Context,
    ExperimentResult,
    fmt_acc,
    fmt_acc_range,
    fmt_steps_range,
    mean,
)
from normlab.experiments.models import NORMS
from normlab.experiments.report import Section, Table
from normlab.experiments.verdict import Verdict, accuracy_margin, all_of, effect_verdict

__all__ = ["CATALOG"]

TARGET = 0.95  # test accuracy whose first crossing the curves experiments report
WORKS = 0.9  # final test accuracy at which a network counts as "training" in the sweeps

Runs = list[dict[str, Any]]  # one run per seed


def _mlp(**options: Any) -> dict[str, Any]:
    return {"kind": "mlp", "hidden": [100, 100, 100], "activation": "relu", **options}


def _margin(ctx: Context) -> float:
    return accuracy_margin(len(ctx.data.y_test))


def _finals(runs: Runs) -> list[float]:
    return [r["final_test_acc"] for r in runs]


def _steps_to(runs: Runs, limit: int) -> list[int]:
    """Per-seed steps to the target; a run that never reached it counts as ``limit`` (a
    lower bound of its true value, so a "faster" effect is never overstated)."""
    return [limit if r["steps_to_target"] is None else r["steps_to_target"] for r in runs]


def _zoom(ctx: Context) -> tuple[float, float] | None:
    """A 90-100% panel where full runs end close together (quick runs never get there)."""
    return None if ctx.quick else (0.9, 1.0)


def _reached(runs: Runs, limit: int) -> str:
    """Steps to the target over the seeds, as the tables show them."""
    return fmt_steps_range([r["steps_to_target"] for r in runs], limit)


def _curve_bands(results: dict[str, Runs]) -> list[figures.Band]:
    return [(label, max((r["steps"] for r in runs), key=len), [r["test_acc"] for r in runs])
            for label, runs in results.items()]


def _steps_table(results: dict[str, Runs], steps: int, target: float) -> Table:
    rows = [
        [
            label,
            _reached(runs, steps),
            fmt_acc_range(_finals(runs)),
            fmt_acc_range([r["best_test_acc"] for r in runs]),
        ]
        for label, runs in results.items()
    ]
    return Table(["model", f"steps to {target:.0%}", "final test acc", "best test acc"], rows)


def _seeds_said(ctx: Context) -> str:
    seeds = ctx.seeds()
    return (f"seed {seeds[0]}" if len(seeds) == 1 else
            f"seeds {', '.join(map(str, seeds))}; tables give mean (min-max) over them")


def _n_seeds(ctx: Context) -> str:
    n = len(ctx.seeds())
    return f"{n} seed{'s' * (n > 1)}"


def _median_range(run: dict[str, Any]) -> float:
    """max - min of the probed sigmoid input's median after step 0."""
    p50 = run["probe"]["p50"][1:] or [0.0]
    return max(p50) - min(p50)


def _fewer_steps(slow: Runs, fast: Runs, limit: int, margin: int, what: str) -> Verdict:
    return effect_verdict(
        [s - f for s, f in zip(_steps_to(slow, limit), _steps_to(fast, limit), strict=True)],
        margin, what=what, unit="steps", scale=1.0, digits=0)


def bn_paper_verdict(plain: Runs, bn: Runs, limit: int, eval_every: int) -> Verdict:
    """bn-paper's rule (see :func:`bn_paper`) on the per-seed runs without and with BN."""
    faster = _fewer_steps(plain, bn, limit, 2 * eval_every,
                          f"steps to {TARGET:.0%} without BN minus with BN")
    stable = effect_verdict(
        [_median_range(p) - _median_range(b) for p, b in zip(plain, bn, strict=True)], 0.25,
        what="the median sigmoid input's range without BN minus with BN", unit="", scale=1.0,
        digits=2)
    return all_of([faster, stable])


def bn_paper(ctx: Context) -> ExperimentResult:
    """3 x 100 sigmoid MLP with and without BN: accuracy and a sigmoid input's percentiles.

    Rule: reproduced if, on every seed, (1) BN reaches 95% test accuracy in fewer steps
    than the plain net by more than two evaluation intervals (a run that never reaches it
    counts as the step budget), and (2) the median sigmoid input's range over training is
    smaller with BN by more than 0.25; see :func:`normlab.experiments.verdict.all_of`."""
    # lr 1.0: the plain sigmoid net needs a large step to learn at all within the budget.
    spec = ctx.spec(3000, eval_every=50, batch_size=60, lr=1.0, target=TARGET)
    labels = {"none": "without BN", "batch": "with BN"}
    results = {
        labels[norm]: ctx.runs(norm, _mlp(activation="sigmoid", norm=norm), spec, probe="act3")
        for norm in labels
    }
    acc_png = figures.band_plot(
        ctx.path("bn_paper_accuracy.png"), _curve_bands(results),
        hlines={f"target {TARGET:.0%}": TARGET, "chance": 1 / ctx.data.num_classes},
        title="(a) test accuracy, 3 x 100 sigmoid MLP", xlabel="training step",
        ylabel="test accuracy", ylim=(0.0, 1.0), zoom=_zoom(ctx),
    )
    first = ctx.seeds()[0]
    pct_png = figures.percentiles_plot(
        ctx.path("bn_paper_sigmoid_input.png"),
        [(f"({'bc'[i]}) {label}", runs[0]["steps"], runs[0]["probe"]) for i, (label, runs) in
         enumerate(results.items())],
        title=f"Input to one sigmoid of the last hidden layer: 15th, 50th, 85th percentiles "
              f"(seed {first})",
    )
    drift = {label: [_median_range(r) for r in runs] for label, runs in results.items()}
    table = _steps_table(results, spec.steps, TARGET)
    table.headers.append("median input range")
    for row, label in zip(table.rows, results, strict=True):
        values = drift[label]
        row.append(f"{mean(values):.2f}" + (f" ({min(values):.2f}-{max(values):.2f})"
                                            if len(values) > 1 else ""))
    plain, bn = results["without BN"], results["with BN"]
    verdict = bn_paper_verdict(plain, bn, spec.steps, spec.eval_every)
    headline = (
        f"steps to {TARGET:.0%}: with BN {_reached(bn, spec.steps)}, "
        f"without {_reached(plain, spec.steps)}; "
        f"median sigmoid input range {mean(drift['with BN']):.2f} with BN, "
        f"{mean(drift['without BN']):.2f} without (mean over {_n_seeds(ctx)})."
    )
    section = Section(
        "Accuracy and the distribution of a sigmoid's input",
        [f"{spec.steps} steps of SGD (lr {spec.lr}, batch {spec.batch_size}), {_seeds_said(ctx)}. "
         "The probe is unit 0 of the input to the last hidden layer's sigmoid, over the test "
         "set, in eval mode (plotted for the first seed). 'median input range' is max - min "
         "of its median after step 0."],
        [table], [acc_png, pct_png],
    )
    return ExperimentResult([section], table, headline, verdict)


Sweep = dict[str, list[Runs]]  # norm -> one list of per-seed runs per swept value


def _sweep(
    ctx: Context,
    key: str,
    values: list[float],
    make: Callable[[str, float], tuple[dict[str, Any], Any]],
    norms: tuple[str, ...] = ("none", "batch"),
) -> Sweep:
    """Run ``make(norm, value) -> (model, spec)`` for every norm, value and seed."""
    return {
        norm: [ctx.runs(f"{norm}-{key}{v:g}", *make(norm, v)) for v in values] for norm in norms
    }


def _sweep_outputs(
    ctx: Context,
    name: str,
    xs: list[float],
    runs: Sweep,
    *,
    xlabel: str,
    title: str,
    error: bool = False,
) -> tuple[Table, Any]:
    """A table (one row per swept value, mean (min-max) over seeds) and a plot of the
    mean accuracy (or error) vs the sweep with a min-max band."""
    def metric(r: dict[str, Any]) -> float:
        return 1.0 - r["final_test_acc"] if error else r["final_test_acc"]

    labels = {norm: NORMS[norm] for norm in runs}
    headers = [xlabel] + [f"{labels[n]} test {'error' if error else 'acc'}" for n in runs]
    rows = []
    for i, x in enumerate(xs):
        cells = [f"{x:g}"]
        for norm in runs:
            seeds = runs[norm][i]
            failed = sum(r["diverged"] for r in seeds)
            cells.append(fmt_acc_range([metric(r) for r in seeds])
                         + (f" (diverged {failed}/{len(seeds)})" if failed else ""))
        rows.append(cells)
    n_seeds = len(next(iter(runs.values()))[0])
    bands = [(labels[n], xs, [[metric(per_x[s]) for per_x in rs] for s in range(n_seeds)])
             for n, rs in runs.items()]
    chance = 1 / ctx.data.num_classes
    png = figures.band_plot(
        ctx.path(f"{name}.png"), bands, title=title, xlabel=xlabel, logx=True, markers=True,
        ylabel="test error" if error else "final test accuracy",
        hlines={"chance": 1 - chance if error else chance}, ylim=(0.0, 1.0),
        # errors of a few % all sit on the floor of a 0-100% axis: a 0-15% panel beside it
        zoom=(0.0, 0.15) if error and not ctx.quick else None,
    )
    return Table(headers, rows), png


def _working_range(xs: list[float], runs: list[Runs]) -> str:
    """The swept values where every seed reaches :data:`WORKS`."""
    good = [x for x, seeds in zip(xs, runs, strict=True) if min(_finals(seeds)) >= WORKS]
    if not good:
        return "none"
    return f"{good[0]:g}" if len(good) == 1 else f"{min(good):g} .. {max(good):g}"


def _trains(runs: list[Runs]) -> list[int]:
    """Indices of the swept values where every seed reaches :data:`WORKS`."""
    return [i for i, seeds in enumerate(runs) if min(_finals(seeds)) >= WORKS]


def _advantage(bn: Runs, plain: Runs) -> list[float]:
    """Per seed: BN's final test accuracy minus the plain net's."""
    return [b - p for b, p in zip(_finals(bn), _finals(plain), strict=True)]


def learning_rate_verdict(lrs: list[float], bn: list[Runs], plain: list[Runs],
                          margin: float) -> Verdict:
    """learning-rate's rule (see :func:`learning_rate`); ``bn``/``plain`` hold one list
    of per-seed runs per learning rate."""
    good = _trains(bn)
    at = good[-1] if good else max(range(len(lrs)), key=lambda i: mean(_finals(bn[i])))
    where = (f"the largest lr where BN reaches {WORKS:.0%} on every seed" if good else
             f"BN reaches {WORKS:.0%} at no lr on every seed: its best lr")
    return effect_verdict(_advantage(bn[at], plain[at]), margin,
                          what=f"BN's accuracy minus the plain net's at lr {lrs[at]:g} ({where})")


def learning_rate(ctx: Context) -> ExperimentResult:
    """Final accuracy over a learning-rate sweep, with and without BN (plain SGD).

    Rule: at the largest learning rate where BN reaches 90% on every seed (else the one
    where BN's mean is best), BN's final test accuracy minus the plain net's must exceed
    the margin (2 test examples, at least 1 point) on every seed."""
    lrs = ctx.pick([0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0], [0.1, 3.0])
    runs = _sweep(ctx, "lr", lrs,
                  lambda norm, lr: (_mlp(norm=norm), ctx.spec(800, eval_every=50, lr=lr,
                                                                batch_size=32)))
    table, png = _sweep_outputs(ctx, "learning_rate", lrs, runs, xlabel="learning rate",
                                title="Final test accuracy vs learning rate (SGD)")
    verdict = learning_rate_verdict(lrs, runs["batch"], runs["none"], _margin(ctx))
    headline = (
        f"test accuracy >= {WORKS:.0%} on every seed at learning rates "
        f"{_working_range(lrs, runs['batch'])} with BN, {_working_range(lrs, runs['none'])} "
        "without."
    )
    section = Section("Learning-rate sweep",
                      [f"{runs['none'][0][0]['steps'][-1]} steps of plain SGD, batch 32, "
                       f"{_seeds_said(ctx)}."], [table], [png])
    return ExperimentResult([section], table, headline, verdict)


def init_verdict(scales: list[float], bn: list[Runs], plain: list[Runs],
                 margin: float) -> Verdict:
    """init's rule (see :func:`init_scale`); one list of per-seed runs per scale."""
    good = _trains(bn)
    low, high = (good[0], good[-1]) if good else (0, len(scales) - 1)
    where = (f"the extremes where BN reaches {WORKS:.0%} on every seed" if good else
             f"BN reaches {WORKS:.0%} at no scale on every seed: the sweep's ends")
    ends = [_advantage(bn[i], plain[i]) for i in (low, high)]
    return effect_verdict(
        [min(a, b) for a, b in zip(*ends, strict=True)], margin,
        what=f"BN's accuracy minus the plain net's, the smaller of the two at init scales "
             f"{scales[low]:g} and {scales[high]:g} ({where})")


def init_scale(ctx: Context) -> ExperimentResult:
    """Final accuracy over a sweep of initial weight scales, with and without BN.

    Rule: at the smallest and at the largest scale where BN reaches 90% on every seed
    (else the sweep's ends), BN's final test accuracy minus the plain net's must exceed the
    margin (2 test examples, at least 1 point) on every seed; the per-seed effect is the
    smaller of the two ends."""
    scales = ctx.pick([0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0], [0.01, 1.0])

    def make(norm: str, scale: float) -> tuple[dict[str, Any], Any]:
        model = {**_mlp(norm=norm), "hidden": [100] * 4, "init_scale": scale}
        return model, ctx.spec(800, eval_every=50, lr=0.05, momentum=0.9, batch_size=32)

    runs = _sweep(ctx, "scale", scales, make)
    table, png = _sweep_outputs(ctx, "init", scales, runs,
                                xlabel="init scale (x He std)",
                                title="Final test accuracy vs initial weight scale")
    verdict = init_verdict(scales, runs["batch"], runs["none"], _margin(ctx))
    headline = (
        f"test accuracy >= {WORKS:.0%} on every seed for init scales "
        f"{_working_range(scales, runs['batch'])} with BN, "
        f"{_working_range(scales, runs['none'])} without."
    )
    section = Section("Initialization sweep",
                      ["Weights drawn from N(0, (scale * sqrt(2 / fan_in))^2), biases zero; "
                       f"SGD with momentum 0.9, lr 0.05, batch 32, {_seeds_said(ctx)}."],
                      [table], [png])
    return ExperimentResult([section], table, headline, verdict)


def batch_size_verdict(size: int, bn: Runs, gn: Runs, margin: float) -> Verdict:
    """batch-size's rule (see :func:`batch_size`) on the per-seed runs at batch ``size``."""
    return effect_verdict(_advantage(gn, bn), margin,  # GN's accuracy - BN's = BN's error - GN's
                          what=f"BN's test error minus GroupNorm's at batch {size}")


def batch_size(ctx: Context) -> ExperimentResult:
    """Test error vs batch size for BN/GN/LN/IN in a small CNN, fixed epochs.

    Rule: BN's test error at the smallest batch (2) minus GroupNorm's must exceed the
    margin (2 test examples, at least 1 point) on every seed."""
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
    small, large = 0, len(sizes) - 1
    verdict = batch_size_verdict(sizes[small], runs["batch"][small], runs["group"][small],
                                 _margin(ctx))

    def err(norm: str, i: int) -> str:
        return fmt_acc(1 - mean(_finals(runs[norm][i])))

    headline = f"mean test error at batch {sizes[small]} vs {sizes[large]}: " + ", ".join(
        f"{NORMS[n]} {err(n, small)} vs {err(n, large)}" for n in norms) + "."
    section = Section(
        "Batch-size sweep",
        [f"{epochs * ctx.budget:g} epochs at every batch size (the budget scales them), SGD "
         f"momentum 0.9, lr 0.1 x batch / 32, {_seeds_said(ctx)}; test error in eval mode "
         "(BatchNorm uses its running statistics)."],
        [table], [png],
    )
    return ExperimentResult([section], table, headline, verdict)


def placement_verdict(results: dict[str, Runs], limit: int, eval_every: int,
                      margin: float) -> Verdict:
    """placement's rule (see :func:`placement`) on its five variants' per-seed runs."""
    before = results["BN before act"]
    faster = _fewer_steps(results["no norm"], before, limit, 2 * eval_every,
                          f"steps to {TARGET:.0%} with no norm minus BN before act")
    order = effect_verdict(_advantage(before, results["BN after act"]), margin,
                           what="final accuracy of BN before act minus BN after act")
    edges = [max(i, o) for i, o in zip(_finals(results["BN before act + input BN"]),
                                       _finals(results["BN before act + output BN"]),
                                       strict=True)]
    hurts = effect_verdict([b - e for b, e in zip(_finals(before), edges, strict=True)],
                           margin, what="final accuracy of BN before act minus the "
                           "better of + input BN and + output BN")
    return all_of([faster, order, hurts])


def placement(ctx: Context) -> ExperimentResult:
    """BN before vs after the activation, and on the input/output layers.

    Rule: reproduced if, on every seed, (1) BN before the activation reaches 95% in fewer
    steps than no norm by more than two evaluation intervals, (2) its final accuracy beats
    BN after the activation by more than the margin (2 test examples, at least 1 point),
    and (3) adding BN on the inputs or on the logits costs more than the margin (the
    better of the two still below BN before alone)."""
    spec = ctx.spec(1500, eval_every=25, lr=0.1, batch_size=32, target=TARGET)
    variants = {
        "no norm": _mlp(norm="none"),
        "BN before act": _mlp(norm="batch"),
        "BN after act": _mlp(norm="batch", placement="after"),
        "BN before act + input BN": _mlp(norm="batch", input_norm=True),
        "BN before act + output BN": _mlp(norm="batch", output_norm=True),
    }
    results = {
        label: ctx.runs(label.lower().replace(" ", "-").replace("+-", ""), model, spec)
        for label, model in variants.items()
    }
    png = figures.band_plot(
        ctx.path("placement.png"), _curve_bands(results),
        hlines={f"target {TARGET:.0%}": TARGET, "chance": 1 / ctx.data.num_classes},
        title="Where BatchNorm goes: test accuracy", xlabel="training step",
        ylabel="test accuracy", ylim=(0.0, 1.0), zoom=_zoom(ctx))
    table = _steps_table(results, spec.steps, TARGET)
    verdict = placement_verdict(results, spec.steps, spec.eval_every, _margin(ctx))
    headline = f"steps to {TARGET:.0%} (mean final test accuracy): " + ", ".join(
        f"{label} {_reached(runs, spec.steps)} "
        f"({fmt_acc(mean(_finals(runs)))})" for label, runs in results.items()) + "."
    section = Section(
        "BatchNorm placement",
        [f"{spec.steps} steps of SGD (lr {spec.lr}, batch {spec.batch_size}), "
         f"{_seeds_said(ctx)}."],
        [table], [png],
    )
    return ExperimentResult([section], table, headline, verdict)


def sequences(ctx: Context) -> ExperimentResult:
    """BatchNorm1d with and without a mask, LayerNorm and none on padded sequences.

    Rule: see :func:`_padding_verdict`."""
    from normlab.experiments import sequences as seq

    steps = QUICK_STEPS if ctx.quick else max(10, round(600 * ctx.budget))
    every = max(1, steps // 6) if ctx.quick else 25
    sizes = {"n_train": 256, "n_test": 128} if ctx.quick else {}
    seeds = ctx.seeds()
    results: dict[str, Runs] = {}
    for norm in seq.NORMS:
        for seed in seeds:
            key = f"{norm}-seed{seed}"
            config = {"data": {"generated": "waveforms", **sizes}, "model": {"norm": norm},
                      "train": {"steps": steps, "eval_every": every, "seed": seed}}
            run = ctx.store.get(key, config) if ctx.resume else None
            if run is None:
                run = seq.train(norm, steps, seed, every, **sizes)
                ctx.store.put(key, config, run)
                ctx.echo(f"  {key}: test accuracy {fmt_acc(run['final_test_acc'])} "
                         f"in {run['seconds']:.1f} s")
            else:
                ctx.echo(f"  {key}: reused from {ctx.store.path.name}")
            results.setdefault(seq.LABELS[norm], []).append(run)
    png = figures.band_plot(
        ctx.path("sequences.png"), _curve_bands(results), ylim=(0.0, 1.0),
        hlines={"chance": 1 / seq.CLASSES}, xlabel="training step", ylabel="test accuracy",
        title="Padded sequences: test accuracy, eval mode",
    )
    columns = ("final_test_acc", "test_acc_batch_stats", "test_acc_batch_stats_padded")
    rows = [[label, *(fmt_acc_range([r[c] for r in runs]) for c in columns),
             _points_range([_mismatch(r) for r in runs])]
            for label, runs in results.items()]
    table = Table(["model", "test, eval mode (running statistics)",
                   "test, batch statistics", "test, batch statistics, padded to 200",
                   "mismatch (points)"], rows)
    verdict = _padding_verdict(results[seq.LABELS["batch"]],
                               results[seq.LABELS["batch-masked"]])
    mismatch = {label: mean([_mismatch(r) for r in runs]) for label, runs in results.items()}
    headline = "mean mismatch (points): " + ", ".join(
        f"{label} {100 * m:.1f}" for label, m in mismatch.items()) + "."
    section = Section(
        "BatchNorm on padded sequences",
        [f"{steps} steps, {_seeds_said(ctx)}. The model is "
         "run three ways on the test set: in eval mode (running statistics), with each "
         "batch's own statistics (as in training), and the same with every sequence padded "
         "to twice the length, so only the amount of padding changes. The mismatch is the "
         "largest of |batch statistics - eval| and the accuracy lost to the extra padding: "
         "a model whose statistics ignore the padding scores the same all three ways."],
        [table], [png],
    )
    return ExperimentResult([section], table, headline, verdict)


def _mismatch(run: dict[str, Any]) -> float:
    """How much the way statistics are taken changes the test accuracy (a fraction)."""
    stats = run["test_acc_batch_stats"]
    return max(abs(stats - run["final_test_acc"]), stats - run["test_acc_batch_stats_padded"])


def _points_range(values: list[float]) -> str:
    text = f"{100 * mean(values):.1f}"
    low, high = f"{100 * min(values):.1f}", f"{100 * max(values):.1f}"
    return text if low == high else f"{text} ({low}-{high})"


def _padding_verdict(plain: Runs, masked: Runs, margin: float = 0.02) -> Verdict:
    """The rule, fixed with the experiment: the claim is reproduced if unmasked BatchNorm's
    smallest mismatch over the seeds exceeds masked BatchNorm's largest by more than
    ``margin`` (2 points); not reproduced if its largest is no more than the masked one's
    smallest; inconclusive otherwise (the seeds' ranges overlap or sit within the margin),
    and always with a single seed, which cannot show the spread."""
    plain_m = [_mismatch(r) for r in plain]
    masked_m = [_mismatch(r) for r in masked]
    seeds = min(len(plain_m), len(masked_m))
    rule = (f"reproduced if unmasked BatchNorm's smallest mismatch over at least 2 seeds "
            f"exceeds masked BatchNorm's largest by more than {100 * margin:.1f} points; not "
            "reproduced if its largest is no more than the masked one's smallest; else "
            "inconclusive")
    said = (f"the way statistics are taken moves unmasked BatchNorm's test accuracy by "
            f"{100 * min(plain_m):.1f}-{100 * max(plain_m):.1f} points, masked BatchNorm's "
            f"by {100 * min(masked_m):.1f}-{100 * max(masked_m):.1f}, over {seeds} "
            f"seed{'s' * (seeds > 1)}")
    if seeds < 2:
        return Verdict("inconclusive", rule, f"{said}; one seed cannot show the spread")
    if min(plain_m) > max(masked_m) + margin:
        return Verdict("reproduced", rule, said)
    if max(plain_m) <= min(masked_m):
        return Verdict("not reproduced", rule, said)
    return Verdict("inconclusive", rule,
                   f"{said}; the seeds' ranges overlap or sit within the margin")


CATALOG: dict[str, Callable[[Context], ExperimentResult]] = {
    "bn-paper": bn_paper,
    "learning-rate": learning_rate,
    "init": init_scale,
    "batch-size": batch_size,
    "placement": placement,
    "sequences": sequences,
    "gradients": lambda ctx: _lazy("gradients", ctx),
    "train-eval": lambda ctx: _lazy("train_eval", ctx),
    "regularization": lambda ctx: _lazy("regularization", ctx),
}


def _lazy(module: str, ctx: Context) -> ExperimentResult:
    """Run ``normlab.experiments.<module>.run`` (imported on use: each is its own module)."""
    import importlib

    return importlib.import_module(f"normlab.experiments.{module}").run(ctx)
