"""`edgefl tune`: a multi-objective search for the recipe that suits a board.

Optuna's NSGA-II sampler proposes recipes (prune ratio and importance, distillation epochs and
temperature, the artifact's precision, calibration size and, for ONNX, activation type); each
trial is a real `compress` of the model into its own bundle, scored on the evaluation set by the
recipe's metric, its latency measured in the board's runtime (the profile's artifact format and
thread count) and its size on disk. Objectives: accuracy up, latency and size down; the budgets
(accuracy drop, latency, size) are constraints, so infeasible trials still guide the search but
never make the front. The study lives in SQLite, so a second run with the same `--study`
continues it. The first trial of a new study is the base recipe's own setting, the reference the
front is compared against.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgefl.compression.pipeline import CompressRequest, compress
from edgefl.compression.recipe import (
    ArtifactStep,
    DistillStep,
    PruneStep,
    Recipe,
    load_recipe,
    recipe_toml,
)
from edgefl.errors import EdgeflError, InputError
from edgefl.profiles import load_profile

# Precisions tried per artifact format; fp16 is left out: CPUs run it no faster than fp32.
TUNED_PRECISIONS = {"onnx": ("fp32", "int8", "int8-dynamic"), "tflite": ("fp32", "int8")}
CALIBRATION_SIZES = (64, 128, 256)
STUDY_FILE = "study.db"


@dataclass
class TuneRequest:
    """What `edgefl tune` was asked (the CLI flags, as library values)."""

    model: str
    data: str | Path
    out: Path
    recipe: str | Path = "raspberry-pi"
    profile: str | Path = "raspberry-pi"
    artifact_format: str | None = None  # default: the format of the profile's first preference
    threads: int | None = None  # default: the profile's
    trials: int = 20
    timeout: float | None = None
    max_accuracy_drop: float = 1.0
    max_latency_ms: float | None = None
    max_size_kb: float | None = None
    study: str | None = None  # an SQLAlchemy URL (sqlite:///...) or a file; default OUT/study.db
    study_name: str | None = None
    seed: int = 0
    weights: Path | None = None
    head: str | None = None
    eval_data: str | Path | None = None


@dataclass
class TrialResult:
    """One finished trial: its settings, what it measured and where its bundle is."""

    number: int
    params: dict[str, Any]
    accuracy: float
    accuracy_drop: float  # points lost against the original model; negative is a gain
    latency_ms: float
    size_kb: float
    bundle: str
    recipe: dict[str, Any]
    feasible: bool = False
    pareto: bool = False
    baseline: bool = False
    # The latency re-timed after the search beside the other front members and the baseline
    # (None when not re-timed): steadier than one trial's timing on a busy machine.
    retimed_ms: float | None = None


@dataclass
class TuneResult:
    """The study's finished trials, its Pareto front (feasible trials only), the chosen one
    (fastest on the front) and the baseline (the base recipe's setting), if it ran."""

    study: str
    trials: list[TrialResult]
    pareto: list[TrialResult] = field(default_factory=list)
    chosen: TrialResult | None = None
    baseline: TrialResult | None = None
    budgets: dict[str, float | None] = field(default_factory=dict)
    # When no single trial fits but 2-3 that each fit the latency budget do together: their
    # numbers, accuracy (mean of their probabilities), summed latency and size. Proposed only.
    ensemble: dict[str, Any] | None = None


def search_space(trial: Any, base: Recipe, fmt: str, threads: int) -> Recipe:
    """Return the recipe an Optuna trial proposes, built on `base` (verify settings, metric).

    The trial recipe has no `max_accuracy_drop`: the search is its back-off.
    """
    # Rounded: a stepped float can come back as 0.7000000000000001, which recipes would keep.
    ratio = round(trial.suggest_float("prune_ratio", 0.0, 0.8, step=0.05), 4)
    importance = trial.suggest_categorical("importance", ["l1", "l2"])
    epochs = trial.suggest_int("distill_epochs", 0, 24, step=4)
    temperature = trial.suggest_float("temperature", 1.0, 8.0, step=0.5)
    precision = trial.suggest_categorical("precision", list(TUNED_PRECISIONS[fmt]))
    calibration = trial.suggest_categorical("calibration_samples", list(CALIBRATION_SIZES))
    # Only ONNX static int8 has a choice (TFLite int8 is symmetric int8); a study's format is
    # fixed, so its search space is too.
    activations = (
        trial.suggest_categorical("activations", ["uint8", "int8"]) if fmt == "onnx" else "uint8"
    )
    prune_base = base.prune or PruneStep()
    distill_base = base.distill or DistillStep()
    return dataclasses.replace(
        base,
        name=f"{base.name}-tune-{trial.number}",
        description=f"edgefl tune trial {trial.number} from {base.name}",
        prune=dataclasses.replace(prune_base, ratio=ratio, importance=importance)
        if ratio > 0
        else None,
        distill=dataclasses.replace(distill_base, epochs=epochs, temperature=temperature)
        if epochs > 0
        else None,
        artifacts=[ArtifactStep(fmt, precision, calibration, activations)],
        max_accuracy_drop=None,
        latency_threads=threads,
    )


def baseline_params(base: Recipe, fmt: str) -> dict[str, Any]:
    """The search-space point nearest the base recipe's own setting (the first trial)."""
    prune, distill = base.prune, base.distill
    importance = prune.importance if prune is not None else "l2"
    precisions = [a.precision for a in base.artifacts if a.format == fmt]
    precision = precisions[0] if precisions else "fp32"
    calibration = next((a.calibration_samples for a in base.artifacts if a.format == fmt), 256)
    activations = next((a.activations for a in base.artifacts if a.format == fmt), "uint8")
    params: dict[str, Any] = {
        "prune_ratio": min(0.8, round(prune.ratio / 0.05) * 0.05) if prune is not None else 0.0,
        "importance": importance if importance in ("l1", "l2") else "l2",
        "distill_epochs": min(24, round(distill.epochs / 4) * 4) if distill is not None else 0,
        "temperature": min(8.0, max(1.0, round(distill.temperature * 2) / 2))
        if distill is not None
        else 4.0,
        "precision": precision if precision in TUNED_PRECISIONS[fmt] else "fp32",
        "calibration_samples": min(CALIBRATION_SIZES, key=lambda n: abs(n - calibration)),
    }
    if fmt == "onnx":
        params["activations"] = activations
    return params


def pareto_front(trials: list[TrialResult]) -> list[TrialResult]:
    """Return the feasible trials no other feasible trial dominates (accuracy up, latency and
    size down), in order of latency."""
    feasible = [t for t in trials if t.feasible]

    def dominates(a: TrialResult, b: TrialResult) -> bool:
        no_worse = (
            a.accuracy >= b.accuracy and a.latency_ms <= b.latency_ms and a.size_kb <= b.size_kb
        )
        better = a.accuracy > b.accuracy or a.latency_ms < b.latency_ms or a.size_kb < b.size_kb
        return no_worse and better

    front = [t for t in feasible if not any(dominates(o, t) for o in feasible if o is not t)]
    return sorted(front, key=lambda t: (t.latency_ms, -t.accuracy, t.size_kb))


def study_url(study: str | None, out: Path) -> str:
    """Return the storage URL of a study: a URL as given, a file as sqlite, default OUT/study.db."""
    if study is not None and "://" in study:
        return study
    path = Path(study) if study is not None else out / STUDY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path.resolve()}"


