"""Benchmark of the normalization layers: torch eager vs ``torch.compile`` vs normlab.

For every layer and the shapes of the design notes, train forward+backward and eval
forward are timed in one process, interleaved (eager, compiled, normlab, eager, ...)
after warm-up, and their medians compared. A large ``copy_`` measured in the same run
gives the machine's memory bandwidth, so each time also reads as "% of copy bandwidth"
(the least traffic the layer needs: read x, write y; plus read x and dy, write dx when
training). Threads are set explicitly and reported. A subprocess measures normlab's
first-call cost with a cold kernel cache (numba compilation) and with a warm one (what
every later process pays).

    normlab bench [--quick] [--markdown] [--threads N] [--reps R] [--layers A,B]
    python benchmarks/norms.py ...   (the same)
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import mmap
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

import normlab

RESNET = [(32, 64, 56, 56), (16, 128, 28, 28), (64, 256, 14, 14), (128, 512, 7, 7)]
TRANSFORMER = [(32, 128, 768), (8, 512, 1024), (4096, 4096), (512, 1024)]
CANDIDATES = ("eager", "compile", "normlab")


@dataclass(frozen=True)
class Case:
    """One layer on one input shape; ``build(cls_module)`` makes the layer from torch.nn or
    normlab (same constructor arguments, same state)."""

    layer: str
    shape: tuple[int, ...]
    build: Callable[[object], nn.Module]
    channels_last: bool = False

    @property
    def label(self) -> str:
        return self.layer + ("-CL" if self.channels_last else "")


def _cases(quick: bool) -> list[Case]:
    resnet = [(4, 32, 8, 8)] if quick else RESNET
    rows = [(4, 8, 96)] if quick else TRANSFORMER
    bn1d = [(16, 32), (4, 16, 10)] if quick else [(512, 1024), (64, 256, 100)]
    cases: list[Case] = []
    for s in resnet:
        cases.append(Case("BatchNorm2d", s, lambda m, c=s[1]: m.BatchNorm2d(c)))
    cases.append(Case("BatchNorm2d", resnet[0], lambda m, c=resnet[0][1]: m.BatchNorm2d(c),
                      channels_last=True))
    for s in bn1d:
        cases.append(Case("BatchNorm1d", s, lambda m, c=s[1]: m.BatchNorm1d(c)))
    for s in resnet:
        cases.append(Case("GroupNorm", s, lambda m, c=s[1]: m.GroupNorm(32, c)))
    for s in resnet:
        cases.append(
            Case("InstanceNorm2d", s, lambda m, c=s[1]: m.InstanceNorm2d(c, affine=True))
        )
    for s in rows:
        cases.append(Case("LayerNorm", s, lambda m, d=s[-1]: m.LayerNorm(d)))
    for s in rows:
        cases.append(Case("RMSNorm", s, lambda m, d=s[-1]: m.RMSNorm(d)))
    return cases


@dataclass
class Row:
    case: Case
    mode: str  # "train" (forward + backward) or "eval" (forward)
    ms: dict[str, float] = field(default_factory=dict)
    first_call_s: dict[str, float] = field(default_factory=dict)
    bytes_moved: int = 0

    def ratio(self, base: str) -> float:
        return self.ms[base] / self.ms["normlab"] if base in self.ms else math.nan

    def bandwidth_pct(self, name: str, copy_gbs: float) -> float:
        return 100 * self.bytes_moved / (self.ms[name] * 1e-3) / 1e9 / copy_gbs


def copy_bandwidth(reps: int, megabytes: int = 256) -> float:
    """GB/s of ``dst.copy_(src)`` on float32 buffers of ``megabytes`` (read + write)."""
    n = megabytes * 2**20 // 4
    src, dst = torch.randn(n), torch.empty(n)
    dst.copy_(src)
    times = []
    for _ in range(max(reps, 5)):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * n * 4 / statistics.median(times) / 1e9


def _runner(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor, mode: str) -> Callable:
    if mode == "eval":

        def run() -> torch.Tensor:
            with torch.no_grad():
                return layer(x)

        return run
    inputs = [x, *layer.parameters()]

    def run_train() -> tuple[torch.Tensor, ...]:
        # autograd.grad, not backward: nothing accumulates between repetitions.
        return torch.autograd.grad(layer(x), inputs, dy)

    return run_train


def _check_agreement(case: Case, mode: str, outs: dict[str, object]) -> str | None:
    """Compare normlab's outputs (or grads) with eager torch's; a message if they differ."""
    ref, got = outs["eager"], outs["normlab"]
    ref = ref if isinstance(ref, tuple) else (ref,)
    got = got if isinstance(got, tuple) else (got,)
    for a, b in zip(ref, got, strict=True):
        scale = max(1.0, float(a.abs().max())) if a.numel() else 1.0
        if a.numel() and not torch.allclose(a, b, atol=1e-3 * scale, rtol=1e-3):
            err = float((a - b).abs().max())
            return f"{case.label}{case.shape} {mode}: normlab differs from torch by {err:.3g}"
    return None


def bench_case(
    case: Case, mode: str, reps: int, warmup: int, compile_backend: str | None
) -> tuple[Row, str | None]:
    """Times one case in one mode for every candidate, interleaved; medians in ms."""
    torch.manual_seed(0)
    if compile_backend is not None:
        # A fresh dynamo cache per case: no recompile limit reached across shapes, and the
        # compiled column's first call is a real compilation.
        torch._dynamo.reset()
    reference = case.build(nn)
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if p.dim() == 1 and p is reference.weight
                                                 else 0.0))
    layers: dict[str, nn.Module] = {"eager": reference}
    if compile_backend is not None:
        twin = case.build(nn)
        twin.load_state_dict(reference.state_dict())
        layers["compile"] = torch.compile(twin, backend=compile_backend)
    mine = case.build(normlab)
    mine.load_state_dict(reference.state_dict())
    layers["normlab"] = mine
    for layer in layers.values():
        layer.train(mode == "train")
    fmt = torch.channels_last if case.channels_last else torch.contiguous_format
    x = torch.randn(case.shape).contiguous(memory_format=fmt)
    x.requires_grad_(mode == "train")
    dy = torch.randn(case.shape).contiguous(memory_format=fmt)
    runs = {name: _runner(layer, x, dy, mode) for name, layer in layers.items()}
    row = Row(case, mode, bytes_moved=(5 if mode == "train" else 2) * x.numel() * x.itemsize)
    outs = {}
    for name, run in runs.items():
        t0 = time.perf_counter()
        outs[name] = run()
        row.first_call_s[name] = time.perf_counter() - t0
    problem = _check_agreement(case, mode, outs)
    del outs
    for _ in range(warmup):
        for run in runs.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(reps):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    row.ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    return row, problem


_STARTUP = """
import json, time
t0 = time.perf_counter()
import torch
import normlab
torch.set_num_threads({threads})
t1 = time.perf_counter()
x = torch.randn(8, 16, 8, 8, requires_grad=True)
layer = normlab.BatchNorm2d(16)
layer(x).sum().backward()
t2 = time.perf_counter()
print(json.dumps({{"import_s": t1 - t0, "first_call_s": t2 - t1}}))
"""


def startup_cost(threads: int, cold: bool) -> dict[str, float] | None:
    """Import + first BatchNorm2d train step in a fresh process: with an empty numba cache
    (``cold``: includes compiling the kernels it needs) or the usual one (warm)."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(normlab.__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory() as tmp:
        if cold:
            env["NUMBA_CACHE_DIR"] = tmp
        code = _STARTUP.format(threads=threads)
        runs = 2 if cold else 1  # after a cold run, the same directory is warm
        result: dict[str, float] = {}
        for i in range(runs):
            proc = subprocess.run(
                [sys.executable, "-c", code], env=env, capture_output=True, text=True
            )
            if proc.returncode != 0:
                return None
            got = json.loads(proc.stdout.strip().splitlines()[-1])
            tag = "cold" if cold and i == 0 else "warm"
            result.update({f"{tag}_{k}": v for k, v in got.items()})
        return result


