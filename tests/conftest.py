"""Shared fixtures: a real Mosquitto broker on a free loopback port, and a polling helper."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from local_mosquitto import LocalMosquitto

from edgefl.transport.broker import free_port

# Tests annotate the fixtures with this name; it is the package's own launcher.
RunningBroker = LocalMosquitto

__all__ = ["RunningBroker", "free_port", "start_mosquitto", "wait_for"]


def start_mosquitto(workdir: Path, max_packet_size: int = 64 * 1024 * 1024) -> LocalMosquitto:
    """Start Mosquitto with its own config on a free loopback port."""
    if shutil.which("mosquitto") is None:
        pytest.fail("mosquitto is not installed (.ci/run installs it: apt-get install mosquitto)")
    broker = LocalMosquitto(workdir, max_packet_size=max_packet_size)
    broker.start()
    return broker


def wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> bool:
    """Poll `condition` until it holds or `timeout` seconds pass; return its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


@pytest.fixture(scope="module")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMosquitto]:
    """A real Mosquitto broker on a free loopback port, shared by the tests of one module."""
    broker = start_mosquitto(tmp_path_factory.mktemp("mosquitto"))
    yield broker
    broker.stop()


@pytest.fixture
def fresh_mosquitto(tmp_path: Path) -> Iterator[LocalMosquitto]:
    """A Mosquitto broker for one test (for tests that stop or restart it)."""
    broker = start_mosquitto(tmp_path)
    yield broker
    broker.stop()
