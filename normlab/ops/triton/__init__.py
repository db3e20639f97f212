"""The Triton provider (backend ``"triton"``): what torch has no kernel for, on GPUs.

- fused norm + activation (BatchNorm, InstanceNorm, GroupNorm, LayerNorm, RMSNorm with
  relu / leaky_relu / silu / gelu): the output in one pass, and only ``x`` and the
  statistics saved for backward, which recomputes the activation's input;
- masked statistics (over a mask's valid positions), the running update on the device
  from the kernel's valid count, no host sync;
- SyncBatchNorm's split-phase pieces (local moments, normalize with given statistics, the
  backward's reductions and input gradient).

On CUDA, ``"auto"`` takes these entries for plans with an activation or a mask (fusion
removes passes there) and torch's native kernels for the rest (``normlab.ops.torch_native``);
``backend="triton"`` takes them for every plan. On CPU tensors they run only under
``TRITON_INTERPRET=1`` and only when asked for (the tests); on ``meta`` tensors through the
registered ops' fake kernels, which proves the route reads nothing back to the host.

``triton`` is an optional dependency (``pip install normlab[gpu]``), imported at the first
call, never by ``import normlab``. The ops (``normlab::triton_forward`` and its backward)
are ``torch.library`` custom ops, so ``torch.compile(fullgraph=True)`` sees one op each
way; plain eager calls take an ``autograd.Function`` twin without the dispatch cost.
"""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from normlab import running
from normlab.ops import _library, composite
from normlab.plan import KINDS, Call, Plan, compute_dtype

NAME = "triton"
INTERPRET_VAR = "TRITON_INTERPRET"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# The kernels' activation codes (constexpr branches); elu only in in-place ABN's backward.
_ACT_CODES = {"identity": 0, "relu": 1, "leaky_relu": 2, "silu": 3, "gelu": 4}
_ABN_CODES = {"identity": 0, "leaky_relu": 2, "elu": 5}


_INSTALLED: bool | None = None
_KERNELS: ModuleType | None = None


MIN_VERSION = (3, 2)  # the kernels' language features; the GPU machines run 3.6


def installed() -> bool:
    """Whether a ``triton`` of at least :data:`MIN_VERSION` is installed (not imported
    here: its metadata is read)."""
    global _INSTALLED
    if _INSTALLED is None:
        _INSTALLED = importlib.util.find_spec("triton") is not None and _version_ok()
    return _INSTALLED


def _version_ok() -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        parts = version("triton").split(".")[:2]
        return tuple(int("".join(ch for ch in p if ch.isdigit()) or 0) for p in parts) >= (
            MIN_VERSION)
    except (PackageNotFoundError, ValueError):
        return False


def _kernels() -> ModuleType:
    """The kernels module, imported (with triton) at the first call."""
    global _KERNELS
    if _KERNELS is None:
        from normlab.ops.triton import kernels

        kernels.INTERPRETED = os.environ.get(INTERPRET_VAR) == "1"
        _KERNELS = kernels
    return _KERNELS


def runs_on(x: Tensor) -> bool:
    """Whether the kernels run on ``x``'s device: CUDA with triton installed, CPU under
    ``TRITON_INTERPRET=1`` (set before the first call), ``meta`` (fake kernels)."""
    if x.is_meta:
        return True
    if not installed():
        return False
    if x.is_cuda:
        return True
    return x.is_cpu and os.environ.get(INTERPRET_VAR) == "1" and _kernels().INTERPRETED


# --- the ops ---------------------------------------------------------------------------------


def _view4(t: Tensor, view: list[int]) -> tuple[Tensor, Tensor]:
    """``(t, t4)`` where ``t4`` is ``t`` as ``view``; a new contiguous ``t`` where the
    strides allow no view (a kernel must write through ``t4`` into ``t``)."""
    try:
        return t, t.view(view)
    except RuntimeError:
        fresh = torch.empty(t.shape, dtype=t.dtype, device=t.device)
        return fresh, fresh.view(view)


