"""The broker a simulation runs on: one it is given, the embedded amqtt one, or an in-process one.

`broker_url` None starts the embedded MQTT broker for the run; `memory` (or `memory://`) starts a
fresh in-process broker (`edgefl.transport.memory`), and `memory://NAME` uses the in-process
broker of that name when one runs, else starts it; any `mqtt://`/`mqtts://` URL is used as given.
"""

from __future__ import annotations

import resource

from edgefl.errors import SimulationError
from edgefl.transport.broker import EmbeddedBroker
from edgefl.transport.memory import MemoryBroker, find_broker, memory_broker_name
from edgefl.transport.tls import TlsSettings

# Files the process holds besides the connections: the bundle, the record, libraries, pipes.
_SPARE_FILES = 256


class SimulationBroker:
    """Starts the broker a run needs (if any) and says the URL and TLS its clients use."""

    def __init__(self, broker_url: str | None, tls: TlsSettings) -> None:
        """Configure; nothing starts until start().

        Args:
            broker_url: see the module docstring.
            tls: the TLS files for a given `mqtts://` broker (ignored for one started here).
        """
        self.requested = broker_url
        self._given_tls = tls
        self.tls = TlsSettings()
        self.url = ""
        self._embedded: EmbeddedBroker | None = None
        self._memory: MemoryBroker | None = None

    @property
    def owned(self) -> bool:
        """Whether the broker lives only for this run (its retained messages go with it)."""
        return self._embedded is not None or self._memory is not None

    @property
    def in_process(self) -> bool:
        """Whether the clients talk to an in-process broker (no sockets)."""
        return self.requested is not None and memory_broker_name(self.requested) is not None

    def describe(self) -> str:
        """Return what the run is about to start, for the status line."""
        if self.requested is None:
            return "starting the embedded broker"
        if self.in_process:
            return "starting the in-process broker"
        return f"using the broker at {self.requested}"

    def start(self) -> str:
        """Start (or find) the broker; return the URL every client connects to.

        Raises:
            TransportError: the embedded broker cannot listen.
        """
        if self.requested is None:
            self._embedded = EmbeddedBroker(port=0)
            self._embedded.start()
            self.url = self._embedded.url
        elif (name := memory_broker_name(self.requested)) is not None:
            running = find_broker(name) if name else None
            if running is None:
                self._memory = MemoryBroker(name)
                self._memory.start()
                running = self._memory
            self.url = running.url
        else:
            self.url, self.tls = self.requested, self._given_tls
        return self.url

    def make_room(self, clients: int) -> None:
        """Raise this process's open-file limit to what `clients` network connections need
        (each is a socket; an embedded broker holds the other end too). In-process: nothing.

        Raises:
            SimulationError: the hard limit is lower: shard the fleet (`--shard`) or raise it.
        """
        if self.in_process:
            return
        sockets = clients * (2 if self.requested is None else 1)
        needed = sockets + _SPARE_FILES
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < needed:
            if hard != resource.RLIM_INFINITY and hard < needed:
                raise SimulationError(
                    f"{clients} MQTT connections need {needed} open files; the hard limit is "
                    f"{hard}: run --shard I/N processes, --broker memory, or raise ulimit -n"
                )
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))

    def stop(self) -> None:
        """Stop what start() started (after every client closed); safe to call twice."""
        if self._embedded is not None:
            self._embedded.wait_idle()
            self._embedded.stop()
            self._embedded = None
        if self._memory is not None:
            self._memory.stop()
            self._memory = None
