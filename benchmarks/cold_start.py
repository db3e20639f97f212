"""What the first call of each layer costs in a fresh process: with an empty kernel cache
(numba compiles what the call needs) and with a warm one (the kernels load from disk).

Each figure is one subprocess: import normlab, build the layer, time its first training
step (forward + backward) on a small input, then a second one (warm). Usage:
``python benchmarks/cold_start.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {
    "BatchNorm2d": ("normlab.BatchNorm2d(16)", (8, 16, 8, 8)),
    "InstanceNorm2d": ("normlab.InstanceNorm2d(16, affine=True)", (8, 16, 8, 8)),
    "GroupNorm": ("normlab.GroupNorm(4, 16)", (8, 16, 8, 8)),
    "LayerNorm": ("normlab.LayerNorm(64)", (8, 32, 64)),
    "RMSNorm": ("normlab.RMSNorm(64)", (8, 32, 64)),
}
_PROBE = """
import json, sys, time
start = time.perf_counter()
import torch, normlab
imported = time.perf_counter() - start
layer = {build}
x = torch.randn({shape}, requires_grad=True)
times = []
for _ in range(2):
    start = time.perf_counter()
    layer(x).square().sum().backward()
    times.append(time.perf_counter() - start)
print(json.dumps({{"import": imported, "first": times[0], "second": times[1]}}))
"""


def probe(name: str, cache: str) -> dict[str, float]:
    build, shape = LAYERS[name]
    env = {**os.environ, "NUMBA_CACHE_DIR": cache,
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run([sys.executable, "-c", _PROBE.format(build=build, shape=shape)],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    print(f"{'layer':16s} {'import s':>9s} {'cold first s':>13s} {'warm first s':>13s} "
          f"{'second s':>9s}")
    for name in LAYERS:
        with tempfile.TemporaryDirectory() as cache:
            cold = probe(name, cache)
            warm = probe(name, cache)
        print(f"{name:16s} {warm['import']:9.2f} {cold['first']:13.2f} {warm['first']:13.3f} "
              f"{warm['second']:9.4f}")


if __name__ == "__main__":
    main()