def _flat(param: Tensor | None) -> Tensor | None:
    return None if param is None else param.reshape(-1).contiguous()


def _mask4(mask: Tensor | None, view: list[int]) -> Tensor | None:
    return None if mask is None else mask.reshape(view[0], 1, 1, view[3])


def _forward_impl(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, mask: Tensor | None,
    mean: Tensor | None, var: Tensor | None, view: list[int], per_sample: bool, center: bool,
    eps: float, act: int, slope: float,
) -> tuple[Tensor, Tensor]:
    kernels = _kernels()
    x4 = x.reshape(view)
    w, b = _flat(weight), _flat(bias)
    if mean is None and mask is None and kernels.fits_rows(x4, per_sample):
        y, y4 = _view4(torch.empty_like(x), view)  # one kernel: statistics and output
        stats = kernels.rows_forward(x4, y4, w, b, center=center, eps=eps, act=act,
                                     slope=slope)
        return y, stats
    if mean is None:
        stats = kernels.moments(x4, _mask4(mask, view), per_sample=per_sample, center=center,
                                eps=eps)
    else:  # given (running) statistics
        work = compute_dtype(x.dtype)
        given_mean, given_var = mean.to(work), var.to(work)
        stats = torch.stack([given_mean, given_var, torch.rsqrt(given_var + eps),
                             torch.zeros_like(given_mean)])
    y, y4 = _view4(torch.empty_like(x), view)
    kernels.normalize(x4, y4, stats[0], stats[2], w, b, per_sample=per_sample, act=act,
                      slope=slope)
    return y, stats


def _backward_impl(
    dy: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, mask: Tensor | None,
    stats: Tensor, view: list[int], per_sample: bool, center: bool, batch_stats: bool,
    act: int, slope: float,
) -> tuple[Tensor, Tensor, Tensor]:
    kernels = _kernels()
    x4, dy4 = x.reshape(view), dy.reshape(view)
    w, b = _flat(weight), _flat(bias)
    if batch_stats and mask is None and kernels.fits_rows(x4, per_sample):
        dx, dx4 = _view4(torch.empty_like(x), view)  # one kernel: dx and the param sums
        dw, db = kernels.rows_backward(dy4, x4, dx4, w, b, stats, center=center, act=act,
                                       slope=slope)
        return dx, dw, db
    mean, rstd, count = stats[0], stats[2], stats[3]
    sum_g, sum_gx = kernels.grad_sums(dy4, x4, mean, rstd, w, b, per_sample=per_sample,
                                      act=act, slope=slope)
    through = None
    if batch_stats:
        scale = 1.0 if w is None else w.to(sum_g.dtype)
        a, c = sum_g * scale, sum_gx * scale  # [N, G*K]
        if per_sample:
            a, c = a.view(view[0], view[1], -1).sum(2), c.view(view[0], view[1], -1).sum(2)
        else:
            a, c = a.sum(0), c.sum(0)
        through = (a.reshape(-1), c.reshape(-1), count)
    dx, dx4 = _view4(torch.empty_like(x), view)
    kernels.grad_input(dy4, x4, dx4, mean, rstd, w, b, through, _mask4(mask, view),
                       per_sample=per_sample, center=center, act=act, slope=slope)
    return dx, sum_gx.sum(0), sum_g.sum(0)


@torch.library.custom_op("normlab::triton_forward", mutates_args=())
def _forward_op(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, mask: Tensor | None,
    mean: Tensor | None, var: Tensor | None, view: list[int], per_sample: bool, center: bool,
    eps: float, act: int, slope: float,
) -> tuple[Tensor, Tensor]:
    """``(y, stats [4, R])``: the output and (mean, var, rstd, count) per statistic."""
    return _forward_impl(x, weight, bias, mask, mean, var, view, per_sample, center, eps, act,
                         slope)


@_forward_op.register_fake
def _(x, weight, bias, mask, mean, var, view, per_sample, center, eps, act, slope):  # noqa: ANN001, ANN202
    stats = view[0] * view[1] if per_sample else view[1]
    return torch.empty_like(x), x.new_empty((4, stats), dtype=compute_dtype(x.dtype))


