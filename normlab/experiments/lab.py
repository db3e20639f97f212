"""Running an experiment: budgets, the run cache, progress, and the report at the end.

An experiment function receives a :class:`Context`, asks it for runs with
:meth:`Context.run` (each stored in ``results.json`` as soon as it finishes, and reused
when the same run is asked for again), draws its plots into ``ctx.out_dir`` and returns
report sections; :func:`run_experiment` writes them to ``report.html``.
"""

from __future__ import annotations

import contextlib
import io
import json
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from normlab.experiments.data import Dataset, load_dataset
from normlab.experiments.models import build
from normlab.experiments.report import Section, Table, write_report
from normlab.experiments.runs import (
    ResultStore,
    TrainSpec,
    fit,
    kernels_will_compile,
    warm_up,
)
from normlab.experiments.verdict import Verdict

__all__ = ["Context", "ExperimentResult", "command_line", "fmt_acc", "fmt_acc_range",
           "fmt_steps", "fmt_steps_range", "mean", "run_experiment"]

# Quick mode (for tests and smoke runs): this many steps per run and at most this much data.
QUICK_STEPS = 24
QUICK_TRAIN, QUICK_TEST = 512, 256
COMPILE_NOTICE = ("first run on this machine: compiling normlab's CPU kernels before "
                  "training (about 5-15 s per norm, once; cached afterwards)")


def fmt_acc(value: float | None) -> str:
    """An accuracy as a percentage with one decimal (``-`` when missing)."""
    return "-" if value is None else f"{100 * value:.1f}%"


def fmt_steps(value: int | None, limit: int) -> str:
    """Steps to reach a target, or ``> limit`` when it was not reached."""
    return f"> {limit}" if value is None else str(value)


def mean(values: Sequence[float]) -> float:
    """The arithmetic mean (of per-seed values)."""
    return sum(values) / len(values)


def fmt_acc_range(values: Sequence[float]) -> str:
    """Per-seed accuracies as ``mean (min-max)`` in %, or one value for one seed."""
    text = fmt_acc(mean(values))
    low, high = f"{100 * min(values):.1f}", f"{100 * max(values):.1f}"
    return text if low == high else f"{text} ({low}-{high})"


def fmt_steps_range(values: Sequence[int | None], limit: int) -> str:
    """Per-seed steps to a target as ``mean (min-max)``; every seed listed when one of
    them never reached it (a mean of "> limit" would be made up)."""
    if len(values) == 1 or any(v is None for v in values):
        return ", ".join(fmt_steps(v, limit) for v in values)
    reached = [int(v) for v in values if v is not None]
    if min(reached) == max(reached):
        return str(reached[0])
    return f"{mean(reached):.0f} ({min(reached)}-{max(reached)})"