def page_fault_us(megabytes: int = 16) -> float:
    """Microseconds to first-touch one fresh 4 KiB page (map, write a byte per page)."""
    size = megabytes << 20
    times = []
    for _ in range(3):
        with mmap.mmap(-1, size) as region:
            t0 = time.perf_counter()
            for offset in range(0, size, mmap.PAGESIZE):
                region[offset] = 1
            times.append(time.perf_counter() - t0)
    return 1e6 * min(times) / (size // mmap.PAGESIZE)


def steady_allocator() -> str | None:
    """Make glibc keep and reuse freed memory (no ``mmap`` per large block, no trimming),
    so a benchmark's steady state pays no first-touch page faults, in both columns alike:
    on some virtual machines a fault costs microseconds per 4 KiB page and, left in,
    decides the ratios by which side's buffers glibc happened to return to the kernel.
    Returns what was set, or ``None`` if this is not glibc."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    m_trim_threshold, m_mmap_max = -1, -4
    if not (mallopt(m_mmap_max, 0) and mallopt(m_trim_threshold, 1 << 30)):
        return None
    return "glibc mallopt(M_MMAP_MAX=0, M_TRIM_THRESHOLD=1 GiB): freed memory is reused"


def _machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} logical CPUs"


def _geomean(values: Sequence[float]) -> float:
    values = [v for v in values if v > 0 and math.isfinite(v)]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else math.nan


def _format(rows: list[Row], copy_gbs: float, markdown: bool) -> str:
    columns = ["layer", "shape", "mode", "eager ms", "compile ms", "normlab ms",
               "vs eager", "vs compile", "normlab % of copy BW"]
    if not any("compile" in r.ms for r in rows):
        columns = [c for c in columns if "compile" not in c]
    lines = []
    for r in rows:
        cells = {
            "layer": r.case.label,
            "shape": "x".join(map(str, r.case.shape)),
            "mode": r.mode,
            "eager ms": f"{r.ms['eager']:.3f}",
            "compile ms": f"{r.ms.get('compile', math.nan):.3f}",
            "normlab ms": f"{r.ms['normlab']:.3f}",
            "vs eager": f"{r.ratio('eager'):.2f}x",
            "vs compile": f"{r.ratio('compile'):.2f}x",
            "normlab % of copy BW": f"{r.bandwidth_pct('normlab', copy_gbs):.0f}%",
        }
        lines.append([cells[c] for c in columns])
    if markdown:
        out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        out += ["| " + " | ".join(cells) + " |" for cells in lines]
        return "\n".join(out)
    widths = [max(len(c) for c in col) for col in zip(columns, *lines, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*cells) for cells in [columns, *lines])


def _summary(rows: list[Row]) -> list[str]:
    out = []
    groups: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.case.label, r.mode), []).append(r)
    for (label, mode), rs in groups.items():
        eager = [r.ratio("eager") for r in rs]
        line = (f"{label:<16} {mode:<5} geomean vs eager {_geomean(eager):.2f}x "
                f"(min {min(eager):.2f}x)")
        if any("compile" in r.ms for r in rs):
            line += f", vs compile {_geomean([r.ratio('compile') for r in rs]):.2f}x"
        out.append(line)
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="normlab bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes, few repetitions (CI)")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--threads", type=int, default=None,
                   help="torch (and numba) threads; default: all cores")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 25)")
    p.add_argument("--warmup", type=int, default=None, help="untimed repetitions (default 5)")
    p.add_argument("--layers", default="",
                   help="comma-separated layer names to run (default: all), e.g. BatchNorm2d")
    p.add_argument("--modes", default="train,eval", help="train and/or eval")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend of the compiled column (default inductor; "
                        "'eager' with --quick); 'none' to skip it")
    p.add_argument("--no-startup", action="store_true",
                   help="skip the subprocess start-up cost measurement")
    p.add_argument("--allocator", choices=("steady", "system"), default="steady",
                   help="steady (default): glibc reuses freed memory, so neither column pays "
                        "first-touch page faults; system: glibc's defaults")
    return p.parse_args(argv)


_OMP_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "NUMBA_THREADING_LAYER",
             "NUMBA_NUM_THREADS", "NORMLAB_OMP_WAIT_POLICY")


def threading_info() -> str:
    """The thread runtimes this run used: numba's layer and the OpenMP-related environment
    (they change the timings a lot on a loaded machine; see docs/backends.md)."""
    parts = []
    try:
        import numba

        numba.get_num_threads()  # make sure the layer is loaded before asking which
        parts.append(f"numba layer {numba.threading_layer()}")
    except (ImportError, ValueError):
        parts.append("numba layer none")
    try:
        from normlab.ops import cpu

        parts.append(f"numba OMP_WAIT_POLICY {cpu.numba_wait_policy()}")
    except ImportError:
        pass
    env = ", ".join(f"{k}={os.environ[k]}" for k in _OMP_VARS if k in os.environ)
    parts.append(f"environment: {env or 'no OpenMP variables set'}")
    return "; ".join(parts)


def _backend_label() -> str:
    """The backend normlab's layers run on here and its CPU training route (entry names:
    ``cpu`` normlab's kernels, ``native`` torch's, ``torch`` the composite code)."""
    name = normlab.ops.requested()
    entries = normlab.ops.routes("cpu", "train", name)
    return f"{name} (CPU train route: {' > '.join(type(e).__name__ for e in entries)})"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns 0, or 1 if normlab's results disagree with torch's."""
    args = parse_args(argv)
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    reps = args.reps or (3 if args.quick else 25)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
    backend = args.compile_backend or ("eager" if args.quick else "inductor")
    compile_backend = None if backend == "none" else backend
    wanted = {s.strip() for s in args.layers.split(",") if s.strip()}
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    cases = [c for c in _cases(args.quick) if not wanted or c.layer in wanted]

    fault_us = page_fault_us(4 if args.quick else 16)
    allocator = steady_allocator() if args.allocator == "steady" else None
    copy_gbs = copy_bandwidth(reps, 32 if args.quick else 256)
    print(f"# normlab bench: {_machine()}; torch {torch.__version__}, {threads} threads "
          f"(torch.get_num_threads()={torch.get_num_threads()}); backend {_backend_label()}; "
          f"float32; median of {reps} interleaved "
          f"runs after {warmup} warm-up; compile backend: {compile_backend}")
    print(f"# copy_ bandwidth: {copy_gbs:.1f} GB/s (read + write)")
    print(f"# threading: {threading_info()}")
    print(f"# allocator: {allocator or 'system defaults'}; a first-touch page fault costs "
          f"{fault_us:.2f} us per 4 KiB page here")
    rows: list[Row] = []
    problems: list[str] = []
    for case in cases:
        for mode in modes:
            row, problem = bench_case(case, mode, reps, warmup, compile_backend)
            rows.append(row)
            if problem:
                problems.append(problem)
    print(_format(rows, copy_gbs, args.markdown))
    print()
    for line in _summary(rows):
        print("# " + line)
    if compile_backend is not None:
        firsts = [r.first_call_s["compile"] for r in rows]
        print(f"# torch.compile first call (compilation): median {statistics.median(firsts):.2f}"
              f" s, max {max(firsts):.2f} s per layer/shape/mode")
    if not args.no_startup:
        cost = startup_cost(threads, cold=not args.quick)
        if cost is None:
            print("# start-up cost: the subprocess failed")
        else:
            text = ", ".join(f"{k} {v:.2f} s" for k, v in cost.items())
            print(f"# normlab start-up (fresh process, BatchNorm2d train step): {text}")
    for problem in problems:
        print("# MISMATCH: " + problem)
    return 1 if problems else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