@torch.library.custom_op("normlab::triton_backward", mutates_args=())
def _backward_op(
    dy: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, mask: Tensor | None,
    stats: Tensor, view: list[int], per_sample: bool, center: bool, batch_stats: bool,
    act: int, slope: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dweight, dbias)`` (parameter grads ``[G*K]`` in the accumulator dtype)."""
    return _backward_impl(dy, x, weight, bias, mask, stats, view, per_sample, center,
                          batch_stats, act, slope)


@_backward_op.register_fake
def _(dy, x, weight, bias, mask, stats, view, per_sample, center, batch_stats, act, slope):  # noqa: ANN001, ANN202
    grad = x.new_empty((view[1] * view[2],), dtype=compute_dtype(x.dtype))
    return torch.empty_like(x), grad, torch.empty_like(grad)


def _setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, weight, bias, mask, mean, _, view, per_sample, center, eps, act, slope = inputs
    ctx.save_for_backward(x, weight, bias, mask, output[1])
    ctx.view, ctx.per_sample, ctx.center, ctx.eps = view, per_sample, center, eps
    ctx.batch_stats, ctx.act, ctx.slope = mean is None, act, slope
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _grads(ctx: Any, dy: Tensor | None, backward: Any) -> tuple:
    """The 12 input gradients: ``(dx, dweight, dbias)`` by ``backward`` (the op or its
    implementation); by the composite code when they must be differentiable again."""
    rest = (None,) * 9
    if dy is None:
        return (None, None, None, *rest)
    x, weight, bias, mask, stats = ctx.saved_tensors
    needs = tuple(ctx.needs_input_grad[:3])
    if torch.is_grad_enabled():  # create_graph=True
        if ctx.act or not ctx.batch_stats:
            raise RuntimeError(
                "normlab: the triton kernels are differentiable once with an activation or "
                "given statistics; use backend='torch' for double backward"
            )
        mask4 = _mask4(mask, ctx.view)

        def forward(x: Tensor, w: Tensor | None, b: Tensor | None) -> Tensor:
            return composite.normalize(
                x.reshape(ctx.view), _flat(w), _flat(b), per_sample=ctx.per_sample,
                center=ctx.center, eps=ctx.eps, mask4=mask4,
            )[0].view(x.shape)

        return (*_library._composite_grads(dy, (x, weight, bias), needs, forward), *rest)
    dx, dw, db = backward(dy, x, weight, bias, mask, stats, ctx.view, ctx.per_sample,
                          ctx.center, ctx.batch_stats, ctx.act, ctx.slope)
    return (dx if needs[0] else None, _library._as_param_grad(dw, weight, needs[1]),
            _library._as_param_grad(db, bias, needs[2]), *rest)


def _op_backward(ctx: Any, dy: Tensor | None, _: Tensor | None) -> tuple:
    return _grads(ctx, dy, torch.ops.normlab.triton_backward)


torch.library.register_autograd("normlab::triton_forward", _op_backward, setup_context=_setup)


class _Function(torch.autograd.Function):
    """Eager twin of ``normlab::triton_forward``."""

    @staticmethod
    def forward(ctx: Any, *inputs: Any) -> tuple[Tensor, Tensor]:
        output = _forward_impl(*inputs)
        _setup(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx: Any, dy: Tensor | None, _: Tensor | None) -> tuple:
        return _grads(ctx, dy, _backward_impl)


def forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, mask: Tensor | None,
    mean: Tensor | None, var: Tensor | None, view: list[int], per_sample: bool, center: bool,
    eps: float, act: int, slope: float,
) -> tuple[Tensor, Tensor]:
    """``(y, stats)`` through the op (tracing, ``meta``) or its eager twin."""
    args = (x, weight, bias, mask, mean, var, view, per_sample, center, eps, act, slope)
    if x.is_meta or not _library.eager(x):
        return torch.ops.normlab.triton_forward(*args)
    if _library.needs_grad(x, weight, bias):
        return _Function.apply(*args)
    return _forward_impl(*args)


# --- the routing table's entries ---------------------------------------------------------------


def _record(plan: Plan, call: Call, stats: Tensor) -> None:
    """The running update from the kernel's statistics; a masked batch's valid count is
    the kernel's too (a tensor: no host read on the device)."""
    n, g = plan.view[0], plan.view[1]
    mean, var, count = stats[0], stats[1], stats[3]
    if plan.per_sample:
        mean, var = mean.view(n, g), var.view(n, g)
    if not plan.masked:
        running.record(plan, call.running_mean, call.running_var, mean, var)
    elif plan.per_sample:
        running.record(plan, call.running_mean, call.running_var, mean, var,
                       counts=count.view(n, g)[:, 0])
    else:
        running.record(plan, call.running_mean, call.running_var, mean, var, count=count[0])


