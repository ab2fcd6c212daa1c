"""Compression recipes: TOML files naming the steps and their settings, strictly validated.

A recipe is found by name in the shipped `compress/` directory or given as a path. Every key is
checked: a misspelt key is an error naming the key and the file, never silently ignored.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import tomllib

from edgefl.compression.metric import Metric
from edgefl.errors import RecipeError
from edgefl.plugins import is_plugin_spec, load_attribute
from edgefl.resources import shipped_dir

IMPORTANCES = ("l1", "l2", "taylor", "random")
FORMATS = ("onnx", "tflite")
PRECISIONS = {"onnx": ("fp32", "fp16", "int8", "int8-dynamic"), "tflite": ("fp32", "int8")}
ACTIVATIONS = ("uint8", "int8")
DEFAULT_TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2, "int8": 0.5, "int8-dynamic": 0.5}


@dataclass
class PruneStep:
    """Structured pruning: remove `ratio` of the channels of each prunable layer."""

    ratio: float = 0.5
    # A built-in name (IMPORTANCES), `package.module:factory`, or (from Python) a
    # `tp.importance.Importance` object; see `edgefl.compression.prune.make_importance`.
    importance: Any = "l2"
    iterative_steps: int = 1
    ignore_layers: list[str] = field(default_factory=list)
    round_to: int | None = None
    # False also prunes the channels that feed the head (smaller backbone, smaller feature size).
    keep_features: bool = True


@dataclass
class DistillStep:
    """Knowledge distillation from the unpruned model (KL at temperature T, times T², mixed
    with cross-entropy: loss = alpha * KD + (1 - alpha) * CE)."""

    temperature: float = 4.0
    alpha: float = 0.7
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 64


@dataclass
class BackoffStep:
    """How long the back-off searches the prune ratio when `max_accuracy_drop` is missed: at most
    `tries` candidates, `seconds` of wall time (None: no limit), no finer than `resolution`."""

    tries: int = 6
    seconds: float | None = None
    resolution: float = 0.05


@dataclass
class ArtifactStep:
    """One backbone artifact to export: format, precision and calibration set size (int8).

    `activations` is the type of ONNX static int8 activations: "uint8" (asymmetric, the default:
    fast on x86 without VNNI) or "int8" (symmetric); TFLite int8 is always symmetric int8.
    """

    format: str
    precision: str = "fp32"
    calibration_samples: int = 256
    activations: str = "uint8"

    @property
    def file(self) -> str:
        """The artifact's file name in the bundle, e.g. `backbone-int8.onnx`."""
        return f"backbone-{self.precision}.{self.format}"


@dataclass
class VerifyStep:
    """How close each artifact must stay to PyTorch: per precision, the max feature error relative
    to the features' max magnitude (see `edgefl.compression.verify`), and top-1 agreement of
    head(features) for classifiers, on the first `samples` held-out samples."""

    tolerance: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_TOLERANCE))
    min_top1_agreement: float = 0.95
    samples: int = 256


@dataclass
class Recipe:
    """A parsed recipe. `max_accuracy_drop` is in accuracy points (1.0 = one percent) of
    `metric` ("top-1", "top-K" or "within-N", see `edgefl.compression.metric`)."""

    name: str
    description: str
    path: Path
    prune: PruneStep | None = None
    distill: DistillStep | None = None
    artifacts: list[ArtifactStep] = field(default_factory=list)
    verify: VerifyStep = field(default_factory=VerifyStep)
    backoff: BackoffStep = field(default_factory=BackoffStep)
    max_accuracy_drop: float | None = None
    latency_threads: int = 1
    head_epochs: int = 20
    metric: str = "top-1"

    def tolerance(self, precision: str) -> float:
        """Return the verification tolerance of a precision."""
        return float(self.verify.tolerance.get(precision, DEFAULT_TOLERANCE[precision]))

    @property
    def accuracy_metric(self) -> Metric:
        """The parsed `metric` (validated when the recipe loaded)."""
        return Metric.parse(self.metric)

    def to_dict(self) -> dict[str, Any]:
        """Return the recipe as JSON-able data (for the manifest and the report)."""
        data = asdict(self)
        data["path"] = str(self.path)
        if self.prune is not None and not isinstance(self.prune.importance, str):
            data["prune"]["importance"] = type(self.prune.importance).__name__
        return data


def recipe_toml(recipe: Recipe) -> str:
    """Return a recipe as TOML text that `load_recipe` reads back to the same recipe.

    Raises:
        RecipeError: the pruning importance is an object, which TOML cannot name.
    """
    if recipe.prune is not None and not isinstance(recipe.prune.importance, str):
        raise RecipeError("a recipe with an importance object cannot be written as TOML")
    data = recipe.to_dict()
    lines = [f"description = {_toml_value(recipe.description)}"]
    for key in ("max_accuracy_drop", "latency_threads", "head_epochs", "metric"):
        if data[key] is not None:
            lines.append(f"{key} = {_toml_value(data[key])}")
    for section in ("prune", "distill", "verify", "backoff"):
        if data[section] is not None:
            lines += ["", f"[{section}]", *_toml_table(data[section])]
    for artifact in data["artifacts"]:
        lines += ["", "[[artifacts]]", *_toml_table(artifact)]
    return "\n".join(lines) + "\n"


