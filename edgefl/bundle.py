"""The model bundle: a directory with a manifest, backbone artifacts and heads, written atomically.

Layout of a bundle directory:

    manifest.json          Manifest (below), schema-versioned
    backbone-*.onnx        backbone artifacts, one file each (see Manifest.artifacts)
    backbone-*.tflite
    head.safetensors       the head of the default task; `head-{task}.safetensors` for others
    report.json            what compression did (free-form, written by the pipeline)

Every file a board loads is listed in `Manifest.artifacts` with its size and SHA-256, so a
signature over the manifest covers every byte a board will run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as load_safetensors_bytes
from safetensors.numpy import save as save_safetensors_bytes

from edgefl.atomic import replacing_dir
from edgefl.errors import BundleError

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
# On a board that downloaded only some of a release's artifacts: the release's full manifest text,
# as signed. Its digest is the bundle's identity (what the aggregator federates), not the digest of
# the board's own manifest.json, which lists only the files present.
FULL_MANIFEST_FILE = "full-manifest.json"
REPORT_FILE = "report.json"
DEFAULT_TASK = "default"


def sha256_file(path: Path) -> str:
    """Return the hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Preprocess:
    """How a board turns a raw sample into the backbone's input; applied identically everywhere.

    The order is: decode image (ImageFolder data) -> grayscale if `grayscale` -> resize to
    `resize` (height, width) -> to float32 and multiply by `scale` -> subtract `mean`, divide by
    `std` (per channel) -> layout `layout`.
    """

    scale: float = 1.0
    mean: list[float] | None = None
    std: list[float] | None = None
    resize: list[int] | None = None
    grayscale: bool = False
    layout: str = "NCHW"


@dataclass
class InputSpec:
    """The backbone's input: shape without the batch dimension, dtype and preprocessing."""

    shape: list[int]
    dtype: str = "float32"
    preprocess: Preprocess = field(default_factory=Preprocess)


@dataclass
class Artifact:
    """One file of the bundle, with what it is and its integrity data.

    `role` is "backbone" or "head"; `format` is "onnx", "tflite" or "safetensors";
    `precision` is "fp32", "fp16", "int8" or "int8-dynamic".
    """

    file: str
    role: str
    format: str
    precision: str
    size: int = 0
    sha256: str = ""
    task: str | None = None


@dataclass
class HeadSpec:
    """A head: its layers, in order, the labels of its outputs, and its output operations.

    Layers are dicts: `{"kind": "linear", "in": 64, "out": 10}` or `{"kind": "relu"}`.
    Parameters are named like a torch `nn.Sequential`: `"{index}.weight"` (out, in) and
    `"{index}.bias"` (out,), where index is the layer's position in `layers`.
    `outputs` are the element-wise operations the model applies after the last layer, in order:
    `{"op": "sigmoid"}`, `"tanh"`, `"softmax"`, `"log_softmax"` (over the outputs of a sample) or
    `{"op": "affine", "scale": s, "shift": b}` (x·s + b, s > 0); see `edgefl.head`. They have no
    parameters and keep the order of the outputs, so training and argmax use the logits. A
    manifest without them (older ones) has none; when empty the field is not written, so such a
    manifest's bytes and digest are what they were.
    """

    layers: list[dict[str, Any]]
    labels: list[str]
    file: str = "head.safetensors"
    outputs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def in_features(self) -> int:
        """The feature size the head takes (the first linear layer's input size)."""
        first = next(layer for layer in self.layers if layer["kind"] == "linear")
        return int(first["in"])

    @property
    def num_outputs(self) -> int:
        """The number of outputs (the last linear layer's output size)."""
        last = [layer for layer in self.layers if layer["kind"] == "linear"][-1]
        return int(last["out"])


