"""Every experiment at a tiny budget: JSON results, PNG plots, a self-contained report."""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path

import pytest
import torch

from normlab.experiments.data import load_digits
from normlab.experiments.lab import QUICK_STEPS, run_experiment
from normlab.experiments.registry import EXPERIMENTS
from normlab.experiments.verdict import OUTCOMES

DIGITS = load_digits()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# How many runs each experiment makes in quick mode.
QUICK_RUNS = {"bn-paper": 2, "learning-rate": 4, "init": 4, "batch-size": 8, "placement": 5,
              "sequences": 4}


def test_quick_run_counts_name_experiments() -> None:
    assert set(QUICK_RUNS) <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_experiment_writes_json_png_html(tmp_path: Path, name: str) -> None:
    messages: list[str] = []
    report, result = run_experiment(name, tmp_path, quick=True, progress=False, data=DIGITS,
                                    echo=messages.append)
    stored = json.loads((tmp_path / "results.json").read_text())
    assert stored["experiment"] == name and stored["quick"] is True
    assert len(stored["runs"]) == QUICK_RUNS.get(name, len(stored["runs"]))
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
    # One seed in quick mode: whatever it shows, the verdict cannot be more than that.
    verdict = result.verdict
    assert verdict is not None and verdict.outcome in OUTCOMES
    assert verdict.outcome == "inconclusive" and "cannot show the spread" in verdict.evidence
    assert result.headline.endswith(verdict.text)
    assert stored["verdict"] == verdict.to_dict()
    assert f"<strong>Verdict: {verdict.outcome}</strong>" in page
    assert page.index("Verdict: inconclusive") < page.index("Claim:")  # at the top
    assert "Rule, fixed before the run: " + html.escape(verdict.rule) in page
    command = f"normlab experiment {name} --seed 0 --budget 1 --quick --out {tmp_path}"
    assert stored["command"] == command and f"<code>{html.escape(command)}</code>" in page
    assert '<a href="results.json">results.json</a>' in page


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


GAP10, PAD5, PAD4, SAME = (0.80, 0.90, 0.88), (0.90, 0.90, 0.85), (0.9, 0.9, 0.86), (.9,) * 3


@pytest.mark.parametrize(("plain", "masked", "word"), [
    ([GAP10, PAD5], [SAME, SAME], "reproduced"),   # mismatch 10 and 5 points vs 0
    ([PAD5, PAD4], [SAME, (0.92, 0.92, 0.92)], "reproduced"),
    ([PAD5, PAD4], [(0.9, 0.925, 0.925)] * 2, "inconclusive"),  # 4 vs 2.5: within 2 points
    ([SAME, SAME], [(0.92, 0.91, 0.91)] * 2, "not reproduced"),
    ([(0.90, 0.90, 0.885)] * 2, [SAME, SAME], "inconclusive"),  # 1.5 points: under margin
    ([PAD5, SAME], [SAME, SAME], "inconclusive"),  # the seeds disagree
    ([GAP10], [SAME], "inconclusive"),             # one seed: never decides
    ([SAME], [(0.92, 0.91, 0.91)], "inconclusive"),
])
def test_sequences_verdict_rule(plain, masked, word) -> None:  # noqa: ANN001
    from normlab.experiments.catalog import _padding_verdict

    def runs(triples: list[tuple[float, float, float]]) -> list[dict[str, float]]:
        return [{"final_test_acc": e, "test_acc_batch_stats": b,
                 "test_acc_batch_stats_padded": p} for e, b, p in triples]

    verdict = _padding_verdict(runs(plain), runs(masked))
    assert verdict.outcome == word and verdict.text.startswith(f"Verdict: {word} (")
    assert "2.0 points" in verdict.rule


def test_sequence_data_is_padded_and_seeded() -> None:
    from normlab.experiments import sequences

    x, lengths, labels = sequences.make_sequences(64, seed=3)
    again = sequences.make_sequences(64, seed=3)
    assert torch.equal(x, again[0]) and x.shape == (64, 1, sequences.MAX_LEN)
    assert int(lengths.min()) >= 10 and set(labels.tolist()) <= {0, 1, 2}
    steps = torch.arange(sequences.MAX_LEN)
    assert bool((x[:, 0][steps >= lengths[:, None]] == 0).all())  # zeros past each length


