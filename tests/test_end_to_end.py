"""The whole path with real parts: compress digits-cnn into int8 TFLite + fp16/fp32 ONNX, sign and
deploy it over a real Mosquitto to a Raspberry Pi agent and a Jetson agent (each downloads only the
backbone its profile prefers), then federate one head across the LiteRT board and the onnxruntime
board. No mocks: the compression pipeline, the runtimes, the broker and the agents are the real
ones; only the boards are agents in this process.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from bundles import digits_devices
from click.testing import CliRunner
from conftest import RunningBroker

from edgefl import signing
from edgefl.bundle import ModelBundle
from edgefl.cli import main
from edgefl.compression.pipeline import CompressRequest, compress
from edgefl.core.settings import RoundPolicy, RoundSettings, TrainConfig
from edgefl.data import Dataset
from edgefl.delivery.fleet_view import read_fleet
from edgefl.delivery.updater import Updater
from edgefl.delivery.updater_binding import enable_updates
from edgefl.head import head_accuracy
from edgefl.roles.agent import Agent, AgentConfig
from edgefl.roles.aggregator import Aggregator, AggregatorConfig
from edgefl.roles.features import shared_backbone
from edgefl.runtime import OnnxBackbone, TfliteBackbone

FLEET = "e2e"
# The shipped raspberry-pi recipe with cheap settings: a quarter of the channels pruned, one
# distillation epoch, small calibration and verification sets; three backbone artifacts so the
# two board profiles pick different ones.
RECIPE = """
description = "end-to-end test: light pruning, 1 distill epoch, int8 TFLite + fp16/fp32 ONNX"
max_accuracy_drop = 5.0
latency_threads = 1

[prune]
ratio = 0.25
importance = "l2"
iterative_steps = 1
round_to = 4

[distill]
temperature = 4.0
alpha = 0.7
epochs = 1
lr = 0.002
batch_size = 64

[[artifacts]]
format = "tflite"
precision = "int8"
calibration_samples = 64

[[artifacts]]
format = "onnx"
precision = "fp16"

[[artifacts]]
format = "onnx"
precision = "fp32"

[verify]
tolerance = { fp32 = 1e-3, fp16 = 5e-2, int8 = 0.5 }
min_top1_agreement = 0.9
samples = 64
"""
# Which backbone each shipped profile must end up with, and the runtime that runs it.
BOARDS: dict[str, tuple[str, str, type[TfliteBackbone | OnnxBackbone]]] = {
    "pi-1": ("raspberry-pi", "backbone-int8.tflite", TfliteBackbone),
    "jetson-1": ("jetson", "backbone-fp16.onnx", OnnxBackbone),
}


@dataclass
class Fleet:
    """The compressed bundle, the two boards after the deploy, and what the deploy printed."""

    bundle: ModelBundle
    agents: dict[str, Agent]
    updaters: dict[str, Updater]
    models: dict[str, Path]
    deploy_output: str
    deploy_exit_code: int
    test: Dataset


@pytest.fixture(scope="module")
def compressed(tmp_path_factory: pytest.TempPathFactory) -> ModelBundle:
    """digits-cnn compressed by the real pipeline (about 15 s on one core)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("compress")
    recipe = root / "e2e.toml"
    recipe.write_text(RECIPE)
    result = compress(
        CompressRequest(model="digits-cnn", recipe=recipe, data="digits", out=root / "bundle")
    )
    assert result.bundle is not None
    return result.bundle


@pytest.fixture(scope="module")
def fleet(
    compressed: ModelBundle, mosquitto: RunningBroker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet]:
    """A Pi and a Jetson agent, each with half the FL-digits pool, after `edgefl deploy`."""
    root = tmp_path_factory.mktemp("boards")
    keys = signing.init_keys(root / "keys")
    devices, test = digits_devices(len(BOARDS))
    agents: dict[str, Agent] = {}
    updaters: dict[str, Updater] = {}
    models: dict[str, Path] = {}
    try:
        for (device, (profile, _, _)), dataset in zip(BOARDS.items(), devices, strict=True):
            config = AgentConfig(mosquitto.url, FLEET, device, profile=profile, heartbeat_s=5)
            agent = Agent(config, dataset=dataset)
            models[device] = root / f"models-{device}"
            # What `edgefl agent --models-dir --trust-key --profile` does.
            updaters[device] = enable_updates(agent, models[device], keys.public)
            agent.start()
            agents[device] = agent
        result = CliRunner().invoke(
            main,
            ["deploy", str(compressed.path), "--broker", mosquitto.url, "--fleet", FLEET,
             "--key", str(keys.private), "--chunk-size", "16384", "--timeout", "60", "--insecure"],
        )  # fmt: skip
        yield Fleet(compressed, agents, updaters, models, result.output, result.exit_code, test)
    finally:
        for agent in agents.values():
            agent.stop()


def _store_files(models: Path) -> set[str]:
    return {p.name for p in (models / "current").iterdir()}


