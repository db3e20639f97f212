"""Diagnostics for normalization layers: what they see, and where training and eval disagree.

- ``ActivationRecorder``: forward hooks that record, per norm layer and step, the mean, std
  and 15/50/85th percentiles of the layer's input (pre) and output (post) -- the picture of
  Figure 1 in Ioffe & Szegedy (2015) -- with ``table()`` and ``plot()``.
- ``train_eval_gap``: per layer, the batch statistics of its input (as training computes
  them) against its running statistics (what eval uses), and how far each layer's eval
  output drifts from its training-mode output.
- ``find_channel_issues``: dead channels (constant input, constant output, zero gamma) and
  exploding or non-finite ones.
- ``check_batch_size``: warns when a per-process batch is too small for BatchNorm and
  suggests GroupNorm or SyncBatchNorm.
- ``diagnose``: all of the above in one ``Report``.

Every pass here runs under ``no_grad`` and restores the norms' buffers and the modules'
train/eval modes, so diagnosing does not change the model.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from normlab.tools._detect import (
    is_batchnorm,
    is_frozen_batchnorm,
    is_instancenorm,
    is_norm,
    tracks_running_stats,
)
from normlab.tools.recalibrate import _Stats, default_forward

__all__ = [
    "NormWarning",
    "Summary",
    "Record",
    "ActivationRecorder",
    "LayerGap",
    "train_eval_gap",
    "ChannelIssue",
    "find_channel_issues",
    "check_batch_size",
    "Report",
    "diagnose",
    "format_table",
]

Forward = Callable[[nn.Module, Any], Any]


class NormWarning(UserWarning):
    """A diagnosis about normalization layers (small batches, dead channels, train/eval gap)."""


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain-text table; floats with 4 significant digits."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    body = [[cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in body]) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    sep = "  ".join("-" * w for w in widths)
    out = [line, sep] + [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in body
    ]
    return "\n".join(out)


def _norm_layers(model: nn.Module, layers: Sequence[str] | None = None) -> dict[str, nn.Module]:
    found = {n or "<model>": m for n, m in model.named_modules() if is_norm(m)}
    if layers is None:
        return found
    unknown = [n for n in layers if n not in found]
    if unknown:
        raise ValueError(f"layers {unknown} are not norm layers of the model; have {list(found)}")
    return {n: found[n] for n in layers}


@contextlib.contextmanager
def _preserved(model: nn.Module) -> Iterator[None]:
    """Restores train/eval modes and every norm buffer (running stats, counters) on exit."""
    modes = {m: m.training for m in model.modules()}
    buffers = {
        (m, name): b.clone()
        for m in model.modules()
        if is_norm(m)
        for name, b in m.named_buffers(recurse=False)
    }
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in modes.items():
            m.training = training
        with torch.no_grad():
            for (m, name), b in buffers.items():
                getattr(m, name).copy_(b)


def _batches(batches: Iterable[Any], num_batches: int | None) -> Iterable[Any]:
    if num_batches is not None and (not isinstance(num_batches, int) or num_batches < 1):
        raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}")
    return batches if num_batches is None else itertools.islice(batches, num_batches)


# --------------------------------------------------------------------------- recording


@dataclass
class Summary:
    """Distribution of one tensor: mean, std and percentiles (on a subsample if large)."""

    mean: float
    std: float
    percentiles: dict[float, float]

    @staticmethod
    def of(x: Tensor, q: Sequence[float], max_samples: int, gen: torch.Generator) -> Summary:
        flat = x.detach().reshape(-1).to(torch.float64)
        if flat.numel() == 0:
            nan = float("nan")
            return Summary(nan, nan, {p: nan for p in q})
        if flat.numel() > max_samples:  # uniform subsample: quantiles within ~1/sqrt(n)
            idx = torch.randint(flat.numel(), (max_samples,), generator=gen).to(flat.device)
            sample = flat[idx]
        else:
            sample = flat
        qs = torch.quantile(sample, torch.tensor([p / 100 for p in q], dtype=torch.float64))
        std = flat.std(correction=0).item() if flat.numel() > 1 else 0.0
        return Summary(flat.mean().item(), std, dict(zip(q, qs.tolist(), strict=True)))


@dataclass
class Record:
    """A layer's input (``pre``) and output (``post``) summaries at a training step."""

    step: int
    pre: Summary
    post: Summary


