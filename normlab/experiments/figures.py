"""Plots for the lab, drawn with matplotlib's Agg canvas (no display, no pyplot state).

Each ``*_plot`` function writes one PNG and returns its path; the matching ``*_figure``
function builds the same :class:`~matplotlib.figure.Figure` without writing it (for
tests, or to draw more on it).

Conventions, so a plot reads at a glance: accuracy and error axes in percent, accuracy on
a fixed 0-100% axis, error axes from 0 (and 0-100% with ``fixed=True``, for quick or
synthetic runs whose noise should not be blown up), log sweep axes ticked at the swept
values in plain numbers, legends outside the data area, dashed target and dotted chance
lines, and a log-error panel beside accuracy curves that would lie on top of each other.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

__all__ = [
    "curves_figure",
    "curves_plot",
    "norms_cube",
    "percentiles_figure",
    "percentiles_plot",
    "save",
    "sweep_figure",
    "sweep_plot",
]

Series = tuple[str, Sequence[float], Sequence[float | None]]
Metric = Literal["accuracy", "error", "other"]

# Accuracy curves whose last values lie within this many points of each other, above
# OVERLAP_FLOOR, are drawn on top of each other on a 0-100% axis: they get an error panel.
OVERLAP_POINTS = 0.10
OVERLAP_FLOOR = 0.5


# Fractions as percent, no trailing zeros: "4%", "0.5%", "100%".
_PERCENT = FuncFormatter(lambda v, _pos: f"{100 * v:.4g}%")


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)  # the Agg canvas, whatever backend pyplot would pick
    return fig


def save(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as PNG to ``path`` (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _values(ys: Sequence[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in ys], dtype=float)


def _metric(ylabel: str, metric: Metric | None) -> Metric:
    """What the y axis shows: given, or read from its label."""
    if metric is not None:
        return metric
    text = ylabel.lower()
    return "error" if "error" in text else "accuracy" if "accuracy" in text else "other"


def _percent_axis(ax: Axes, metric: Metric, *, fixed: bool, log: bool = False) -> None:
    """Percent ticks on y; accuracy on 0-100%, error from 0 (0-100% when ``fixed``)."""
    if metric == "other":
        return
    ax.yaxis.set_major_formatter(_PERCENT)
    if log:
        # Ticks at 1-2-5 steps ("2%", "5%", "10%") where the data spans few decades: a
        # decade-only axis says too little there (matplotlib drops subs over many decades).
        low, high = ax.get_ylim()
        if 0 < low < high and np.log10(high / low) <= 4:
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_minor_formatter(NullFormatter())  # minor labels would crowd the axis
        return
    if metric == "accuracy" or fixed:
        ax.set_ylim(0.0, 1.0)
    else:
        ax.set_ylim(bottom=0.0)


def _ref_lines(ax: Axes, metric: Metric, target: float | None, chance: float | None) -> None:
    """A dashed target line and a dotted chance line, labelled in the axis' units."""
    def fmt(v: float) -> str:
        return f"{100 * v:g}%" if metric != "other" else f"{v:g}"

    if target is not None:
        ax.axhline(target, color="0.35", linestyle="--", linewidth=1, label=f"target {fmt(target)}")
    if chance is not None:
        ax.axhline(chance, color="0.35", linestyle=":", linewidth=1.2,
                   label=f"chance {fmt(chance)}")


def _legend_outside(ax: Axes, title: str | None = None, source: Axes | None = None) -> None:
    """The legend right of ``ax``, so it never hides a curve; its entries are those of
    ``source`` (default ``ax``)."""
    handles, labels = (source or ax).get_legend_handles_labels()
    ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0),
              borderaxespad=0.0, title=title, fontsize="small", title_fontsize="small")


def _overlapping(series: Sequence[Series]) -> bool:
    """True when the curves end within OVERLAP_POINTS of each other, above OVERLAP_FLOOR."""
    last = []
    for _, _, ys in series:
        finite = _values(ys)[np.isfinite(_values(ys))]
        if finite.size:
            last.append(float(finite[-1]))
    return (len(last) >= 2 and min(last) > OVERLAP_FLOOR
            and max(last) - min(last) < OVERLAP_POINTS)