def _toml_table(table: dict[str, Any]) -> list[str]:
    return [f"{key} = {_toml_value(value)}" for key, value in table.items() if value is not None]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    # JSON's strings and numbers are TOML's (a float keeps its point: 1.0, not 1).
    return json.dumps(value)


def available_recipes() -> dict[str, Path]:
    """Return the shipped recipes by name."""
    try:
        root = shipped_dir("compress")
    except FileNotFoundError:
        return {}
    return {path.stem: path for path in sorted(root.glob("*.toml"))}


def load_recipe(name_or_path: str | Path) -> Recipe:
    """Load and validate a recipe.

    Args:
        name_or_path: a shipped recipe name (`raspberry-pi`) or a path to a `.toml` file.

    Returns:
        The recipe.

    Raises:
        RecipeError: the recipe is unknown (the message lists the shipped ones), not valid
            TOML, or has an unknown key or a bad value (the message names the key and file).
    """
    shipped = available_recipes()
    text = str(name_or_path)
    if text in shipped:
        path = shipped[text]
    elif text.endswith(".toml") or Path(text).is_file():
        path = Path(text)
        if not path.is_file():
            raise RecipeError(f"recipe file {path} not found")
    else:
        names = ", ".join(shipped) or "none"
        raise RecipeError(f"unknown recipe {text!r}; available recipes: {names}")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise RecipeError(f"recipe {path} is not valid TOML: {exc}") from exc
    return parse_recipe(data, path)


def parse_recipe(data: dict[str, Any], path: Path) -> Recipe:
    """Build a recipe from parsed TOML, validating every key and value.

    Raises:
        RecipeError: an unknown key or a bad value; the message names the key and `path`.
    """
    top = {f.name for f in fields(Recipe)} - {"name", "path"}
    _check_keys(data, top, "", path)
    prune = _section(PruneStep, data.get("prune"), "prune", path)
    distill = _section(DistillStep, data.get("distill"), "distill", path)
    raw_artifacts = data.get("artifacts", [])
    if not isinstance(raw_artifacts, list):
        raise RecipeError(f"recipe {path}: 'artifacts' must be an array of tables ([[artifacts]])")
    artifacts = [
        _section(ArtifactStep, item, f"artifacts[{i}]", path)
        for i, item in enumerate(raw_artifacts)
    ]
    verify = _section(VerifyStep, data.get("verify", {}), "verify", path)
    backoff = _section(BackoffStep, data.get("backoff", {}), "backoff", path)
    recipe = Recipe(
        name=path.stem,
        description=str(data.get("description", "")),
        path=path,
        prune=prune,
        distill=distill,
        artifacts=[a for a in artifacts if a is not None],
        verify=verify or VerifyStep(),
        backoff=backoff or BackoffStep(),
        max_accuracy_drop=_optional_number(data, "max_accuracy_drop", path),
        # Checked in _validate: a cast here would turn 0 or 1.5 into a silent default.
        latency_threads=data.get("latency_threads", 1),
        head_epochs=data.get("head_epochs", 20),
        metric=data.get("metric", "top-1"),
    )
    _validate(recipe, path)
    return recipe


def _check_keys(data: dict[str, Any], allowed: set[str], section: str, path: Path) -> None:
    for key in data:
        if key not in allowed:
            where = f"{section}.{key}" if section else key
            raise RecipeError(
                f"recipe {path}: unknown key {where!r} (allowed: {', '.join(sorted(allowed))})"
            )


def _section(cls: Any, raw: Any, section: str, path: Path) -> Any:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {path}: [{section}] must be a table")
    allowed = {f.name for f in fields(cls)}
    _check_keys(raw, allowed, section, path)
    try:
        return cls(**raw)
    except TypeError as exc:
        raise RecipeError(f"recipe {path}: [{section}] {exc}") from exc


def _optional_number(data: dict[str, Any], key: str, path: Path) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RecipeError(f"recipe {path}: {key!r} must be a number, not {value!r}")
    return value


