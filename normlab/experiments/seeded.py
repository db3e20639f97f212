"""Shared bits of the self-contained multi-seed experiments (gradients, train-eval,
regularization): the seeds, cached runs, mean-and-band plots, the result.

Each of those experiments has its own training loop (it measures more than ``fit``
records), so it stores its runs through :func:`cached` rather than ``Context.run``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter
from torch import Tensor, nn

from normlab.experiments import figures
from normlab.experiments.lab import QUICK_STEPS, Context, ExperimentResult, fmt_acc
from normlab.experiments.report import Section, Table
from normlab.experiments.verdict import Verdict

__all__ = ["band", "cached", "finish", "legend_outside", "new_figure", "range_text",
           "save", "seed_list", "steps_for", "train_sgd"]

# One line per (label, xs, per-seed ys).
Bands = Sequence[tuple[str, Sequence[float], Sequence[Sequence[float]]]]


def train_sgd(
    model: nn.Module, opt: torch.optim.Optimizer, x_train: Tensor, y_train: Tensor, *,
    steps: int, batch: int, generator: torch.Generator, eval_every: int,
    evaluate: Callable[[int], bool | None],
) -> bool:
    """The experiments' training loop: ``steps`` SGD steps of cross-entropy on random
    batches of ``batch`` examples drawn with ``generator``, ``evaluate(step)`` every
    ``eval_every`` steps and at the last one. Returns whether the run diverged: a
    non-finite loss, or ``evaluate`` returning ``False`` (it saw a non-finite measure)."""
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(y_train), (batch,), generator=generator)
        loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
        if not torch.isfinite(loss):
            return True
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step % eval_every == 0 or step == steps) and evaluate(step) is False:
            return True
    return False


def seed_list(ctx: Context) -> list[int]:
    """Three seeds at full budget (so a verdict can weigh an effect against the spread),
    the one ``ctx.seed`` in quick mode: :meth:`Context.seeds`."""
    return ctx.seeds()


def steps_for(ctx: Context, full: int) -> tuple[int, int]:
    """``(steps, eval_every)``: ``full`` scaled by the budget, or the quick-mode steps."""
    if ctx.quick:
        return QUICK_STEPS, max(1, QUICK_STEPS // 6)
    steps = max(10, round(full * ctx.budget))
    return steps, max(1, steps // 20)


def cached(ctx: Context, key: str, config: dict[str, Any],
           train: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The stored result of run ``key`` made with ``config``, or ``train()``'s, stored at
    once (so an interrupted experiment resumes from the runs it finished)."""
    config = {"data": ctx.data.describe(), **config}
    result = ctx.store.get(key, config) if ctx.resume else None
    if result is not None:
        ctx.echo(f"  {key}: reused from {ctx.store.path.name}")
        return result
    result = train()
    ctx.store.put(key, config, result)
    ctx.echo(f"  {key}: test accuracy {fmt_acc(result['final_test_acc'])} "
             f"in {result['seconds']:.1f} s")
    return result


def range_text(values: Sequence[float], scale: float = 100.0, digits: int = 1,
               suffix: str = "%") -> str:
    """Per-seed values as ``mean (min-max)`` (one value for one seed)."""
    v = [scale * x for x in values]
    text = f"{sum(v) / len(v):.{digits}f}{suffix}"
    if len(v) > 1:
        text += f" ({min(v):.{digits}f}-{max(v):.{digits}f})"
    return text


def new_figure(width: float, height: float) -> Figure:
    """An Agg figure with constrained layout (no pyplot state)."""
    return figures._figure(width, height)


def band(ax: Axes, lines: Bands, *, percent: bool = False, logy: bool = False,
         styles: Mapping[str, dict[str, Any]] | None = None) -> None:
    """Mean over seeds as a line, min-max over seeds as a shaded band (log axes: the
    geometric mean, which is what a log scale shows as the middle)."""
    for label, xs, per_seed in lines:
        # A run that diverged stopped early: its missing evaluations are NaN, left out.
        ys = np.full((len(per_seed), len(xs)), np.nan)
        for i, values in enumerate(per_seed):
            ys[i, :min(len(values), len(xs))] = [
                np.nan if v is None else v for v in values[:len(xs)]]
        if percent:
            ys = 100 * ys
        with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: no point
            middle = np.exp(np.nanmean(np.log(ys), 0)) if logy else np.nanmean(ys, 0)
            low, high = np.nanmin(ys, 0), np.nanmax(ys, 0)
        (line,) = ax.plot(xs, middle, label=label, linewidth=1.7, **(styles or {}).get(label, {}))
        if len(ys) > 1:
            ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    if percent:
        ax.yaxis.set_major_formatter(PercentFormatter(decimals=0))
    if logy:
        ax.set_yscale("log")  # matplotlib's own LogLocator/LogFormatter: plain 10^k ticks
    ax.grid(alpha=0.3, which="major")


def legend_outside(ax: Axes, **kwargs: Any) -> None:
    """The legend to the right of the axes, so it never covers a curve."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, **kwargs)


def save(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as PNG."""
    return figures.save(fig, path)


def finish(sections: list[Section], summary: Table, headline: str,
           verdict: Verdict) -> ExperimentResult:
    """The result; :func:`normlab.experiments.lab.run_experiment` ends the headline with
    the verdict and opens the report with it and its rule."""
    return ExperimentResult(sections, summary, headline, verdict=verdict)