def test_quick_run_never_overwrites_a_full_one(tmp_path: Path) -> None:
    """A folder of full-budget results refuses a --quick run into it (and the reverse)
    unless the user asks for a fresh start; the quick default folder is its own."""
    full = {"experiment": "placement", "quick": False, "runs": {"x": {"config": {},
                                                                      "result": {}}}}
    (tmp_path / "results.json").write_text(json.dumps(full))
    with pytest.raises(ValueError, match="holds full-budget results; a quick run"):
        run_experiment("placement", tmp_path, quick=True, progress=False, data=DIGITS,
                       echo=lambda s: None)
    assert json.loads((tmp_path / "results.json").read_text()) == full  # untouched
    run_experiment("placement", tmp_path, quick=True, progress=False, data=DIGITS,
                   echo=lambda s: None, resume=False)  # --fresh: replaced on purpose
    assert json.loads((tmp_path / "results.json").read_text())["quick"] is True


def test_bad_output_folder_is_said_before_training(tmp_path: Path) -> None:
    (tmp_path / "results.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a normlab results file"):
        run_experiment("placement", tmp_path, quick=True, progress=False, data=DIGITS,
                       echo=lambda s: None)
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(ValueError, match="cannot write to --out"):
        run_experiment("placement", blocked / "sub", quick=True, progress=False, data=DIGITS,
                       echo=lambda s: None)


@pytest.mark.parametrize(("quick", "seed", "seeds"), [(True, 0, [0]), (True, 5, [5]),
                                                      (False, 0, [0, 1, 2]),
                                                      (False, 5, [5, 6, 7])])
def test_context_seeds(tmp_path: Path, quick: bool, seed: int, seeds: list[int]) -> None:
    from normlab.experiments.lab import Context
    from normlab.experiments.runs import ResultStore

    ctx = Context(DIGITS, tmp_path, ResultStore(tmp_path / "r.json", "x"), quick=quick,
                  seed=seed)
    assert ctx.seeds() == seeds


def test_runs_repeat_over_seeds_and_are_cached_per_seed(tmp_path: Path) -> None:
    from normlab.experiments.lab import Context
    from normlab.experiments.runs import ResultStore

    messages: list[str] = []
    store = ResultStore(tmp_path / "r.json", "x")
    ctx = Context(DIGITS.subset(128, 64, seed=0), tmp_path, store, progress=False,
                  echo=messages.append)
    model = {"kind": "mlp", "hidden": [8], "norm": "none"}
    spec = ctx.spec(10, batch_size=16)
    first = ctx.runs("m", model, spec)
    assert sorted(store.runs) == ["m-seed0", "m-seed1", "m-seed2"]
    assert [store.runs[f"m-seed{s}"]["config"]["train"]["seed"] for s in range(3)] == [0, 1, 2]
    assert first[0]["test_acc"] != first[1]["test_acc"] or first[0]["train_loss"] != \
        first[1]["train_loss"]  # different seeds, different runs
    assert ctx.runs("m", model, spec) == first
    assert sum("reused" in m for m in messages) == 3


@pytest.mark.parametrize(("values", "text"), [
    ([0.9], "90.0%"),
    ([0.9, 0.95, 0.92], "92.3% (90.0-95.0)"),
    ([0.9, 0.9, 0.9], "90.0%"),  # no range where the seeds agree
])
def test_fmt_acc_range(values: list[float], text: str) -> None:
    from normlab.experiments.lab import fmt_acc_range

    assert fmt_acc_range(values) == text


@pytest.mark.parametrize(("values", "text"), [
    ([50], "50"),
    ([50, 75, 100], "75 (50-100)"),
    ([50, 50, 50], "50"),
    ([50, None, 100], "50, > 300, 100"),  # no mean of a value that was never reached
    ([None], "> 300"),
])
def test_fmt_steps_range(values: list[int | None], text: str) -> None:
    from normlab.experiments.lab import fmt_steps_range

    assert fmt_steps_range(values, 300) == text


def test_band_plot_keeps_a_diverged_seed(tmp_path: Path) -> None:
    from normlab.experiments.figures import band_plot

    png = band_plot(tmp_path / "b.png", [("a", [0, 10, 20], [[0.1, 0.5, 0.9], [0.1, 0.2]])],
                    title="t", xlabel="step", ylabel="acc", hlines={"chance": 0.1},
                    zoom=(0.8, 1.0))
    assert png.read_bytes()[:8] == PNG_MAGIC
