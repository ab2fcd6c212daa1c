"""Atomic writes: a reader sees the old file, directory or link or the new one, never a part."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edgefl.atomic import replace_symlink, replacing, replacing_dir, write_atomic


def test_write_atomic_replaces_and_sets_the_mode(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(b"old")
    write_atomic(path, b"new", mode=0o600)
    assert path.read_bytes() == b"new"
    assert path.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_a_failed_replacing_block_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), replacing(path) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_replacing_dir_swaps_a_whole_directory(tmp_path: Path) -> None:
    target = tmp_path / "bundle"
    target.mkdir()
    (target / "old.onnx").write_bytes(b"old")
    with replacing_dir(target) as staging:
        (staging / "sub").mkdir()
        (staging / "sub" / "head.safetensors").write_bytes(b"head")
        (staging / "manifest.json").write_bytes(b"{}")
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*")) == [
        "manifest.json",
        "sub",
        "sub/head.safetensors",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_a_failed_replacing_dir_block_leaves_the_old_directory(tmp_path: Path) -> None:
    target = tmp_path / "bundle"
    target.mkdir()
    (target / "old.onnx").write_bytes(b"old")
    staging_root = tmp_path / "staging"
    staging_root.mkdir()
    with pytest.raises(RuntimeError), replacing_dir(target, staging_root) as staging:
        assert staging.parent == staging_root
        (staging / "new.onnx").write_bytes(b"half")
        raise RuntimeError("power cut")
    assert [p.name for p in target.iterdir()] == ["old.onnx"]
    assert list(staging_root.iterdir()) == []


def test_replace_symlink_points_a_relative_link_at_the_new_target(tmp_path: Path) -> None:
    for name in ("v1", "v2"):
        (tmp_path / "releases" / name).mkdir(parents=True)
    link = tmp_path / "current"
    replace_symlink(link, tmp_path / "releases" / "v1")
    replace_symlink(link, tmp_path / "releases" / "v2")
    assert os.readlink(link) == os.path.join("releases", "v2")
    assert link.resolve() == (tmp_path / "releases" / "v2").resolve()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "releases"]
