"""`edgefl simulate --shard I/N`: slices of one simulated fleet in several processes, one broker;
and what a large fleet needs of the process (open files)."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from bundles import make_test_bundle
from conftest import RunningBroker

from edgefl.bundle import ModelBundle
from edgefl.errors import SimulationError
from edgefl.simulation.config import SimulationConfig
from edgefl.simulation.fleet_keys import SimulatedFleetKeys
from edgefl.simulation.shard import ShardSpec


@pytest.mark.parametrize(
    ("text", "says"),
    [("2", "must be I/N"), ("a/2", "must be I/N"), ("0/2", "between 1 and N"), ("3/2", "between")],
)
def test_bad_shard_specs_are_refused(text: str, says: str) -> None:
    with pytest.raises(SimulationError, match=says):
        ShardSpec.parse(text)


@pytest.mark.parametrize("devices", [1, 5, 6, 10_000])
@pytest.mark.parametrize("count", [1, 2, 3, 7])
def test_the_shards_take_every_device_once_in_slices_within_one(devices: int, count: int) -> None:
    fleet = list(range(devices))
    slices = [ShardSpec(i, count).take(fleet) for i in range(1, count + 1)]
    assert [d for s in slices for d in s] == fleet
    assert max(map(len, slices)) - min(map(len, slices)) <= 1
    assert ShardSpec.parse(" 2/3 ") == ShardSpec(2, 3) and str(ShardSpec(2, 3)) == "2/3"


def test_shards_derive_the_same_keys_and_a_plain_run_fresh_ones() -> None:
    one, two = (SimulatedFleetKeys(derive_from="sim:0") for _ in range(2))
    assert one.agent("d1").raw == two.agent("d1").raw  # type: ignore[union-attr]
    fresh = SimulatedFleetKeys(), SimulatedFleetKeys()
    assert fresh[0].agent("d1").raw != fresh[1].agent("d1").raw  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({}, "--shard needs --broker"),
        ({"broker_url": "memory"}, "--shard needs --broker"),
        ({"broker_url": "mqtt://h", "churn": "join:0.2@2"}, "no churn"),
    ],
)
def test_a_shard_needs_a_shared_broker_and_no_churn(options: dict[str, str], says: str) -> None:
    config = SimulationConfig(shard=ShardSpec(1, 2), **options)  # type: ignore[arg-type]
    with pytest.raises(SimulationError, match=says):
        config.check()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> ModelBundle:
    return make_test_bundle(tmp_path_factory.mktemp("bundle") / "bundle")


def _simulate(bundle: ModelBundle, out: Path, *options: str) -> list[str]:
    return [
        sys.executable, "-c", "from edgefl.cli import main; main()", "simulate",
        "--devices", "6", "--rounds", "3", "--bundle", str(bundle.path), "--out", str(out),
        *options,
    ]  # fmt: skip


@pytest.mark.slow
def test_two_shard_processes_run_one_fleet_as_one_process_does(
    bundle: ModelBundle, mosquitto: RunningBroker, tmp_path: Path
) -> None:
    shared = ["--broker", mosquitto.url, "--fleet", "sharded"]
    # Shard 2 first: its devices wait for the aggregator that shard 1 brings.
    second = subprocess.Popen(
        _simulate(bundle, tmp_path / "s2", *shared, "--shard", "2/2"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    first = subprocess.run(
        _simulate(bundle, tmp_path / "s1", *shared, "--shard", "1/2"),
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    second_output, _ = second.communicate(timeout=120)
    assert first.returncode == 0, first.stdout + first.stderr
    assert second.returncode == 0, second_output
    assert "starting 3 of 6 devices" in first.stdout and "(shard 1/2)" in first.stdout
    assert "starting 3 of 6 devices" in second_output and "(shard 2/2)" in second_output
    whole = subprocess.run(
        _simulate(bundle, tmp_path / "whole", "--broker", "memory"),
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert whole.returncode == 0, whole.stdout + whole.stderr
    runs = {
        name: json.loads((tmp_path / name / "metrics.json").read_text())["rounds"]
        for name in ("s1", "s2", "whole")
    }
    # Every device of the fleet answered every round, and both shards report the same rounds
    # as the single process with the same seeds: the same plan, split across two processes.
    for name in ("s1", "s2"):
        assert [r["reported"] for r in runs[name]] == [6, 6, 6]
        assert [r["accuracy"] for r in runs[name]] == [r["accuracy"] for r in runs["whole"]]


_MAKE_ROOM = """
import resource, sys
from edgefl.errors import SimulationError
from edgefl.simulation.run_broker import SimulationBroker
from edgefl.transport.tls import TlsSettings
soft, hard = (int(v) for v in sys.argv[1:3])
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
try:
    SimulationBroker(sys.argv[3], TlsSettings()).make_room(int(sys.argv[4]))
except SimulationError as exc:
    print("refused:", exc)
print("soft", resource.getrlimit(resource.RLIMIT_NOFILE)[0])
"""


@pytest.mark.parametrize(
    ("broker", "clients", "hard", "says"),
    [
        ("mqtt://h", 1000, 4096, "soft 1256"),  # raised for 1,000 sockets and spare files
        ("mqtt://h", 10_000, 4096, "refused: 10000 MQTT connections need 10256 open files"),
        ("memory", 10_000, 4096, "soft 512"),  # in-process: no sockets, nothing to raise
    ],
)
def test_a_simulation_raises_its_open_file_limit_or_says_why_it_cannot(
    broker: str, clients: int, hard: int, says: str
) -> None:
    _, current_hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if current_hard != resource.RLIM_INFINITY and current_hard < hard:
        pytest.skip(f"the hard open-file limit here is {current_hard}")
    result = subprocess.run(
        [sys.executable, "-c", _MAKE_ROOM, "512", str(hard), broker, str(clients)],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    assert says in result.stdout, result.stdout + result.stderr
