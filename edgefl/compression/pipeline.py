"""The compression pipeline: model + data + recipe -> a verified bundle, accuracy-aware.

Order: load the model and data, split backbone/head, (transfer-learn a new head), prune, distill,
export and quantize each artifact, verify it in its runtime, measure it, write the bundle. When
`max_accuracy_drop` is exceeded the pipeline backs off (more distillation, a lower prune ratio,
sensitive nodes kept out of int8) and logs every try. Nothing is written until every step passed,
and then atomically, so any error leaves no partial bundle.
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TaskID,
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
    write_bundle,
)
from edgefl.compression.distill import accuracy, distill, predict
from edgefl.compression.preprocess import (
    PreprocessOverrides,
    apply_overrides,
    describe,
    input_shape,
)
from edgefl.compression.prune import PruningPlan, apply_pruning, count_macs_params, plan_pruning
from edgefl.compression.recipe import ArtifactStep, DistillStep, Recipe, load_recipe
from edgefl.compression.report import (
    BackoffAttempt,
    CompressionReport,
    StageReport,
    render_plan,
    render_report,
    state_size_bytes,
    torch_latency_ms,
)
from edgefl.compression.transfer import parse_finetune, replace_head, train_head
from edgefl.data import DIGITS, Dataset, conform, holdout_split, load_dataset, source_preprocess
from edgefl.errors import AccuracyDropError, BundleError, DataError, VerificationError
from edgefl.head import head_forward
from edgefl.models.loading import LoadedModel, resolve_model
from edgefl.models.split import SplitModel, split_model

# How many of the most sensitive nodes the int8 back-off keeps in float, try by try.
EXCLUDE_STEPS = (2, 4, 8)
# Below this many MACs per sample, training and distillation run on one thread.
SMALL_MODEL_MACS = 50_000_000


@dataclass
class CompressRequest:
    """What `edgefl compress` was asked to do (the CLI flags, as library values)."""

    model: str
    recipe: str | Path
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


@dataclass
class CompressResult:
    """The outcome: the bundle written (None on a dry run), the pruning plan and the report.

    `data` is every sample as the model input the pipeline used (after preprocessing), before
    the held-out split: what a board gets from the same files with the manifest's preprocessing.
    """

    bundle: ModelBundle | None
    plan: PruningPlan | None
    report: CompressionReport | None
    artifacts: list[str] = field(default_factory=list)
    data: Dataset | None = None


def compress(request: CompressRequest, console: Console | None = None) -> CompressResult:
    """Compress a model into a bundle as the recipe says (or only plan it, on a dry run).

    Args:
        request: model, weights, head, transfer settings, recipe, data, output and flags.
        console: where progress bars and tables go; None prints nothing.

    Returns:
        The result; on a dry run nothing is written and `bundle` and `report` are None.

    Raises:
        RecipeError, ModelLoadError, DataError: bad recipe, model or data (checked first).
        BundleError: `out` exists without `force`, or is not a bundle.
        ExportError, VerificationError: an artifact cannot be produced or disagrees.
        AccuracyDropError: the accuracy drop stays above `max_accuracy_drop` after back-off.
    """
    started = time.perf_counter()
    recipe = load_recipe(request.recipe)
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
    train, test = holdout_split(dataset)
    example = torch.from_numpy(train.X[:2])
    split = split_model(loaded.module, request.head, example)
    if request.num_classes is not None:
        replace_head(split, request.num_classes)
    labels = _labels(split, loaded, dataset, request.num_classes)
    report = CompressionReport(loaded.name, recipe.name, len(train), len(test))
    report.seconds["load"] = round(time.perf_counter() - started, 2)

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
                progress=lambda done, _total: progress.update(task, completed=done),
            )
            report.seconds["transfer"] = round(time.perf_counter() - tick, 2)
        teacher = split.eval()
        run = _Run(
            recipe=recipe,
            train=train,
            test=test,
            example=example,
            original=accuracy(teacher, test.X, test.y),
            report=report,
            progress=progress,
        )
        report.stages.append(run.torch_stage("original", teacher))
        tick = time.perf_counter()
        student, plan = run.prune_and_distill(teacher)
        report.seconds["prune+distill"] = round(time.perf_counter() - tick, 2)
        report.pruning = plan.to_dict() if plan is not None else None
        with tempfile.TemporaryDirectory(prefix="edgefl-compress-") as tmp:
            tick = time.perf_counter()
            files = run.export_all(student, Path(tmp))
            report.seconds["export+verify"] = round(time.perf_counter() - tick, 2)
            report.seconds["total"] = round(time.perf_counter() - started, 2)
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
    return CompressResult(bundle, plan, report, [a.file for a in recipe.artifacts], dataset)


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


@dataclass(frozen=True)
class _Reference:
    """What each artifact of one student is checked against: the torch features and head."""

    inputs: np.ndarray
    features: np.ndarray
    head: tuple[list[dict[str, Any]], dict[str, np.ndarray]]


@dataclass
class _Run:
    """What every stage of one compression shares; made once in `compress`, after the head.

    Each stage is a method, so a call names only what differs between stages: the model at hand,
    the artifact and its files.
    """

    recipe: Recipe
    train: Dataset
    test: Dataset
    example: torch.Tensor
    original: float
    report: CompressionReport
    progress: Progress

    def drop(self, score: float) -> float:
        """Accuracy points `score` loses against the original model."""
        return round(100.0 * (self.original - score), 3)

    def allows(self, drop: float) -> bool:
        """Whether the recipe's `max_accuracy_drop` allows losing `drop` points."""
        return self.recipe.max_accuracy_drop is None or drop <= self.recipe.max_accuracy_drop

    def torch_stage(self, name: str, split: SplitModel) -> StageReport:
        """Measure a torch model (size, latency, MACs, accuracy) as the report's stage `name`."""
        threads = self.recipe.latency_threads
        macs, params = count_macs_params(split.backbone, self.example[:1])
        return StageReport(
            stage=name,
            runtime="torch",
            precision="fp32",
            threads=threads,
            size_bytes=state_size_bytes(split.backbone),
            latency_ms=round(torch_latency_ms(split.backbone, self.test.X, threads), 4),
            params=params,
            macs=macs,
            accuracy=accuracy(split, self.test.X, self.test.y),
        )

    def prune_and_distill(self, teacher: SplitModel) -> tuple[SplitModel, PruningPlan | None]:
        """Prune and distill a copy of `teacher`, backing off until the accuracy drop fits."""
        recipe = self.recipe
        prune = recipe.prune if recipe.prune is not None and recipe.prune.ratio > 0 else None
        if prune is None and recipe.distill is None:
            return teacher, None
        step = recipe.distill or DistillStep(epochs=0)
        tries = [(prune.ratio if prune else 0.0, step.epochs)]
        if recipe.max_accuracy_drop is not None:
            # Back-off order: distill longer first (cheap, keeps the size), then prune less.
            if step.epochs > 0:
                tries.append((tries[0][0], step.epochs * 2))
            if prune is not None:
                tries.append((prune.ratio / 2, step.epochs * 2))
        train = self.train
        for ratio, epochs in tries:
            student = copy.deepcopy(teacher)
            stages: list[StageReport] = []
            plan = None
            if prune is not None:
                plan = apply_pruning(
                    student,
                    self.example,
                    dataclasses.replace(prune, ratio=ratio),
                    (train.X, train.y),
                )
                stages.append(self.torch_stage("pruned", student))
            if epochs > 0:
                task = self.progress.add_task(f"distilling (ratio {ratio:g})", total=epochs)

                def advance(done: int, _total: int, task: TaskID = task) -> None:
                    self.progress.update(task, completed=done)

                distill(student, teacher, train, step, epochs=epochs, progress=advance)
                stages.append(self.torch_stage("distilled", student))
            drop = self.drop(accuracy(student, self.test.X, self.test.y))
            ok = self.allows(drop)
            setting = f"prune ratio {ratio:g}, distill {epochs} epochs"
            self.report.backoff.append(BackoffAttempt("prune+distill", setting, drop, kept=ok))
            if ok:
                self.report.stages.extend(stages)
                return student, plan
        tried = "; ".join(f"{a.setting}: -{a.accuracy_drop} points" for a in self.report.backoff)
        raise AccuracyDropError(
            f"pruning and distillation lose more than max_accuracy_drop "
            f"{recipe.max_accuracy_drop} accuracy points after back-off ({tried})"
        )

    def export_all(self, student: SplitModel, work: Path) -> dict[str, Path]:
        """Export, verify and measure every artifact of the recipe into `work`, by file name."""
        from edgefl.compression.export import export_onnx, export_tflite

        backbone = student.backbone.eval()
        one = self.example[:1]
        macs, params = count_macs_params(backbone, one)
        inputs = self.test.X[: self.recipe.verify.samples]
        head = (student.head_layers(), student.head_weights())
        reference = _Reference(inputs, predict(backbone, inputs), head)
        files: dict[str, Path] = {}
        fp32_onnx: Path | None = None
        task = self.progress.add_task("exporting artifacts", total=len(self.recipe.artifacts))
        for index, artifact in enumerate(self.recipe.artifacts):
            calibration = self.train.X[: artifact.calibration_samples]
            path = work / artifact.file
            if artifact.format == "onnx":
                # Every ONNX precision starts from one fp32 export, made once.
                fp32_onnx = fp32_onnx or export_onnx(backbone, one, work / "fp32-base.onnx")
                _make_onnx(artifact, fp32_onnx, path, calibration, ())
            elif artifact.precision == "int8":
                export_tflite(backbone, one, path, calibration=calibration)
            else:
                export_tflite(backbone, one, path)
            stage = self.measure(artifact, path, reference)
            if stage is None:
                assert fp32_onnx is not None
                stage = self.backoff_int8(artifact, fp32_onnx, path, calibration, reference)
            stage.params, stage.macs = params, macs
            self.report.stages.append(stage)
            files[artifact.file] = path
            self.progress.update(task, completed=index + 1)
        return files

    def measure(
        self,
        artifact: ArtifactStep,
        path: Path,
        reference: _Reference,
        setting: str = "as the recipe says",
    ) -> StageReport | None:
        """Verify and measure an artifact; None when ONNX int8 may still back off."""
        from edgefl.compression.verify import verify_artifact
        from edgefl.runtime import load_backbone, measure_latency

        recipe = self.recipe
        can_back_off = artifact.format == "onnx" and artifact.precision == "int8"
        name = f"{artifact.format} {artifact.precision}"
        try:
            agreement = verify_artifact(
                path,
                reference.features,
                reference.inputs,
                recipe.tolerance(artifact.precision),
                reference.head,
                recipe.verify.min_top1_agreement,
                threads=recipe.latency_threads,
            )
        except VerificationError:
            if can_back_off and recipe.max_accuracy_drop is not None:
                self.report.backoff.append(
                    BackoffAttempt(name, f"{setting}: failed verification", None, False)
                )
                return None
            raise
        runner = load_backbone(path, threads=recipe.latency_threads)
        features = runner.run(self.test.X)
        predicted = head_forward(*reference.head, features).argmax(axis=1)
        score = float((predicted == self.test.y).mean())
        drop = self.drop(score)
        ok = self.allows(drop)
        self.report.backoff.append(BackoffAttempt(name, setting, drop, kept=ok))
        if not ok:
            if can_back_off:
                return None
            raise AccuracyDropError(
                f"{artifact.file} loses {drop} accuracy points against the original "
                f"(max_accuracy_drop {recipe.max_accuracy_drop}); no back-off left for "
                f"{artifact.format} {artifact.precision}"
            )
        return StageReport(
            stage=name,
            runtime="onnxruntime" if artifact.format == "onnx" else "litert",
            precision=artifact.precision,
            threads=recipe.latency_threads,
            size_bytes=path.stat().st_size,
            latency_ms=round(measure_latency(runner, self.test.X[:1]), 4),
            accuracy=score,
            max_error=agreement.max_abs_error,
            relative_error=agreement.relative_max_error,
            top1_agreement=agreement.top1_agreement,
            file=artifact.file,
        )

    def backoff_int8(
        self,
        artifact: ArtifactStep,
        fp32: Path,
        path: Path,
        calibration: np.ndarray,
        reference: _Reference,
    ) -> StageReport:
        """Re-quantize with the most sensitive nodes kept in float until the artifact passes."""
        from edgefl.compression.quantize import rank_sensitive_nodes

        ranked = rank_sensitive_nodes(fp32, calibration, limit=max(EXCLUDE_STEPS))
        for count in EXCLUDE_STEPS:
            exclude = tuple(ranked[:count])
            if not exclude:
                break
            _make_onnx(artifact, fp32, path, calibration, exclude)
            setting = f"{len(exclude)} sensitive nodes kept in float: {', '.join(exclude)}"
            stage = self.measure(artifact, path, reference, setting)
            if stage is not None:
                return stage
            if len(exclude) < count:
                break
        tried = "; ".join(
            f"{a.setting}: "
            + ("failed verification" if a.accuracy_drop is None else f"-{a.accuracy_drop}")
            for a in self.report.backoff
            if a.step == "onnx int8"
        )
        raise AccuracyDropError(
            f"{artifact.file} stays beyond max_accuracy_drop {self.recipe.max_accuracy_drop} "
            f"or its verification tolerance after back-off ({tried})"
        )


def _make_onnx(
    artifact: ArtifactStep,
    fp32: Path,
    path: Path,
    calibration: np.ndarray,
    exclude: tuple[str, ...],
) -> None:
    from edgefl.compression.quantize import (
        convert_onnx_fp16,
        quantize_onnx_dynamic,
        quantize_onnx_static,
    )

    if artifact.precision == "fp32":
        path.write_bytes(fp32.read_bytes())
    elif artifact.precision == "int8":
        quantize_onnx_static(fp32, path, calibration, per_channel=True, exclude_nodes=exclude)
    elif artifact.precision == "int8-dynamic":
        quantize_onnx_dynamic(fp32, path)
    else:
        convert_onnx_fp16(fp32, path)