def tune(request: TuneRequest, on_trial: Callable[[TrialResult], None] | None = None) -> TuneResult:
    """Search recipes for the model and board, then write the chosen recipe and bundle.

    Writes under `request.out`: `trials/N/` (each trial's bundle), `study.db` (by default),
    `pareto.json` and `pareto.png` (see `edgefl.compression.tune_output`), and for the chosen
    trial `recipe.toml` and `bundle/`.

    Args:
        request: model, data, budgets, trials, timeout, study.
        on_trial: called with each trial that finished in this run.

    Returns:
        Every finished trial of the study (earlier runs' included), the front and the choice.

    Raises:
        InputError: bad budgets or format; RecipeError, ProfileError: unknown recipe or profile.
    """
    import optuna

    from edgefl.compression.tune_output import write_outputs

    base = load_recipe(request.recipe)
    profile = load_profile(request.profile)
    fmt = request.artifact_format or profile.prefer[0][0]
    if fmt not in TUNED_PRECISIONS:
        raise InputError(f"`format` must be one of {', '.join(TUNED_PRECISIONS)}, not {fmt!r}")
    if request.trials < 1:
        raise InputError(f"`trials` must be at least 1, not {request.trials}")
    for name, value in (
        ("max_accuracy_drop", request.max_accuracy_drop),
        ("max_latency_ms", request.max_latency_ms),
        ("max_size_kb", request.max_size_kb),
    ):
        if value is not None and not value >= 0:
            raise InputError(f"`{name}` must be >= 0, not {value}")
    threads = request.threads or profile.threads
    out = Path(request.out)
    (out / "trials").mkdir(parents=True, exist_ok=True)
    budgets = {
        "max_accuracy_drop": request.max_accuracy_drop,
        "max_latency_ms": request.max_latency_ms,
        "max_size_kb": request.max_size_kb,
    }

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = study_url(request.study, out)
    study = optuna.create_study(
        storage=url,
        study_name=request.study_name or f"edgefl-tune-{request.model}-{fmt}",
        load_if_exists=True,
        directions=["maximize", "minimize", "minimize"],
        sampler=optuna.samplers.NSGAIISampler(seed=request.seed, population_size=8),
    )
    if not study.trials:
        study.enqueue_trial(baseline_params(base, fmt), user_attrs={"baseline": True})
    scored: dict[str, Any] = {}  # the evaluation set and the original's score, from any trial

    def objective(trial: Any) -> tuple[float, float, float]:
        recipe = search_space(trial, base, fmt, threads)
        bundle = (out / "trials" / str(trial.number)).resolve()
        result = compress(
            CompressRequest(
                model=request.model, recipe=recipe, data=request.data, out=bundle, force=True,
                allow_chance=True, weights=request.weights, head=request.head,
                eval_data=request.eval_data, seed=request.seed,
            )
        )  # fmt: skip
        assert result.report is not None
        original, artifact = result.report.stages[0], result.report.stages[-1]
        scored.update(test=result.test, original=float(original.accuracy or 0.0))
        accuracy = float(artifact.accuracy or 0.0)
        drop = round(100.0 * (float(original.accuracy or 0.0) - accuracy), 3)
        latency = float(artifact.latency_ms or 0.0)
        size_kb = artifact.size_bytes / 1000.0
        # A constraint <= 0 is met (Optuna's convention); NSGA-II ranks feasible trials first.
        limits = {"accuracy_drop": drop - request.max_accuracy_drop}
        if request.max_latency_ms is not None:
            limits["latency_ms"] = latency - request.max_latency_ms
        if request.max_size_kb is not None:
            limits["size_kb"] = size_kb - request.max_size_kb
        for key, value in limits.items():
            trial.set_constraint(key, value)
        trial.set_user_attr("constraints", list(limits.values()))
        trial.set_user_attr("accuracy_drop", drop)
        trial.set_user_attr("bundle", str(bundle))
        trial.set_user_attr("recipe", recipe.to_dict() | {"path": ""})
        return accuracy, latency, size_kb

    def report_trial(_study: Any, frozen: Any) -> None:
        if on_trial is not None and frozen.values is not None:
            on_trial(_trial_result(frozen))

    study.optimize(
        objective,
        n_trials=request.trials,
        timeout=request.timeout,
        # One trial failing (an exporter refusing a pruned graph) ends that trial, not the search.
        catch=(EdgeflError, RuntimeError, ValueError),
        callbacks=[report_trial],
    )
    trials = [_trial_result(t) for t in study.trials if t.values is not None]
    front = pareto_front(trials)
    for trial_result in front:
        trial_result.pareto = True
    baseline = next((t for t in trials if t.baseline), None)
    if scored and front:
        _retime([*front, *([baseline] if baseline is not None else [])], scored, threads)
    chosen = min(front, key=_timing) if front else None
    result = TuneResult(url, trials, front, chosen, baseline, budgets)
    if chosen is None and request.max_latency_ms is not None and scored:
        result.ensemble = _propose_ensemble(trials, request, base, threads, scored)
    _drop_unusable_bundles(result, request)
    if chosen is not None:
        recipe = dataclasses.replace(
            load_recipe(request.recipe), **_recipe_fields(chosen.recipe, request)
        )
        (out / "recipe.toml").write_text(recipe_toml(recipe))
        target = out / "bundle"
        staging = out / ".bundle.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(chosen.bundle, staging)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    write_outputs(result, out)
    return result


