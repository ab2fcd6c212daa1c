"""`edgefl compress` and `edgefl recipes`: turn a PyTorch model into a verified bundle."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from edgefl.cli.shell import user_errors, with_flags


@click.command()
@click.option("--model", required=True, help="Built-in name (digits-cnn, digits-mlp, mobilenet-v2, "
              "resnet18) or package.module:factory.")  # fmt: skip
@click.option("--weights", type=click.Path(path_type=Path), help=".safetensors or state-dict .pt.")
@click.option("--head", default=None, help="Module path of the head (default: the last Linear).")
@click.option("--num-classes", type=int, default=None, help="Replace the head with a fresh one "
              "for K classes and train it on the data (backbone frozen).")  # fmt: skip
@click.option(
    "--finetune", default=None, help="Also train the backbone: 'all' or the last N blocks."
)
@click.option("--recipe", required=True, help="Recipe name (see `edgefl recipes`) or a .toml file.")
@click.option("--data", required=True, help="'digits', an ImageFolder directory or a .npz (X, y).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Bundle directory.")
@click.option("--resize", default=None, help="Resize images to HxW (or N for NxN); recorded "
              "in the bundle (built-ins: 224x224).")  # fmt: skip
@click.option("--mean", default=None, help="Per-channel mean after scaling to [0, 1], e.g. "
              "0.485,0.456,0.406 (built-ins: ImageNet's).")  # fmt: skip
@click.option("--std", default=None, help="Per-channel std, e.g. 0.229,0.224,0.225.")
@click.option("--grayscale", is_flag=True, help="Decode images as one gray channel (default RGB).")
@click.option("--name", default=None, help="Bundle name (default: the model's name).")
@click.option("--version", "bundle_version", type=click.IntRange(min=1), default=None,
              help="Bundle version (default 1, or the replaced bundle's version + 1).")  # fmt: skip
@click.option("--force", is_flag=True, help="Replace an existing bundle at --out.")
@click.option(
    "--dry-run", is_flag=True, help="Print what would be pruned and exported; write nothing."
)
@click.option("--allow-chance", is_flag=True, help="Write the bundle even when a stage scores "
              "at chance accuracy (no better than guessing).")  # fmt: skip
@click.option("--verbose", is_flag=True, help="Also show the exporters' and runtimes' own log "
              "lines (TensorFlow, absl, torchao).")  # fmt: skip
@click.option("--eval-data", default=None, help="Evaluate every stage on this set ('digits', a "
              "folder or a .npz), used for nothing else (default: 20% of --data).")  # fmt: skip
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the held-out split, the new head and the training order.")  # fmt: skip
@click.option("--best-effort", is_flag=True, help="When no setting the back-off tries meets "
              "max_accuracy_drop, write the one that lost least, then exit 1.")  # fmt: skip
@user_errors
def compress(
    model: str,
    weights: Path | None,
    head: str | None,
    num_classes: int | None,
    finetune: str | None,
    recipe: str,
    data: str,
    out: Path,
    resize: str | None,
    mean: str | None,
    std: str | None,
    grayscale: bool,
    name: str | None,
    bundle_version: int | None,
    force: bool,
    dry_run: bool,
    allow_chance: bool,
    verbose: bool,
    eval_data: str | None,
    seed: int,
    best_effort: bool,
) -> None:
    """Prune, distill, quantize and export a model into a verified bundle."""
    from rich.console import Console

    from edgefl.compression.pipeline import CompressRequest
    from edgefl.compression.pipeline import compress as run_compress
    from edgefl.compression.preprocess import PreprocessOverrides, parse_channels, parse_resize

    overrides = PreprocessOverrides(
        resize=parse_resize(resize) if resize is not None else None,
        mean=parse_channels(mean, "--mean") if mean is not None else None,
        std=parse_channels(std, "--std") if std is not None else None,
        grayscale=grayscale,
    )
    request = CompressRequest(
        model=model, recipe=recipe, data=data, out=out, weights=weights, head=head,
        num_classes=num_classes, finetune=finetune, force=force, dry_run=dry_run,
        version=bundle_version, name=name, preprocess=overrides, allow_chance=allow_chance,
        verbose=verbose, eval_data=eval_data, seed=seed, best_effort=best_effort,
    )  # fmt: skip
    result = run_compress(
        request, Console(), warn=lambda text: click.echo(f"warning: {with_flags(text)}", err=True)
    )
    if result.report is not None and not result.report.within_budget:
        click.echo(
            f"error: {out} is a best-effort bundle beyond max_accuracy_drop: "
            + "; ".join(
                w.removeprefix("best effort: ")
                for w in result.report.warnings
                if w.startswith("best effort: ")
            ),
            err=True,
        )
        sys.exit(1)


@click.command()
@user_errors
def recipes() -> None:
    """List the shipped compression recipes."""
    from edgefl.compression.recipe import available_recipes, load_recipe

    for recipe_name in available_recipes():
        click.echo(f"{recipe_name:<14} {load_recipe(recipe_name).description}")
