"""The command line: --help everywhere, wiring of each command, bench pass-through."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner

from normlab.cli import main
from normlab.experiments.registry import EXPERIMENTS


def all_commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = []
    for name, command in group.commands.items():
        paths.append((*prefix, name))
        if isinstance(command, click.Group):
            paths.extend(all_commands(command, (*prefix, name)))
    return paths


COMMANDS = [(), *(p for p in all_commands(main) if p != ("bench",))]


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)  # the CLI sets one thread for the lab


def test_command_table_is_complete() -> None:
    assert {("demo",), ("experiment", "list"), ("figure", "norms")} <= set(COMMANDS)
    assert {("experiment", name) for name in EXPERIMENTS} <= set(COMMANDS)


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "normlab")
def test_help(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage: main" in result.output and "--help" in result.output


def test_experiment_list() -> None:
    result = CliRunner().invoke(main, ["experiment", "list"])
    assert result.exit_code == 0
    for info in EXPERIMENTS.values():
        assert info.name in result.output and info.title in result.output


def test_demo_command(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path), "--steps", "20",
                                       "--norms", "none,batch", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "steps to 95%" in result.output and "BatchNorm" in result.output
    assert (tmp_path / "report.html").is_file()
    bad = CliRunner().invoke(main, ["demo", "--norms", "batch,weird"])
    assert bad.exit_code == 2 and "weird" in bad.output
    assert "none, batch, layer, group" in bad.output  # the valid names


def test_experiment_command(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["experiment", "placement", "--quick", "--out", str(out),
                                       "--no-progress", "--backend", "torch"])
    assert result.exit_code == 0, result.output
    assert "BN after act" in result.output and (out / "report.html").is_file()


def test_experiment_rejects_bad_data_dir(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["experiment", "init", "--quick", "--data", str(tmp_path),
                                       "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "found neither MNIST" in result.output


def test_figure_norms(tmp_path: Path) -> None:
    out = tmp_path / "cube.png"
    result = CliRunner().invoke(main, ["figure", "norms", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:4] == b"\x89PNG"
    jpg = CliRunner().invoke(main, ["figure", "norms", "--out", str(tmp_path / "cube.jpg")])
    assert jpg.exit_code == 2 and ".png" in jpg.output
    assert not (tmp_path / "cube.jpg").exists()


def test_bench_passes_arguments_through(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    fake = types.ModuleType("normlab.bench")
    fake.main = lambda argv: seen.append(argv) or 3  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "normlab.bench", fake)
    result = CliRunner().invoke(main, ["bench", "--quick", "--layer", "bn", "-x", "--help"])
    assert seen == [["--quick", "--layer", "bn", "-x", "--help"]]
    assert result.exit_code == 3


def test_bench_missing_module(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "normlab.bench", None)  # makes the import fail
    result = CliRunner().invoke(main, ["bench"])
    assert result.exit_code == 2 and "normlab.bench is not available" in result.output


def test_version() -> None:
    import normlab

    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and normlab.__version__ in result.output


def test_experiment_interrupted_says_how_to_resume(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    import normlab.experiments.lab as lab

    def interrupted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise KeyboardInterrupt

    monkeypatch.setattr(lab, "run_experiment", interrupted)
    result = CliRunner().invoke(main, ["experiment", "placement", "--quick", "--out",
                                       str(tmp_path)])
    assert result.exit_code == 130
    assert "results.json" in result.output and "resume" in result.output


# Runs the CLI as `python -m normlab ARGS` would, then reports which heavy libraries the
# process imported: --help and `experiment list` must not pay for torch (seconds).
_IMPORTS_PROBE = """
import json, runpy, sys
sys.argv = ["normlab", *sys.argv[1:]]
try:
    runpy.run_module("normlab", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    code = exc.code
else:
    code = 0
heavy = sorted(m for m in ("torch", "numba", "matplotlib", "sklearn") if m in sys.modules)
print(json.dumps({"code": code, "heavy": heavy}), file=sys.stderr)
"""


@pytest.mark.parametrize("args", [["--help"], ["experiment", "list"], ["--version"],
                                  ["experiment", "--help"]], ids=" ".join)
def test_light_commands_do_not_import_torch(args: list[str]) -> None:
    import json
    import subprocess

    proc = subprocess.run([sys.executable, "-c", _IMPORTS_PROBE, *args], capture_output=True,
                          text=True, timeout=120, check=False)
    report = json.loads(proc.stderr.strip().splitlines()[-1])
    assert report["code"] in (0, None), proc.stderr
    assert proc.stdout.strip(), "the command printed nothing"
    assert report["heavy"] == [], f"`normlab {' '.join(args)}` imported {report['heavy']}"


def test_lazy_package_exports_every_layer() -> None:
    import importlib.metadata

    import normlab
    import normlab.nn

    assert set(normlab.nn.__all__) <= set(normlab.__all__)
    assert normlab.BatchNorm2d is normlab.nn.BatchNorm2d
    assert normlab.use_backend is importlib.import_module("normlab.ops").use_backend
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = normlab.no_such_name
    # The version constant the CLI reads without torch is the installed distribution's.
    assert normlab.__version__ == importlib.metadata.version("normlab")


def test_backend_choices_are_the_library_s() -> None:
    """The CLI lists its --backend choices without importing torch: the same as ops'."""
    from normlab import cli, ops

    assert cli._BACKENDS == ops.CHOICES
