"""Artifact chunking: split a file into fixed-size chunks with a SHA-256 each, and reassemble them.

Pure: bytes in, bytes out. The chunk digests travel inside the signed release, so a board can
reject a single bad chunk as it arrives instead of after downloading the whole artifact.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

from edgefl.errors import MessageError

DEFAULT_CHUNK_SIZE = 1024 * 1024
MIN_CHUNK_SIZE = 1024
# Mosquitto's default max packet size is 256 MiB; stay far below so a default broker accepts it.
MAX_CHUNK_SIZE = 64 * 1024 * 1024


class ChunkError(MessageError):
    """A chunk is out of range, the wrong length, or does not match its SHA-256."""


def check_chunk_size(chunk_size: int) -> int:
    """Return `chunk_size` if usable.

    Raises:
        ChunkError: it is outside [MIN_CHUNK_SIZE, MAX_CHUNK_SIZE].
    """
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise ChunkError(
            f"chunk size {chunk_size} is out of range ({MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE} bytes)"
        )
    return chunk_size


def chunk_count(size: int, chunk_size: int) -> int:
    """Return how many chunks a file of `size` bytes takes (an empty file still takes one)."""
    return max(1, -(-size // chunk_size))


def split(data: bytes, chunk_size: int) -> list[bytes]:
    """Split bytes into chunks of `chunk_size` (the last may be shorter)."""
    check_chunk_size(chunk_size)
    count = chunk_count(len(data), chunk_size)
    return [data[i * chunk_size : (i + 1) * chunk_size] for i in range(count)]


def iter_file_chunks(path: Path, chunk_size: int) -> Iterator[bytes]:
    """Yield a file's chunks in order, reading one chunk at a time."""
    check_chunk_size(chunk_size)
    with path.open("rb") as handle:
        first = True
        while True:
            block = handle.read(chunk_size)
            if not block and not first:
                return
            yield block
            first = False
            if len(block) < chunk_size:
                return


def digest(chunk: bytes) -> str:
    """Return the hex SHA-256 of one chunk."""
    return hashlib.sha256(chunk).hexdigest()


def file_digests(path: Path, chunk_size: int) -> list[str]:
    """Return the SHA-256 of each chunk of a file, in order."""
    return [digest(chunk) for chunk in iter_file_chunks(path, chunk_size)]


class ChunkAssembler:
    """Collects the chunks of one artifact in any order, checking each against its digest.

    Duplicates (a retained chunk delivered twice after a reconnect) are accepted and ignored.
    """

    def __init__(self, size: int, chunk_size: int, digests: list[str]) -> None:
        """Prepare to receive an artifact.

        Args:
            size: the artifact's size in bytes.
            chunk_size: bytes per chunk (the last chunk may be shorter).
            digests: the expected SHA-256 of each chunk, from the signed release.

        Raises:
            ChunkError: the digest count does not fit the size and chunk size.
        """
        check_chunk_size(chunk_size)
        expected = chunk_count(size, chunk_size)
        if len(digests) != expected or size < 0:
            raise ChunkError(
                f"{len(digests)} chunk digests given for {size} bytes in chunks of {chunk_size}"
                f" (expected {expected})"
            )
        self.size = size
        self.chunk_size = chunk_size
        self.digests = list(digests)
        self._buffer = bytearray(size)
        self._have = [False] * expected
        self._received = 0
        self._bytes = 0

    @property
    def total(self) -> int:
        """Number of chunks the artifact has."""
        return len(self.digests)

    @property
    def received(self) -> int:
        """Number of distinct valid chunks received so far."""
        return self._received

    @property
    def bytes_received(self) -> int:
        """Bytes of valid chunks received so far."""
        return self._bytes

    @property
    def complete(self) -> bool:
        """Whether every chunk has arrived."""
        return self._received == self.total

    def has(self, index: int) -> bool:
        """Whether a valid copy of chunk `index` has arrived (False for an index out of range)."""
        return 0 <= index < self.total and self._have[index]

    def add(self, index: int, chunk: bytes) -> bool:
        """Store one chunk.

        Returns:
            True when the chunk was new, False for a duplicate.

        Raises:
            ChunkError: the index is out of range, the length is wrong or the SHA-256 differs.
        """
        if not 0 <= index < self.total:
            raise ChunkError(f"chunk {index} is out of range (artifact has {self.total})")
        if len(chunk) != self._length(index):
            raise ChunkError(
                f"chunk {index} has {len(chunk)} bytes, expected {self._length(index)}"
            )
        if digest(chunk) != self.digests[index]:
            raise ChunkError(f"chunk {index} does not match its SHA-256 (tampered or corrupted)")
        if self._have[index]:
            return False
        start = index * self.chunk_size
        self._buffer[start : start + len(chunk)] = chunk
        self._have[index] = True
        self._received += 1
        self._bytes += len(chunk)
        return True

    def data(self) -> bytes:
        """Return the reassembled artifact.

        Raises:
            ChunkError: chunks are still missing.
        """
        if not self.complete:
            missing = self.total - self._received
            raise ChunkError(f"{missing} of {self.total} chunks are still missing")
        return bytes(self._buffer)

    def _length(self, index: int) -> int:
        if index < self.total - 1:
            return self.chunk_size
        return self.size - self.chunk_size * (self.total - 1)
