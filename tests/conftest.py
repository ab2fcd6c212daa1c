"""Shared fixtures: a real Mosquitto broker on a free loopback port, started per test module."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class RunningBroker:
    """A broker the tests can connect to."""

    host: str
    port: int
    process: subprocess.Popen[bytes]
    config: Path

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def stop(self) -> None:
        """Stop the broker (for restart tests)."""
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def start(self) -> None:
        """(Re)start the broker on the same port."""
        self.stop()
        self.process = _spawn_mosquitto(self.config)
        _wait_for_port(self.host, self.port, self.process)


def free_port() -> int:
    """Return a TCP port on loopback that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _spawn_mosquitto(config: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["mosquitto", "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def _wait_for_port(host: str, port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mosquitto exited with {process.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"mosquitto did not listen on {host}:{port}")


def start_mosquitto(workdir: Path, max_packet_size: int = 64 * 1024 * 1024) -> RunningBroker:
    """Start Mosquitto with its own config on a free loopback port."""
    if shutil.which("mosquitto") is None:
        pytest.fail("mosquitto is not installed (.ci/run installs it: apt-get install mosquitto)")
    port = free_port()
    config = workdir / "mosquitto.conf"
    config.write_text(
        f"listener {port} 127.0.0.1\n"
        "allow_anonymous true\n"
        "persistence false\n"
        f"max_packet_size {max_packet_size}\n"
        "max_queued_messages 100000\n"
        "max_inflight_messages 0\n"
    )
    process = _spawn_mosquitto(config)
    _wait_for_port("127.0.0.1", port, process)
    return RunningBroker("127.0.0.1", port, process, config)


@pytest.fixture(scope="module")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningBroker]:
    """A real Mosquitto broker on a free loopback port, shared by the tests of one module."""
    broker = start_mosquitto(tmp_path_factory.mktemp("mosquitto"))
    yield broker
    broker.stop()


@pytest.fixture
def fresh_mosquitto(tmp_path: Path) -> Iterator[RunningBroker]:
    """A Mosquitto broker for one test (for tests that stop or restart it)."""
    broker = start_mosquitto(tmp_path)
    yield broker
    broker.stop()