def _propose_ensemble(
    trials: list[TrialResult],
    request: TuneRequest,
    base: Recipe,
    threads: int,
    scored: dict[str, Any],
) -> dict[str, Any] | None:
    """The best ensemble of trials that each fit the latency and size budgets, if it meets the
    accuracy budget together (measured, as a board would run it, on the evaluation set)."""
    from edgefl.compression.ensemble import Member, best_ensemble, bundle_probabilities

    test = scored["test"]
    fits = [
        t
        for t in trials
        if Path(t.bundle).is_dir()
        and _within(t.latency_ms, request.max_latency_ms)
        and _within(t.size_kb, request.max_size_kb)
    ]
    fits = sorted(fits, key=lambda t: -t.accuracy)[:8]  # at most 56 triples to score
    members = [
        Member(t.number, bundle_probabilities(t.bundle, test.X, threads), t.latency_ms, t.size_kb)
        for t in fits
    ]
    best = best_ensemble(
        members, test.y, base.accuracy_metric, request.max_latency_ms, request.max_size_kb
    )
    if best is None:
        return None
    drop = round(100.0 * (scored["original"] - best.accuracy), 3)
    if drop > request.max_accuracy_drop:
        return None
    return {
        "trials": list(best.members),
        "accuracy": best.accuracy,
        "accuracy_drop": drop,
        "latency_ms": best.latency_ms,
        "size_kb": best.size_kb,
    }


