"""docs/deploying.md's example runs as written: its python blocks are executed in order in
one namespace (in a temporary directory), and the output shown as comments after a
``print`` is the output printed. Blocks starting with ``# needs: a, b`` run only where
those modules are installed."""

from __future__ import annotations

import importlib.util
import re
import warnings
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "deploying.md"


def _blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", DOC.read_text(), flags=re.S | re.M)


def _needs(block: str) -> list[str]:
    first = block.splitlines()[0]
    return [m.strip() for m in first[len("# needs:"):].split(",")] if first.startswith(
        "# needs:"
    ) else []  # fmt: skip


def _shown_output(block: str) -> list[str]:
    """The comment lines right after a ``print(...)`` line: what the doc says it prints."""
    shown, after_print = [], False
    for line in block.splitlines():
        if line.startswith("print("):
            after_print = True
        elif after_print and line.startswith("# "):
            shown.append(line[2:])
        else:
            after_print = False
    return shown


def _run(blocks: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)  # the example writes model.pt2, model.ts, model.onnx
    namespace: dict[str, object] = {"__name__": "deploying_md"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.* is deprecated
        for i, block in enumerate(blocks):
            exec(compile(block, f"{DOC}:block{i}", "exec"), namespace)  # noqa: S102
    printed = capsys.readouterr().out.splitlines()
    for block in blocks:
        for line in _shown_output(block):
            assert line in printed, f"the doc shows {line!r}; the example printed {printed}"


def test_the_doc_has_the_example():
    blocks = _blocks()
    text = "\n".join(blocks)
    assert len(blocks) >= 6
    for call in ("fold_batchnorm(", 'to="torch"', "torch.export.export(", "torch.jit.script(",
                 "torch.jit.trace(", "torch.onnx.export("):  # fmt: skip
        assert call in text, call
    assert _needs(blocks[-1]) == ["onnx", "onnxscript"]
    assert _shown_output(text)  # the printed report is checked below


def test_example_runs(tmp_path, monkeypatch, capsys):
    _run([b for b in _blocks() if not _needs(b)], tmp_path, monkeypatch, capsys)
    assert (tmp_path / "model.pt2").is_file() and (tmp_path / "model.ts").is_file()


def test_example_runs_with_onnx(tmp_path, monkeypatch, capsys):
    for name in sorted({n for b in _blocks() for n in _needs(b)}):
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"{name} is not installed")
    _run(_blocks(), tmp_path, monkeypatch, capsys)
    assert (tmp_path / "model.onnx").is_file()
