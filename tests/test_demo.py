"""`edgefl demo` in a reduced configuration: the same path (compress, sign, deploy, federate)
with the generic recipe, fewer devices and rounds, so it runs in seconds."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgefl.cli import main


@pytest.mark.slow
def test_demo_compresses_deploys_signed_and_federates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEFL_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--recipe", "generic", "--devices", "6", "--rounds", "3"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    text = result.output
    # The three steps, in order, with the compression report between them.
    steps = [text.index(s) for s in ("1. pretrain", "edgefl compress:", "2. sign", "3. federate")]
    assert steps == sorted(steps)
    assert "deployed digits-cnn v1: 6 boards updated, 0 failed" in text
    # Every board installed the signed bundle it was sent (each has its own store).
    assert sorted(p.name for p in (out / "devices").iterdir()) == [f"sim-{i:04d}" for i in range(6)]
    assert (out / "keys" / "signing.pub").is_file()
    with (out / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["round"], row["reported"]) for row in rows] == [("1", "6"), ("2", "6"), ("3", "6")]
    # A fresh head on the pretrained, compressed backbone: the fleet learns it on digits the
    # backbone never saw; personalized heads fit the devices' data.
    assert float(rows[0]["accuracy"]) < float(rows[-1]["accuracy"])
    assert float(rows[-1]["accuracy"]) > 0.9
    assert float(rows[-1]["personal_accuracy"]) >= float(rows[0]["device_accuracy"]) - 0.05
    data = json.loads((out / "metrics.json").read_text())
    assert data["config"]["preinstalled"] is False and data["config"]["devices"] == 6
    assert (out / "metrics.png").stat().st_size > 10_000
    assert json.loads((out / "bundle" / "manifest.json").read_text())["name"] == "digits-cnn"