def curves_figure(
    series: Sequence[Series],
    *,
    title: str,
    xlabel: str = "training step",
    ylabel: str = "test accuracy",
    hline: float | None = None,
    ylim: tuple[float, float] | None = None,
    chance: float | None = None,
    metric: Metric | None = None,
    fixed: bool = False,
    error_panel: bool | None = None,
) -> Figure:
    """One line per ``(label, xs, ys)``: see :func:`curves_plot`."""
    kind = _metric(ylabel, metric)
    if error_panel is None:
        error_panel = kind == "accuracy" and _overlapping(series)
    fig = _figure(9.6 if error_panel else 6.8, 4.0)
    axes = fig.subplots(1, 2 if error_panel else 1, squeeze=False)[0]
    ax = axes[0]
    for label, xs, ys in series:
        ax.plot(xs, _values(ys), label=label, linewidth=1.6)
    _ref_lines(ax, kind, hline, chance)
    _percent_axis(ax, kind, fixed=fixed)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set(title=title if not error_panel else "test accuracy", xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    if error_panel:
        # Test error on a log axis: 2% vs 3% error are far apart here, one pixel apart on
        # the 0-100% accuracy axis. An error of exactly 0 has no place on it and is left out.
        err_ax = axes[1]
        for label, xs, ys in series:
            err = 1.0 - _values(ys)
            err_ax.plot(xs, np.where(err > 0, err, np.nan), label=label, linewidth=1.6)
        if hline is not None:
            err_ax.axhline(1.0 - hline, color="0.35", linestyle="--", linewidth=1)
        err_ax.set_yscale("log")
        if err_ax.get_ylim()[1] > 1.0:  # no error above 100%: the margin would show one
            err_ax.set_ylim(top=1.0)
        _percent_axis(err_ax, "error", fixed=fixed, log=True)
        err_ax.set(title="test error (log scale)", xlabel=xlabel, ylabel="test error")
        err_ax.grid(alpha=0.3, which="both")
        fig.suptitle(title)
    # One legend, right of the last panel, listing the accuracy panel's lines (the error
    # panel draws the same series in the same colours and the target in the same style).
    _legend_outside(axes[-1], source=ax)
    return fig


def curves_plot(
    path: str | Path,
    series: Sequence[Series],
    *,
    title: str,
    xlabel: str = "training step",
    ylabel: str = "test accuracy",
    hline: float | None = None,
    ylim: tuple[float, float] | None = None,
    chance: float | None = None,
    metric: Metric | None = None,
    fixed: bool = False,
    error_panel: bool | None = None,
) -> Path:
    """One line per ``(label, xs, ys)``; write the PNG to ``path``.

    ``hline`` marks a target (dashed), ``chance`` the accuracy of guessing (dotted). An
    accuracy axis (``metric``, or "accuracy"/"error" in ``ylabel``) is in percent and
    spans 0-100%; ``error_panel`` adds test error on a log axis beside it (default: when
    the curves end too close together to tell apart).
    """
    fig = curves_figure(series, title=title, xlabel=xlabel, ylabel=ylabel, hline=hline,
                        ylim=ylim, chance=chance, metric=metric, fixed=fixed,
                        error_panel=error_panel)
    return save(fig, path)


def _plain_log_ticks(ax: Axes, xs: Sequence[float]) -> None:
    """Ticks at the swept values, labelled as plain numbers (``0.03``, ``64``), no minor
    labels: matplotlib's defaults mix 10^k and "3x10^-2" labels that collide."""
    ax.xaxis.set_major_locator(FixedLocator(sorted(float(x) for x in xs)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def sweep_figure(
    xs: Sequence[float],
    series: Mapping[str, Sequence[float | None]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    logx: bool = True,
    logy: bool = False,
    failed: Mapping[str, Sequence[bool]] | None = None,
    chance: float | None = None,
    target: float | None = None,
    metric: Metric | None = None,
    fixed: bool = False,
) -> Figure:
    """One marked line per series over a swept ``xs``: see :func:`sweep_plot`."""
    kind = _metric(ylabel, metric)
    fig = _figure(6.8, 4.0)
    ax = fig.add_subplot()
    for label, ys in series.items():
        (line,) = ax.plot(xs, _values(ys), marker="o", label=label, linewidth=1.6)
        if failed and label in failed:
            bad = [i for i, f in enumerate(failed[label]) if f]
            ax.plot([xs[i] for i in bad], [_values(ys)[i] for i in bad], "x",
                    color=line.get_color(), markersize=11, markeredgewidth=2)
    _ref_lines(ax, kind, target, chance)
    if logx:
        ax.set_xscale("log")
        _plain_log_ticks(ax, xs)
    if logy:
        ax.set_yscale("log")
    _percent_axis(ax, kind, fixed=fixed, log=logy)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    diverged = failed and any(any(v) for v in failed.values())
    _legend_outside(ax, title="x = diverged" if diverged else None)
    return fig


def sweep_plot(
    path: str | Path,
    xs: Sequence[float],
    series: Mapping[str, Sequence[float | None]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    logx: bool = True,
    logy: bool = False,
    failed: Mapping[str, Sequence[bool]] | None = None,
    chance: float | None = None,
    target: float | None = None,
    metric: Metric | None = None,
    fixed: bool = False,
) -> Path:
    """One marked line per series over a swept ``xs``; ``failed`` points get an ``x``.

    A log ``x`` axis is ticked at the swept values. Accuracy/error axes are in percent;
    ``fixed`` pins an error axis to 0-100% (accuracy always is), ``target``/``chance``
    draw dashed/dotted reference lines.
    """
    fig = sweep_figure(xs, series, title=title, xlabel=xlabel, ylabel=ylabel, logx=logx,
                       logy=logy, failed=failed, chance=chance, target=target, metric=metric,
                       fixed=fixed)
    return save(fig, path)


def percentiles_figure(
    panels: Sequence[tuple[str, Sequence[int], Mapping[str, Sequence[float]]]],
    *,
    title: str,
) -> Figure:
    """Percentile bands over steps, one panel each: see :func:`percentiles_plot`."""
    fig = _figure(4.0 * len(panels) + 1.4, 3.6)
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    for ax, (name, steps, pct) in zip(axes, panels, strict=True):
        ax.fill_between(steps, pct["p15"], pct["p85"], alpha=0.25, label="15th-85th")
        ax.plot(steps, pct["p50"], linewidth=1.8, label="median")
        ax.plot(steps, pct["p15"], linewidth=0.8, color="C0")
        ax.plot(steps, pct["p85"], linewidth=0.8, color="C0")
        ax.set(title=name, xlabel="training step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("input to the sigmoid")
    _legend_outside(axes[-1])
    fig.suptitle(title)
    return fig


def percentiles_plot(
    path: str | Path,
    panels: Sequence[tuple[str, Sequence[int], Mapping[str, Sequence[float]]]],
    *,
    title: str,
) -> Path:
    """Side-by-side panels of percentile bands over steps (the BN paper's Figure 1 b, c).

    Each panel is ``(title, steps, {"p15": [...], "p50": [...], "p85": [...]})``; the
    panels share the y axis so the drift without BN is comparable to the BN panel.
    """
    return save(percentiles_figure(panels, title=title), path)


# Which elements of an [N, C, H*W] tensor share one mean/variance, as functions of the
# voxel grid indices (n, c, s): the highlighted set for sample 0 / channel 0 / group 0.
_NORM_SETS = {
    "Batch Norm": lambda n, c, s, g: c == 0,
    "Layer Norm": lambda n, c, s, g: n == 0,
    "Instance Norm": lambda n, c, s, g: (n == 0) & (c == 0),
    "Group Norm": lambda n, c, s, g: (n == 0) & (c < g),
}


def norms_cube(path: str | Path, n: int = 4, c: int = 6, hw: int = 5, group: int = 2) -> Path:
    """The ``[N, C, H*W]`` cube for BN, LN, IN and GN, shading one set of elements that
    is normalized by the same mean and variance (after the GroupNorm paper's Figure 2).
    """
    if c % group:
        raise ValueError(f"group size {group} must divide the channel count {c}")
    fig = _figure(13.0, 3.6)
    nn_, cc, ss = np.indices((n, c, hw))
    for i, (name, rule) in enumerate(_NORM_SETS.items(), start=1):
        ax = fig.add_subplot(1, 4, i, projection="3d")
        chosen = rule(nn_, cc, ss, group)
        colors = np.where(chosen[..., None], [0.23, 0.45, 0.85, 0.95], [0.9, 0.9, 0.9, 0.25])
        # voxels() takes [x, y, z] = [C, N, H*W]: channels across, batch in depth, space up.
        ax.voxels(
            np.ones((c, n, hw), dtype=bool),
            facecolors=colors.transpose(1, 0, 2, 3),
            edgecolor=(0.3, 0.3, 0.3, 0.35),
            linewidth=0.4,
        )
        ax.set_xlabel("C", labelpad=-12)
        ax.set_ylabel("N", labelpad=-12)
        ax.zaxis.set_rotate_label(False)
        ax.set_zlabel("H, W", labelpad=-12, rotation=90)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_zticks([])
        ax.set_box_aspect((c, n, hw))
        ax.view_init(elev=22, azim=-58)
        ax.set_title(name, pad=0)
    fig.suptitle(
        "Blue: the elements that share one mean and variance "
        f"(N={n}, C={c}, H*W={hw}; Group Norm with {c // group} groups of {group} channels)",
        fontsize=10,
    )
    return save(fig, path)


# One series over seeds: (label, xs, one list of ys per seed).
Band = tuple[str, Sequence[float], Sequence[Sequence[float | None]]]


def _seed_matrix(runs: Sequence[Sequence[float | None]], width: int) -> np.ndarray:
    """``[seeds, width]``; a shorter run (stopped when its loss diverged) keeps its last
    value: a diverged network stays broken, and NaN would drop it from the band."""
    rows = []
    for ys in runs:
        row = _values(ys)
        rows.append(np.concatenate([row, np.full(width - len(row), row[-1] if len(row)
                                                 else np.nan)]))
    return np.vstack(rows)


def band_plot(
    path: str | Path,
    bands: Sequence[Band],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    percent: bool = True,
    logx: bool = False,
    hlines: Mapping[str, float] | None = None,
    ylim: tuple[float, float] | None = None,
    markers: bool = False,
    zoom: tuple[float, float] | None = None,
) -> Path:
    """The mean over seeds of each ``(label, xs, [ys per seed])`` with a min-max band.

    ``percent`` shows fractions as %; ``hlines`` maps a label ("chance", "target 95%") to
    a dashed reference level (a fraction, like the data); ``logx`` labels the ticks with
    the swept values themselves. ``zoom`` (a y range, fractions) adds a second panel
    where curves that end close together can be told apart. The legend sits outside the
    axes, so no curve hides under it, and says how many seeds the bands span."""
    scale = 100.0 if percent else 1.0
    fig = _figure(11.5 if zoom else 7.6, 4.0)
    axes = fig.subplots(1, 2 if zoom else 1, squeeze=False)[0]
    for k, ax in enumerate(axes):
        seeds = _draw_bands(ax, bands, scale, hlines, logx, markers, legend=k == 0)
        ax.set(xlabel=xlabel, ylabel=f"{ylabel} (%)" if percent else ylabel)
        ax.grid(alpha=0.3)
    limits = [ylim, zoom]
    for ax, lim in zip(axes, limits, strict=False):
        if lim is not None:
            ax.set_ylim(lim[0] * scale, lim[1] * scale)
    axes[0].set_title(title)
    if zoom:
        axes[1].set_title(f"zoom: {zoom[0] * scale:g}-{zoom[1] * scale:g}"
                          f"{'%' if percent else ''}")
    note = f"mean, band: min-max\nover {seeds} seeds" if seeds > 1 else "1 seed"
    fig.legend(loc="outside right upper", title=note, fontsize=9, title_fontsize=9)
    return save(fig, path)


def _draw_bands(ax: Axes, bands: Sequence[Band], scale: float,
                hlines: Mapping[str, float] | None, logx: bool, markers: bool,
                legend: bool) -> int:
    """Draw the mean lines and min-max bands on ``ax``; returns the number of seeds."""
    widest: Sequence[float] = max((xs for _, xs, _ in bands), key=len, default=[])
    seeds = 0
    for i, (label, xs, runs) in enumerate(bands):
        ys = _seed_matrix(runs, len(xs)) * scale
        seeds = max(seeds, len(ys))
        color = f"C{i % 10}"
        ax.plot(xs, np.nanmean(ys, axis=0), color=color, linewidth=1.7,
                label=label if legend else None, marker="o" if markers else None,
                markersize=4)
        if len(ys) > 1:
            ax.fill_between(xs, np.nanmin(ys, axis=0), np.nanmax(ys, axis=0), color=color,
                            alpha=0.18, linewidth=0)
    for j, (name, level) in enumerate((hlines or {}).items()):
        ax.axhline(level * scale, color="0.35", linestyle=("--", ":", "-.")[j % 3],
                   linewidth=1, label=name if legend else None)
    if logx:
        ax.set_xscale("log")
        ax.set_xticks(list(widest), [f"{x:g}" for x in widest])
        ax.minorticks_off()
    return seeds