class ActivationRecorder:
    """Records pre/post-normalization statistics of every norm layer, step by step.

    Use as a context manager around a training loop; each forward of ``model`` is a step
    (only every ``every``-th is recorded, and only in training mode unless
    ``training_only=False``).

        with ActivationRecorder(model) as rec:
            for x, y in loader: ...
        print(rec.table()); rec.plot(path="bn.png")

    Args:
        model: the model to watch.
        layers: qualified names of the norm layers to watch (default: all).
        percentiles: which percentiles to record (default 15, 50, 85 as in the BN paper).
        max_samples: percentiles are computed on a uniform subsample of this many elements.
        every: record every ``every``-th step.
        training_only: skip forwards in eval mode (e.g. validation inside the loop).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        layers: Sequence[str] | None = None,
        percentiles: Sequence[float] = (15.0, 50.0, 85.0),
        max_samples: int = 16384,
        every: int = 1,
        training_only: bool = True,
    ) -> None:
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        if any(not 0 <= p <= 100 for p in percentiles):
            raise ValueError(f"percentiles must be in [0, 100], got {list(percentiles)}")
        self.model = model
        self.layers = _norm_layers(model, layers)
        self.percentiles = tuple(float(p) for p in percentiles)
        self.max_samples = max_samples
        self.every = every
        self.training_only = training_only
        self.records: dict[str, list[Record]] = {n: [] for n in self.layers}
        self.step = -1
        self._gen = torch.Generator().manual_seed(0)
        self._handles: list[Any] = []

    def _on_model(self, module: nn.Module, args: Any) -> None:
        self.step += 1

    def _on_layer(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
            if self.training_only and not module.training:
                return
            if self.step % self.every or not isinstance(output, Tensor):
                return
            summarize = lambda t: Summary.of(t, self.percentiles, self.max_samples, self._gen)  # noqa: E731
            self.records[name].append(Record(self.step, summarize(args[0]), summarize(output)))

        return hook

    def attach(self) -> ActivationRecorder:
        if not self._handles:
            self._handles.append(self.model.register_forward_pre_hook(self._on_model))
            for name, m in self.layers.items():
                self._handles.append(m.register_forward_hook(self._on_layer(name)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> ActivationRecorder:
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    def table(self) -> str:
        """The last record of every layer, one row per layer and side (pre/post)."""
        headers = ["layer", "side", "step", "mean", "std"] + [f"p{p:g}" for p in self.percentiles]
        rows = []
        for name, recs in self.records.items():
            if recs:
                r = recs[-1]
                for side, s in (("pre", r.pre), ("post", r.post)):
                    rows.append([name, side, r.step, s.mean, s.std, *s.percentiles.values()])
        return format_table(headers, rows)

    def plot(self, layers: Sequence[str] | None = None, path: str | None = None) -> Any:
        """Percentile bands over steps, pre and post, one row of axes per layer.

        Returns a matplotlib ``Figure`` (drawn without pyplot, so no display is needed);
        saved to ``path`` when given.
        """
        from matplotlib.figure import Figure

        names = list(layers) if layers is not None else [n for n, r in self.records.items() if r]
        if not names:
            raise ValueError("nothing recorded yet: run forwards inside the recorder first")
        fig = Figure(figsize=(9, 2.2 * len(names)), layout="constrained")
        axes = fig.subplots(len(names), 2, squeeze=False)
        for row, name in enumerate(names):
            recs = self.records[name]
            steps = [r.step for r in recs]
            for col, side in enumerate(("pre", "post")):
                ax = axes[row][col]
                for p in self.percentiles:
                    ax.plot(steps, [getattr(r, side).percentiles[p] for r in recs], label=f"{p:g}%")
                ax.set_title(f"{name} ({side}-normalization)", fontsize=9)
                ax.set_xlabel("step")
            axes[row][0].legend(fontsize=7)
        if path is not None:
            fig.savefig(path)
        return fig


# --------------------------------------------------------------------------- train/eval gap


@dataclass
class LayerGap:
    """How a norm layer's running statistics differ from the batch statistics of its input.

    ``mean_shift``: max over channels of ``|batch_mean - running_mean| / sqrt(running_var +
    eps)`` (in units of the running std). ``log_var_ratio``: max over channels of
    ``|log((batch_var + eps) / (running_var + eps))|``. ``output_drift``: ``||y_eval -
    y_train|| / ||y_train||`` of the layer's output, accumulating the gaps upstream.
    """

    name: str
    mean_shift: float
    log_var_ratio: float
    output_drift: float
    worst_channel: int
    flagged: bool


def train_eval_gap(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int | None = None,
    *,
    forward_fn: Forward | None = None,
    mean_threshold: float = 0.5,
    log_var_threshold: float = math.log(2.0),
) -> list[LayerGap]:
    """Per norm layer with running statistics: training's batch statistics vs eval's.

    Each batch runs twice: with the norms in training mode (other modules keep their mode;
    buffers restored afterwards) and in eval mode. The batch statistics of each layer's
    input in the training pass are pooled exactly over all batches (float64) and compared
    with the layer's running statistics. A layer is ``flagged`` when its mean shift or
    variance ratio passes the thresholds; since inputs come from the training pass, a bad
    layer does not flag the layers after it (their ``output_drift`` does grow).
    """
    forward_fn = forward_fn or default_forward
    norms = {n: m for n, m in model.named_modules() if tracks_running_stats(m)}
    stats = {n: _Stats(m.running_mean.numel(), is_instancenorm(m)) for n, m in norms.items()}
    diff2 = dict.fromkeys(norms, 0.0)
    ref2 = dict.fromkeys(norms, 0.0)
    outputs: dict[str, Tensor] = {}
    phase = ["train"]

    def hook(name: str) -> Callable[..., None]:
        def fn(module: nn.Module, args: tuple[Any, ...], out: Tensor) -> None:
            if phase[0] == "train":
                stats[name].add(args[0])
                outputs[name] = out.detach().double()
            elif name in outputs:
                ref = outputs.pop(name)
                diff2[name] += float(((out.detach().double() - ref) ** 2).sum())
                ref2[name] += float((ref**2).sum())

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in norms.items()]
    try:
        with _preserved(model):
            for batch in _batches(batches, num_batches):
                phase[0] = "train"
                for m in norms.values():
                    m.train()
                forward_fn(model, batch)
                phase[0] = "eval"
                for m in norms.values():
                    m.eval()
                forward_fn(model, batch)
                outputs.clear()
    finally:
        for h in handles:
            h.remove()

    gaps = []
    for name, m in norms.items():
        s = stats[name]
        if not bool((s.n > 0).all()):
            continue
        mean_b, var_b = s.running()
        eps = float(m.eps)
        r_mean = m.running_mean.detach().double().cpu()
        r_var = m.running_var.detach().double().cpu()
        shift = (mean_b - r_mean).abs() / torch.sqrt(r_var + eps)
        ratio = torch.log((var_b + eps) / (r_var + eps)).abs()
        score = torch.maximum(shift / mean_threshold, ratio / log_var_threshold)
        drift = math.sqrt(diff2[name] / ref2[name]) if ref2[name] > 0 else 0.0
        gaps.append(
            LayerGap(
                name=name,
                mean_shift=float(shift.max()),
                log_var_ratio=float(ratio.max()),
                output_drift=drift,
                worst_channel=int(score.argmax()),
                flagged=bool(score.max() > 1.0),
            )
        )
    return gaps


# --------------------------------------------------------------------------- channels


@dataclass
class ChannelIssue:
    """One channel of one norm layer that looks wrong.

    ``kind``: ``"dead-input"`` (the input channel is constant), ``"dead-output"`` (the output
    channel is constant), ``"zero-gamma"`` (its scale is ~0), ``"exploding"`` (input std far
    above the layer's median channel), ``"non-finite"`` (NaN/inf seen). ``value`` is the
    measured quantity (std relative to the median channel, |gamma|, or NaN count).
    """

    layer: str
    channel: int
    kind: str
    value: float


def _channel_view(module: nn.Module, x: Tensor) -> Tensor:
    """``x`` with the norm's channels at dim 1 (LayerNorm/RMSNorm: features of the last dim)."""
    if hasattr(module, "normalized_shape"):
        return x.reshape(-1, x.shape[-1])
    return x if x.dim() >= 2 else x.unsqueeze(0)


def find_channel_issues(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int | None = None,
    *,
    forward_fn: Forward | None = None,
    dead_tol: float = 1e-4,
    explode_factor: float = 1e3,
) -> list[ChannelIssue]:
    """Dead, exploding and non-finite channels of every norm layer over some batches.

    Runs the model in its current mode (buffers restored). A channel is dead when its
    input (or output) std over all batches is below ``dead_tol`` times the median channel's
    std, and exploding when its input std is above ``explode_factor`` times it; ``|gamma| <
    dead_tol`` is reported as zero-gamma.
    """
    forward_fn = forward_fn or default_forward
    norms = _norm_layers(model)
    pre: dict[str, _Stats] = {}
    post: dict[str, _Stats] = {}
    nonfinite: dict[str, Tensor] = {}

    def hook(name: str) -> Callable[..., None]:
        def fn(module: nn.Module, args: tuple[Any, ...], out: Tensor) -> None:
            x, y = _channel_view(module, args[0]), _channel_view(module, out)
            if x.dim() < 2 or x.shape[0] * x[0, 0].numel() < 2:
                return
            c = x.shape[1]
            bad = (~torch.isfinite(x)).transpose(0, 1).reshape(c, -1).sum(1).cpu()
            nonfinite[name] = nonfinite.get(name, torch.zeros(c, dtype=torch.long)) + bad
            pre.setdefault(name, _Stats(c, False)).add(torch.nan_to_num(x))
            post.setdefault(name, _Stats(c, False)).add(torch.nan_to_num(y))

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in norms.items()]
    try:
        with _preserved(model):
            for batch in _batches(batches, num_batches):
                forward_fn(model, batch)
    finally:
        for h in handles:
            h.remove()

    issues: list[ChannelIssue] = []
    for name, m in norms.items():
        if name in pre:
            std_in = pre[name].running()[1].sqrt()
            std_out = post[name].running()[1].sqrt()
            for kind, std in (("dead-input", std_in), ("dead-output", std_out)):
                ref = float(std.median())
                rel = std / ref if ref > 0 else torch.zeros_like(std)
                issues += [
                    ChannelIssue(name, int(c), kind, float(rel[c]))
                    for c in torch.nonzero(rel < dead_tol).flatten().tolist()
                ]
                if kind == "dead-input":
                    issues += [
                        ChannelIssue(name, int(c), "exploding", float(rel[c]))
                        for c in torch.nonzero(rel > explode_factor).flatten().tolist()
                    ]
            issues += [
                ChannelIssue(name, int(c), "non-finite", float(nonfinite[name][c]))
                for c in torch.nonzero(nonfinite[name]).flatten().tolist()
            ]
        gamma = getattr(m, "weight", None)
        if isinstance(gamma, Tensor) and gamma.dim() == 1:
            small = torch.nonzero(gamma.detach().abs() < dead_tol).flatten().tolist()
            issues += [
                ChannelIssue(name, int(c), "zero-gamma", float(gamma[c].detach().abs()))
                for c in small
            ]
    return issues


