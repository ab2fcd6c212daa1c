"""Deploy a ~14 MB signed bundle to N agents over a real Mosquitto on this machine; time it.

    .venv/bin/python benchmarks/deploy.py [--agents 50] [--size-mb 14] [--chunk-size 1048576]

Starts Mosquitto on a free loopback port, N real agents (one process, --loops network threads,
each with its own models directory and trusted key), then runs the real `deploy` and reports
how long until every board reported "installed" (after verifying every chunk and the artifact
SHA-256, swapping atomically and running a smoke inference in onnxruntime). Writes
benchmarks/out/deploy.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from edgefl import signing
from edgefl.bundle import Artifact, HeadSpec, InputSpec, Manifest, write_bundle
from edgefl.delivery.chunks import DEFAULT_CHUNK_SIZE
from edgefl.delivery.deploy import FAILED, UPDATED, deploy
from edgefl.delivery.updater_binding import attach_to_agent
from edgefl.head import init_head
from edgefl.roles.agent import Agent, AgentConfig
from edgefl.transport.network_loop import NetworkLoop

# The tests' Mosquitto launcher: a broker for one run, not part of the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from local_mosquitto import LocalMosquitto

OUT = Path(__file__).resolve().parent / "out"


def backbone_of_size(size_mb: float, features: int = 64) -> bytes:
    """An ONNX MLP 64 -> hidden -> features whose weights take about `size_mb` MB."""
    hidden = int(size_mb * 1e6 / 4 / (64 + features))
    rng = np.random.default_rng(0)
    w0 = (rng.standard_normal((64, hidden)) / 8).astype(np.float32)
    w1 = (rng.standard_normal((hidden, features)) / np.sqrt(hidden)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w0"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "w1"], ["features"]),
        ],
        "backbone",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", features])],
        [numpy_helper.from_array(w0, "w0"), numpy_helper.from_array(w1, "w1")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=50)
    parser.add_argument("--size-mb", type=float, default=14.0)
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    parser.add_argument("--loops", type=int, default=4, help="Network threads the agents share.")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgefl-deploy-bench-"))
    broker = LocalMosquitto(work, max_queued_messages=100_000)
    broker.start()
    url = broker.url
    networks = [NetworkLoop(name=f"bench-network-{i}") for i in range(args.loops)]
    agents: list[Agent] = []
    try:
        keys = signing.init_keys(work / "keys")
        layers = [{"kind": "linear", "in": 64, "out": 10}]
        manifest = Manifest(
            name="bench", version=1, input=InputSpec(shape=[64]), feature_size=64,
            artifacts=[Artifact("backbone.onnx", "backbone", "onnx", "fp32")],
            heads={"default": HeadSpec(layers, [str(i) for i in range(10)])},
        )  # fmt: skip
        bundle = write_bundle(
            work / "bundle", manifest, {"backbone.onnx": backbone_of_size(args.size_mb)},
            {"default": init_head(layers)},
        )  # fmt: skip
        bundle_bytes = sum(a.size for a in bundle.manifest.artifacts)
        trust = signing.load_public_key(keys.public)
        for index in range(args.agents):
            agent = Agent(
                AgentConfig(url, "bench", f"board-{index:03d}", heartbeat_s=30),
                network=networks[index % len(networks)],
            )
            attach_to_agent(agent, work / f"models-{index}", trust)
            agent.start()
            agents.append(agent)
        started = time.perf_counter()
        result = deploy(
            bundle.path, url, "bench", signing.load_private_key(keys.private),
            chunk_size=args.chunk_size, timeout=300,
        )  # fmt: skip
        wall = time.perf_counter() - started
    finally:
        for agent in agents:
            agent.stop()
        for network in networks:
            network.stop()
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)
    row = {
        "agents": args.agents,
        "bundle_mb": round(bundle_bytes / 1e6, 2),
        "chunk_kib": args.chunk_size // 1024,
        "network_threads": args.loops,
        "updated": result.count(UPDATED),
        "failed": result.count(FAILED),
        "all_updated_s": round(wall, 2),
        "delivered_mb": round(bundle_bytes * result.count(UPDATED) / 1e6, 1),
        "throughput_mb_s": round(bundle_bytes * result.count(UPDATED) / 1e6 / wall, 1),
        "machine": f"{platform.machine()}, {platform.python_version()}",
    }
    print(f"{'agents':>6} {'bundle MB':>9} {'chunk KiB':>9} {'updated':>7} {'failed':>6} "
          f"{'all updated s':>13} {'MB/s':>6}")  # fmt: skip
    print(f"{row['agents']:>6} {row['bundle_mb']:>9} {row['chunk_kib']:>9} {row['updated']:>7} "
          f"{row['failed']:>6} {row['all_updated_s']:>13} {row['throughput_mb_s']:>6}")  # fmt: skip
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "deploy.json").write_text(json.dumps(row, indent=2))
    if row["updated"] != args.agents:
        failures = {d.device_id: d.reason for d in result.devices.values() if d.outcome != UPDATED}
        print("not updated:", failures)


if __name__ == "__main__":
    main()