@pytest.mark.slow
def test_each_board_downloads_and_runs_only_its_preferred_backbone(fleet: Fleet) -> None:
    assert fleet.deploy_exit_code == 0, fleet.deploy_output
    assert "2 updated, 0 failed, 0 offline" in fleet.deploy_output
    published = {a.file for a in fleet.bundle.manifest.backbones()}
    assert published == {"backbone-int8.tflite", "backbone-fp16.onnx", "backbone-fp32.onnx"}
    for device, (profile, backbone, runner_type) in BOARDS.items():
        agent = fleet.agents[device]
        assert agent.model_version == 1, device
        assert fleet.updaters[device].running_version == 1
        # Only the preferred backbone came down, plus the head and the board's manifest.
        files = _store_files(fleet.models[device])
        assert files == {
            backbone,
            "head.safetensors",
            "manifest.json",
            "full-manifest.json",
            "release.json",
        }, device
        local = json.loads((fleet.models[device] / "current" / "manifest.json").read_text())
        assert [a["file"] for a in local["artifacts"] if a["role"] == "backbone"] == [backbone]
        report = fleet.updaters[device].last_report
        assert report is not None and report.state == "installed", device
        # Its bundle is still named by the full bundle's digest, the one the aggregator federates.
        assert agent.bundle is not None and agent.bundle.digest == fleet.bundle.digest, device
        # The agent computes its features with that file, in its own runtime.
        (artifact,) = agent.bundle.manifest.backbones()
        runner, _ = shared_backbone(agent.bundle.file(artifact), artifact.sha256, agent.threads)
        assert isinstance(runner, (TfliteBackbone, OnnxBackbone))
        assert type(runner) is runner_type, device
        assert runner.format == ("tflite" if profile == "raspberry-pi" else "onnx")
        # ... and classifies the held-out digits with it as well as the compressed model does.
        predicted = agent.predict(fleet.test.X)
        assert float(np.mean(predicted == fleet.test.y)) >= 0.9, device

    # The fleet view (what `edgefl fleet` prints) shows both boards on the new version.
    rows = {row.device_id: row for row in read_fleet(fleet.agents["pi-1"].config.broker_url, FLEET)}
    assert {d: (r.state, r.profile, r.model_version) for d, r in rows.items()} == {
        "pi-1": ("online", "raspberry-pi", 1),
        "jetson-1": ("online", "jetson", 1),
    }
    assert {r.last_deploy for r in rows.values()} == {"v1 installed"}
    assert {r.bundle_digest for r in rows.values()} == {fleet.bundle.digest}  # from the statuses


@pytest.mark.slow
def test_litert_board_and_onnx_board_federate_one_head(fleet: Fleet, tmp_path: Path) -> None:
    assert fleet.deploy_exit_code == 0, fleet.deploy_output
    broker_url = fleet.agents["pi-1"].config.broker_url
    config = AggregatorConfig(
        broker_url, FLEET, fleet.bundle.path,
        RoundPolicy(rounds=2, min_devices=2, deadline_s=30, wait_devices_s=20),
        RoundSettings(train=TrainConfig(epochs=1, lr=0.05)), out_dir=tmp_path / "out",
    )  # fmt: skip
    aggregator = Aggregator(config, eval_dataset=fleet.test)
    before = aggregator.evaluate()
    assert before is not None and before >= 0.9  # the compressed model's own head
    summary = aggregator.run()
    assert [(r.round, r.status, r.selected, r.accepted) for r in summary.rounds] == [
        (1, "closed", 2, 2),
        (2, "closed", 2, 2),
    ]
    assert summary.head_version == 2
    assert summary.accuracy is not None and summary.accuracy >= 0.9, summary.accuracy
    for device, agent in fleet.agents.items():
        assert [(o.round, o.status) for o in agent.outcomes] == [(1, "ok"), (2, "ok")], device
    # The federated head works on both boards' own features: LiteRT int8 and onnxruntime fp16.
    spec = fleet.bundle.head_spec("default")
    for device, agent in fleet.agents.items():
        assert agent.bundle is not None
        (artifact,) = agent.bundle.manifest.backbones()
        runner, _ = shared_backbone(agent.bundle.file(artifact), artifact.sha256, agent.threads)
        features = runner.run(fleet.test.X.reshape(-1, 1, 8, 8))
        accuracy = head_accuracy(spec.layers, aggregator.heads["default"], features, fleet.test.y)
        assert accuracy >= 0.9, (device, accuracy)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("profile", "backbone", "threads"),
    [("raspberry-pi", "backbone-int8.tflite", 4), ("jetson", "backbone-fp16.onnx", 6)],
)
def test_an_agent_given_a_full_bundle_runs_what_its_profile_prefers(
    compressed: ModelBundle, mosquitto: RunningBroker, profile: str, backbone: str, threads: int
) -> None:
    devices, _ = digits_devices(2)
    config = AgentConfig(
        mosquitto.url, FLEET, f"{profile}-full", bundle_dir=compressed.path, profile=profile
    )
    agent = Agent(config, dataset=devices[0])
    agent.start()
    try:
        assert agent.backbone is not None and agent.backbone.file == backbone
        assert agent.threads == threads
    finally:
        agent.stop()
