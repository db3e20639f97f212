"""The lab's plots read at a glance: checked on the matplotlib objects, not on file sizes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from normlab.experiments import figures

BATCHES = [2, 4, 8, 16, 32, 64]
LRS = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0]


def drawn(fig: Figure) -> Figure:
    fig.canvas.draw()  # tick labels and legend positions exist only after a draw
    return fig


def tick_texts(labels: list) -> list[str]:
    return [t.get_text() for t in labels if t.get_text()]


def data_axes(fig: Figure) -> list[Axes]:
    return [ax for ax in fig.axes if ax.has_data()]


def batch_error_figure(**options: object) -> Figure:
    return figures.sweep_figure(
        BATCHES,
        {"BatchNorm": [0.045, 0.02, 0.015, 0.016, 0.014, 0.014],
         "GroupNorm": [0.02, 0.018, 0.017, 0.016, 0.015, 0.02]},
        title="Test error vs batch size", xlabel="batch size", ylabel="test error",
        **options,
    )


def test_log_sweep_axis_is_ticked_at_the_swept_values_in_plain_numbers() -> None:
    fig = drawn(batch_error_figure())
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    assert tick_texts(ax.get_xticklabels()) == ["2", "4", "8", "16", "32", "64"]
    assert tick_texts(ax.get_xticklabels(minor=True)) == []
    fig = drawn(figures.sweep_figure(LRS, {"no norm": [0.9] * 7}, title="t",
                                     xlabel="learning rate", ylabel="final test accuracy"))
    assert tick_texts(fig.axes[0].get_xticklabels()) == ["0.01", "0.03", "0.1", "0.3", "1",
                                                         "3", "10"]


def assert_legend_outside(fig: Figure) -> None:
    legends = [leg for ax in fig.axes if (leg := ax.get_legend()) is not None] + fig.legends
    assert legends, "no legend"
    renderer = fig.canvas.get_renderer()
    for legend in legends:
        box = legend.get_window_extent(renderer)
        for ax in data_axes(fig):
            area = ax.get_window_extent(renderer)
            overlap_w = min(box.x1, area.x1) - max(box.x0, area.x0)
            overlap_h = min(box.y1, area.y1) - max(box.y0, area.y0)
            assert overlap_w <= 0 or overlap_h <= 0, f"legend {box} overlaps axes {area}"


def placement_series(spread: float) -> list[figures.Series]:
    steps = list(range(0, 1501, 25))
    t = np.array(steps, dtype=float)
    # Accuracy from 10% up to a plateau of 97% minus the spread per variant.
    return [(f"variant {i}", steps, list(0.97 - spread * i - 0.87 * np.exp(-t / (60 + 10 * i))))
            for i in range(5)]


def test_legends_lie_outside_the_data_area() -> None:
    assert_legend_outside(drawn(batch_error_figure()))
    assert_legend_outside(drawn(figures.curves_figure(placement_series(0.005), title="t",
                                                      hline=0.95, chance=0.1)))
    assert_legend_outside(drawn(figures.curves_figure(placement_series(0.2), title="t")))
    steps = [0, 10, 20]
    band = {"p15": [0.0, 0.1, 0.2], "p50": [1.0, 1.1, 1.2], "p85": [2.0, 2.1, 2.2]}
    assert_legend_outside(drawn(figures.percentiles_figure([("a", steps, band),
                                                            ("b", steps, band)], title="t")))


def test_accuracy_and_error_axes_are_in_percent() -> None:
    for fig in [batch_error_figure(), figures.curves_figure(placement_series(0.005), title="t"),
                figures.sweep_figure(LRS, {"BN": [0.5] * 7}, title="t", xlabel="lr",
                                     ylabel="final test accuracy")]:
        for ax in data_axes(drawn(fig)):
            labels = tick_texts(ax.get_yticklabels())
            assert labels and all(text.endswith("%") for text in labels), labels
    loss = drawn(figures.curves_figure(placement_series(0.2), title="t", ylabel="cross-entropy"))
    assert not any(t.endswith("%") for t in tick_texts(loss.axes[0].get_yticklabels()))


def test_fixed_axes_do_not_follow_the_noise() -> None:
    # Accuracy: 0-100% whatever the data spans (a quick run's 91-93% is not drama).
    noisy = [("a", [0, 1, 2], [0.91, 0.93, 0.92]), ("b", [0, 1, 2], [0.2, 0.5, 0.6])]
    assert figures.curves_figure(noisy, title="t").axes[0].get_ylim() == (0.0, 1.0)
    sweep = figures.sweep_figure([1, 2], {"a": [0.91, 0.93]}, title="t", xlabel="x",
                                 ylabel="test accuracy")
    assert sweep.axes[0].get_ylim() == (0.0, 1.0)
    # Error: from 0 always; pinned to 0-100% with fixed=True (quick / synthetic runs).
    assert batch_error_figure().axes[0].get_ylim()[0] == 0.0
    assert batch_error_figure(fixed=True).axes[0].get_ylim() == (0.0, 1.0)
    # An explicit ylim still wins.
    assert figures.curves_figure(noisy, title="t", ylim=(0.5, 1.0)).axes[0].get_ylim() == (
        0.5, 1.0)


def test_overlapping_curves_get_a_log_error_panel() -> None:
    close = drawn(figures.curves_figure(placement_series(0.005), title="t", hline=0.95))
    assert len(close.axes) == 2
    err = close.axes[1]
    assert err.get_yscale() == "log" and "error" in err.get_ylabel()
    # The panel plots 1 - accuracy of each series.
    first = placement_series(0.005)[0][2]
    np.testing.assert_allclose(err.get_lines()[0].get_ydata(), 1 - np.array(first))
    apart = figures.curves_figure(placement_series(0.2), title="t")
    assert len(apart.axes) == 1
    assert len(figures.curves_figure(placement_series(0.2), title="t",
                                     error_panel=True).axes) == 2


def test_reference_lines_are_labelled_in_percent() -> None:
    fig = figures.sweep_figure(LRS, {"BN": [0.5] * 7}, title="t", xlabel="lr",
                               ylabel="final test accuracy", chance=0.1, target=0.9)
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert "chance 10%" in labels and "target 90%" in labels
    levels = {line.get_label(): line.get_ydata()[0] for line in fig.axes[0].get_lines()}
    assert levels["chance 10%"] == 0.1 and levels["target 90%"] == 0.9


def test_plot_functions_still_write_pngs(tmp_path: Path) -> None:
    # The old call signatures, as the experiments use them.
    out = figures.sweep_plot(tmp_path / "s.png", BATCHES, {"BN": [0.1] * 6}, title="t",
                             xlabel="batch size", ylabel="test error",
                             failed={"BN": [False] * 6})
    curves = figures.curves_plot(tmp_path / "c.png", placement_series(0.01), title="t",
                                 hline=0.95, ylim=(0.0, 1.0))
    for path in (out, curves):
        assert path.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("metric, label, expected", [
    (None, "test error", "error"), (None, "final test accuracy", "accuracy"),
    (None, "cross-entropy", "other"), ("accuracy", "whatever", "accuracy"),
])
def test_metric_is_read_from_the_label(metric: str | None, label: str, expected: str) -> None:
    assert figures._metric(label, metric) == expected  # noqa: SLF001 - the rule itself
