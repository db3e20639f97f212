"""Models, the training loop and the resumable result store."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import normlab
from normlab.experiments.data import load_digits
from normlab.experiments.models import build, init_weights, mlp
from normlab.experiments.runs import ResultStore, TrainSpec, atomic_write_json, fit

DIGITS = load_digits().subset(256, 128, seed=0)

MODEL_TABLE = [
    ({"kind": "mlp", "hidden": [16, 12], "norm": "none"}, nn.Identity),
    ({"kind": "mlp", "hidden": [16, 12], "norm": "batch"}, normlab.BatchNorm1d),
    ({"kind": "mlp", "hidden": [16, 12], "norm": "layer"}, normlab.LayerNorm),
    ({"kind": "mlp", "hidden": [16, 12], "norm": "group"}, normlab.GroupNorm),
    ({"kind": "cnn", "norm": "batch", "widths": [4, 8]}, normlab.BatchNorm2d),
    ({"kind": "cnn", "norm": "group", "widths": [4, 8]}, normlab.GroupNorm),
    ({"kind": "cnn", "norm": "layer", "widths": [4, 8]}, normlab.LayerNorm),
    ({"kind": "cnn", "norm": "instance", "widths": [4, 8]}, normlab.InstanceNorm2d),
]


@pytest.mark.parametrize("spec, norm_type", MODEL_TABLE, ids=lambda v: str(v))
def test_build_uses_normlab_layers(spec: dict, norm_type: type) -> None:
    model = build(spec, (1, 8, 8), 10)
    norms = [m for name, m in model.named_modules() if name.startswith("norm")]
    assert len(norms) == 2 and all(type(m) is norm_type for m in norms)
    x = DIGITS.x_train[:5]
    out = model(x.flatten(1) if spec["kind"] == "mlp" else x)
    assert out.shape == (5, 10)


def test_mlp_placement_orders_layers() -> None:
    names = lambda m: [n for n, _ in m.named_children()]  # noqa: E731
    assert names(mlp(4, [3], 2, norm="batch")) == ["fc1", "norm1", "act1", "out"]
    assert names(mlp(4, [3], 2, norm="batch", placement="after")) == ["fc1", "act1", "norm1",
                                                                       "out"]
    assert names(mlp(4, [3], 2, input_norm=True, output_norm=True)) == [
        "norm_in", "fc1", "norm1", "act1", "out", "norm_out"]
    with pytest.raises(ValueError, match="norm must be one of"):
        mlp(4, [3], 2, norm="weird")


@pytest.mark.parametrize("scale", [0.1, 1.0, 10.0])
def test_init_weights_std(scale: float) -> None:
    torch.manual_seed(0)
    model = mlp(400, [300], 2)
    init_weights(model, scale)
    expected = scale * math.sqrt(2.0 / 400)
    assert float(model.fc1.weight.detach().std()) == pytest.approx(expected, rel=0.02)
    assert float(model.fc1.bias.detach().abs().max()) == 0.0


def test_fit_is_seeded_and_records_a_curve() -> None:
    spec = TrainSpec(steps=30, batch_size=16, lr=0.1, eval_every=10, seed=3, target=0.5)
    make = lambda: build({"kind": "mlp", "hidden": [32], "norm": "batch"}, (1, 8, 8), 10)  # noqa: E731
    a = fit(make, DIGITS, spec, flat=True, probe="act1", probe_unit=2)
    b = fit(make, DIGITS, spec, flat=True, probe="act1", probe_unit=2)
    assert a["steps"] == [0, 10, 20, 30]
    assert a["test_acc"] == b["test_acc"] and a["probe"] == b["probe"]
    assert a["test_acc"][-1] > 0.5 > a["test_acc"][0]  # it learns, from chance
    first = next(s for s, acc in zip(a["steps"], a["test_acc"], strict=True) if acc >= 0.5)
    assert a["steps_to_target"] == first
    p = a["probe"]
    assert all(lo <= mid <= hi for lo, mid, hi in zip(p["p15"], p["p50"], p["p85"], strict=True))
    json.dumps(a, allow_nan=False)


def test_fit_stops_on_divergence() -> None:
    spec = TrainSpec(steps=50, batch_size=16, lr=1e6, eval_every=10)
    result = fit(lambda: build({"kind": "mlp", "hidden": [32, 32], "norm": "none"}, (1, 8, 8),
                               10), DIGITS, spec, flat=True)
    assert result["diverged"] and result["steps"][-1] < 50
    json.dumps(result, allow_nan=False)  # NaN losses are stored as null


def test_atomic_write_keeps_old_file_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    atomic_write_json(path, {"a": 1})
    with pytest.raises(ValueError):
        atomic_write_json(path, {"a": float("nan")})  # not JSON: fails mid-write
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary left behind


def test_result_store_resumes_only_identical_runs(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    store = ResultStore(path, "exp")
    config = {"lr": 0.1, "hidden": (3, 4)}
    store.put("run", config, {"acc": 0.5})
    again = ResultStore(path, "exp")
    assert again.get("run", {"lr": 0.1, "hidden": [3, 4]}) == {"acc": 0.5}
    assert again.get("run", {"lr": 0.2, "hidden": [3, 4]}) is None  # config changed
    assert again.get("other", config) is None
    assert ResultStore(path, "another-experiment").runs == {}
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ResultStore(path, "exp")


def test_an_experiment_run_is_timed_after_its_warm_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first run's slow first call (kernel compilation, simulated) happens in the
    untimed warm-up, once per model, with one plain notice before training; the run's
    seconds leave it out."""
    import time

    from normlab.experiments import lab

    calls = {"n": 0}
    forward = normlab.BatchNorm1d.forward

    def slow_first(module: nn.Module, *args: object, **kwargs: object) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 1:
            time.sleep(1.0)
        return forward(module, *args, **kwargs)

    monkeypatch.setattr(normlab.BatchNorm1d, "forward", slow_first)
    monkeypatch.setattr(lab, "kernels_will_compile", lambda: True)
    said: list[str] = []
    ctx = lab.Context(DIGITS, tmp_path, ResultStore(tmp_path / "results.json", "t"),
                      quick=True, progress=False, echo=said.append)
    model = {"kind": "mlp", "hidden": [16], "norm": "batch"}
    first = ctx.run("a", model, ctx.spec(10, batch_size=16))
    second = ctx.run("b", model, ctx.spec(10, batch_size=16, lr=0.05))
    assert calls["n"] > 2 and first["seconds"] < 1.0 and second["seconds"] < 1.0
    assert said[0] == lab.COMPILE_NOTICE and "not counted" in said[1]
    assert sum("compil" in line for line in said) == 1 and len(ctx.warmed) == 1
