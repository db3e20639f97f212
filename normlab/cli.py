"""The ``normlab`` command line: demo, experiments, figures and benchmarks.

Each command imports what it needs (matplotlib, scikit-learn, the experiments) when it
runs, so ``--help`` stays quick.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from normlab._version import __version__
from normlab.experiments.registry import EXPERIMENTS

__all__ = ["main"]

_BACKENDS = ("auto", "cpu", "triton", "torch")


def _run_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by every command that trains: seed, threads, backend, progress."""
    options = [
        click.option("--seed", default=0, show_default=True, help="Seed for init and batches."),
        click.option("--threads", default=1, show_default=True, type=click.IntRange(1),
                     help="torch threads; the lab's models are small, one thread is fastest."),
        click.option("--backend", type=click.Choice(_BACKENDS), default="auto",
                     show_default=True, help="normlab kernel backend for the norm layers."),
        click.option("--progress/--no-progress", default=True, show_default=True,
                     help="Show a progress bar per run (on stderr)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@contextlib.contextmanager
def _lab(threads: int, backend: str) -> Iterator[None]:
    """Set torch's threads and normlab's backend; turn data errors into CLI errors."""
    import torch

    import normlab

    torch.set_num_threads(threads)
    try:
        with normlab.use_backend(backend):
            yield
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc


def _echo_err(message: str) -> None:
    click.echo(message, err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version=__version__, prog_name="normlab")
def main() -> None:
    """normlab: Batch Normalization and its family, with a lab to see what they do.

    Start with `normlab demo`, then `normlab experiment list`.
    """


@main.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              default=Path("runs/demo"), show_default=True, help="Output directory.")
@click.option("--steps", default=1500, show_default=True, type=click.IntRange(10),
              help="Training steps per model.")
@click.option("--target", default=0.95, show_default=True, type=click.FloatRange(0, 1),
              help="Test accuracy whose first crossing is reported.")
@click.option("--norms", default="none,batch,layer,group", show_default=True,
              help="Comma-separated norms to train: none, batch, layer, group.")
@_run_options
def demo(out: Path, steps: int, target: float, norms: str, seed: int, threads: int,
         backend: str, progress: bool) -> None:
    """Train one MLP without and with BatchNorm, LayerNorm and GroupNorm on the bundled
    8x8 digits (no download), print a summary table and write OUT/report.html."""
    valid = ("none", "batch", "layer", "group")
    chosen = [n.strip() for n in norms.split(",") if n.strip()]
    bad = sorted(set(chosen) - set(valid))
    if bad or not chosen:
        raise click.BadParameter(
            f"unknown norm(s) {', '.join(bad) or '(none given)'}; choose from "
            f"{', '.join(valid)}", param_hint="--norms",
        )
    with _lab(threads, backend):
        from normlab.experiments.demo import run_demo
        from normlab.experiments.report import format_table

        result = run_demo(out, steps=steps, seed=seed, target=target, norms=chosen,
                          progress=progress, echo=_echo_err)
    click.echo()
    click.echo(format_table(result.table))
    click.echo()
    if result.headline:
        click.echo(result.headline)
    click.echo(f"report: {result.report}")


@main.group()
def experiment() -> None:
    """Run one experiment (seeded, resumable; JSON, PNGs and an HTML report).

    Results go to runs/NAME/results.json, rewritten atomically after every run; running
    the same command again reuses finished runs. `normlab experiment list` describes them.
    """


@experiment.command("list")
def experiment_list() -> None:
    """Describe every experiment: the claim it tests and what it trains."""
    for info in EXPERIMENTS.values():
        click.echo(click.style(info.name, bold=True) + f"  {info.title}")
        click.echo(click.wrap_text(f"Claim: {info.claim}", initial_indent="    ",
                                   subsequent_indent="    "))
        click.echo(click.wrap_text(f"Setup: {info.setup}", initial_indent="    ",
                                   subsequent_indent="    "))
        click.echo()


def _experiment_command(name: str) -> click.Command:
    info = EXPERIMENTS[name]

    @click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
                  help=f"Output directory  [default: runs/{name}]")
    # Not exists=True: a name such as "shapes" is a generated data set, not a path;
    # load_dataset says what is wrong with anything else, listing the generated names.
    @click.option("--data", "data_dir", type=click.Path(dir_okay=True, path_type=Path),
                  help="Directory with MNIST/Fashion-MNIST IDX files (.gz or not) or "
                       "CIFAR-10 python batches, or 'shapes' (generated 16x16 procedural "
                       "shapes, harder than the digits); default: the bundled 8x8 digits.")
    @click.option("--quick", is_flag=True,
                  help="Tiny budget (a few steps, two sweep points, data subset): a smoke "
                       "test that runs in seconds.")
    @click.option("--budget", default=1.0, show_default=True, type=click.FloatRange(min=0,
                  min_open=True), help="Multiply every run's training steps by this.")
    @click.option("--fresh", is_flag=True, help="Retrain every run instead of reusing "
                                                "finished runs from results.json.")
    @_run_options
    def command(out: Path | None, data_dir: Path | None, quick: bool, budget: float,
                fresh: bool, seed: int, threads: int, backend: str, progress: bool) -> None:
        with _lab(threads, backend):
            from normlab.experiments.lab import run_experiment
            from normlab.experiments.report import format_table

            try:
                report, result = run_experiment(
                    name, out, data_dir=data_dir, quick=quick, budget=budget, seed=seed,
                    progress=progress, resume=not fresh, echo=_echo_err,
                )
            except KeyboardInterrupt:
                where = out or Path("runs") / (f"{name}-quick" if quick else name)
                _echo_err(f"\ninterrupted: the finished runs are kept in {where}/results.json; "
                          "run the same command again to resume from them")
                raise SystemExit(130) from None
        if result.summary is not None:
            click.echo()
            click.echo(format_table(result.summary))
            click.echo()
        if result.headline:
            click.echo(f"{name}: {result.headline}")
        click.echo(f"report: {report}")

    command.__doc__ = f"{info.title}. {info.claim}\n\n{info.setup}"
    return click.command(name)(command)


for _name in EXPERIMENTS:
    experiment.add_command(_experiment_command(_name))


@main.group()
def figure() -> None:
    """Draw teaching figures."""


@figure.command()
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("runs/figures/norms.png"), show_default=True, help="PNG to write.")
def norms(out: Path) -> None:
    """The [N, C, H, W] cube: which elements BatchNorm, LayerNorm, InstanceNorm and
    GroupNorm average over."""
    if out.suffix.lower() != ".png":
        raise click.BadParameter(
            f"the figure is written as PNG: give a .png path, got {out.name}", param_hint="--out"
        )
    from normlab.experiments.figures import norms_cube

    click.echo(f"wrote {norms_cube(out)}")


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(args: tuple[str, ...]) -> None:
    """Benchmark normlab's kernels against torch (arguments go to normlab.bench;
    `normlab bench --help` shows them)."""
    try:
        module = importlib.import_module("normlab.bench")
    except ModuleNotFoundError as exc:
        if exc.name not in ("normlab.bench",):
            raise
        click.echo("error: normlab.bench is not available in this installation "
                   "(the benchmark module is missing)", err=True)
        sys.exit(2)
    code = module.main(list(args))
    sys.exit(code if isinstance(code, int) else 0)
