"""The demo's headline at a fixed seed: BatchNorm reaches the target in fewer steps."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from normlab.experiments import demo
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


class SlowFirstCall:
    """Stands in for a first-run kernel compilation: BatchNorm1d's first forward sleeps
    (and prints normlab's own compile notice, as the runtime does)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.calls = 0

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import normlab

        forward = normlab.BatchNorm1d.forward

        def slow_forward(module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            if self.calls == 1:
                print("normlab: compiling the CPU kernels on first use (test)", file=sys.stderr)
                time.sleep(self.seconds)
            return forward(module, *args, **kwargs)

        monkeypatch.setattr(normlab.BatchNorm1d, "forward", slow_forward)


def test_train_time_excludes_the_warm_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    slow = SlowFirstCall(1.5)
    slow.install(monkeypatch)
    monkeypatch.setattr(demo, "kernels_will_compile", lambda: True)
    said: list[str] = []
    result = run_demo(tmp_path, steps=20, seed=0, norms=("none", "batch"), progress=False,
                      echo=said.append)
    assert slow.calls > 1
    # The slow first call happened in the warm-up, recorded apart from the train time.
    assert result.warmup_seconds["batch"] >= 1.5
    assert result.runs["batch"]["seconds"] < 1.5
    assert result.table.rows[1][-1] == f"{result.runs['batch']['seconds']:.1f} s"
    stored = json.loads((tmp_path / "results.json").read_text())
    assert stored["warmup_seconds"]["batch"] >= 1.5
    # One plain notice, before any training line; the runtime's own is not repeated.
    compile_lines = [i for i, line in enumerate(said) if "compil" in line]
    first_run = next(i for i, line in enumerate(said) if "test accuracy" in line)
    assert compile_lines == [1] and compile_lines[0] < first_run, said
    assert said[compile_lines[0]] == demo.COMPILE_NOTICE
    assert "normlab: compiling" not in capsys.readouterr().err


def test_no_compile_notice_when_the_kernels_are_cached(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo, "kernels_will_compile", lambda: False)
    said: list[str] = []
    result = run_demo(tmp_path, steps=10, seed=0, norms=("layer",), progress=False,
                      echo=said.append)
    assert not any("compil" in line for line in said), said
    assert set(result.warmup_seconds) == {"layer"}


def test_kernels_will_compile_only_on_the_numba_backend() -> None:
    import normlab

    with normlab.use_backend("torch"):
        assert demo.kernels_will_compile() is False
