"""The compression pipeline: model + data + recipe -> a verified bundle, accuracy-aware.

Order: load the model and data, split backbone/head, (transfer-learn a new head), prune, distill,
export and quantize each artifact, verify it in its runtime, measure it, write the bundle. When
`max_accuracy_drop` is exceeded the pipeline backs off (more distillation, a search for the
largest prune ratio that fits, sensitive nodes kept out of int8) and logs every try. Nothing is
written until every step passed (or, with `best_effort`, kept the try that lost least), and then
atomically, so any error leaves no partial bundle.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)

from edgefl.bundle import (
    MANIFEST_FILE,
    Artifact,
    InputSpec,
    Manifest,
    ModelBundle,
    Preprocess,
    write_bundle,
)
from edgefl.compression.chance import chance_threshold, flag_chance, refuse_chance
from edgefl.compression.distill import predict
from edgefl.compression.preprocess import (
    PreprocessOverrides,
    apply_overrides,
    describe,
    input_shape,
)
from edgefl.compression.prune import PruningPlan, count_macs_params, plan_pruning
from edgefl.compression.quiet import third_party_quiet
from edgefl.compression.recipe import Recipe, load_recipe
from edgefl.compression.report import CompressionReport, render_plan, render_report
from edgefl.compression.stages import CompressionRun
from edgefl.compression.transfer import parse_finetune, replace_head, train_head
from edgefl.data import DIGITS, Dataset, conform, holdout_split, load_dataset, source_preprocess
from edgefl.errors import BundleError, DataError
from edgefl.models.loading import LoadedModel, resolve_model
from edgefl.models.split import SplitModel, split_model

# Below this many MACs per sample, training and distillation run on one thread.
SMALL_MODEL_MACS = 50_000_000


@dataclass
class CompressRequest:
    """What `edgefl compress` was asked to do (the CLI flags, as library values)."""

    model: str
    # A shipped recipe's name, a .toml file, or (from Python, as `edgefl tune` does) a Recipe.
    recipe: str | Path | Recipe
    data: str | Path
    out: Path
    weights: Path | None = None
    head: str | None = None
    num_classes: int | None = None
    finetune: str | None = None
    force: bool = False
    dry_run: bool = False
    version: int | None = None
    name: str | None = None
    preprocess: PreprocessOverrides = field(default_factory=PreprocessOverrides)
    allow_chance: bool = False
    # Show third-party exporters' and runtimes' own log lines (TensorFlow, absl, torchao).
    verbose: bool = False
    # Evaluate every stage on this set (any form `data` takes) instead of a share held out of
    # `data`; it is used for nothing else: no training, distillation or calibration.
    eval_data: str | Path | None = None
    # Seeds the held-out split, the new head and the shuffling of training and distillation.
    seed: int = 0
    # When the back-off finds nothing within max_accuracy_drop, write the try that lost least
    # (report.within_budget is then False) instead of raising AccuracyDropError.
    best_effort: bool = False


@dataclass
class CompressResult:
    """The outcome: the bundle written (None on a dry run), the pruning plan and the report.

    `data` is every sample as the model input the pipeline used (after preprocessing), before
    the held-out split: what a board gets from the same files with the manifest's preprocessing.
    `test` is the set every stage was scored on (`eval_data`, or the held-out share).
    """

    bundle: ModelBundle | None
    plan: PruningPlan | None
    report: CompressionReport | None
    artifacts: list[str] = field(default_factory=list)
    data: Dataset | None = None
    test: Dataset | None = None


def compress(
    request: CompressRequest,
    console: Console | None = None,
    warn: Callable[[str], None] | None = None,
) -> CompressResult:
    """Compress a model into a bundle as the recipe says (or only plan it, on a dry run).

    Args:
        request: model, weights, head, transfer settings, recipe, data, output and flags.
        console: where progress bars and tables go; None prints nothing.
        warn: called with each warning as soon as it is known (they also land in the report);
            None prints them on `console` as "warning: ...".

    Returns:
        The result; on a dry run nothing is written and `bundle` and `report` are None.

    Raises:
        RecipeError, ModelLoadError, DataError: bad recipe, model or data (checked first).
        BundleError: `out` exists without `force`, or is not a bundle.
        ExportError, VerificationError: an artifact cannot be produced or disagrees.
        AccuracyDropError: the accuracy drop stays above `max_accuracy_drop` after back-off.
        ChanceAccuracyError: a stage scores at chance level and `allow_chance` is not set.
    """
    started = time.perf_counter()
    recipe = request.recipe if isinstance(request.recipe, Recipe) else load_recipe(request.recipe)
    finetune = parse_finetune(request.finetune)
    out = Path(request.out)
    if not request.dry_run:
        _check_out(out, request.force)
    loaded = resolve_model(request.model, request.weights)
    preprocess = source_preprocess(request.data, loaded.preprocess)
    if request.preprocess:
        if str(request.data) == DIGITS:
            raise DataError(
                "`resize`, `mean`, `std` and `grayscale` preprocess images; the built-in digits "
                "are model inputs already"
            )
        preprocess = apply_overrides(preprocess, request.preprocess)
    dataset = load_dataset(request.data, preprocess)
    shape = input_shape(loaded.input_shape, request.preprocess, preprocess.layout)
    if shape is not None:
        dataset = conform(dataset, shape)
    if request.eval_data is None:
        train, test = holdout_split(dataset, seed=request.seed)
        evaluation = (
            f"a held-out {len(test)} of {len(dataset)} samples of the training data "
            f"({request.data}), not an independent test set: give `eval_data` for one"
        )
    else:
        train, test = dataset, _eval_set(request, preprocess, dataset)
        evaluation = f"{request.eval_data} ({len(test)} samples used for nothing else)"
    example = torch.from_numpy(train.X[:2])
    # Up to 64 real samples: head(backbone(x)) must equal model(x) on them.
    split = split_model(loaded.module, request.head, example, torch.from_numpy(train.X[:64]))
    if request.num_classes is not None:
        replace_head(split, request.num_classes, seed=request.seed)
    labels = _labels(split, loaded, dataset, request.num_classes)
    report = CompressionReport(loaded.name, recipe.name, len(train), len(test))
    report.evaluation = evaluation
    report.seconds["load"] = round(time.perf_counter() - started, 2)
    if loaded.random_init and finetune is None:
        report.warnings.append(
            f"{loaded.name} is randomly initialised (no `weights`): its features are random, "
            "so expect chance accuracy; give `weights`, or `finetune` to train it here"
        )
    for warning in report.warnings:
        if warn is not None:
            warn(warning)
        elif console is not None:
            console.print(f"warning: {warning}", markup=False, highlight=False)
    metric = recipe.accuracy_metric
    report.metric = metric.name
    chance = chance_threshold(test.y, len(labels), metric)
    hint = " (its weights are random: give `weights`)" if loaded.random_init else ""

    if request.dry_run:
        plan = None
        if recipe.prune is not None and recipe.prune.ratio > 0:
            plan = plan_pruning(split, example, recipe.prune, (train.X, train.y))
        planned = [a.file for a in recipe.artifacts]
        if console is not None:
            console.print(describe(preprocess, dataset.sample_shape))
            render_plan(plan, planned, console)
        return CompressResult(None, plan, None, planned, dataset)

    macs, _ = count_macs_params(split.backbone, example[:1])
    with _progress(console) as progress, _training_threads(macs):
        if request.num_classes is not None or finetune is not None:
            tick = time.perf_counter()
            task = progress.add_task("training head", total=recipe.head_epochs)
            train_head(
                split,
                train,
                finetune,
                epochs=recipe.head_epochs,
                seed=request.seed,
                progress=lambda done, _total: progress.update(task, completed=done),
            )
            report.seconds["transfer"] = round(time.perf_counter() - tick, 2)
        teacher = split.eval()
        run = CompressionRun(
            recipe=recipe,
            train=train,
            test=test,
            example=example,
            original=metric.score(predict(teacher, test.X), test.y),
            report=report,
            progress=progress,
            seed=request.seed,
            metric=metric,
            best_effort=request.best_effort,
        )
        report.stages.append(run.torch_stage("original", teacher))
        # Checked before minutes of pruning and export: a model at chance stays there.
        _check_chance(report, chance, len(labels), hint, request.allow_chance, console)
        tick = time.perf_counter()
        student, plan = run.prune_and_distill(teacher)
        report.seconds["prune+distill"] = round(time.perf_counter() - tick, 2)
        report.pruning = plan.to_dict() if plan is not None else None
        with tempfile.TemporaryDirectory(prefix="edgefl-compress-") as tmp:
            tick = time.perf_counter()
            with third_party_quiet(request.verbose):
                files = run.export_all(student, Path(tmp))
            report.seconds["export+verify"] = round(time.perf_counter() - tick, 2)
            report.seconds["total"] = round(time.perf_counter() - started, 2)
            _check_chance(report, chance, len(labels), hint, request.allow_chance, console)
            manifest = Manifest(
                name=request.name or loaded.name,
                version=_version(out, request),
                input=InputSpec(
                    shape=list(train.sample_shape),
                    preprocess=dataclasses.replace(preprocess),
                ),
                feature_size=student.feature_size,
                artifacts=[
                    Artifact(file=a.file, role="backbone", format=a.format, precision=a.precision)
                    for a in recipe.artifacts
                ],
                heads={"default": student.head_spec(labels)},
                recipe=recipe.name,
                source_model_sha256=loaded.sha256,
                created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                extra={"recipe": recipe.to_dict(), "model": request.model},
            )
            bundle = write_bundle(
                out,
                manifest,
                files,
                {"default": student.head_weights()},
                report.to_dict(),
                force=request.force,
            )
    if console is not None:
        render_report(report, console)
        console.print(f"bundle written to {out} (version {manifest.version})")
    artifacts = [a.file for a in recipe.artifacts]
    return CompressResult(bundle, plan, report, artifacts, dataset, test)


def _eval_set(request: CompressRequest, preprocess: Preprocess, data: Dataset) -> Dataset:
    """Load `eval_data` as the model's inputs, its class indices renumbered to `data`'s labels."""
    assert request.eval_data is not None
    if str(request.eval_data) == DIGITS:
        preprocess = source_preprocess(DIGITS, None)
    evaluation = conform(load_dataset(request.eval_data, preprocess), data.sample_shape)
    unknown = [label for label in evaluation.labels if label not in data.labels]
    if unknown:
        raise DataError(
            f"`eval_data` {request.eval_data} has classes the training data lacks: "
            f"{_few(unknown)} (training classes: {_few(data.labels)})"
        )
    index = np.asarray([data.labels.index(label) for label in evaluation.labels], dtype=np.int64)
    return Dataset(evaluation.X, index[evaluation.y], list(data.labels))


def _check_chance(
    report: CompressionReport,
    threshold: float,
    num_classes: int,
    hint: str,
    allowed: bool,
    console: Console | None,
) -> None:
    flagged = flag_chance(report, threshold)
    if flagged and not allowed:
        if console is not None:
            render_report(report, console)
        refuse_chance(flagged, threshold, num_classes, hint)


def _check_out(out: Path, force: bool) -> None:
    if not out.exists():
        return
    if not force:
        raise BundleError(f"{out} already exists; give `force` to replace it")
    if out.is_dir() and not (out / MANIFEST_FILE).is_file() and any(out.iterdir()):
        raise BundleError(f"{out} is a non-empty directory that is not a bundle; not replacing it")
    if not out.is_dir():
        raise BundleError(f"{out} is a file, not a bundle directory; not replacing it")


def _version(out: Path, request: CompressRequest) -> int:
    if request.version is not None:
        return request.version
    try:
        previous = Manifest.from_json((out / MANIFEST_FILE).read_bytes()).version
    except (OSError, BundleError):
        return 1
    return previous + 1


def _labels(
    split: SplitModel, loaded: LoadedModel, dataset: Dataset, num_classes: int | None
) -> list[str]:
    # The data's class indices are the head's outputs, so their counts must agree: a fresh head
    # (--num-classes) is named after the data's classes (an ImageFolder's subfolders); a kept
    # head keeps the model's own labels, which describe its outputs.
    outputs = split.head_linears()[-1].out_features
    classes = len(dataset.labels)
    if num_classes is not None and classes != outputs:
        raise DataError(
            f"`num_classes` {outputs} but the data has {classes} classes "
            f"({_few(dataset.labels)}); give `num_classes` {classes}"
        )
    if classes != outputs:
        raise DataError(
            f"the data has {classes} classes ({_few(dataset.labels)}) but the model's head has "
            f"{outputs} outputs; give `num_classes` {classes} to train a new head for them"
        )
    if num_classes is None and loaded.labels is not None and len(loaded.labels) == outputs:
        return list(loaded.labels)
    return list(dataset.labels)


def _few(labels: list[str], limit: int = 5) -> str:
    shown = ", ".join(labels[:limit])
    return shown + (f", ... ({len(labels) - limit} more)" if len(labels) > limit else "")


@contextmanager
def _training_threads(macs: int) -> Iterator[None]:
    # Small models train faster on one thread (a step is shorter than the threads' sync), and a
    # shared CPU makes extra threads thrash; big models keep torch's default.
    previous = torch.get_num_threads()
    if macs < SMALL_MODEL_MACS:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def _progress(console: Console | None) -> Iterator[Progress]:
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=console is None,
        transient=False,
    )
    with progress if console is not None else nullcontext(progress):
        yield progress
