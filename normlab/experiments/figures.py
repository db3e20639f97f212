"""Plots for the lab, drawn with matplotlib's Agg canvas (no display, no pyplot state).

Each function writes one PNG and returns its path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["curves_plot", "norms_cube", "percentiles_plot", "save", "sweep_plot"]

Series = tuple[str, Sequence[float], Sequence[float | None]]


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


def curves_plot(
    path: str | Path,
    series: Sequence[Series],
    *,
    title: str,
    xlabel: str = "training step",
    ylabel: str = "test accuracy",
    hline: float | None = None,
    ylim: tuple[float, float] | None = None,
) -> Path:
    """One line per ``(label, xs, ys)``; ``hline`` marks a target (dashed)."""
    fig = _figure(6.4, 4.0)
    ax = fig.add_subplot()
    for label, xs, ys in series:
        ax.plot(xs, _values(ys), label=label, linewidth=1.6)
    if hline is not None:
        ax.axhline(hline, color="gray", linestyle="--", linewidth=1, label=f"target {hline:g}")
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    return save(fig, path)


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
) -> Path:
    """One marked line per series over a swept ``xs``; ``failed`` points get an ``x``."""
    fig = _figure(6.4, 4.0)
    ax = fig.add_subplot()
    for label, ys in series.items():
        (line,) = ax.plot(xs, _values(ys), marker="o", label=label, linewidth=1.6)
        if failed and label in failed:
            bad = [i for i, f in enumerate(failed[label]) if f]
            ax.plot([xs[i] for i in bad], [_values(ys)[i] for i in bad], "x",
                    color=line.get_color(), markersize=11, markeredgewidth=2)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3, which="both")
    ax.legend(title="x = diverged" if failed and any(any(v) for v in failed.values()) else None)
    return save(fig, path)


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
    fig = _figure(4.0 * len(panels), 3.6)
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    for ax, (name, steps, pct) in zip(axes, panels, strict=True):
        ax.fill_between(steps, pct["p15"], pct["p85"], alpha=0.25, label="15th-85th")
        ax.plot(steps, pct["p50"], linewidth=1.8, label="median")
        ax.plot(steps, pct["p15"], linewidth=0.8, color="C0")
        ax.plot(steps, pct["p85"], linewidth=0.8, color="C0")
        ax.set(title=name, xlabel="training step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("input to the sigmoid")
    axes[0].legend()
    fig.suptitle(title)
    return save(fig, path)


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
