"""The CLI's shell: options built from the settings dataclasses, plug-in specs and exit codes."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from edgefl.cli import main
from edgefl.cli.options import build_settings, flag_name, resolve_strategy, settings_options
from edgefl.cli.shell import user_errors
from edgefl.core.codecs import CODEC_NAMES
from edgefl.core.settings import AcceptancePolicy, RoundPolicy, TrainConfig
from edgefl.errors import DataError, EdgeflError, PluginError, TransportError

USER_STRATEGIES = """
from edgefl.core.strategies import FedAvg, Strategy

class Halfway(FedAvg):
    name = "halfway"

def make(scale=1.0):
    return Halfway()

instance = Halfway()

def not_a_strategy():
    return "fedavg"
"""


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    name = f"edgefl_test_strategies_{tmp_path.name}"
    (tmp_path / f"{name}.py").write_text(USER_STRATEGIES)
    (tmp_path / f"{name}_broken.py").write_text("raise RuntimeError('no config file here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_flag_names_follow_the_field_names() -> None:
    assert flag_name("batch_size") == "--batch-size"
    assert flag_name("deadline_s") == "--deadline"
    assert flag_name("stale_after_s") == "--stale-after"


def test_options_and_settings_round_trip_with_per_command_defaults() -> None:
    seen: dict[str, Any] = {}

    @click.command()
    @settings_options(RoundPolicy, defaults={"rounds": 5})
    @settings_options(TrainConfig)
    @settings_options(AcceptancePolicy)
    def command(**options: Any) -> None:
        seen["policy"] = build_settings(RoundPolicy, options)
        seen["train"] = build_settings(TrainConfig, options)
        seen["acceptance"] = build_settings(AcceptancePolicy, options)
        seen["rest"] = options

    result = CliRunner().invoke(command, ["--weight-decay", "0.01", "--deadline", "3",
                                          "--allow", "pi-1,,pi-2"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert seen["policy"] == RoundPolicy(rounds=5, deadline_s=3.0)
    assert seen["train"] == TrainConfig(weight_decay=0.01)
    assert seen["acceptance"].allow == ("pi-1", "pi-2")
    assert seen["rest"] == {}
    assert CliRunner().invoke(command, []).exit_code == 0
    assert seen["acceptance"].allow is None and seen["policy"].stale_after_s is None


def test_a_refused_setting_is_a_usage_error_naming_the_flag() -> None:
    result = CliRunner().invoke(
        main, ["aggregate", "--broker", "mqtt://127.0.0.1:1", "--fleet", "f", "--bundle", "b",
               "--deadline", "0", "--insecure"],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "Invalid value for '--deadline': deadline_s must be positive" in result.output


def test_aggregate_and_simulate_offer_every_setting() -> None:
    for name, rounds, deadline in (("aggregate", 10, 60.0), ("simulate", 5, 10.0)):
        command = main.commands[name]
        options = {opt: param for param in command.params for opt in param.opts}
        for flag in (
            "--weight-decay",
            "--proximal-mu",
            "--topk-fraction",
            "--clip-norm",
            "--noise-multiplier",
            "--min-devices",
            "--stale-after",
            "--settle",
            "--max-norm",
            "--influence-factor",
            "--max-samples",
            "--strategy",
        ):
            assert flag in options, (name, flag)  # fmt: skip
        assert list(options["--codec"].type.choices) == list(CODEC_NAMES)  # type: ignore[attr-defined]
        assert options["--rounds"].default == rounds and options["--deadline"].default == deadline
        assert "seconds" in (options["--deadline"].help or "").lower()
    # The simulation's allow-list is its own devices.
    assert "--allow" in {opt for p in main.commands["aggregate"].params for opt in p.opts}
    assert "--allow" not in {opt for p in main.commands["simulate"].params for opt in p.opts}


def test_strategy_specs(user_module: str) -> None:
    assert resolve_strategy("fedprox", ("mu=0.5",)) == ("fedprox", {"mu": 0.5})
    spec, params = resolve_strategy(f"{user_module}:make", ("scale=2",))
    assert callable(spec) and params == {"scale": 2}
    spec, params = resolve_strategy(f"{user_module}:instance", ())
    assert spec.name == "halfway" and params == {}
    with pytest.raises(click.BadParameter, match="unknown strategy 'fedsgd'"):
        resolve_strategy("fedsgd", ())
    with pytest.raises(click.BadParameter, match="has no parameter nu"):
        resolve_strategy("fedprox", ("nu=1",))
    with pytest.raises(PluginError, match="returned str, not a Strategy"):
        resolve_strategy(f"{user_module}:not_a_strategy", ())


def test_a_module_that_fails_on_import_is_one_line_exit_2(user_module: str) -> None:
    result = CliRunner().invoke(
        main, ["aggregate", "--broker", "mqtt://127.0.0.1:1", "--fleet", "f", "--bundle", "b",
               "--strategy", f"{user_module}_broken:make", "--insecure"],
    )  # fmt: skip
    assert result.exit_code == 2
    assert result.output.strip() == (
        f"error: importing module '{user_module}_broken' of strategy "
        f"'{user_module}_broken:make' failed: RuntimeError: no config file here"
    )


@pytest.mark.parametrize(
    ("error", "code", "shown"),
    [
        (
            DataError("`num_classes` must be at least 2"),
            2,
            "error: --num-classes must be at least 2",
        ),
        (DataError("`other` is kept as it is"), 2, "error: `other` is kept as it is"),
        (
            TransportError("broker mqtt://x:1 unreachable"),
            1,
            "error: broker mqtt://x:1 unreachable",
        ),
        (EdgeflError("a round failed"), 1, "error: a round failed"),
    ],
)
def test_library_errors_exit_by_fault_and_name_the_flags(
    error: EdgeflError, code: int, shown: str
) -> None:
    @click.command()
    @click.option("--num-classes", type=int)
    @user_errors
    def command(num_classes: int | None) -> None:
        raise error

    result = CliRunner().invoke(command, [])
    assert result.exit_code == code and result.output.strip() == shown


def test_a_bug_keeps_its_traceback() -> None:
    @click.command()
    @user_errors
    def command() -> None:
        raise ValueError("an internal invariant broke")

    result = CliRunner().invoke(command, [])
    assert result.exit_code == 1 and isinstance(result.exception, ValueError)
    assert "Usage" not in result.output
