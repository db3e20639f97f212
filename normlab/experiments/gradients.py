"""The gradients experiment: per-layer gradient norms through a deep sigmoid MLP, with and
without BatchNorm, over training, and how many sigmoids sit in their flat (saturated) tails.

The model is :func:`normlab.experiments.models.mlp` with ``DEPTH`` hidden layers of
``WIDTH`` sigmoids (``Linear -> [BatchNorm1d] -> sigmoid``), under two initializations:

- ``default``: PyTorch's ``Linear`` init, weights ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``.
  Every layer's backward pass multiplies by ``W^T diag(sigmoid')`` with ``sigmoid' <= 1/4``
  and small weights, so without BN the gradient shrinks geometrically towards the input
  (the vanishing gradients of deep sigmoid nets).
- ``large``: weights ``N(0, (8 / sqrt(fan_in))^2)``: pre-activations of several units, so
  many sigmoids saturate (``sigmoid'`` near 0) -- the other way gradients die.

Measured at every evaluation, on a fixed batch of training examples, in train mode (what
SGD sees) and on a copy of the model (so BN's running statistics are untouched): the norm
of ``dL/dW`` of every hidden layer, and the fraction of sigmoid inputs ``z`` with
``sigmoid'(z) < SATURATED`` per layer.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any

import torch
from matplotlib.ticker import PercentFormatter
from torch import Tensor, nn

from normlab.experiments import seeded
from normlab.experiments.data import Dataset
from normlab.experiments.lab import Context, ExperimentResult
from normlab.experiments.models import mlp
from normlab.experiments.report import Section, Table
from normlab.experiments.runs import accuracy
from normlab.experiments.verdict import Verdict

__all__ = ["DEPTH", "SATURATED", "gradient_norms", "run", "saturated_fraction", "train"]

DEPTH, WIDTH = 12, 64
LR, BATCH, PROBE = 0.5, 64, 256
SATURATED = 0.01  # sigmoid'(z) below this (|z| > 4.6, 4% of its peak 1/4) counts as saturated
LARGE_INIT = 8.0  # std of the "large" init, in units of 1 / sqrt(fan_in)
RATIO_LIMIT = 10.0  # the claim's threshold: last / first hidden layer gradient norm
NORMS = {"none": "no BN", "batch": "BN"}
INITS = {"default": "default init", "large": "large init"}


def build(norm: str, init: str, num_inputs: int, num_classes: int) -> nn.Sequential:
    """The deep sigmoid MLP (``fc1 .. fc{DEPTH}``, ``act1 ..``, ``out``)."""
    model = mlp(num_inputs, [WIDTH] * DEPTH, num_classes, norm=norm, activation="sigmoid")
    if init == "large":
        for module in model.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, LARGE_INIT / math.sqrt(module.in_features))
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
    elif init != "default":
        raise ValueError(f"init must be one of {sorted(INITS)}, got {init!r}")
    return model


def hidden_linears(model: nn.Module) -> list[nn.Linear]:
    """The hidden layers' ``Linear`` modules, input side first (``fc1``, ``fc2``, ...)."""
    named = dict(model.named_modules())
    return [named[f"fc{i}"] for i in range(1, len([n for n in named if n.startswith("fc")]) + 1)]


def saturated_fraction(z: Tensor, threshold: float = SATURATED) -> float:
    """The fraction of the sigmoid inputs ``z`` where ``sigmoid'(z) < threshold``."""
    s = torch.sigmoid(z.double())
    return float((s * (1 - s) < threshold).double().mean())


def gradient_norms(model: nn.Module, x: Tensor, y: Tensor) -> tuple[list[float], list[float]]:
    """``(norms, saturated)``: the Frobenius norm of the cross-entropy loss's gradient with
    respect to each hidden layer's weight, and each layer's saturated fraction, on the
    batch ``(x, y)`` in train mode. Runs on a copy: the model, its gradients and BN's
    running statistics stay as they are."""
    probe = copy.deepcopy(model).train()
    inputs: list[Tensor] = []
    hooks = [m.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].detach()))
             for name, m in probe.named_modules() if name.startswith("act")]
    try:
        loss = nn.functional.cross_entropy(probe(x), y)
    finally:
        for h in hooks:
            h.remove()
    weights = [layer.weight for layer in hidden_linears(probe)]
    grads = torch.autograd.grad(loss, weights)
    return [float(g.double().norm()) for g in grads], [saturated_fraction(z) for z in inputs]


