"""paho's client with its socket reads buffered: one `recv()` for many packets, not three each."""

from __future__ import annotations

import ssl
from typing import Any

import paho.mqtt.client as paho

# Packets read per wake-up before the loop serves its other clients (the rest stay buffered).
MAX_PACKETS_PER_WAKE = 4096


class BufferedPaho(paho.Client):
    """paho with buffered reads.

    paho reads a packet a few bytes per `recv()`: its command byte, each byte of the remaining
    length, then the rest, so three system calls or more per message. This reads up to 64 KiB
    at once and hands paho its bytes from that buffer. `buffered` says whether bytes remain that
    the socket will not signal again.
    """

    READ_CHUNK = 65536

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read_buffer = b""
        self._read_position = 0

    @property
    def buffered(self) -> bool:
        """Whether bytes already read from the socket wait for paho."""
        return self._read_position < len(self._read_buffer)

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._read_position >= len(self._read_buffer):
            data = super()._sock_recv(max(bufsize, self.READ_CHUNK))
            if len(data) <= bufsize:
                return data  # b"" at the end of the stream, as paho expects
            self._read_buffer, self._read_position = data, 0
        start = self._read_position
        self._read_position = min(start + bufsize, len(self._read_buffer))
        return self._read_buffer[start : self._read_position]

    def _sock_close(self) -> None:
        # What was read belongs to the connection that is closing.
        self._read_buffer, self._read_position = b"", 0
        super()._sock_close()


def tls_pending(sock: Any) -> bool:
    """Whether a TLS socket holds decrypted bytes not yet read (invisible to the selector)."""
    return isinstance(sock, ssl.SSLSocket) and sock.pending() > 0
