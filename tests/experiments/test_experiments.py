"""Every experiment at a tiny budget: JSON results, PNG plots, a self-contained report."""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path

import pytest

from normlab.experiments.data import load_digits
from normlab.experiments.lab import QUICK_STEPS, run_experiment
from normlab.experiments.registry import EXPERIMENTS

DIGITS = load_digits()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# How many runs each experiment makes in quick mode.
QUICK_RUNS = {"bn-paper": 2, "learning-rate": 4, "init": 4, "batch-size": 8, "placement": 5}


def test_every_experiment_has_a_quick_run_count() -> None:
    assert set(QUICK_RUNS) == set(EXPERIMENTS)


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_experiment_writes_json_png_html(tmp_path: Path, name: str) -> None:
    messages: list[str] = []
    report, result = run_experiment(name, tmp_path, quick=True, progress=False, data=DIGITS,
                                    echo=messages.append)
    stored = json.loads((tmp_path / "results.json").read_text())
    assert stored["experiment"] == name and stored["quick"] is True
    assert len(stored["runs"]) == QUICK_RUNS[name]
    for entry in stored["runs"].values():
        r = entry["result"]
        assert r["steps"][-1] == QUICK_STEPS or r["diverged"]
        assert len(r["test_acc"]) == len(r["steps"]) and 0.0 <= r["final_test_acc"] <= 1.0
        assert entry["config"]["train"]["steps"] == QUICK_STEPS
    pngs = sorted(tmp_path.glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == PNG_MAGIC for p in pngs)
    page = report.read_text()
    assert report == tmp_path / "report.html" and html.escape(EXPERIMENTS[name].title) in page
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert sorted(base64.b64decode(e) for e in embedded) == sorted(p.read_bytes() for p in pngs)
    assert "<script" not in page and "<link" not in page and 'src="http' not in page
    assert result.summary is not None and result.summary.rows
    assert result.headline


def test_experiment_resumes_and_retrains_on_change(tmp_path: Path) -> None:
    first: list[str] = []
    run_experiment("learning-rate", tmp_path, quick=True, progress=False, data=DIGITS,
                   echo=first.append)
    before = json.loads((tmp_path / "results.json").read_text())["runs"]
    second: list[str] = []
    run_experiment("learning-rate", tmp_path, quick=True, progress=False, data=DIGITS,
                   echo=second.append)
    assert sum("reused" in m for m in first) == 0
    assert sum("reused" in m for m in second) == QUICK_RUNS["learning-rate"]
    assert json.loads((tmp_path / "results.json").read_text())["runs"] == before
    third: list[str] = []
    run_experiment("learning-rate", tmp_path, quick=True, progress=False, data=DIGITS,
                   seed=1, echo=third.append)  # a different seed is a different run
    assert sum("reused" in m for m in third) == 0


def test_unknown_experiment() -> None:
    with pytest.raises(ValueError, match="experiment must be one of"):
        run_experiment("nope", quick=True)
