"""Chunking: split and reassemble with a SHA-256 per chunk, in any order, rejecting bad chunks."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefl.delivery.chunks import (
    ChunkAssembler,
    ChunkError,
    chunk_count,
    digest,
    file_digests,
    iter_file_chunks,
    split,
)


@pytest.mark.parametrize(
    ("size", "chunk", "count"), [(0, 1024, 1), (1, 1024, 1), (1024, 1024, 1), (1025, 1024, 2)]
)
def test_chunk_count(size: int, chunk: int, count: int) -> None:
    assert chunk_count(size, chunk) == count


def test_reassembles_out_of_order_and_ignores_duplicates() -> None:
    data = bytes(range(256)) * 20  # 5120 bytes -> 5 chunks of 1024, last one full
    data += b"tail"
    chunks = split(data, 1024)
    assert len(chunks) == 6 and len(chunks[-1]) == 4
    assembler = ChunkAssembler(len(data), 1024, [digest(c) for c in chunks])
    for index in [5, 0, 3, 1, 4]:
        assert assembler.add(index, chunks[index]) is True
    assert not assembler.complete
    assert assembler.add(0, chunks[0]) is False  # retained re-delivery
    assembler.add(2, chunks[2])
    assert assembler.complete
    assert assembler.bytes_received == len(data)
    assert assembler.data() == data


def test_tampered_wrong_length_and_out_of_range_chunks_are_rejected() -> None:
    data = b"a" * 3000
    chunks = split(data, 1024)
    assembler = ChunkAssembler(len(data), 1024, [digest(c) for c in chunks])
    with pytest.raises(ChunkError, match="does not match its SHA-256"):
        assembler.add(0, b"b" * 1024)
    with pytest.raises(ChunkError, match="has 10 bytes, expected 952"):
        assembler.add(2, b"a" * 10)
    with pytest.raises(ChunkError, match="out of range"):
        assembler.add(3, b"a")
    assert assembler.received == 0
    with pytest.raises(ChunkError, match="3 of 3 chunks are still missing"):
        assembler.data()


def test_digest_count_must_fit_the_size() -> None:
    with pytest.raises(ChunkError, match="expected 2"):
        ChunkAssembler(2000, 1024, ["x"])
    with pytest.raises(ChunkError, match="out of range"):
        split(b"abc", 10)


def test_file_chunks_match_in_memory_split(tmp_path: Path) -> None:
    path = tmp_path / "artifact.bin"
    data = bytes(range(7)) * 1000
    path.write_bytes(data)
    assert list(iter_file_chunks(path, 2048)) == split(data, 2048)
    assert file_digests(path, 2048) == [digest(c) for c in split(data, 2048)]
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    assert list(iter_file_chunks(empty, 1024)) == [b""]