def _validate(recipe: Recipe, path: Path) -> None:
    def fail(key: str, message: str) -> None:
        raise RecipeError(f"recipe {path}: {key!r} {message}")

    if recipe.prune is not None:
        p = recipe.prune
        if not isinstance(p.ratio, int | float) or not 0.0 <= p.ratio < 1.0:
            fail("prune.ratio", f"must be in [0, 1), got {p.ratio!r}")
        if isinstance(p.importance, str) and is_plugin_spec(p.importance):
            try:  # import now: a broken module fails when the recipe loads, not mid-run
                load_attribute(p.importance, "pruning importance", RecipeError)
            except RecipeError as exc:
                fail("prune.importance", str(exc))
        elif isinstance(p.importance, str) and p.importance not in IMPORTANCES:
            fail(
                "prune.importance",
                f"must be one of {', '.join(IMPORTANCES)} or package.module:factory, "
                f"got {p.importance!r}",
            )
        if not _is_count(p.iterative_steps):
            fail("prune.iterative_steps", f"must be an integer >= 1, got {p.iterative_steps!r}")
        if not isinstance(p.ignore_layers, list) or not all(
            isinstance(n, str) for n in p.ignore_layers
        ):
            fail("prune.ignore_layers", "must be a list of module names")
        if not isinstance(p.keep_features, bool):
            fail("prune.keep_features", f"must be true or false, got {p.keep_features!r}")
        if p.round_to is not None and not _is_count(p.round_to):
            fail("prune.round_to", f"must be an integer >= 1, got {p.round_to!r}")
    if recipe.distill is not None:
        d = recipe.distill
        if not isinstance(d.temperature, int | float) or d.temperature <= 0:
            fail("distill.temperature", f"must be > 0, got {d.temperature!r}")
        if not isinstance(d.alpha, int | float) or not 0.0 <= d.alpha <= 1.0:
            fail("distill.alpha", f"must be in [0, 1], got {d.alpha!r}")
        if not isinstance(d.epochs, int) or d.epochs < 0:
            fail("distill.epochs", f"must be an integer >= 0, got {d.epochs!r}")
        if not isinstance(d.lr, int | float) or d.lr <= 0:
            fail("distill.lr", f"must be > 0, got {d.lr!r}")
        if not _is_count(d.batch_size):
            fail("distill.batch_size", f"must be an integer >= 1, got {d.batch_size!r}")
    if not recipe.artifacts:
        fail("artifacts", "must list at least one artifact ([[artifacts]] format = ...)")
    seen: set[str] = set()
    for i, artifact in enumerate(recipe.artifacts):
        key = f"artifacts[{i}]"
        if artifact.format not in FORMATS:
            fail(f"{key}.format", f"must be one of {', '.join(FORMATS)}, got {artifact.format!r}")
        allowed = PRECISIONS[artifact.format]
        if artifact.precision not in allowed:
            fail(
                f"{key}.precision",
                f"must be one of {', '.join(allowed)} for {artifact.format}, "
                f"got {artifact.precision!r}",
            )
        if not _is_count(artifact.calibration_samples):
            fail(f"{key}.calibration_samples", "must be an integer >= 1")
        if artifact.activations not in ACTIVATIONS:
            fail(
                f"{key}.activations",
                f"must be one of {', '.join(ACTIVATIONS)}, got {artifact.activations!r}",
            )
        if artifact.file in seen:
            fail(key, f"repeats {artifact.format}/{artifact.precision}")
        seen.add(artifact.file)
    if not isinstance(recipe.verify.tolerance, dict):
        fail("verify.tolerance", "must be a table of precision = number, e.g. { int8 = 0.5 }")
    for precision, value in recipe.verify.tolerance.items():
        if precision not in DEFAULT_TOLERANCE:
            fail(
                f"verify.tolerance.{precision}",
                f"is not a precision ({', '.join(DEFAULT_TOLERANCE)})",
            )
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            fail(f"verify.tolerance.{precision}", f"must be a number >= 0, got {value!r}")
    top1 = recipe.verify.min_top1_agreement
    if isinstance(top1, bool) or not isinstance(top1, int | float) or not 0.0 <= top1 <= 1.0:
        fail("verify.min_top1_agreement", f"must be in [0, 1], got {top1!r}")
    # Zero samples would make every artifact "agree" without running it.
    if not _is_count(recipe.verify.samples):
        fail("verify.samples", f"must be an integer >= 1, got {recipe.verify.samples!r}")
    if recipe.max_accuracy_drop is not None and recipe.max_accuracy_drop < 0:
        fail("max_accuracy_drop", "must be >= 0 (accuracy points)")
    b = recipe.backoff
    if not _is_count(b.tries):
        fail("backoff.tries", f"must be an integer >= 1, got {b.tries!r}")
    if b.seconds is not None and (not isinstance(b.seconds, int | float) or b.seconds <= 0):
        fail("backoff.seconds", f"must be > 0, got {b.seconds!r}")
    if not isinstance(b.resolution, int | float) or not 0 < b.resolution < 1:
        fail("backoff.resolution", f"must be in (0, 1), got {b.resolution!r}")
    try:
        Metric.parse(recipe.metric)
    except ValueError as exc:
        fail("metric", str(exc).removeprefix("metric "))
    for key in ("latency_threads", "head_epochs"):
        if not _is_count(getattr(recipe, key)):
            fail(key, f"must be an integer >= 1, got {getattr(recipe, key)!r}")


def _is_count(value: Any) -> bool:
    """Whether `value` is an integer >= 1 (TOML booleans are not counts)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
