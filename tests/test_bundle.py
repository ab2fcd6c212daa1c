"""Bundles on disk: identity by digest, and manifests a newer edgefl wrote."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bundles import make_test_bundle

from edgefl.bundle import MANIFEST_FILE, load_bundle, manifest_digest
from edgefl.errors import BundleError


def test_a_bundles_digest_is_its_manifests_canonical_json(tmp_path: Path) -> None:
    bundle = make_test_bundle(tmp_path / "b")
    assert load_bundle(bundle.path).digest == manifest_digest(bundle.manifest.to_json())
    other = make_test_bundle(tmp_path / "other", seed=7)  # same name and version, other heads
    assert other.manifest.version == bundle.manifest.version
    assert load_bundle(other.path).digest != load_bundle(bundle.path).digest


def test_a_manifest_from_a_newer_edgefl_loads_and_keeps_its_identity(tmp_path: Path) -> None:
    bundle = make_test_bundle(tmp_path / "b")
    path = bundle.path / MANIFEST_FILE
    data = json.loads(path.read_text())
    data["energy_budget_mj"] = 12.5  # fields this edgefl does not know, at every level
    data["artifacts"][0]["sparsity"] = 0.5
    data["input"]["layout"] = "NCHW"
    data["heads"]["default"]["calibration"] = {"temperature": 1.3}
    path.write_text(json.dumps(data, indent=4))
    newer = load_bundle(bundle.path)
    assert newer.manifest.artifacts == bundle.manifest.artifacts
    # The digest covers what was written, so a newer aggregator and this older board agree.
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
    assert newer.digest == manifest_digest(canonical) != bundle.digest
    data["schema_version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(BundleError, match="schema version 99 is not supported"):
        load_bundle(bundle.path)
