"""Backbone features on a board: which artifact it runs, and what it keeps in memory."""

from __future__ import annotations

import ctypes
import gc
from pathlib import Path

import numpy as np
import pytest
from bundles import digits_devices, make_test_bundle

from edgefl.roles.agent import Agent, AgentConfig
from edgefl.roles.features import FeatureCache, backbone_preferences, live_runners
from edgefl.transport.client import NetworkLoop

# Wide features make each backbone's cached features (898 samples x 2048 floats, 7 MiB) easy to
# see in the process's resident memory.
WIDE = 2048


@pytest.mark.parametrize(
    ("runtime", "prefer", "runtimes", "expected"),
    [
        ("tflite", [("onnx", "fp16")], ["onnxruntime"], [("tflite", "*")]),
        ("auto", [("tflite", "int8"), ("onnx", "*")], ["onnxruntime"], [("onnx", "*")]),
        ("auto", [("tflite", "int8")], ["litert", "onnxruntime"], [("tflite", "int8")]),
        ("auto", None, ["litert", "onnxruntime"], [("onnx", "*"), ("tflite", "*")]),
        ("auto", None, ["litert"], [("tflite", "*")]),
        ("auto", None, [], [("onnx", "*"), ("tflite", "*")]),
    ],
)
def test_backbone_preferences_follow_the_runtime_then_the_profile_then_onnx_first(
    runtime: str,
    prefer: list[tuple[str, str]] | None,
    runtimes: list[str],
    expected: list[tuple[str, str]],
) -> None:
    assert backbone_preferences(runtime, prefer, runtimes) == expected


def test_the_feature_cache_keeps_in_memory_only_the_latest_backbones() -> None:
    cache = FeatureCache(keep_backbones=2)
    x = np.ones((3, 4), np.float32)
    for backbone in ("a", "b", "a", "c"):
        cache.lookup(backbone, "data-1", 3, lambda: x)
        cache.lookup(backbone, "data-2", 3, lambda: x)
    assert (cache.held(), cache.misses, cache.hits) == (4, 6, 2)  # "a" again hit, then "b" left
    cache.lookup("b", "data-1", 3, lambda: x)
    assert cache.misses == 7


def _resident_mib() -> float | None:
    """This process's resident memory of what it holds, or None where it cannot be read."""
    gc.collect()
    status = Path("/proc/self/status")
    try:
        # glibc keeps freed heap pages for reuse (resident, not held): without handing them back
        # this measure wandered by 35 MiB over ten deploys, with them by 1 MiB.
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        lines = status.read_text().splitlines()
    except OSError:
        return None
    return next((int(line.split()[1]) / 1024 for line in lines if line.startswith("VmRSS:")), None)


def test_an_agent_holds_as_much_after_five_deploys_as_after_one(tmp_path: Path) -> None:
    devices, _ = digits_devices(2)
    bundles = [
        make_test_bundle(tmp_path / f"v{v}", version=v, feature_size=WIDE) for v in range(1, 7)
    ]
    # No broker: install_bundle is what an over-the-air deploy calls, and it needs none.
    network = NetworkLoop()  # never started: the agent never connects
    agent = Agent(AgentConfig("mqtt://127.0.0.1:9", "lab", "pi-ota"), devices[0], network)
    try:
        # Counted among this test's backbones only: runners of earlier tests may be freed (or
        # dropped from the recent ones) while it runs.

        def held() -> tuple[int, int]:
            gc.collect()
            return live_runners(tmp_path), agent.features_cache.held()

        agent.install_bundle(bundles[0])  # the bundle it started with
        agent.install_bundle(bundles[1])  # one deploy
        after_one, rss_one = held(), _resident_mib()
        for bundle in bundles[2:]:  # four more
            agent.install_bundle(bundle)
        after_five, rss_five = held(), _resident_mib()
        assert agent.model_version == 6 and agent.predict(devices[0].X[:4]).shape == (4,)
    finally:
        network.stop()
    assert after_one == after_five == (1, 1)  # runners alive, feature arrays in memory
    if rss_one is not None and rss_five is not None:
        # Each backbone kept (session and features) cost 8 MiB: four more would be 32 MiB.
        assert rss_five - rss_one < 4.0, (rss_one, rss_five)
