"""The normalization ops, defined once for every device: ``torch.library`` schemas, fake
(meta) kernels, autograd formulas with the composite double backward, and their eager
twins (``torch.autograd.Function``), plus :class:`StepFunction`, the autograd of a
provider's one-call steps.

A provider registers its implementations for a device with :func:`register` (an
:class:`Implementations`); the registered ops then run them, under ``torch.compile`` and
``torch.export`` as single ops (``opcheck``-tested), and in plain eager mode the same
implementations run through the ``autograd.Function`` twins (the custom-op dispatcher
costs tens of microseconds a call, which small tensors notice).

Double backward (a backward with ``create_graph=True``) differentiates the composite code
(``normlab.ops.composite``), which autograd can differentiate again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from normlab.ops import composite
from normlab.plan import compute_dtype


class Implementations(NamedTuple):
    """A device's implementations of the ops (plain tensors in and out, no autograd):

    - ``forward(x4, weight, bias, per_sample, center, eps, write) -> (y4, mean, var,
      rstd)`` (``y4`` empty unless ``write``);
    - ``backward(dy4, x4, mean, rstd, weight, per_sample, center) -> (dx4, dweight,
      dbias)`` (parameter grads ``[G*K]`` in the compute dtype);
    - ``apply(x4, mean, var, weight, bias, eps) -> y4`` with statistics ``[G]``;
    - ``channel_backward(dy4, x4, mean, rstd, weight, sums, count, apply) -> (sum_dy,
      sum_dy_xhat, dx4)``: the sums unless given in ``sums``, ``dx4`` if ``apply``.
    """

    forward: Callable[..., tuple[Tensor, Tensor, Tensor, Tensor]]
    backward: Callable[..., tuple[Tensor, Tensor, Tensor]]
    apply: Callable[..., Tensor]
    channel_backward: Callable[..., tuple[Tensor, Tensor, Tensor]]


_IMPLEMENTATIONS: dict[str, Implementations] = {}


def register(device_type: str, implementations: Implementations) -> None:
    """Run the ops on tensors of ``device_type`` with ``implementations``."""
    _IMPLEMENTATIONS[device_type] = implementations


def _on(t: Tensor) -> Implementations:
    found = _IMPLEMENTATIONS.get(t.device.type)
    if found is None:
        raise NotImplementedError(
            f"normlab's kernels have no implementation for device {t.device.type!r}; "
            "the routing table sends such tensors to the composite provider"
        )
    return found


def check_per_channel(x4: Tensor, per_sample: bool) -> None:
    if not per_sample and x4.shape[2] != 1:
        raise ValueError(
            f"per-channel statistics need x4 [N, G, 1, S], got x4 of shape {tuple(x4.shape)}"
        )


# --- torch.library: what torch.compile and torch.export see ------------------------------

def _stat_like(x4: Tensor, per_sample: bool) -> Tensor:
    shape = (x4.shape[0], x4.shape[1]) if per_sample else (x4.shape[1],)
    return x4.new_empty(shape, dtype=compute_dtype(x4.dtype))


@torch.library.custom_op("normlab::normalize", mutates_args=())
def _normalize_op(
    x4: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    per_sample: bool,
    center: bool,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Train-mode normalization: ``(y4, mean, var, rstd)``."""
    return _on(x4).forward(x4, weight, bias, per_sample, center, eps, True)


@_normalize_op.register_fake
def _(x4, weight, bias, per_sample, center, eps):  # noqa: ANN001, ANN202
    check_per_channel(x4, per_sample)
    stat = _stat_like(x4, per_sample)
    return torch.empty_like(x4), stat, torch.empty_like(stat), torch.empty_like(stat)


