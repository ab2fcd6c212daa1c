"""Agent resident memory: a torch-free `edgefl agent` training a 1280x10 head over MobileNetV2.

Builds (here, with torch) a bundle whose backbone is MobileNetV2 exported to fp32 ONNX and whose
head is a fresh 1280x10 linear layer; creates (or reuses) a virtual environment holding only
`pip install <repo>[agent]` (no torch); runs `edgefl agent` from it as a subprocess against a real
Mosquitto with a local `.npz` of random 3x224x224 images; drives federated rounds with the
aggregator from this process; and samples the agent's resident memory from /proc while it
starts, computes features and trains. The peak is the kernel's high-water mark (VmHWM).

    .venv/bin/python benchmarks/agent_memory.py [--samples 64] [--rounds 1] [--epochs 1]

Prints a table and writes benchmarks/out/agent_memory.json. The first run builds the venv and the
bundle under benchmarks/out/ (minutes); later runs reuse them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import venv
from pathlib import Path

import numpy as np

from edgefl.bundle import Artifact, HeadSpec, InputSpec, Manifest, write_bundle
from edgefl.core.settings import RoundPolicy, RoundSettings, TrainConfig
from edgefl.head import init_head
from edgefl.roles.aggregator import Aggregator, AggregatorConfig

# The tests' Mosquitto launcher: a broker for one run, not part of the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from local_mosquitto import LocalMosquitto

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "out"
FLEET = "memory"
TARGET_MB = 250.0


def build_bundle(out: Path) -> Path:
    """Write (once) a bundle: MobileNetV2 backbone as fp32 ONNX, fresh 1280x10 linear head."""
    if (out / "manifest.json").is_file():
        return out
    import torch

    from edgefl.compression.export import export_onnx
    from edgefl.models import load_model
    from edgefl.models.split import split_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    example = torch.zeros(1, 3, 224, 224)
    split = split_model(load_model("mobilenet-v2"), "classifier.1", example)
    with tempfile.TemporaryDirectory(prefix="edgefl-mem-") as tmp:
        onnx_path = export_onnx(split.backbone, example, Path(tmp) / "backbone.onnx")
        layers = [{"kind": "linear", "in": split.feature_size, "out": 10}]
        manifest = Manifest(
            name="mobilenet-v2-memory",
            version=1,
            input=InputSpec(shape=[3, 224, 224]),
            feature_size=split.feature_size,
            artifacts=[Artifact("backbone.onnx", "backbone", "onnx", "fp32")],
            heads={"default": HeadSpec(layers=layers, labels=[str(i) for i in range(10)])},
        )
        write_bundle(out, manifest, {"backbone.onnx": onnx_path.read_bytes()},
                     {"default": init_head(layers)}, force=True)  # fmt: skip
    return out


def board_venv(path: Path) -> Path:
    """Create (once) a venv with only `edgefl[agent]`; returns its `edgefl` script."""
    script = path / "bin" / "edgefl"
    if not script.is_file():
        shutil.rmtree(path, ignore_errors=True)
        venv.create(path, with_pip=True)
        subprocess.run(
            [str(path / "bin" / "python"), "-m", "pip", "install", "-q", f"{REPO}[agent]"],
            check=True, timeout=900,
        )  # fmt: skip
    else:
        # Reinstall only this package so the agent runs the tree's current code.
        subprocess.run(
            [str(path / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps",
             "--force-reinstall", str(REPO)],
            check=True, timeout=300,
        )  # fmt: skip
    probe = subprocess.run(
        [str(path / "bin" / "python"), "-c", "import torch"], capture_output=True
    )
    if probe.returncode == 0:
        sys.exit(f"{path} has torch installed; the measurement needs a torch-free venv")
    return script


def write_images(path: Path, samples: int) -> Path:
    """Write `samples` random 3x224x224 float32 images with 10 labels as an agent `.npz`."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((samples, 3, 224, 224), dtype=np.float32)
    y = np.arange(samples) % 10
    np.savez(path, X=x, y=y, labels=np.array([str(i) for i in range(10)]))
    return path


