"""The generated ``shapes`` data set: seeded, balanced, in range, hard but learnable."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from normlab.cli import main
from normlab.experiments.data import load_dataset
from normlab.experiments.procedural import (
    CLASSES,
    GENERATED,
    N_TEST,
    N_TRAIN,
    SIZE,
    make_shapes,
    save_samples,
)


def _nearest_mean(features: np.ndarray, labels: np.ndarray, n_train: int) -> float:
    """Test accuracy of a nearest-class-mean classifier fit on the first ``n_train`` rows."""
    ftr, fte = features[:n_train], features[n_train:]
    ytr, yte = labels[:n_train], labels[n_train:]
    means = np.stack([ftr[ytr == k].mean(0) for k in range(len(CLASSES))])
    pred = ((fte[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    return float((pred == yte).mean())


def test_same_seed_same_images_other_seed_other_images() -> None:
    x1, y1 = make_shapes(300, seed=7)
    x2, y2 = make_shapes(300, seed=7)
    x3, y3 = make_shapes(300, seed=8)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert not np.array_equal(x1, x3) and not np.array_equal(y1, y3)


def test_shapes_dtypes_range_and_balance() -> None:
    x, y = make_shapes(1005, seed=1)
    assert x.shape == (1005, 1, SIZE, SIZE) and x.dtype == np.float32
    assert y.shape == (1005,) and y.dtype == np.int64
    assert x.min() >= 0.0 and x.max() <= 1.0
    # Images are not blank or saturated: the shapes leave a visible contrast.
    assert float(np.median(x.max((1, 2, 3)) - x.min((1, 2, 3)))) > 0.3
    counts = np.bincount(y, minlength=len(CLASSES))
    assert counts.tolist() == [101] * 5 + [100] * 5
    assert len(np.unique(y[:50])) > 5  # shuffled, not in runs of one class


def test_classes_distinguishable_but_not_trivially() -> None:
    x, y = make_shapes(3000, seed=1)
    flat = x.reshape(len(x), -1)
    chance = 1 / len(CLASSES)
    # Position and rotation vary, so a per-class pixel template barely beats chance ...
    assert _nearest_mean(flat, y, 2000) < 0.3
    # ... while a translation-invariant feature (the spectrum's magnitude of each image,
    # standardised) separates the classes well above chance, and far from perfectly.
    z = (flat - flat.mean(1, keepdims=True)) / flat.std(1, keepdims=True)
    spectrum = np.abs(np.fft.rfft2(z.reshape(x.shape[0], SIZE, SIZE))).reshape(len(x), -1)
    score = _nearest_mean(spectrum, y, 2000)
    assert 3 * chance < score < 0.8


def test_load_dataset_generates_shapes_and_says_so(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no folder named "shapes" here
    data = load_dataset("shapes")
    assert data.name == "shapes" and data.num_classes == len(CLASSES)
    assert (len(data.y_train), len(data.y_test)) == (N_TRAIN, N_TEST)
    assert data.image_shape == (1, SIZE, SIZE)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    text = data.describe()
    assert "generated" in text and "seed 0" in text and f"{N_TRAIN} train" in text
    small = data.subset(100, 50)
    assert "generated" in small.describe() and len(small.y_train) == 100
    # Train and test are different draws, not the same images twice.
    assert not torch.equal(data.x_train[:N_TEST], data.x_test)


def test_an_existing_folder_named_like_a_generated_set_wins(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "shapes").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="found neither MNIST"):
        load_dataset("shapes")


def test_unknown_name_lists_the_generated_sets(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a directory") as info:
        load_dataset(tmp_path / "squares")
    assert all(name in str(info.value) for name in GENERATED)
    result = CliRunner().invoke(main, ["experiment", "init", "--quick", "--data", "squares",
                                       "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "shapes" in result.output
    assert "Traceback" not in result.output


def test_save_samples_writes_a_png(tmp_path: Path) -> None:
    path = save_samples(tmp_path / "grid" / "samples.png", per_class=2)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="n >= 1"):
        make_shapes(0)


def test_an_experiment_runs_on_shapes_and_records_it(tmp_path: Path) -> None:
    out = tmp_path / "placement"
    result = CliRunner().invoke(main, ["experiment", "placement", "--quick", "--data", "shapes",
                                       "--out", str(out), "--no-progress", "--backend", "torch"])
    assert result.exit_code == 0, result.output
    stored = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert stored["data"].startswith("shapes: 512 train / 256 test")
    assert "generated by normlab.experiments.procedural, seed 0" in stored["data"]
    assert "--data shapes" in stored["command"]
    assert "generated by normlab.experiments.procedural" in (out / "report.html").read_text(
        encoding="utf-8")
