"""BatchNorm followed by an activation, fused into one CPU pass forward and one backward.

The backend contract of ``normlab.ops`` (``normalize`` / ``normalize_with_stats``) knows no
activation; rather than widen it, this module adds one function beside it,
:func:`batch_norm_act`, that takes the activation as ``(act, slope)``:

- on the composite path (backend ``"torch"``, CUDA, half precision, non-contiguous input,
  eval mode) it is ``activation(normlab.functional.batch_norm(...))``: the norm runs on the
  selected backend and autograd differentiates the pair;
- on the fused path (backend ``"auto"``/``"cpu"``, contiguous float32/float64 CPU input,
  training with batch statistics) two numba kernels do the work: the forward computes each
  channel's statistics and writes ``act(xhat * w + b)`` while the channel is still in cache;
  the backward recomputes the pre-activation from the saved input (nothing but ``x`` and two
  ``[C]`` vectors is saved), applies ``act'`` and the BatchNorm backward in two passes per
  channel. Torch eager runs BatchNorm, then the activation, then both backwards: twice the
  passes over memory and twice the saved tensors.

The fused path is differentiable once (no double backward); use backend ``"torch"`` for
``gradgradcheck``-style work.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as TF

from normlab import _checks, ops
from normlab import functional as F

try:  # numba is a dependency, but keep the composite path importable without it
    import numba
    from numba import njit, prange
except ImportError:  # pragma: no cover - exercised only without numba
    numba = None

__all__ = ["ACTIVATIONS", "check_activation", "activation", "batch_norm_act", "fused_supported"]

ACTIVATIONS = ("relu", "leaky_relu", "silu", "gelu", "identity")
_CODES = {name: code for code, name in enumerate(ACTIVATIONS)}
# Kernel flags: reassociation lets LLVM vectorize the reductions; no "nnan"/"ninf", so
# NaN/Inf inputs propagate exactly as in torch.
_FASTMATH = {"reassoc", "contract", "arcp"}
# Below this many elements the fixed cost of the fused path (kernel launch, a custom
# autograd node) exceeds what it saves in memory traffic: use the composite path.
FUSED_MIN_NUMEL = 1 << 16


def check_activation(act: str, slope: float = 0.01) -> tuple[str, float]:
    """Validate an activation name and its ``slope`` (leaky_relu's negative slope)."""
    if act not in _CODES:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    if isinstance(slope, bool) or not isinstance(slope, (int, float)) or not math.isfinite(slope):
        raise TypeError(f"slope must be a finite float, got {slope!r}")
    return act, float(slope)


def activation(x: Tensor, act: str, slope: float = 0.01) -> Tensor:
    """``act(x)`` with torch's definitions (gelu is the exact, erf-based one).

    ``act`` is one of :data:`ACTIVATIONS` or ``"elu"`` (for InPlaceABN; there ``slope`` is
    elu's ``alpha``), ``slope`` is leaky_relu's negative slope."""
    if act == "elu":
        return TF.elu(x, slope)
    if act == "relu":
        return torch.relu(x)
    if act == "leaky_relu":
        return TF.leaky_relu(x, slope)
    if act == "silu":
        return TF.silu(x)
    if act == "gelu":
        return TF.gelu(x)
    if act == "identity":
        return x
    raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")


def fused_supported(x: Tensor, backend: str | None = None) -> bool:
    """Whether :func:`batch_norm_act` takes the fused kernels for ``x`` (in training)."""
    name = backend if backend is not None else ops.requested()
    return (
        numba is not None
        and name in ("auto", "cpu")
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and x.is_contiguous()
        and x.dim() >= 2
        and x.numel() >= max(FUSED_MIN_NUMEL, 1)
    )


def batch_norm_act(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    act: str = "relu",
    slope: float = 0.01,
    backend: str | None = None,
) -> Tensor:
    """``act(batch_norm(input [N, C, *S], ...))``, same arguments as
    :func:`normlab.functional.batch_norm` plus the activation ``act`` (and leaky_relu's
    ``slope``). Running statistics are updated in place in training, as there."""
    act, slope = check_activation(act, slope)
    if not (training and fused_supported(input, backend)):
        y = F.batch_norm(
            input, running_mean, running_var, weight, bias, training, momentum, eps,
            backend=backend,
        )
        return activation(y, act, slope)
    _check_args(input, running_mean, running_var, weight, bias, momentum, eps)
    y, mean, var = _BatchNormActFunction.apply(input, weight, bias, eps, _CODES[act], slope)
    if running_mean is not None:
        count = input.numel() // input.shape[1]
        F.update_running_stats(running_mean, running_var, mean, var, count, momentum)
    return y


def _check_args(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float,
    eps: float,
) -> None:
    """The checks of ``functional.batch_norm`` in training, with its messages."""
    _checks.check_eps(eps)
    _checks.check_momentum(momentum, allow_none=False)
    channels = input.shape[1]
    for name, value in (
        ("weight", weight), ("bias", bias), ("running_mean", running_mean),
        ("running_var", running_var),
    ):
        _checks.check_vector(value, name, channels, "channels of input (dim 1)")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together or both be None")
    _checks.check_values_per_channel(input)


def _param_or(value: Tensor | None, channels: int, fill: float, dtype: torch.dtype) -> Tensor:
    if value is None:
        return torch.full((channels,), fill, dtype=dtype)
    return value.detach().to(dtype).contiguous()


class _BatchNormActFunction(torch.autograd.Function):
    """Fused train-mode BatchNorm + activation on a contiguous ``[N, C, *S]`` CPU tensor."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        code: int,
        slope: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        n, c = x.shape[0], x.shape[1]
        x3 = x.detach().reshape(n, c, -1)
        w = _param_or(weight, c, 1.0, x.dtype)
        b = _param_or(bias, c, 0.0, x.dtype)
        y = torch.empty_like(x3)
        mean = torch.empty(c, dtype=torch.float64)
        var = torch.empty(c, dtype=torch.float64)
        _fwd_kernel(x3.numpy(), w.numpy(), b.numpy(), eps, code, slope,
                    y.numpy(), mean.numpy(), var.numpy())
        work = x.dtype  # statistics are returned in the compute dtype (float32/float64)
        mean, var = mean.to(work), var.to(work)
        ctx.save_for_backward(x, weight, bias, mean, var)
        ctx.eps, ctx.code, ctx.slope = eps, code, slope
        ctx.mark_non_differentiable(mean, var)
        return y.reshape(x.shape), mean, var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, dy: Tensor, _dmean: Tensor, _dvar: Tensor
    ) -> tuple[Tensor | None, ...]:
        x, weight, bias, mean, var = ctx.saved_tensors
        n, c = x.shape[0], x.shape[1]
        x3 = x.detach().reshape(n, c, -1)
        dy3 = dy.to(x.dtype).contiguous().reshape(n, c, -1)
        w = _param_or(weight, c, 1.0, x.dtype)
        b = _param_or(bias, c, 0.0, x.dtype)
        dx = torch.empty_like(x3)
        dw = torch.empty(c, dtype=torch.float64)
        db = torch.empty(c, dtype=torch.float64)
        rstd = torch.rsqrt(var.double() + ctx.eps)
        _bwd_kernel(x3.numpy(), dy3.numpy(), mean.double().numpy(), rstd.numpy(), w.numpy(),
                    b.numpy(), ctx.code, ctx.slope, dx.numpy(), dw.numpy(), db.numpy())
        dweight = None if weight is None else dw.to(weight.dtype)
        dbias = None if bias is None else db.to(bias.dtype)
        return dx.reshape(x.shape), dweight, dbias, None, None, None


# ---------------------------------------------------------------------------------------------
# numba kernels on [N, C, S]; the activation code is loop-invariant, so the branches in
# _act/_act_grad are hoisted out of the inner loops by the compiler.
# ---------------------------------------------------------------------------------------------

if numba is not None:
    _INV_SQRT2 = 1.0 / math.sqrt(2.0)
    _INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)

    # The activation code is made a compile-time literal (numba.literally), so each
    # activation gets its own kernel with the other branches pruned and the inner loops
    # vectorized; all arithmetic inside the loops stays in the input's dtype.

    @njit(inline="always", fastmath=_FASTMATH, cache=True)
    def _act(v, code, slope, zero):  # type: ignore[no-untyped-def]
        if code == 0:  # relu
            return v if v > zero else zero
        if code == 1:  # leaky_relu
            return v if v > zero else v * slope
        if code == 2:  # silu
            return v / (1 + math.exp(-v))
        if code == 3:  # gelu (exact)
            return 0.5 * v * (1 + math.erf(v * _INV_SQRT2))
        return v

    @njit(inline="always", fastmath=_FASTMATH, cache=True)
    def _act_grad(v, code, slope, zero, one):  # type: ignore[no-untyped-def]
        """d act / d v at the pre-activation ``v``."""
        if code == 0:
            return one if v > zero else zero
        if code == 1:
            return one if v > zero else slope
        if code == 2:
            s = 1 / (1 + math.exp(-v))
            return s * (1 + v * (1 - s))
        if code == 3:
            return 0.5 * (1 + math.erf(v * _INV_SQRT2)) + v * _INV_SQRT_2PI * math.exp(-0.5 * v * v)
        return one

    @njit(parallel=True, fastmath=_FASTMATH, cache=True)
    def _fwd_kernel(x, w, b, eps, code, slope, y, mean_out, var_out):  # type: ignore[no-untyped-def]
        n, c, s = x.shape
        count = n * s
        zero = x.dtype.type(0)
        sl = x.dtype.type(slope)
        for ch in prange(c):
            # Shifted sums in float64: exact enough for float32 data, and the shift (the
            # channel's first value) removes a large common mean before squaring.
            shift = np.float64(x[0, ch, 0])
            s1 = 0.0
            s2 = 0.0
            for i in range(n):
                for j in range(s):
                    d = np.float64(x[i, ch, j]) - shift
                    s1 += d
                    s2 += d * d
            md = s1 / count
            var = max(s2 / count - md * md, 0.0)
            mean = shift + md
            mean_out[ch] = mean
            var_out[ch] = var
            rstd = 1.0 / math.sqrt(var + eps)
            scale = x.dtype.type(w[ch] * rstd)
            m = x.dtype.type(mean)
            off = x.dtype.type(b[ch])
            for i in range(n):
                for j in range(s):
                    y[i, ch, j] = _act((x[i, ch, j] - m) * scale + off, code, sl, zero)

    @njit(parallel=True, fastmath=_FASTMATH, cache=True)
    def _bwd_kernel(x, dy, mean, rstd, w, b, code, slope, dx, dw, db):  # type: ignore[no-untyped-def]
        n, c, s = x.shape
        count = n * s
        zero = x.dtype.type(0)
        one = x.dtype.type(1)
        sl = x.dtype.type(slope)
        for ch in prange(c):
            m = x.dtype.type(mean[ch])
            r = x.dtype.type(rstd[ch])
            wc = x.dtype.type(w[ch])
            bc = x.dtype.type(b[ch])
            sg = 0.0
            sgx = 0.0
            for i in range(n):
                for j in range(s):
                    xhat = (x[i, ch, j] - m) * r
                    g = dy[i, ch, j] * _act_grad(xhat * wc + bc, code, sl, zero, one)
                    sg += g
                    sgx += g * xhat
            db[ch] = sg
            dw[ch] = sgx
            k1 = x.dtype.type(sg / count)
            k2 = x.dtype.type(sgx / count)
            scale = x.dtype.type(w[ch] * rstd[ch])
            for i in range(n):
                for j in range(s):
                    xhat = (x[i, ch, j] - m) * r
                    g = dy[i, ch, j] * _act_grad(xhat * wc + bc, code, sl, zero, one)
                    dx[i, ch, j] = scale * (g - k1 - xhat * k2)
