"""The system's Mosquitto on a loopback port: the real broker of the tests and benchmarks.

Not part of the installed package: boards and servers run a broker their operator configures.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from edgefl.errors import TransportError
from edgefl.transport.broker import free_port
from edgefl.transport.client import MqttClient
from edgefl.transport.tls import TlsSettings


class LocalMosquitto:
    """The system's Mosquitto on a loopback port, with a config of its own.

    What the test suite and the benchmarks run as the real broker (`apt-get install mosquitto`).
    The config is anonymous and in memory, with deep queues: a local broker for one run, not a
    production setup (the README shows one).
    """

    def __init__(
        self,
        workdir: Path,
        port: int = 0,
        max_packet_size: int = 64 * 1024 * 1024,
        max_queued_messages: int = 100_000,
        config_file: Path | None = None,
        tls: bool = False,
    ) -> None:
        """Configure the broker; nothing runs until start().

        Args:
            workdir: where its config file goes.
            port: the loopback port; 0 picks a free one on the first start().
            max_packet_size: larger packets are refused by the broker itself.
            max_queued_messages: per-client queue depth (fan-out benchmarks need deep queues).
            config_file: run exactly this configuration (e.g. what `edgefl broker-config`
                wrote) instead of writing one; `port` must then be the port it listens on.
            tls: the given configuration's listener is TLS (the URL is then mqtts://).
        """
        self.workdir = Path(workdir)
        self.host = "127.0.0.1"
        self.port = port
        self.max_packet_size = max_packet_size
        self.max_queued_messages = max_queued_messages
        self.config_file = config_file
        self.tls = tls
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Return the URL clients connect to."""
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        """Start Mosquitto (again, on the same port after stop()); returns once it listens.

        Raises:
            TransportError: mosquitto is not installed, exited, or did not listen in time.
        """
        if shutil.which("mosquitto") is None:
            raise TransportError("mosquitto is not installed (apt-get install mosquitto)")
        self.stop()
        self.port = self.port or free_port(self.host)
        config = self.config_file or self._write_config()
        self.process = subprocess.Popen(
            ["mosquitto", "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise TransportError(f"mosquitto exited with {self.process.returncode}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise TransportError(f"mosquitto did not listen on {self.host}:{self.port}")

    def _write_config(self) -> Path:
        config = self.workdir / "mosquitto.conf"
        config.write_text(
            f"listener {self.port} {self.host}\n"
            "allow_anonymous true\n"
            "persistence false\n"
            f"max_packet_size {self.max_packet_size}\n"
            f"max_queued_messages {self.max_queued_messages}\n"
            "max_inflight_messages 0\n"
            "set_tcp_nodelay true\n"
        )
        return config

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the broker if it runs (clients see the connection drop)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=timeout)
        self.process = None

    def publish(
        self, topic: str, payload: bytes, retain: bool = True, tls: TlsSettings | None = None
    ) -> None:
        """Publish one message from a client of its own (a stranger's, in the rogue tests)."""
        client = MqttClient(self.url, client_id=f"test-pub-{time.time_ns()}", tls=tls)
        client.connect(timeout=10.0)
        try:
            client.publish(topic, payload, qos=1, retain=retain).wait(10.0)
        finally:
            client.close()

    def __enter__(self) -> LocalMosquitto:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
