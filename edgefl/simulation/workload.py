"""What a simulation federates: the devices' pool and the server's test set, and the default bundle.

The default is the FL-digits workload of DESIGN.md: digits-mlp's pretrained backbone as fp32 ONNX,
a fresh Linear(64, 10) head, the federated pool and test set of `fl_digits_split()`.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console

from edgefl.bundle import DEFAULT_TASK, ModelBundle, load_bundle, rewrite_heads
from edgefl.data import DIGITS, Dataset, fl_digits_split, holdout_split, load_dataset
from edgefl.errors import BundleError
from edgefl.head import init_head

FL_DIGITS_LABELS = [str(i) for i in range(10)]


@dataclass
class FederatedData:
    """The samples devices hold between them (`pool`) and the server's held-out `test` set."""

    pool: Dataset
    test: Dataset
    source: str


def load_federated_data(source: str | Path = DIGITS, test_fraction: float = 0.3) -> FederatedData:
    """Load a dataset and split it into the devices' pool and the server's test set.

    Args:
        source: "digits" gives the FL-digits split of DESIGN.md (the 30% pretraining part is left
            out); a `.npz` or an ImageFolder directory is split stratified, seed 0.
        test_fraction: the test share for sources other than digits.

    Returns:
        The pool and the test set.

    Raises:
        DataError: the source cannot be loaded or is too small to split.
    """
    if str(source) == DIGITS:
        _, (X_pool, y_pool), (X_test, y_test) = fl_digits_split()
        return FederatedData(
            Dataset(X_pool, y_pool, FL_DIGITS_LABELS),
            Dataset(X_test, y_test, FL_DIGITS_LABELS),
            DIGITS,
        )
    dataset = load_dataset(source)
    pool, test = holdout_split(dataset, test_fraction, seed=0)
    return FederatedData(pool, test, str(source))


def repeat_pool(data: FederatedData, min_per_device: int, num_devices: int) -> FederatedData:
    """Repeat the pool until every device can get `min_per_device` samples on average.

    A scale run (1,000 devices on 880 FL-digits samples) needs more samples than the pool has;
    repeating keeps the label distribution and the test set unchanged.
    """
    copies = int(np.ceil(min_per_device * num_devices / max(1, len(data.pool))))
    if copies <= 1:
        return data
    pool = data.pool
    repeated = Dataset(np.concatenate([pool.X] * copies), np.tile(pool.y, copies), pool.labels)
    return FederatedData(repeated, data.test, f"{data.source} x{copies}")


def default_cache_dir() -> Path:
    """Where built bundles are cached: $EDGEFL_CACHE, else ~/.cache/edgefl."""
    root = os.environ.get("EDGEFL_CACHE") or Path.home() / ".cache" / "edgefl"
    return Path(root) / "simulation"


FL_DIGITS_BUNDLE = "fl-digits-v1"  # bump when the recipe or the head's initialisation changes


def fl_digits_bundle(cache_dir: Path | None = None, console: Console | None = None) -> ModelBundle:
    """Return the FL-digits bundle, building it on first use and caching it.

    The pipeline compresses the pretrained digits-mlp with the `generic` recipe (fp32 ONNX,
    verified in onnxruntime); its trained head is then replaced by a fresh Linear(64, 10)
    initialised like torch's default (seed 0), which is what the federation trains.

    Args:
        cache_dir: where the bundle is kept; None uses `default_cache_dir()`.
        console: where the pipeline's progress goes on a first build; None is silent.

    Returns:
        The bundle.

    Raises:
        EdgeflError: the pipeline failed (it needs the host extra: torch, onnx).
    """
    target = (cache_dir or default_cache_dir()) / FL_DIGITS_BUNDLE
    try:
        return load_bundle(target)
    except BundleError:
        pass  # not built yet, or damaged: build afresh
    # The pipeline needs torch; a board-style install without it can still simulate a bundle.
    from edgefl.compression.pipeline import CompressRequest, compress

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        request = CompressRequest(
            model="digits-mlp", recipe="generic", data=DIGITS, out=Path(scratch) / "built",
            name="fl-digits",
        )  # fmt: skip
        built = compress(request, console).bundle
        assert built is not None  # not a dry run
        fresh = init_head(built.head_spec().layers, seed=0)
        return rewrite_heads(built, target, {DEFAULT_TASK: fresh}, force=True)
