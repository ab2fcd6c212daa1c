"""mTLS and ACLs end to end: a real Mosquitto started from exactly what `broker-config` writes,
with certificates the test issues through `edgefl certs`; and the library behind them."""

from __future__ import annotations

import getpass
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from bundles import make_test_bundle
from click.testing import CliRunner
from conftest import wait_for
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from local_mosquitto import LocalMosquitto
from signed_fleet import signed_fleet

from edgefl.cli import main
from edgefl.core.settings import RoundPolicy
from edgefl.delivery.deploy import deploy
from edgefl.delivery.fleet_view import read_fleet
from edgefl.delivery.release import DeployReport
from edgefl.delivery.updater_binding import attach_to_agent
from edgefl.errors import InputError, TransportError
from edgefl.roles.aggregator import Aggregator, AggregatorConfig
from edgefl.roles.coordinator import Coordinator
from edgefl.roles.ingest_worker import IngestWorker, IngestWorkerConfig
from edgefl.security import broker_config, certs
from edgefl.security.device_registry import DeviceRegistry
from edgefl.security.verifiers import STRICT, DeviceVerifier
from edgefl.transport import MqttClient, TlsSettings, topics
from edgefl.transport.broker import free_port
from edgefl.transport.client import Message
from edgefl.transport.messages import (
    DeviceStatus,
    RoundTask,
    UpdateHeader,
    encode_round_task,
    encode_update_error,
)
from edgefl.transport.sealed import seal

FLEET = "secure"


@dataclass
class SecureBroker:
    """A Mosquitto run from `edgefl broker-config`'s files, and the fleet's certificate folder."""

    broker: LocalMosquitto
    certs: Path
    other_ca: Path

    @property
    def url(self) -> str:
        return self.broker.url

    def tls(self, name: str, ca: Path | None = None) -> TlsSettings:
        folder = ca or self.certs
        return TlsSettings(
            str(self.certs / "ca.crt"), str(folder / f"{name}.crt"), str(folder / f"{name}.key")
        )


def _cli(*args: str) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    root = tmp_path_factory.mktemp("secure")
    folder = root / "certs"
    _cli("certs", "init", "--out", str(folder))
    _cli("certs", "issue", "broker", "--role", "broker", "--ca", str(folder),
         "--host", "127.0.0.1", "--host", "localhost")  # fmt: skip
    for name, role in [("pi-1", "device"), ("pi-2", "device"), ("aggregator", "aggregator"),
                       ("operator-ci", "operator")]:  # fmt: skip
        _cli("certs", "issue", name, "--role", role, "--ca", str(folder))
    other = root / "other"
    certs.init_ca(other)
    certs.issue("pi-1", "device", other, other)
    port = free_port()
    # Mosquitto started as root switches to its own account, which cannot read keys made 0600
    # by the test's user: the generated config keeps the test's user instead.
    _cli("broker-config", "--fleet", FLEET, "--certs", str(folder), "--out", str(root / "broker"),
         "--port", str(port), "--bind", "127.0.0.1", "--user", getpass.getuser())  # fmt: skip
    broker = LocalMosquitto(
        root / "broker", port=port, config_file=root / "broker" / "mosquitto.conf", tls=True
    )
    broker.start()
    yield SecureBroker(broker, folder, other)
    broker.stop()


# -- the library: certificates and the generated files --


def test_issued_certificates_name_their_holder_and_keys_are_private(tmp_path: Path) -> None:
    certs.init_ca(tmp_path)
    issued = certs.issue("pi-7", "device", tmp_path, tmp_path / "out")
    cert = x509.load_pem_x509_certificate(issued.cert_path.read_bytes())
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    assert cert.subject.rfc4514_string() == "CN=pi-7"
    assert cert.issuer == ca.subject
    cert.verify_directly_issued_by(ca)
    for key in (tmp_path / "ca.key", issued.key_path):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    with pytest.raises(certs.CertificateError, match="already holds a CA"):
        certs.init_ca(tmp_path)


@pytest.mark.parametrize(
    ("name", "role", "message"),
    [
        ("aggregator", "device", "kept for those roles"),
        ("operator-x", "device", "kept for those roles"),
        ("ci", "operator", "must be named 'operator' or 'operator-...'"),
        ("a/b", "device", "without '/'"),
    ],
)
def test_a_name_that_claims_another_role_is_refused(
    tmp_path: Path, name: str, role: str, message: str
) -> None:
    certs.init_ca(tmp_path)
    with pytest.raises(InputError, match=message):
        certs.issue(name, role, tmp_path, tmp_path)