class TritonStep:
    """Any plan of the family in one kernel each way (see the module doc). ``fused_only``:
    only plans with an activation or a mask (what ``"auto"`` takes on CUDA);
    ``explicit_only``: left out of ``"auto"`` (the CPU table's entry, for the
    interpreter)."""

    name = NAME
    kinds = frozenset(KINDS)
    masks = True

    def __init__(self, *, fused_only: bool = False, explicit_only: bool = False) -> None:
        self.fused_only, self.explicit_only = fused_only, explicit_only

    def applies(self, plan: Plan, call: Call) -> bool:
        x = call.x
        if self.fused_only and plan.act == "identity" and not plan.masked:
            return False
        if plan.act not in _ACT_CODES or x.dtype not in _DTYPES or x.numel() == 0:
            return False
        if not plan.per_sample and plan.view[2] != 1:
            return False
        stats_need_grad = any(
            t is not None and t.requires_grad for t in (call.running_mean, call.running_var)
        )
        return not stats_need_grad and runs_on(x) and not _library.composite_only(x)

    def forward(self, plan: Plan, call: Call) -> Tensor:
        x, weight, bias, running_mean, running_var, mask = call
        given = not plan.batch_stats
        y, stats = forward(
            x, weight, bias, mask if plan.masked else None,
            running_mean if given else None, running_var if given else None,
            list(plan.view), plan.per_sample, plan.center, plan.eps, _ACT_CODES[plan.act],
            float(plan.slope),
        )
        if plan.batch_stats and running_mean is not None:
            _record(plan, call, stats)
        return y


