"""A whole federation as real processes: `edgefl agent` x2 and `edgefl aggregate` over Mosquitto."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from bundles import digits_devices, make_test_bundle, write_npz
from conftest import RunningBroker, wait_for

from edgefl import signing
from edgefl.roles.record import AggregatorRecord

EDGEFL = str(Path(sys.executable).parent / "edgefl")


@pytest.mark.slow
def test_agents_and_aggregator_as_processes_raise_accuracy_and_persist_state(
    mosquitto: RunningBroker, tmp_path: Path
) -> None:
    bundle = make_test_bundle(tmp_path / "bundle", feature_size=32)
    devices, test = digits_devices(2)
    eval_file = write_npz(test, tmp_path / "eval.npz")
    # Signed end to end: the fleet key seals tasks and results; each agent makes its own key
    # on first start and is enrolled with it before the aggregator runs (strict enrollment).
    keys = signing.init_keys(tmp_path / "keys")
    out = tmp_path / "out"
    state = out / "state.sqlite"
    agents = []
    for index, dataset in enumerate(devices):
        data = write_npz(dataset, tmp_path / f"device-{index}.npz")
        command = [
            EDGEFL, "agent", "--broker", mosquitto.url, "--fleet", "proc", "--device-id",
            f"pi-{index}", "--data", str(data), "--bundle", str(bundle.path),
            "--state-dir", str(tmp_path / f"agent-{index}"), "--trust-key", str(keys.public),
        ]  # fmt: skip
        agents.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    try:
        for index in range(2):
            public = tmp_path / f"agent-{index}" / "device.pub"
            assert wait_for(public.exists, 60), f"agent {index} made no key"
            enrolled = subprocess.run(
                [EDGEFL, "devices", "enroll", f"pi-{index}", "--key", str(public),
                 "--state", str(state)], capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert enrolled.returncode == 0, enrolled.stderr
        result = subprocess.run(
            [
                EDGEFL, "aggregate", "--broker", mosquitto.url, "--fleet", "proc", "--bundle",
                str(bundle.path), "--rounds", "4", "--min-devices", "2", "--deadline", "60",
                "--eval", str(eval_file), "--out", str(out), "--epochs", "2",
                "--signing-key", str(keys.private),
            ],
            capture_output=True, text=True, timeout=240,
        )  # fmt: skip
    finally:
        for process in agents:
            process.send_signal(signal.SIGTERM)
        for process in agents:
            _, stderr = process.communicate(timeout=30)
            assert process.returncode == 0, stderr.decode()[-2000:]
    assert result.returncode == 0, result.stderr[-2000:]
    assert "round   4  closed" in result.stdout
    rows = json.loads((out / "metrics.json").read_text())
    accuracy = [row["accuracy"] for row in rows]
    assert [row["accepted"] for row in rows] == [2, 2, 2, 2]
    assert accuracy[-1] > accuracy[0] + 0.1, accuracy
    assert accuracy[-1] > 0.6, accuracy
    assert rows[0]["bytes_per_update"] > 0
    assert (out / "head.safetensors").is_file()
    state = AggregatorRecord(out / "state.sqlite")
    try:
        assert [(r.round, r.status, sorted(r.selected)) for r in state.rounds()] == [
            (n, "closed", ["pi-0", "pi-1"]) for n in range(1, 5)
        ]
        assert [v for _, v, _ in state.head_versions()] == [0, 1, 2, 3, 4]
        assert state.metrics()[4]["accuracy"] == pytest.approx(accuracy[-1])
    finally:
        state.close()


def test_aggregate_reports_missing_devices_in_one_line(
    mosquitto: RunningBroker, tmp_path: Path
) -> None:
    bundle = make_test_bundle(tmp_path / "bundle")
    result = subprocess.run(
        [EDGEFL, "aggregate", "--broker", mosquitto.url, "--fleet", "empty", "--bundle",
         str(bundle.path), "--rounds", "1", "--wait-devices", "0.5", "--insecure"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("error: only 0 of 1 devices needed are online after 0.5 s")
    )


def test_agent_with_unreachable_broker_fails_in_one_line(tmp_path: Path) -> None:
    from conftest import free_port

    bundle = make_test_bundle(tmp_path / "bundle")
    result = subprocess.run(
        [EDGEFL, "agent", "--broker", f"mqtt://127.0.0.1:{free_port()}", "--fleet", "x",
         "--device-id", "pi", "--data", "digits", "--bundle", str(bundle.path),
         "--connect-timeout", "1", "--insecure"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert "cannot connect to the broker" in result.stderr.strip().splitlines()[-1]