def train(data: Dataset, norm: str, init: str, steps: int, eval_every: int,
          seed: int) -> dict[str, Any]:
    """Train one model with plain SGD; per evaluation: step, test accuracy, per-layer
    gradient norms and saturated fractions (JSON-able)."""
    torch.manual_seed(seed)
    x_train, x_test = data.flat()
    model = build(norm, init, data.num_inputs, data.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    g = torch.Generator().manual_seed(seed)
    probe = torch.randperm(len(data.y_train), generator=g)[:PROBE]
    px, py = x_train[probe], data.y_train[probe]
    out: dict[str, list[Any]] = {"steps": [], "test_acc": [], "grad_norms": [], "saturated": []}
    start = time.perf_counter()

    def evaluate(step: int) -> bool:
        """Record one evaluation; False (nothing recorded) if a norm is not finite."""
        norms, sat = gradient_norms(model, px, py)
        if not all(math.isfinite(v) for v in norms):
            return False
        out["steps"].append(step)
        out["test_acc"].append(accuracy(model, x_test, data.y_test))
        out["grad_norms"].append(norms)
        out["saturated"].append(sat)
        return True

    evaluate(0)
    diverged = seeded.train_sgd(model, opt, x_train, data.y_train, steps=steps, batch=BATCH,
                         generator=g, eval_every=eval_every, evaluate=evaluate)
    # A non-finite norm is not JSON: a diverged run stops at its last finite evaluation.
    return {**out, "final_test_acc": out["test_acc"][-1], "diverged": diverged,
            "seconds": round(time.perf_counter() - start, 3)}


def ratio(run: dict[str, Any]) -> float:
    """Last over first hidden layer's gradient norm, geometric mean over the evaluations
    (how many times smaller the gradient reaching the first layer is)."""
    logs = [math.log(max(n[-1], 1e-300)) - math.log(max(n[0], 1e-300))
            for n in run["grad_norms"]]
    return math.exp(sum(logs) / len(logs))


def decide(plain: list[float], bn: list[float], min_seeds: int = 2) -> Verdict:
    """The rule, fixed with the experiment, on the default init's per-seed ratios."""
    rule = (f"reproduced if on every seed (at least {min_seeds}) the last hidden layer's "
            f"gradient norm is more than {RATIO_LIMIT:g}x the first's without BN and less "
            f"than {RATIO_LIMIT:g}x with BN (geometric mean over training, default init); "
            "not reproduced if on every seed it is not (no vanishing without BN, or as "
            "much with BN); else inconclusive")
    said = (f"last/first gradient norm without BN {_ratios(plain)}, with BN {_ratios(bn)} "
            f"over {len(plain)} seed{'s' * (len(plain) > 1)}")
    holds = [p > RATIO_LIMIT and b < RATIO_LIMIT for p, b in zip(plain, bn, strict=True)]
    if len(plain) < min_seeds:
        return Verdict("inconclusive", rule, f"{said}; one seed cannot show the spread")
    if all(holds):
        return Verdict("reproduced", rule, said)
    if not any(holds):
        return Verdict("not reproduced", rule, said)
    return Verdict("inconclusive", rule, f"{said}; the seeds disagree")


def _ratios(values: list[float]) -> str:
    shown = [f"{v:.3g}x" for v in values]
    return shown[0] if len(shown) == 1 else f"{min(values):.3g}x .. {max(values):.3g}x"


def _label(norm: str, init: str) -> str:
    return f"{NORMS[norm]}, {INITS[init]}"


def _plot_layers(ctx: Context, results: dict[tuple[str, str], list[dict[str, Any]]]) -> Any:
    """Gradient norm per layer (log y) at the start, a quarter in and the end; first seed."""
    fig = seeded.new_figure(11.0, 6.4)
    axes = fig.subplots(2, 2, sharex=True, sharey=True)
    for ax, (norm, init) in zip(axes.flat, [(n, i) for i in INITS for n in NORMS], strict=True):
        run = results[norm, init][0]
        n = len(run["steps"])
        for j, color in zip(sorted({0, n // 4, n - 1}), ("C0", "C1", "C3"), strict=False):
            layers = range(1, len(run["grad_norms"][j]) + 1)
            ax.plot(layers, run["grad_norms"][j], marker="o", markersize=3, color=color,
                    label=f"step {run['steps'][j]}")
        ax.set_yscale("log")
        ax.set_title(_label(norm, init), fontsize=10)
        ax.grid(alpha=0.3, which="major")
        seeded.legend_outside(ax, fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("hidden layer (1 = next to the input)")
    for ax in axes[:, 0]:
        ax.set_ylabel("||dL/dW|| (log)")
    fig.suptitle(f"Gradient norm per layer, {DEPTH} x {WIDTH} sigmoid MLP "
                 f"(seed {ctx.seed}; a falling line towards layer 1 = vanishing)")
    return seeded.save(fig, ctx.path("gradients_per_layer.png"))


def _plot_training(ctx: Context, results: dict[tuple[str, str], list[dict[str, Any]]]) -> Any:
    """First and last hidden layer's gradient norm over training; test accuracy below."""
    fig = seeded.new_figure(11.0, 6.4)
    axes = fig.subplots(2, 2, sharex=True)
    styles = {}
    for k, norm in enumerate(NORMS):
        styles[f"{NORMS[norm]}, layer 1"] = {"color": f"C{k}", "linestyle": "-"}
        styles[f"{NORMS[norm]}, layer {DEPTH}"] = {"color": f"C{k}", "linestyle": "--"}
    for col, init in enumerate(INITS):
        lines, accs = [], []
        for norm in NORMS:
            runs = results[norm, init]
            xs = runs[0]["steps"]
            for layer, name in ((0, "layer 1"), (-1, f"layer {DEPTH}")):
                lines.append((f"{NORMS[norm]}, {name}", xs,
                              [[g[layer] for g in r["grad_norms"]] for r in runs]))
            accs.append((NORMS[norm], xs, [r["test_acc"] for r in runs]))
        top, bottom = axes[0, col], axes[1, col]
        seeded.band(top, lines, logy=True, styles=styles)
        top.set(title=INITS[init], ylabel="||dL/dW|| (log)")
        seeded.band(bottom, accs, percent=True)
        bottom.axhline(100 / ctx.data.num_classes, color="gray", linestyle=":", linewidth=1,
                       label="chance")
        bottom.set(ylim=(0, 100), xlabel="training step", ylabel="test accuracy")
        if col == 1:
            seeded.legend_outside(top, fontsize=8)
            seeded.legend_outside(bottom, fontsize=8)
    fig.suptitle("First and last hidden layer's gradient norm over training "
                 "(mean, min-max over seeds)")
    return seeded.save(fig, ctx.path("gradients_over_training.png"))


def _plot_saturation(ctx: Context,
                     results: dict[tuple[str, str], list[dict[str, Any]]]) -> Any:
    """Saturated fraction per layer at the start and the end, every model (seed mean)."""
    fig = seeded.new_figure(11.0, 3.8)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, init in zip(axes, INITS, strict=True):
        for k, norm in enumerate(NORMS):
            runs = results[norm, init]
            for j, style in ((0, ":"), (-1, "-")):
                per_layer = [sum(r["saturated"][j][i] for r in runs) / len(runs)
                             for i in range(DEPTH)]
                ax.plot(range(1, DEPTH + 1), [100 * v for v in per_layer], style, marker="o",
                        markersize=3, color=f"C{k}",
                        label=f"{NORMS[norm]}, step {runs[0]['steps'][j]}")
        ax.axhspan(50, 100, color="C3", alpha=0.07, label="most units saturated")
        ax.set(title=INITS[init], xlabel="hidden layer", ylim=(-2, 100))
        ax.yaxis.set_major_formatter(PercentFormatter(decimals=0))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"saturated sigmoids (sigmoid' < {SATURATED:g})")
    seeded.legend_outside(axes[1], fontsize=8)
    fig.suptitle("Saturated region: share of sigmoid inputs with |z| > 4.6 "
                 "(mean over seeds)")
    return seeded.save(fig, ctx.path("gradients_saturation.png"))


def run(ctx: Context) -> ExperimentResult:
    """Train the four models on every seed, plot, and decide the claim."""
    steps, every = seeded.steps_for(ctx, 600)
    seeds = seeded.seed_list(ctx)
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for init in INITS:
        for norm in NORMS:
            for seed in seeds:
                config = {"model": {"depth": DEPTH, "width": WIDTH, "norm": norm, "init": init,
                                    "activation": "sigmoid"},
                          "train": {"steps": steps, "eval_every": every, "seed": seed,
                                    "lr": LR, "batch_size": BATCH, "probe": PROBE}}
                results.setdefault((norm, init), []).append(seeded.cached(
                    ctx, f"{norm}-{init}-seed{seed}", config,
                    lambda n=norm, i=init, s=seed: train(ctx.data, n, i, steps, every, s)))
    pngs = [_plot_layers(ctx, results), _plot_training(ctx, results),
            _plot_saturation(ctx, results)]
    rows = []
    for init in INITS:
        for norm in NORMS:
            runs = results[norm, init]
            rows.append([
                _label(norm, init),
                _ratios([ratio(r) for r in runs]),
                _sci([r["grad_norms"][-1][0] for r in runs]),
                _sci([r["grad_norms"][-1][-1] for r in runs]),
                seeded.range_text([sum(r["saturated"][-1]) / DEPTH for r in runs]),
                seeded.range_text([r["final_test_acc"] for r in runs]),
            ])
    table = Table(["model", "last / first layer gradient", "layer 1 gradient, end",
                   f"layer {DEPTH} gradient, end", "saturated sigmoids, end",
                   "test accuracy, end"], rows)
    verdict = decide([ratio(r) for r in results["none", "default"]],
                     [ratio(r) for r in results["batch", "default"]])
    plain, bn = results["none", "default"], results["batch", "default"]
    headline = (f"default init: the last hidden layer's gradient norm over the first's is "
                f"{_ratios([ratio(r) for r in plain])} without BN, "
                f"{_ratios([ratio(r) for r in bn])} with BN; test accuracy "
                f"{seeded.range_text([r['final_test_acc'] for r in plain])} without BN, "
                f"{seeded.range_text([r['final_test_acc'] for r in bn])} with.")
    section = Section(
        "Gradient norms through a deep sigmoid MLP",
        [f"{DEPTH} hidden layers of {WIDTH} sigmoids, SGD lr {LR}, batch {BATCH}, {steps} "
         f"steps, seeds {', '.join(map(str, seeds))} (mean, min-max; gradient ratios as "
         "min .. max). Gradients are taken on a fixed batch of "
         f"{PROBE} training examples in train mode at every evaluation. 'last / first "
         "layer gradient' is the norm of dL/dW of the last hidden layer over the first's, "
         "geometric mean over training: 1 means the gradient reaches the input side intact, "
         "1e6 means it arrives a million times weaker. A sigmoid is counted as saturated "
         f"where sigmoid'(z) < {SATURATED:g} (|z| > 4.6). The verdict uses the default init; "
         "the large init shows the saturated regime, where the gradient survives the "
         "flat sigmoids only because the large weights multiply it back up."],
        [table], pngs,
    )
    return seeded.finish([section], table, headline, verdict)


def _sci(values: list[float]) -> str:
    """Per-seed gradient norms as ``geometric mean (min-max)`` in scientific notation."""
    logs = [math.log(max(v, 1e-300)) for v in values]
    text = f"{math.exp(sum(logs) / len(logs)):.1e}"
    return text if len(values) == 1 else f"{text} ({min(values):.1e} .. {max(values):.1e})"
