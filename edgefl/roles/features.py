"""Backbone features of a device's local data, computed once per backbone version and cached.

The cache key is the backbone file's SHA-256 plus a digest of the input samples, so a new bundle
(new backbone) or new data computes afresh and nothing stale is ever reused; an image folder is
keyed per image, so photos added to a board cost only their own features. Runners are shared
per backbone file within a process so a thousand simulated agents load one session, not 1,000;
the registry keeps only the runners someone holds (and the latest one), so an agent that installs
bundle after bundle over the air holds one session, not one per bundle it ever ran.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgefl.atomic import replacing
from edgefl.bundle import InputSpec
from edgefl.data import DataSource, conform_batch, hash_file


class Runner(Protocol):
    """What the cache needs of a backbone runner (edgefl.runtime.BackboneRunner)."""

    def run(self, x: np.ndarray) -> np.ndarray:
        """Return the features of a batch of inputs."""
        ...


_RunnerKey = tuple[str, int, tuple[str, ...]]

# Runners nobody holds are kept only if among this many most recently asked for: a caller that
# does not hold its runner (the aggregator's evaluation) asks again without a reload, and a
# runner every agent has moved on from is freed.
KEEP_RECENT_RUNNERS = 1

# Every runner alive, held weakly: while any agent holds one, others asking get the same one.
_RUNNERS: dict[_RunnerKey, tuple[Callable[[], Any], threading.Lock]] = {}
_RECENT: OrderedDict[_RunnerKey, tuple[Any, threading.Lock]] = OrderedDict()
_RUNNERS_LOCK = threading.Lock()


def shared_backbone(
    path: Path, sha256: str, threads: int = 1, providers: Sequence[str] = ()
) -> tuple[Runner, threading.Lock]:
    """Return the process-wide runner of a backbone file and the lock that serializes its use.

    The runner lives while a caller holds it (or while it is among the `KEEP_RECENT_RUNNERS`
    last asked for); a caller that runs a backbone for long, like an agent, keeps the reference.

    Args:
        path: the `.onnx` or `.tflite` file.
        sha256: its SHA-256 (from the manifest), part of the key so a replaced file reloads.
        threads: intra-op threads of the runtime session.
        providers: onnxruntime execution providers in order of preference (empty: CPU).

    Raises:
        edgefl.errors.EdgeflError: the runtime cannot load the file (from edgefl.runtime).
    """
    from edgefl.runtime import load_backbone

    key = (f"{Path(path).resolve()}:{sha256}", threads, tuple(providers))
    with _RUNNERS_LOCK:
        _forget_dead_runners()
        entry = _RUNNERS.get(key)
        runner = entry[0]() if entry is not None else None
        if entry is None or runner is None:
            runner = load_backbone(Path(path), threads=threads, providers=list(providers))
            # A LiteRT interpreter is not thread-safe, hence one lock per runner.
            entry = (_weak(runner), threading.Lock())
            _RUNNERS[key] = entry
        _RECENT[key] = (runner, entry[1])
        _RECENT.move_to_end(key)
        while len(_RECENT) > KEEP_RECENT_RUNNERS:
            _RECENT.popitem(last=False)
        return runner, entry[1]


def live_runners(under: Path | None = None) -> int:
    """Return how many backbone runners are alive in this process (loaded and not yet freed),
    only those of files under the directory `under` when it is given."""
    prefix = f"{Path(under).resolve()}/" if under is not None else ""
    with _RUNNERS_LOCK:
        _forget_dead_runners()
        return sum(1 for path, *_ in _RUNNERS if path.startswith(prefix))


def _weak(runner: Any) -> Callable[[], Any]:
    try:
        return weakref.ref(runner)
    except TypeError:  # a runner type without weak references is kept for the process
        return lambda: runner


def _forget_dead_runners() -> None:
    for key in [key for key, (ref, _) in _RUNNERS.items() if ref() is None]:
        del _RUNNERS[key]


# What `edgefl.runtime.available_runtimes` names, by the artifact format each one loads.
RUNTIME_FORMATS = {"onnx": "onnx", "onnxruntime": "onnx", "tflite": "tflite", "litert": "tflite"}


# Probing for a runtime searches sys.path (a few ms); every status carries the answer, and a
# simulation's 10,000 boards announce within seconds: one probe serves them for a while, and a
# runtime installed meanwhile shows in the statuses after at most this long.
_RUNTIMES_TTL_S = 30.0
_runtimes_seen: tuple[float, list[str]] | None = None


def installed_runtimes() -> list[str]:
    """Return the backbone runtimes this Python can load (empty without edgefl.runtime's deps)."""
    global _runtimes_seen
    seen = _runtimes_seen
    if seen is not None and time.monotonic() - seen[0] < _RUNTIMES_TTL_S:
        return list(seen[1])
    try:
        from edgefl.runtime import available_runtimes

        found = list(available_runtimes())
    except ImportError:
        found = []
    _runtimes_seen = (time.monotonic(), found)
    return list(found)


def backbone_preferences(
    runtime: str, profile_prefer: Sequence[tuple[str, str]] | None, runtimes: Iterable[str]
) -> list[tuple[str, str]]:
    """Return the (format, precision) preferences to pick a bundle's backbone artifact by.

    Args:
        runtime: "auto", or a `RUNTIME_FORMATS` name to run that format only.
        profile_prefer: the board profile's preferences ("*" matches any), or None.
        runtimes: the runtimes installed (`installed_runtimes()`).

    Returns:
        The forced format; else the profile's preferences whose format is installed; else ONNX
        before TFLite among those installed (both when neither is).
    """
    available = {RUNTIME_FORMATS[r] for r in runtimes if r in RUNTIME_FORMATS}
    if runtime != "auto":
        return [(RUNTIME_FORMATS[runtime], "*")]
    usable = [(f, p) for f, p in profile_prefer or () if f == "*" or f in available]
    if usable:
        return usable
    order = [fmt for fmt in ("onnx", "tflite") if fmt in available] or ["onnx", "tflite"]
    return [(fmt, "*") for fmt in order]


def file_digest(file: Path, spec: InputSpec) -> str:
    """Return a short hex digest of one sample file's bytes and the input it becomes under `spec`
    (its preprocessing and shape): the same photo under another preprocessing is another key.

    Raises:
        DataError: the file cannot be read.
    """
    digest = hashlib.sha256(json.dumps([asdict(spec.preprocess), list(spec.shape)]).encode())
    hash_file(digest, file)
    return digest.hexdigest()[:16]


def data_digest(x: np.ndarray) -> str:
    """Return a short hex digest of an input array (shape, dtype and bytes)."""
    digest = hashlib.sha256(f"{x.shape}{x.dtype}".encode())
    # Hash the array's buffer in place: `tobytes()` copied the whole dataset (150 MB for 256
    # ImageNet images) just to hash it. The bytes, and so the keys, are the same.
    digest.update(np.ascontiguousarray(x).reshape(-1).view(np.uint8).data)
    return digest.hexdigest()[:16]


# Inputs per backbone call are capped by bytes, not count: the runtime allocates a batch's
# activations, and a 3x224x224 image is 2,352 times a digit. 2 MiB still takes the full 256
# digits per call but only 3 ImageNet images: an agent computing MobileNetV2 features of 64
# images peaked at 674 MB resident with one 64-image batch and at 195 MB with 3-image batches
# (benchmarks/agent_memory.py), at the same speed per image.
FEATURE_BATCH_BYTES = 2 * 1024 * 1024
MAX_FEATURE_BATCH = 256


def feature_batch_size(x: np.ndarray) -> int:
    """Return how many samples of `x` one backbone call takes (at least 1, at most 256)."""
    return batch_size_for(x.shape[1:])


def batch_size_for(sample_shape: Sequence[int]) -> int:
    """Return how many samples of this shape one backbone call takes (at least 1, at most 256)."""
    sample_bytes = max(1, int(np.prod(sample_shape, dtype=np.int64)) * 4)  # as float32
    return max(1, min(MAX_FEATURE_BATCH, FEATURE_BATCH_BYTES // sample_bytes))


def run_backbone(
    runner: Runner, x: np.ndarray, lock: threading.Lock | None = None, batch_size: int | None = None
) -> np.ndarray:
    """Run the backbone over `x` in batches; returns (n, features) float32.

    `batch_size` None sizes batches by `feature_batch_size` to bound the runtime's memory.
    """
    batch_size = batch_size or feature_batch_size(x)
    batches = (x[start : start + batch_size] for start in range(0, len(x), batch_size))
    return run_backbone_batches(runner, batches, lock)


def run_backbone_batches(
    runner: Runner, batches: Iterable[np.ndarray], lock: threading.Lock | None = None
) -> np.ndarray:
    """Run the backbone over each batch as it comes; returns (n, features) float32.

    Only one batch of inputs is alive at a time when `batches` is a generator (edgefl.data's
    `DataSource.batches`), so inputs never have to fit in memory together.
    """
    parts = []
    for raw in batches:
        batch = np.ascontiguousarray(raw, dtype=np.float32)
        if lock is None:
            out = runner.run(batch)
        else:
            with lock:
                out = runner.run(batch)
        parts.append(np.asarray(out, dtype=np.float32).reshape(len(batch), -1))
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


class FeatureCache:
    """Features keyed by (backbone SHA-256, data digest): `.npy` files in a directory, or memory.

    Memory holds the features of the last `keep_backbones` backbones looked up only (any number
    of data digests each, so agents sharing a cache share it): the features of a backbone an
    agent no longer runs are freed when the next one's are looked up (files stay on disk).
    """

    def __init__(self, directory: Path | None = None, keep_backbones: int = 1) -> None:
        """Use `directory` for `.npy` files; None keeps features in memory only."""
        if keep_backbones < 1:
            raise ValueError("keep_backbones must be at least 1")
        self.directory = directory
        self.keep_backbones = keep_backbones
        # backbone SHA-256 -> data digest -> features, the most recently used backbone last.
        self._memory: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def held(self) -> int:
        """Return how many feature arrays the cache holds in memory."""
        return sum(len(by_digest) for by_digest in self._memory.values())

    def path(self, backbone_sha256: str, digest: str) -> Path | None:
        """Return the file a key is stored in (None for an in-memory cache)."""
        if self.directory is None:
            return None
        return self.directory / f"features-{backbone_sha256[:32]}-{digest}.npy"

    def features(
        self,
        backbone_sha256: str,
        x: np.ndarray,
        runner: Runner,
        lock: threading.Lock | None = None,
    ) -> np.ndarray:
        """Return the features of `x` under a backbone, computing them only on a miss."""
        return self.lookup(
            backbone_sha256, data_digest(x), len(x), lambda: run_backbone(runner, x, lock)
        )

    def lookup(
        self,
        backbone_sha256: str,
        digest: str,
        samples: int,
        compute: Callable[[], np.ndarray],
    ) -> np.ndarray:
        """Return the features stored under (backbone, data digest), or `compute()` and store them.

        Args:
            backbone_sha256: the backbone artifact's SHA-256.
            digest: a digest of the data (`data_digest`, or `DataSource.digest` for data read
                from disk in batches).
            samples: how many samples the data holds; a stored file of another length is stale.
            compute: returns the (samples, features) array on a miss.
        """
        stored = self._stored(backbone_sha256, digest, samples)
        if stored is not None:
            self.hits += 1
            return stored
        self.misses += 1
        features = compute()
        self._store(backbone_sha256, digest, features)
        return features

    def _memory_of(self, backbone_sha256: str) -> dict[str, np.ndarray]:
        memory = self._memory.setdefault(backbone_sha256, {})
        self._memory.move_to_end(backbone_sha256)
        while len(self._memory) > self.keep_backbones:
            self._memory.popitem(last=False)
        return memory

    def _stored(self, backbone_sha256: str, digest: str, samples: int) -> np.ndarray | None:
        """Return the features held in memory or on disk under the key, or None."""
        memory = self._memory_of(backbone_sha256)
        if digest in memory:
            return memory[digest]
        path = self.path(backbone_sha256, digest)
        if path is not None and path.is_file():
            try:
                features = np.load(path, allow_pickle=False)
                if len(features) == samples:
                    memory[digest] = features
                    return features
            except (OSError, ValueError):
                pass  # a torn or foreign file: recompute and overwrite it
        return None

    def _store(self, backbone_sha256: str, digest: str, features: np.ndarray) -> None:
        path = self.path(backbone_sha256, digest)
        if path is not None:
            with replacing(path) as tmp, tmp.open("wb") as handle:
                np.save(handle, features, allow_pickle=False)
        self._memory_of(backbone_sha256)[digest] = features

    def source_features(
        self,
        backbone_sha256: str,
        source: DataSource,
        spec: InputSpec,
        runner: Runner,
        lock: threading.Lock | None = None,
    ) -> np.ndarray:
        """Return the features of data on disk, reading it in batches only on a miss.

        Args:
            backbone_sha256: the backbone artifact's SHA-256.
            source: the data on disk (`edgefl.data.open_source`).
            spec: the bundle's input: its preprocessing (what the backbone was trained and
                exported with) and the shape each batch is conformed to.
            runner, lock: the backbone's runner and the lock serializing its use.
        """
        preprocess = spec.preprocess

        def compute(part: DataSource) -> np.ndarray:
            batches = part.batches(preprocess, batch_size_for(spec.shape))
            conformed = (conform_batch(batch, spec.shape) for batch in batches)
            return run_backbone_batches(runner, conformed, lock)

        if source.files:
            return self._per_file_features(backbone_sha256, source, spec, compute)
        digest = f"{source.digest(preprocess)}-{'x'.join(map(str, spec.shape))}"
        return self.lookup(backbone_sha256, digest, len(source), lambda: compute(source))

    def _per_file_features(
        self,
        backbone_sha256: str,
        source: DataSource,
        spec: InputSpec,
        compute: Callable[[DataSource], np.ndarray],
    ) -> np.ndarray:
        """Features of an image folder, one cache entry per image: only images without one are
        read and run (in batches), so a board that gains photos computes just theirs."""
        digests = [file_digest(file, spec) for file in source.files]
        rows: dict[str, np.ndarray] = {}
        missing: list[int] = []
        for index, digest in enumerate(digests):
            if digest in rows:
                continue
            stored = self._stored(backbone_sha256, digest, 1)
            if stored is None:
                missing.append(index)
                rows[digest] = np.empty(0, np.float32)  # a placeholder: a copy is computed once
            else:
                rows[digest] = stored[0]
        if missing:
            self.misses += len(missing)
            part = replace(
                source, y=source.y[missing], files=tuple(source.files[i] for i in missing)
            )
            computed = compute(part)
            for index, features in zip(missing, computed, strict=True):
                rows[digests[index]] = features
                self._store(backbone_sha256, digests[index], features[None])
        self.hits += len(digests) - len(missing)
        return np.stack([rows[digest] for digest in digests]).astype(np.float32, copy=False)
