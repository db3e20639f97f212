"""Shared fixtures: every numerical test runs once per available kernel backend."""

from __future__ import annotations

import os
from collections.abc import Iterator

# Triton's interpreter is chosen when triton is imported (its own library's jit functions
# included): set before anything imports it, so the Triton provider's tests run its
# kernels on CPU tensors (tests/ops/test_triton.py). Other tests never ask for it.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import normlab  # noqa: E402
from normlab import ops  # noqa: E402

# Keep tests reproducible and light on the 2-core CI machine.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(params=["auto", *ops.available()])
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """Runs the test with ``normlab.use_backend(name)`` for "auto" (the route users get)
    and each importable backend."""
    with normlab.use_backend(request.param):
        yield request.param


def pytest_addoption(parser: pytest.Parser) -> None:
    """``--fuzz-cases N`` / ``--fuzz-seed S``: a longer run of ``tests/test_fuzz.py`` (also
    ``NORMLAB_FUZZ_CASES`` / ``NORMLAB_FUZZ_SEED``)."""
    group = parser.getgroup("normlab fuzz")
    group.addoption("--fuzz-cases", type=int, default=None,
                    help="cases per backend in tests/test_fuzz.py (default: its fast slice)")
    group.addoption("--fuzz-seed", type=int, default=None,
                    help="seed of the cases in tests/test_fuzz.py (default 0)")