@dataclass
class Manifest:
    """What a bundle holds; `version` increases with every bundle a fleet receives."""

    name: str
    version: int
    input: InputSpec
    feature_size: int
    artifacts: list[Artifact]
    heads: dict[str, HeadSpec]
    recipe: str = ""
    source_model_sha256: str = ""
    created: str = ""
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Return the manifest as plain JSON-able data."""
        data = asdict(self)
        for head in data["heads"].values():
            if not head["outputs"]:
                del head["outputs"]  # a head without output operations reads as before
        return data

    def to_json(self) -> str:
        """Return the manifest as canonical JSON (sorted keys), the bytes that get signed."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        """Build a manifest from parsed JSON.

        Fields this edgefl does not know are ignored (a newer `compress` may add some; a board
        must still run the bundle); only a newer schema version is refused.

        Raises:
            BundleError: a required field is missing or the schema version is newer.
        """
        try:
            schema = int(data.get("schema_version", 0))
            if not 1 <= schema <= SCHEMA_VERSION:
                raise BundleError(
                    f"manifest schema version {schema} is not supported (this edgefl reads "
                    f"1 to {SCHEMA_VERSION})"
                )
            spec = _known(InputSpec, data["input"])
            spec["preprocess"] = Preprocess(**_known(Preprocess, spec.get("preprocess", {})))
            return cls(
                name=str(data["name"]),
                version=int(data["version"]),
                input=InputSpec(**spec),
                feature_size=int(data["feature_size"]),
                artifacts=[Artifact(**_known(Artifact, a)) for a in data["artifacts"]],
                heads={task: HeadSpec(**_known(HeadSpec, h)) for task, h in data["heads"].items()},
                recipe=str(data.get("recipe", "")),
                source_model_sha256=str(data.get("source_model_sha256", "")),
                created=str(data.get("created", "")),
                schema_version=schema,
                extra=dict(data.get("extra", {})),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BundleError(f"manifest is malformed: {exc!r}") from exc

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        """Parse a manifest from JSON text.

        Raises:
            BundleError: the text is not JSON or not a valid manifest.
        """
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BundleError(f"manifest is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise BundleError("manifest is not a JSON object")
        return cls.from_dict(data)

    def backbones(self) -> list[Artifact]:
        """Return the backbone artifacts."""
        return [a for a in self.artifacts if a.role == "backbone"]

    def select_backbone(self, preferences: list[tuple[str, str]] | None = None) -> Artifact:
        """Pick the backbone artifact a board should run.

        Args:
            preferences: (format, precision) pairs in order of preference; "*" matches any.
                None takes the first backbone listed.

        Raises:
            BundleError: the bundle has no backbone matching any preference.
        """
        backbones = self.backbones()
        if not backbones:
            raise BundleError("bundle has no backbone artifact")
        for fmt, precision in preferences or [("*", "*")]:
            for artifact in backbones:
                if fmt in ("*", artifact.format) and precision in ("*", artifact.precision):
                    return artifact
        offered = ", ".join(f"{a.format}/{a.precision}" for a in backbones)
        raise BundleError(f"no backbone matches {preferences}; the bundle has {offered}")


def encode_head(weights: Mapping[str, np.ndarray]) -> bytes:
    """Serialize head weights to safetensors bytes (float32, contiguous)."""
    arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in weights.items()}
    return save_safetensors_bytes(arrays)


def decode_head(data: bytes) -> dict[str, np.ndarray]:
    """Parse safetensors bytes into head weights.

    Raises:
        BundleError: the bytes are not a valid safetensors file.
    """
    try:
        return dict(load_safetensors_bytes(data))
    except Exception as exc:  # safetensors raises its own SafetensorError and others
        raise BundleError(f"head weights are not valid safetensors: {exc}") from exc


def _known(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    """Return the entries of `data` that are fields of the dataclass `cls` (a tolerant reader)."""
    names = {f.name for f in fields(cls)}
    return {key: value for key, value in dict(data).items() if key in names}


def canonical_manifest_json(manifest_json: str | bytes) -> str:
    """Return a manifest's canonical JSON text (sorted keys, no spaces), every field kept,
    known to this edgefl or not; for an edgefl-written manifest it is `Manifest.to_json()`.

    Raises:
        BundleError: not a JSON object.
    """
    try:
        data = json.loads(manifest_json)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"manifest is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BundleError("manifest is not a JSON object")
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def manifest_digest(manifest_json: str | bytes) -> str:
    """Return a bundle's identity: the SHA-256 (hex) of its manifest's canonical JSON text, the
    text `Manifest.to_json()` gives and a release carries (docs/protocol.md)."""
    data = manifest_json.encode() if isinstance(manifest_json, str) else manifest_json
    return hashlib.sha256(data).hexdigest()


@dataclass
class ModelBundle:
    """A bundle on disk: its directory, parsed manifest and identity.

    `digest` names the bundle a board runs and a round federates (`manifest_digest`): two
    bundles with the same version number but other artifacts or heads have other digests. A
    board that received only some of a release's artifacts keeps the digest of the release's
    full manifest.
    """

    path: Path
    manifest: Manifest
    digest: str = ""

    def __post_init__(self) -> None:
        if not self.digest:
            self.digest = manifest_digest(self.manifest.to_json())

    def file(self, artifact: Artifact) -> Path:
        """Return the path of an artifact's file."""
        return self.path / artifact.file

    def head_spec(self, task: str = DEFAULT_TASK) -> HeadSpec:
        """Return the head spec of a task.

        Raises:
            BundleError: the bundle has no head for this task.
        """
        try:
            return self.manifest.heads[task]
        except KeyError:
            tasks = ", ".join(sorted(self.manifest.heads))
            raise BundleError(f"bundle has no head for task {task!r} (tasks: {tasks})") from None

    def head_weights(self, task: str = DEFAULT_TASK) -> dict[str, np.ndarray]:
        """Load the head weights of a task.

        Raises:
            BundleError: the bundle has no head for this task, or its file is not safetensors.
            OSError: the head file cannot be read.
        """
        return decode_head((self.path / self.head_spec(task).file).read_bytes())

    def report(self) -> dict[str, Any]:
        """Return report.json, or an empty dict when the bundle has none."""
        path = self.path / REPORT_FILE
        return json.loads(path.read_text()) if path.exists() else {}

    def verify(self, artifacts: list[Artifact] | None = None) -> None:
        """Check that artifact files exist and match their size and SHA-256.

        Args:
            artifacts: which to check; None checks all.

        Raises:
            BundleError: a file is missing or does not match.
        """
        for artifact in self.manifest.artifacts if artifacts is None else artifacts:
            path = self.file(artifact)
            if not path.is_file():
                raise BundleError(f"bundle file {artifact.file} is missing in {self.path}")
            if path.stat().st_size != artifact.size or sha256_file(path) != artifact.sha256:
                raise BundleError(f"bundle file {artifact.file} does not match its SHA-256")