class MemorySampler:
    """Samples a process's VmRSS every `interval` s from /proc; keeps the timeline and phases."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        """Start sampling process `pid` in a background thread."""
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, float]] = []  # (seconds since start, RSS MB)
        self.marks: dict[str, float] = {}
        self._start = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def status_mb(self, field: str) -> float:
        """Return a /proc/PID/status field (VmRSS, VmHWM) in MB, or NaN once the process exited."""
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return float("nan")

    def mark(self, name: str) -> None:
        """Record the time of a phase boundary."""
        self.marks[name] = time.monotonic() - self._start

    def peak_between(self, start: str, end: str) -> float:
        """Return the largest sampled RSS between two marks."""
        lo, hi = self.marks[start], self.marks[end]
        values = [mb for t, mb in self.samples if lo <= t <= hi]
        return max(values) if values else float("nan")

    def stop(self) -> None:
        """Stop sampling."""
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = self.status_mb("VmRSS")
            if rss == rss:  # not NaN
                self.samples.append((time.monotonic() - self._start, rss))
            self._stop.wait(self.interval)


def measure(args: argparse.Namespace) -> dict[str, object]:
    """Run the agent and the rounds; returns the memory numbers."""
    work = OUT / "agent-memory"
    bundle = build_bundle(work / "bundle")
    edgefl = board_venv(Path(args.venv))
    tmp = Path(tempfile.mkdtemp(prefix="edgefl-mem-"))
    data = write_images(tmp / "images.npz", args.samples)
    broker = LocalMosquitto(tmp)
    broker.start()
    url = broker.url
    command = [
        str(edgefl), "agent", "--broker", url, "--fleet", FLEET, "--device-id", "board-1",
        "--data", str(data), "--bundle", str(bundle), "--state-dir", str(tmp / "state"),
        "--heartbeat", "2", "--log-level", "warning", "--insecure",
    ]  # fmt: skip
    agent = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sampler = MemorySampler(agent.pid)
    sampler.mark("start")
    try:
        config = AggregatorConfig(
            url, FLEET, bundle,
            RoundPolicy(rounds=args.rounds, min_devices=1, deadline_s=300, wait_devices_s=300),
            RoundSettings(train=TrainConfig(epochs=args.epochs, batch_size=args.batch_size)),
            state_path=tmp / "state.sqlite",
        )  # fmt: skip
        aggregator = Aggregator(config)
        rss_online: list[float] = []

        def on_round(_summary: object) -> None:
            rss_online.append(sampler.status_mb("VmRSS"))

        aggregator.on_round = on_round
        # run() waits until the agent is online, i.e. its features are computed.
        summary = aggregator.run()
        sampler.mark("end")
        time.sleep(0.5)
        hwm = sampler.status_mb("VmHWM")
        rss_end = sampler.status_mb("VmRSS")
        if agent.poll() is not None:
            sys.exit(f"the agent exited early: {agent.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            _, stderr = agent.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            agent.kill()
            _, stderr = agent.communicate()
        sampler.stop()
        broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    rounds = [(r.status, r.accepted) for r in summary.rounds]
    if any(r != ("closed", 1) for r in rounds):
        sys.exit(f"rounds did not complete: {rounds}\n{stderr.decode()[-2000:]}")
    return {
        "model": "mobilenet-v2 fp32 ONNX backbone, 1280x10 linear head",
        "samples": args.samples,
        "rounds": args.rounds,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "torch_installed": False,
        "peak_rss_mb": hwm,
        "rss_after_rounds_mb": rss_end,
        "max_sampled_rss_mb": max(mb for _, mb in sampler.samples),
        "rss_sampled_at_round_end_mb": rss_online,
        "bytes_per_update": summary.rounds[0].metrics.get("bytes_per_update"),
        "target_mb": TARGET_MB,
        "met": hwm <= TARGET_MB,
        "timeline": [
            (round(t, 2), round(mb, 1))
            for t, mb in sampler.samples[:: max(1, len(sampler.samples) // 200)]
        ],
    }


def main() -> None:
    """Run the benchmark and write benchmarks/out/agent_memory.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64, help="local 3x224x224 images")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--venv", default=str(OUT / "agent-venv"), help="torch-free venv")
    args = parser.parse_args()
    if shutil.which("mosquitto") is None:
        sys.exit("mosquitto is not installed (apt-get install mosquitto)")
    result = measure(args)
    print("\nAgent resident memory (torch-free venv, MobileNetV2 fp32 ONNX, 1280x10 head)")
    print(f"{'samples':>8} {'rounds':>7} {'peak RSS MB':>12} {'RSS after MB':>13} {'target':>7}")
    verdict = "met" if result["met"] else "MISSED"
    print(f"{result['samples']:>8} {result['rounds']:>7} {result['peak_rss_mb']:>12.1f} "
          f"{result['rss_after_rounds_mb']:>13.1f} {verdict:>7}")  # fmt: skip
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "agent_memory.json").write_text(json.dumps(result, indent=2))
    print(f"\nwrote {OUT / 'agent_memory.json'}")


if __name__ == "__main__":
    main()