def _timing(trial: TrialResult) -> tuple[float, float]:
    """Sort key: the re-timed latency when there is one, then the higher accuracy."""
    latency = trial.retimed_ms if trial.retimed_ms is not None else trial.latency_ms
    return latency, -trial.accuracy


def _retime(
    trials: list[TrialResult], scored: dict[str, Any], threads: int, passes: int = 5
) -> None:
    """Time the trials' backbones again on one sample and set `retimed_ms`: the median of
    `passes` rounds in which each backbone runs a block of 60 calls after 10 warm-up calls.

    Blocks, not single calls taken in turn: a runtime's thread pool keeps spinning a while after
    each call, so alternating call by call between several multi-threaded interpreters makes
    them compete for the cores (measured: 0.07-0.21 ms instead of 0.011 for the same model).
    The rounds spread each backbone's timing over the whole measurement, so a burst of load
    from another process hits every backbone alike.
    """
    import statistics
    import time

    from edgefl.bundle import load_bundle
    from edgefl.runtime import load_backbone

    sample = scored["test"].X[:1]
    runners = {}
    for trial in trials:
        if Path(trial.bundle).is_dir() and trial.number not in runners:
            bundle = load_bundle(trial.bundle)
            path = bundle.file(bundle.manifest.backbones()[0])
            runners[trial.number] = load_backbone(path, threads=threads)
    times: dict[int, list[float]] = {number: [] for number in runners}
    for _ in range(passes):
        for number, runner in runners.items():
            for _ in range(10):
                runner.run(sample)
            for _ in range(60):
                start = time.perf_counter()
                runner.run(sample)
                times[number].append(time.perf_counter() - start)
    for trial in trials:
        if trial.number in times:
            trial.retimed_ms = round(1000.0 * statistics.median(times[trial.number]), 4)


def _within(value: float, budget: float | None) -> bool:
    return budget is None or value <= budget


def _drop_unusable_bundles(result: TuneResult, request: TuneRequest) -> None:
    """Delete trial bundles that can never be chosen: dominated ones (dominance is permanent)
    that cannot join an ensemble either (over the latency budget, or none is set)."""
    keep = {t.number for t in result.pareto}
    keep |= {result.baseline.number} if result.baseline is not None else set()
    keep |= set(result.ensemble["trials"]) if result.ensemble is not None else set()
    for trial in result.trials:
        if trial.number in keep or not trial.bundle:
            continue
        if request.max_latency_ms is None or trial.latency_ms > request.max_latency_ms:
            shutil.rmtree(trial.bundle, ignore_errors=True)


def _recipe_fields(data: dict[str, Any], request: TuneRequest) -> dict[str, Any]:
    """The chosen trial's recipe fields, as dataclasses, with the budget back as the drop."""
    prune = data.get("prune")
    distill = data.get("distill")
    return {
        "description": f"found by edgefl tune for {request.model} on {request.profile}",
        "prune": PruneStep(**prune) if prune else None,
        "distill": DistillStep(**distill) if distill else None,
        "artifacts": [ArtifactStep(**a) for a in data["artifacts"]],
        "max_accuracy_drop": request.max_accuracy_drop,
        "latency_threads": data["latency_threads"],
    }


def _trial_result(frozen: Any) -> TrialResult:
    accuracy, latency, size_kb = frozen.values
    limits = frozen.user_attrs.get("constraints", [1.0])
    return TrialResult(
        number=frozen.number,
        params=dict(frozen.params),
        accuracy=float(accuracy),
        accuracy_drop=float(frozen.user_attrs.get("accuracy_drop", 0.0)),
        latency_ms=float(latency),
        size_kb=float(size_kb),
        bundle=str(frozen.user_attrs.get("bundle", "")),
        recipe=dict(frozen.user_attrs.get("recipe", {})),
        feasible=all(value <= 0 for value in limits),
        baseline=bool(frozen.user_attrs.get("baseline", False)),
    )
