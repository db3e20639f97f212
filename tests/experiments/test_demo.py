"""The demo's headline at a fixed seed: BatchNorm reaches the target in fewer steps."""

from __future__ import annotations

import json
from pathlib import Path

from normlab.experiments.demo import run_demo


def test_batchnorm_reaches_target_in_fewer_steps(tmp_path: Path) -> None:
    steps = 300
    result = run_demo(tmp_path, steps=steps, seed=0, target=0.95, norms=("none", "batch"),
                      progress=False, echo=lambda s: None)
    bn = result.runs["batch"]["steps_to_target"]
    plain = result.runs["none"]["steps_to_target"]
    assert bn is not None, "BatchNorm never reached 95% test accuracy"
    assert bn < (plain if plain is not None else steps + 1)
    assert result.runs["batch"]["final_test_acc"] >= 0.95
    # The outputs the CLI advertises.
    assert [row[0] for row in result.table.rows] == ["no norm", "BatchNorm"]
    assert "BatchNorm reached 95%" in result.headline
    assert (tmp_path / "demo_accuracy.png").stat().st_size > 0
    assert (tmp_path / "demo_loss.png").stat().st_size > 0
    assert "data:image/png;base64," in (tmp_path / "report.html").read_text()
    assert set(json.loads((tmp_path / "results.json").read_text())["runs"]) == {"none", "batch"}
