"""Broker URLs, the embedded amqtt broker, and `edgefl broker`."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port

from edgefl.errors import TransportError
from edgefl.transport.broker import BrokerAddress, EmbeddedBroker, parse_broker_url
from edgefl.transport.client import MqttClient


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://broker.lan", BrokerAddress("broker.lan", 1883)),
        ("mqtt://10.0.0.5:1999", BrokerAddress("10.0.0.5", 1999)),
        ("mqtts://broker.lan", BrokerAddress("broker.lan", 8883, tls=True)),
        (
            "mqtt://pi:p%40ss%3Aword@h",
            BrokerAddress("h", 1883, username="pi", password="p@ss:word"),
        ),
        ("broker.lan:2000", BrokerAddress("broker.lan", 2000)),
        ("mqtt://ann:secret@h:1", BrokerAddress("h", 1, username="ann", password="secret")),
    ],
)
def test_parse_broker_url(url: str, expected: BrokerAddress) -> None:
    assert parse_broker_url(url) == expected


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://h", "must start with mqtt:// or mqtts://"),
        ("mqtt://h:99999", "invalid port"),
        ("mqtt://:1883", "has no host"),
    ],
)
def test_parse_broker_url_rejects(url: str, message: str) -> None:
    with pytest.raises(TransportError, match=message):
        parse_broker_url(url)


def test_embedded_broker_carries_messages() -> None:
    with EmbeddedBroker(port=0) as broker:
        received: list[bytes] = []
        sub = MqttClient(broker.url, "emb-sub")
        sub.subscribe("edgefl/#", lambda m: received.append(m.payload))
        sub.connect()
        pub = MqttClient(broker.url, "emb-pub")
        pub.connect()
        try:
            assert pub.publish("edgefl/v1/x", b"over amqtt", qos=1).wait(5)
            deadline = time.monotonic() + 5
            while not received and time.monotonic() < deadline:
                time.sleep(0.01)
            assert received == [b"over amqtt"]
        finally:
            pub.close()
            sub.close()


def test_embedded_broker_reports_a_taken_port() -> None:
    with EmbeddedBroker(port=0) as first:
        second = EmbeddedBroker(port=first.port)
        with pytest.raises(TransportError, match=f"could not listen on 127.0.0.1:{first.port}"):
            second.start(timeout=5)


@pytest.mark.slow
def test_edgefl_broker_command_serves_until_sigterm() -> None:
    port = free_port()
    command = [str(Path(sys.executable).parent / "edgefl"), "broker", "--port", str(port)]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        try:
            assert process.stdout is not None
            line = process.stdout.readline().decode()
            assert f"broker listening on mqtt://127.0.0.1:{port}" in line
            client = MqttClient(f"mqtt://127.0.0.1:{port}", "cli-check")
            client.connect(timeout=10)
            client.close()
            process.send_signal(signal.SIGTERM)
            assert process.wait(15) == 0
        finally:
            if process.poll() is None:
                process.kill()
