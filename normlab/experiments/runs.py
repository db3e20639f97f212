"""Training runs: one seeded training loop, and a JSON store that makes experiments resumable.

A run is described by a JSON-able ``config`` (model, data, :class:`TrainSpec`) and
produces a JSON-able result (accuracy curve, final accuracy, steps to a target, ...).
:class:`ResultStore` keeps ``{key: {"config": ..., "result": ...}}`` in one file that is
rewritten atomically after every run, so an interrupted experiment resumes where it
stopped, and a run whose config changed is recomputed rather than reused.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from normlab.experiments.data import Dataset

__all__ = ["ResultStore", "TrainSpec", "accuracy", "atomic_write_json", "fit"]


@dataclass(frozen=True)
class TrainSpec:
    """How to train: steps of ``batch_size`` examples, optimizer, and when to evaluate."""

    steps: int
    batch_size: int = 64
    lr: float = 0.1
    optimizer: str = "sgd"  # "sgd" or "adam"
    momentum: float = 0.0
    eval_every: int = 25
    seed: int = 0
    target: float | None = None  # test accuracy whose first crossing is reported

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.eval_every < 1:
            raise ValueError(f"steps, batch_size and eval_every must be >= 1, got {self}")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")

    def to_dict(self) -> dict[str, Any]:
        """The spec as a JSON-able dict."""
        return asdict(self)


@torch.no_grad()
@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch: int = 1000) -> float:
    """Fraction of ``x`` ``[N, ...]`` classified as ``y`` ``[N]``, in eval mode."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(y), batch):
        correct += int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
    model.train(was_training)
    return correct / max(len(y), 1)


def _probe_percentiles(
    model: nn.Module, module: nn.Module, x: Tensor, unit: int, qs: tuple[float, ...]
) -> list[float]:
    """Percentiles ``qs`` over ``x`` of unit ``unit`` of the input to ``module`` (eval mode)."""
    seen: list[Tensor] = []
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0][:, unit]))
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(x)
        model.train(was_training)
    finally:
        handle.remove()
    values = torch.cat(seen).double()
    return [float(v) for v in torch.quantile(values, torch.tensor(qs, dtype=torch.float64))]


def kernels_will_compile() -> bool:
    """True when the norm layers will run normlab's numba kernels and this version of the
    kernels has no disk cache yet, so the first calls compile them (seconds each)."""
    from normlab import ops

    if ops.requested() not in ("auto", "cpu") or "cpu" not in ops.available():
        return False
    from normlab.ops.cpu import runtime

    # The folder announce_compile() looks in: one per version of the kernel sources.
    where = Path(runtime.cache_dir(), getattr(runtime, "_KERNELS_DIGEST", ""))
    return not any(where.rglob("*.nbi"))


def warm_up(build: Callable[[], nn.Module], data: Dataset, *, flat: bool,
            batch_size: int) -> float:
    """Run a throwaway model once in training mode (forward, backward on one batch) and
    once in eval mode over the test set, so kernel compilation and first-call set-up
    happen here, not inside a timed run; returns the seconds taken. Leaves torch's random
    state as it was."""
    start = time.perf_counter()
    state = torch.random.get_rng_state()
    try:
        model = build()
        x_train, x_test = data.flat() if flat else (data.x_train, data.x_test)
        model.train()
        logits = model(x_train[:batch_size])
        nn.functional.cross_entropy(logits, data.y_train[:batch_size]).backward()
        accuracy(model, x_test, data.y_test)
    finally:
        torch.random.set_rng_state(state)
    return time.perf_counter() - start