@torch.library.custom_op("normlab::normalize_backward", mutates_args=())
def _normalize_backward_op(
    dy4: Tensor,
    x4: Tensor,
    mean: Tensor,
    rstd: Tensor,
    weight: Tensor | None,
    per_sample: bool,
    center: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx4, dweight, dbias)`` of ``normlab::normalize`` (parameter grads ``[G*K]``)."""
    return _on(x4).backward(dy4, x4, mean, rstd, weight, per_sample, center)


@_normalize_backward_op.register_fake
def _(dy4, x4, mean, rstd, weight, per_sample, center):  # noqa: ANN001, ANN202
    check_per_channel(x4, per_sample)
    features = x4.shape[1] * x4.shape[2]
    grad = x4.new_empty((features,), dtype=compute_dtype(x4.dtype))
    return torch.empty_like(x4), grad, torch.empty_like(grad)


@torch.library.custom_op("normlab::normalize_with_stats", mutates_args=())
def _normalize_with_stats_op(
    x4: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    """Eval-mode normalization with given statistics ``[G]``."""
    return _on(x4).apply(x4, mean, var, weight, bias, eps)


@_normalize_with_stats_op.register_fake
def _(x4, mean, var, weight, bias, eps):  # noqa: ANN001, ANN202
    return torch.empty_like(x4)


@torch.library.custom_op("normlab::moments", mutates_args=())
def _moments_op(x4: Tensor, per_sample: bool, center: bool) -> tuple[Tensor, Tensor]:
    """Biased ``(mean, var)``, ``[G]`` or ``[N, G]``."""
    _, mean, var, _ = _on(x4).forward(x4, None, None, per_sample, center, 0.0, False)
    return mean, var


@_moments_op.register_fake
def _(x4, per_sample, center):  # noqa: ANN001, ANN202
    check_per_channel(x4, per_sample)
    stat = _stat_like(x4, per_sample)
    return stat, torch.empty_like(stat)


@torch.library.custom_op("normlab::backward_reduce", mutates_args=())
def _backward_reduce_op(
    dy4: Tensor, x4: Tensor, mean: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor]:
    """Per-channel ``(sum dy, sum dy * xhat)`` ``[G]``."""
    sum_dy, sum_dyx, _ = _on(x4).channel_backward(dy4, x4, mean, rstd, None, None, 1, False)
    return sum_dy, sum_dyx


@_backward_reduce_op.register_fake
def _(dy4, x4, mean, rstd):  # noqa: ANN001, ANN202
    check_per_channel(x4, False)
    stat = _stat_like(x4, False)
    return stat, torch.empty_like(stat)


@torch.library.custom_op("normlab::backward_apply", mutates_args=())
def _backward_apply_op(
    dy4: Tensor,
    x4: Tensor,
    mean: Tensor,
    rstd: Tensor,
    weight: Tensor | None,
    sum_dy: Tensor,
    sum_dy_xhat: Tensor,
    count: int,
) -> Tensor:
    """BatchNorm input gradient from per-channel sums over ``count`` elements."""
    _, _, dx4 = _on(x4).channel_backward(
        dy4, x4, mean, rstd, weight, (sum_dy, sum_dy_xhat), count, True
    )
    return dx4


@_backward_apply_op.register_fake
def _(dy4, x4, mean, rstd, weight, sum_dy, sum_dy_xhat, count):  # noqa: ANN001, ANN202
    check_per_channel(x4, False)
    return torch.empty_like(x4)



# --- autograd: one formula each, for the registered ops and their eager twins ----------


def _composite_grads(
    grad: Tensor,
    inputs: tuple[Tensor | None, ...],
    needs: tuple[bool, ...],
    forward: Callable[..., Tensor],
) -> tuple[Tensor | None, ...]:
    """Gradients by differentiating the composite torch code, with ``create_graph`` so
    they can be differentiated again (double backward)."""
    pairs = list(zip(inputs, needs, strict=True))
    wanted = [t for t, need in pairs if need and t is not None]
    with torch.enable_grad():
        out = forward(*inputs)
    got = iter(torch.autograd.grad(out, wanted, grad, create_graph=True, allow_unused=True))
    return tuple(next(got) if need and t is not None else None for t, need in pairs)


def _as_param_grad(grad: Tensor, param: Tensor | None, needed: bool) -> Tensor | None:
    if param is None or not needed:
        return None
    return grad.to(param.dtype).view(param.shape)


def _train_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    x4, weight, bias, per_sample, center, eps = inputs
    mean, var, rstd = output[1:4]
    ctx.save_for_backward(x4, weight, bias, mean, rstd)
    ctx.per_sample, ctx.center, ctx.eps = per_sample, center, eps
    ctx.mark_non_differentiable(mean, var, rstd)
    ctx.set_materialize_grads(False)


def _train_grads(ctx: Any, grad_y: Tensor | None, kernel: Callable) -> tuple:
    """``(dx, dweight, dbias)`` of a train-mode normalization, by ``kernel`` (the backward
    op or its implementation) or, under ``create_graph``, by the composite code."""
    x4, weight, bias, mean, rstd = ctx.saved_tensors
    needs = tuple(ctx.needs_input_grad[:3])
    if grad_y is None:
        return None, None, None
    if torch.is_grad_enabled():  # create_graph=True: the grads must be differentiable

        def forward(x: Tensor, w: Tensor | None, b: Tensor | None) -> Tensor:
            return composite.normalize(
                x, w, b, per_sample=ctx.per_sample, center=ctx.center, eps=ctx.eps
            )[0]

        return _composite_grads(grad_y, (x4, weight, bias), needs, forward)
    dx, dw, db = kernel(grad_y, x4, mean, rstd, weight, ctx.per_sample, ctx.center)
    return (
        dx if needs[0] else None,
        _as_param_grad(dw, weight, needs[1]),
        _as_param_grad(db, bias, needs[2]),
    )


def _with_stats_setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
    x4, mean, var, weight, bias, eps = inputs
    ctx.save_for_backward(x4, mean, var, weight, bias)
    ctx.eps = eps
    ctx.set_materialize_grads(False)


def _with_stats_grads(ctx: Any, grad_y: Tensor | None, apply: Callable, reduce: Callable) -> tuple:
    """``(dx, dmean, dvar, dweight, dbias)`` of the eval-mode normalization: ``dx`` by
    ``apply`` (the eval kernel on ``dy`` with a zero mean gives ``dy * rstd * w``), the
    parameter grads by the per-channel ``reduce``; composite code for double backward
    and for gradients of the statistics themselves."""
    x4, mean, var, weight, bias = ctx.saved_tensors
    needs = tuple(ctx.needs_input_grad[:5])
    if grad_y is None:
        return None, None, None, None, None
    if torch.is_grad_enabled() or needs[1] or needs[2] or x4.shape[2] != 1:

        def forward(*args: Tensor | None) -> Tensor:
            return composite.normalize_with_stats(*args, eps=ctx.eps)

        return _composite_grads(grad_y, (x4, mean, var, weight, bias), needs, forward)
    dx = dw = db = None
    if needs[0]:
        dx = apply(grad_y, torch.zeros_like(mean), var, weight, None, ctx.eps)
    if needs[3] or needs[4]:
        rstd = torch.rsqrt(var.to(compute_dtype(x4.dtype)) + ctx.eps)
        sum_dy, sum_dyx = reduce(grad_y, x4, mean, rstd)
        dw = _as_param_grad(sum_dyx, weight, needs[3])
        db = _as_param_grad(sum_dy, bias, needs[4])
    return dx, None, None, dw, db


def _reduce(dy4: Tensor, x4: Tensor, mean: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    sum_dy, sum_dyx, _ = _on(x4).channel_backward(dy4, x4, mean, rstd, None, None, 1, False)
    return sum_dy, sum_dyx


def _backward(*args: Any) -> tuple[Tensor, Tensor, Tensor]:
    return _on(args[1]).backward(*args)


def _apply(*args: Any) -> Tensor:
    return _on(args[0]).apply(*args)


def _normalize_op_backward(ctx: Any, grad_y: Tensor | None, *_: Tensor | None) -> tuple:
    return (*_train_grads(ctx, grad_y, torch.ops.normlab.normalize_backward), None, None, None)


def _with_stats_op_backward(ctx: Any, grad_y: Tensor | None) -> tuple:
    ops = torch.ops.normlab
    return (*_with_stats_grads(ctx, grad_y, ops.normalize_with_stats, ops.backward_reduce), None)


torch.library.register_autograd(
    "normlab::normalize", _normalize_op_backward, setup_context=_train_setup
)
torch.library.register_autograd(
    "normlab::normalize_with_stats", _with_stats_op_backward, setup_context=_with_stats_setup
)


class NormalizeFunction(torch.autograd.Function):
    """Eager twin of ``normlab::normalize`` without the custom-op dispatch cost."""

    @staticmethod
    def forward(ctx: Any, *inputs: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        output = _on(inputs[0]).forward(*inputs, True)
        _train_setup(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor | None, *_: Tensor | None) -> tuple:
        return (*_train_grads(ctx, grad_y, _backward), None, None, None)


class WithStatsFunction(torch.autograd.Function):
    """Eager twin of ``normlab::normalize_with_stats``."""

    @staticmethod
    def forward(ctx: Any, *inputs: Any) -> Tensor:
        output = _apply(*inputs)
        _with_stats_setup(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor | None) -> tuple:
        return (*_with_stats_grads(ctx, grad_y, _apply, _reduce), None)


def eager(x4: Tensor) -> bool:
    """Whether to call the implementations directly rather than through the registered
    op: plain eager tensors, no torch.compile/export tracing, no dispatch mode active."""
    return (
        type(x4) is Tensor
        and not torch.compiler.is_compiling()
        and torch._C._len_torch_dispatch_stack() == 0
    )


def needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def composite_only(x4: Tensor) -> bool:
    """functorch transforms (vmap, grad) know the composite code, not the kernels."""
    return torch._C._are_functorch_transforms_active()



class StepFunction(torch.autograd.Function):
    """Autograd of a provider's one-call step: ``StepFunction.apply(step, x, weight, bias,
    *args)`` runs ``step.forward(ctx, x, weight, bias, *args)``, which returns the output
    and saves ``x, weight, bias, stats`` with ``ctx.shape4`` (the ``x4`` view),
    ``ctx.per_sample``, ``ctx.center``, ``ctx.eps``, ``ctx.act`` (and, masked, ``ctx.mask4``)
    set; backward runs
    ``step.backward(ctx, dy, x, weight, bias, stats, needs) -> (dx, dweight, dbias)``.
    Gradients to be differentiated again (``create_graph=True``) come from the composite
    code instead, or, with a fused activation, a RuntimeError (differentiable once)."""

    @staticmethod
    def forward(ctx: Any, step: Any, x: Tensor, weight: Tensor | None,
                bias: Tensor | None, *args: Any) -> Tensor:
        ctx.step, ctx.extra = step, len(args)
        return step.forward(ctx, x, weight, bias, *args)

    @staticmethod
    def backward(ctx: Any, dy: Tensor | None) -> tuple:
        x, weight, bias, stats = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[1:4])
        rest = (None,) * ctx.extra
        if dy is None:
            return (None, None, None, None, *rest)
        if not torch.is_grad_enabled():
            return (None, *ctx.step.backward(ctx, dy, x, weight, bias, stats, needs), *rest)
        if ctx.act:
            raise RuntimeError(
                "normlab: the fused norm + activation kernels are differentiable once; use "
                "backend='torch' for double backward"
            )

        def forward(x: Tensor, w: Tensor | None, b: Tensor | None) -> Tensor:
            y4 = composite.normalize(
                x.reshape(ctx.shape4),
                None if w is None else w.reshape(-1),
                None if b is None else b.reshape(-1),
                per_sample=ctx.per_sample, center=ctx.center, eps=ctx.eps,
                mask4=getattr(ctx, "mask4", None),
            )[0]
            return y4.view(x.shape)

        return (None, *_composite_grads(dy, (x, weight, bias), needs, forward), *rest)


# --- the ops as functions: the registered op under tracing, the eager twin otherwise -----

def normalize(
    x4: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    *,
    per_sample: bool,
    center: bool,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Train-mode normalization of ``x4 [N, G, K, S]``: ``(y4, mean, var)``, as
    ``composite.normalize`` (statistics ``[G]`` or ``[N, G]`` in the compute dtype)."""
    if (not per_sample and x4.shape[2] != 1) or composite_only(x4):
        return composite.normalize(
            x4, weight, bias, per_sample=per_sample, center=center, eps=eps
        )
    args = (x4, weight, bias, per_sample, center, eps)
    if not eager(x4):
        y4, mean, var, _ = torch.ops.normlab.normalize(*args)
    elif needs_grad(x4, weight, bias):
        y4, mean, var, _ = NormalizeFunction.apply(*args)
    else:
        y4, mean, var, _ = _on(x4).forward(*args, True)
    return y4, mean, var


