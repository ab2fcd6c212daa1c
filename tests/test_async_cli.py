"""`--mode async` settings on the command line: built from `AsyncPolicy`, refused before anything
starts with the flag named."""

from __future__ import annotations

from pathlib import Path

import pytest
from bundles import make_test_bundle
from click.testing import CliRunner

from edgefl.cli import main


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--staleness", "cubic:2"], "Invalid value for '--staleness': staleness 'cubic:2' is"),
        (["--staleness", "hinge:1"], "must look like hinge:A,B"),
        (["--buffer", "0"], "Invalid value for '--buffer': buffer must be at least 1"),
        (["--max-staleness", "-1"], "Invalid value for '--max-staleness'"),
        (["--time-limit", "0"], "Invalid value for '--time-limit'"),
    ],
)
def test_bad_async_settings_are_usage_errors_naming_the_flag(
    flags: list[str], says: str, tmp_path: Path
) -> None:
    bundle = make_test_bundle(tmp_path / "b")
    for command in (
        ["aggregate", "--broker", "mqtt://127.0.0.1:1", "--fleet", "lab", "--bundle",
         str(bundle.path), "--insecure"],
        ["simulate", "--devices", "2", "--out", str(tmp_path / "sim")],
    ):  # fmt: skip
        result = CliRunner().invoke(main, [*command, "--mode", "async", *flags])
        assert result.exit_code == 2, result.output
        assert says in " ".join(result.output.split())
