"""The backbone a board runs: which artifact of its bundle, in which runtime, on which provider."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from edgefl.bundle import Artifact, ModelBundle
from edgefl.profiles import DeviceProfile
from edgefl.roles.board_status import RunningBackbone
from edgefl.roles.features import (
    Runner,
    backbone_preferences,
    installed_runtimes,
    shared_backbone,
)


@dataclass(frozen=True)
class LoadedBackbone:
    """A backbone artifact loaded in its runtime, with the lock that serializes its use."""

    file: Path
    artifact: Artifact
    runner: Runner
    lock: threading.Lock

    @property
    def running(self) -> RunningBackbone:
        """What runs: the artifact's file, the runtime and its execution provider."""
        runtime, provider = (
            getattr(self.runner, "runtime", ""),
            getattr(self.runner, "provider", ""),
        )
        return RunningBackbone(self.artifact.file, runtime, provider)


class BoardBackbone:
    """Picks a bundle's backbone artifact for this board and holds its runner.

    The runner is shared process-wide (`shared_backbone`); holding it here keeps it alive while
    the board runs that artifact, and lets the registry drop those of bundles it left behind.
    """

    def __init__(self, runtime: str, profile: DeviceProfile | None, threads: int) -> None:
        """Args: the agent's `runtime` setting ("auto", "onnx", "tflite"), its board profile
        (artifact preferences, execution providers) and the runtime's threads."""
        self.runtime = runtime
        self.profile = profile
        self.threads = threads
        self.loaded: LoadedBackbone | None = None

    def select(self, bundle: ModelBundle) -> Artifact:
        """Return the backbone artifact of `bundle` this board runs.

        Raises:
            BundleError: the bundle has no backbone this board can run.
        """
        prefer = self.profile.prefer if self.profile is not None else None
        preferences = backbone_preferences(self.runtime, prefer, installed_runtimes())
        return bundle.manifest.select_backbone(preferences)

    def load(self, bundle: ModelBundle) -> LoadedBackbone:
        """Return the loaded backbone of `bundle`, loading it unless it is the one held.

        Raises:
            BundleError: the bundle has no backbone this board can run.
            RuntimeLoadError: the runtime cannot load the artifact.
        """
        artifact = self.select(bundle)
        file = bundle.file(artifact)
        held = self.loaded
        if held is None or (held.file, held.artifact.sha256) != (file, artifact.sha256):
            providers = self.profile.providers if self.profile is not None else []
            runner, lock = shared_backbone(file, artifact.sha256, self.threads, providers)
            self.loaded = held = LoadedBackbone(file, artifact, runner, lock)
        return held

    @property
    def running(self) -> RunningBackbone | None:
        """What runs now (None before a backbone is loaded)."""
        return self.loaded.running if self.loaded is not None else None


def describe(running: RunningBackbone | None) -> str:
    """Say what runs, for the log: "backbone-fp16.onnx in onnxruntime on CUDAExecutionProvider"."""
    if running is None:
        return "no backbone loaded"
    on = f" on {running.provider}" if running.provider else ""
    return f"{running.artifact} in {running.runtime}{on}"
