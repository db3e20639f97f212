"""The CPU provider: numba kernels behind the routing table of ``normlab.ops``.

- ``runtime``: numba's thread pool, the kernels' disk cache, the fork guard;
- ``kernels``: the numba kernels (compiled per function and dtype at first use);
- ``layouts``: the ``[N, G, K, S]`` view as the kernels' arrays;
- ``impl``: the ops of ``normlab.ops._library`` on those kernels (registered for "cpu");
- ``steps``: the one-call steps (BatchNorm training, the per-row norms);
- ``masked``: masked BatchNorm, InstanceNorm and GroupNorm training (statistics over a
  mask's valid positions);
- ``native``: the entries that run torch's own kernels where they are faster.

``ROUTES`` lists the entries for CPU tensors per mode, fastest first; the routing table
appends the composite provider. ``PIECES`` is SyncBatchNorm's split-phase interface.
"""

from __future__ import annotations

from torch import Tensor

from normlab.ops import _library, composite
from normlab.ops.composite import run
from normlab.ops.cpu import impl
from normlab.ops.cpu.kernels import ACT_CODES
from normlab.ops.cpu.masked import MaskedBatchStep, MaskedRowsStep
from normlab.ops.cpu.native import NativeEval, NativeNorm
from normlab.ops.cpu.runtime import (
    FORKED_CHILD_WARNING,
    SERIAL_BELOW,
    WAIT_POLICY_VAR,
    cache_dir,
    numba_wait_policy,
    supports,
    sync_threads,
)
from normlab.ops.cpu.steps import FUSED_MIN_NUMEL, BatchStep, RowsStep
from normlab.plan import KINDS, Call, Plan

__all__ = [
    "ACT_CODES", "FORKED_CHILD_WARNING", "FUSED_MIN_NUMEL", "NAME", "PIECES", "ROUTES",
    "SERIAL_BELOW", "WAIT_POLICY_VAR", "cache_dir", "numba_wait_policy", "supports",
    "sync_threads",
]

NAME = "cpu"


class General:
    """Any plan on the ``x4`` view through the registered ops (their eager twins in eager
    mode): the kernels for every layout and dtype, float16/bfloat16 computed in float32."""

    name = NAME
    kinds = frozenset(KINDS)

    @staticmethod
    def applies(plan: Plan, call: Call) -> bool:
        return supports(call.x)

    @staticmethod
    def forward(plan: Plan, call: Call) -> Tensor:
        return run(plan, call, _library.normalize, _library.normalize_with_stats,
                   impl.running_update)


class Pieces:
    """The split-phase pieces (``normlab.ops.Pieces``) on the kernels."""

    name = NAME
    supports = staticmethod(supports)
    normalize = staticmethod(_library.normalize)
    normalize_with_stats = staticmethod(_library.normalize_with_stats)
    moments = staticmethod(_library.moments)
    backward_reduce = staticmethod(_library.backward_reduce)
    backward_apply = staticmethod(_library.backward_apply)
    backward_from_output = staticmethod(composite.backward_from_output)


PIECES = Pieces()
ROUTES = {
    "train": (BatchStep(), MaskedBatchStep(), MaskedRowsStep(), RowsStep(fused_only=True),
              NativeNorm(), RowsStep(fused_only=False), General()),
    "eval": (NativeEval(), General()),
}