# --------------------------------------------------------------------------- batch size


def check_batch_size(
    model: nn.Module,
    batch_size: int,
    *,
    world_size: int = 1,
    min_per_process: int = 16,
    warn: bool = True,
) -> list[str]:
    """Warn when BatchNorm layers would compute statistics from too few samples per process.

    BatchNorm's error grows quickly below ~16 samples per process (Wu & He, 2018, Group
    Normalization, Fig. 1). Frozen BatchNorms are ignored. Returns the messages (each also
    issued as a ``NormWarning`` when ``warn``).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int (per process), got {batch_size!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    bns = [n for n, m in model.named_modules() if is_batchnorm(m) and not is_frozen_batchnorm(m)]
    if not bns or batch_size >= min_per_process:
        return []
    synced = [n for n, m in model.named_modules() if "Sync" in type(m).__name__ and n in bns]
    plain = [n for n in bns if n not in synced]
    messages = []
    if plain:
        hint = (
            f"SyncBatchNorm over the {world_size} processes (global batch "
            f"{batch_size * world_size}; normlab.tools.convert(model, to='sync'))"
            if world_size > 1
            else "SyncBatchNorm across processes if you train on several"
        )
        messages.append(
            f"{len(plain)} BatchNorm layer(s) (e.g. {plain[0]!r}) see {batch_size} samples per "
            f"process (< {min_per_process}): batch statistics this small are noisy and make "
            "training and eval disagree. Consider GroupNorm (normlab.tools.convert(model, "
            f"to='groupnorm')) or {hint}."
        )
    if synced and batch_size * world_size < min_per_process:
        messages.append(
            f"SyncBatchNorm layers see a global batch of {batch_size * world_size} "
            f"(< {min_per_process}); consider GroupNorm."
        )
    if warn:
        for msg in messages:
            warnings.warn(msg, NormWarning, stacklevel=2)
    return messages


# --------------------------------------------------------------------------- report


@dataclass
class Report:
    """Everything ``diagnose`` found; ``table()`` for the terminal, ``plot()`` for a figure."""

    gaps: list[LayerGap] = field(default_factory=list)
    channel_issues: list[ChannelIssue] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)

    def table(self) -> str:
        parts = []
        if self.gaps:
            parts.append("train/eval gap per layer (flagged: running stats off)")
            parts.append(
                format_table(
                    ["layer", "mean_shift", "log_var_ratio", "output_drift", "channel", "flag"],
                    [
                        [
                            g.name,
                            g.mean_shift,
                            g.log_var_ratio,
                            g.output_drift,
                            g.worst_channel,
                            "GAP" if g.flagged else "",
                        ]
                        for g in self.gaps
                    ],
                )
            )
        if self.channel_issues:
            parts.append("channels")
            parts.append(
                format_table(
                    ["layer", "channel", "issue", "value"],
                    [[i.layer, i.channel, i.kind, i.value] for i in self.channel_issues],
                )
            )
        parts += [f"warning: {m}" for m in self.messages]
        return "\n\n".join(parts) if parts else "no issues found"

    def plot(self, path: str | None = None) -> Any:
        """Bar charts of each layer's mean shift and output drift (a matplotlib Figure)."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(8, 4), layout="constrained")
        ax1, ax2 = fig.subplots(1, 2)
        names = [g.name for g in self.gaps]
        ax1.bar(
            names,
            [g.mean_shift for g in self.gaps],
            color=["tab:red" if g.flagged else "tab:blue" for g in self.gaps],
        )
        ax1.set_title("mean shift (running std units)")
        ax2.bar(names, [g.output_drift for g in self.gaps])
        ax2.set_title("output drift eval vs train")
        for ax in (ax1, ax2):
            ax.tick_params(axis="x", rotation=90, labelsize=7)
        if path is not None:
            fig.savefig(path)
        return fig