def _full_manifest_digest(root: Path, manifest: Manifest) -> str:
    """Return the digest of the full manifest a partial bundle came from ("" when there is none).

    Raises:
        BundleError: the full manifest is not one this bundle's files were taken from.
    """
    path = root / FULL_MANIFEST_FILE
    if not path.is_file():
        return ""
    text = path.read_bytes()
    full = Manifest.from_json(text)
    listed = {(a.file, a.sha256) for a in full.artifacts}
    if (full.name, full.version) != (manifest.name, manifest.version) or not all(
        (a.file, a.sha256) in listed for a in manifest.artifacts
    ):
        raise BundleError(f"{path} is not the manifest {root / MANIFEST_FILE} was taken from")
    return manifest_digest(text)


def load_bundle(path: str | Path, verify: bool = True) -> ModelBundle:
    """Open a bundle directory.

    Args:
        path: the bundle directory.
        verify: check every artifact's size and SHA-256.

    Raises:
        BundleError: the directory or manifest is missing or invalid, or a file does not match.
    """
    root = Path(path)
    manifest_path = root / MANIFEST_FILE
    if not manifest_path.is_file():
        raise BundleError(f"{root} is not a bundle: {MANIFEST_FILE} not found")
    text = manifest_path.read_bytes()
    manifest = Manifest.from_json(text)
    # Digested as written, not as this edgefl parsed it: a newer manifest's fields that this
    # version ignores still name the bundle, so every version computes the same digest.
    digest = _full_manifest_digest(root, manifest) or manifest_digest(canonical_manifest_json(text))
    bundle = ModelBundle(root, manifest, digest=digest)
    if verify:
        bundle.verify()
    return bundle


