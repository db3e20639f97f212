"""The benchmark runs end to end in its quick mode (tiny shapes), so it cannot rot."""

from __future__ import annotations

import pytest

bench = pytest.importorskip("normlab.bench")


def test_quick_benchmark_runs_and_agrees_with_torch(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--quick", "--markdown", "--threads", "2"]) == 0
    out = capsys.readouterr().out
    assert "copy_ bandwidth" in out and "2 threads" in out
    assert "# threading: numba layer " in out and "OMP_WAIT_POLICY" in out
    table = [line for line in out.splitlines() if line.startswith("| ")]
    layers = {line.split("|")[1].strip() for line in table[1:]}
    assert {"BatchNorm2d", "BatchNorm2d-CL", "BatchNorm1d", "GroupNorm", "InstanceNorm2d",
            "LayerNorm", "RMSNorm"} <= layers
    assert {"train", "eval"} <= {line.split("|")[3].strip() for line in table[1:]}
    assert "normlab start-up" in out and "MISMATCH" not in out


def test_arguments_are_parsed() -> None:
    args = bench.parse_args(["--threads", "3", "--layers", "LayerNorm", "--reps", "4"])
    assert (args.threads, args.layers, args.reps, args.quick) == (3, "LayerNorm", 4, False)
