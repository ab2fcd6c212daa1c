"""`edgefl tune`: search recipes for the best accuracy, latency and size on a board."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from edgefl.cli.shell import user_errors


@click.command()
@click.option("--model", required=True, help="Built-in name or package.module:factory.")
@click.option("--data", required=True, help="'digits', an ImageFolder directory or a .npz (X, y).")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Folder for trials, study, pareto.json/png, recipe.toml, bundle/.")  # fmt: skip
@click.option("--recipe", default="raspberry-pi", show_default=True,
              help="Base recipe: verification, metric, the first trial's setting.")  # fmt: skip
@click.option("--profile", default="raspberry-pi", show_default=True,
              help="Board profile: its runtime (artifact format) and thread count.")  # fmt: skip
@click.option("--format", "artifact_format", type=click.Choice(["onnx", "tflite"]), default=None,
              help="Artifact format (default: the profile's first preference).")  # fmt: skip
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Latency threads (default: the profile's).")  # fmt: skip
@click.option("--trials", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--timeout", type=float, default=None, help="Stop starting trials after S seconds.")
@click.option("--max-accuracy-drop", type=float, default=1.0, show_default=True,
              help="Accuracy points a trial may lose against the original model.")  # fmt: skip
@click.option("--max-latency-ms", "--budget-ms", "max_latency_ms", type=float, default=None,
              help="Latency budget (ms).")  # fmt: skip
@click.option("--max-size-kb", "--budget-kb", "max_size_kb", type=float, default=None,
              help="Artifact size budget (kB).")  # fmt: skip
@click.option("--study", default=None, help="sqlite:///file.db or a file; the same study "
              "continues where it stopped (default: OUT/study.db).")  # fmt: skip
@click.option("--study-name", default=None, help="Name of the study in its storage.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--weights", type=click.Path(path_type=Path), default=None)
@click.option("--head", default=None, help="Module path of the head (default: the last Linear).")
@click.option("--eval-data", default=None, help="Evaluate on this set, used for nothing else.")
@user_errors
def tune(
    model: str,
    data: str,
    out: Path,
    recipe: str,
    profile: str,
    artifact_format: str | None,
    threads: int | None,
    trials: int,
    timeout: float | None,
    max_accuracy_drop: float,
    max_latency_ms: float | None,
    max_size_kb: float | None,
    study: str | None,
    study_name: str | None,
    seed: int,
    weights: Path | None,
    head: str | None,
    eval_data: str | None,
) -> None:
    """Search prune, distillation and quantization settings (Optuna NSGA-II) for a board."""
    from rich.console import Console

    from edgefl.compression.tune import TuneRequest
    from edgefl.compression.tune import tune as run_tune
    from edgefl.compression.tune_output import describe_trial, render_pareto

    request = TuneRequest(
        model=model, data=data, out=out, recipe=recipe, profile=profile,
        artifact_format=artifact_format, threads=threads, trials=trials, timeout=timeout,
        max_accuracy_drop=max_accuracy_drop, max_latency_ms=max_latency_ms,
        max_size_kb=max_size_kb, study=study, study_name=study_name, seed=seed, weights=weights,
        head=head, eval_data=eval_data,
    )  # fmt: skip
    console = Console()
    result = run_tune(request, on_trial=lambda t: click.echo(describe_trial(t)))
    render_pareto(result, console)
    click.echo(f"study {result.study}; {out / 'pareto.json'}, {out / 'pareto.png'}")
    if result.chosen is None:
        click.echo("error: no trial met the budgets; nothing chosen (see pareto.json)", err=True)
        sys.exit(1)
    click.echo(f"chosen trial {result.chosen.number}: {out / 'recipe.toml'}, {out / 'bundle'}")
