"""The torchrun example runs: 2 processes on CPU (gloo), uneven slices, replicas agree."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_syncbn_torchrun_example_two_processes() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # The composite kernels: the fast ones are covered by test_syncbatchnorm, and their
    # first call costs each process seconds of imports (torch.library/dynamo).
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", NORMLAB_BACKEND="torch")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(port),
        str(ROOT / "examples" / "syncbn_torchrun.py"), "--steps", "3", "--uneven",
    ]
    done = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 process(es), slice of rank 0: 48 of 64; 3 steps" in done.stdout, done.stdout
    assert "replicas identical: True" in done.stdout, done.stdout
