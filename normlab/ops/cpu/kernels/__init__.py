"""The numba kernels of the CPU provider (``common`` says how they compute), compiled per
function and dtype at first use and cached on disk where ``normlab.ops.cpu.runtime``
says."""

# The disk cache's place is set before any kernel's decorator runs (numba picks it then).
from normlab.ops.cpu import runtime  # noqa: F401, I001

from normlab.ops.cpu.kernels.channels import (
    channel_cols_backward,
    channel_cols_forward,
    channel_rows_backward,
    channel_rows_forward,
)
from normlab.ops.cpu.kernels.common import ACT_CODES, running_update
from normlab.ops.cpu.kernels.masked import (
    masked_planes_backward,
    masked_planes_forward,
    masked_rows_backward,
    masked_rows_forward,
)
from normlab.ops.cpu.kernels.planes import planes_backward, planes_forward
from normlab.ops.cpu.kernels.rows import rows_backward, rows_forward

__all__ = [
    "ACT_CODES",
    "channel_cols_backward",
    "channel_cols_forward",
    "channel_rows_backward",
    "channel_rows_forward",
    "masked_planes_backward",
    "masked_planes_forward",
    "masked_rows_backward",
    "masked_rows_forward",
    "planes_backward",
    "planes_forward",
    "rows_backward",
    "rows_forward",
    "running_update",
]