@dataclass
class Context:
    """What an experiment needs: data, where to write, the budget, and the run cache."""

    data: Dataset
    out_dir: Path
    store: ResultStore
    quick: bool = False
    budget: float = 1.0
    seed: int = 0
    progress: bool = True
    echo: Callable[[str], None] = field(default=lambda s: print(s, file=sys.stderr))
    resume: bool = True
    warmed: set[str] = field(default_factory=set)  # models already run once untimed

    def spec(self, steps: int, eval_every: int = 25, **options: Any) -> TrainSpec:
        """A :class:`TrainSpec` with ``steps`` scaled by the budget (or cut in quick mode)."""
        n = QUICK_STEPS if self.quick else max(10, round(steps * self.budget))
        every = max(1, n // 6) if self.quick else min(eval_every, n)
        return TrainSpec(steps=n, eval_every=every, seed=self.seed, **options)

    def seeds(self) -> list[int]:
        """The seeds every run is repeated over: three at full budget (so a verdict can
        weigh an effect against the seed-to-seed spread), only ``seed`` in quick mode."""
        return [self.seed] if self.quick else [self.seed + i for i in range(3)]

    def runs(
        self, key: str, model: dict[str, Any], spec: TrainSpec, *, probe: str | None = None
    ) -> list[dict[str, Any]]:
        """:meth:`run` once per seed of :meth:`seeds`, as ``{key}-seed{s}``."""
        return [self.run(f"{key}-seed{s}", model, replace(spec, seed=s), probe=probe)
                for s in self.seeds()]

    def pick(self, full: list[Any], quick: list[Any]) -> list[Any]:
        """The sweep values to run: ``quick`` in quick mode, else ``full``."""
        return quick if self.quick else full

    def run(
        self, key: str, model: dict[str, Any], spec: TrainSpec, *, probe: str | None = None
    ) -> dict[str, Any]:
        """Train ``model`` (a :func:`normlab.experiments.models.build` description) with
        ``spec``, or return the stored result of the identical run; store it atomically."""
        config = {
            "data": self.data.describe(),
            "model": model,
            "train": spec.to_dict(),
            "probe": probe,
        }
        cached = self.store.get(key, config) if self.resume else None
        if cached is not None:
            self.echo(f"  {key}: reused from {self.store.path.name}")
            return cached
        self._warm_up(model, spec)
        from tqdm.auto import tqdm

        with tqdm(total=spec.steps, desc=key, leave=False, disable=not self.progress,
                  file=sys.stderr, dynamic_ncols=True) as bar:
            result = fit(
                lambda: build(model, self.data.image_shape, self.data.num_classes),
                self.data,
                spec,
                flat=model["kind"] == "mlp",
                probe=probe,
                progress=bar,
            )
        self.store.put(key, config, result)
        status = " (diverged)" if result["diverged"] else ""
        self.echo(
            f"  {key}: test accuracy {fmt_acc(result['final_test_acc'])}{status} "
            f"in {result['seconds']:.1f} s"
        )
        return result

    def _warm_up(self, model: dict[str, Any], spec: TrainSpec) -> None:
        """Before a model's first timed run: one throwaway step and evaluation, so a
        first run's kernel compilation is not counted as training time (and the progress
        bar shows no absurd ETA); says once, plainly, when kernels will compile."""
        key = json.dumps(model, sort_keys=True)
        if key in self.warmed:
            return
        compiling = not self.warmed and kernels_will_compile()
        if compiling:
            self.echo(COMPILE_NOTICE)
        held = io.StringIO()  # the runtime's own notice would land mid-way: hold it back
        with contextlib.redirect_stderr(held) if compiling else contextlib.nullcontext():
            seconds = warm_up(lambda: build(model, self.data.image_shape, self.data.num_classes),
                              self.data, flat=model["kind"] == "mlp",
                              batch_size=min(spec.batch_size, len(self.data.y_train)))
        for line in held.getvalue().splitlines():
            if line.strip() and not line.startswith("normlab: compiling"):
                self.echo(line)
        if compiling:
            self.echo(f"  kernels ready in {seconds:.1f} s (not counted in the run times)")
        self.warmed.add(key)

    def path(self, name: str) -> Path:
        """Where to write an output file of this experiment."""
        return self.out_dir / name


@dataclass
class ExperimentResult:
    """What an experiment returns: report sections, a headline for the terminal, and the
    verdict on its claim (the headline ends with the verdict's text)."""

    sections: list[Section]
    summary: Table | None = None
    headline: str = ""
    verdict: Verdict | None = None


def command_line(name: str, *, seed: int, budget: float, quick: bool,
                 out: str | Path | None = None, data_dir: str | Path | None = None,
                 backend: str = "auto") -> str:
    """The ``normlab experiment`` command that reproduces a run with these settings."""
    words = ["normlab", "experiment", name, "--seed", str(seed), "--budget", f"{budget:g}"]
    if quick:
        words.append("--quick")
    if backend != "auto":
        words += ["--backend", backend]
    if data_dir is not None:
        words += ["--data", str(data_dir)]
    if out is not None:
        words += ["--out", str(out)]
    return shlex.join(words)


def _refuse_other_budget(path: Path, quick: bool, resume: bool) -> None:
    if not resume or not path.is_file():
        return
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # the store reports unreadable files itself
    if isinstance(stored, dict) and stored.get("runs") and stored.get("quick", quick) != quick:
        held, asked = ("quick", "full-budget") if stored["quick"] else ("full-budget", "quick")
        raise ValueError(
            f"{path.parent} holds {held} results; a {asked} run would overwrite them: choose "
            f"another --out, or pass --fresh to replace them"
        )


def run_experiment(
    name: str,
    out_dir: str | Path | None = None,
    *,
    data_dir: str | Path | None = None,
    quick: bool = False,
    budget: float = 1.0,
    seed: int = 0,
    progress: bool = True,
    resume: bool = True,
    echo: Callable[[str], None] | None = None,
    data: Dataset | None = None,
) -> tuple[Path, ExperimentResult]:
    """Run experiment ``name`` and write ``results.json``, PNGs and ``report.html``.

    Returns the report path and the result. ``out_dir`` defaults to ``runs/<name>`` (and
    ``runs/<name>-quick`` in quick mode); a folder holding results of the other budget
    (full vs quick) is refused unless ``resume`` is off (``--fresh``), so a smoke run never
    overwrites a full one.
    """
    from normlab.experiments.catalog import CATALOG
    from normlab.experiments.registry import EXPERIMENTS

    if name not in CATALOG:
        raise ValueError(f"experiment must be one of {sorted(CATALOG)}, got {name!r}")
    if budget <= 0:
        raise ValueError(f"budget must be > 0, got {budget}")
    info = EXPERIMENTS[name]
    default = Path("runs") / (f"{name}-quick" if quick else name)
    out = Path(out_dir) if out_dir is not None else default
    _refuse_other_budget(out / "results.json", quick, resume)
    try:  # before any training: an unwritable folder is said at once, in one line
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".normlab-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"cannot write to --out {out}: {exc.strerror or exc}") from None
    if data is None:
        data = load_dataset(data_dir)
    if quick:
        data = data.subset(QUICK_TRAIN, QUICK_TEST, seed=seed)
    store = ResultStore(out / "results.json", name)
    from normlab import ops

    command = command_line(name, seed=seed, budget=budget, quick=quick, out=out_dir,
                           data_dir=data_dir, backend=ops.requested())
    # the day of the run, so documents generated from these results keep it (not the
    # file's modification time, which a copy changes)
    day = datetime.now(timezone.utc).date().isoformat()
    store.meta = {"title": info.title, "data": data.describe(), "quick": quick,
                  "budget": budget, "seed": seed, "command": command, "date": day}
    ctx = Context(data, out, store, quick=quick, budget=budget, seed=seed, progress=progress,
                  resume=resume, **({"echo": echo} if echo is not None else {}))
    ctx.echo(f"{name}: {info.title} on {data.describe()}")
    start = time.perf_counter()
    result = CATALOG[name](ctx)
    found = result.headline  # the report shows the verdict above it, in full
    if result.verdict is not None:
        store.meta["verdict"] = result.verdict.to_dict()
        if not result.headline.endswith(result.verdict.text):
            result.headline = f"{result.headline} {result.verdict.text}".strip()
    store.save()
    intro = [f"Claim: {info.claim}", f"Setup: {info.setup}", f"Data: {data.describe()}."]
    if found:
        intro.append(f"Result: {found}")
    seeds = ctx.seeds()
    meta = (f"seed{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))}, budget {budget:g}"
            f"{', quick' if quick else ''}, {time.perf_counter() - start:.0f} s")
    report = write_report(out / "report.html", f"normlab experiment: {info.title}", intro,
                          result.sections, meta=meta, verdict=result.verdict,
                          command=command, results_href=store.path.name)
    return report, result
