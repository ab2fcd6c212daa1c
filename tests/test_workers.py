"""`aggregate --workers N`: a coordinator and ingest workers sharing updates through a real
Mosquitto's shared subscriptions, against the same federation run by one process."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bundles import make_test_bundle
from click.testing import CliRunner
from conftest import RunningBroker, wait_for
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from signed_fleet import SignedFleet, signed_fleet

from edgefl.bundle import ModelBundle, decode_head
from edgefl.cli import main
from edgefl.core.settings import RoundPolicy
from edgefl.errors import TransportError
from edgefl.head import Weights
from edgefl.roles.aggregator import Aggregator, AggregatorConfig, FederationSummary
from edgefl.roles.coordinator import Coordinator
from edgefl.roles.ingest_worker import IngestWorker, IngestWorkerConfig
from edgefl.roles.record import AggregatorRecord
from edgefl.roles.summary import summaries_from_record
from edgefl.transport import ingest, topics
from edgefl.transport.broker import EmbeddedBroker
from edgefl.transport.client import Message, MqttClient
from edgefl.transport.messages import DeviceStatus
from edgefl.transport.sealed import raw_public_key, seal

EDGEFL = str(Path(sys.executable).parent / "edgefl")
NAMES = ("pi-1", "pi-2", "pi-3", "pi-4")


def _policy(rounds: int = 3, **kwargs: Any) -> RoundPolicy:
    return RoundPolicy(rounds=rounds, min_devices=len(NAMES), deadline_s=30, **kwargs)


def _config(url: str, name: str, bundle: ModelBundle, fleet: SignedFleet, **kwargs: Any) -> (
    AggregatorConfig
):  # fmt: skip
    policy = kwargs.pop("policy", _policy())
    return AggregatorConfig(url, name, bundle.path, policy, state_path=fleet.state,
                            auth=fleet.aggregator_auth(), **kwargs)  # fmt: skip


@contextmanager
def _agents(fleet: SignedFleet) -> Iterator[None]:
    for agent in fleet.agents:
        agent.start()
    try:
        yield
    finally:
        for agent in fleet.agents:
            agent.stop()


@contextmanager
def _worker_threads(url: str, name: str, key: Ed25519PrivateKey, count: int) -> Iterator[None]:
    workers = [IngestWorker(IngestWorkerConfig(url, name, f"w{i}", key)) for i in range(count)]
    threads = [threading.Thread(target=w.run_forever, daemon=True) for w in workers]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        for worker in workers:
            worker.stop()
        for thread in threads:
            thread.join(20)


def _run(server: Aggregator) -> tuple[FederationSummary, Weights]:
    summary = server.run()
    return summary, server.heads["default"]


def _single_process(url: str, name: str, bundle: ModelBundle, tmp_path: Path,
                    strategy: str = "fedavg") -> Weights:  # fmt: skip
    fleet = signed_fleet(url, name, bundle.path, tmp_path / f"{name}.sqlite", NAMES)
    with _agents(fleet):
        summary, head = _run(Aggregator(_config(url, name, bundle, fleet, strategy=strategy)))
    assert [(r.status, r.accepted) for r in summary.rounds] == [("closed", 4)] * 3
    return head


def _key_file(key: Ed25519PrivateKey, path: Path) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))  # fmt: skip
    path.chmod(0o600)
    return path


@pytest.mark.slow
def test_two_worker_processes_give_the_head_one_process_gives(
    mosquitto: RunningBroker, tmp_path: Path
) -> None:
    """Signed end to end, the CLI with two `aggregate-worker` processes. FedAvg's mean comes
    from partial sums (Σ wΔ per worker, added, / Σ w) instead of Σ (w / Σ w) Δ over all
    updates: the same float64 numbers added in another order, so the float32 heads agree to
    about 1e-7 of their size (here they came out bit for bit)."""
    bundle = make_test_bundle(tmp_path / "bundle", feature_size=16)
    alone = _single_process(mosquitto.url, "alone", bundle, tmp_path)
    fleet = signed_fleet(mosquitto.url, "split", bundle.path, tmp_path / "split.sqlite", NAMES)
    key = _key_file(fleet.key, tmp_path / "signing.key")
    out = tmp_path / "out"
    with _agents(fleet):
        result = subprocess.run(
            [EDGEFL, "aggregate", "--broker", mosquitto.url, "--fleet", "split", "--bundle",
             str(bundle.path), "--rounds", "3", "--min-devices", "4", "--deadline", "30",
             "--state", str(fleet.state), "--out", str(out), "--signing-key", str(key),
             "--workers", "2"],
            capture_output=True, text=True, timeout=240,
        )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 ingest workers (2 here)" in " ".join(result.stdout.split())
    assert "round   3  closed" in result.stdout, result.stdout
    split = decode_head((out / "head.safetensors").read_bytes())
    assert not np.array_equal(split["0.weight"], bundle.head_weights("default")["0.weight"])
    for name, values in alone.items():
        np.testing.assert_allclose(split[name], values, rtol=1e-6, atol=1e-7)
    record = AggregatorRecord(fleet.state)
    try:
        answers = [r.result["answers"] for r in record.rounds()]
    finally:
        record.close()
    assert answers == [dict.fromkeys(NAMES, "accepted")] * 3


def test_a_robust_strategy_gathers_the_deltas_from_the_workers(
    mosquitto: RunningBroker, tmp_path: Path
) -> None:
    bundle = make_test_bundle(tmp_path / "bundle", feature_size=16)
    alone = _single_process(mosquitto.url, "median-alone", bundle, tmp_path, "trimmed-mean")
    name = "median-split"
    fleet = signed_fleet(mosquitto.url, name, bundle.path, tmp_path / f"{name}.sqlite", NAMES)
    with _agents(fleet), _worker_threads(mosquitto.url, name, fleet.key, 2):
        config = _config(mosquitto.url, name, bundle, fleet, strategy="trimmed-mean")
        summary, split = _run(Coordinator(config, workers=2))
    assert [(r.status, r.accepted) for r in summary.rounds] == [("closed", 4)] * 3
    for parameter, values in alone.items():
        np.testing.assert_allclose(split[parameter], values, rtol=1e-6, atol=1e-7)


def _silent_device(fleet: SignedFleet, bundle: ModelBundle, name: str, url: str) -> MqttClient:
    """An enrolled, online, selected device that never answers: rounds last to their deadline."""
    silent = Ed25519PrivateKey.generate()
    fleet.registry.enroll("pi-9", raw_public_key(silent))
    status = DeviceStatus("pi-9", "online", samples=50, time=time.time(),
                          model_version=bundle.manifest.version,
                          bundle_digest=bundle.digest)  # fmt: skip
    topic = topics.device_status(name, "pi-9")
    client = MqttClient(url, f"silent-{name}")
    client.connect(timeout=10)
    client.publish(topic, seal(silent, topic, status.encode()), qos=1, retain=True).wait()
    return client


@pytest.mark.slow
def test_a_worker_killed_mid_round_loses_only_its_share_and_may_restart(
    mosquitto: RunningBroker, tmp_path: Path
) -> None:
    bundle = make_test_bundle(tmp_path / "bundle", feature_size=16)
    name = "killed"
    fleet = signed_fleet(mosquitto.url, name, bundle.path, tmp_path / "killed.sqlite", NAMES)
    key = _key_file(fleet.key, tmp_path / "signing.key")
    silent = _silent_device(fleet, bundle, name, mosquitto.url)
    command = [EDGEFL, "aggregate-worker", "--broker", mosquitto.url, "--fleet", name,
               "--signing-key", str(key)]  # fmt: skip
    workers = {w: subprocess.Popen([*command, "--worker-id", w]) for w in ("w0", "w1")}
    policy = RoundPolicy(rounds=2, min_devices=5, deadline_s=8, quorum=0.2)
    coordinator = Coordinator(_config(mosquitto.url, name, bundle, fleet, policy=policy),
                              workers=2, collect_timeout_s=5)  # fmt: skip
    outcome: list[FederationSummary] = []
    runner = threading.Thread(target=lambda: outcome.append(coordinator.run()))
    try:
        with _agents(fleet):
            runner.start()

            def w0_holds() -> list[str]:
                with coordinator._cond:
                    return coordinator.engine.holders().get("w0", [])

            assert wait_for(lambda: bool(w0_holds()), 60), "w0 never held an update"
            held = w0_holds()
            workers["w0"].kill()  # kill -9, mid-round: the round is open until its deadline
            workers["w0"].wait(10)

            def w0_state() -> str:
                status = coordinator.workers.get("w0")
                return status.state if status is not None else ""

            assert wait_for(lambda: w0_state() == "offline", 20), "w0's will never came"
            # Restarted under the same ID while round 1 is still open: it starts from the
            # retained round with nothing held, and must not bring the lost share back.
            workers["w0 again"] = subprocess.Popen([*command, "--worker-id", "w0"])
            assert wait_for(lambda: w0_state() == "online", 60), "w0 did not come back"
            runner.join(120)
    finally:
        silent.close()
        for process in workers.values():
            process.kill()
            process.wait(10)
    assert outcome, "the coordinator did not finish"
    first, second = outcome[0].rounds
    assert first.status == "closed" and first.rejected["worker-lost"] >= len(held)
    assert first.accepted + first.rejected["worker-lost"] <= 4
    record = AggregatorRecord(fleet.state)
    try:
        answers = [r.result["answers"] for r in record.rounds()]
        summaries = summaries_from_record(record)
    finally:
        record.close()
    assert all(answers[0][device] == "worker-lost" for device in held)
    assert summaries[0].rejected["worker-lost"] == first.rejected["worker-lost"]  # metrics files
    assert sum(a == "accepted" for a in answers[0].values()) == first.accepted
    # The next round runs on w1 and the restarted w0; every board that answers is counted.
    assert (second.status, second.accepted) == ("closed", 4)
    assert answers[1] == {**dict.fromkeys(NAMES, "accepted"), "pi-9": "no-answer"}
    assert set(coordinator.engine.holders()) == {"w0", "w1"}  # round 2: the restarted w0 too
    assert outcome[0].head_version == 2


class ForgingWorker:
    """Claims to be an ingest worker without the fleet key: a status holding every round,
    notes accepting pi-1 with a huge weight, and a partial answering every collect."""

    def __init__(self, url: str, fleet: str) -> None:
        self.fleet = fleet
        self.key = Ed25519PrivateKey.generate()
        self.client = MqttClient(url, f"forger-{fleet}")
        self.client.subscribe(ingest.ingest_round(fleet), self.on_round)
        self.client.subscribe(ingest.ingest_collect(fleet), self.on_collect)
        self.sent = 0

    def publish(self, kind: str, payload: bytes) -> None:
        topic = ingest.worker_topic(self.fleet, "ghost", kind)
        self.client.publish(topic, seal(self.key, topic, payload), qos=1)
        self.sent += 1

    def on_round(self, message: Message) -> None:
        announced = ingest.IngestRound.decode(message.payload[100:])  # its seal is not checked
        status = ingest.WorkerStatus("ghost", "online", announced.run_id, announced.round,
                                     announced.head_digest)  # fmt: skip
        self.publish("status", status.encode())
        note = ["accepted", announced.round, "pi-1", "", "", "default", 10_000, "f" * 64, 10,
                {}, 1.0]  # fmt: skip
        self.publish("notes", ingest.VerdictNotes("ghost", announced.run_id, [note]).encode())

    def on_collect(self, message: Message) -> None:
        request = ingest.Collect.decode(message.payload[100:])
        header = ingest.PartialHeader("ghost", request.run_id, request.round,
                                      request.head_digest, request.collect_id, request.phase,
                                      devices=["pi-1"], weights={"default": 1.0})  # fmt: skip
        tensors = {"sum/default/0.weight": np.full((10, 16), 1e3),
                   "sum/default/0.bias": np.full(10, 1e3)}  # fmt: skip
        self.publish("partial", ingest.encode_partial(header, tensors))


def test_a_forged_worker_is_refused_and_changes_nothing(
    mosquitto: RunningBroker, tmp_path: Path
) -> None:
    bundle = make_test_bundle(tmp_path / "bundle", feature_size=16)
    alone = _single_process(mosquitto.url, "honest", bundle, tmp_path)
    name = "forged"
    fleet = signed_fleet(mosquitto.url, name, bundle.path, tmp_path / f"{name}.sqlite", NAMES)
    forger = ForgingWorker(mosquitto.url, name)
    forger.client.connect(timeout=10)
    try:
        with _agents(fleet), _worker_threads(mosquitto.url, name, fleet.key, 2):
            coordinator = Coordinator(_config(mosquitto.url, name, bundle, fleet), workers=2)
            summary, split = _run(coordinator)
    finally:
        forger.client.close()
    assert forger.sent >= 3 * 3  # status and notes per round, a partial per collect
    # Every forgery that came while the run listened (the last partial may come after it).
    assert 2 * 3 <= coordinator.refused["bad-signature"] <= forger.sent
    assert "ghost" not in coordinator.workers
    assert [(r.status, r.accepted, r.rejected) for r in summary.rounds] == [("closed", 4, {})] * 3
    for parameter, values in alone.items():
        np.testing.assert_allclose(split[parameter], values, rtol=1e-6, atol=1e-7)


def test_a_broker_without_shared_subscriptions_is_refused_with_a_reason() -> None:
    with EmbeddedBroker(port=0) as broker:
        worker = IngestWorker(IngestWorkerConfig(broker.url, "lab", "w0"))
        with pytest.raises(TransportError, match=r"shared subscription \(\$share/...\)"):
            worker.start(timeout=2)


def test_workers_with_async_mode_is_a_usage_error(tmp_path: Path) -> None:
    bundle = make_test_bundle(tmp_path / "bundle")
    result = CliRunner().invoke(main, [
        "aggregate", "--broker", "mqtt://127.0.0.1:1", "--fleet", "lab", "--bundle",
        str(bundle.path), "--mode", "async", "--workers", "2", "--insecure",
    ])  # fmt: skip
    assert result.exit_code == 2
    assert "--mode async runs in one process" in result.output


@pytest.mark.slow
def test_a_coordinator_killed_mid_round_resumes_with_what_the_workers_hold(
    mosquitto: RunningBroker, tmp_path: Path
) -> None:
    bundle = make_test_bundle(tmp_path / "bundle", feature_size=16)
    name = "resumed"
    fleet = signed_fleet(mosquitto.url, name, bundle.path, tmp_path / "resumed.sqlite", NAMES)
    key = _key_file(fleet.key, tmp_path / "signing.key")
    silent = _silent_device(fleet, bundle, name, mosquitto.url)
    command = [EDGEFL, "aggregate-worker", "--broker", mosquitto.url, "--fleet", name,
               "--signing-key", str(key)]  # fmt: skip
    workers = [subprocess.Popen([*command, "--worker-id", w]) for w in ("w0", "w1")]
    coordinate = [
        EDGEFL, "aggregate", "--broker", mosquitto.url, "--fleet", name, "--bundle",
        str(bundle.path), "--rounds", "1", "--min-devices", "5", "--deadline", "10",
        "--quorum", "0.2", "--state", str(fleet.state), "--signing-key", str(key),
        "--remote-workers", "2",
    ]  # fmt: skip

    def accepted() -> int:
        record = AggregatorRecord(fleet.state)
        try:
            return record.update_counts(1).get("accepted", 0)
        finally:
            record.close()

    try:
        with _agents(fleet):
            first = subprocess.Popen(coordinate, stdout=subprocess.DEVNULL)
            assert wait_for(lambda: accepted() == len(NAMES), 90), "the boards never answered"
            first.kill()  # kill -9 with round 1 open (pi-9 keeps it open to its deadline)
            first.wait(10)
            again = subprocess.run(coordinate, capture_output=True, text=True, timeout=120)
    finally:
        silent.close()
        for process in workers:
            process.kill()
            process.wait(10)
    assert again.returncode == 0, again.stderr[-3000:]
    record = AggregatorRecord(fleet.state)
    try:
        (round_,) = record.rounds()
        counts = record.update_counts(1)
    finally:
        record.close()
    # The deltas were on the workers, which sent their notes again for the re-announced round:
    # every answer counts, once.
    assert round_.status == "closed" and round_.result["accepted"] == len(NAMES)
    assert round_.result["answers"] == {**dict.fromkeys(NAMES, "accepted"), "pi-9": "no-answer"}
    assert counts.get("accepted") == len(NAMES)


def test_aggregate_worker_names_what_is_missing(tmp_path: Path) -> None:
    base = ["aggregate-worker", "--broker", "mqtt://127.0.0.1:1", "--fleet", "lab"]
    missing = CliRunner().invoke(main, [*base, "--worker-id", "w0", "--signing-key",
                                        str(tmp_path / "none.key")])  # fmt: skip
    assert missing.exit_code == 2 and "no signing key at" in missing.output
    bad = CliRunner().invoke(main, [*base, "--worker-id", "a/b", "--insecure"])
    assert bad.exit_code == 2 and "worker 'a/b' must be 1-128 characters" in bad.output
