"""Aggregator ingest rate through Mosquitto, and bytes per update for each codec.

1,000 synthetic devices announce themselves; a separate process answers every round's task with
1,000 pre-encoded updates (64x10 or 1280x10 head) at QoS 1; the aggregator validates each one
(decode, shapes, dtype, finite, round/device checks, SQLite record) and closes the round as soon
as all arrived. Ingest rate = updates / (task published -> round closed).

    .venv/bin/python benchmarks/fl.py [--devices 1000] [--rounds 3] [--workers 2]

With `--workers N`, 64x10 rounds also run through a coordinator and 1..N `edgefl
aggregate-worker` processes (`aggregate --workers`), alternating, `--worker-repeats` times; the
aggregator's CPU is then the coordinator's plus its workers'.

Prints a table and writes benchmarks/out/fl.json.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnx import TensorProto, helper, numpy_helper

from edgefl.bundle import Artifact, HeadSpec, InputSpec, Manifest, load_bundle, write_bundle
from edgefl.core.codecs import ErrorFeedback, encode_delta, encode_payload
from edgefl.core.local_round import encode_update
from edgefl.core.settings import RoundPolicy
from edgefl.head import init_head
from edgefl.roles.aggregator import Aggregator, AggregatorConfig
from edgefl.roles.coordinator import Coordinator
from edgefl.roles.summary import RoundSummary
from edgefl.security.device_registry import DeviceRegistry
from edgefl.security.identity import AgentAuth, AggregatorAuth
from edgefl.security.update_mac import mac_seal
from edgefl.security.verifiers import STRICT, DeviceVerifier, TrustedSigners
from edgefl.transport import topics
from edgefl.transport.broker import free_port
from edgefl.transport.client import Message, MqttClient
from edgefl.transport.messages import (
    DeviceStatus,
    RoundTask,
    UpdateHeader,
    decode_round_task,
    update_metadata,
)
from edgefl.transport.sealed import raw_public_key, strip_seal
from edgefl.transport.update_frame import COMPACT_FRAME, encode_compact, task_ref

# The tests' Mosquitto launcher: a broker for one run, not part of the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from local_mosquitto import LocalMosquitto

FLEET = "bench"
OUT = Path(__file__).resolve().parent / "out"


def make_bundle(out: Path, features: int) -> Path:
    """Write a bundle with a 64->features ONNX backbone and a features x 10 linear head."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Relu", ["m"], ["f"])],
        "backbone",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("f", TensorProto.FLOAT, ["batch", features])],
        [numpy_helper.from_array(rng.standard_normal((64, features)).astype(np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    layers = [{"kind": "linear", "in": features, "out": 10}]
    manifest = Manifest(
        name=f"bench-{features}",
        version=1,
        input=InputSpec(shape=[64]),
        feature_size=features,
        artifacts=[Artifact("backbone.onnx", "backbone", "onnx", "fp32")],
        heads={"default": HeadSpec(layers=layers, labels=[str(i) for i in range(10)])},
    )
    write_bundle(out, manifest, {"backbone.onnx": model.SerializeToString()},
                 {"default": init_head(layers)}, force=True)  # fmt: skip
    return out


# Placeholders of the real lengths (uuid4 hex, SHA-256 hex): an update is encoded before its round
# and its task's identity is filled in when the task arrives, without re-encoding the tensors.
RUN_SLOT, HEAD_SLOT = "r" * 32, "h" * 64


def bench_key(name: str) -> Ed25519PrivateKey:
    """The same key in both processes, derived from a name (a benchmark's keys are no secret)."""
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(f"bench {name}".encode()).digest())


def device_fleet(
    url: str, devices: int, features: int, rounds: int, bundle_digest: str, ready: mp.Event,
    sealed: bool = False, frame: str = "compact",
) -> None:  # fmt: skip
    """Child process: announce `devices` devices, answer each task with every device's update;
    with `sealed`, each device seals its status and updates with its own key. `frame`: the
    update form, "compact" (what boards send a current aggregator) or "safetensors"."""
    ids = [f"dev-{i:04d}" for i in range(devices)]
    # As a board does: statuses sealed, updates MAC'd under the key agreed with the aggregator.
    insecure = TrustedSigners((), insecure=True)  # the synthetic boards read every task
    auths = {d: AgentAuth(bench_key(d), insecure) for d in ids} if sealed else {}

    def out(topic: str, device: str, payload: bytes, mac_key: str | None = None) -> bytes:
        if not sealed:
            return payload
        if mac_key is None:
            return auths[device].seal(topic, payload)
        return auths[device].seal_update(topic, payload, mac_key)

    rng = np.random.default_rng(1)
    shapes = {"0.weight": (10, features), "0.bias": (10,)}
    deltas = [
        {k: (rng.standard_normal(s) * 0.01).astype(np.float32) for k, s in shapes.items()}
        for _ in ids
    ]
    # Updates are encoded before the round starts so the publisher is not what is measured;
    # what depends on the task (its run and head) is filled in when it arrives.
    bodies = [encode_payload(dict(sorted(delta.items())), "float32") for delta in deltas]
    payloads: dict[int, list[tuple[str, bytes]]] = {}
    for number in range(1, rounds + 1):
        payloads[number] = [
            (
                topics.round_update(FLEET, number, device),
                encode_delta(
                    delta,
                    metadata=update_metadata(
                        UpdateHeader(
                            number,
                            device,
                            "default",
                            10,
                            number - 1,
                            run_id=RUN_SLOT,
                            head_digest=HEAD_SLOT,
                            bundle_digest=bundle_digest,
                        )
                    ),
                ),
            )
            for device, delta in zip(ids, deltas, strict=True)
        ]

    def answer(task: RoundTask, index: int, payload: bytes) -> bytes:
        if frame == "compact":
            ref = task_ref(task.run_id, task.round, "default", task.head_digest,
                           task.head_version, bundle_digest)  # fmt: skip
            return encode_compact("float32", ref, 10, bodies[index])
        run, head = task.run_id.encode(), task.head_digest.encode()
        return payload.replace(RUN_SLOT.encode(), run).replace(HEAD_SLOT.encode(), head)

    client = MqttClient(url, "bench-fleet")
    done = mp.Event()

    def on_task(message: Message) -> None:
        if not message.payload:
            return
        task, _ = decode_round_task(strip_seal(message.payload))
        answers = zip(payloads.get(task.round, []), ids, strict=True)
        for index, ((topic, payload), device) in enumerate(answers):
            payload = answer(task, index, payload)
            client.publish(topic, out(topic, device, payload, task.mac_key), qos=1)
        if task.round == rounds:
            done.set()

    client.subscribe(topics.all_tasks(FLEET), on_task)
    client.connect()
    for device in ids:
        status = DeviceStatus(
            device, "online", samples=10, model_version=1, bundle_digest=bundle_digest,
            mac_key=auths[device].mac_public if sealed else "",
        )  # fmt: skip
        topic = topics.device_status(FLEET, device)
        client.publish(topic, out(topic, device, status.encode()), retain=True)
    ready.set()
    done.wait(600)
    time.sleep(2)
    for device in ids:
        client.publish(topics.device_status(FLEET, device), b"", retain=True)
    time.sleep(0.5)
    client.close()


def ingest(
    url: str, workdir: Path, devices: int, features: int, rounds: int, metrics: bool = False,
    sealed: bool = False, frame: str = "compact", workers: int = 0,
) -> dict[str, float]:  # fmt: skip
    """Run `rounds` rounds with `devices` synthetic devices; returns ingest numbers.

    With `workers`, that many `edgefl aggregate-worker` processes take the updates and this
    process coordinates (`edgefl aggregate --workers`); their CPU counts as the aggregator's.

    With `sealed`, every device is enrolled and seals its messages, and the aggregator checks
    every seal (strict enrollment) and seals its tasks and results, as a secure fleet runs.

    With `metrics`, the Prometheus exporter is attached (`on_verdict`, `on_round`, presence) and
    /metrics is scraped every second from this process while the rounds run, so its CPU counts;
    and an `edgefl dashboard` process watches the fleet and reads the record, with a page's
    event stream open (its own CPU is its process's; what it costs the aggregator counts).
    """
    bundle = make_bundle(workdir / f"bundle-{features}", features)
    ready = mp.Event()
    digest = load_bundle(bundle).digest
    fleet = mp.Process(
        target=device_fleet, args=(url, devices, features, rounds, digest, ready, sealed, frame)
    )
    fleet.start()
    ready.wait(120)
    config = AggregatorConfig(
        # Every device must be online (min_devices), so the online set has nothing to settle.
        url, FLEET, bundle,
        RoundPolicy(rounds=rounds, min_devices=devices, deadline_s=120, settle_s=0.0),
        state_path=workdir / f"state-{features}{'-metrics' if metrics else ''}.sqlite",
        auth=fleet_auth(devices) if sealed else None,
    )  # fmt: skip
    # CPU seconds of this process (the aggregator's threads; the devices are another process):
    # unlike updates/s, it hardly moves with the load other jobs put on the machine.
    cpu = time.process_time()
    exporter, scraper, scrapes = None, None, [0]
    if metrics:
        from edgefl.roles.metrics_exporter import AggregatorMetrics

        exporter = AggregatorMetrics(FLEET)
        port = exporter.serve(0)
        done = threading.Event()

        def scrape() -> None:
            while not done.wait(1.0):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
                scrapes[0] += 1

        scraper = threading.Thread(target=scrape, daemon=True)
        scraper.start()
        page = watch_with_dashboard(url, config.state_path)
    # CPU at each round's close: rounds 2.. are the steady state, without the start-up (1,000
    # statuses, the bundle) or the shutdown that the whole run's CPU shares out.
    closes: list[float] = []
    worker_closes: list[float] = []
    processes: list[subprocess.Popen[bytes]] = []

    def on_round(summary: RoundSummary) -> None:
        closes.append(time.process_time())
        worker_closes.append(sum(process_cpu(p.pid) for p in processes))
        if exporter is not None:
            exporter.on_round(summary)

    load = os.getloadavg()[0]  # what else ran: on 2 cores it moves updates/s by 2x
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    key = None
    if workers and sealed:
        key = workdir / "aggregator.key"
        key.write_bytes(bench_key("aggregator").private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ))  # fmt: skip
    processes += start_workers(url, workers, key)
    server = (Coordinator(config, workers=workers, on_round=on_round) if workers else
              Aggregator(config, on_verdict=exporter.on_verdict if exporter else None,
                         on_round=on_round))  # fmt: skip
    if exporter is not None:
        exporter.watch_presence(server.device_presence)
    summary = server.run()
    worker_cpu = stop_workers(processes, children)
    if exporter is not None and scraper is not None:
        done.set()
        scraper.join()
        exporter.close()
        for process in page:
            process.terminate()
            process.wait(10)
    cpu = time.process_time() - cpu
    fleet.join(60)  # after the workers' CPU was read: it counts reaped children only
    rates = [r.accepted / r.seconds for r in summary.rounds]
    assert all(r.accepted == devices for r in summary.rounds), [r.accepted for r in summary.rounds]
    return {
        "head": f"{features}x10",
        "devices": devices,
        "rounds": rounds,
        "updates_per_s_median": statistics.median(rates),
        "updates_per_s_min": min(rates),
        "round_seconds_median": statistics.median(r.seconds for r in summary.rounds),
        "aggregator_cpu_ms_per_update": 1000 * (cpu + worker_cpu) / (devices * rounds),
        "workers": workers,
        "load_1min_before": load,
        "coordinator_cpu_ms_per_update": 1000 * cpu / (devices * rounds),
        "workers_cpu_ms_per_update": 1000 * worker_cpu / (devices * rounds),
        "steady_workers_cpu_ms_per_update": (
            1000 * (worker_closes[-1] - worker_closes[0]) / (devices * (rounds - 1))
            if rounds > 1
            else None
        ),
        "steady_cpu_ms_per_update": (
            1000 * (closes[-1] - closes[0]) / (devices * (rounds - 1)) if rounds > 1 else None
        ),
        "bytes_per_update": summary.rounds[0].metrics["bytes_per_update"],
        "metrics_scrapes": scrapes[0],
    }


def start_workers(url: str, count: int, key: Path | None) -> list[subprocess.Popen[bytes]]:
    """Start `count` `edgefl aggregate-worker` processes, with the aggregator's key file (a
    sealed fleet) or insecure."""
    command = [sys.executable, "-c", "from edgefl.cli import main; main()", "aggregate-worker",
               "--broker", url, "--fleet", FLEET,
               *(["--signing-key", str(key)] if key else ["--insecure"])]  # fmt: skip
    return [
        subprocess.Popen([*command, "--worker-id", f"bench-{i}"], stderr=subprocess.DEVNULL)
        for i in range(count)
    ]


def process_cpu(pid: int) -> float:
    """Return the CPU seconds (user + system) a running process has used so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop_workers(processes: list[subprocess.Popen[bytes]], before: resource.struct_rusage) -> float:
    """Stop the workers; return the CPU seconds they used (children reaped since `before`)."""
    for process in processes:
        process.terminate()
    for process in processes:
        process.wait(30)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def fleet_auth(devices: int) -> AggregatorAuth:
    """The aggregator's key and a registry with every synthetic device enrolled (strict)."""
    registry = DeviceRegistry()
    for i in range(devices):
        device = f"dev-{i:04d}"
        registry.enroll(device, raw_public_key(bench_key(device)))
    return AggregatorAuth(bench_key("aggregator"), DeviceVerifier(registry, STRICT))


def seal_costs(payload_bytes: int, n: int = 20_000) -> dict[str, float]:
    """CPU of sealing and checking a `payload_bytes` message, alone, in microseconds: a seal
    (Ed25519; statuses, reports, tasks, results) and a MAC (updates), each made by a board and
    checked by the aggregator (registry lookup and revocation included)."""
    board = AgentAuth(bench_key("dev-0000"), TrustedSigners((), insecure=True))
    auth = fleet_auth(1)
    auth.learn_mac_key("dev-0000", board.mac_public)
    topic = topics.round_update(FLEET, 1, "dev-0000")
    payload = bytes(payload_bytes)
    makers = {
        "seal": lambda: board.seal(topic, payload),
        "mac": lambda: board.seal_update(topic, payload, auth.mac_public),
    }
    costs = {}
    for name, make in makers.items():
        started = time.process_time()
        for _ in range(n):
            data = make()
        costs[f"{name}_us"] = 1e6 * (time.process_time() - started) / n
        started = time.process_time()
        for _ in range(n):
            auth.open(topic, "dev-0000", data)
        costs[f"{name}_check_us"] = 1e6 * (time.process_time() - started) / n
    return costs


def watch_with_dashboard(url: str, state: Path | None) -> list[subprocess.Popen[bytes]]:
    """Start `edgefl dashboard` on the fleet and its record, and keep its event stream open."""
    port = free_port()
    edgefl = str(Path(sys.executable).parent / "edgefl")
    command = [edgefl, "dashboard", "--broker", url, "--fleet", FLEET, "--port", str(port)]
    if state is not None:
        # The metrics runs' fleet is unsigned: shown as it arrives, as before seals were checked.
        command += ["--state", str(state), "--insecure"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).read()
            break
        except OSError:
            time.sleep(0.1)
    else:
        server.kill()
        raise RuntimeError("edgefl dashboard did not start within 30 s")
    stream = subprocess.Popen(
        ["curl", "-sN", f"http://127.0.0.1:{port}/events"], stdout=subprocess.DEVNULL
    )
    return [stream, server]


def exporter_costs(devices: int, updates: int = 200_000, scrapes: int = 200) -> dict[str, float]:
    """CPU the exporter costs, part by part: `on_verdict` per update (the only per-update
    work) and one scrape of /metrics (collection, with `devices` devices' presence, and text
    exposition; the HTTP round trip is in the end-to-end runs)."""
    from prometheus_client import generate_latest

    from edgefl.core.round_state import ACCEPTED, REJECTED, Verdict
    from edgefl.roles.metrics_exporter import AggregatorMetrics

    exporter = AggregatorMetrics(FLEET)
    presence = {f"dev-{i:04d}": "online" for i in range(devices)}
    exporter.watch_presence(lambda: presence)
    verdicts = [Verdict(ACCEPTED, 1, "d", size=3000)] * 9 + [Verdict(REJECTED, 1, "d", "shape")]
    started = time.process_time()
    for i in range(updates):
        exporter.on_verdict(verdicts[i % 10])
    per_update = time.process_time() - started
    started = time.process_time()
    for _ in range(scrapes):
        generate_latest(exporter.registry)
    per_scrape = time.process_time() - started
    return {"on_verdict_us": 1e6 * per_update / updates, "scrape_ms": 1e3 * per_scrape / scrapes}


def codec_sizes(features: int) -> list[dict[str, float | str]]:
    """Bytes on the wire of one update (header included) for each codec, in both frames, and
    with the MAC a signed fleet adds (EFM2 around a compact frame, EFM1 around safetensors)."""
    rng = np.random.default_rng(0)
    delta = {
        "0.weight": (rng.standard_normal((10, features)) * 0.01).astype(np.float32),
        "0.bias": (rng.standard_normal(10) * 0.01).astype(np.float32),
    }
    metrics = {"loss": 0.71234, "global_accuracy": 0.5, "personal_accuracy": 0.75,
               "train_seconds": 0.01}  # fmt: skip
    header = UpdateHeader(12, "dev-0001", "default", 40, 11, metrics=metrics, run_id=RUN_SLOT,
                          head_digest=HEAD_SLOT, bundle_digest=HEAD_SLOT)  # fmt: skip
    rows: list[dict[str, float | str]] = []
    for frame, version in (("compact", COMPACT_FRAME), ("safetensors", 0)):
        sizes = {codec: encode_update(header, delta, codec, version, feedback=ErrorFeedback())
                 for codec in ("float32", "int8", "topk")}  # fmt: skip
        macd = {codec: len(mac_seal(bytes(32), "t", data)) for codec, data in sizes.items()}
        rows += [
            {"head": f"{features}x10", "frame": frame, "codec": codec, "bytes": len(data),
             "ratio_to_float32": len(data) / len(sizes["float32"]), "bytes_with_mac": macd[codec],
             "ratio_with_mac": macd[codec] / macd["float32"],
             "raw_tensor_bytes": 4 * (10 * features + 10)}
            for codec, data in sizes.items()
        ]  # fmt: skip
    return rows


def report_sealing(pairs: list[tuple[dict[str, float], ...]], devices: int) -> dict[str, object]:
    """Print and return what sealing costs the aggregator per validated 64x10 update."""
    plain = [p[0]["aggregator_cpu_ms_per_update"] for p in pairs]
    sealed = [p[1]["aggregator_cpu_ms_per_update"] for p in pairs]
    costs = seal_costs(int(pairs[0][0]["bytes_per_update"]))
    base = statistics.median(plain)
    overhead = 100 * (statistics.median(sealed) - base) / base
    print(f"\nSealed messages, 64x10, {devices} devices: aggregator CPU ms/update in "
          f"{len(pairs)} alternating runs")  # fmt: skip
    print(f"  insecure: {' '.join(f'{v:.3f}' for v in plain)}  (median {base:.3f})")
    print(f"  sealed:   {' '.join(f'{v:.3f}' for v in sealed)}  (median "
          f"{statistics.median(sealed):.3f}; +{overhead:.1f}%)")  # fmt: skip
    print(f"  parts: a seal (statuses) {costs['seal_us']:.1f} us on a board, checked in "
          f"{costs['seal_check_us']:.1f} us; a MAC (updates) {costs['mac_us']:.1f} us, checked in "
          f"{costs['mac_check_us']:.1f} us = {costs['mac_check_us'] / (10 * base):.1f}% of an "
          "insecure update")  # fmt: skip
    return {"cpu_ms_per_update_insecure": plain, "cpu_ms_per_update_sealed": sealed,
            "overhead_pct_of_medians": overhead, **costs}  # fmt: skip


def report_workers(
    single: dict[str, float], rows: list[dict[str, float]], devices: int, sealed: bool
) -> dict[str, object]:
    """Print the scale-out table (one process, then each worker count) and return it."""
    print(f"\nScale-out, 64x10, {devices} devices{', sealed' if sealed else ''}: one process, "
          "then a coordinator and N ingest worker processes (aggregate --workers N)")  # fmt: skip
    print(f"{'workers':>8} {'updates/s (median)':>19} {'x 1 worker':>11} {'agg CPU ms/update':>18}"
          f" {'coordinator':>12} {'workers':>8} {'rounds 2+: agg CPU ms/update':>29}")  # fmt: skip
    ones = [r["updates_per_s_median"] for r in rows if r["workers"] == 1]
    base = statistics.median(ones) if ones else float("nan")
    print(f"{'(none)':>8} {single['updates_per_s_median']:>19.0f} {'':>11}"
          f" {single['aggregator_cpu_ms_per_update']:>18.3f} {'':>12} {'':>8}"
          f" {single['steady_cpu_ms_per_update'] or 0:>29.3f}")  # fmt: skip
    for row in rows:
        steady = (row["steady_cpu_ms_per_update"] or 0) + (
            row["steady_workers_cpu_ms_per_update"] or 0
        )
        row["steady_aggregator_cpu_ms_per_update"] = steady
        print(f"{row['workers']:>8} {row['updates_per_s_median']:>19.0f}"
              f" {row['updates_per_s_median'] / base:>11.2f}"
              f" {row['aggregator_cpu_ms_per_update']:>18.3f}"
              f" {row['coordinator_cpu_ms_per_update']:>12.3f}"
              f" {row['workers_cpu_ms_per_update']:>8.3f}"
              f" {steady:>29.3f}")  # fmt: skip
    medians: dict[int, dict[str, float]] = {}
    for count in sorted({int(r["workers"]) for r in rows}):
        mine = [r for r in rows if r["workers"] == count]
        medians[count] = {
            "updates_per_s": statistics.median(r["updates_per_s_median"] for r in mine),
            "steady_cpu_ms_per_update": statistics.median(
                r["steady_aggregator_cpu_ms_per_update"] for r in mine
            ),
        }
    print("  medians: " + "; ".join(
        f"{n} worker{'s' if n > 1 else ''} {m['updates_per_s']:.0f}/s "
        f"({m['updates_per_s'] / medians[1]['updates_per_s']:.2f}x), "
        f"{m['steady_cpu_ms_per_update']:.3f} ms/update in rounds 2+"
        for n, m in medians.items()
    ) + f"; {os.cpu_count()} cores, 1-min load before each run "
        + " ".join(f"{r['load_1min_before']:.1f}" for r in rows))  # fmt: skip
    return {"single_process": single, "runs": rows, "medians": medians, "sealed": sealed}


def main() -> None:
    """Run the benchmark and write benchmarks/out/fl.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--metrics-repeats", type=int, default=3,
                        help="Runs without and with the metrics exporter (0: none).")  # fmt: skip
    parser.add_argument("--seal-repeats", type=int, default=3,
                        help="Runs insecure and sealed, alternating (0: none).")  # fmt: skip
    parser.add_argument("--workers", type=int, default=0,
                        help="Also run 64x10 with a coordinator and 1..N ingest worker "
                        "processes (0: none).")  # fmt: skip
    parser.add_argument("--worker-repeats", type=int, default=1,
                        help="Alternating runs of each worker count.")  # fmt: skip
    parser.add_argument("--workers-sealed", action="store_true",
                        help="Run the --workers rows and their baseline sealed.")  # fmt: skip
    parser.add_argument("--frame-repeats", type=int, default=1,
                        help="64x10 runs with compact and safetensors updates, alternating "
                        "(0: none).")  # fmt: skip
    args = parser.parse_args()
    if shutil.which("mosquitto") is None:
        sys.exit("mosquitto is not installed (apt-get install mosquitto)")
    workdir = Path(tempfile.mkdtemp(prefix="edgefl-bench-"))
    broker = LocalMosquitto(workdir, max_queued_messages=1_000_000)
    broker.start()
    url = broker.url
    try:
        ingest_rows = [ingest(url, workdir, args.devices, f, args.rounds) for f in (64, 1280)]
        # Alternating runs without and with the exporter, so drift in the machine's load
        # falls on both alike.
        pairs = [
            tuple(
                ingest(url, workdir / f"ab-{i}-{m}", args.devices, 64, args.rounds, metrics=m)
                for m in (False, True)
            )
            for i in range(args.metrics_repeats)
        ]
        seal_pairs = [
            tuple(
                ingest(url, workdir / f"seal-{i}-{s}", args.devices, 64, args.rounds, sealed=s)
                for s in (False, True)
            )
            for i in range(args.seal_repeats)
        ]
        sealed = args.workers_sealed
        worker_base = (
            ingest(url, workdir / "workers-0", args.devices, 64, args.rounds, sealed=True)
            if sealed and args.workers else ingest_rows[0]
        )  # fmt: skip
        repeats = args.worker_repeats if args.workers else 0
        worker_rows = []
        for i, n in itertools.product(range(repeats), range(1, args.workers + 1)):
            folder = workdir / f"workers-{i}-{n}"
            row = ingest(url, folder, args.devices, 64, args.rounds, workers=n, sealed=sealed)
            worker_rows.append(row)
        frame_pairs = [
            tuple(
                ingest(url, workdir / f"frame-{i}-{f}", args.devices, 64, args.rounds, frame=f)
                for f in ("compact", "safetensors")
            )
            for i in range(args.frame_repeats)
        ]
    finally:
        broker.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    size_rows = codec_sizes(64) + codec_sizes(1280)
    print(f"\nAggregator ingest through Mosquitto ({args.devices} devices, {args.rounds} rounds)")
    print(f"{'head':>8} {'updates/s (median)':>19} {'min':>8} {'round s':>8} {'bytes/update':>13}"
          f" {'agg CPU ms/update':>18} {'rounds 2+':>10}")  # fmt: skip
    for row in ingest_rows:
        rate, slowest = row["updates_per_s_median"], row["updates_per_s_min"]
        print(f"{row['head']:>8} {rate:>19.0f} {slowest:>8.0f}"
              f" {row['round_seconds_median']:>8.3f} {row['bytes_per_update']:>13.0f}"
              f" {row['aggregator_cpu_ms_per_update']:>18.3f}"
              f" {row['steady_cpu_ms_per_update'] or 0:>10.3f}")  # fmt: skip
    print("\nBytes per update, header included (int8 and top-k 1% with error feedback); with the "
          "MAC of a signed fleet")  # fmt: skip
    print(f"{'head':>8} {'frame':>12} {'codec':>8} {'bytes':>8} {'x float32':>10} "
          f"{'with MAC':>9} {'x float32':>10}")  # fmt: skip
    for row in size_rows:
        print(f"{row['head']:>8} {row['frame']:>12} {row['codec']:>8} {row['bytes']:>8} "
              f"{row['ratio_to_float32']:>10.3f} {row['bytes_with_mac']:>9} "
              f"{row['ratio_with_mac']:>10.3f}")  # fmt: skip
    results: dict[str, object] = {"ingest": ingest_rows, "codecs": size_rows}
    if worker_rows:
        results["workers"] = report_workers(worker_base, worker_rows, args.devices, sealed)
    if frame_pairs:
        results["frames"] = [{"compact": c, "safetensors": t} for c, t in frame_pairs]
        print(f"\nCompact against safetensors updates, 64x10, {args.devices} devices "
              f"({len(frame_pairs)} alternating runs)")  # fmt: skip
        for compact, legacy in frame_pairs:
            print(f"  compact {compact['updates_per_s_median']:.0f}/s "
                  f"{compact['aggregator_cpu_ms_per_update']:.3f} ms/update "
                  f"({compact['steady_cpu_ms_per_update'] or 0:.3f} in rounds 2+); safetensors "
                  f"{legacy['updates_per_s_median']:.0f}/s "
                  f"{legacy['aggregator_cpu_ms_per_update']:.3f} ms/update "
                  f"({legacy['steady_cpu_ms_per_update'] or 0:.3f})")  # fmt: skip
    if pairs:
        without = [p[0]["aggregator_cpu_ms_per_update"] for p in pairs]
        with_ = [p[1]["aggregator_cpu_ms_per_update"] for p in pairs]
        costs = exporter_costs(args.devices)
        plain = statistics.median(without)
        rate = statistics.median(p[0]["updates_per_s_median"] for p in pairs)
        # Per update: on_verdict, plus a share of one scrape (every 15 s, Prometheus's default,
        # and every 1 s as in the end-to-end runs) at this ingest rate.
        share_15s = costs["scrape_ms"] * 1000 / (15 * rate)
        share_1s = costs["scrape_ms"] * 1000 / rate
        overhead = {
            "cpu_ms_per_update_without": without,
            "cpu_ms_per_update_with": with_,
            "end_to_end_overhead_pct_of_medians": 100 * (statistics.median(with_) - plain) / plain,
            **costs,
            "per_update_us_scrape_every_15s": costs["on_verdict_us"] + share_15s,
            "per_update_us_scrape_every_1s": costs["on_verdict_us"] + share_1s,
            "overhead_pct_scrape_every_15s": (costs["on_verdict_us"] + share_15s) / (10 * plain),
            "overhead_pct_scrape_every_1s": (costs["on_verdict_us"] + share_1s) / (10 * plain),
        }
        results["metrics_overhead"] = overhead
        print(f"\nPrometheus exporter and a dashboard watching, 64x10, {args.devices} devices:"
              " aggregator CPU ms/update in"
              f" {len(pairs)} alternating runs")  # fmt: skip
        print(f"  without: {' '.join(f'{v:.3f}' for v in without)}  (median {plain:.3f})")
        print(f"  with:    {' '.join(f'{v:.3f}' for v in with_)}  (median "
              f"{statistics.median(with_):.3f}; /metrics scraped every 1 s)")  # fmt: skip
        print(f"  parts: on_verdict {costs['on_verdict_us']:.2f} us/update; one scrape "
              f"{costs['scrape_ms']:.2f} ms ({args.devices} devices)")  # fmt: skip
        print(f"  per update: {overhead['per_update_us_scrape_every_15s']:.2f} us = "
              f"{overhead['overhead_pct_scrape_every_15s']:.2f}% (scrape every 15 s); "
              f"{overhead['per_update_us_scrape_every_1s']:.2f} us = "
              f"{overhead['overhead_pct_scrape_every_1s']:.2f}% (every 1 s)")  # fmt: skip
    if seal_pairs:
        results["sealing"] = report_sealing(seal_pairs, args.devices)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "fl.json").write_text(json.dumps(results, indent=2))
    print(f"\nwrote {OUT / 'fl.json'}")


if __name__ == "__main__":
    main()