def fit(
    build: Callable[[], nn.Module],
    data: Dataset,
    spec: TrainSpec,
    *,
    flat: bool,
    probe: str | None = None,
    probe_unit: int = 0,
    progress: Any = None,
) -> dict[str, Any]:
    """Seed, build a model, train it with cross-entropy, and record its test accuracy.

    ``flat`` feeds images as ``[N, C*H*W]`` (MLPs) rather than ``[N, C, H, W]``. ``probe``
    names a submodule whose input unit ``probe_unit`` is summarized (15/50/85th
    percentiles over the test set) at every evaluation. ``progress`` is an optional tqdm
    bar advanced once per step. Training stops early if the loss becomes non-finite.

    Returns a JSON-able dict: ``steps``, ``test_acc``, ``train_loss`` (mean since the
    previous evaluation) per evaluation; ``final_test_acc``, ``best_test_acc``,
    ``steps_to_target`` (first evaluated step at or above ``spec.target``, or None),
    ``diverged``, ``seconds``, and ``probe`` percentiles when asked.
    """
    torch.manual_seed(spec.seed)
    model = build()
    x_train, x_test = data.flat() if flat else (data.x_train, data.x_test)
    y_train, y_test = data.y_train, data.y_test
    if len(y_train) < spec.batch_size:
        raise ValueError(f"batch_size {spec.batch_size} exceeds the {len(y_train)} examples")
    if spec.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            model.parameters(), lr=spec.lr, momentum=spec.momentum
        )
    else:
        opt = torch.optim.Adam(model.parameters(), lr=spec.lr)
    probe_module = dict(model.named_modules())[probe] if probe else None
    qs = (0.15, 0.5, 0.85)
    gen = torch.Generator().manual_seed(spec.seed)
    per_epoch = len(y_train) // spec.batch_size  # drop the ragged last batch: BN needs N > 1
    history: dict[str, list[Any]] = {"steps": [], "test_acc": [], "train_loss": []}
    percentiles: list[list[float]] = []
    steps_to_target = None
    diverged = False
    losses: list[float] = []

    def evaluate(step: int) -> None:
        nonlocal steps_to_target
        acc = accuracy(model, x_test, y_test)
        history["steps"].append(step)
        history["test_acc"].append(acc)
        history["train_loss"].append(sum(losses) / len(losses) if losses else None)
        losses.clear()
        if probe_module is not None:
            percentiles.append(_probe_percentiles(model, probe_module, x_test, probe_unit, qs))
        if spec.target is not None and steps_to_target is None and acc >= spec.target:
            steps_to_target = step

    start = time.perf_counter()
    model.train()
    evaluate(0)
    order = torch.randperm(len(y_train), generator=gen)
    for step in range(1, spec.steps + 1):
        k = (step - 1) % per_epoch
        if k == 0 and step > 1:
            order = torch.randperm(len(y_train), generator=gen)
        idx = order[k * spec.batch_size : (k + 1) * spec.batch_size]
        loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        value = loss.item()
        if not math.isfinite(value):
            diverged = True
            losses.append(value)
            evaluate(step)
            break
        losses.append(value)
        if step % spec.eval_every == 0 or step == spec.steps:
            evaluate(step)
        if progress is not None:
            progress.update(1)
    result: dict[str, Any] = {
        **history,
        "final_test_acc": history["test_acc"][-1],
        "best_test_acc": max(history["test_acc"]),
        "steps_to_target": steps_to_target,
        "diverged": diverged,
        "seconds": round(time.perf_counter() - start, 3),
    }
    if probe_module is not None:
        result["probe"] = {
            "module": probe,
            "unit": probe_unit,
            **{f"p{round(q * 100)}": [p[i] for p in percentiles] for i, q in enumerate(qs)},
        }
    # NaN is not JSON: a diverged loss is recorded as None.
    result["train_loss"] = [
        v if v is None or math.isfinite(v) else None for v in history["train_loss"]
    ]
    return result


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` via a temporary file and ``os.replace``.

    A reader (or a crash) sees either the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ResultStore:
    """Results of one experiment's runs, persisted to a JSON file after every run.

    The file holds ``{"experiment": name, "runs": {key: {"config": ..., "result": ...}}}``.
    :meth:`get` returns a stored result only if its config equals the one asked for.
    """

    def __init__(self, path: str | Path, experiment: str) -> None:
        self.path = Path(path)
        self.experiment = experiment
        self.runs: dict[str, dict[str, Any]] = {}
        self.meta: dict[str, Any] = {}
        self.reused = 0
        if self.path.exists():
            try:
                stored = json.loads(self.path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"{self.path}: not valid JSON ({exc}); delete it to start over"
                ) from exc
            if not isinstance(stored, dict) or not isinstance(stored.get("runs", {}), dict):
                raise ValueError(
                    f"{self.path}: not a normlab results file (expected an object with "
                    f'"experiment" and "runs"); delete it or choose another --out'
                )
            if stored.get("experiment") == experiment:
                self.runs = dict(stored.get("runs", {}))

    def get(self, key: str, config: dict[str, Any]) -> dict[str, Any] | None:
        """The stored result of run ``key`` if it was made with exactly ``config``."""
        entry = self.runs.get(key)
        # Round-trip through JSON so tuples and lists compare equal.
        if entry is not None and entry["config"] == json.loads(json.dumps(config)):
            self.reused += 1
            return entry["result"]
        return None

    def put(self, key: str, config: dict[str, Any], result: dict[str, Any]) -> None:
        """Record run ``key`` and rewrite the file atomically."""
        self.runs[key] = {"config": config, "result": result}
        self.save()

    def save(self) -> None:
        """Rewrite the file atomically, with ``self.meta`` as extra top-level fields."""
        payload = {"experiment": self.experiment, **self.meta, "runs": self.runs}
        atomic_write_json(self.path, payload)
