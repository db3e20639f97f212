"""The README's demo table is what `normlab demo` prints (regenerate with `make docs`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from normlab.experiments import docs

README = Path(__file__).resolve().parents[1] / "README.md"

FAKE = "```\nmodel  steps\n-----  -----\nnone   7\n```"


def test_readme_demo_table_matches_the_demo(tmp_path: Path) -> None:
    # The full demo at its defaults (seed 0): steps and accuracies are reproducible,
    # the train times are not and are left out of the block.
    threads = torch.get_num_threads()
    block = docs.demo_block(tmp_path)
    assert torch.get_num_threads() == threads  # demo_block ran on one thread, then restored
    assert "train time" not in block and "steps to 95%" in block
    assert docs.read_block(README.read_text(encoding="utf-8")) == block, (
        "README.md's demo table differs from what `normlab demo` prints: run `make docs`"
    )


def test_replace_block_rewrites_only_between_the_markers() -> None:
    text = f"# title\nbefore\n{docs.START}\nold table\n{docs.END}\nafter\n"
    new = docs.replace_block(text, FAKE)
    assert new == f"# title\nbefore\n{docs.START}\n{FAKE}\n{docs.END}\nafter\n"
    assert docs.read_block(new) == FAKE
    assert docs.replace_block(new, FAKE) == new  # idempotent


@pytest.mark.parametrize("text", ["no markers\n", f"{docs.END}\nx\n{docs.START}\n",
                                  f"{docs.START}\n{docs.START}\n{docs.END}\n"])
def test_markers_missing_or_out_of_order_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="demo-table"):
        docs.read_block(text)


def test_readme_has_the_markers_once() -> None:
    text = README.read_text(encoding="utf-8")
    assert text.count("<!-- demo-table:start") == 1 and text.count(docs.END) == 1


def write_fake_demo(out_dir: str | Path, **_: object) -> str:
    (Path(out_dir) / "demo_accuracy.png").write_bytes(b"\x89PNG fake")
    return FAKE


def test_main_rewrites_the_readme_block_and_the_image(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{docs.START}\nstale\n{docs.END}\nrest\n", encoding="utf-8")
    image = tmp_path / "docs" / "lab" / "demo.png"
    monkeypatch.setattr(docs, "demo_block", write_fake_demo)
    args = ["--readme", str(readme), "--image", str(image)]
    assert docs.main([*args, "--check"]) == 1  # stale
    assert docs.main(args) == 0
    assert readme.read_text(encoding="utf-8") == f"intro\n{docs.START}\n{FAKE}\n{docs.END}\nrest\n"
    assert image.read_bytes() == b"\x89PNG fake"
    assert docs.main([*args, "--check"]) == 0
    readme.write_text("no markers\n", encoding="utf-8")
    with pytest.raises(ValueError, match="marker"):
        docs.main(args)
