"""The smoke test of a freshly installed bundle: one sample through the real runtime and heads."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from edgefl.bundle import Artifact, ModelBundle
from edgefl.errors import EdgeflError
from edgefl.head import head_forward

SmokeTest = Callable[[ModelBundle, Artifact], None]


class SmokeTestError(EdgeflError):
    """A freshly installed bundle does not run: it does not load, or its output does not fit."""


def smoke_inference(bundle: ModelBundle, backbone: Artifact, threads: int = 1) -> None:
    """Run one sample of zeros through the backbone (real runtime) and every head.

    Args:
        bundle: the installed bundle.
        backbone: the backbone artifact this board runs.
        threads: runtime threads.

    Raises:
        SmokeTestError: the backbone does not load or run, its features do not have the
            manifest's size or the head's input size, or a head's output is wrong or not finite.
    """
    from edgefl.runtime import load_backbone  # imports the runtime only when installing

    manifest = bundle.manifest
    try:
        runner = load_backbone(bundle.file(backbone), threads)
        shape = [d if d > 0 else 1 for d in manifest.input.shape]
        features = runner.run(np.zeros((1, *shape), dtype=np.float32))
    except EdgeflError as exc:
        raise SmokeTestError(f"smoke inference failed: {exc}") from exc
    except Exception as exc:  # a runtime's own errors: report, never crash the agent
        raise SmokeTestError(f"smoke inference failed: {type(exc).__name__}: {exc}") from exc
    width = int(features.shape[1]) if features.ndim == 2 else -1
    if width != manifest.feature_size:
        raise SmokeTestError(
            f"smoke inference failed: backbone {backbone.file} gives {tuple(features.shape)}"
            f" features, the manifest says {manifest.feature_size}"
        )
    for task, spec in manifest.heads.items():
        if spec.in_features != width:
            raise SmokeTestError(
                f"smoke inference failed: head {task!r} takes {spec.in_features} features,"
                f" the backbone gives {width}"
            )
        try:
            # The head as the model ran it: its output operations (a sigmoid, ...) included.
            logits = head_forward(spec.layers, bundle.head_weights(task), features, spec.outputs)
        except (EdgeflError, KeyError, ValueError) as exc:
            raise SmokeTestError(f"smoke inference failed: head {task!r}: {exc}") from exc
        if logits.shape != (1, spec.num_outputs) or not np.isfinite(logits).all():
            raise SmokeTestError(
                f"smoke inference failed: head {task!r} gives {logits.shape}, expected"
                f" (1, {spec.num_outputs}) finite logits"
            )
