"""The lab docs' experiment blocks are rebuilt from stored runs (`make docs LAB=DIR`):
written between their markers only, up to date on a second pass, and never by training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from normlab.experiments import docs
from normlab.experiments.lab import run_experiment
from normlab.experiments.report import Table

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "# Lab\n\nProse before, quoting `<!-- lab:NAME:start -->` in backticks.\n\n"
AFTER = "\nProse after.\n"


def _doc(name: str, body: str = "stale\n") -> str:
    return f"{BEFORE}<!-- lab:{name}:start -->\n{body}<!-- lab:{name}:end -->\n{AFTER}"


@pytest.fixture(scope="module")
def quick_lab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A lab folder holding a quick ``sequences`` run (seconds of training, once)."""
    lab = tmp_path_factory.mktemp("lab")
    run_experiment("sequences", lab / "sequences", quick=True, progress=False,
                   echo=lambda s: None)
    return lab


@pytest.fixture
def lab(quick_lab: Path, tmp_path: Path) -> Path:
    """A copy of :func:`quick_lab` that a test may break."""
    shutil.copytree(quick_lab, tmp_path / "lab")
    return tmp_path / "lab"


def _never_train(*_: object, **__: object) -> None:
    raise AssertionError("the docs generator trained a run")


def _main(lab: Path, doc: Path, images: Path, *extra: str) -> int:
    return docs.main(["--lab", str(lab), "--lab-doc", str(doc), "--lab-images", str(images),
                      *extra])


def test_writes_the_blocks_and_figures_then_checks_up_to_date(
        lab: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import normlab.experiments.sequences as seq

    monkeypatch.setattr(seq, "train", _never_train)  # every run comes from results.json
    doc, images = tmp_path / "lab.md", tmp_path / "images"
    doc.write_text(_doc("sequences"), encoding="utf-8")
    stored = (lab / "sequences" / "results.json").read_bytes()
    assert _main(lab, doc, images, "--check") == 1  # stale: nothing written
    assert doc.read_text(encoding="utf-8") == _doc("sequences") and not images.exists()
    assert _main(lab, doc, images) == 0
    text = doc.read_text(encoding="utf-8")
    block = docs.read_lab_block(text, "sequences")
    assert text == _doc("sequences", block + "\n")  # the prose around the markers is kept
    lines = block.splitlines()
    assert lines[0].startswith("`normlab experiment sequences --seed 0 --budget 1 --quick`: "
                               "budget 1 (quick), seed 0; results.json of ")
    assert "| model | test, eval mode (running statistics) |" in block
    verdict = json.loads(stored)["verdict"]  # the one the quick run printed and stored
    assert lines[-1] == f"> Verdict: {verdict['outcome']} ({verdict['evidence']})."
    assert verdict["outcome"] == "inconclusive"  # one seed
    png = images / "sequences.png"
    assert png.read_bytes() == (lab / "sequences" / "sequences.png").read_bytes()
    assert (lab / "sequences" / "results.json").read_bytes() == stored  # never rewritten
    capsys.readouterr()
    assert _main(lab, doc, images, "--check") == 0
    assert "up to date" in capsys.readouterr().out
    png.write_bytes(b"old figure")
    assert _main(lab, doc, images, "--check") == 1
    assert png.read_bytes() == b"old figure"


def test_a_missing_run_is_refused_and_nothing_trains(
        lab: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import normlab.experiments.sequences as seq

    monkeypatch.setattr(seq, "train", _never_train)
    results = lab / "sequences" / "results.json"
    stored = json.loads(results.read_text(encoding="utf-8"))
    del stored["runs"]["batch-masked-seed0"]
    results.write_text(json.dumps(stored), encoding="utf-8")
    before = results.read_bytes()
    with pytest.raises(docs.MissingRunError,
                       match=r"run 'batch-masked-seed0' is not in it; .*nothing is trained"):
        docs.rebuild_experiment(lab / "sequences", tmp_path / "out")
    doc, images = tmp_path / "lab.md", tmp_path / "images"
    doc.write_text(_doc("sequences"), encoding="utf-8")
    assert _main(lab, doc, images) == 2
    err = capsys.readouterr().err
    assert "batch-masked-seed0" in err and "--out" in err and "Traceback" not in err
    assert doc.read_text(encoding="utf-8") == _doc("sequences")
    assert results.read_bytes() == before and not images.exists()


def test_a_run_made_otherwise_is_refused_with_what_differs(lab: Path, tmp_path: Path) -> None:
    results = lab / "sequences" / "results.json"
    stored = json.loads(results.read_text(encoding="utf-8"))
    stored["runs"]["none-seed0"]["config"]["train"]["steps"] += 1
    results.write_text(json.dumps(stored), encoding="utf-8")
    with pytest.raises(docs.MissingRunError,
                       match=r"another configuration \(train\.steps: stored 25, asked 24\)"):
        docs.rebuild_experiment(lab / "sequences", tmp_path / "out")


def test_a_context_run_missing_is_refused_before_training(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # bn-paper asks its runs through Context.run: an empty store is refused, untrained.
    import normlab.experiments.lab as lab_module

    monkeypatch.setattr(lab_module, "fit", _never_train)
    folder = tmp_path / "bn-paper"
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps(
        {"experiment": "bn-paper", "quick": True, "budget": 1.0, "seed": 0,
         "command": "normlab experiment bn-paper --quick", "runs": {}}), encoding="utf-8")
    with pytest.raises(docs.MissingRunError, match=r"run 'none-seed0' is not in it"):
        docs.rebuild_experiment(folder, tmp_path / "out")


def test_a_marked_experiment_without_a_folder_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = tmp_path / "lab.md"
    doc.write_text(_doc("init"), encoding="utf-8")
    assert _main(tmp_path / "empty", doc, tmp_path / "images") == 2
    assert "no results.json for init" in capsys.readouterr().err


def test_replace_lab_block_touches_only_its_markers() -> None:
    text = _doc("a") + _doc("b")
    new = docs.replace_lab_block(text, "b", "table")
    assert docs.read_lab_block(new, "a") == "stale" and docs.read_lab_block(new, "b") == "table"
    assert new == _doc("a") + _doc("b", "table\n")
    assert docs.lab_names(new) == ["a", "b"]  # the quoted marker in backticks is not one
    with pytest.raises(ValueError, match="lab:c"):
        docs.read_lab_block(text, "c")


def test_markdown_table_escapes_pipes() -> None:
    table = Table(["x", "a|b"], [["1", "2"]])
    assert docs.markdown_table(table) == "| x | a\\|b |\n|---|---|\n| 1 | 2 |"


@pytest.mark.parametrize("name", ["lab.md", "lab-more.md"])
def test_the_repo_docs_blocks_are_generated_ones(name: str) -> None:
    # What `make docs LAB=DIR` wrote: each block opens with its command and ends with a
    # verdict (the numbers themselves need the stored runs, which are not in the repo).
    text = (ROOT / "docs" / name).read_text(encoding="utf-8")
    names = docs.lab_names(text)
    assert names and len(set(names)) == len(names)
    for folder in names:
        block = docs.read_lab_block(text, folder, name).splitlines()
        assert block[0].startswith("`normlab experiment "), folder
        assert block[-1].startswith("> Verdict: "), folder
