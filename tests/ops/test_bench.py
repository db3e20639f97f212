"""The benchmark runs end to end in its quick mode (tiny shapes), so it cannot rot."""

from __future__ import annotations

import subprocess
import sys

import pytest

bench = pytest.importorskip("normlab.bench")


def test_quick_benchmark_runs_and_agrees_with_torch(capsys: pytest.CaptureFixture[str]) -> None:
    # --allocator system: the steady setting is process-wide; this test process keeps its own.
    assert bench.main(["--quick", "--markdown", "--threads", "2", "--allocator", "system"]) == 0
    out = capsys.readouterr().out
    assert "copy_ bandwidth" in out and "2 threads" in out
    assert "# allocator: system defaults; a first-touch page fault costs" in out
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


_MMAPPED_BYTES = """
import ctypes, sys, torch
import normlab.bench as b
if sys.argv[1] == "steady" and b.steady_allocator() is None:
    print("not-glibc"); sys.exit()
FIELDS = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in FIELDS.split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
x = torch.empty(64 << 20, dtype=torch.uint8)
print(libc.mallinfo2().hblkhd >= 64 << 20)
"""


@pytest.mark.parametrize("allocator,mmapped", [("system", "True"), ("steady", "False")])
def test_steady_allocator_keeps_large_blocks_on_the_heap(allocator: str, mmapped: str) -> None:
    """glibc's default maps a 64 MiB block with mmap (returned to the kernel when freed,
    fresh pages next time); the steady setting keeps it on the reusable heap. In a fresh
    process: the setting is process-wide."""
    out = subprocess.run(
        [sys.executable, "-c", _MMAPPED_BYTES, allocator],
        capture_output=True, text=True, check=True,
    ).stdout.split()
    if out[-1] == "not-glibc":
        pytest.skip("not glibc")
    assert out[-1] == mmapped


def test_model_benchmark_quick_runs() -> None:
    """benchmarks/model.py (a conv stack with each column's norm layers) in its quick mode:
    every column runs and computes the same function."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[2] / "benchmarks" / "model.py"
    spec = importlib.util.spec_from_file_location("bench_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--quick", "--allocator", "system", "--blocks", "3"])
    assert set(result) == {*module.KINDS, "difference"}
    assert result["difference"] < 1e-4
    assert all(result[kind] > 0 for kind in module.KINDS)


def test_gpu_benchmark_quick_runs_anywhere(tmp_path) -> None:  # noqa: ANN001
    """benchmarks/gpu.py in quick mode (here on the CPU): every layer and mode, a JSON file
    and the Markdown table docs/gpu.md takes."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu.py"
    spec = importlib.util.spec_from_file_location("gpu_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "gpu.json"
    rows = module.main(["--quick", "--json", str(out), "--reps", "1", "--dtypes", "float32"])
    stored = json.loads(out.read_text())
    assert len(rows) == 2 * len(module.CASES) and stored["rows"] == rows
    assert stored["graph_capture"].startswith("skipped")
    assert all(r["max_difference"] < 1e-4 and r["normlab_ms"] > 0 for r in rows)
    train = [r for r in rows if r["mode"] == "train"]
    # the running statistics' NaN guard, wherever a layer has them; saved memory counted
    assert all(r["nan_guard"] in (True, None) for r in train)
    assert any(r["nan_guard"] for r in train)
    assert all(r["saved_mib"] is not None and r["saved_mib_torch"] > 0 for r in train)
    # in-place ABN keeps less for backward than torch's BatchNorm + LeakyReLU
    abn = next(r for r in train if r["layer"] == "InPlaceABN")
    assert abn["saved_mib"] < abn["saved_mib_torch"]