def test_acl_gives_devices_their_own_topics_and_lists_the_roles_found(tmp_path: Path) -> None:
    certs.init_ca(tmp_path)
    certs.issue("broker", "broker", tmp_path, tmp_path, hosts=("10.0.0.5",))
    certs.issue("operator-ops", "operator", tmp_path, tmp_path)
    files = broker_config.write_broker_config("lab", tmp_path, tmp_path / "b", port=8884)
    acl = files.acl.read_text().splitlines()
    assert "pattern write edgefl/v1/lab/devices/%u/status" in acl
    assert "pattern write edgefl/v1/lab/rounds/+/update/%u" in acl
    assert "pattern write edgefl/v1/lab/devices/%u/deploy" in acl
    assert not [line for line in acl if line.startswith("pattern") and "write" in line
                and "%u" not in line]  # fmt: skip
    assert [line for line in acl if line.startswith("user")] == [
        "user aggregator", "user operator", "user operator-ops"
    ]  # fmt: skip
    config = files.config.read_text().splitlines()
    for line in ("listener 8884", "require_certificate true", "use_identity_as_username true",
                 "allow_anonymous false", "persistence true"):  # fmt: skip
        assert line in config


def test_broker_config_without_the_broker_certificate_is_a_usage_error(tmp_path: Path) -> None:
    certs.init_ca(tmp_path)
    result = CliRunner().invoke(
        main, ["broker-config", "--fleet", "f", "--certs", str(tmp_path), "--out", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert "broker.crt is missing" in result.output


# -- a real Mosquitto from the generated files --


def test_a_device_writes_its_own_status_and_the_broker_drops_another_devices(
    secure: SecureBroker,
) -> None:
    received: list[tuple[str, bytes]] = []
    watcher = MqttClient(secure.url, "acl-watcher", tls=secure.tls("aggregator"))
    watcher.subscribe(topics.all_statuses(FLEET), lambda m: received.append((m.topic, m.payload)))
    watcher.connect()
    device = MqttClient(secure.url, "acl-pi-1", tls=secure.tls("pi-1"))
    device.connect()
    try:
        forged = device.publish(topics.device_status(FLEET, "pi-2"), b"forged")
        own = device.publish(topics.device_status(FLEET, "pi-1"), b"mine")
        assert forged.wait() and own.wait()  # MQTT 3.1.1: the broker acks what it drops
        assert wait_for(lambda: (topics.device_status(FLEET, "pi-1"), b"mine") in received)
        time.sleep(0.3)
        assert received == [(topics.device_status(FLEET, "pi-1"), b"mine")]
    finally:
        device.publish(topics.device_status(FLEET, "pi-1"), b"", retain=True).wait()
        device.close()
        watcher.close()


@pytest.mark.parametrize(
    ("who", "message"),
    [
        ("no certificate", "not authorized"),
        ("another CA", "not authorized"),
        ("no CA file", "TLS handshake failed"),
    ],
)
def test_fleet_refuses_a_client_the_broker_does_not_trust(
    secure: SecureBroker, who: str, message: str
) -> None:
    ca = ["--cafile", str(secure.certs / "ca.crt")]
    args = ca if who == "no certificate" else []
    if who == "another CA":
        other = secure.other_ca
        args = [*ca, "--cert", str(other / "pi-1.crt"), "--key", str(other / "pi-1.key")]
    started = time.monotonic()
    result = CliRunner().invoke(
        main, ["fleet", "--broker", secure.url, "--fleet", FLEET, "--insecure", *args]
    )
    assert result.exit_code == 1, result.output
    assert message in result.output
    assert secure.url in result.output  # names the broker
    assert time.monotonic() - started < 5  # refused at once, not at the connect timeout


def test_fleet_over_mtls_as_the_operator(secure: SecureBroker) -> None:
    tls = secure.tls("operator-ci")
    result = CliRunner().invoke(
        main, ["fleet", "--broker", secure.url, "--fleet", FLEET, "--json", "--insecure",
               "--cafile", str(tls.cafile), "--cert", str(tls.certfile), "--key", str(tls.keyfile)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "[]"


def test_tls_files_with_a_plain_url_or_a_cert_without_key_are_usage_errors(
    secure: SecureBroker,
) -> None:
    ca = str(secure.certs / "ca.crt")
    plain = CliRunner().invoke(main, ["fleet", "--broker", "mqtt://127.0.0.1:1", "--fleet", "f",
                                      "--cafile", ca, "--insecure"])  # fmt: skip
    assert plain.exit_code == 2
    assert "need an mqtts:// broker URL" in plain.output
    half = CliRunner().invoke(main, ["fleet", "--broker", secure.url, "--fleet", "f", "--insecure",
                                     "--cert", str(secure.certs / "pi-1.crt")])  # fmt: skip
    assert half.exit_code == 2


def test_a_signed_federation_and_deploy_over_mtls_and_acls_refuse_a_rogue_board(
    secure: SecureBroker, tmp_path: Path
) -> None:
    """Every layer on: mTLS, the generated ACL, sealed messages, strict enrollment. A rogue
    holding pi-1's certificate (not its signing key) tries the attacks of test_rogue_clients;
    the broker refuses those outside pi-1's own topics, edgefl the rest."""
    bundle = make_test_bundle(tmp_path / "bundle", feature_size=16)
    state = tmp_path / "state.sqlite"
    names = ("pi-1", "pi-2")
    fleet = signed_fleet(secure.url, FLEET, bundle.path, state, names,
                         tls={name: secure.tls(name) for name in names})  # fmt: skip
    fleet_key, agents = fleet.key, fleet.agents
    for agent in agents:
        attach_to_agent(agent, tmp_path / f"models-{agent.device_id}", fleet_key.public_key())
    rogue_key = Ed25519PrivateKey.generate()
    rogue = MqttClient(secure.url, "rogue-with-pi-1-cert", tls=secure.tls("pi-1"))

    def forge(topic: str, payload: bytes) -> None:
        rogue.publish(topic, seal(rogue_key, topic, payload), qos=1)

    def attack(message: Message) -> None:
        if not message.payload or topics.parse(message.topic).round_number != 1:  # type: ignore[union-attr]
            return
        error = UpdateHeader(round=1, device_id="pi-2", task="default", samples=1,
                             head_version=0, status="error")  # fmt: skip
        task = RoundTask(round=90, selected=["pi-1", "pi-2"], tasks=["default"], head_version=0,
                         model_version=1)  # fmt: skip
        forge(topics.round_task(FLEET, 90), encode_round_task(task, {}))  # not its topic
        forge(topics.round_update(FLEET, 1, "pi-2"), encode_update_error(error))  # not its topic
        forge(topics.device_status(FLEET, "pi-2"), DeviceStatus("pi-2", "offline").encode())
        forge(topics.deploy_report(FLEET, "pi-2"),
              DeployReport("pi-2", 11, "installed", running_version=11).to_bytes())  # fmt: skip
        own = replace(error, device_id="pi-1")  # its own topics pass the ACL: edgefl refuses
        forge(topics.round_update(FLEET, 1, "pi-1"), encode_update_error(own))
        forge(topics.device_status(FLEET, "pi-1"), DeviceStatus("pi-1", "offline").encode())

    rogue.subscribe(topics.all_tasks(FLEET), attack)
    rogue.connect(timeout=10)
    for agent in agents:
        agent.start()
    auth = fleet.aggregator_auth()
    try:
        aggregator = Aggregator(AggregatorConfig(
            secure.url, FLEET, bundle.path, RoundPolicy(rounds=2, min_devices=2, deadline_s=30),
            tls=secure.tls("aggregator"), state_path=state, auth=auth,
        ))  # fmt: skip
        summary = aggregator.run()
        checked = DeviceVerifier(DeviceRegistry(state), STRICT)
        release = deploy(make_test_bundle(tmp_path / "v2", version=2, feature_size=16).path,
                         secure.url, FLEET, fleet_key, timeout=60, tls=secure.tls("operator-ci"),
                         device_keys=checked)  # fmt: skip
        view = {r.device_id: r for r in read_fleet(secure.url, FLEET, tls=secure.tls("operator-ci"),
                                                   devices=checked)}  # fmt: skip
    finally:
        for agent in agents:
            agent.stop()
        rogue.close()
    assert [(r.status, r.accepted) for r in summary.rounds] == [("closed", 2), ("closed", 2)]
    assert summary.head_version == 2
    # Only what pi-1's certificate may publish reached edgefl: its own update and status.
    assert dict(auth.refused) == {"bad-signature": 2}
    assert [dict(a.auth.refused) for a in agents] == [{}, {}]  # the forged task never came
    assert {d: o.outcome for d, o in release.devices.items()} == {
        "pi-1": "updated",
        "pi-2": "updated",
    }
    assert release.refused == {} and view["pi-2"].last_deploy == "v2 installed"
    assert all(view[d].key == "enrolled" and not view[d].refused for d in ("pi-1", "pi-2"))


def test_ingest_workers_run_behind_the_generated_acl_with_the_aggregators_certificate(
    secure: SecureBroker, tmp_path: Path
) -> None:
    """`aggregate --workers`: the coordinator and a worker, both holding the aggregator's
    certificate, talk on the fleet's ingest/ topics, which the generated ACL grants it."""
    bundle = make_test_bundle(tmp_path / "bundle", feature_size=16)
    names = ("pi-1", "pi-2")
    fleet = signed_fleet(secure.url, FLEET, bundle.path, tmp_path / "state.sqlite", names,
                         tls={name: secure.tls(name) for name in names})  # fmt: skip
    worker = IngestWorker(IngestWorkerConfig(secure.url, FLEET, "w0", fleet.key,
                                             tls=secure.tls("aggregator")))  # fmt: skip
    thread = threading.Thread(target=worker.run_forever, daemon=True)
    thread.start()
    for agent in fleet.agents:
        agent.start()
    try:
        coordinator = Coordinator(AggregatorConfig(
            secure.url, FLEET, bundle.path, RoundPolicy(rounds=2, min_devices=2, deadline_s=30),
            tls=secure.tls("aggregator"), state_path=fleet.state, auth=fleet.aggregator_auth(),
        ), workers=1)  # fmt: skip
        summary = coordinator.run()
    finally:
        for agent in fleet.agents:
            agent.stop()
        worker.stop()
        thread.join(20)
    assert [(r.status, r.accepted) for r in summary.rounds] == [("closed", 2), ("closed", 2)]


# -- the embedded broker: a password file, TLS --


def test_embedded_broker_refuses_a_wrong_password(tmp_path: Path) -> None:
    from edgefl.transport.broker import EmbeddedBroker, password_line

    passwords = tmp_path / "passwd"
    passwords.write_text(password_line("pi-1", "right horse") + "\n")
    with EmbeddedBroker(port=0, password_file=passwords) as broker:
        host = broker.url.removeprefix("mqtt://")
        good = MqttClient(f"mqtt://pi-1:right%20horse@{host}", "pw-good")
        good.connect()
        good.close()
        bad = MqttClient(f"mqtt://pi-1:wrong@{host}", "pw-bad")
        with pytest.raises(TransportError, match="not authorized") as refused:
            bad.connect(timeout=10)
        assert host in str(refused.value)
        anonymous = MqttClient(f"mqtt://{host}", "pw-none")
        with pytest.raises(TransportError, match="not authorized"):
            anonymous.connect(timeout=10)
        assert broker.wait_idle()


def test_embedded_broker_serves_tls_with_a_fleet_certificate(tmp_path: Path) -> None:
    from edgefl.transport.broker import EmbeddedBroker

    certs.init_ca(tmp_path)
    issued = certs.issue("broker", "broker", tmp_path, tmp_path, hosts=("127.0.0.1",))
    received = threading.Event()
    with EmbeddedBroker(port=0, certfile=issued.cert_path, keyfile=issued.key_path) as broker:
        assert broker.url.startswith("mqtts://")
        client = MqttClient(broker.url, "tls-client", tls=TlsSettings(str(tmp_path / "ca.crt")))
        client.subscribe("t", lambda _m: received.set())
        client.connect()
        client.publish("t", b"x").wait()
        assert received.wait(10)
        client.close()
        untrusting = MqttClient(broker.url, "tls-untrusting")
        with pytest.raises(TransportError, match="TLS handshake failed"):
            untrusting.connect(timeout=10)
        assert broker.wait_idle()
