"""No torch on boards: a fresh virtual environment with only `edgefl[agent]` runs `edgefl agent`,
receives a signed deploy over a real Mosquitto and completes a federated round."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import venv
from pathlib import Path

import pytest
from bundles import digits_devices, make_test_bundle, write_npz
from conftest import RunningBroker

from edgefl import signing
from edgefl.core.settings import RoundPolicy
from edgefl.delivery.deploy import UPDATED, deploy
from edgefl.delivery.fleet_view import read_fleet
from edgefl.roles.aggregator import Aggregator, AggregatorConfig
from edgefl.security.device_registry import DeviceRegistry
from edgefl.security.identity import AggregatorAuth
from edgefl.security.verifiers import TOFU, DeviceVerifier

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_agent_from_a_torch_free_venv_takes_a_deploy_and_a_round(
    mosquitto: RunningBroker, tmp_path: Path
) -> None:
    env_dir = tmp_path / "board-venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", f"{REPO}[agent]"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]
    no_torch = subprocess.run([str(python), "-c", "import torch"], capture_output=True, text=True)
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr

    keys = signing.init_keys(tmp_path / "keys")
    devices, _ = digits_devices(2)
    data = write_npz(devices[0], tmp_path / "board.npz")
    agent = subprocess.Popen(
        [
            str(env_dir / "bin" / "edgefl"), "agent", "--broker", mosquitto.url, "--fleet",
            "venv", "--device-id", "board-1", "--data", str(data), "--profile", "raspberry-pi",
            "--models-dir", str(tmp_path / "models"), "--trust-key", str(keys.public),
            "--state-dir", str(tmp_path / "state"), "--heartbeat", "2",
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not any(r.state == "online" for r in read_fleet(mosquitto.url, "venv", 1.0)):
            assert agent.poll() is None, agent.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the venv agent never came online"
        bundle = make_test_bundle(tmp_path / "bundle", version=1, feature_size=32)
        result = deploy(
            bundle.path, mosquitto.url, "venv", signing.load_private_key(keys.private), timeout=60
        )
        outcome = result.devices["board-1"]
        assert outcome.outcome == UPDATED, outcome
        aggregator = Aggregator(
            AggregatorConfig(
                mosquitto.url, "venv", bundle.path,
                RoundPolicy(rounds=1, min_devices=1, deadline_s=60, wait_devices_s=30),
                # The board seals with the key it made on first start; pinned at first contact.
                auth=AggregatorAuth(signing.load_private_key(keys.private),
                                    DeviceVerifier(DeviceRegistry(), TOFU)),
            )
        )  # fmt: skip
        summary = aggregator.run()
        assert [(r.status, r.accepted) for r in summary.rounds] == [("closed", 1)]
        deadline = time.monotonic() + 15  # the round shows in the next status (heartbeat 2 s)
        while True:
            row = {r.device_id: r for r in read_fleet(mosquitto.url, "venv", 1.0)}["board-1"]
            if row.last_round == 1 or time.monotonic() > deadline:
                break
        assert (row.model_version, row.last_round, row.profile) == (1, 1, "raspberry-pi")
    finally:
        agent.send_signal(signal.SIGTERM)
        _, stderr = agent.communicate(timeout=30)
    assert agent.returncode == 0, stderr.decode()[-2000:]
    assert (tmp_path / "models" / "current" / "backbone-fp32.onnx").is_file()
    assert sys.executable != str(python)
