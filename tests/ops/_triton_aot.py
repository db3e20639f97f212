"""Compile every Triton kernel configuration the provider dispatches for a table of shapes
for sm_90 (H100/H200) ahead of time, on the CPU, and report registers and local memory.

Run without ``TRITON_INTERPRET`` (the kernels must be real ``JITFunction``s):

    python tests/ops/_triton_aot.py

The launchers of ``normlab.ops.triton.kernels`` run on ``meta`` tensors with each kernel
replaced by a recorder, so the configurations compiled are exactly the ones the launchers
would launch (tile sizes from ``kernels.tiles``). Prints one JSON line per distinct
configuration: kernel, constexprs, registers, local bytes (spills), and an error if any.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from normlab import plan  # noqa: E402

KERNELS = ("_partial_moments", "_merge_moments", "_normalize", "_grad_sums", "_grad_input",
           "_rows_forward", "_rows_backward")
POINTER = {torch.float32: "*fp32", torch.float64: "*fp64", torch.float16: "*fp16",
           torch.bfloat16: "*bf16", torch.uint8: "*u8", torch.bool: "*i1"}
# (kind, input shape): the benchmark's shapes (benchmarks/gpu.py) and a few odd ones
SHAPES = [
    ("batch", (32, 64, 112, 112)), ("batch", (32, 1024, 14, 14)), ("batch", (4096, 1024)),
    ("batch", (64, 256, 512)), ("group", (32, 256, 56, 56)), ("instance", (32, 64, 112, 112)),
    ("layer", (16, 2048, 4096)), ("rms", (16, 2048, 4096)), ("layer", (8, 77, 768)),
    ("batch", (3, 5, 7)), ("group", (2, 6, 5, 5)),
]


class Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **constexprs)`` records the call."""

    def __init__(self, name: str, fn: Any, calls: list) -> None:
        self.name, self.fn, self.calls = name, fn, calls

    def __getitem__(self, grid: Any) -> Any:
        def launch(*args: Any, **constexprs: Any) -> None:
            self.calls.append((self.name, self.fn, args, constexprs))
        return launch


def _signature(fn: Any, args: tuple, constexprs: dict) -> tuple[dict, dict]:
    signature, constants = {}, dict(constexprs)
    for name, value in zip(fn.arg_names, args, strict=False):
        if isinstance(value, torch.Tensor):
            signature[name] = POINTER[value.dtype]
        elif value is None:
            signature[name], constants[name] = "constexpr", None
        elif isinstance(value, bool):
            signature[name], constants[name] = "constexpr", value
        elif isinstance(value, int):
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
        else:
            signature[name] = "fp32"
    for name in constexprs:
        signature[name] = "constexpr"
    return signature, constants


def _calls() -> list:
    from normlab.ops.triton import kernels as K

    calls: list = []
    for name in KERNELS:
        setattr(K, name, Recorder(name, getattr(K, name), calls))
    for dtype in (torch.float32, torch.bfloat16):
        for kind, shape in SHAPES:
            x = torch.empty(shape, device="meta", dtype=dtype)
            if kind == "batch":
                p = plan.batch(x, True, 1e-5, 0.1)
            elif kind == "instance":
                p = plan.instance(x, True, 1e-5)
            elif kind == "group":
                p = plan.group(x, 32 if shape[1] % 32 == 0 else 2, 1e-5)
            else:
                p = (plan.layer if kind == "layer" else plan.rms)(x, shape[-1:], 1e-5)
            x4 = x.reshape(p.view)
            features = p.view[1] * p.view[2]
            w = torch.empty(features, device="meta", dtype=torch.float32)
            masks = [None, torch.empty(p.view[0], 1, 1, p.view[3], device="meta",
                                       dtype=torch.bool)] if kind == "batch" else [None]
            if K.fits_rows(x4, p.per_sample):  # LayerNorm/RMSNorm: one program per row
                for act in (0, 4):
                    stats = K.rows_forward(x4, x4, w, w, center=p.center, eps=1e-5, act=act,
                                           slope=0.0)
                    K.rows_backward(x4, x4, x4, w, w, stats, center=p.center, act=act,
                                    slope=0.0)
            for mask4 in masks:
                stats = K.moments(x4, mask4, per_sample=p.per_sample, center=p.center, eps=1e-5)
                for act in (0, 4):  # none, and gelu: the activation with the most registers
                    K.normalize(x4, x4, stats[0], stats[2], w, w, per_sample=p.per_sample,
                                act=act, slope=0.0)
                    K.grad_sums(x4, x4, stats[0], stats[2], w, w, per_sample=p.per_sample,
                                act=act, slope=0.0)
                    through = (stats[0], stats[1], stats[3])
                    K.grad_input(x4, x4, x4, stats[0], stats[2], w, w, through, mask4,
                                 per_sample=p.per_sample, center=p.center, act=act, slope=0.0)
                if kind == "batch" and mask4 is None:  # in-place ABN's backward, elu
                    K.grad_sums(x4, x4, stats[2], stats[2], w, w, per_sample=False, act=5,
                                slope=1.0, from_output=True)
                    K.grad_input(x4, x4, x4, stats[2], stats[2], w, w, through, None,
                                 per_sample=False, center=True, act=5, slope=1.0,
                                 from_output=True)
    return calls


def _usage(kernel: Any, tools: Path) -> tuple[int, int]:
    """``(registers, local bytes)`` of a compiled kernel's sm_90 cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    try:
        out = subprocess.run([str(tools / "cuobjdump"), "-res-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    line = next(ln for ln in out.splitlines() if "REG:" in ln)
    fields = dict(part.split(":", 1) for part in line.split() if ":" in part)
    return int(fields["REG"]), int(fields["LOCAL"])


def main() -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("run without TRITON_INTERPRET=1")
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    target = GPUTarget("cuda", 90, 32)
    seen = set()
    for name, fn, args, constexprs in _calls():
        constexprs = dict(constexprs)
        options = {"num_warps": constexprs.pop("num_warps", 4)}
        signature, constants = _signature(fn, args, constexprs)
        key = (name, json.dumps(signature, sort_keys=True), options["num_warps"],
               json.dumps({k: str(v) for k, v in constants.items()}, sort_keys=True))
        if key in seen:
            continue
        seen.add(key)
        row: dict[str, Any] = {"kernel": name, **options, "constexprs": {
            k: str(v) for k, v in constexprs.items()}}
        try:
            compiled = triton.compile(ASTSource(fn, signature, constants), target=target,
                                      options=options)
            row["registers"], row["local_bytes"] = _usage(compiled, tools)
        except Exception as exc:  # reported, and the test fails on it
            row["error"] = f"{type(exc).__name__}: {exc}"[:500]
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
