"""The stages of one compression run, each measured against the accuracy budget, with back-off.

`CompressionRun` prunes and distills; while the accuracy drop exceeds `max_accuracy_drop` it
distills longer, keeps the layers most sensitive to pruning whole, then searches the prune ratio
(`edgefl.compression.backoff`) for the largest that fits; of the tries that fit it keeps the
smallest. It exports, verifies and measures every artifact, and re-quantizes ONNX int8 with more and
more of its most sensitive nodes in float when it fails. Every try lands in the report with its
setting, accuracy, size and latency. With `best_effort`, a search that finds nothing within the
budget keeps the try that lost least, and the report says the budget was missed.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import Progress, TaskID

from edgefl.compression.backoff import SearchBudget, bisect_ratio, describe_change
from edgefl.compression.distill import distill, predict
from edgefl.compression.metric import Metric
from edgefl.compression.prune import (
    PruningPlan,
    apply_pruning,
    count_macs_params,
    plan_pruning,
)
from edgefl.compression.recipe import ArtifactStep, DistillStep, PruneStep, Recipe
from edgefl.compression.report import (
    BackoffAttempt,
    CompressionReport,
    StageReport,
    state_size_bytes,
    torch_latency_ms,
)
from edgefl.data import Dataset
from edgefl.errors import AccuracyDropError, VerificationError
from edgefl.head import head_forward
from edgefl.models.split import SplitModel

# How many of the most sensitive nodes the int8 back-off keeps in float, try by try.
EXCLUDE_STEPS = (2, 4, 8, 16)
# At most this many layers are pruned one by one to rank their sensitivity.
SENSITIVITY_LAYERS = 24


@dataclass
class _Candidate:
    """One prune+distill try: the student, its plan and stages, and its accuracy drop."""

    student: SplitModel
    plan: PruningPlan | None
    stages: list[StageReport]
    drop: float
    ok: bool
    size: int = 0  # the backbone's weights in bytes


@dataclass(frozen=True)
class Reference:
    """What each artifact of one student is checked against: the torch features and head."""

    inputs: np.ndarray
    features: np.ndarray
    head: tuple[list[dict[str, Any]], dict[str, np.ndarray]]


@dataclass
class CompressionRun:
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
    seed: int = 0
    metric: Metric = dataclasses.field(default_factory=Metric)
    # Keep the try that lost least when none fits the budget (the report says so).
    best_effort: bool = False

    def score(self, model: SplitModel) -> float:
        """The recipe's metric of a torch model on the test set."""
        return self.metric.score(predict(model, self.test.X), self.test.y)

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
            accuracy=self.score(split),
        )

    def prune_and_distill(self, teacher: SplitModel) -> tuple[SplitModel, PruningPlan | None]:
        """Prune and distill a copy of `teacher`, searching for a setting whose drop fits."""
        recipe = self.recipe
        prune = recipe.prune if recipe.prune is not None and recipe.prune.ratio > 0 else None
        if prune is None and recipe.distill is None:
            return teacher, None
        step = recipe.distill or DistillStep(epochs=0)
        ratio = prune.ratio if prune else 0.0
        tries = [self._try(teacher, ratio, step, step.epochs)]
        if recipe.max_accuracy_drop is not None and not tries[-1].ok:
            # Distilling longer is cheap and keeps the size, so it comes first; then the ratio.
            epochs = step.epochs * 2
            if epochs > 0:
                tries.append(self._try(teacher, ratio, step, epochs))
            if prune is not None and not tries[-1].ok:
                # Prune the layers that lose most when pruned alone less: keep them whole.
                ranked = self._pruning_sensitivity(teacher, prune, ratio)
                for count in (1, 2):
                    if count >= len(ranked) or tries[-1].ok:
                        break
                    keep = [name for name, _ in ranked[:count]]
                    tries.append(self._try(teacher, ratio, step, epochs, keep))
            if prune is not None and not any(c.ok for c in tries):
                budget = SearchBudget(recipe.backoff.tries, recipe.backoff.seconds,
                                      recipe.backoff.resolution)  # fmt: skip

                def fits(candidate_ratio: float) -> bool:
                    tries.append(self._try(teacher, candidate_ratio, step, epochs))
                    return tries[-1].ok

                bisect_ratio(ratio, fits, budget)
        fitting = [c for c in tries if c.ok]
        if fitting:
            # The smallest backbone that fits; of equal ones, the one pruned most.
            chosen = min(
                fitting, key=lambda c: (c.size, -(c.plan.ratio if c.plan is not None else 0.0))
            )
        elif self.best_effort:
            chosen = min(tries, key=lambda c: c.drop)
            lost = describe_change(chosen.drop, None)
            self.miss_budget(f"prune+distill kept the try that lost least ({lost})")
        else:
            raise AccuracyDropError(
                f"pruning and distillation lose more than max_accuracy_drop "
                f"{recipe.max_accuracy_drop} accuracy points after back-off "
                f"({self._tried('prune+distill')}); `best_effort` writes the try that lost least"
            )
        self.report.stages.extend(chosen.stages)
        for attempt, candidate in zip(self._attempts("prune+distill"), tries, strict=True):
            attempt.kept = candidate is chosen
        return chosen.student, chosen.plan

    def _pruning_sensitivity(
        self, teacher: SplitModel, prune: PruneStep, ratio: float
    ) -> list[tuple[str, float]]:
        """Each layer the recipe prunes, with the points lost pruning it alone (no
        distillation), most sensitive first; the ranking lands in the report."""
        plan = plan_pruning(teacher, self.example, dataclasses.replace(prune, ratio=ratio))
        names = [change.name for change in plan.layers]
        drops: list[tuple[str, float]] = []
        for name in names[:SENSITIVITY_LAYERS]:
            others = [n for n in names if n != name]
            alone = copy.deepcopy(teacher)
            step = dataclasses.replace(
                prune, ratio=ratio, ignore_layers=[*prune.ignore_layers, *others]
            )
            apply_pruning(alone, self.example, step, (self.train.X, self.train.y))
            drops.append((name, self.drop(self.score(alone))))
        ranked = sorted(drops, key=lambda item: -item[1])
        self.report.pruning_sensitivity = dict(ranked)
        return ranked

    def _try(
        self,
        teacher: SplitModel,
        ratio: float,
        step: DistillStep,
        epochs: int,
        keep: list[str] | None = None,
    ) -> _Candidate:
        """Prune a copy of `teacher` to `ratio` (the layers in `keep` left whole) and distill it
        `epochs`; log the try."""
        prune = self.recipe.prune
        student = copy.deepcopy(teacher)
        stages: list[StageReport] = []
        plan = None
        if prune is not None and ratio > 0:
            ignore = [*prune.ignore_layers, *(keep or [])]
            pruning = dataclasses.replace(prune, ratio=ratio, ignore_layers=ignore)
            plan = apply_pruning(student, self.example, pruning, (self.train.X, self.train.y))
            stages.append(self.torch_stage("pruned", student))
        if epochs > 0:
            task = self.progress.add_task(f"distilling (ratio {ratio:g})", total=epochs)

            def advance(done: int, _total: int, task: TaskID = task) -> None:
                self.progress.update(task, completed=done)

            distill(
                student, teacher, self.train, step, epochs=epochs, progress=advance, seed=self.seed
            )
            stages.append(self.torch_stage("distilled", student))
        last = stages[-1] if stages else self.torch_stage("student", student)
        drop = self.drop(last.accuracy or 0.0)
        ok = self.allows(drop)
        kept_whole = f" except {', '.join(keep)} (most sensitive)" if keep else ""
        setting = f"prune ratio {ratio:g}{kept_whole}, distill {epochs} epochs"
        self.report.backoff.append(
            BackoffAttempt("prune+distill", setting, drop, kept=ok, accuracy=last.accuracy,
                           size_bytes=last.size_bytes, latency_ms=last.latency_ms)
        )  # fmt: skip
        return _Candidate(student, plan, stages, drop, ok, last.size_bytes)

    def _attempts(self, step: str) -> list[BackoffAttempt]:
        return [a for a in self.report.backoff if a.step == step]

    def _tried(self, step: str) -> str:
        """Every try of a step: its setting and what it measured against the budget."""
        budget = self.recipe.max_accuracy_drop
        return "; ".join(
            f"{a.setting}: {a.reason or describe_change(a.accuracy_drop, budget)}"
            for a in self._attempts(step)
        )

    def miss_budget(self, what: str) -> None:
        """Record that a best-effort stage missed the accuracy budget."""
        self.report.within_budget = False
        self.report.warnings.append(
            f"best effort: {what}, beyond max_accuracy_drop {self.recipe.max_accuracy_drop}"
        )

    def export_all(self, student: SplitModel, work: Path) -> dict[str, Path]:
        """Export, verify and measure every artifact of the recipe into `work`, by file name."""
        from edgefl.compression.export import export_onnx, export_tflite

        backbone = student.backbone.eval()
        one = self.example[:1]
        macs, params = count_macs_params(backbone, one)
        inputs = self.test.X[: self.recipe.verify.samples]
        head = (student.head_layers(), student.head_weights())
        reference = Reference(inputs, predict(backbone, inputs), head)
        files: dict[str, Path] = {}
        fp32_onnx: Path | None = None
        task = self.progress.add_task("exporting artifacts", total=len(self.recipe.artifacts))
        for index, artifact in enumerate(self.recipe.artifacts):
            calibration = self.train.X[: artifact.calibration_samples]
            path = work / artifact.file
            if artifact.format == "onnx":
                # Every ONNX precision starts from one fp32 export, made once.
                fp32_onnx = fp32_onnx or export_onnx(backbone, one, work / "fp32-base.onnx")
                make_onnx(artifact, fp32_onnx, path, calibration, ())
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
        reference: Reference,
        setting: str = "as the recipe says",
        last_try: bool = False,
    ) -> StageReport | None:
        """Verify and measure an artifact; None when ONNX int8 may still back off (not on its
        `last_try`)."""
        from edgefl.compression.verify import verify_artifact
        from edgefl.runtime import load_backbone, measure_latency

        recipe = self.recipe
        can_back_off = artifact.format == "onnx" and artifact.precision == "int8" and not last_try
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
                metric=self.metric,
            )
        except VerificationError as exc:
            if can_back_off and recipe.max_accuracy_drop is not None:
                reason = "failed verification, " + str(exc).split(": ", 1)[-1]
                attempt = BackoffAttempt(name, setting, None, False, reason=reason)
                self.report.backoff.append(attempt)
                return None
            raise
        runner = load_backbone(path, threads=recipe.latency_threads)
        features = runner.run(self.test.X)
        score = self.metric.score(head_forward(*reference.head, features), self.test.y)
        drop = self.drop(score)
        ok = self.allows(drop)
        stage = StageReport(
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
        self.report.backoff.append(
            BackoffAttempt(name, setting, drop, kept=ok, accuracy=score,
                           size_bytes=stage.size_bytes, latency_ms=stage.latency_ms)
        )  # fmt: skip
        if not ok:
            if can_back_off:
                return None
            if self.best_effort:
                self.miss_budget(f"{artifact.file} changes accuracy {describe_change(drop, None)}")
                return stage
            raise AccuracyDropError(
                f"{artifact.file} changes accuracy "
                f"{describe_change(drop, recipe.max_accuracy_drop)} against the original; no "
                f"back-off left for {artifact.format} "
                f"{artifact.precision}; `best_effort` writes it anyway"
            )
        return stage

    def backoff_int8(
        self,
        artifact: ArtifactStep,
        fp32: Path,
        path: Path,
        calibration: np.ndarray,
        reference: Reference,
    ) -> StageReport:
        """Re-quantize with the most sensitive nodes kept in float until the artifact passes."""
        from edgefl.compression.quantize import rank_sensitive_nodes

        ranked = rank_sensitive_nodes(fp32, calibration, limit=max(EXCLUDE_STEPS))
        measured: list[tuple[float, tuple[str, ...]]] = []  # (drop, exclude) that verified
        for count in EXCLUDE_STEPS:
            exclude = tuple(ranked[:count])
            if not exclude:
                break
            make_onnx(artifact, fp32, path, calibration, exclude)
            setting = f"{len(exclude)} sensitive nodes kept in float: {', '.join(exclude)}"
            stage = self.measure(artifact, path, reference, setting)
            if stage is not None:
                return stage
            last = self.report.backoff[-1]
            if last.accuracy_drop is not None:
                measured.append((last.accuracy_drop, exclude))
            if len(exclude) < count:
                break
        if self.best_effort and measured:
            _, exclude = min(measured)
            make_onnx(artifact, fp32, path, calibration, exclude)
            setting = f"best effort: {len(exclude)} sensitive nodes kept in float"
            best = self.measure(artifact, path, reference, setting, last_try=True)
            if best is not None:
                return best
        raise AccuracyDropError(
            f"{artifact.file} stays beyond max_accuracy_drop {self.recipe.max_accuracy_drop} "
            f"or its verification tolerance after back-off ({self._tried('onnx int8')})"
        )


def make_onnx(
    artifact: ArtifactStep,
    fp32: Path,
    path: Path,
    calibration: np.ndarray,
    exclude: tuple[str, ...],
) -> None:
    """Write the ONNX artifact of `artifact.precision` at `path`, made from the fp32 export.

    Args:
        artifact: the recipe's artifact step (its precision picks the conversion).
        fp32: the fp32 ONNX export every precision starts from.
        path: where the artifact goes.
        calibration: model inputs for static int8 calibration.
        exclude: node names static int8 keeps in float (the back-off's sensitive nodes).
    """
    from edgefl.compression.quantize import (
        convert_onnx_fp16,
        quantize_onnx_dynamic,
        quantize_onnx_static,
    )

    if artifact.precision == "fp32":
        path.write_bytes(fp32.read_bytes())
    elif artifact.precision == "int8":
        quantize_onnx_static(
            fp32, path, calibration, per_channel=True, exclude_nodes=exclude,
            activation_type=artifact.activations,
        )  # fmt: skip
    elif artifact.precision == "int8-dynamic":
        quantize_onnx_dynamic(fp32, path)
    else:
        convert_onnx_fp16(fp32, path)