def write_bundle(
    out: str | Path,
    manifest: Manifest,
    files: Mapping[str, Path | bytes],
    heads: Mapping[str, Mapping[str, np.ndarray]],
    report: Mapping[str, Any] | None = None,
    force: bool = False,
) -> ModelBundle:
    """Write a bundle atomically: into a temporary directory beside `out`, then rename.

    Sizes and SHA-256 of every artifact are filled in here; `manifest.artifacts` names the files
    (given in `files` by name, as a path to copy or bytes) and `manifest.heads` names each head's
    file (its weights given in `heads` by task). Head artifacts are added to the manifest when
    missing.

    Args:
        out: the bundle directory to write.
        manifest: what the bundle holds; its artifacts' sizes and SHA-256 are filled in place.
        files: the artifact files by name, as a path to copy or the bytes themselves.
        heads: the head weights by task.
        report: written as report.json when given.
        force: replace `out` when it exists.

    Returns:
        The written bundle.

    Raises:
        BundleError: `out` exists and `force` is False, or a listed file was not given.
    """
    target = Path(out)
    if target.exists() and not force:
        raise BundleError(f"{target} already exists; give `force` to replace it")
    with replacing_dir(target) as staging:
        for name, source in files.items():
            if isinstance(source, bytes):
                (staging / name).write_bytes(source)
            else:
                shutil.copyfile(source, staging / name)
        listed = {a.file for a in manifest.artifacts}
        for task, spec in manifest.heads.items():
            if task not in heads:
                raise BundleError(f"no weights given for head {task!r}")
            (staging / spec.file).write_bytes(encode_head(heads[task]))
            if spec.file not in listed:
                manifest.artifacts.append(
                    Artifact(
                        file=spec.file,
                        role="head",
                        format="safetensors",
                        precision="fp32",
                        task=task,
                    )
                )
        for artifact in manifest.artifacts:
            path = staging / artifact.file
            if not path.is_file():
                raise BundleError(f"artifact {artifact.file} listed in the manifest was not given")
            artifact.size = path.stat().st_size
            artifact.sha256 = sha256_file(path)
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest.to_dict(), indent=2))
        if report is not None:
            (staging / REPORT_FILE).write_text(json.dumps(report, indent=2, default=str))
    return ModelBundle(target, manifest)


def rewrite_heads(
    bundle: ModelBundle,
    out: str | Path,
    heads: Mapping[str, Mapping[str, np.ndarray]],
    force: bool = False,
) -> ModelBundle:
    """Write a copy of a bundle whose heads are replaced (same backbones, specs and report).

    Used to federate a fresh head on a compressed backbone (transfer learning across a fleet).

    Args:
        bundle: the bundle to copy.
        out: the new bundle directory.
        heads: new weights for every task of the bundle, shaped as its head specs say.
        force: replace `out` when it exists.

    Raises:
        BundleError: a task's weights are missing, or `out` exists without `force`.
    """
    manifest = Manifest.from_dict(bundle.manifest.to_dict())
    manifest.artifacts = [a for a in manifest.artifacts if a.role != "head"]
    files: dict[str, Path | bytes] = {a.file: bundle.file(a) for a in manifest.artifacts}
    return write_bundle(out, manifest, files, heads, report=bundle.report(), force=force)
