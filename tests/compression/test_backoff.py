"""The back-off search: bisection of the prune ratio, budgets, signed messages, best effort."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgefl.cli import main
from edgefl.compression.backoff import SearchBudget, bisect_ratio, describe_change
from edgefl.compression.pipeline import CompressRequest, compress
from edgefl.errors import AccuracyDropError


def test_bisection_finds_the_largest_ratio_that_fits() -> None:
    tried = bisect_ratio(0.9, lambda ratio: ratio <= 0.3, SearchBudget(tries=10, resolution=0.02))
    assert tried[:3] == [0.45, 0.225, 0.3375]
    fitting = [r for r in tried if r <= 0.3]
    assert 0.28 <= max(fitting) <= 0.3
    # Stops once the interval is narrower than the resolution.
    assert len(tried) == 6


def test_bisection_stops_at_its_tries_and_its_time() -> None:
    assert bisect_ratio(0.8, lambda _r: False, SearchBudget(tries=3)) == [0.4, 0.2, 0.1]
    now = iter(range(100))
    tried = bisect_ratio(0.8, lambda _r: False, SearchBudget(tries=9, seconds=3), lambda: next(now))
    assert tried == [0.4, 0.2]  # the clock reads 0 (start), 1, 2, then 3: the budget is spent


def test_changes_are_signed_once() -> None:
    assert describe_change(1.2, 1.0) == "-1.20 points (budget -1)"
    assert describe_change(-0.3, None) == "+0.30 points"
    assert describe_change(None, 1.0) == "not measured"


SEARCH = """
description = "prunes hard without distillation"
max_accuracy_drop = {drop}
[prune]
ratio = 0.9
[backoff]
tries = {tries}
[[artifacts]]
format = "onnx"
precision = "fp32"
"""


def test_the_search_keeps_the_largest_ratio_within_the_budget(tmp_path: Path) -> None:
    recipe = tmp_path / "search.toml"
    recipe.write_text(SEARCH.format(drop=3.0, tries=4))
    result = compress(CompressRequest("digits-mlp", recipe, "digits", tmp_path / "b"))
    assert result.report is not None and result.plan is not None
    tries = [a for a in result.report.backoff if a.step == "prune+distill"]
    assert [a.setting for a in tries][:2] == [
        "prune ratio 0.9, distill 0 epochs",
        "prune ratio 0.45, distill 0 epochs",
    ]
    assert all(a.accuracy is not None and a.size_bytes and a.latency_ms for a in tries)
    [kept] = [a for a in tries if a.kept]
    assert kept.accuracy_drop is not None and kept.accuracy_drop <= 3.0
    assert f"prune ratio {result.plan.ratio:g}," in kept.setting
    # No fitting try prunes more than the kept one.
    assert all(
        a.accuracy_drop is not None and (a.accuracy_drop > 3.0 or a is kept)
        for a in tries
        if float(a.setting.split()[2].rstrip(",")) > result.plan.ratio
    )
    assert result.report.within_budget


def test_no_fit_is_an_error_with_the_measured_drops_or_a_best_effort_bundle(
    tmp_path: Path,
) -> None:
    recipe = tmp_path / "impossible.toml"
    recipe.write_text(SEARCH.format(drop=0.0, tries=1))
    out = tmp_path / "b"
    with pytest.raises(AccuracyDropError) as failure:
        compress(CompressRequest("digits-mlp", recipe, "digits", out))
    message = str(failure.value)
    assert "prune ratio 0.9, distill 0 epochs: -" in message
    assert "points (budget -0); prune ratio 0.45, distill 0 epochs: -" in message
    assert "--" not in message and not out.exists()
    result = CliRunner().invoke(
        main,
        ["compress", "--model", "digits-mlp", "--recipe", str(recipe), "--data", "digits",
         "--out", str(out), "--best-effort"],
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "is a best-effort bundle beyond max_accuracy_drop" in result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["within_budget"] is False
    kept = [a for a in report["backoff"] if a["kept"] and a["step"] == "prune+distill"]
    assert len(kept) == 1 and kept[0]["setting"] == "prune ratio 0.45, distill 0 epochs"
