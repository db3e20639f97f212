"""The gradients, train-eval and regularization experiments: quick runs end to end (JSON,
PNGs, report, verdict, resume), and their measurements against independent computations."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import normlab
from normlab.experiments import gradients, regularization, train_eval
from normlab.experiments.data import load_digits
from normlab.experiments.lab import QUICK_STEPS, run_experiment
from normlab.experiments.registry import EXPERIMENTS

DIGITS = load_digits()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Experiment -> (runs in quick mode, PNGs it writes)
NEW = {"gradients": (4, 3), "train-eval": (1, 2), "regularization": (4, 2)}


@pytest.mark.parametrize("name", list(NEW))
def test_quick_run_writes_everything_and_resumes(tmp_path: Path, name: str) -> None:
    first: list[str] = []
    report, result = run_experiment(name, tmp_path, quick=True, progress=False, data=DIGITS,
                                    echo=first.append)
    stored = json.loads((tmp_path / "results.json").read_text())
    runs, pngs = NEW[name]
    assert stored["experiment"] == name and stored["quick"] is True
    assert len(stored["runs"]) == runs
    for entry in stored["runs"].values():
        r = entry["result"]
        assert r["steps"][-1] == QUICK_STEPS and entry["config"]["train"]["steps"] == QUICK_STEPS
        assert len(r["test_acc"]) == len(r["steps"]) and 0.0 <= r["final_test_acc"] <= 1.0
    written = sorted(tmp_path.glob("*.png"))
    assert len(written) == pngs and all(p.read_bytes()[:8] == PNG_MAGIC for p in written)
    page = report.read_text()
    assert report.name == "report.html" and EXPERIMENTS[name].title in page
    # One seed cannot show the seed-to-seed spread: never more than inconclusive.
    assert "Verdict: inconclusive (" in result.headline and "Verdict: inconclusive" in page
    assert result.summary is not None and result.summary.rows
    assert result.verdict is not None and result.verdict.outcome == "inconclusive"

    second: list[str] = []
    run_experiment(name, tmp_path, quick=True, progress=False, data=DIGITS, echo=second.append)
    trained = [m for m in second if m.startswith("  ") and "reused" not in m]
    assert not trained and sum("reused" in m for m in second) == runs
    assert json.loads((tmp_path / "results.json").read_text())["runs"] == stored["runs"]


# --- gradients -------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["none", "batch"])
def test_gradient_norms_match_autograd(norm: str) -> None:
    torch.manual_seed(0)
    model = gradients.build(norm, "default", 64, 10)
    x, y = DIGITS.flat()[0][:32], DIGITS.y_train[:32]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    norms, saturated = gradients.gradient_norms(model, x, y)
    # gradient_norms works on a copy: weights, grads and running statistics untouched.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    model.train()
    loss = nn.functional.cross_entropy(model(x), y)
    weights = [getattr(model, f"fc{i}").weight for i in range(1, gradients.DEPTH + 1)]
    expected = [float(g.norm()) for g in torch.autograd.grad(loss, weights)]
    assert len(norms) == gradients.DEPTH == len(saturated)
    for got, want in zip(norms, expected, strict=True):
        assert got == pytest.approx(want, rel=1e-5)
    if norm == "none":  # the vanishing the experiment is about, at init
        assert norms[-1] / norms[0] > 1e3


def test_saturated_fraction_by_hand() -> None:
    # sigmoid'(z): 0.25, 0.197, 0.0177, 0.0090, 4.5e-5, ~0 -> the last three are < 0.01
    z = torch.tensor([0.0, 1.0, -4.0, 4.7, -10.0, 100.0])
    assert gradients.saturated_fraction(z) == pytest.approx(0.5)
    assert gradients.saturated_fraction(z, threshold=0.02) == pytest.approx(4 / 6)
    assert gradients.saturated_fraction(torch.zeros(10)) == 0.0


def test_gradient_ratio_and_rule() -> None:
    run = {"grad_norms": [[1e-4, 1.0, 1.0], [1e-2, 1.0, 1.0]]}  # 1e4 and 1e2: geometric 1e3
    assert gradients.ratio(run) == pytest.approx(1e3)
    assert gradients.decide([1e3, 50.0], [1.0, 2.0]).outcome == "reproduced"
    assert gradients.decide([1e3, 5.0], [1.0, 2.0]).outcome == "inconclusive"
    assert gradients.decide([5.0, 3.0], [1.0, 2.0]).outcome == "not reproduced"
    assert gradients.decide([1e3], [1.0]).outcome == "inconclusive"


# --- train-eval ------------------------------------------------------------------------


def _bn_net() -> nn.Sequential:
    torch.manual_seed(1)
    net = nn.Sequential()
    net.add_module("fc1", nn.Linear(64, 20, bias=False))
    net.add_module("norm1", normlab.BatchNorm1d(20))
    net.add_module("act1", nn.ReLU())
    net.add_module("out", nn.Linear(20, 10))
    with torch.no_grad():
        net.norm1.weight.uniform_(0.5, 1.5)
        net.norm1.bias.uniform_(-0.5, 0.5)
        net.norm1.running_mean.normal_()
        net.norm1.running_var.uniform_(0.5, 2.0)
    return net.eval()


def test_batch_statistics_accuracy_by_hand() -> None:
    net = _bn_net()
    x, y = DIGITS.flat()[1][:100], DIGITS.y_test[:100]
    before = net.norm1.running_mean.clone()
    got = train_eval.batch_stats_accuracy(net, x, y, 8)
    assert torch.equal(net.norm1.running_mean, before) and not net.training
    correct = 0
    with torch.no_grad():
        for i in range(0, 96, 8):  # the ragged last 4 are left out
            h = net.fc1(x[i:i + 8])
            h = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + net.norm1.eps)
            h = torch.relu(h * net.norm1.weight + net.norm1.bias)
            correct += int((net.out(h).argmax(1) == y[i:i + 8]).sum())
    assert got == pytest.approx(correct / 96)


def test_single_sample_is_refused_and_would_predict_one_class() -> None:
    net = _bn_net()
    x, y = DIGITS.flat()[1], DIGITS.y_test
    error = train_eval.single_sample(net, x)
    assert error is not None and error.startswith("ValueError")
    with torch.no_grad():
        constant = net.out(torch.relu(net.norm1.bias)).argmax()
    assert train_eval.constant_prediction_accuracy(net, x, y) == pytest.approx(
        float((y == constant).double().mean()))


def test_reestimated_statistics_are_the_inputs_statistics() -> None:
    net = _bn_net()
    x = DIGITS.flat()[0][:128]
    adapted = train_eval.reestimated(net, x, batch=64, passes=2)
    with torch.no_grad():
        h = net.fc1(x)
    assert not adapted.training
    torch.testing.assert_close(adapted.norm1.running_mean, h.mean(0), atol=1e-5, rtol=1e-5)
    # the running variance averages the batches' unbiased variances (batches of 64)
    assert adapted.norm1.running_var.min() > 0
    assert not torch.equal(net.norm1.running_mean, adapted.norm1.running_mean)


# --- regularization --------------------------------------------------------------------


def test_regularization_models_and_rule() -> None:
    kinds = {(bn, d): [type(m).__name__ for m in regularization.build(64, 10, bn, d)]
             for bn, d in regularization.VARIANTS}
    assert "BatchNorm1d" in kinds[True, False] and "Dropout" not in kinds[True, False]
    assert kinds[False, True].count("Dropout") == 3 and "BatchNorm1d" not in kinds[False, True]

    def run(train: float, test: float) -> dict[str, list[float] | float]:
        return {"train_acc": [train], "test_acc": [test], "final_test_acc": test}

    # BN: gap 2 points instead of 10; dropout helps the plain net by 5 points, BN's by 0.
    results = {"plain": [run(1.0, 0.90)] * 2, "dropout": [run(1.0, 0.95)] * 2,
               "BN": [run(1.0, 0.98)] * 2, "BN + dropout": [run(1.0, 0.98)] * 2}
    assert regularization.gap(results["plain"][0]) == pytest.approx(0.10)
    assert regularization.decide(results, 359).outcome == "reproduced"
    results["BN"] = [run(1.0, 0.88)] * 2  # BN's gap wider than the plain net's
    assert regularization.decide(results, 359).outcome == "not reproduced"
    assert math.isclose(regularization.gap(run(0.5, 0.5)), 0.0)


def test_band_draws_geometric_mean_and_skips_a_diverged_seeds_missing_points() -> None:
    from normlab.experiments import seeded

    fig = seeded.new_figure(4, 3)
    ax = fig.add_subplot()
    # the second seed diverged after two evaluations (None marks a non-finite value)
    seeded.band(ax, [("g", [0, 1, 2], [[1e-2, 1e-4, 1e-6], [1e-4, None]])], logy=True)
    middle = ax.lines[0].get_ydata()
    assert middle == pytest.approx([1e-3, 1e-4, 1e-6])
    assert ax.get_yscale() == "log"