class Pieces:
    """SyncBatchNorm's split-phase pieces (``normlab.ops.Pieces``) on the kernels; not
    differentiable (SyncBatchNorm's own autograd calls them)."""

    name = NAME

    @staticmethod
    def supports(x: Tensor) -> bool:
        """Non-empty input on a device the kernels run on (an empty one: the composite
        code, which gives its NaN statistics)."""
        return x.numel() > 0 and runs_on(x)

    @staticmethod
    def moments(x4: Tensor, *, per_sample: bool, center: bool) -> tuple[Tensor, Tensor]:
        stats = _stats(x4, None, per_sample, center, 0.0)
        return _stat_shape(stats[0], x4, per_sample), _stat_shape(stats[1], x4, per_sample)

    @staticmethod
    def normalize(
        x4: Tensor, weight: Tensor | None, bias: Tensor | None, *, per_sample: bool,
        center: bool, eps: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        y4, stats = forward(x4, weight, bias, None, None, None, list(x4.shape),
                            per_sample, center, eps, 0, 0.0)
        return (y4, _stat_shape(stats[0], x4, per_sample),
                _stat_shape(stats[1], x4, per_sample))

    @staticmethod
    def normalize_with_stats(
        x4: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None,
        *, eps: float,
    ) -> Tensor:
        return forward(x4, weight, bias, None, mean, var, list(x4.shape), False, True,
                       eps, 0, 0.0)[0]

    @staticmethod
    def backward_reduce(
        dy4: Tensor, x4: Tensor, mean: Tensor, rstd: Tensor
    ) -> tuple[Tensor, Tensor]:
        if x4.is_meta:
            return torch.empty_like(mean), torch.empty_like(mean)
        sum_g, sum_gx = _kernels().grad_sums(dy4, x4, mean, rstd, None, None,
                                             per_sample=False, act=0, slope=0.0)
        return sum_g.sum(0), sum_gx.sum(0)

    @staticmethod
    def backward_apply(
        dy4: Tensor, x4: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor | None,
        sum_dy: Tensor, sum_dy_xhat: Tensor, count: int | Tensor,
    ) -> Tensor:
        if x4.is_meta:
            return torch.empty_like(x4)
        scale = 1.0 if weight is None else weight.to(sum_dy.dtype)
        counts = (count.to(mean.dtype).expand_as(mean).contiguous()
                  if isinstance(count, Tensor) else torch.full_like(mean, float(count)))
        dx4 = torch.empty_like(x4) if x4.is_contiguous() else torch.empty(
            x4.shape, dtype=x4.dtype, device=x4.device)
        _kernels().grad_input(dy4, x4, dx4, mean, rstd, _flat(weight), None,
                              (sum_dy * scale, sum_dy_xhat * scale, counts), None,
                              per_sample=False, center=True, act=0, slope=0.0)
        return dx4


    @staticmethod
    def backward_from_output(
        dz4: Tensor, z4: Tensor, weight: Tensor | None, bias: Tensor | None, rstd: Tensor,
        count: int | Tensor, act: str, param: float, mask4: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """In-place ABN's backward from its output, in two kernels (sums, input gradient)."""
        if z4.is_meta:
            return torch.empty_like(z4), torch.empty_like(rstd), torch.empty_like(rstd)
        kernels, code = _kernels(), _ABN_CODES[act]
        w, b = _flat(weight), _flat(bias)
        sum_g, sum_gx = kernels.grad_sums(dz4, z4, rstd, rstd, w, b, per_sample=False,
                                          act=code, slope=param, from_output=True)
        sum_dy, sum_dy_xhat = sum_g.sum(0), sum_gx.sum(0)
        scale = 1.0 if w is None else w.to(sum_dy.dtype)
        counts = (count.to(rstd.dtype) if isinstance(count, Tensor) else
                  torch.tensor(float(count), dtype=rstd.dtype, device=rstd.device))
        dx4 = torch.empty(z4.shape, dtype=z4.dtype, device=z4.device)
        kernels.grad_input(dz4, z4, dx4, rstd, rstd, w, b,
                           (sum_dy * scale, sum_dy_xhat * scale,
                            counts.expand_as(rstd).contiguous()),
                           mask4, per_sample=False, center=True, act=code, slope=param,
                           from_output=True)
        return dx4, sum_dy, sum_dy_xhat


def _stats(x4: Tensor, mask4: Tensor | None, per_sample: bool, center: bool,
           eps: float) -> Tensor:
    if x4.is_meta:
        stats = x4.shape[0] * x4.shape[1] if per_sample else x4.shape[1]
        return x4.new_empty((4, stats), dtype=compute_dtype(x4.dtype))
    return _kernels().moments(x4, mask4, per_sample=per_sample, center=center, eps=eps)


def _stat_shape(stat: Tensor, x4: Tensor, per_sample: bool) -> Tensor:
    return stat.view(x4.shape[0], x4.shape[1]) if per_sample else stat


PIECES = Pieces()
# Entries per device type and mode, placed before that device's other entries.
ROUTES = {
    "cuda": {"train": (TritonStep(fused_only=True), TritonStep(explicit_only=True)),
             "eval": (TritonStep(fused_only=True), TritonStep(explicit_only=True))},
    "meta": {"train": (TritonStep(fused_only=True),), "eval": (TritonStep(fused_only=True),)},
    "cpu": {"train": (TritonStep(explicit_only=True),),
            "eval": (TritonStep(explicit_only=True),)},
}