def diagnose(
    model: nn.Module,
    batches: Sequence[Any],
    num_batches: int | None = None,
    *,
    batch_size: int | None = None,
    world_size: int = 1,
    forward_fn: Forward | None = None,
    warn: bool = True,
) -> Report:
    """Run ``train_eval_gap``, ``find_channel_issues`` and ``check_batch_size``.

    ``batches`` is iterated twice (a list, or a re-iterable DataLoader). ``batch_size``
    (per process) defaults to the first dimension of the first batch's input.
    Flagged layers and channel issues are also issued as ``NormWarning`` when ``warn``.
    """
    batches = list(_batches(batches, num_batches))
    if not batches:
        raise ValueError("batches yielded no batch")
    if batch_size is None:
        first = batches[0]
        x = first[0] if isinstance(first, (tuple, list)) else first
        batch_size = int(x.shape[0]) if isinstance(x, Tensor) and x.dim() > 0 else 1
    report = Report(
        gaps=train_eval_gap(model, batches, forward_fn=forward_fn),
        channel_issues=find_channel_issues(model, batches, forward_fn=forward_fn),
        messages=check_batch_size(model, batch_size, world_size=world_size, warn=False),
    )
    flagged = [g.name for g in report.gaps if g.flagged]
    if flagged:
        report.messages.append(
            f"running statistics of {flagged} disagree with the batch statistics their inputs "
            "produce: eval will differ from training (normlab.tools.recalibrate fixes stale "
            "statistics)"
        )
    kinds = sorted({i.kind for i in report.channel_issues})
    if kinds:
        report.messages.append(
            f"{len(report.channel_issues)} channel issue(s) ({', '.join(kinds)}): see the table"
        )
    if warn:
        for msg in report.messages:
            warnings.warn(msg, NormWarning, stacklevel=2)
    return report