def normalize_with_stats(
    x4: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    *,
    eps: float,
) -> Tensor:
    """Eval-mode normalization of ``x4 [N, G, K, S]`` with statistics ``[G]``."""
    if composite_only(x4):
        return composite.normalize_with_stats(x4, mean, var, weight, bias, eps=eps)
    args = (x4, mean, var, weight, bias, eps)
    if not eager(x4):
        return torch.ops.normlab.normalize_with_stats(*args)
    if needs_grad(x4, mean, var, weight, bias):
        return WithStatsFunction.apply(*args)
    return _apply(*args)


def moments(x4: Tensor, *, per_sample: bool, center: bool) -> tuple[Tensor, Tensor]:
    """Biased ``(mean, var)`` of ``x4 [N, G, K, S]``, ``[G]`` or ``[N, G]`` (not
    differentiable: SyncBatchNorm wraps these pieces in its own autograd function)."""
    if (not per_sample and x4.shape[2] != 1) or composite_only(x4):
        return composite.moments(x4, per_sample=per_sample, center=center)
    if not eager(x4):
        return torch.ops.normlab.moments(x4, per_sample, center)
    _, mean, var, _ = _on(x4).forward(x4, None, None, per_sample, center, 0.0, False)
    return mean, var


def backward_reduce(
    dy4: Tensor, x4: Tensor, mean: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor]:
    """Per-channel ``(sum dy, sum dy * xhat)`` over ``(N, K, S)``, ``[G]``."""
    if x4.shape[2] != 1 or composite_only(x4):
        return composite.backward_reduce(dy4, x4, mean, rstd)
    if not eager(x4):
        return torch.ops.normlab.backward_reduce(dy4, x4, mean, rstd)
    return _reduce(dy4, x4, mean, rstd)


def backward_apply(
    dy4: Tensor,
    x4: Tensor,
    mean: Tensor,
    rstd: Tensor,
    weight: Tensor | None,
    sum_dy: Tensor,
    sum_dy_xhat: Tensor,
    count: int,
) -> Tensor:
    """BatchNorm ``dx = w * rstd * (dy - sum_dy / count - xhat * sum_dy_xhat / count)``."""
    args = (dy4, x4, mean, rstd, weight, sum_dy, sum_dy_xhat, count)
    if x4.shape[2] != 1 or composite_only(x4):
        return composite.backward_apply(*args)
    if not eager(x4):
        return torch.ops.normlab.backward_apply(*args)
    sums = (sum_dy, sum_dy_xhat)
    return _on(x4).channel_backward(dy4, x4, mean, rstd, weight, sums, count, True)[2]
